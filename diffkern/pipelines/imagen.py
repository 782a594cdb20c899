"""Imagen / DeepFloyd IF end to end: prompt -> 64 -> 256 -> 1024 in one call.

    cascade = IFCascadePipeline.from_pretrained("IF-I-XL-v1.0", "IF-II-L-v1.0",
                                                "stable-diffusion-x4-upscaler",
                                                dtype=torch.float16, device="cuda", sequential=True)
    out = cascade("a photo of a red cat", generator=torch.Generator().manual_seed(0), return_stages=True)

T5 runs once; its embeddings serve every T5-conditioned stage (stage III, the SD x4 upscaler, encodes
the prompt with its own CLIP). Each stage is the diffkern pipeline of its kind, called with the same
generator in turn, so the images equal running diffusers' stage pipelines one after the other.

Memory (the top complaint of IF users; T5-XXL alone is ~9.5 GB in fp16): with sequential=True each
stage is loaded (or moved to its device) when it runs and freed (or moved to `offload_device`)
after, the T5 encoder right after the prompt is encoded; otherwise everything stays resident.
`last_stats` records each stage's time and peak GPU memory.
"""

from __future__ import annotations

import gc
import inspect
import time
from dataclasses import dataclass, field

import torch

from diffkern.pipelines._if_common import IFPipelineBase

STAGE_DEFAULTS = {  # what IF's model card runs (stage III at noise_level 100, as DeepFloyd's examples)
    1: dict(num_inference_steps=100, guidance_scale=7.0),
    2: dict(num_inference_steps=50, guidance_scale=4.0, noise_level=250),
    3: dict(num_inference_steps=75, guidance_scale=9.0, noise_level=100),
}
_THRESHOLDING_KEYS = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")


@dataclass
class IFCascadeOutput:
    """`images`: the last stage's images (output_type); `stages`: with return_stages=True each stage's
    output in order (stages I and II as the raw "pt" samples in [-1, 1] they hand on, the last one as
    `images`); nsfw_detected / watermark_detected: the last stage's safety flags (None without one)."""

    images: object
    stages: list = field(default_factory=list)
    nsfw_detected: list | None = None
    watermark_detected: list | None = None

    def __getitem__(self, i):
        return (self.images, self.stages, self.nsfw_detected, self.watermark_detected)[i]


class IFCascadePipeline:
    """The IF / Imagen cascade over stage pipelines.

    Args:
        stage_1: an IFPipeline (it holds the T5 encoder and tokenizer), or a zero-argument callable
            returning one (called when the stage runs).
        stage_2, stage_3: IFSuperResolutionPipeline / StableDiffusionUpscalePipeline (or callables), or None.
        sequential: free each stage after it runs (callables: dropped; pipelines: moved to
            offload_device, and back to their device when they run again).
    """

    def __init__(self, stage_1, stage_2=None, stage_3=None, *, sequential=False, offload_device="cpu"):
        if stage_1 is None:
            raise ValueError("stage_1: required (an IFPipeline or a callable returning one)")
        self._stages = {1: stage_1, 2: stage_2, 3: stage_3}
        self._homes = {i: _device_of(s) for i, s in self._stages.items() if _is_pipeline(s)}
        self.sequential, self.offload_device = sequential, offload_device
        self.last_stats = []

    @classmethod
    def from_pretrained(cls, stage_1, stage_2=None, stage_3=None, *, dtype=None, device="cpu", variant=None,
                        sequential=False):
        """Three diffusers folders (IF-I-*, IF-II-*, stable-diffusion-x4-upscaler; the last two optional).
        With sequential=True each is read from disk only when its stage runs and freed after."""
        from diffkern.pipelines import IFPipeline, IFSuperResolutionPipeline, StableDiffusionUpscalePipeline

        def loader(pipe_cls, path, **kw):
            return lambda: pipe_cls.from_pretrained(path, dtype=dtype, device=device, **kw)

        stages = [loader(IFPipeline, stage_1, variant=variant),
                  stage_2 and loader(IFSuperResolutionPipeline, stage_2, variant=variant),
                  stage_3 and loader(StableDiffusionUpscalePipeline, stage_3)]
        if not sequential:
            stages = [s() if s else None for s in stages]
        return cls(*stages, sequential=sequential)

    def stage(self, i):
        """Stage i's pipeline, loading it (callables) or bringing it back from the offload device."""
        s = self._stages[i]
        if s is None:
            raise ValueError(f"stages: this cascade has no stage {i}")
        if not _is_pipeline(s):
            s = s()
            if not self.sequential:
                self._stages[i] = s
        elif self.sequential and i in self._homes:
            s.to(self._homes[i])
        return s

    def _release(self, i, pipe):
        if not self.sequential:
            return
        if _is_pipeline(self._stages[i]):
            pipe.to(self.offload_device)
        del pipe
        _free_memory()

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, *, stages=None, prompt_embeds=None,
                 negative_prompt_embeds=None, num_images_per_prompt=1, generator=None, output_type="pil",
                 return_stages=False, clean_caption=True, num_inference_steps=(None, None, None),
                 timesteps=(None, None, None), guidance_scale=(None, None, None),
                 noise_level=(None, None, None), thresholding=(None, None, None), height=None, width=None,
                 progress=None, low_res_noise="once"):
        """Run stages 1..`stages` (default: every stage present) for `prompt` (or T5 `prompt_embeds`).

        Per-stage settings are 3-tuples (None = the stage's default, STAGE_DEFAULTS):
        num_inference_steps, timesteps (lists or IF schedule names such as "smart100", "super27"),
        guidance_scale, noise_level (stages II and III), thresholding (None or a dict with any of
        thresholding / dynamic_thresholding_ratio / sample_max_value, overriding that stage's
        scheduler config for the call). height / width: stage I's size. output_type applies to the
        last stage run. low_res_noise: stage II's noise augmentation, "once" (diffusers) or "per_call"
        (DeepFloyd IF's own: fresh noise at every UNet call, per guidance half; see
        IFSuperResolutionPipeline). Returns IFCascadeOutput.
        """
        from diffkern.pipelines.deepfloyd_if import LOW_RES_NOISE

        if low_res_noise not in LOW_RES_NOISE:
            raise ValueError(f"low_res_noise: expected one of {LOW_RES_NOISE}, got {low_res_noise!r}")
        present = [i for i in (1, 2, 3) if self._stages[i] is not None]
        stages = present[-1] if stages is None else stages
        if stages not in (1, 2, 3) or any(i not in present for i in range(1, stages + 1)):
            raise ValueError(f"stages: expected 1, 2 or 3 with every stage up to it present "
                             f"(present: {present}), got {stages!r}")
        per_stage = dict(num_inference_steps=num_inference_steps, timesteps=timesteps,
                         guidance_scale=guidance_scale, noise_level=noise_level)
        for name, v in dict(per_stage, thresholding=thresholding).items():
            if not isinstance(v, (tuple, list)) or len(v) != 3:
                raise ValueError(f"{name}: expected a 3-tuple of per-stage values (None = default), "
                                 f"got {v!r}")
        self.last_stats = []
        image, out, kept, embeds = None, None, [], None
        for i in range(1, stages + 1):
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            pipe = self.stage(i)
            kw = dict(STAGE_DEFAULTS[i])
            kw.update({k: v[i - 1] for k, v in per_stage.items() if v[i - 1] is not None})
            kw.update(generator=generator, output_type=output_type if i == stages else "pt",
                      progress=progress)
            if i == 1:
                embeds = self._encode(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                      clean_caption)
                kw.update(height=height, width=width)
            else:
                kw["image"] = image
                if i == 2 and low_res_noise != "once":  # only diffkern's stage II takes it
                    if "low_res_noise" not in inspect.signature(type(pipe).__call__).parameters:
                        raise ValueError(f"low_res_noise={low_res_noise!r}: stage II ({type(pipe).__name__}) does "
                                         "not take it; use diffkern's IFSuperResolutionPipeline")
                    kw["low_res_noise"] = low_res_noise
            kw.update(_text_kwargs(pipe, i, embeds, prompt, negative_prompt, num_images_per_prompt))
            out = _with_thresholding(pipe, thresholding[i - 1], kw)
            image = out.images
            kept.append(image)
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            self.last_stats.append(dict(stage=i, seconds=time.perf_counter() - t0, peak_gpu_bytes=peak))
            self._release(i, pipe)
            del pipe
        nsfw = getattr(out, "nsfw_detected", getattr(out, "nsfw_content_detected", None))
        return IFCascadeOutput(image, kept if return_stages else [], nsfw,
                               getattr(out, "watermark_detected", None))

    def _encode(self, stage_1, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clean_caption):
        """T5 once: (prompt_embeds, negative_prompt_embeds), one row per prompt, the negative always
        (the stages guide with it when their guidance_scale > 1). With sequential=True the T5
        encoder is freed right after."""
        stage_1._check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, 1)
        embeds = stage_1.encode_prompt(prompt, True, 1, None, negative_prompt, prompt_embeds,
                                       negative_prompt_embeds, clean_caption)
        if self.sequential and stage_1.text_encoder is not None:
            if _is_pipeline(self._stages[1]):
                stage_1.text_encoder.to(self.offload_device)
            else:
                stage_1.text_encoder = None
            _free_memory()
        return embeds


_IF_FOLDERS = ("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline", "IFSuperResolutionPipeline",
               "IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline",
               "StableDiffusionUpscalePipeline")


def if_folder_pipeline(path, *, img2img=False, inpaint=False):
    """The diffkern pipeline class for a DeepFloyd IF / x4-upscaler diffusers folder (by model_index.json's
    _class_name), or None for any other path. An IF-I folder serves text-to-image, img2img=True and
    inpaint=True alike (the same weights); an IF-II folder super-resolution and its img2img / inpaint
    variants."""
    import os

    from diffkern.models.weights import read_json_object

    index = os.path.join(str(path), "model_index.json")
    if not os.path.isfile(index):
        return None
    name = read_json_object(index).get("_class_name")  # CheckpointError naming a malformed file
    if name not in _IF_FOLDERS:
        return None
    from diffkern import pipelines as P

    if name in ("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline"):
        if img2img and inpaint:
            raise ValueError("img2img, inpaint: pick one pipeline, not both")
        return P.IFImg2ImgPipeline if img2img else P.IFInpaintingPipeline if inpaint else P.IFPipeline
    if img2img and inpaint:
        raise ValueError("img2img, inpaint: pick one pipeline, not both")
    if name == "StableDiffusionUpscalePipeline":
        if img2img or inpaint:
            raise ValueError(f"img2img / inpaint: {path} is the x4 upscaler, which has no such variant")
        return P.StableDiffusionUpscalePipeline
    if img2img:
        return P.IFImg2ImgSuperResolutionPipeline
    return P.IFInpaintingSuperResolutionPipeline if inpaint else P.IFSuperResolutionPipeline


def _text_kwargs(pipe, i, embeds, prompt, negative_prompt, per_prompt):
    """What stage i reads the text from: the T5 embeddings (IF stages), or the prompt (the x4 upscaler,
    whose CLIP encoder reads it). Stage I makes per_prompt images per prompt; later stages take one
    per image."""
    if isinstance(pipe, IFPipelineBase):
        rep = 1 if i == 1 else per_prompt
        return dict(prompt_embeds=embeds[0].repeat_interleave(rep, 0),
                    negative_prompt_embeds=embeds[1].repeat_interleave(rep, 0),
                    num_images_per_prompt=per_prompt if i == 1 else 1)
    if prompt is None:
        raise ValueError(f"prompt: stage {i} (the x4 upscaler) encodes the prompt with its CLIP encoder; "
                         "prompt_embeds alone cannot drive it")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return dict(prompt=[p for p in prompts for _ in range(per_prompt)],
                negative_prompt=_repeat(negative_prompt, len(prompts), per_prompt))


def _with_thresholding(pipe, overrides, kw):
    """Call `pipe(**kw)` with its scheduler's thresholding settings overridden for this call only."""
    if not overrides:
        return pipe(**kw)
    bad = sorted(set(overrides) - set(_THRESHOLDING_KEYS))
    if bad:
        raise ValueError(f"thresholding: unknown keys {bad}; expected any of {_THRESHOLDING_KEYS}")
    original = pipe.scheduler
    pipe.scheduler = type(original).from_config(original.config, **overrides)
    try:
        return pipe(**kw)
    finally:
        pipe.scheduler = original


def _repeat(negative_prompt, count, per_prompt):
    if negative_prompt is None:
        return None
    negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
    return [n for n in negatives for _ in range(per_prompt)]


def _free_memory():
    """Return freed blocks to the GPU. Modules are freed by reference counting as their last
    reference goes; the (slow, ~0.5 s) cycle collection only runs where cached GPU memory is at stake."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _is_pipeline(stage):
    return stage is not None and hasattr(stage, "unet")


def _device_of(pipe):
    return pipe.device


ImagenPipeline = IFCascadePipeline
