"""diffkern's Latent Diffusion pipelines: LDMPipeline (unconditional) and LDMSuperResolutionPipeline
against diffusers' pipelines of the same name, and the class-conditional pipeline against CompVis's
classifier-free-guided DDIM formula, on tiny random components."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.pipelines import (  # noqa: E402
    LDMClassConditionalPipeline,
    LDMInpaintPipeline,
    LDMPipeline,
    LDMSuperResolutionPipeline,
    load_pipeline,
)
from diffkern.pipelines.ldm import ClassEmbedder  # noqa: E402
from tests.models._helpers import randomise  # noqa: E402

from . import max_diff  # noqa: E402

# ldm-celebahq-256's scheduler (DDIM on LDM's linear-in-sqrt betas)
DDIM = dict(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, num_train_timesteps=1000)


def _vq(seed=1):
    torch.manual_seed(seed)
    return randomise(diffusers.VQModel(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                                       latent_channels=3,
                                       down_block_types=["DownEncoderBlock2D"] * 2, norm_num_groups=4,
                                       up_block_types=["UpDecoderBlock2D"] * 2, num_vq_embeddings=32), seed)


def _unet2d(in_channels=3, seed=2):
    torch.manual_seed(seed)
    return randomise(diffusers.UNet2DModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8,
                                           in_channels=in_channels, out_channels=3, norm_num_groups=4,
                                           attention_head_dim=8,  # the LDM releases' layout: attention
                                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                           up_block_types=("AttnUpBlock2D", "UpBlock2D")), seed, scale=0.05)


def _components(pipe):
    return {k: type(v).__module__.split(".")[0] for k, v in pipe.components.items()}


def test_unconditional_matches_diffusers_and_loads_from_a_folder(tmp_path):
    theirs = diffusers.LDMPipeline(vqvae=_vq(), unet=_unet2d(), scheduler=diffusers.DDIMScheduler(**DDIM))
    theirs.set_progress_bar_config(disable=True)
    ours = LDMPipeline.from_diffusers_pipeline(theirs)
    assert _components(ours) == {"vqvae": "diffkern", "unet": "diffkern", "scheduler": "diffkern"}
    args = dict(batch_size=2, num_inference_steps=3, output_type="np")
    want = theirs(**args, generator=torch.Generator().manual_seed(0)).images
    got = ours(**args, generator=torch.Generator().manual_seed(0)).images
    assert want.std() > 1e-2 and max_diff(got, want) < 1e-5
    # eta > 0: diffusers' LDMPipeline draws the DDIM noise from the global RNG; so does ours then
    torch.manual_seed(5)
    noisy_want = theirs(**args, eta=1.0, generator=torch.Generator().manual_seed(0)).images
    torch.manual_seed(5)
    noisy = ours(**args, eta=1.0, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(noisy, noisy_want) < 1e-5 and max_diff(noisy, got) > 1e-3

    theirs.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)  # LDMPipeline.from_pretrained, picked by model_index.json
    assert type(loaded) is LDMPipeline and _components(loaded) == _components(ours)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(**args, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(again, got) < 1e-5


def test_super_resolution_matches_diffusers(tmp_path):
    theirs = diffusers.LDMSuperResolutionPipeline(vqvae=_vq(), unet=_unet2d(in_channels=6),
                                                  scheduler=diffusers.DDIMScheduler(**DDIM))
    theirs.set_progress_bar_config(disable=True)
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    args = dict(num_inference_steps=3, output_type="np")
    want = theirs(low, **args, generator=torch.Generator().manual_seed(0)).images
    theirs.save_pretrained(tmp_path)
    ours = load_pipeline(tmp_path)
    assert type(ours) is LDMSuperResolutionPipeline and _components(ours)["unet"] == "diffkern"
    ours.set_progress_bar_config(disable=True)
    got = ours(low, **args, generator=torch.Generator().manual_seed(0)).images
    assert want.shape == (1, 16, 16, 3) and want.std() > 1e-2 and max_diff(got, want) < 1e-5


def _alphas_cumprod():
    """CompVis's 'linear' schedule (linear in sqrt(beta)) in float64."""
    betas = torch.linspace(DDIM["beta_start"] ** 0.5, DDIM["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _compvis_ddim(unet, embedder, vq, labels, scale, steps, x):
    """CompVis's DDIMSampler (eta = 0) with unconditional_guidance_scale, written out in float64:
    the null class's eps first, e = e_u + s (e_c - e_u), x0 = (x - sqrt(1-a) e) / sqrt(a), x' = sqrt(a') x0 +
    sqrt(1 - a') e, over the 'uniform' timesteps 0, 1000/S, ... (CompVis adds 1 to each: diffusers'
    steps_offset=1) with a' at the previous one (alphas_cumprod[0] at the end)."""
    acp = _alphas_cumprod()
    ts = list(range(0, 1000, 1000 // steps))
    ts = [t + 1 for t in ts][::-1]
    c = embedder(torch.tensor(labels))
    uc = embedder(torch.full((len(labels),), embedder.null_class))
    x = x.double()
    for i, t in enumerate(ts):
        eps = unet(torch.cat([x, x]).float(), t, encoder_hidden_states=torch.cat([uc, c])).sample
        e_u, e_c = eps.double().chunk(2)
        e = e_u + scale * (e_c - e_u)
        a, a_prev = acp[t], acp[ts[i + 1]] if i + 1 < len(ts) else acp[0]
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return (vq.decode(x.float()).sample / 2 + 0.5).clamp(0, 1)


def test_class_conditional_follows_compvis_guidance(tmp_path):
    from diffkern.models import from_diffusers
    from diffkern.models.vq_model import VQModel
    from diffkern.schedulers import DDIMScheduler

    torch.manual_seed(4)
    diffusers_unet = randomise(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2), 4)
    unet = from_diffusers(diffusers_unet)
    embedder = randomise(ClassEmbedder(num_classes=11, embed_dim=12), 5, scale=1.0)
    vq = VQModel.from_config(_vq().config)
    vq.load_state_dict(_vq().state_dict())
    vq.register_to_config(scaling_factor=1.0)  # CompVis's cin256-v2 scale_factor
    pipe = LDMClassConditionalPipeline(vqvae=vq.eval(), unet=unet, class_embedder=embedder,
                                       scheduler=DDIMScheduler(**DDIM, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = _compvis_ddim(unet, embedder, vq, [3, 7], 4.0, 4, x)
    got = pipe([3, 7], guidance_scale=4.0, num_inference_steps=4, latents=x, output_type="pt").images
    assert want.std() > 1e-2 and max_diff(got, want) < 1e-4
    unguided = pipe([3, 7], guidance_scale=1.0, num_inference_steps=4, latents=x, output_type="pt").images
    assert max_diff(unguided, got) > 1e-3
    with pytest.raises(ValueError, match=r"class_labels: each label must be in \[0, 10\)"):
        pipe([10], num_inference_steps=1)

    # a folder of diffusers-format parts (the pipeline runs any diffusers-contract components) loads as
    # diffkern's, with the same images
    folder = LDMClassConditionalPipeline(vqvae=vq, unet=diffusers_unet, class_embedder=embedder,
                                         scheduler=diffusers.DDIMScheduler(**DDIM, steps_offset=1))
    folder.save_pretrained(tmp_path)
    back = load_pipeline(tmp_path)
    assert type(back) is LDMClassConditionalPipeline
    assert set(_components(back).values()) == {"diffkern"}
    back.set_progress_bar_config(disable=True)
    again = back([3, 7], guidance_scale=4.0, num_inference_steps=4, latents=x, output_type="pt").images
    assert max_diff(again, got) < 1e-5


def test_inpainting_follows_compvis_script():
    """CompVis's scripts/inpaint.py written out: binarised mask, [-1, 1] inputs, the masked image's VQ latent
    and the nearest-resized mask concatenated to x_t, DDIM (eta 0) on 'uniform' steps, decode, paste back."""
    from diffkern.models import from_diffusers
    from diffkern.pipelines.ldm._components import convert_component
    from diffkern.schedulers import DDIMScheduler

    vq = convert_component(_vq())
    unet = from_diffusers(_unet2d(in_channels=7))
    pipe = LDMInpaintPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(**DDIM, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(7)
    image, mask = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 1, 16, 16, generator=g)
    x = torch.randn(1, 3, 8, 8, generator=g)
    got = pipe(image, mask, num_inference_steps=4, latents=x, output_type="pt").images

    with torch.no_grad():
        m = (mask >= 0.5).float()
        c = vq.encode(((1 - m) * image) * 2 - 1).latents
        c = torch.cat([c, torch.nn.functional.interpolate(m * 2 - 1, size=c.shape[-2:])], 1)
        acp = _alphas_cumprod()
        ts = [t + 1 for t in range(0, 1000, 1000 // 4)][::-1]
        xt = x.double()
        for i, t in enumerate(ts):
            e = unet(torch.cat([xt.float(), c], 1), t).sample.double()
            a, a_prev = acp[t], acp[ts[i + 1]] if i + 1 < len(ts) else acp[0]
            xt = a_prev.sqrt() * (xt - (1 - a).sqrt() * e) / a.sqrt() + (1 - a_prev).sqrt() * e
        pred = ((vq.decode(xt.float()).sample + 1) / 2).clamp(0, 1)
        want = (1 - m) * image + m * pred
    assert 0.2 < m.mean() < 0.8 and max_diff(got, want) < 1e-4
    assert max_diff(got * (1 - m), image * (1 - m)) < 1e-6  # the known region is the input's
    with pytest.raises(ValueError, match="mask_image"):
        pipe(image, mask[..., :8], num_inference_steps=1)
