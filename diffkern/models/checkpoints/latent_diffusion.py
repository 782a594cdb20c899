"""Original CompVis latent-diffusion checkpoints (`model.ckpt` + the release's config .yaml) -> diffkern.

    from diffkern.models.checkpoints.latent_diffusion import load_latent_diffusion
    pipe = load_latent_diffusion("models/ldm/cin256-v2/model.ckpt", "configs/latent-diffusion/cin256-v2.yaml")
    images = pipe(class_labels=[88], guidance_scale=3.0, num_inference_steps=20).images

The .yaml is read as data (yaml.safe_load; nothing is instantiated from its `target`s) and the .ckpt with
torch.load(weights_only=True) (diffkern.models.weights.read_state_dict: tensors and plain containers only,
never code). The parts are mapped to the diffusers layout:

- model.diffusion_model.*  openaimodel.UNetModel with use_spatial_transformer -> UNet2DConditionModel
  (the key map and shape inference of diffkern.models.compvis, heads from num_heads / num_head_channels);
- first_stage_model.*      VQModelInterface -> diffkern VQModel (ddconfig -> diffusers config, the taming
  quantizer's codebook -> quantize.embedding) or AutoencoderKL -> diffkern AutoencoderKL;
- cond_stage_model.*       ClassEmbedder -> diffkern.pipelines.ldm.ClassEmbedder (cin256: n_classes 1001
  with the null class 1000); BERTEmbedder -> LDMBertModel;
- the DDPM schedule (linear_start, linear_end, timesteps, parameterization) -> a DDIMScheduler sampling as
  CompVis's DDIMSampler ('uniform' steps = steps_offset 1, alphas_cumprod[0] at the end), scale_factor ->
  the autoencoder's scaling_factor.

Families: the class-conditional ImageNet model (cin256 / cin256-v2) -> LDMClassConditionalPipeline; the
text-to-image model (txt2img-1p4B: BERTEmbedder, an x-transformers encoder -> diffkern LDMBertModel with
diffusers' keys, KL-f8) -> LDMTextToImagePipeline (pass tokenizer=, the bert-base-uncased tokenizer). Not yet:
the unconditional, super-resolution and inpainting models (their UNets are openaimodel without the spatial
transformer, i.e. diffusers UNet2DModel with AttnDownBlock2D: the key map, with its per-head qkv split, is not
written yet; their diffusers folders load), and VQ autoencoders with encoder attention (vq-f8 / f16:
AttnDownEncoderBlock2D): each raises CheckpointError / NotImplementedError saying so.
`ema=True` reads the model_ema.* copy of the UNet weights when the file has one (CompVis's ema_scope).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffkern.models import compvis
from diffkern.models.compvis import CheckpointError

__all__ = ["CheckpointError", "convert_latent_diffusion", "load_latent_diffusion", "read_config"]


def read_config(path):
    """The release's config .yaml as plain data (the `model` section's params are what is used)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_config: no such file: {path}")
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: not a latent-diffusion config (no top-level `model:` section)")
    return config


def _target(section, what):
    if section in ("__is_first_stage__", "__is_unconditional__"):
        return section
    if not isinstance(section, dict) or "target" not in section:
        raise CheckpointError(f"config: {what} has no `target`")
    return section["target"]


def _first_stage(sd, section, scale_factor):
    """(class name, diffusers config, state dict) of the autoencoder."""
    target = _target(section, "first_stage_config")
    params = section.get("params", {})
    dd = params.get("ddconfig") or {}
    name = target.rsplit(".", 1)[-1]
    if name not in ("VQModelInterface", "VQModel", "AutoencoderKL"):
        raise CheckpointError(f"config: first_stage_config target {target} is not a CompVis VQ / KL "
                              "autoencoder")
    if dd.get("attn_resolutions"):
        raise CheckpointError(f"first_stage_model: attention at resolutions {dd['attn_resolutions']} "
                              "(diffusers' AttnDownEncoderBlock2D / AttnUpDecoderBlock2D) is not supported "
                              "by diffkern's autoencoders yet")
    if dd.get("attn_type", "vanilla") not in ("vanilla", "none"):
        raise CheckpointError(f"first_stage_model: attn_type {dd['attn_type']!r} is not supported")
    levels = len(dd["ch_mult"])
    config = dict(in_channels=dd.get("in_channels", 3), out_channels=dd.get("out_ch", 3),
                  down_block_types=["DownEncoderBlock2D"] * levels,
                  up_block_types=["UpDecoderBlock2D"] * levels,
                  block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]],
                  layers_per_block=dd["num_res_blocks"],
                  latent_channels=dd["z_channels"], norm_num_groups=32, sample_size=dd.get("resolution", 256),
                  scaling_factor=float(scale_factor),
                  mid_block_add_attention=dd.get("attn_type", "vanilla") != "none")
    sd = dict(sd)
    if name == "AutoencoderKL":
        if params.get("embed_dim", dd["z_channels"]) != dd["z_channels"]:
            raise CheckpointError("first_stage_model: a KL autoencoder with embed_dim != z_channels does not "
                                  "fit diffusers' AutoencoderKL")
        return "AutoencoderKL", config, compvis.vae_from_compvis(sd)
    codebook = sd.pop("quantize.embedding.weight", None)
    if codebook is None:
        raise CheckpointError("first_stage_model: quantize.embedding.weight (the VQ codebook) is missing")
    if "quantize.used" in sd:
        raise CheckpointError("first_stage_model: a remapped codebook (quantize.used) is not supported")
    converted = compvis.vae_from_compvis(sd)
    converted["quantize.embedding.weight"] = codebook
    config.update(num_vq_embeddings=params["n_embed"], vq_embed_dim=params["embed_dim"])
    return "VQModel", config, converted


def _unet(sd, section, image_size):
    target = _target(section, "unet_config")
    params = section.get("params", {})
    if not target.endswith("openaimodel.UNetModel"):
        raise CheckpointError(f"config: unet_config target {target} is not CompVis's openaimodel.UNetModel")
    if not params.get("use_spatial_transformer"):
        raise CheckpointError(
            "model.diffusion_model: an openaimodel UNet without the spatial transformer (the unconditional, "
            "super-resolution and inpainting LDMs; diffusers' UNet2DModel with AttnDownBlock2D): its key map "
            "(qkv split per head) is not written yet; load the diffusers folder instead")
    if params.get("resblock_updown"):
        raise CheckpointError("model.diffusion_model: resblock_updown is not supported")
    heads = {}
    if params.get("num_head_channels", -1) not in (-1, None):
        heads["head_channels"] = params["num_head_channels"]
    else:
        heads["num_heads"] = params.get("num_heads", 8)
    config = compvis.infer_unet_config(sd, sample_size=params.get("image_size", image_size), **heads)
    return config, compvis.unet_from_compvis(sd, config)


def _bert(sd, params):
    """CompVis's BERTEmbedder (an x-transformers TransformerWrapper: pre-LayerNorm encoder, 8 heads of 64,
    GELU feed-forward 4x, learned positions) -> diffusers' LDMBertModel config and keys."""
    width, depth = int(params.get("n_embed", 1280)), int(params.get("n_layer", 32))
    config = dict(vocab_size=int(params.get("vocab_size", 30522)),
                  max_position_embeddings=int(params.get("max_seq_len", 77)), encoder_layers=depth,
                  encoder_ffn_dim=4 * width, encoder_attention_heads=8, head_dim=64, d_model=width)
    src = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    rows = {"token_emb.weight": "model.embed_tokens.weight",
            "pos_emb.emb.weight": "model.embed_positions.weight",
            "norm.weight": "model.layer_norm.weight", "norm.bias": "model.layer_norm.bias",
            "to_logits.weight": "to_logits.weight", "to_logits.bias": "to_logits.bias"}
    for i in range(depth):
        a, f, dst = f"attn_layers.layers.{2 * i}.", f"attn_layers.layers.{2 * i + 1}.", f"model.layers.{i}."
        for p in ("weight", "bias"):
            rows[f"{a}0.{p}"] = f"{dst}self_attn_layer_norm.{p}"
            rows[f"{a}1.to_out.{p}"] = f"{dst}self_attn.out_proj.{p}"
            rows[f"{f}0.{p}"] = f"{dst}final_layer_norm.{p}"
            rows[f"{f}1.net.0.0.{p}"] = f"{dst}fc1.{p}"
            rows[f"{f}1.net.2.{p}"] = f"{dst}fc2.{p}"
        for proj in "qkv":
            rows[f"{a}1.to_{proj}.weight"] = f"{dst}self_attn.{proj}_proj.weight"
    unknown = sorted(set(sd) - {"transformer." + k for k in rows})
    if unknown:
        raise CheckpointError(f"cond_stage_model: {len(unknown)} keys fit no LDMBertModel weight "
                              f"(an x-transformers option the release does not use?): "
                              f"{compvis._cap(unknown)}")
    return config, {rows[k]: v for k, v in src.items()}


def _ema_unet(full, unet_sd):
    """The model_ema.* copy of the UNet (CompVis's LitEma: names without dots)."""
    out, missing = {}, []
    for key in unet_sd:
        ema_key = "model_ema." + ("diffusion_model." + key).replace(".", "")
        if ema_key in full:
            out[key] = full[ema_key]
        else:
            missing.append(ema_key)
    if missing:
        raise CheckpointError(f"ema=True: the file has no EMA copy of {len(missing)} UNet weights, e.g. "
                              f"{compvis._cap(missing, 5)}")
    return out


def convert_latent_diffusion(sd, config, *, ema=False):
    """{component: (class name, diffusers config, state dict in the diffusers layout)} plus "scheduler":
    (class name, scheduler config, None) and "family", from a CompVis state dict and its parsed config."""
    model = config["model"]
    params = model.get("params", {})
    if not str(model.get("target", "")).endswith("LatentDiffusion"):
        raise CheckpointError(f"config: model target {model.get('target')} is not ldm.models.diffusion.ddpm."
                              "LatentDiffusion")
    unet_raw = {k[len(compvis.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(compvis.UNET_PREFIX)}
    if not unet_raw:
        raise CheckpointError("checkpoint: no model.diffusion_model.* weights")
    if ema:
        unet_raw = _ema_unet(sd, unet_raw)
    vae_raw = {k[len(compvis.VAE_PREFIX):]: v for k, v in sd.items()
               if k.startswith(compvis.VAE_PREFIX) and not k.startswith(compvis.VAE_PREFIX + "loss.")}
    cond_raw = {k[len("cond_stage_model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}

    out = {}
    cond = _target(params.get("cond_stage_config"), "cond_stage_config")
    key = params.get("conditioning_key")
    if cond.endswith("ClassEmbedder") and key == "crossattn":
        cond_params = params["cond_stage_config"].get("params", {})
        if set(cond_raw) != {"embedding.weight"}:
            raise CheckpointError(f"cond_stage_model: expected only embedding.weight for the ClassEmbedder, "
                                  f"got {compvis._cap(list(cond_raw))}")
        n_classes, width = cond_raw["embedding.weight"].shape
        if n_classes != cond_params.get("n_classes", 1000) or width != cond_params.get("embed_dim", width):
            raise CheckpointError(f"cond_stage_model: embedding.weight is "
                                  f"{tuple(cond_raw['embedding.weight'].shape)}, the config says n_classes "
                                  f"{cond_params.get('n_classes')}, embed_dim {cond_params.get('embed_dim')}")
        class_embedder = ("ClassEmbedder", {"num_classes": int(n_classes), "embed_dim": int(width)}, cond_raw)
    elif cond.endswith("BERTEmbedder") and key == "crossattn":
        text_encoder = ("LDMBertModel",) + _bert(cond_raw, params["cond_stage_config"].get("params", {}))
    else:
        raise NotImplementedError(f"cond_stage_config {cond} with conditioning_key {key!r}: only the "
                                  "class-conditional (ClassEmbedder) and text-to-image (BERTEmbedder) "
                                  "families with crossattn conditioning load from CompVis files yet")

    unet_config, unet_sd = _unet(unet_raw, params["unet_config"], params.get("image_size", 64))
    out["unet"] = ("UNet2DConditionModel", unet_config, unet_sd)
    out["vqvae"] = _first_stage(vae_raw, params["first_stage_config"], params.get("scale_factor", 1.0))

    if cond.endswith("ClassEmbedder"):
        out["class_embedder"], out["family"] = class_embedder, "LDMClassConditionalPipeline"
    else:  # the text-to-image model: LDMTextToImagePipeline names the autoencoder `vae`
        out["vae"], out["text_encoder"] = out.pop("vqvae"), text_encoder
        out["family"] = "LDMTextToImagePipeline"

    parameterization = params.get("parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise CheckpointError(f"config: parameterization {parameterization!r} is not supported (eps, v)")
    schedule = params.get("beta_schedule", "linear")
    if schedule != "linear":
        raise CheckpointError(f"config: beta_schedule {schedule!r} is not supported (CompVis's 'linear')")
    out["scheduler"] = ("DDIMScheduler", dict(
        num_train_timesteps=int(params.get("timesteps", 1000)),
        beta_start=float(params.get("linear_start", 1e-4)),
        # CompVis's "linear" schedule is linear in sqrt(beta): diffusers' scaled_linear
        beta_end=float(params.get("linear_end", 2e-2)), beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="epsilon" if parameterization == "eps" else "v_prediction"), None)
    return out


def _build(name, config, sd, dtype, device, what):
    from diffkern.models.autoencoder_kl import AutoencoderKL
    from diffkern.models.unet_2d_condition import UNet2DConditionModel
    from diffkern.models.vq_model import VQModel
    from diffkern.pipelines.ldm.class_conditional import ClassEmbedder

    from diffkern.models.text_encoders import LDMBertModel

    cls = {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL, "VQModel": VQModel,
           "ClassEmbedder": ClassEmbedder, "LDMBertModel": LDMBertModel}[name]
    with torch.device("meta"):
        module = cls(**config)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        problems = [f"missing: {compvis._cap(missing)}" if missing else "",
                    f"unexpected: {compvis._cap(unexpected)}" if unexpected else "",
                    "shapes: " + ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                                           for k in wrong[:10]) if wrong else ""]
        raise CheckpointError(f"{what}: the weights do not fit {name}: "
                              + "; ".join(p for p in problems if p))
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).to(device)
            for k, v in sd.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_latent_diffusion(checkpoint, config, *, dtype=None, device="cpu", ema=False, tokenizer=None):
    """A diffkern pipeline for a CompVis latent-diffusion release: `checkpoint` the model.ckpt (or a
    .safetensors of the same state dict), `config` its .yaml. dtype: the weights' dtype (None keeps the
    file's). ema: use the file's EMA UNet weights (model_ema.*). tokenizer: for the text-to-image model,
    the BERT tokenizer CompVis downloads (bert-base-uncased): a transformers tokenizer or its folder.
    Raises CheckpointError naming what does not fit, NotImplementedError for the families not supported
    yet (see the module docstring)."""
    from diffkern.models.weights import read_state_dict
    from diffkern.schedulers import SCHEDULERS

    parsed = read_config(config) if not isinstance(config, dict) else config
    sd = read_state_dict(checkpoint)
    parts = convert_latent_diffusion(sd, parsed, ema=ema)
    family = parts.pop("family")
    sched_name, sched_config, _ = parts.pop("scheduler")
    modules = {name: _build(cls, cfg, state, dtype, device, f"{checkpoint}: {name}")
               for name, (cls, cfg, state) in parts.items()}
    modules["scheduler"] = SCHEDULERS[sched_name].from_config(sched_config)
    if family == "LDMTextToImagePipeline":
        if tokenizer is None:
            raise ValueError("tokenizer: the text-to-image model needs the BERT tokenizer CompVis uses "
                             "(bert-base-uncased): pass a transformers tokenizer or its folder")
        if isinstance(tokenizer, (str, Path)):
            from transformers import BertTokenizer

            tokenizer = BertTokenizer.from_pretrained(str(tokenizer))
        modules["tokenizer"] = tokenizer
    import diffkern.pipelines as pipelines

    return getattr(pipelines, family)(**modules)
