"""UnCLIPImageVariationPipeline against diffusers' from the same tiny components and generator."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffkern.models import from_diffusers
from diffkern.pipelines import UnCLIPImageVariationPipeline
from tests.pipelines import max_diff
from tests.pipelines._unclip import (check_parity, clip_vision, diffkern_decoder_or_none, diffusers_components,
                                     feature_extractor)

diffusers = pytest.importorskip("diffusers")

STEPS = dict(decoder_num_inference_steps=3, super_res_num_inference_steps=2)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    c = diffusers_components(tmp_path_factory.mktemp("unclip_var"))
    c = {k: v for k, v in c.items() if k not in ("prior", "prior_scheduler")}
    c.update(image_encoder=clip_vision(), feature_extractor=feature_extractor())
    ref = diffusers.UnCLIPImageVariationPipeline(**c)
    ref.set_progress_bar_config(disable=True)
    ours = {**c, **{k: from_diffusers(c[k]) for k in ("text_proj", "super_res_first", "super_res_last")}}
    decoder = diffkern_decoder_or_none(c["decoder"])
    if decoder is not None:
        ours["decoder"] = decoder
    return ref, UnCLIPImageVariationPipeline(**ours)


def _images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kwargs", [
    dict(image=_images(2)),
    dict(image=_images(1)[0], num_images_per_prompt=2, decoder_guidance_scale=3.0),
    dict(image=torch.randn(1, 3, 32, 32), decoder_guidance_scale=1.0),
    dict(image_embeddings=torch.randn(2, 32)),
], ids=["pil_list", "pil_images_per_prompt", "tensor_unguided", "embeddings"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variations_match_diffusers(parts, kwargs, dtype):
    ref, ours = parts
    if dtype == torch.float64:
        kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    check_parity(ref, ours, dtype, lambda p: p(generator=_gen(), output_type="np", **STEPS, **kwargs).images)


def test_given_latents(parts):
    ref, ours = parts
    g = _gen(5)
    kw = dict(decoder_latents=torch.randn(1, 3, 16, 16, generator=g),
              super_res_latents=torch.randn(1, 3, 32, 32, generator=g), output_type="np", **STEPS)
    want = ref(_images(1), generator=_gen(), **kw).images
    assert max_diff(ours(_images(1), generator=_gen(), **kw).images, want) < 1e-3


def test_bad_inputs(parts):
    _, ours = parts
    with pytest.raises(ValueError, match="image"):
        ours(**STEPS)
    with pytest.raises(ValueError, match="mode"):
        ours(Image.new("I;16", (32, 32)), **STEPS)
    with pytest.raises(ValueError, match="image"):
        ours(torch.randn(1, 4, 32, 32), **STEPS)
    with pytest.raises(ValueError, match="image_embeddings"):
        ours(image_embeddings=torch.randn(1, 31), **STEPS)
    with pytest.raises(ValueError, match="decoder_latents"):
        ours(_images(1), decoder_latents=torch.randn(1, 3, 8, 8), **STEPS)
