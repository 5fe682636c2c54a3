"""Memory order of the flag protocol, read from a kernel's PTX: which instructions touch a flag word, and how.

The interpreter ignores ``sem`` and ``scope`` and x86 keeps stores in order, so only the compiled code can
show an acquire turned into a plain load. :func:`memory_order` ties instructions to flag words by data flow,
not by their place in the text: a register is a *flag address* if it is the kernel's ``flags_ptr`` parameter
(``ld.param``) or computed from one (any instruction but a memory access passes it on, through ``add``,
``mad``, ``cvta``, inline assembly operands...), iterated to a fixed point over loops. Every ``ld``, ``st``,
``atom`` or ``red`` whose address is a flag address is a flag access; the same for ``counters_ptr`` (the
tile counter of matmul_rs). Loops are the spans between a label and a later branch back to it.

The rules (``violations`` lists each break, naming the line):

* a flag is read only with acquire semantics at system scope (``ld.acquire.sys``, ``atom.acquire.sys``):
  no plain, relaxed or volatile ``ld.global`` of a flag word;
* every loop that reads a flag (a wait loop, its poll included) holds such an acquire;
* a flag is written only with release semantics at system scope (the notify);
* the tile counter's increment is an ``atom.acq_rel.sys.add``, and the counter is never read by a plain load.

System scope for every flag, local ones included: ag_matmul's flags are written by ``stream_write_value32``
after a copy-engine memcpy, and reduce_slots' by peer GPUs' kernels; neither writer is a thread of this GPU,
so ``.gpu`` scope gives no ordering with it (PTX ISA, memory consistency model: scope covers the threads
of one device). The counter's release publishes stores that went to peers, so it is system scope too.
"""

from __future__ import annotations

import re

_PARAM_DECL = re.compile(r"\.param\s+([^;\n]*?)\s*(\w+_param_(\d+))(\[\d+\])?\s*[,)]")
_LABEL = re.compile(r"^\s*(\$?[\w$]+):")
_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\b\s*([^;]*);")
_REG = re.compile(r"%[A-Za-z_][\w]*")
_ADDRESS = re.compile(r"\[\s*(%[\w]+)")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$?[\w$]+)")
_MEMORY = ("ld.", "st.", "atom.", "red.")
_WATCHED = ("flags_ptr", "counters_ptr")


def param_indices(ptx: str, args: list[tuple[str, bool]]) -> dict[str, int]:
    """PTX parameter index of each pointer argument; ``args`` = the kernel's non-constexpr arguments in order,
    each with whether it is a tensor descriptor (which takes a ``.b8`` block plus its shape and strides)."""
    decls = [(m.group(1), m.group(4) is not None) for m in _PARAM_DECL.finditer(ptx.split(")", 1)[0] + ")")]
    indices, i = {}, 0
    for name, is_desc in args:
        indices[name] = i
        i += 1
        if is_desc:
            while i < len(decls) and not decls[i][1] and ".ptr" not in decls[i][0]:
                i += 1
    for name in _WATCHED:
        if name in indices and ".ptr" not in decls[indices[name]][0]:
            raise RuntimeError(f"PTX parameter {indices[name]} for {name} is not a pointer: {decls[indices[name]]}")
    return indices


def _lines(ptx: str) -> list[str]:
    return [line.split("//", 1)[0] for line in ptx.splitlines()]


def _tainted(lines: list[str], roots: set[str]) -> set[str]:
    """Registers computed from the registers that ``roots``' ``ld.param`` loads fill (fixed point)."""
    regs: set[str] = set()
    changed = True
    while changed:
        changed = False
        for line in lines:
            m = _INSTR.match(line)
            if m is None:
                continue
            op, operands = m.groups()
            names = _REG.findall(operands)
            if not names:
                continue
            if op.startswith("ld.param"):
                hit = any(f"_param_{i}]" in operands.replace(" ", "") for i in roots)
            elif op.startswith(_MEMORY) or op.startswith("setp"):
                continue  # a loaded value is data, not an address
            else:
                hit = any(r in regs for r in names[1:])
            if hit and names[0] not in regs:
                regs.add(names[0])
                changed = True
    return regs


def _accesses(lines: list[str], regs: set[str]) -> list[tuple[int, str]]:
    """(line number, opcode) of every memory instruction whose address register is in ``regs``."""
    found = []
    for n, line in enumerate(lines):
        m = _INSTR.match(line)
        if m and m.group(1).startswith(_MEMORY) and not m.group(1).startswith("ld.param"):
            addr = _ADDRESS.search(m.group(2))
            if addr and addr.group(1) in regs:
                found.append((n, m.group(1)))
    return found


def _mods(op: str) -> set[str]:
    return set(op.split("."))


def memory_order(ptx: str, params: dict[str, int]) -> dict:
    """Flag and counter accesses of a kernel (see the module docstring): counts and ``violations``."""
    lines = _lines(ptx)
    flags = _accesses(lines, _tainted(lines, {params["flags_ptr"]})) if "flags_ptr" in params else []
    counters = _accesses(lines, _tainted(lines, {params["counters_ptr"]})) if "counters_ptr" in params else []
    violations = []
    acquires, notifies = set(), 0
    for n, op in flags:
        mods = _mods(op)
        writes = op.startswith(("st.", "red.")) or "exch" in mods
        if writes:
            notifies += 1
            if not (mods & {"release", "acq_rel"}) or "sys" not in mods:
                violations.append(f"line {n + 1}: flag written without release at system scope: {op}")
        elif not (mods & {"acquire", "acq_rel"}) or "sys" not in mods:
            violations.append(f"line {n + 1}: flag read without acquire at system scope: {op}")
        else:
            acquires.add(n)
    labels = {m.group(1): n for n, line in enumerate(lines) if (m := _LABEL.match(line))}
    flag_reads = {n for n, op in flags if not op.startswith(("st.", "red.")) and "exch" not in _mods(op)}
    wait_loops = 0
    for n, line in enumerate(lines):
        m = _BRANCH.search(line)
        start = labels.get(m.group(1)) if m else None
        if start is None or start >= n:
            continue  # not a back edge
        body = range(start, n + 1)
        if any(r in body for r in flag_reads):
            wait_loops += 1
            if not any(r in body for r in acquires):
                violations.append(f"lines {start + 1}-{n + 1}: a loop reads a flag without an acquire at system scope")
    counter_acq_rel = 0
    for n, op in counters:
        mods = _mods(op)
        if "add" in mods:
            if {"acq_rel", "sys"} <= mods:
                counter_acq_rel += 1
            else:
                violations.append(f"line {n + 1}: tile counter incremented without acq_rel at system scope: {op}")
        elif op.startswith("ld.") and not (mods & {"acquire", "acq_rel"}):
            violations.append(f"line {n + 1}: plain load of the tile counter: {op}")
    return {
        "flag_reads": len(flag_reads),
        "wait_loops": wait_loops,
        "notifies": notifies,
        "counter_acq_rel": counter_acq_rel,
        "violations": violations,
    }
