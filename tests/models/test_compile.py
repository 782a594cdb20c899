"""The models trace under torch.compile as one graph (no graph breaks): the kernels are custom ops
and the backend dispatch runs at trace time. torch._dynamo.explain traces without compiling."""

import pytest
import torch

import diffkern
from diffkern.models import glide
from tests.bench.test_bench_smoke import TINY_UNET, TINY_VAE


def _breaks(fn, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_count, [str(r.reason)[:200] for r in ex.break_reasons]


def test_sd_unet_is_one_graph():
    torch.manual_seed(0)
    unet = diffkern.models.UNet2DConditionModel(**TINY_UNET).eval()
    graphs, breaks = _breaks(unet, torch.randn(2, 4, 16, 16), torch.tensor(10), torch.randn(2, 7, 16))
    assert (graphs, breaks) == (1, [])


def test_vae_decode_is_one_graph():
    torch.manual_seed(0)
    vae = diffkern.models.AutoencoderKL(**TINY_VAE).eval()
    graphs, breaks = _breaks(vae.decode, torch.randn(1, 4, 8, 8))
    assert (graphs, breaks) == (1, [])


@pytest.mark.parametrize("super_res", [False, True])
def test_glide_unet_is_one_graph(super_res):
    torch.manual_seed(0)
    model = glide.create_model(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                               num_head_channels=16, attention_resolutions="8", text_ctx=8, xf_width=32,
                               xf_layers=1, xf_heads=2, use_fp16=False, super_res=super_res).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
    low = torch.randn(2, 3, 8, 8) if super_res else None
    graphs, breaks = _breaks(lambda *a: model(*a, low_res=low), x, torch.tensor([3, 5]), tokens, mask)
    assert (graphs, breaks) == (1, [])
