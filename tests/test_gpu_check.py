"""perf/gpu_check.sh --dry-run on the CPU: the one-shot GPU check's command lines are valid before a GPU sees them.

The dry run collects each GPU test selection (a selection that collects nothing fails), runs the symm tests
on the CPU transport and the kernel benchmark at tiny shapes through the interpreter. A second run with a
planted bad argument (the ``--device cuda`` the first version of the script passed) must fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "kernel_tests", "symm_tests", "symm_cpu", "bench_kernels")


def _dry_run(script: str, out: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=out, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True, text=True, timeout=900)


def test_gpu_check_dry_run_passes(tmp_path):
    proc = _dry_run(os.path.join(ROOT, "perf", "gpu_check.sh"), str(tmp_path))
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in STEPS:
        assert f"| {step} | exit 0 |" in summary, f"{step} missing or failed:\n{summary}"
    assert "collected" in (tmp_path / "kernel_tests.log").read_text()


def test_gpu_check_dry_run_fails_on_a_bad_argument(tmp_path):
    # A copy of the repository's script with the benchmark given an argument it does not take.
    repo = tmp_path / "repo"
    (repo / "perf").mkdir(parents=True)
    for name in ("odysseus", "odykernels", "tests", "setup.cfg", "pyproject.toml"):
        os.symlink(os.path.join(ROOT, name), repo / name)
    os.symlink(os.path.join(ROOT, "perf", "bench_kernels.py"), repo / "perf" / "bench_kernels.py")
    text = open(os.path.join(ROOT, "perf", "gpu_check.sh")).read()
    planted = text.replace(
        'bench_kernels=("$py" perf/bench_kernels.py)', 'bench_kernels=("$py" perf/bench_kernels.py --device cuda)'
    )
    assert planted != text, "the bench_kernels command line moved: update this test"
    # The CPU symm step has nothing to do with the planted argument; leave it out to keep this test short.
    planted = "\n".join(line for line in planted.splitlines() if "step symm_cpu" not in line) + "\n"
    (repo / "perf" / "gpu_check.sh").write_text(planted)
    shutil.copymode(os.path.join(ROOT, "perf", "gpu_check.sh"), repo / "perf" / "gpu_check.sh")
    out = tmp_path / "out"
    proc = _dry_run(str(repo / "perf" / "gpu_check.sh"), str(out))
    summary = (out / "summary.md").read_text()
    assert proc.returncode != 0, summary
    assert "| bench_kernels | exit 2 |" in summary, summary
