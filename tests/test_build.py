"""The build: the extension is there and says how it was built; the CUDA sources compile anywhere
nvcc exists (they include no torch headers); `python -m diffkern.info` runs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffkern import _ext

ROOT = Path(__file__).resolve().parents[1]


def test_extension_is_built():
    assert _ext.extension() is not None, _ext.extension_error()
    info = _ext.build_info()
    assert info["cpu_capability"] in ("avx512", "avx2", "default")
    assert isinstance(info["cuda"], bool)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cuda_sources_compile_without_torch(tmp_path, arch):
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        cmd = ["nvcc", "-c", "-O1", "-std=c++17", f"-arch={arch}", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "warning" not in res.stderr.lower(), res.stderr[-2000:]


def test_info_runs():
    res = subprocess.run([sys.executable, "-m", "diffkern.info", "--json"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert '"group_norm"' in res.stdout and '"usable"' in res.stdout
