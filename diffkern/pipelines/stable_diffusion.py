"""Stable Diffusion 1.x / 2.x text-to-image and image-to-image: diffusers' own pipelines on diffkern's
UNet, VAE and schedulers (the house rule of issue 21, as the SDXL and LDM pipelines).

    pipe = StableDiffusionPipeline.from_pretrained("sd-v1-5", dtype=torch.float16, device="cuda")
    image = pipe("an astronaut riding a horse", generator=torch.Generator().manual_seed(0)).images[0]

StableDiffusionPipeline / StableDiffusionImg2ImgPipeline subclass diffusers' classes of the same name:
the denoising loop, latents, decoding, progress bars, `to`, save_pretrained and the output class
(StableDiffusionPipelineOutput: images, nsfw_content_detected) are diffusers'. What diffkern adds is an
adapter in front of diffusers' __call__ that keeps diffkern's API:

- construction: `Pipeline(unet, vae, text_encoder, tokenizer, scheduler)` (no safety checker by
  default), `from_pretrained(path, *, dtype=None, device="cpu", scheduler="ddim", **load_kwargs)` through
  diffkern.models.loading.load (diffusers folders and CompVis single files), `from_loaded(loaded)`;
- the prompt is encoded here (diffkern.models.text_encoders.encode_prompt, which also runs LDM-BERT) and
  handed to diffusers as prompt_embeds / negative_prompt_embeds: a str negative_prompt serves every
  prompt, clip_skip also applies to the negative prompt, and the arguments diffusers would refuse late
  are refused first with errors naming them;
- `progress=` (the tqdm bar for this call) and `callback(i, t, out)` (out.prev_sample: the latents after
  step i) beside diffusers' callback_on_step_end; other diffusers keywords (guidance_rescale,
  cross_attention_kwargs, timesteps, sigmas, ...) pass through.

With equal weights and seed the images equal diffusers' (no safety checker). The scheduler must be a
diffkern one (a subclass of diffusers' class of the same name).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import diffusers
import torch

from diffkern.models.text_encoders import encode_prompt
from diffkern.pipelines import _common as C
from diffkern.schedulers.sampling import sample_loop

logger = logging.getLogger(__name__)


class _PromptSteps:
    """Argument checks and prompt encoding shared by the LDM pipeline base and the diffusers-based SD
    pipelines (they need self.unet, self.text_encoder, self.tokenizer, self.device, self.dtype)."""

    def _prompts(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds):
        """(list of prompts or None, number of prompts), refusing the combinations diffusers refuses:
        prompt with prompt_embeds, neither of them, negative_prompt with negative_prompt_embeds."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("prompt, prompt_embeds: give one of them, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: required (a str or a list of str), unless prompt_embeds is given")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("negative_prompt, negative_prompt_embeds: give one of them, not both")
        width = getattr(self.unet.config, "cross_attention_dim", None)
        width = width if isinstance(width, int) else None  # per-level tuples: the UNet checks each level
        given = (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds))
        for name, embeds in given:
            if embeds is not None:
                C.check_embeds(name, embeds, width)
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds: expected the shape of prompt_embeds "
                             f"{tuple(prompt_embeds.shape)}, got {tuple(negative_prompt_embeds.shape)}")
        if prompt is None:
            return None, prompt_embeds.shape[0]
        prompts = C.prompt_list(prompt)
        return prompts, len(prompts)

    def _embeds(self, prompts, negative_prompt, guided, clip_skip=None, max_length=None, prompt_embeds=None,
                negative_prompt_embeds=None):
        """(cond, uncond or None without guidance): one row per prompt, in the UNet's dtype and device.
        Given embeddings are used as they are; a missing negative is encoded from negative_prompt ("" by
        default) at the prompt embeddings' length."""
        if prompt_embeds is None:
            prompt_embeds = encode_prompt(self.text_encoder, self.tokenizer, prompts, clip_skip=clip_skip,
                                          max_length=max_length)
        cond = prompt_embeds.to(device=self.device, dtype=self.dtype)
        if not guided:
            return cond, None
        if negative_prompt_embeds is None:
            negatives = C.negative_list(negative_prompt, cond.shape[0])
            # diffusers pads the negative to the prompt embeddings' length (77 unless given otherwise)
            negative_prompt_embeds = encode_prompt(self.text_encoder, self.tokenizer, negatives,
                                                   clip_skip=clip_skip, max_length=cond.shape[1])
        elif negative_prompt_embeds.shape != cond.shape:  # the prompt was encoded here: check its shape
            raise ValueError(f"negative_prompt_embeds: expected the shape of the prompt's embeddings "
                             f"{tuple(cond.shape)}, got {tuple(negative_prompt_embeds.shape)}")
        return cond, negative_prompt_embeds.to(device=self.device, dtype=self.dtype)

    def _size(self, height, width):
        f = self.vae_scale_factor
        sample = getattr(self.unet.config, "sample_size", None) or 64
        height = sample * f if height is None else height
        width = sample * f if width is None else width
        C.check_size(height, width, f)
        return height, width

    def _common_checks(self, output_type, generator, per_prompt, batch, steps):
        if not isinstance(per_prompt, int) or per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {per_prompt!r}")
        if output_type not in C.OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {C.OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive int, got {steps!r}")
        C.check_generator(generator, batch)

    def _check_latents(self, latents, shape):
        if latents is not None and tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents: expected shape {tuple(shape)}, got {tuple(latents.shape)}")


class LatentDiffusionPipelineBase(_PromptSteps):
    """Components, device/dtype, loading and the prompt/decode steps of diffkern's LDM text-to-image
    pipeline (LDMTextToImagePipeline; the SD pipelines are diffusers' classes, see above).

    Components: unet (ours, or any module with diffusers' call contract), vae (encode -> posterior,
    decode -> image, `config.scaling_factor`, `config.block_out_channels`), text_encoder
    (transformers CLIPTextModel or diffkern LDMBertModel), tokenizer, scheduler (a diffkern
    scheduler instance). Latents and text embeddings take the UNet's dtype and device.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = _diffkern_scheduler(scheduler)
        self.vae_scale_factor = C.vae_scale_factor(vae)
        self.progress = True
        self.notes = []

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device="cpu", scheduler="ddim", **load_kwargs):
        """Load a checkpoint (diffusers folder or single file) with diffkern.models.loading.load.

        scheduler: "ddim" (default) or "ddpm", built from the checkpoint's scheduler config, or an
        instance. dtype / device: where the modules live (e.g. torch.float16, "cuda"). load_kwargs go
        to load (tokenizer= for single files, prediction_type=, variant=).
        """
        from diffkern.models.loading import load

        return cls.from_loaded(load(path, dtype=dtype, device=device, **load_kwargs), scheduler=scheduler)

    @classmethod
    def from_loaded(cls, loaded, scheduler="ddim"):
        """Build from what diffkern.models.loading.load returned (unet, vae, text_encoder, tokenizer,
        scheduler config)."""
        parts = components(loaded)
        config = cls._scheduler_config(parts.pop("scheduler_config"))
        pipe = cls(**parts, scheduler=C.make_scheduler(scheduler, config))
        pipe.notes = list(getattr(loaded, "notes", None) or [])  # what the loader assumed or left out
        return pipe

    @staticmethod
    def _scheduler_config(config):
        """The checkpoint's scheduler config as the pipeline uses it."""
        return config

    def to(self, device=None, dtype=None):
        """Move (and cast) every module; returns self."""
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def set_progress_bar_config(self, disable=False):
        """Turn the tqdm bar off (disable=True) or on, as diffusers' method of that name."""
        self.progress = not disable

    # -- steps shared by the calls -------------------------------------------------------------------
    def _context(self, prompts, negative_prompt, per_prompt, guided, clip_skip=None, max_length=None,
                 prompt_embeds=None, negative_prompt_embeds=None):
        """[uncond; cond] text embeddings (just cond without guidance), each prompt's row repeated
        per_prompt times."""
        cond, uncond = self._embeds(prompts, negative_prompt, guided, clip_skip, max_length, prompt_embeds,
                                    negative_prompt_embeds)
        rows = cond if uncond is None else torch.cat([uncond, cond])  # [uncond rows; cond rows]
        return rows.repeat_interleave(per_prompt, dim=0)

    def _finish(self, latents, output_type, scale_first=False):
        if output_type == "latent":
            return C.ImagePipelineOutput(latents)
        sf = self.vae.config.scaling_factor
        z = (1 / sf) * latents if scale_first else latents / sf  # the order each diffusers pipeline uses
        image = C.vae_decode(self.vae, z.to(next(self.vae.parameters()).dtype))
        return C.ImagePipelineOutput(C.postprocess(image, output_type))

    def _text_to_image(self, prompt, negative_prompt, *, steps, guidance_scale, guided, height, width,
                       per_prompt, generator, latents, eta, output_type, progress, callback, clip_skip=None,
                       max_length=None, scale_first=False, prompt_embeds=None, negative_prompt_embeds=None):
        prompts, count = self._prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        batch = count * per_prompt
        self._common_checks(output_type, generator, per_prompt, batch, steps)
        height, width = self._size(height, width)
        context = self._context(prompts, negative_prompt, per_prompt, guided, clip_skip, max_length,
                                prompt_embeds, negative_prompt_embeds)
        f = self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        x_T = None
        if latents is not None:
            self._check_latents(latents, shape)
            x_T = latents.to(device=self.device, dtype=self.dtype) * self.scheduler.init_noise_sigma
        x = sample_loop(
            C.guided_model_fn(self.unet, context, guided), self.scheduler, shape,
            guidance_scale=guidance_scale if guided else None, generator=generator,
            progress=self.progress if progress is None else progress, num_inference_steps=steps,
            device=self.device, dtype=self.dtype, x_T=x_T, step_kwargs=C.step_kwargs(self.scheduler, eta),
            callback=callback,
        )
        return self._finish(x, output_type, scale_first)


def _diffkern_scheduler(scheduler):
    if isinstance(scheduler, str):  # a name needs the checkpoint's config (betas...): from_loaded has it
        raise TypeError(f"scheduler: pass a scheduler instance here (e.g. DDIMScheduler.from_config("
                        f"config)); names like {scheduler!r} are for from_pretrained / from_loaded")
    return C.make_scheduler(scheduler, None)


def sd_scheduler_config(config):
    """diffusers' StableDiffusion pipelines rewrite early SD scheduler configs when they load them:
    steps_offset becomes 1 and clip_sample False (configs written before those keys existed would
    otherwise get DDIM's defaults, 0 and True, and clipping x0 to [-1, 1] ruins latents). Same here."""
    config = dict(config or {})
    if config.get("steps_offset", 0) != 1:
        logger.warning("scheduler config: steps_offset=%s set to 1, as diffusers does for SD checkpoints",
                       config.get("steps_offset"))
        config["steps_offset"] = 1
    if config.get("clip_sample", True):
        logger.warning("scheduler config: clip_sample set to False, as diffusers does for SD checkpoints")
        config["clip_sample"] = False
    return config


class _DiffusersSDAdapter(_PromptSteps):
    """diffkern's construction and call conventions in front of a diffusers SD pipeline class (put
    first in the bases). Subclasses call `self._run(prompt arguments, diffusers keyword arguments)`."""

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker=False):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                         scheduler=_diffkern_scheduler(scheduler), safety_checker=safety_checker,
                         feature_extractor=feature_extractor, image_encoder=image_encoder,
                         requires_safety_checker=requires_safety_checker)
        self.notes = []

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device="cpu", scheduler="ddim", **load_kwargs):
        """Load a checkpoint (diffusers folder or CompVis single file) with diffkern.models.loading.load.

        scheduler: a name ("ddim" by default, "ddpm", "euler_a", ... see diffkern.schedulers.ALIASES)
        built on the checkpoint's scheduler config, or a diffkern scheduler instance. dtype / device:
        where the modules live (e.g. torch.float16, "cuda"). load_kwargs go to load (tokenizer= for
        single files, prediction_type=, variant=). diffusers' own from_pretrained (torch_dtype=) is not
        this: use diffkern.pipelines.load_pipeline, or from_loaded.
        """
        from diffkern.models.loading import load

        return cls.from_loaded(load(path, dtype=dtype, device=device, **load_kwargs), scheduler=scheduler)

    @classmethod
    def from_loaded(cls, loaded, scheduler="ddim"):
        """Build from what diffkern.models.loading.load returned (unet, vae, text_encoder, tokenizer,
        scheduler config; early SD scheduler configs patched as diffusers patches them)."""
        parts = components(loaded)
        config = sd_scheduler_config(parts.pop("scheduler_config"))
        pipe = cls(**parts, scheduler=C.make_scheduler(scheduler, config))
        pipe.notes = list(getattr(loaded, "notes", None) or [])  # what the loader assumed or left out
        return pipe

    def _run(self, call, *, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale,
             num_images_per_prompt, num_inference_steps, generator, output_type, clip_skip, progress,
             callback, kwargs):
        """Check and encode the prompt, then diffusers' __call__ (`call`) with the embeddings."""
        prompts, count = self._prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        self._common_checks(output_type, generator, num_images_per_prompt, count * num_images_per_prompt,
                            num_inference_steps)
        guided = guidance_scale > 1
        cond, uncond = self._embeds(prompts, negative_prompt, guided, clip_skip, None, prompt_embeds,
                                    negative_prompt_embeds)
        if callback is not None:
            if kwargs.get("callback_on_step_end") is not None:
                raise ValueError("callback, callback_on_step_end: give one of them, not both")

            def on_step_end(pipe, i, t, tensors):
                callback(i, t, SimpleNamespace(prev_sample=tensors["latents"]))
                return {}

            kwargs["callback_on_step_end"] = on_step_end
        saved = getattr(self, "_progress_bar_config", None)
        if progress is not None:
            self._progress_bar_config = {**(saved or {}), "disable": not progress}
        unet = self.unet
        if _returns_bare_tensor(unet):  # diffusers' loop takes [0] of the UNet's output: give it a tuple
            object.__setattr__(self, "unet", _TupleOutput(unet))  # for this call only, config untouched
        try:
            return call(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=guidance_scale,
                        num_images_per_prompt=num_images_per_prompt,
                        num_inference_steps=num_inference_steps, generator=generator, output_type=output_type,
                        **kwargs)
        finally:
            object.__setattr__(self, "unet", unet)
            if saved is None:
                self.__dict__.pop("_progress_bar_config", None)
            else:
                self._progress_bar_config = saved


def _returns_bare_tensor(unet):
    """Wrappers of the UNet that return the prediction as a tensor where diffusers' loop expects an
    output to index (diffkern.distributed's BatchSplitModel, which CFG-parallel puts in its place)."""
    from diffkern.distributed.cfg_parallel import BatchSplitModel

    return isinstance(unet, BatchSplitModel)


class _TupleOutput:
    """`unet` called as diffusers' loop calls it: its tensor output returned as a 1-tuple; every
    attribute (config, dtype, ...) is the wrapped module's."""

    def __init__(self, unet):
        self._unet = unet

    def __getattr__(self, name):
        return getattr(self._unet, name)

    def __call__(self, *args, **kwargs):
        out = self._unet(*args, **kwargs)
        return (out,) if isinstance(out, torch.Tensor) else out


class StableDiffusionPipeline(_DiffusersSDAdapter, diffusers.StableDiffusionPipeline):
    """Text-to-image with classifier-free guidance (SD 1.x eps, SD 2.x eps or v-prediction)."""

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, *, num_inference_steps=50, guidance_scale=7.5,
                 height=None, width=None, num_images_per_prompt=1, generator=None, latents=None, eta=0.0,
                 output_type="pil", clip_skip=None, progress=None, callback=None, prompt_embeds=None,
                 negative_prompt_embeds=None, **kwargs):
        """Generate images for `prompt` (a str or a list of str) or for `prompt_embeds`.

        Args:
            negative_prompt: str (for every prompt) or one per prompt; default "" (the unconditional).
            prompt_embeds: (B, tokens, D) text-encoder hidden states instead of `prompt` (not both), e.g.
                weighted or precomputed; B prompts, each repeated num_images_per_prompt times.
            negative_prompt_embeds: the same shape, instead of negative_prompt (not both); without it
                guidance encodes negative_prompt ("" by default) as usual. clip_skip does not touch
                given embeddings.
            num_inference_steps: scheduler steps. guidance_scale: w of uncond + w (cond - uncond);
                guidance (and its second half of the UNet batch) runs only when w > 1, as diffusers.
            height, width: pixels, multiples of the VAE's downscale (8); default unet sample_size * 8.
            num_images_per_prompt: images per prompt (the batch is prompts x this).
            generator: torch.Generator or a list of one per image. latents: x_T (B, C, H/8, W/8).
            eta: DDIM's eta (ignored by DDPM). output_type: "pil" | "np" | "pt" ([0, 1]) | "latent".
            clip_skip: use the hidden state this many layers before the text encoder's last.
            progress: tqdm bar for this call (default: set_progress_bar_config's).
            callback(i, t, out) after each step (out.prev_sample: the latents).
            Other keywords are diffusers' (guidance_rescale, cross_attention_kwargs, timesteps, ...).
        Returns:
            diffusers' StableDiffusionPipelineOutput (`.images`, `.nsfw_content_detected`).
        """
        height, width = self._size(height, width)
        if latents is not None:
            count = prompt_embeds.shape[0] if prompt is None and prompt_embeds is not None else \
                len(C.prompt_list(prompt)) if prompt is not None else 0
            f = self.vae_scale_factor
            self._check_latents(latents, (count * num_images_per_prompt, self.unet.config.in_channels,
                                          height // f, width // f))
        kwargs.update(height=height, width=width, latents=latents, eta=eta)
        return self._run(super().__call__, prompt=prompt, negative_prompt=negative_prompt,
                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                         guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                         num_inference_steps=num_inference_steps, generator=generator,
                         output_type=output_type, clip_skip=clip_skip, progress=progress, callback=callback,
                         kwargs=kwargs)


class StableDiffusionImg2ImgPipeline(_DiffusersSDAdapter, diffusers.StableDiffusionImg2ImgPipeline):
    """Image-to-image (SDEdit): noise the encoded image to step `strength` of the schedule, denoise.

    Nothing in it is CLIP-specific: with LDM text2im components (LDMBertModel, BertTokenizer) it
    runs image-to-image for that model too (diffusers has no LDM img2img to compare with).
    """

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, negative_prompt=None, *, strength=0.8, num_inference_steps=50,
                 guidance_scale=7.5, height=None, width=None, num_images_per_prompt=1, generator=None,
                 eta=0.0, output_type="pil", clip_skip=None, progress=None, callback=None, prompt_embeds=None,
                 negative_prompt_embeds=None, **kwargs):
        """Transform `image` following `prompt` (or `prompt_embeds`).

        Args:
            image: PIL image(s), a float array (H, W, 3) / (B, H, W, 3) in [0, 1], or a tensor
                (B, 3, H, W) in [0, 1] (or [-1, 1]); its size, rounded down to a multiple of 8, unless
                height / width are given. One image for every output, or one per output image
                (prompts x num_images_per_prompt); other counts that divide it are tiled, as diffusers.
            strength: in [0, 1]; the image is noised to the timestep at this fraction of the schedule
                and int(num_inference_steps * strength) steps run (diffusers' get_timesteps).
            The other arguments (prompt_embeds, negative_prompt_embeds...) are StableDiffusionPipeline's.
        """
        if image is None:
            raise ValueError("image: required (the image to transform)")
        check_strength(strength)
        if isinstance(num_inference_steps, int) and int(num_inference_steps * strength) < 1:
            raise ValueError(f"strength: {strength} x num_inference_steps={num_inference_steps} leaves no "
                             "denoising step; raise either")
        # diffkern's reading of the image (sizes, [-1, 1] tensors), handed to diffusers in [0, 1]
        pixels = C.preprocess_image(image, height, width, self.vae_scale_factor)
        kwargs.update(image=(pixels / 2 + 0.5).clamp(0, 1), strength=strength, eta=eta)
        return self._run(super().__call__, prompt=prompt, negative_prompt=negative_prompt,
                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                         guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                         num_inference_steps=num_inference_steps, generator=generator,
                         output_type=output_type, clip_skip=clip_skip, progress=progress, callback=callback,
                         kwargs=kwargs)


def check_strength(strength):
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength: expected a number in [0, 1], got {strength!r}")


def components(loaded):
    """unet, vae, text_encoder, tokenizer and scheduler_config out of diffkern.models.loading.load's
    result (attributes or a mapping; diffusers' LDM names vqvae / bert are accepted)."""

    def get(*names):
        for name in names:
            value = loaded.get(name) if isinstance(loaded, dict) else getattr(loaded, name, None)
            if value is not None:
                return value
        return None

    parts = dict(unet=get("unet"), vae=get("vae", "vqvae"), text_encoder=get("text_encoder", "bert"),
                 tokenizer=get("tokenizer"))
    missing = [k for k, v in parts.items() if v is None]
    if missing:
        hint = ("; single-file checkpoints carry no tokenizer: pass tokenizer=<CLIP tokenizer folder> "
                "(diffkern generate --tokenizer)") if missing == ["tokenizer"] else ""
        raise ValueError(f"loaded: the checkpoint has no {', '.join(missing)} (a text-to-image pipeline "
                         f"needs unet, vae, text_encoder and tokenizer){hint}")
    config = get("scheduler_config", "scheduler")
    if config is not None and not isinstance(config, dict):
        config = getattr(config, "config", config)
    parts["scheduler_config"] = config
    return parts
