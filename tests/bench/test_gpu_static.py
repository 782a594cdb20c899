"""benchmarks/gpu_static.py without a GPU: the dispatcher's Triton configs compile for sm_90a with no
register spill (a fast subset: the sampler ops' and GroupNorm's first benchmark case; the full report,
attention included, is `python benchmarks/gpu_static.py`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def _ptxas_available():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
def test_dispatcher_configs_compile_for_sm90a_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_static.py"), "--quick", "--no-nvcc",
                          "--ops", "guided_step", "sampler_update", "dynamic_threshold", "group_norm",
                          "--out", str(tmp_path / "report.md")], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    text = out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    m = re.fullmatch(r"sm_90a: (\d+) kernel configs compiled, (\d+) spill", last)
    assert m, text[-3000:]
    assert "COLLECTOR FAILED" not in text, text[-3000:]
    spills = [line for line in text.splitlines() if line.startswith("SPILL:")]
    assert int(m.group(2)) == 0 and not spills, "\n".join(spills)
    report = (tmp_path / "report.md").read_text()
    assert "| guided_step | _guided_step_kernel |" in report and "Roofline floors" in report
    failed = [line for line in text.splitlines() if line.startswith("FAILED:")]
    assert not failed, "\n".join(failed)
    assert int(m.group(1)) > 0
