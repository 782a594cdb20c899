"""GLIDE text-to-image, CLIP-guided, inpainting and DDIM-inversion pipelines (OpenAI's notebooks, end to end).

    pipe = GlidePipeline.from_checkpoints("base.pt", "upsample.pt", tokenizer="glide_tokenizer/")
    image = pipe("an oil painting of a corgi", generator=torch.Generator().manual_seed(0)).images[0]
    images = pipe(["a corgi", "a cat"], batch_size=2).images  # corgi, corgi, cat, cat

What each call does, as OpenAI's notebooks (text2im, clip_guided, inpaint) do:

- base 64 x 64: DDPM (p_sample_loop) with the learned variance over base_respacing ("100") steps,
  x0 clamped to [-1, 1]; classifier-free guidance with the empty prompt (all end tokens, mask
  False) as the unconditional rows, [cond of every image; uncond of every image] in one model call;
  or, with use_clip_guidance, no free guidance and the noised CLIP's gradient as cond_fn.
- upsampler 64 -> 256: DDIM (eta 0) over upsample_respacing ("fast27") steps, no guidance, the base
  samples quantised to 8 bits as low_res, x_T = noise * upsample_temp (0.997).
- inpainting: both stages sample with DDPM; the models see image * mask and mask, and after each x0
  prediction the known region (mask 1) is put back (the notebook's denoised_fn).

Beyond the notebooks:

- several prompts in one call (a list of str, or of token-id lists), batch_size images each, in
  prompt-major order; with one generator per image, an image does not depend on the rest of the batch.
- CLIP and classifier-free guidance together (use_clip_guidance with a numeric guidance_scale): the
  step's mean comes from the guided eps (variance from the conditional half), then CLIP's gradient
  shifts it by variance * grad, exactly as cond_fn shifts an unguided step.
- DDIM inversion: invert(image, prompt) -> the base model's x_T; __call__(prompt, base_noise=x_T,
  base_sampler="ddim", base_clip_denoised=False, with the same respacing and guidance) samples it back.

Differences: x_T and every step's noise come from `generator` (OpenAI draws from the global RNG), and
only the conditional half of the guided batch is sampled (OpenAI samples both halves, which get the
same guided output, and keeps the first). A float64 base model samples in float64 (tests), any other
in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from diffkern.models.glide.diffusion import create_gaussian_diffusion, guided_model_fn
from diffkern.models.glide.model_creation import (
    create_model,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
)
from diffkern.models.glide.tokenizer import load_glide_tokenizer
from diffkern.models.weights import CheckpointError, key_problems, read_state_dict
from diffkern.pipelines import _glide_inputs as I
from diffkern.pipelines._common import ImagePipelineOutput, postprocess
from diffkern.schedulers._base import randn_like_diffusers

OUTPUT_TYPES = ("pil", "np", "pt")


class GlidePipeline:
    """GLIDE's base model (+ optional upsampler, tokenizer, noised CLIP) with OpenAI's options.

    base_options / upsampler_options are OpenAI's option dicts (model_and_diffusion_defaults() ...):
    image_size, text_ctx, diffusion_steps, noise_schedule, inpaint are read from them.
    tokenizer: a GlideTokenizer (GPT-2 BPE), a folder with its files, or None (then pass tokens).
    clip_model: a NoisedCLIP (with its ClipTokenizer) for use_clip_guidance.
    """

    def __init__(self, base_model, base_options, upsampler_model=None, upsampler_options=None, tokenizer=None,
                 clip_model=None):
        if upsampler_model is not None and upsampler_options is None:
            raise ValueError("upsampler_options: required with an upsampler_model")
        self.base_model, self.upsampler_model, self.clip_model = base_model, upsampler_model, clip_model
        self.base_options = {**model_and_diffusion_defaults(), **base_options}
        self.upsampler_options = None if upsampler_options is None else \
            {**model_and_diffusion_defaults_upsampler(), **upsampler_options}
        self.tokenizer = tokenizer if tokenizer is None or hasattr(tokenizer, "encode") else \
            load_glide_tokenizer(tokenizer)

    @classmethod
    def from_checkpoints(cls, base_path, upsampler_path=None, *, tokenizer=None, inpaint=False,
                         base_options=None, upsampler_options=None, clip_image_path=None, clip_text_path=None,
                         clip_tokenizer=None, device="cpu", use_fp16=False):
        """Load OpenAI's .pt files (base.pt / base_inpaint.pt, upsample.pt / upsample_inpaint.pt,
        optionally clip_image_enc.pt + clip_text_enc.pt) with torch.load(weights_only=True).

        The options default to OpenAI's released ones (inpaint / use_fp16 applied to both models);
        base_options / upsampler_options override them (e.g. for fine-tuned checkpoints). Raises
        FileNotFoundError for a missing file and CheckpointError naming the file for a corrupt one or
        one whose keys do not fit (missing / unexpected / mis-shaped keys listed).
        """
        base_opts = {**model_and_diffusion_defaults(), "inpaint": inpaint, "use_fp16": use_fp16,
                     **(base_options or {})}
        base = _load_model(base_path, base_opts, device)
        up, up_opts = None, None
        if upsampler_path is not None:
            up_opts = {**model_and_diffusion_defaults_upsampler(), "inpaint": inpaint, "use_fp16": use_fp16,
                       **(upsampler_options or {})}
            up = _load_model(upsampler_path, up_opts, device)
        clip = None
        if (clip_image_path is None) != (clip_text_path is None):
            raise ValueError("clip_image_path and clip_text_path: give both or neither")
        if clip_image_path is not None:
            from diffkern.models.glide.clip import create_clip_model
            from diffkern.models.glide.tokenizer import ClipTokenizer

            tok = clip_tokenizer
            if isinstance(tok, (str, Path)):
                tok = ClipTokenizer.from_path(tok)
            clip = create_clip_model(tokenizer=tok)
            _fill(clip.image_encoder, clip_image_path, "clip image encoder")
            _fill(clip.text_encoder, clip_text_path, "clip text encoder")
            clip = clip.to(device).eval()
        return cls(base, base_opts, up, up_opts, tokenizer=tokenizer, clip_model=clip)

    # -- public calls ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, *, tokens=None, guidance_scale="auto", batch_size=1, base_respacing="100",
                 base_sampler="ddpm", base_noise=None, base_clip_denoised=True, upsample_respacing="fast27",
                 upsample_temp=0.997, generator=None, use_clip_guidance=False, clip_guidance_scale=3.0,
                 output_type="pil", progress=True):
        """Generate batch_size images per prompt, prompt-major (all of the first prompt's, then ...).

        prompt: a str or a list of str; or tokens: one prompt's token ids (unpadded: ints or a 1-D
            tensor) or a list of them (or a 2-D tensor, a row per prompt). Exactly one of the two.
        guidance_scale: s of classifier-free guidance (eps = uncond + s (cond - uncond)) or None (none).
            "auto": 3.0 (text2im notebook), or None with use_clip_guidance (clip_guided notebook); a
            number with use_clip_guidance applies both (CLIP's gradient shifts the guided step).
        base_sampler: "ddpm" (OpenAI's, ancestral) or "ddim" (eta 0: deterministic given x_T).
        base_noise: the base model's x_T, (num_prompts * batch_size, 3, S, S) with S its image_size,
            instead of drawing it from generator; e.g. from `invert`.
        base_clip_denoised: clamp the base model's x0 predictions to [-1, 1] (OpenAI's); False to
            sample an inverted x_T back (clamping is not invertible).
        generator: a torch.Generator, or a list of one per image (x_T, step noise and the
            upsampler's noise of image n then come from generator[n] alone).
        output_type: "pil", "np" ((N, H, W, 3) in [0, 1]) or "pt" ((N, 3, H, W) in [0, 1]). Without an
            upsampler the base samples are returned.
        """
        self._check_common(batch_size, output_type)
        if self.base_options["inpaint"]:
            raise ValueError("this pipeline's base model is an inpainting model: call "
                             ".inpaint(image, mask, ...)")
        if base_sampler not in ("ddpm", "ddim"):
            raise ValueError(f"base_sampler: expected 'ddpm' or 'ddim', got {base_sampler!r}")
        guidance_scale = I.guidance_scale_value(guidance_scale, None if use_clip_guidance else 3.0)
        texts, ids = self._prompts(prompt, tokens)
        N, size = len(ids) * batch_size, self.base_options["image_size"]
        I.check_generator(generator, N)
        if base_noise is not None and (not isinstance(base_noise, torch.Tensor)
                                       or tuple(base_noise.shape) != (N, 3, size, size)):
            got = tuple(base_noise.shape) if isinstance(base_noise, torch.Tensor) else \
                type(base_noise).__name__
            raise ValueError(f"base_noise: expected a tensor ({N}, 3, {size}, {size}) (num_prompts * "
                             f"batch_size images), got {got}")
        clip_scale = None
        if use_clip_guidance:
            if self.clip_model is None:
                raise ValueError("use_clip_guidance: the pipeline has no clip_model")
            if texts is None:
                raise ValueError("use_clip_guidance: needs the prompt text (CLIP has its own tokenizer)")
            clip_scale = clip_guidance_scale
        base = self._base(texts, ids, batch_size, guidance_scale, base_respacing, generator, progress,
                          sampler=base_sampler, noise=base_noise, clip_denoised=base_clip_denoised,
                          clip_scale=clip_scale)
        out = base
        if self.upsampler_model is not None:
            out = self._upsample(ids, batch_size, base, upsample_respacing, upsample_temp, generator,
                                 progress, None)
        return ImagePipelineOutput(images=postprocess(out, output_type))

    @torch.no_grad()
    def inpaint(self, image, mask, prompt=None, *, tokens=None, guidance_scale=5.0, batch_size=1,
                base_respacing="100", upsample_respacing="fast27", upsample_temp=0.997, generator=None,
                output_type="pil", progress=True):
        """Fill the region where `mask` is 0 (1 = keep) with the inpainting models.

        image: a PIL image, or a tensor (3, H, W) / (1, 3, H, W) in [-1, 1]; resized (bicubic) to
        each stage's size. mask: a tensor / array (H, W), (1, H, W) or (1, 1, H, W) of 0 / 1,
        resized nearest to 64 x 64 and from there to the upsampler's size (as the notebook).
        prompt / tokens, batch_size, generator: as for __call__ (every prompt fills the same image);
        guidance_scale: as for __call__, "auto" being the inpaint notebook's 5.0.
        """
        self._check_common(batch_size, output_type)
        if not self.base_options["inpaint"] or (self.upsampler_model is not None
                                                and not self.upsampler_options["inpaint"]):
            raise ValueError("inpaint needs inpainting models (inpaint=True options, base_inpaint.pt / "
                             "upsample_inpaint.pt)")
        guidance_scale = I.guidance_scale_value(guidance_scale, 5.0)
        texts, ids = self._prompts(prompt, tokens)
        I.check_generator(generator, len(ids) * batch_size)
        size = self.base_options["image_size"]
        mask_lo = I.mask_tensor(mask, size)
        known_lo = I.image_tensor(image, size) * mask_lo
        base = self._base(texts, ids, batch_size, guidance_scale, base_respacing, generator, progress,
                          inpaint=(known_lo, mask_lo))
        out = base
        if self.upsampler_model is not None:
            up_size = self.upsampler_options["image_size"]
            mask_hi = F.interpolate(mask_lo, (up_size, up_size), mode="nearest")
            known_hi = I.image_tensor(image, up_size) * mask_hi
            out = self._upsample(ids, batch_size, base, upsample_respacing, upsample_temp, generator,
                                 progress, (known_hi, mask_hi))
        return ImagePipelineOutput(images=postprocess(out, output_type))

    @torch.no_grad()
    def invert(self, image, prompt=None, *, tokens=None, guidance_scale=None, respacing="ddim50",
               fixed_point_iterations=0, progress=True):
        """DDIM inversion (the eta = 0 ODE run from x_0 to x_T) of images through the base model.

        image: a PIL image, a list of them, or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1]; resized
            (bicubic) to the base model's size S.
        prompt / tokens: as for __call__, one prompt for every image or one per image; neither: the
            empty prompt (the unconditional model; sample back with tokens=[]).
        guidance_scale: None, or s of classifier-free guidance in every inverse step.
        respacing: the base timesteps to invert over (OpenAI's strings: "ddim50", "100", ...).
        fixed_point_iterations: extra model calls per step that make it the exact inverse of the
            sampler's DDIM step (see GaussianDiffusion.ddim_reverse_sample_loop); with 0 the round
            trip is off by O(1 / steps). Each iteration shrinks the step's error by about
            |eps coefficient| x Lip(eps), ~1 - sqrt(abar_next / abar) near the noise end (eps ~ x
            there): few large steps need many iterations. The cosine schedule's step to t = T - 1
            (beta capped at 0.999) is too large to converge, so respacings that keep T - 1 ("100",
            "fast27") leave an O(1e-2) error; "ddimN" ones do not keep it.

        Returns x_T, (B, 3, S, S) in the base model's sampling dtype. Sampling it back,
            x_T = pipe.invert(image, "a corgi", fixed_point_iterations=5)
            pipe("a corgi", batch_size=len(x_T), base_noise=x_T, base_sampler="ddim",
                 base_respacing="ddim50", base_clip_denoised=False, guidance_scale=None)
        (same prompts, guidance_scale and respacing; batch_size=1 with one prompt per image) returns
        the image from the base stage; an upsampler, when present, then upsamples it.
        """
        if self.base_options["inpaint"]:
            raise ValueError("invert: this pipeline's base model is an inpainting model")
        guidance_scale = I.guidance_scale_value(guidance_scale, None)
        o, model = self.base_options, self.base_model
        device, dtype = _device(model), _dtype(model)
        x0 = I.image_tensor(image, o["image_size"], batched=True).to(device, dtype)
        n = x0.shape[0]
        _, ids = self._prompts(prompt, [] if prompt is None and tokens is None else tokens)
        if len(ids) not in (1, n):
            raise ValueError(f"prompt / tokens: expected one prompt or one per image ({n}), got {len(ids)}")
        diffusion = create_gaussian_diffusion(o["diffusion_steps"], o["noise_schedule"], respacing)
        model_fn = self._model_fn(model, o["text_ctx"], ids, n // len(ids), guidance_scale, device, {})
        return diffusion.ddim_reverse_sample_loop(model_fn, x0, guidance_scale=guidance_scale,
                                                  fixed_point_iterations=fixed_point_iterations,
                                                  progress=progress)

    # -- stages ------------------------------------------------------------------------------------
    def _base(self, texts, ids, B, guidance_scale, respacing, generator, progress, *, sampler="ddpm",
              noise=None, clip_denoised=True, clip_scale=None, inpaint=None):
        o, model = self.base_options, self.base_model
        device, dtype = _device(model), _dtype(model)
        diffusion = create_gaussian_diffusion(o["diffusion_steps"], o["noise_schedule"], respacing)
        extra, denoised_fn = {}, None
        if inpaint is not None:
            known, keep = (t.to(device, dtype) for t in inpaint)
            extra = {"inpaint_image": known, "inpaint_mask": keep}
            denoised_fn = _keep_known(known, keep)
        model_fn = self._model_fn(model, o["text_ctx"], ids, B, guidance_scale, device, extra)
        # CLIP guidance composes with free guidance: the loops shift whatever step the guided eps gives
        cond_fn = None if clip_scale is None else \
            self.clip_model.cond_fn([text for text in texts for _ in range(B)], clip_scale)
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
        size = o["image_size"]
        return loop(model_fn, (len(ids) * B, 3, size, size), guidance_scale=guidance_scale, noise=noise,
                    clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                    generator=generator, device=device, dtype=dtype, progress=progress)

    def _upsample(self, ids, B, base, respacing, temp, generator, progress, inpaint):
        o, model = self.upsampler_options, self.upsampler_model
        device, dtype = _device(model), _dtype(model)
        N, size = base.shape[0], o["image_size"]
        diffusion = create_gaussian_diffusion(o["diffusion_steps"], o["noise_schedule"], respacing)
        # the notebook hands the upsampler the base samples as 8-bit images would store them
        extra = {"low_res": (((base + 1) * 127.5).round() / 127.5 - 1).to(device, dtype)}
        noise = randn_like_diffusers((N, 3, size, size), generator, device, dtype) * temp
        if inpaint is None:
            fn = self._model_fn(model, o["text_ctx"], ids, B, None, device, extra)
            return diffusion.ddim_sample_loop(fn, noise.shape, noise=noise, device=device, dtype=dtype,
                                              progress=progress)
        known, keep = (x.to(device, dtype) for x in inpaint)
        fn = self._model_fn(model, o["text_ctx"], ids, B, None, device,
                            dict(extra, inpaint_image=known, inpaint_mask=keep))
        return diffusion.p_sample_loop(fn, noise.shape, noise=noise, denoised_fn=_keep_known(known, keep),
                                       generator=generator, device=device, dtype=dtype, progress=progress)

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _model_fn(model, text_ctx, ids, B, guidance_scale, device, extra):
        """The samplers' model_fn: image n sees prompt n // B (and `extra`, one row or one per image);
        with guidance_scale, the unconditional rows follow all conditional ones in the same call."""
        tokens, mask = (t.repeat_interleave(B, 0) for t in I.padded_tokens(ids, text_ctx, model, device))
        N = tokens.shape[0]
        extra = {k: v.expand(N, *v.shape[1:]) for k, v in extra.items()}
        if guidance_scale is None:
            kwargs = {"tokens": tokens, "mask": mask, **extra}
            return lambda x, t: model(x, t, **kwargs)
        un_tokens, un_mask = (t.expand(N, -1) for t in I.padded_tokens([[]], text_ctx, model, device))
        kwargs = {"tokens": torch.cat([tokens, un_tokens]), "mask": torch.cat([mask, un_mask]),
                  **{k: torch.cat([v, v]) for k, v in extra.items()}}
        return guided_model_fn(model, kwargs)

    def _prompts(self, prompt, tokens):
        """(the prompt texts or None, one unpadded token-id list per prompt)."""
        if (prompt is None) == (tokens is None):
            raise ValueError("give prompt (a str or a list of str) or tokens (token ids, or a list of "
                             "them), exactly one")
        if prompt is None:
            return None, I.token_lists(tokens)
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(p, str) for p in texts):
            got = type(prompt).__name__ if not isinstance(prompt, (list, tuple)) else \
                f"a {type(prompt).__name__} of {[type(p).__name__ for p in prompt]}"
            raise TypeError(f"prompt: expected a str or a non-empty list of str, got {got}")
        if self.tokenizer is None:
            raise ValueError("prompt: the pipeline has no tokenizer; pass tokenizer= (a folder with "
                             "GLIDE's encoder.json / vocab.bpe) or give token ids with tokens=")
        return list(texts), [self.tokenizer.encode(p) for p in texts]

    @staticmethod
    def _check_common(batch_size, output_type):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")


def _dtype(model):
    """float64 for a float64 model (exact tests), else float32 (OpenAI samples fp16 models in float32)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def _device(model):
    return next(model.parameters()).device


def _keep_known(known, keep):
    """The notebook's denoised_fn: x0 outside the mask, the known image inside it."""
    return lambda x0: x0 * (1 - keep) + known * keep


def _fill(module, path, what):
    """load_state_dict from a checkpoint file, every problem a CheckpointError naming the file."""
    sd = read_state_dict(path)
    problems = key_problems(module, sd, what)
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit the {what}:\n  " + "\n  ".join(problems))
    module.load_state_dict(sd)


def _load_model(path, options, device):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLIDE checkpoint not found: {path}")
    model = create_model(**options)
    what = "upsampler" if options.get("super_res") else "base model"
    _fill(model, path, f"GLIDE {what} ({'inpaint, ' if options.get('inpaint') else ''}"
                       f"image_size {options['image_size']})")
    return model.to(device).eval()
