"""On a GPU: a patched fp16 SD pipeline gives the unpatched pipeline's images, and the patched UNet
compiles with inductor. Skipped without CUDA (not yet run on a GPU at the time of writing)."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffkern  # noqa: E402
from tests.integrations import _tiny  # noqa: E402

pytestmark = pytest.mark.cuda

# fp16 through 2 denoising steps and the VAE: each op rounds to 2^-11 relative, and the unpatched
# pipeline itself moves by about this much between SDPA kernels; images are in [0, 1]
FP16_IMAGE_TOL = 2e-2


def _images(pipe):
    with torch.no_grad():
        out = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                   generator=torch.Generator("cuda").manual_seed(0)).images
    return np.asarray(out, dtype=np.float64)


def test_fp16_pipeline_on_cuda(tmp_path):
    pipe = _tiny.sd(tmp_path, v2=True).to("cuda", torch.float16)
    want = _images(pipe)
    report = diffkern.patch(pipe)
    assert report.replaced["attention"] and report.replaced["resnet_norm_silu"]
    got = _images(pipe)
    assert np.isfinite(got).all() and np.abs(got - want).max() < FP16_IMAGE_TOL


def test_patched_unet_compiles_with_inductor_on_cuda():
    from tests.pipelines import tiny_unet

    unet = tiny_unet().to("cuda", torch.float16)
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    t, text = torch.tensor(10, device="cuda"), torch.randn(2, 7, 32, device="cuda", dtype=torch.float16)
    diffkern.patch(unet)
    with torch.no_grad():
        want = unet(x, t, text).sample
        torch._dynamo.reset()
        got = torch.compile(unet, fullgraph=True)(x, t, text).sample
    assert (got - want).abs().max() <= 1e-2 * max(1.0, want.abs().max())
