"""Why diffusers' inpaint tests differ by ~0.01 once patched: GroupNorm sites whose groups have zero variance.

    DIFFUSERS_TESTS_ROOT=<folder holding diffusers' tests/> CONFORMANCE_EXTRA=<accelerate etc.> \
        python benchmarks/conformance/inpaint_zero_variance.py
"""
import sys, numpy as np, torch, diffkern
import os; sys.path.insert(0, os.environ["DIFFUSERS_TESTS_ROOT"]); sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.environ.get("CONFORMANCE_EXTRA", ""))
import patch_pipelines; patch_pipelines._tokenizer_shim()
from tests.pipelines.stable_diffusion.test_stable_diffusion_inpaint import TestStableDiffusionInpaintPipeline as T
t = T()
pipe = T.pipeline_class(**t.get_dummy_components()); pipe.set_progress_bar_config(disable=True)
stats = []
def hook(name):
    def f(m, inp, out):
        x = inp[0].float()
        N, C = x.shape[:2]
        g = x.reshape(N, m.num_groups, -1)
        var = g.var(dim=-1, unbiased=False)
        stats.append((name, var.min().item(), (var < 1e-8).sum().item(), g[..., 0].abs().max().item()))
    return f
for name, m in list(pipe.unet.named_modules()) + [("vae." + a, b) for a, b in pipe.vae.named_modules()]:
    if isinstance(m, torch.nn.GroupNorm):
        m.register_forward_hook(hook(name))
pipe(**t.get_dummy_inputs())
seen = {}
for n, v, z, a in stats:
    if z:
        seen[n] = (v, z, a)
print(len(stats), "calls;", len(seen), "sites with zero-variance groups")
for n, v in list(seen.items())[:10]:
    print(n, v)
