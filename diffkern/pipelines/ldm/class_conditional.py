"""The class-conditional ImageNet LDM (CompVis cin256 / cin256-v2) as a diffusers DiffusionPipeline.

diffusers has no pipeline for it; this one follows CompVis's sampling (scripts/latent_imagenet_diffusion
.ipynb, ldm/models/diffusion/ddim.py): the class label is embedded by the `class_embedder` (CompVis's
ClassEmbedder, an embedding of num_classes + 1 rows), the embedding is the UNet's one-token
cross-attention context, and classifier-free guidance runs against the null class (row num_classes,
1000 for ImageNet):

    eps = eps(x_t, null) + guidance_scale * (eps(x_t, label) - eps(x_t, null))

(the unconditional half first in one batch of 2B, as CompVis's DDIMSampler). Latents are divided by the
autoencoder's scaling_factor (1.0 for cin256-v2's VQ-f4: CompVis's scale_factor) and decoded with
quantization, as CompVis's decode_first_stage does.

    pipe = LDMClassConditionalPipeline.from_pretrained("ldm-cin256-v2")       # or load_compvis(...)
    images = pipe(class_labels=[88, 301], guidance_scale=3.0, num_inference_steps=20, eta=0.0).images
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from diffkern.pipelines.ldm._components import DiffkernComponentsMixin

__all__ = ["ClassEmbedder", "LDMClassConditionalPipeline"]


class ClassEmbedder(ModelMixin, ConfigMixin):
    """CompVis's ClassEmbedder: label (B,) -> (B, 1, embed_dim). num_classes counts the null class too
    (1001 for cin256), as CompVis's n_classes; the weight key is `embedding.weight`."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int = 1001, embed_dim: int = 512):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ClassEmbedder: num_classes must count the classes and the null class (>= 2), "
                             f"got {num_classes}")
        self.embedding = nn.Embedding(num_classes, embed_dim)

    @property
    def null_class(self):
        """The unconditional label: the last row (1000 for ImageNet's 1001)."""
        return self.config.num_classes - 1

    def forward(self, class_labels):
        return self.embedding(class_labels)[:, None, :]


class LDMClassConditionalPipeline(DiffkernComponentsMixin, DiffusionPipeline):
    """vqvae (diffkern VQModel or AutoencoderKL), unet (diffkern UNet2DConditionModel whose
    cross_attention_dim is the embedding width), class_embedder (ClassEmbedder), scheduler (any
    diffusers-contract scheduler; CompVis samples with DDIM)."""

    model_cpu_offload_seq = "class_embedder->unet->vqvae"

    def __init__(self, vqvae, unet, class_embedder, scheduler):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, class_embedder=class_embedder, scheduler=scheduler)

    def _labels(self, class_labels, num_images_per_label):
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"class_labels: an int or a non-empty 1-d list / tensor of ints, got shape "
                             f"{tuple(labels.shape)}")
        null = self.class_embedder.null_class
        if labels.min() < 0 or labels.max() >= null:
            raise ValueError(f"class_labels: each label must be in [0, {null}) ({null} is the null class), "
                             f"got {labels.tolist()}")
        if not isinstance(num_images_per_label, int) or num_images_per_label < 1:
            raise ValueError(f"num_images_per_label: a positive int, got {num_images_per_label!r}")
        return labels.repeat_interleave(num_images_per_label)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 1.0, num_inference_steps: int = 50,
                 eta: float = 0.0, num_images_per_label: int = 1, generator=None, latents=None,
                 output_type: str = "pil", return_dict: bool = True):
        """Images of the given ImageNet classes.

        class_labels: an int or a list / tensor of ints in [0, num_classes). guidance_scale: CompVis's
        unconditional_guidance_scale (1.0: no guidance, one UNet call per step). eta: DDIM's eta (used when
        the scheduler's step takes it). latents: (B, C, s, s) initial noise instead of drawing it (the
        generator draws it otherwise, on the CPU with a CPU generator). output_type: "pil", "np", "pt" or
        "latent". Returns ImagePipelineOutput(images=...) or (images,)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type: one of 'pil', 'np', 'pt', 'latent', got {output_type!r}")
        device = self._execution_device
        labels = self._labels(class_labels, num_images_per_label).to(device)
        batch = labels.shape[0]
        guided = guidance_scale != 1.0
        cond = self.class_embedder(labels)
        if guided:
            null = torch.full_like(labels, self.class_embedder.null_class)
            cond = torch.cat([self.class_embedder(null), cond])
        dtype = self.unet.dtype
        cond = cond.to(dtype)

        size = self.unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        shape = (batch, self.unet.config.in_channels) + size
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in step_params:
            extra["eta"] = eta
        if "generator" in step_params:
            extra["generator"] = generator
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = torch.cat([latents] * 2) if guided else latents
            x_in = self.scheduler.scale_model_input(x_in, t)
            eps = self.unet(x_in, t, encoder_hidden_states=cond).sample
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents, **extra).prev_sample

        if output_type == "latent":
            image = latents
        else:
            scale = getattr(self.vqvae.config, "scaling_factor", 1.0)
            image = self.vqvae.decode(latents / scale).sample
            image = (image / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                image = image.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
