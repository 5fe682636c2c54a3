"""Presets for :mod:`odysseus.plan`: hardware, models and the modelling assumptions, each value with its source.

Every numeric field of a preset must be named in its ``sources`` mapping (``__post_init__`` raises
otherwise), so a number without a source cannot enter the planner. Datasheet peaks and published model
shapes are kept apart from :class:`Assumptions`, the achievable-efficiency factors and overlap fractions,
which are engineering estimates to be replaced by a calibration (``python -m odysseus.plan --calibrate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..config import TransformerConfig


def _is_constant(value: object) -> bool:
    """A number, or a mapping of numbers: what must carry a source."""
    if isinstance(value, dict):
        return any(_is_constant(v) for v in value.values())
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sources(obj: object, what: str) -> None:
    """Raise unless every numeric field of the dataclass ``obj`` has a non-empty entry in ``obj.sources``."""
    missing = [
        f.name
        for f in fields(obj)
        if f.name != "sources" and _is_constant(getattr(obj, f.name)) and not str(obj.sources.get(f.name, "")).strip()
    ]
    if missing:
        raise ValueError(f"{what}: no source given for {missing}; every constant needs one in `sources`")
    unknown = sorted(set(obj.sources) - {f.name for f in fields(obj)})
    if unknown:
        raise ValueError(f"{what}: sources name fields that do not exist: {unknown}")


def _check_positive(obj: object, what: str, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{what}: {name}={value!r} must be a positive finite number")


@dataclass(frozen=True)
class Hardware:
    """One accelerator type and its interconnect, as the datasheet gives them (no efficiency applied).

    Bandwidths are per GPU and per direction: what one rank can receive per second.
    """

    name: str
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s (without sparsity)."""
    memory_bytes: float
    """Device memory."""
    intra_node_bw: float
    """Bytes/s one GPU can receive from its node peers (NVLink or PCIe), one direction."""
    gpus_per_node: int
    """GPUs sharing the intra-node fabric."""
    inter_node_bw: float | None = None
    """Bytes/s one GPU can receive from other nodes (its NIC); ``None``: a single node, N <= gpus_per_node
    (only calibrated hardware, which measured one node, has none)."""
    host_memory_bytes: float | None = None
    """Host (CPU) memory per GPU: the node's system memory over its GPUs; where offloaded layer inputs wait."""
    host_bw: float | None = None
    """Bytes/s between host and one GPU (its PCIe link), one direction; ``None`` with ``host_memory_bytes``
    unknown: offload cannot be planned."""
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_sources(self, f"hardware {self.name!r}")
        _check_positive(self, f"hardware {self.name!r}", ["peak_flops", "memory_bytes", "intra_node_bw"])
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"hardware {self.name!r}: gpus_per_node={self.gpus_per_node!r} must be an int >= 1")
        for name in ("inter_node_bw", "host_memory_bytes", "host_bw"):
            if getattr(self, name) is not None:
                _check_positive(self, f"hardware {self.name!r}", [name])

    @property
    def max_gpus(self) -> float:
        """How many ranks this preset can hold: one node, or unbounded with an inter-node link."""
        return math.inf if self.inter_node_bw is not None else self.gpus_per_node


@dataclass(frozen=True)
class Model:
    """The shape of a Llama-style decoder: one block's config plus what surrounds the blocks."""

    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    tied_embeddings: bool = False
    """Input embedding and LM head share one matrix (Llama 2 and 3 do not)."""
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_sources(self, f"model {self.name!r}")
        self.config()  # validates the block shape (heads divide the width, GQA groups...)
        for name in ("num_layers", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model {self.name!r}: {name}={value!r} must be a positive int")

    def config(self) -> TransformerConfig:
        """The :class:`TransformerConfig` of one block."""
        return TransformerConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
        )


_COLLECTIVES = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce")


@dataclass(frozen=True)
class Assumptions:
    """Engineering estimates, not datasheet values: what fraction of a peak is achievable, what overlaps.

    Each is a knob of the model; ``sources`` says why each default was chosen. Calibrating against a
    measured run replaces the rate and bandwidth factors with fitted values.
    """

    gemm_efficiency: float = 0.7
    attention_efficiency: float = 0.5
    """Attention's fraction of the peak on hardware without a published curve (:mod:`odysseus.plan.efficiency`)."""
    attention_kernel: str = "fa2"
    """Whose published throughput curve applies where there is one: ``"fa2"`` (torch SDPA's flash backend,
    flash-attn 2) or ``"fa3"`` (flash-attn 3 on Hopper)."""
    ring_overlap: float = 0.9
    """Fraction of a ring step's point-to-point K/V (and dK/dV) transfer hidden behind that step's attention."""
    link_efficiency: float = 0.8
    collective_latency_s: float = 20e-6
    host_exchange_latency_s: float = 50e-6
    collective_efficiency: dict[str, float] = field(default_factory=dict)
    """Per collective kind (``all_gather``, ``reduce_scatter``, ``all_to_all``, ``all_reduce``), a factor on
    ``link_efficiency``; missing kinds use 1. Calibration fills it where kinds differ (gloo's reduce-scatter)."""
    grad_overlap: float = 0.0
    zero3_overlap: float = 0.9
    overlap: dict[str, float] = field(default_factory=lambda: {"naive": 0.0, "pipelined": 0.6, "symm": 0.9})
    """Fraction of a fused all-gather/reduce-scatter hidden behind its GEMM, per ``odysseus.overlap`` backend."""
    param_bytes: int = 2
    grad_bytes: int = 2
    optimizer_bytes: int = 12
    usable_memory_fraction: float = 0.9
    host_usable_fraction: float = 0.8
    host_link_efficiency: float = 0.8
    sources: dict[str, str] = field(
        default_factory=lambda: {
            "gemm_efficiency": "assumption: large bf16 GEMMs reach about 70% of dense peak on A100/H100 "
            "(cuBLAS on square-ish shapes); calibrate to replace",
            "attention_efficiency": "assumption, used only where odysseus.plan.efficiency has no published curve "
            "(A100, calibrations): FlashAttention-2 reports 50-73% of A100 peak forward and less backward (Dao "
            "2023, arXiv:2307.08691); 50% for forward+backward",
            "ring_overlap": "assumption until measured on GPU: the ring's P2P runs on a side stream beside the "
            "block's attention; 90% of the shorter of the two hides (launch and synchronisation gaps), as symm",
            "link_efficiency": "assumption: NCCL ring all-gather/reduce-scatter bus bandwidth is about 80% of "
            "the per-direction link peak for messages of tens of MB",
            "collective_latency_s": "assumption: fixed cost of one NCCL collective inside a node, order 10-30 us",
            "host_exchange_latency_s": "assumption: one gloo all-gather of int64 lengths on the CPU side group "
            "(odysseus.comm.exchange_lengths), order tens of us",
            "collective_efficiency": "assumption: every NCCL collective kind reaches link_efficiency (empty: "
            "all 1); a calibration fits one factor per kind",
            "overlap": "assumption until measured on GPU (perf/bench_layer.py): naive issues the collective, "
            "then the GEMM (0); pipelined overlaps chunk transfers with chunk GEMMs but pays per-chunk launches "
            "(0.6); symm lets the copy engine feed the GEMM tile by tile (0.9)",
            "grad_overlap": "the library's finalize_grads all-reduces after backward() returns: nothing overlaps "
            "(1.0 models a bucketed all-reduce issued from gradient hooks, as DDP does)",
            "zero3_overlap": "assumption: FSDP2 prefetches the next all-gather and reduce-scatters asynchronously; "
            "90% of that traffic hides behind compute when compute is longer",
            "param_bytes": "bf16 weights",
            "grad_bytes": "bf16 gradients",
            "optimizer_bytes": "mixed-precision AdamW: fp32 master weights + 2 fp32 moments = 12 bytes/param "
            "(Rajbhandari et al. 2020, ZeRO, arXiv:1910.02054, section 3.1)",
            "usable_memory_fraction": "assumption: about 10% of device memory goes to the CUDA context, NCCL "
            "buffers and allocator fragmentation",
            "host_usable_fraction": "assumption: 20% of host memory goes to the OS, the data loader, the page "
            "cache and pinned-allocator rounding",
            "host_link_efficiency": "assumption: pinned cudaMemcpyAsync reaches about 80% of the PCIe x16 "
            "per-direction peak (protocol overhead); offload copies overlap with the layer's compute, only the "
            "excess is exposed",
        }
    )

    def __post_init__(self) -> None:
        _check_sources(self, "assumptions")
        for name in ("gemm_efficiency", "attention_efficiency", "link_efficiency", "usable_memory_fraction",
                     "host_usable_fraction", "host_link_efficiency"):  # fmt: skip
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"assumptions: {name}={value!r} must be in (0, 1]")
        if self.attention_kernel not in ("fa2", "fa3"):
            raise ValueError(f"assumptions: attention_kernel={self.attention_kernel!r}; expected 'fa2' or 'fa3'")
        for name in ("grad_overlap", "zero3_overlap", "ring_overlap"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"assumptions: {name}={value!r} must be in [0, 1]")
        for kind, value in self.collective_efficiency.items():
            if kind not in _COLLECTIVES or not 0 < value <= 1:
                raise ValueError(
                    f"assumptions: collective_efficiency[{kind!r}]={value!r}; "
                    f"kinds are {_COLLECTIVES}, values in (0, 1]"
                )
        for backend, value in self.overlap.items():
            if not 0 <= value <= 1:
                raise ValueError(f"assumptions: overlap[{backend!r}]={value!r} must be in [0, 1]")
        for name in ("collective_latency_s", "host_exchange_latency_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"assumptions: {name}={getattr(self, name)!r} must be >= 0")


_DATASHEETS = {
    "A100": "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM)",
    "H100": "NVIDIA H100 Tensor Core GPU datasheet",
}

# One card per preset: ``name: description``, then one ``field value | source`` line per number, so that
# every number stands next to its source ({A100}/{H100} name the datasheets above). Bandwidths are per
# direction: half the bidirectional totals the datasheets quote.
_HARDWARE_CARDS = """
a100-nvlink: A100-SXM4-80GB, 8 per node on NVLink 3 (NVSwitch)
    peak_flops 312e12 | {A100}: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)
    memory_bytes 80e9 | {A100}: 80GB HBM2e
    intra_node_bw 300e9 | {A100}: NVLink 600 GB/s total, i.e. 300 GB/s per direction
    gpus_per_node 8 | NVIDIA DGX A100 datasheet: 8x A100 with NVSwitch
    inter_node_bw 25e9 | DGX A100 datasheet: 8x ConnectX-6 200 Gb/s HDR (one per GPU) = 25 GB/s per direction per GPU
    host_memory_bytes 125e9 | NVIDIA DGX A100 datasheet: 1 TB system memory (2 TB option) for 8 GPUs = 125 GB per GPU
    host_bw 32e9 | PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes (128b/130b) = ~32 GB/s per direction (DGX A100: Gen4 x16)
h100-nvlink: H100 SXM5 80GB, 8 per node on NVLink 4 (NVSwitch), one 400 Gb/s NIC per GPU between nodes
    peak_flops 989e12 | {H100}: H100 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense
    memory_bytes 80e9 | {H100}: H100 SXM 80GB HBM3
    intra_node_bw 450e9 | {H100}: NVLink 900 GB/s total, i.e. 450 GB/s per direction
    gpus_per_node 8 | NVIDIA DGX H100 datasheet: 8x H100 SXM with NVSwitch
    inter_node_bw 50e9 | NVIDIA DGX H100 datasheet: 8x ConnectX-7 400 Gb/s (one per GPU) = 50 GB/s per direction per GPU
    host_memory_bytes 250e9 | NVIDIA DGX H100 datasheet: 2 TB system memory for 8 GPUs = 250 GB per GPU
    host_bw 64e9 | {H100}: PCIe Gen5 x16 128 GB/s total, i.e. 64 GB/s per direction
h100-pcie: H100 PCIe 80GB, 8 per server on PCIe Gen5 (no NVLink bridge)
    peak_flops 756e12 | {H100}: H100 PCIe BF16 Tensor Core 1,513 TFLOPS with sparsity, 756 dense
    memory_bytes 80e9 | {H100}: H100 PCIe 80GB HBM2e
    intra_node_bw 64e9 | {H100}: PCIe Gen5 128 GB/s total, i.e. 64 GB/s per direction
    gpus_per_node 8 | assumption: an 8-GPU PCIe server
    inter_node_bw 25e9 | assumption: one 400 Gb/s NIC per two GPUs, as in many PCIe servers: 25 GB/s per GPU
    host_memory_bytes 125e9 | assumption: a 1 TB 8-GPU PCIe server (no vendor reference system) = 125 GB per GPU
    host_bw 64e9 | {H100}: PCIe Gen5 128 GB/s total, i.e. 64 GB/s per direction
h100-multinode: H100 SXM5 nodes of 8 on NVLink 4, one 400 Gb/s NIC per GPU between nodes (= h100-nvlink, older name)
    peak_flops 989e12 | {H100}: H100 SXM BF16 Tensor Core 989 TFLOPS dense
    memory_bytes 80e9 | {H100}: H100 SXM 80GB HBM3
    intra_node_bw 450e9 | {H100}: NVLink 900 GB/s total, i.e. 450 GB/s per direction
    gpus_per_node 8 | NVIDIA DGX H100 datasheet: 8x H100 SXM per node
    inter_node_bw 50e9 | NVIDIA DGX H100 datasheet: 8x ConnectX-7 400 Gb/s (one per GPU) = 50 GB/s per direction per GPU
    host_memory_bytes 250e9 | NVIDIA DGX H100 datasheet: 2 TB system memory for 8 GPUs = 250 GB per GPU
    host_bw 64e9 | {H100}: PCIe Gen5 x16 128 GB/s total, i.e. 64 GB/s per direction
"""


def _read_cards(text: str) -> dict[str, Hardware]:
    """The :class:`Hardware` of each card in ``text`` (see ``_HARDWARE_CARDS``)."""
    cards: dict[str, dict] = {}
    for line in text.strip().splitlines():
        if not line.startswith(" "):
            name, description = line.split(": ", 1)
            card = cards[name] = {"name": name, "description": description, "sources": {}}
            continue
        fact, source = line.strip().split(" | ", 1)
        key, value = fact.split()
        card[key] = int(value) if value.isdigit() else float(value)
        card["sources"][key] = source.format(**_DATASHEETS)
    return {name: Hardware(**card) for name, card in cards.items()}


HARDWARE: dict[str, Hardware] = _read_cards(_HARDWARE_CARDS)


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


def _model_sources(repo: str) -> dict[str, str]:
    keys = {
        "hidden_size": "hidden_size",
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",
        "intermediate_size": "intermediate_size",
        "num_layers": "num_hidden_layers",
        "vocab_size": "vocab_size",
    }
    return {ours: f"{_hf(repo)} ({theirs})" for ours, theirs in keys.items()}


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("llama2-7b", 4096, 32, 32, 11008, 32, 32000, sources=_model_sources("meta-llama/Llama-2-7b-hf")),
        Model("llama2-13b", 5120, 40, 40, 13824, 40, 32000, sources=_model_sources("meta-llama/Llama-2-13b-hf")),
        Model("llama2-70b", 8192, 64, 8, 28672, 80, 32000, sources=_model_sources("meta-llama/Llama-2-70b-hf")),
        Model("llama3-8b", 4096, 32, 8, 14336, 32, 128256, sources=_model_sources("meta-llama/Meta-Llama-3-8B")),
        Model("llama3-70b", 8192, 64, 8, 28672, 80, 128256, sources=_model_sources("meta-llama/Meta-Llama-3-70B")),
    )
}


def get_hardware(name: str) -> Hardware:
    """The hardware preset ``name``; a ``ValueError`` lists the known ones."""
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; expected one of {sorted(HARDWARE)}")
    return HARDWARE[name]


def get_model(name: str) -> Model:
    """The model preset ``name``; a ``ValueError`` lists the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]
