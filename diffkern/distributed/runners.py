"""Runners: a pipeline behind one call, runner(jobs, generators) -> PIL images, for generate_images.

A runner makes one batch: every job in it shares steps / guidance / size (make_batches sees to it),
each image is drawn from its own generator. It also says which per-prompt keys it takes
(`accepts`), what a line that sets none gets (`defaults`) and what goes in every record
(`metadata`: model, scheduler). Families without a runner here (or user code) can pass any object
with those four attributes; `runner_for(pipe)` picks the one for a diffkern pipeline.
"""

from __future__ import annotations

import diffkern


class SDRunner:
    """Stable Diffusion / LDM text-to-image (StableDiffusionPipeline, LDMTextToImagePipeline).

    defaults: steps, guidance, height, width, negative_prompt for lines that do not set them.
    extra: further keyword arguments of every pipeline call (eta, clip_skip, ...).
    """

    accepts = ("steps", "guidance", "height", "width", "negative_prompt")

    def __init__(self, pipe, *, model="", scheduler=None, steps=50, guidance=7.5, height=None, width=None,
                 negative_prompt=None, extra=None):
        self.pipe = pipe
        self.defaults = {"steps": steps, "guidance": guidance, "height": height, "width": width,
                         "negative_prompt": negative_prompt}
        self.extra = dict(extra or {})
        name = scheduler or type(pipe.scheduler).__name__
        self.metadata = {"model": str(model), "scheduler": name, "diffkern_version": diffkern.__version__}

    def __call__(self, jobs, generators):
        s = jobs[0].settings
        out = self.pipe([j.prompt for j in jobs], negative_prompt=[j.negative_prompt or "" for j in jobs],
                        num_inference_steps=int(s["steps"]), guidance_scale=float(s["guidance"]),
                        height=s.get("height"), width=s.get("width"), generator=list(generators),
                        output_type="pil", progress=False, **self.extra)
        return out.images


class GlideRunner:
    """GLIDE text-to-image (GlidePipeline): "steps" is the base model's respacing ("100", "ddim50", or
    an int); guidance None means no classifier-free guidance (e.g. CLIP guidance alone). The size is
    the checkpoints' and there is no negative prompt. extra: upsample_respacing, upsample_temp,
    use_clip_guidance, clip_guidance_scale, ... for every call."""

    accepts = ("steps", "guidance")

    def __init__(self, pipe, *, model="", steps="100", guidance=3.0, extra=None):
        self.pipe = pipe
        self.defaults = {"steps": steps, "guidance": guidance}
        self.extra = dict(extra or {})
        sampler = "DDPM (base)" + (" + DDIM (upsampler)" if pipe.upsampler_model is not None else "")
        self.metadata = {"model": str(model), "scheduler": sampler, "diffkern_version": diffkern.__version__}

    def __call__(self, jobs, generators):
        s = jobs[0].settings
        guidance = s.get("guidance")
        out = self.pipe([j.prompt for j in jobs], guidance_scale=None if guidance is None else float(guidance),
                        batch_size=1, base_respacing=str(s["steps"]), generator=list(generators),
                        output_type="pil", progress=False, **self.extra)
        return out.images


def runner_for(pipe, **kwargs):
    """The runner of a diffkern pipeline (SD / LDM text-to-image, GLIDE); kwargs go to its constructor."""
    from diffkern.pipelines import GlidePipeline, LDMTextToImagePipeline, StableDiffusionPipeline

    if isinstance(pipe, GlidePipeline):
        return GlideRunner(pipe, **kwargs)
    if isinstance(pipe, (StableDiffusionPipeline, LDMTextToImagePipeline)):
        return SDRunner(pipe, **kwargs)
    raise TypeError(f"pipe: no runner for {type(pipe).__name__} (text-to-image SD / LDM and GLIDE have one); "
                    "pass generate_images any callable runner(jobs, generators) -> images with "
                    "accepts / defaults / metadata")
