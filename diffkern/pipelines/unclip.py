"""DALL-E 2 / unCLIP text-to-image (Ramesh et al. 2022; Karlo v1-alpha), diffusers' UnCLIPPipeline contract.

prompt -> CLIP text (embedding + token states) -> prior (CLIP image embedding, 25 steps, guidance 4)
-> text projection (4 extra context tokens, additive time embedding) -> decoder 64x64 (25 steps,
guidance 8, learned-range variance) -> super-resolution 64 -> 256 (7 steps: `super_res_first` for all
but the last, `super_res_last` for the last) -> images.

Same images as diffusers' pipeline from the same components and generator; every step is one model call
on the guided batch and one fused scheduler step.
"""

from __future__ import annotations

import torch

from diffkern.pipelines._common import ImagePipelineOutput
from diffkern.pipelines import _unclip_stages as stages


class UnCLIPPipeline:
    """Text-to-image with a CLIP-image-embedding prior, a decoder and two super-resolution UNets.

    Components (diffusers' names): prior (PriorTransformer), decoder (the unCLIP UNet2DConditionModel),
    text_encoder (transformers CLIPTextModelWithProjection), tokenizer (CLIPTokenizer), text_proj
    (UnCLIPTextProjModel), super_res_first / super_res_last (UNet2DModel), prior_scheduler /
    decoder_scheduler / super_res_scheduler (UnCLIPScheduler; a diffusers one converts by its config).
    diffkern models and diffusers models both plug in; `from_diffusers(pipe)` converts every model.
    """

    def __init__(self, prior, decoder, text_encoder, tokenizer, text_proj, super_res_first, super_res_last,
                 prior_scheduler, decoder_scheduler, super_res_scheduler):
        self.prior, self.decoder, self.text_proj = prior, decoder, text_proj
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.super_res_first, self.super_res_last = super_res_first, super_res_last
        self.prior_scheduler = stages.unclip_scheduler(prior_scheduler, "prior_scheduler")
        self.decoder_scheduler = stages.unclip_scheduler(decoder_scheduler, "decoder_scheduler")
        self.super_res_scheduler = stages.unclip_scheduler(super_res_scheduler, "super_res_scheduler")

    @classmethod
    def from_diffusers(cls, pipe):
        """The same pipeline on diffkern models (prior, text_proj, decoder, SR UNets converted with
        diffkern.models.from_diffusers; CLIP and the tokenizer shared; schedulers rebuilt from config)."""
        from diffkern.models import from_diffusers

        return cls(prior=from_diffusers(pipe.prior), decoder=from_diffusers(pipe.decoder),
                   text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                   text_proj=from_diffusers(pipe.text_proj), super_res_first=from_diffusers(pipe.super_res_first),
                   super_res_last=from_diffusers(pipe.super_res_last), prior_scheduler=pipe.prior_scheduler,
                   decoder_scheduler=pipe.decoder_scheduler, super_res_scheduler=pipe.super_res_scheduler)

    @classmethod
    def from_pretrained(cls, folder, *, dtype=None, device="cpu", variant=None):
        """Load a Karlo diffusers folder (kakaobrain/karlo-v1-alpha layout) into diffkern's models."""
        return cls(**_folder_components(folder, cls.__name__, dtype, device, variant))

    @property
    def components(self):
        return {k: getattr(self, k) for k in ("prior", "decoder", "text_encoder", "tokenizer", "text_proj",
                                              "super_res_first", "super_res_last", "prior_scheduler",
                                              "decoder_scheduler", "super_res_scheduler")}

    @property
    def device(self):
        return stages.module_device(self.decoder)

    def to(self, device=None, dtype=None):
        for name in ("prior", "decoder", "text_encoder", "text_proj", "super_res_first", "super_res_last"):
            getattr(self, name).to(device=device, dtype=dtype)
        return self

    def _prompts(self, prompt, text_model_output):
        if prompt is None:
            if text_model_output is None:
                raise ValueError("prompt: give a prompt (str or list of str) or text_model_output")
            return None
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return prompt
        raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")

    @torch.no_grad()
    def __call__(self, prompt=None, num_images_per_prompt=1, prior_num_inference_steps=25,
                 decoder_num_inference_steps=25, super_res_num_inference_steps=7, generator=None,
                 prior_latents=None, decoder_latents=None, super_res_latents=None, text_model_output=None,
                 text_attention_mask=None, prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
                 output_type="pil", return_dict=True):
        """Generate images; arguments as diffusers' UnCLIPPipeline.__call__.

        prompt: str or list of str (None when text_model_output = (text_embeds, last_hidden_state) and
        text_attention_mask are given). Guidance is on when either scale is > 1 (both stages then run
        the [uncond; cond] batch). prior_latents (B, embedding_dim), decoder_latents (B, 3, 64, 64),
        super_res_latents (B, 3, 256, 256): the initial noise of each stage, B = prompts x images per
        prompt. output_type "pil" (PIL images), "pt" (tensor in [0, 1]) or anything else (a float
        (B, H, W, 3) array, as diffusers). Returns ImagePipelineOutput(images) or (images,).
        """
        prompts = self._prompts(prompt, text_model_output)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected an int >= 1, got {num_images_per_prompt!r}")
        if text_model_output is not None:
            self._check_text_model_output(text_model_output)
        device = self.device
        guided = prior_guidance_scale > 1.0 or decoder_guidance_scale > 1.0
        embeds, hidden, mask = stages.encode_prompt(self.text_encoder, self.tokenizer, prompts, device,
                                                    num_images_per_prompt, guided, text_model_output,
                                                    text_attention_mask)
        image_embeddings = stages.run_prior(self.prior, self.prior_scheduler, embeds, hidden, mask,
                                            steps=prior_num_inference_steps, guidance_scale=prior_guidance_scale,
                                            guided=guided, generator=generator, latents=prior_latents)
        image_small = self.decode(image_embeddings, embeds, hidden, mask, guided=guided,
                                  steps=decoder_num_inference_steps, guidance_scale=decoder_guidance_scale,
                                  generator=generator, latents=decoder_latents)
        image = stages.run_super_res(self.super_res_first, self.super_res_last, self.super_res_scheduler,
                                     image_small, steps=super_res_num_inference_steps, generator=generator,
                                     latents=super_res_latents)
        images = stages.to_output(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _check_text_model_output(self, out):
        cfg = self.prior.config
        dim = cfg.embedding_dim
        embeds, hidden = out[0], out[1]
        if (not isinstance(embeds, torch.Tensor) or embeds.dim() != 2
                or embeds.shape[1] != (cfg.get("embedding_proj_dim") or dim)
                or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[2] != dim):
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (embeds, hidden)]
            raise ValueError(f"text_model_output: expected (text_embeds (B, {dim}), last_hidden_state (B, T, {dim})) "
                             f"for the prior's embedding_dim, got {got[0]} and {got[1]}")

    def decode(self, image_embeddings, prompt_embeds, hidden, mask, *, guided, steps, guidance_scale, generator,
               latents, scale_latents=True):
        """The decoder stage alone: CLIP image embeddings (B, D) + encoded text -> 64x64 images in [-1, 1]."""
        context, time_emb, ctx_mask = stages.decoder_conditioning(self.text_proj, image_embeddings, prompt_embeds,
                                                                  hidden, mask, guided)
        fn = stages.decoder_model_fn(self.decoder, context, time_emb, ctx_mask, guided)
        return stages.run_decoder(self.decoder, self.decoder_scheduler, fn, image_embeddings.shape[0],
                                  context.dtype, steps=steps, guidance_scale=guidance_scale, generator=generator,
                                  latents=latents, scale_latents=scale_latents)


def _folder_components(folder, expected, dtype, device, variant):
    from diffkern.models.unclip.folders import load_unclip_folder, unclip_pipeline_class

    kind = unclip_pipeline_class(folder)
    if kind != expected:
        raise ValueError(f"folder: {folder} is not a diffusers {expected} folder (model_index.json "
                         f"_class_name: {kind!r})")
    return load_unclip_folder(folder, dtype=dtype, device=device, variant=variant)
