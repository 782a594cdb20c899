"""UnCLIPPipeline against diffusers' from the same tiny components and generator."""

import logging

import numpy as np
import pytest
import torch

from diffkern.models import from_diffusers
from diffkern.pipelines import UnCLIPPipeline
from tests.pipelines import max_diff
from tests.pipelines._unclip import check_parity, diffkern_decoder_or_none, diffusers_components

diffusers = pytest.importorskip("diffusers")

STEPS = dict(prior_num_inference_steps=3, decoder_num_inference_steps=3, super_res_num_inference_steps=2)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    c = diffusers_components(tmp_path_factory.mktemp("unclip"))
    ref = diffusers.UnCLIPPipeline(**c)
    ref.set_progress_bar_config(disable=True)
    ours = {**c, **{k: from_diffusers(c[k]) for k in ("prior", "text_proj", "super_res_first", "super_res_last")}}
    decoder = diffkern_decoder_or_none(c["decoder"])
    if decoder is not None:
        ours["decoder"] = decoder
    return ref, UnCLIPPipeline(**ours), c


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kwargs", [
    dict(prompt=["a photo of a cat", "the red dog"]),
    dict(prompt="an astronaut", num_images_per_prompt=2, prior_guidance_scale=2.5, decoder_guidance_scale=3.0),
    dict(prompt="a cat", prior_guidance_scale=1.0, decoder_guidance_scale=1.0),  # no guidance batch
], ids=["two_prompts", "images_per_prompt", "unguided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_images_match_diffusers(parts, kwargs, dtype):
    """fp32: the images within 1e-3. Random weights saturate them, so in fp64 every stage's x_t at
    every step must agree as well."""
    ref, ours, _ = parts
    got, seen = check_parity(ref, ours, dtype,
                             lambda p: p(generator=_gen(), output_type="np", **STEPS, **kwargs).images)
    assert got.shape[1:] == (32, 32, 3)
    assert len(seen["prior"]) == 3 and len(seen["decoder"]) == 3 and len(seen["super_res_last"]) == 1


def test_given_latents_and_text_model_output(parts):
    ref, ours, c = parts
    tok = c["tokenizer"](["a blue moon"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = c["text_encoder"](tok.input_ids)
    g = _gen(3)
    lat = dict(prior_latents=torch.randn(1, 32, generator=g), decoder_latents=torch.randn(1, 3, 16, 16, generator=g),
               super_res_latents=torch.randn(1, 3, 32, 32, generator=g))
    kw = dict(text_model_output=(out.text_embeds, out.last_hidden_state),
              text_attention_mask=tok.attention_mask.bool(),
              output_type="np", **STEPS, **lat)
    want = ref(generator=_gen(), **kw).images
    got = ours(generator=_gen(), **kw)
    assert max_diff(got.images, want) < 1e-3
    tensors = ours(generator=_gen(), return_dict=False, **{**kw, "output_type": "pt"})[0]
    assert isinstance(tensors, torch.Tensor) and tensors.shape == (1, 3, 32, 32)
    assert max_diff(tensors.permute(0, 2, 3, 1), want) < 1e-3
    pil = ours(generator=_gen(), **{**kw, "output_type": "pil"}).images
    assert pil[0].size == (32, 32) and np.abs(np.asarray(pil[0]) / 255.0 - want[0]).max() <= 1 / 255 + 1e-3


def test_from_diffusers_uses_diffkern_models(parts):
    ref, _, _ = parts
    if diffkern_decoder_or_none(ref.decoder) is None:
        pytest.skip("diffkern's UNet2DConditionModel does not build the unCLIP decoder yet")
    pipe = UnCLIPPipeline.from_diffusers(ref)
    assert all(type(getattr(pipe, k)).__module__.startswith("diffkern")
               for k in ("prior", "decoder", "text_proj", "super_res_first", "super_res_last"))
    want = ref("a cat", generator=_gen(), output_type="np", **STEPS).images
    assert max_diff(pipe("a cat", generator=_gen(), output_type="np", **STEPS).images, want) < 1e-3


def test_bad_arguments_and_truncation(parts, caplog):
    _, ours, _ = parts
    with pytest.raises(ValueError, match="prompt"):
        ours(prompt=3, **STEPS)
    with pytest.raises(ValueError, match="prompt"):
        ours(**STEPS)
    with pytest.raises(ValueError, match="prior_latents"):
        ours("a cat", prior_latents=torch.randn(1, 5), **STEPS)
    with pytest.raises(ValueError, match="decoder_latents"):
        ours("a cat", decoder_latents=torch.randn(1, 3, 8, 8), **STEPS)
    with pytest.raises(ValueError, match="text_model_output"):
        ours(text_model_output=(torch.randn(1, 31), torch.randn(1, 77, 32)), text_attention_mask=torch.ones(1, 77),
             **STEPS)
    with pytest.raises(ValueError, match="text_attention_mask"):
        ours(text_model_output=(torch.randn(1, 32), torch.randn(1, 77, 32)), **STEPS)
    with caplog.at_level(logging.WARNING):
        ours(" ".join(["cat"] * 90), output_type="np", prior_num_inference_steps=2, decoder_num_inference_steps=2,
             super_res_num_inference_steps=2)
    assert "truncated" in caplog.text
