"""Original CompVis latent-diffusion checkpoints (model.ckpt + config .yaml) loaded by diffkern.

The first tests build tiny models with CompVis's own classes (the latent-diffusion repository: openaimodel
UNetModel, the autoencoder Encoder / Decoder, DDIMSampler), save them as the release does ({"state_dict": ...}
under model.diffusion_model / first_stage_model / cond_stage_model, with a cin256-v2-style .yaml) and compare
diffkern's outputs and a guided DDIM run against CompVis's. They skip where that repository (set
DIFFKERN_COMPVIS_LDM, default /work/ext/CompVis+latent-diffusion) or its einops / omegaconf dependencies are
absent. The last tests need no CompVis code: files written in the CompVis layout from diffusers-layout
weights, and the errors for the families not supported yet.
"""

import importlib
import os
import sys

import pytest
import torch
import yaml

from diffkern.models.checkpoints.latent_diffusion import CheckpointError, load_latent_diffusion

from ._helpers import max_diff

COMPVIS = os.environ.get("DIFFKERN_COMPVIS_LDM", "/work/ext/CompVis+latent-diffusion")

# cin256-v2.yaml shrunk (GroupNorm32 everywhere: channels are multiples of 32)
UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
            num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=16)
DD = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)
N_EMBED, N_CLASSES = 16, 11


def _config(unet=UNET, dd=DD, cond=None):
    cond = cond or {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                    "params": {"n_classes": N_CLASSES, "embed_dim": 16, "key": "class_label"}}
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
        "cond_stage_key": "class_label", "conditioning_key": "crossattn", "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                               "params": {"embed_dim": 3, "n_embed": N_EMBED, "ddconfig": dd,
                                          "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": cond}}}


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def ldm():
    if not os.path.isdir(os.path.join(COMPVIS, "ldm")):
        pytest.skip(f"CompVis latent-diffusion code not found at {COMPVIS} (set DIFFKERN_COMPVIS_LDM)")
    pytest.importorskip("einops")
    pytest.importorskip("omegaconf")
    sys.path.insert(0, COMPVIS)
    try:
        return {name: importlib.import_module(f"ldm.{name}") for name in (
            "modules.diffusionmodules.openaimodel", "modules.diffusionmodules.model", "models.diffusion.ddim",
            "modules.diffusionmodules.util", "modules.x_transformer")}
    finally:
        sys.path.remove(COMPVIS)


class _CompVisLDM(torch.nn.Module):
    """What CompVis's LatentDiffusion holds, from its own classes: the UNet (DiffusionWrapper 'crossattn':
    context = the class embedding), the VQ autoencoder (taming's VectorQuantizer2 = a codebook lookup by
    z^2 + e^2 - 2 z.e), the ClassEmbedder (an nn.Embedding) and register_schedule's buffers."""

    def __init__(self, ldm, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        m = ldm["modules.diffusionmodules.model"]
        self.unet = _perturb(ldm["modules.diffusionmodules.openaimodel"].UNetModel(**UNET), 1)
        self.encoder = _perturb(m.Encoder(**DD), 2)
        self.decoder = _perturb(m.Decoder(**DD), 3)
        self.quant_conv, self.post_quant_conv = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
        self.codebook = torch.nn.Embedding(N_EMBED, 3)
        self.embedding = torch.nn.Embedding(N_CLASSES, 16)
        _perturb(self, 4)
        util = ldm["modules.diffusionmodules.util"]
        betas = util.make_beta_schedule("linear", 1000, linear_start=0.0015, linear_end=0.0195)
        import numpy as np

        acp = np.cumprod(1.0 - betas)
        self.num_timesteps = 1000
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(acp, dtype=torch.float32)
        self.alphas_cumprod_prev = torch.tensor(np.append(1.0, acp[:-1]), dtype=torch.float32)

    def state_dict_as_released(self):
        sd = {f"model.diffusion_model.{k}": v for k, v in self.unet.state_dict().items()}
        for part in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
            sd.update({f"first_stage_model.{part}.{k}": v
                       for k, v in getattr(self, part).state_dict().items()})
        sd["first_stage_model.quantize.embedding.weight"] = self.codebook.weight.detach().clone()
        sd["cond_stage_model.embedding.weight"] = self.embedding.weight.detach().clone()
        sd["betas"] = self.betas  # schedule buffers a LatentDiffusion checkpoint carries too
        return sd

    @property
    def device(self):
        return torch.device("cpu")

    def apply_model(self, x, t, c):
        return self.unet(x, t, context=c)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h):
        z = h.permute(0, 2, 3, 1).reshape(-1, 3)
        e = self.codebook.weight
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        q = e[d.argmin(1)].view(h.shape[0], h.shape[2], h.shape[3], 3).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(q))


def _save(tmp_path, sd, config):
    ckpt, cfg = tmp_path / "model.ckpt", tmp_path / "config.yaml"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, ckpt)
    cfg.write_text(yaml.safe_dump(config))
    return ckpt, cfg


def test_compvis_checkpoint_matches_compvis_code(ldm, tmp_path):
    ref = _CompVisLDM(ldm)
    ckpt, cfg = _save(tmp_path, ref.state_dict_as_released(), _config())
    pipe = load_latent_diffusion(ckpt, cfg)
    assert type(pipe).__name__ == "LDMClassConditionalPipeline"
    assert pipe.unet.config.attention_head_dim == [4, 8] and pipe.vqvae.config.num_vq_embeddings == N_EMBED
    g = torch.Generator().manual_seed(0)
    x, img = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        ctx = ref.embedding(labels)[:, None]
        assert max_diff(pipe.class_embedder(labels), ctx) == 0
        want = ref.apply_model(x, torch.tensor([999, 10]), ctx)
        got = pipe.unet(x, torch.tensor([999, 10]), encoder_hidden_states=ctx).sample
        assert want.abs().max() > 1e-2 and max_diff(got, want) < 1e-4
        h = ref.encode(img)
        assert max_diff(pipe.vqvae.encode(img).latents, h) < 1e-5
        assert max_diff(pipe.vqvae.decode(h).sample, ref.decode(h)) < 5e-5  # float32 sums over images of ~3

    # a short guided DDIM run: CompVis's DDIMSampler (its register_buffer kept on the CPU) and decode
    Sampler = _sampler(ldm)
    uc = ref.embedding(torch.full((2,), N_CLASSES - 1))[:, None]
    with torch.no_grad():
        samples, _ = Sampler(ref).sample(S=4, conditioning=ctx, batch_size=2, shape=(3, 8, 8), eta=0.0, x_T=x,
                                         unconditional_guidance_scale=3.0, unconditional_conditioning=uc,
                                         verbose=False)
        want = torch.clamp((ref.decode(samples) + 1.0) / 2.0, 0.0, 1.0)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(labels, guidance_scale=3.0, num_inference_steps=4, latents=x, output_type="pt").images
    assert want.std() > 1e-2 and max_diff(got, want) < 1e-4


def _sampler(ldm):
    class Sampler(ldm["models.diffusion.ddim"].DDIMSampler):  # CompVis's, its buffers kept on the CPU
        def register_buffer(self, name, attr):
            setattr(self, name, attr)
    return Sampler


def test_text_to_image_checkpoint_matches_compvis_code(ldm, tmp_path):
    """txt2img-1p4B-eval.yaml shrunk: BERTEmbedder (x-transformers TransformerWrapper + Encoder), a KL
    autoencoder, the spatial-transformer UNet; embeddings, decode and a guided DDIM run against CompVis."""
    from tests.pipelines import bert_tokenizer

    tok = bert_tokenizer(tmp_path / "tok")
    xt, m = ldm["modules.x_transformer"], ldm["modules.diffusionmodules.model"]
    torch.manual_seed(0)
    bert = _perturb(xt.TransformerWrapper(num_tokens=len(tok), max_seq_len=77,
                                          attn_layers=xt.Encoder(dim=32, depth=2)), 1)
    unet_cfg = dict(UNET, in_channels=4, out_channels=4, context_dim=32, num_heads=2, legacy=False)
    del unet_cfg["num_head_channels"]
    unet = _perturb(ldm["modules.diffusionmodules.openaimodel"].UNetModel(**unet_cfg), 2)
    dd = dict(DD, double_z=True, z_channels=4)
    enc, dec = _perturb(m.Encoder(**dd), 3), _perturb(m.Decoder(**dd), 4)
    quant, post = _perturb(torch.nn.Conv2d(8, 8, 1), 5), _perturb(torch.nn.Conv2d(4, 4, 1), 6)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in bert.state_dict().items()})
    for name, part in (("encoder", enc), ("decoder", dec), ("quant_conv", quant), ("post_quant_conv", post)):
        sd.update({f"first_stage_model.{name}.{k}": v for k, v in part.state_dict().items()})
    config = _config(unet=unet_cfg, dd=dd, cond={"target": "ldm.modules.encoders.modules.BERTEmbedder",
                                                  "params": {"n_embed": 32, "n_layer": 2,
                                                             "vocab_size": len(tok)}})
    params = config["model"]["params"]
    params["first_stage_config"] = {"target": "ldm.models.autoencoder.AutoencoderKL",
                                    "params": {"embed_dim": 4, "ddconfig": dd}}
    params.update(scale_factor=0.18215, linear_start=0.00085, linear_end=0.012)
    ckpt, cfg = _save(tmp_path, sd, config)
    with pytest.raises(ValueError, match="tokenizer"):
        load_latent_diffusion(ckpt, cfg)
    pipe = load_latent_diffusion(ckpt, cfg, tokenizer=tmp_path / "tok")
    assert type(pipe).__name__ == "LDMTextToImagePipeline"

    ids = tok(["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = bert(ids, return_embeddings=True)
        assert max_diff(pipe.text_encoder(ids)[0], want) < 1e-5
        c, uc = want[:1], want[1:]
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

        class Model(_CompVisLDM):  # the schedule of this config, CompVis's LatentDiffusion.apply_model
            def __init__(self):
                torch.nn.Module.__init__(self)
                betas = ldm["modules.diffusionmodules.util"].make_beta_schedule(
                    "linear", 1000, linear_start=0.00085, linear_end=0.012)
                import numpy as np

                acp = np.cumprod(1.0 - betas)
                self.num_timesteps, self.unet = 1000, unet
                self.betas = torch.tensor(betas, dtype=torch.float32)
                self.alphas_cumprod = torch.tensor(acp, dtype=torch.float32)
                self.alphas_cumprod_prev = torch.tensor(np.append(1.0, acp[:-1]), dtype=torch.float32)

        samples, _ = _sampler(ldm)(Model()).sample(S=4, conditioning=c, batch_size=1, shape=(4, 8, 8),
                                                   eta=0.0, x_T=x, unconditional_guidance_scale=5.0,
                                                   unconditional_conditioning=uc, verbose=False)
        want = torch.clamp((dec(post(samples / 0.18215)) + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1)
    pipe.progress = False
    got = pipe("a photo of a cat", guidance_scale=5.0, num_inference_steps=4, latents=x, height=16, width=16,
               output_type="np").images
    assert want.std() > 1e-2 and max_diff(torch.as_tensor(got), want) < 1e-4


def test_ema_weights_and_dtype(ldm, tmp_path):
    ref = _CompVisLDM(ldm)
    sd = ref.state_dict_as_released()
    # CompVis's LitEma names: the parameter names without dots, under model_ema.
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v * 0.5 for k, v in sd.items()
           if k.startswith("model.diffusion_model.")}
    ckpt, cfg = _save(tmp_path, {**sd, **ema, "model_ema.decay": torch.tensor(0.9999)}, _config())
    plain = load_latent_diffusion(ckpt, cfg)
    averaged = load_latent_diffusion(ckpt, cfg, ema=True, dtype=torch.bfloat16)
    assert averaged.unet.dtype == torch.bfloat16
    w = "conv_in.weight"
    assert max_diff(averaged.unet.state_dict()[w].float(), plain.unet.state_dict()[w] * 0.5) < 1e-2


def test_written_in_the_compvis_layout_without_compvis_code(tmp_path):
    """diffusers-layout weights written under CompVis names (diffkern.models.compvis's inverse maps) load back
    to the same tensors; a missing codebook and the families not supported yet are clear errors."""
    import diffusers

    from diffkern.models import compvis

    torch.manual_seed(0)
    cfg = _config()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=[4, 8])
    vq = diffusers.VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                           up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=3,
                           num_vq_embeddings=N_EMBED,
                           layers_per_block=1)
    vq_sd = dict(vq.state_dict())
    codebook = vq_sd.pop("quantize.embedding.weight")
    unet_sd = compvis.unet_to_compvis(unet.state_dict(), unet.config)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in compvis.vae_to_compvis(vq_sd).items()})
    sd["first_stage_model.quantize.embedding.weight"] = codebook
    sd["cond_stage_model.embedding.weight"] = torch.randn(N_CLASSES, 16)
    ckpt, path = _save(tmp_path, sd, cfg)
    pipe = load_latent_diffusion(ckpt, path)
    for ours, theirs in ((pipe.unet, unet), (pipe.vqvae, vq)):
        got = ours.state_dict()
        assert all(torch.equal(got[k], v) for k, v in theirs.state_dict().items())

    del sd["first_stage_model.quantize.embedding.weight"]
    ckpt, path = _save(tmp_path, sd, cfg)
    with pytest.raises(CheckpointError, match="codebook"):
        load_latent_diffusion(ckpt, path)
    uncond = _config(unet=dict(UNET, use_spatial_transformer=False))
    with pytest.raises(CheckpointError, match="without the spatial transformer"):
        load_latent_diffusion(ckpt, uncond)
    with pytest.raises(NotImplementedError, match="ClassEmbedder"):
        load_latent_diffusion(ckpt, _config(cond={"target": "ldm.modules.encoders.modules.SpatialRescaler"}))
