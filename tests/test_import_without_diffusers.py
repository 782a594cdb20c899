"""`import diffkern` and its ops / kernels / nn layers work without diffusers (issue 21: diffusers is
required by models, schedulers, pipelines and integrations only); models come in on first use."""

import subprocess
import sys

_BLOCKED = """
import sys
sys.modules["diffusers"] = None   # as if diffusers were not installed: any import of it raises
import torch
import diffkern, diffkern.ops, diffkern.kernels, diffkern.nn
x = torch.randn(2, 4, 3, 3)
y = diffkern.ops.group_norm(x, 2, activation="silu")
assert y.shape == x.shape
try:
    diffkern.models
except ImportError:
    print("models need diffusers")
"""


def test_ops_kernels_nn_import_without_diffusers():
    out = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "models need diffusers" in out.stdout


def test_import_diffkern_does_not_import_diffusers_until_models_are_used():
    code = ("import sys, diffkern; assert 'diffusers' not in sys.modules; "
            "diffkern.models.UNet2DConditionModel; assert 'diffusers' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
