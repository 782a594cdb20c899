"""IFCascadePipeline (prompt -> stage I -> stage II -> x4 upscaler) against diffusers' three pipelines
run one after the other with the same T5 embeddings and the same generator object."""

import pytest
import torch

from diffkern.models import from_diffusers
from diffkern.pipelines import (
    IFCascadePipeline,
    IFPipeline,
    IFSuperResolutionPipeline,
    ImagenPipeline,
    StableDiffusionUpscalePipeline,
)
from tests.pipelines import clip_tokenizer, max_diff, tiny_clip
from tests.pipelines._if_helpers import (
    IF_I_SCHEDULER,
    IF_II_SCHEDULER,
    NOISING_SCHEDULER,
    X4_LOW_RES_SCHEDULER,
    X4_SCHEDULER,
    ddim,
    diffusers_ddpm,
    if_unet_for_ours,
    t5_tokenizer,
    tiny_if_sr_unet,
    tiny_if_unet,
    tiny_t5,
    tiny_x4_unet,
    tiny_x4_vae,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor:FutureWarning")

TOL = 1e-3
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, watermarker=None)
PROMPTS = ["a photo of a red cat", "the moon"]
STEPS = (3, 2, 2)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return dict(tok=t5_tokenizer(), t5=tiny_t5(), u1=tiny_if_unet(), u2=tiny_if_sr_unet(),
                clip_tok=clip_tokenizer(tmp_path_factory.mktemp("tok")), clip=tiny_clip(), u3=tiny_x4_unet(),
                vae=tiny_x4_vae())


def _stage(parts, i):
    if i == 1:
        s = IFPipeline(parts["tok"], parts["t5"], if_unet_for_ours(parts["u1"]),
                       diffusers_ddpm(IF_I_SCHEDULER), requires_safety_checker=False)
    elif i == 2:
        s = IFSuperResolutionPipeline(None, None, if_unet_for_ours(parts["u2"]),
                                      diffusers_ddpm(IF_II_SCHEDULER), diffusers_ddpm(NOISING_SCHEDULER),
                                      requires_safety_checker=False)
    else:
        s = StableDiffusionUpscalePipeline(from_diffusers(parts["vae"]), parts["clip"], parts["clip_tok"],
                                           if_unet_for_ours(parts["u3"]),
                                           diffusers_ddpm(X4_LOW_RES_SCHEDULER), ddim(X4_SCHEDULER))
    s.set_progress_bar_config(disable=True)
    return s


def _ours(parts):
    return tuple(_stage(parts, i) for i in (1, 2, 3))


def _diffusers_chain(parts, per_prompt=1, stages=3):
    d1 = diffusers.IFPipeline(tokenizer=parts["tok"], text_encoder=parts["t5"], unet=parts["u1"],
                              scheduler=diffusers_ddpm(IF_I_SCHEDULER), requires_safety_checker=False,
                              **NO_SAFETY)
    d2 = diffusers.IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=parts["u2"],
                                             scheduler=diffusers_ddpm(IF_II_SCHEDULER),
                                             image_noising_scheduler=diffusers_ddpm(NOISING_SCHEDULER),
                                             requires_safety_checker=False, **NO_SAFETY)
    d3 = diffusers.StableDiffusionUpscalePipeline(vae=parts["vae"], text_encoder=parts["clip"],
                                                  tokenizer=parts["clip_tok"], unet=parts["u3"],
                                                  low_res_scheduler=diffusers_ddpm(X4_LOW_RES_SCHEDULER),
                                                  scheduler=ddim(X4_SCHEDULER), **NO_SAFETY)
    for d in (d1, d2, d3):
        d.set_progress_bar_config(disable=True)
    g = _gen()
    pe, ne = d1.encode_prompt(PROMPTS)
    img = d1(prompt_embeds=pe, negative_prompt_embeds=ne, num_images_per_prompt=per_prompt, height=8, width=8,
             num_inference_steps=STEPS[0], generator=g, output_type="pt" if stages > 1 else "np").images
    if stages == 1:
        return img
    pe, ne = pe.repeat_interleave(per_prompt, 0), ne.repeat_interleave(per_prompt, 0)
    img = d2(image=img, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=STEPS[1],
             generator=g, output_type="pt").images
    prompts = [p for p in PROMPTS for _ in range(per_prompt)]
    return d3(prompts, image=img, noise_level=100, num_inference_steps=STEPS[2], generator=g,
              output_type="np").images


@pytest.mark.parametrize("per_prompt", [1, 2])
def test_cascade_matches_diffusers_stages(parts, per_prompt):
    cascade = IFCascadePipeline(*_ours(parts))
    out = cascade(PROMPTS, num_images_per_prompt=per_prompt, generator=_gen(), output_type="np", height=8,
                  width=8, num_inference_steps=STEPS, return_stages=True)
    expected = _diffusers_chain(parts, per_prompt)
    assert out.images.shape == (2 * per_prompt, 32, 32, 3)
    assert max_diff(out.images, expected) < TOL
    assert [tuple(s.shape[-2:]) if hasattr(s, "dim") else s.shape[1:3] for s in out.stages] == \
        [(8, 8), (16, 16), (32, 32)]
    assert [s["stage"] for s in cascade.last_stats] == [1, 2, 3]


def test_sequential_loads_and_frees(parts):
    """Callables are called when their stage runs; T5 is dropped after the prompt; same images."""
    made = []

    def loader(i):
        def load():
            made.append(i)
            return _stage(parts, i)
        return load

    cascade = ImagenPipeline(loader(1), loader(2), loader(3), sequential=True)
    out = cascade(PROMPTS, generator=_gen(), output_type="np", height=8, width=8, num_inference_steps=STEPS)
    assert made == [1, 2, 3]
    assert max_diff(out.images, _diffusers_chain(parts)) < TOL
    cascade(PROMPTS, stages=1, generator=_gen(), height=8, width=8, num_inference_steps=STEPS,
            output_type="np")
    assert made == [1, 2, 3, 1]  # nothing kept between calls


def test_stage_count_and_thresholding_override(parts):
    s1, s2, _ = _ours(parts)
    cascade = IFCascadePipeline(s1, s2)
    one = cascade(PROMPTS, stages=1, generator=_gen(), height=8, width=8, num_inference_steps=STEPS,
                  output_type="np").images
    assert max_diff(one, _diffusers_chain(parts, stages=1)) < TOL
    override = {"sample_max_value": 1.0, "dynamic_thresholding_ratio": 0.5}
    ratio = cascade(PROMPTS, stages=1, generator=_gen(), height=8, width=8, num_inference_steps=STEPS,
                    output_type="np", thresholding=(override, None, None)).images
    s1.scheduler = type(s1.scheduler).from_config(s1.scheduler.config, sample_max_value=1.0,
                                                  dynamic_thresholding_ratio=0.5)
    pe, ne = s1.encode_prompt(PROMPTS)
    direct = s1(prompt_embeds=pe, negative_prompt_embeds=ne, generator=_gen(), height=8, width=8,
                num_inference_steps=STEPS[0], output_type="np").images
    assert max_diff(ratio, direct) < 1e-6 and max_diff(ratio, one) > 1e-3
    with pytest.raises(ValueError, match="stages"):
        cascade(PROMPTS, stages=3)
    with pytest.raises(ValueError, match="guidance_scale"):
        cascade(PROMPTS, guidance_scale=7.0)
    with pytest.raises(ValueError, match="thresholding: unknown keys"):
        cascade(PROMPTS, stages=1, thresholding=({"clip": 1}, None, None), num_inference_steps=STEPS)
