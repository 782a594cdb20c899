"""End-to-end text-to-image pipelines on diffkern models, schedulers and ops.

- StableDiffusionPipeline / StableDiffusionImg2ImgPipeline: SD 1.x / 2.x (CLIP text encoder).
- StableDiffusionInpaintPipeline: the SD inpainting checkpoints (9-channel UNet).
- LDMTextToImagePipeline: Latent Diffusion text2im (LDM-BERT text encoder).
- GlidePipeline: GLIDE 64 -> 256 with classifier-free or CLIP guidance, and inpainting.
- IFPipeline / IFSuperResolutionPipeline / IFImg2ImgPipeline / IFInpaintingPipeline (+ their
  SuperResolution variants): DeepFloyd IF stages.
- StableDiffusionUpscalePipeline: the SD x4 upscaler (IF stage III).
- IFCascadePipeline (= ImagenPipeline): prompt -> 64 -> 256 -> 1024, T5 once, sequential loading.
- UnCLIPPipeline / UnCLIPImageVariationPipeline: DALL-E 2 / Karlo (prior, decoder, 64 -> 256 SR);
  UnCLIPManipulations: the paper's variations / interpolations / text diffs; load_karlo: original .ckpt files.
- load_pipeline(path): the right SD/LDM one for a checkpoint.

Each matches diffusers' pipeline of the same name image for image (same weights, same seed).
"""

from diffkern.pipelines._common import ImagePipelineOutput
from diffkern.pipelines.deepfloyd_if import (
    IFImg2ImgPipeline,
    IFImg2ImgSuperResolutionPipeline,
    IFInpaintingPipeline,
    IFInpaintingSuperResolutionPipeline,
    IFPipeline,
    IFPipelineOutput,
    IFSuperResolutionPipeline,
)
from diffkern.pipelines.glide import GlidePipeline
from diffkern.pipelines.imagen import IFCascadeOutput, IFCascadePipeline, ImagenPipeline
from diffkern.pipelines.latent_diffusion import LDMTextToImagePipeline
from diffkern.pipelines.ldm import (LDMClassConditionalPipeline, LDMInpaintPipeline, LDMPipeline,
                                    LDMSuperResolutionPipeline)
from diffkern.pipelines.stable_diffusion_xl import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffkern.pipelines.stable_diffusion import (
    LatentDiffusionPipelineBase,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    components,
)
from diffkern.pipelines.stable_diffusion_inpaint import StableDiffusionInpaintPipeline
from diffkern.pipelines.stable_diffusion_upscale import StableDiffusionUpscalePipeline
from diffkern.pipelines.unclip import UnCLIPPipeline
from diffkern.pipelines.unclip_variation import UnCLIPImageVariationPipeline
from diffkern.pipelines._unclip_manipulations import UnCLIPManipulations
from diffkern.models.checkpoints.karlo import load_karlo


def load_pipeline(path, *, dtype=None, device="cpu", scheduler=None, img2img=False, inpaint=False,
                  **load_kwargs):
    """Load a checkpoint and wrap it in the matching pipeline: LDMTextToImagePipeline when its text
    encoder is an LDMBertModel, else StableDiffusionPipeline; with img2img=True the image-to-image
    pipeline (which runs LDM text2im components too); with inpaint=True StableDiffusionInpaintPipeline
    (an inpainting checkpoint, whose UNet takes 9 channels). A Karlo diffusers folder (model_index.json
    _class_name UnCLIPPipeline / UnCLIPImageVariationPipeline) gives that unCLIP pipeline (dtype,
    device and variant= apply; scheduler= does not: unCLIP runs its own UnCLIPSchedulers). load_kwargs go to
    diffkern.models.loading.load (tokenizer= for single files, prediction_type=, variant=).

    scheduler: None (default) runs the scheduler the checkpoint names (scheduler_config.json's
    `_class_name`: PNDMScheduler for SD 1.5, DDIM for a single file without one), with its config; a
    name ("ddim", "euler_a", "dpm++2m_karras", "UniPCMultistepScheduler", ... see
    diffkern.schedulers.ALIASES / SCHEDULERS) picks another on the same config; an instance is used."""
    from diffkern.models.loading import load
    from diffkern.models.text_encoders import LDMBertModel
    from diffkern.models.unclip.folders import unclip_pipeline_class

    unclip = unclip_pipeline_class(path)  # Karlo folders: UnCLIPPipeline / UnCLIPImageVariationPipeline
    if unclip is not None:
        cls = UnCLIPPipeline if unclip == "UnCLIPPipeline" else UnCLIPImageVariationPipeline
        return cls.from_pretrained(path, dtype=dtype, device=device, variant=load_kwargs.get("variant"))

    from diffkern.pipelines.ldm._components import folder_pipeline_class, load_folder_pipeline

    # diffusers LDM / SDXL folders
    ldm_or_sdxl = folder_pipeline_class(path, img2img=img2img, inpaint=inpaint)
    if ldm_or_sdxl is not None:
        return load_folder_pipeline(path, ldm_or_sdxl, dtype=dtype, device=device, scheduler=scheduler,
                                    variant=load_kwargs.get("variant"))

    from diffkern.pipelines.imagen import if_folder_pipeline

    # IF-I / IF-II / x4-upscaler folders
    deepfloyd = if_folder_pipeline(path, img2img=img2img, inpaint=inpaint)
    if deepfloyd is not None:
        return deepfloyd.from_pretrained(path, dtype=dtype, device=device, **load_kwargs)

    if img2img and inpaint:
        raise ValueError("img2img, inpaint: pick one pipeline, not both")
    loaded = load(path, dtype=dtype, device=device, **load_kwargs)
    parts = components(loaded)
    if inpaint:
        return StableDiffusionInpaintPipeline.from_loaded(loaded, scheduler=scheduler)
    if parts["unet"].config.in_channels == 2 * getattr(parts["vae"].config, "latent_channels", 4) + 1:
        # the other pipelines would fail at the first UNet call with a channel count that says little
        raise ValueError(f"path: {path} is an inpainting checkpoint (its UNet takes "
                         f"{parts['unet'].config.in_channels} input channels); load it with inpaint=True")
    if isinstance(parts["text_encoder"], LDMBertModel) and not img2img:
        return LDMTextToImagePipeline.from_loaded(loaded, scheduler=scheduler)
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    return cls.from_loaded(loaded, scheduler=scheduler)


__all__ = [
    "GlidePipeline",
    "IFCascadeOutput",
    "IFCascadePipeline",
    "IFImg2ImgPipeline",
    "IFImg2ImgSuperResolutionPipeline",
    "IFInpaintingPipeline",
    "IFInpaintingSuperResolutionPipeline",
    "IFPipeline",
    "IFPipelineOutput",
    "IFSuperResolutionPipeline",
    "ImagePipelineOutput",
    "ImagenPipeline",
    "LDMTextToImagePipeline",
    "LDMClassConditionalPipeline",
    "LDMInpaintPipeline",
    "LDMPipeline",
    "LDMSuperResolutionPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
    "LatentDiffusionPipelineBase",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionUpscalePipeline",
    "UnCLIPImageVariationPipeline",
    "UnCLIPManipulations",
    "load_karlo",
    "UnCLIPPipeline",
    "load_pipeline",
]
