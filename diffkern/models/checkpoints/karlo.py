"""Kakao Brain's original Karlo v1-alpha checkpoints -> diffusers-layout diffkern models and a pipeline.

    pipe = load_karlo("prior-ckpt-step=01000000-of-01000000.ckpt", "decoder-ckpt-step=01000000-of-01000000.ckpt",
                      "improved-sr-ckpt-step=1.2M.ckpt", "ViT-L-14_stats.th", clip="clip-vit-large-patch14")

Each .ckpt is read with torch.load(weights_only=True) and unwrapped from ["state_dict"]; its keys carry
a `model.` prefix (`model_first_steps.` / `model_last_step.` for the two SR models). The mapping (the
facts of diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py):

  prior:   time_embed.{0,2} -> time_embedding.linear_{1,2}; clip_img_proj -> proj_in; text_emb_proj ->
           embedding_proj; text_enc_proj -> encoder_hidden_states_proj; prd_emb -> prd_embedding;
           transformer.resblocks.i.{attn.c_qkv (per head [q_h; k_h; v_h]), attn.c_proj, mlp.c_fc, mlp.c_proj,
           ln_1, ln_2} -> transformer_blocks.i.{attn1.to_q/to_k/to_v, attn1.to_out.0, ff.net.0.proj, ff.net.2,
           norm1, norm3}; final_ln -> norm_out; out_proj -> proj_to_clip_embeddings; the stats file's
           (mean, std) -> clip_mean, clip_std.
  UNets:   time_embed -> time_embedding; input_blocks.0.0 -> conv_in; input_blocks / middle_block /
           output_blocks -> down_blocks / mid_block / up_blocks (ResBlock in_layers.{0,2}, emb_layers.1,
           out_layers.{0,3}, skip_connection -> norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut;
           the resampling ResBlocks -> downsamplers.0 / upsamplers.0); attention norm -> group_norm, qkv
           (1x1 conv, per head) -> to_q/k/v, encoder_kv (per head [k_h; v_h]) -> add_k_proj/add_v_proj,
           proj_out -> to_out.0; out.{0,2} -> conv_norm_out, conv_out.
  text proj (in the decoder file): text_seq_proj.{0,1} -> encoder_hidden_states_proj,
           text_encoder_hidden_states_norm; clip_tok_proj -> clip_extra_context_tokens_proj; text_feat_proj
           -> embedding_proj; clip_emb -> clip_image_embeddings_project_to_time_embeddings; cf_param ->
           learned_classifier_free_guidance_embeddings.
Every key problem of a file (missing, unexpected, mis-shaped) is listed in one CheckpointError.

Sampling. Models loaded from the original files sample as Karlo's own code does (KarloSampler below,
the facts of karlo/modules/diffusion/{gaussian_diffusion,respace}.py): Karlo's respacing
(space_timesteps: a stride accumulated in floats, Python's round), every coefficient of the respaced
process computed in float64 and rounded to float32 once, the prior's x0 clamped to [-10, 10]
(Karlo's denoised_fn; diffusers' conversion chose 5), the decoder's and SR's x0 to [-1, 1], learned-range
variance between posterior_log_variance_clipped and log(beta). Diffusers folders of Karlo
(kakaobrain/karlo-v1-alpha) keep diffusers' UnCLIPScheduler (float32 coefficients, x0 clamp 5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffkern.models.compvis import CheckpointError

__all__ = ["KARLO_PRIOR", "KARLO_DECODER", "KARLO_SUPER_RES", "KARLO_SCHEDULERS", "KARLO_SAMPLERS", "KarloSampler",
           "convert_prior", "convert_decoder", "convert_super_res", "karlo_spacing", "load_karlo", "read_clip_stats"]

KARLO_PRIOR = {}  # diffusers' PriorTransformer defaults are Karlo's prior
KARLO_DECODER = dict(
    sample_size=64, layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(320, 640, 960, 1280), in_channels=3,
    out_channels=6, cross_attention_dim=1536, class_embed_type="identity", attention_head_dim=64,
    resnet_time_scale_shift="scale_shift")
KARLO_SUPER_RES = dict(
    sample_size=256, layers_per_block=3, down_block_types=("ResnetDownsampleBlock2D",) * 4,
    up_block_types=("ResnetUpsampleBlock2D",) * 4, block_out_channels=(320, 640, 960, 1280), in_channels=6,
    out_channels=3, add_attention=False)
KARLO_SCHEDULERS = dict(
    prior_scheduler=dict(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                         clip_sample_range=5.0),
    decoder_scheduler=dict(variance_type="learned_range", prediction_type="epsilon", num_train_timesteps=1000),
    super_res_scheduler=dict(variance_type="fixed_small_log", prediction_type="epsilon", num_train_timesteps=1000))

# What Karlo's own sampler does per stage (configs/*.yaml diffusion: + the models' forward): prior
# predict_xstart, sigma_small, x0 clamped by denoised_fn to [-10, 10], clip_denoised False; decoder eps,
# learn_sigma (learned range), clip_denoised; improved SR eps, sigma_small, clip_denoised.
KARLO_SAMPLERS = dict(
    prior_scheduler=dict(prediction_type="sample", variance_type="fixed_small_log", clip_range=10.0),
    decoder_scheduler=dict(prediction_type="epsilon", variance_type="learned_range", clip_range=1.0),
    super_res_scheduler=dict(prediction_type="epsilon", variance_type="fixed_small_log", clip_range=1.0))


def karlo_spacing(num_train_timesteps, steps):
    """The kept timesteps, ascending: Karlo's space_timesteps(T, str(steps)) with one section (a stride
    (T - 1) / (steps - 1) accumulated in floats and rounded by Python's round, as Karlo does; diffusers'
    round(i * stride) can differ by one for some step counts)."""
    T = num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"num_inference_steps: expected an int in [1, {T}], got {steps!r}")
    stride = 1 if steps <= 1 else (T - 1) / (steps - 1)
    taken, cur = [], 0.0
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


def _karlo_cosine_betas(T):
    """Karlo's squaredcos_cap_v2 betas (betas_for_alpha_bar, max_beta 0.999), float64."""
    import math

    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)


class _Config(dict):
    """A sampler's settings, by key or attribute (as diffusers' FrozenDict configs are read)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _StepOutput(dict):
    """(prev_sample, pred_original_sample), by attribute, key or index (diffusers' output contract)."""

    def __init__(self, prev_sample, pred_original_sample):
        super().__init__(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
        self.prev_sample, self.pred_original_sample = prev_sample, pred_original_sample

    def __getitem__(self, key):
        return (self.prev_sample, self.pred_original_sample)[key] if isinstance(key, int) else super().__getitem__(key)


class KarloSampler:
    """Karlo's own ancestral sampler (its SpacedDiffusion.p_sample) behind the unCLIP scheduler interface the
    diffkern unCLIP pipelines call (set_timesteps / timesteps / step(model_output, t, sample, prev_timestep,
    generator, uncond_output=, guidance_scale=) / init_noise_sigma).

    set_timesteps(N): Karlo's respacing (karlo_spacing); the respaced betas 1 - abar_t / abar_prev and every
    coefficient derived from them in float64 (`coefficients`, numpy), rounded to float32 once per use, then
    applied in Karlo's order of float32 operations: guidance uncond + s * (cond - uncond) on the prediction
    channels (variance channels from the conditional half), x0 = c1 * x_t - c2 * eps (or the model's x0),
    clamped to [-clip_range, clip_range], mean = coef1 * x0 + coef2 * x_t, learned range
    log var = frac * log(beta) + (1 - frac) * posterior_log_variance_clipped, x = mean + exp(0.5 log var) * z
    (no noise at the last step). Noise z is drawn from `generator` as diffusers draws it (or variance_noise).
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, prediction_type="epsilon", variance_type="fixed_small_log", clip_range=1.0,
                 num_train_timesteps=1000):
        if prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"KarloSampler: prediction_type must be 'epsilon' or 'sample', got {prediction_type!r}")
        if variance_type not in ("fixed_small_log", "learned_range"):
            raise ValueError("KarloSampler: variance_type must be 'fixed_small_log' or 'learned_range', "
                             f"got {variance_type!r}")
        if clip_range is not None and not clip_range > 0:
            raise ValueError(f"KarloSampler: clip_range must be positive or None, got {clip_range!r}")
        self.prediction_type, self.variance_type, self.clip_range = prediction_type, variance_type, clip_range
        self.num_train_timesteps = num_train_timesteps
        self.base_betas = _karlo_cosine_betas(num_train_timesteps)
        self.base_alphas_cumprod = np.cumprod(1.0 - self.base_betas)
        self.alphas_cumprod = torch.from_numpy(self.base_alphas_cumprod).float()  # what DDIM inverters read
        self.config = _Config(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type,
                           variance_type=variance_type, clip_sample_range=clip_range, beta_schedule="squaredcos_cap_v2",
                           sampler="karlo")
        self.num_inference_steps = None
        self.set_timesteps(num_train_timesteps)

    def __repr__(self):
        return (f"KarloSampler(prediction_type={self.prediction_type!r}, variance_type={self.variance_type!r}, "
                f"clip_range={self.clip_range})")

    def set_timesteps(self, num_inference_steps, device=None):
        kept = karlo_spacing(self.num_train_timesteps, num_inference_steps)
        abar = self.base_alphas_cumprod[kept]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])  # SpacedDiffusion's new betas (float64)
        self.coefficients = _karlo_coefficients(betas)
        self.num_inference_steps = num_inference_steps
        self._index = {t: i for i, t in enumerate(kept)}
        self.timesteps = torch.tensor(kept[::-1], dtype=torch.int64, device=device)

    def _f32(self, name, i, like):
        return torch.tensor(float(self.coefficients[name][i]), dtype=torch.float32, device=like.device)

    def step(self, model_output, timestep, sample, prev_timestep=None, generator=None, return_dict=True, *,
             uncond_output=None, guidance_scale=1.0, variance_noise=None):
        t = int(timestep)
        if t not in self._index:
            raise ValueError(f"KarloSampler.step: timestep {t} is not one of the {self.num_inference_steps} kept "
                             "by set_timesteps")
        i = self._index[t]
        if prev_timestep is not None and (i == 0 or int(prev_timestep) != int(self.timesteps[-i])):
            raise ValueError(f"KarloSampler.step: prev_timestep {int(prev_timestep)} is not the step after {t}")
        C = sample.shape[1]
        learned = self.variance_type == "learned_range"
        if model_output.shape[1] != (2 * C if learned else C):
            raise ValueError(f"KarloSampler: model_output must have {2 * C if learned else C} channels for "
                             f"variance_type={self.variance_type!r}, got {model_output.shape[1]}")
        pred, rest = model_output[:, :C], model_output[:, C:]
        if uncond_output is not None:  # Karlo's guided_model_fn
            u = uncond_output[:, :C]
            scale = torch.full((pred.shape[0],) + (1,) * (pred.dim() - 1), float(guidance_scale),
                               dtype=torch.float32, device=pred.device)
            pred = u + scale * (pred - u)
        x = sample
        if learned:
            min_log = self._f32("posterior_log_variance_clipped", i, x)
            max_log = self._f32("log_betas", i, x)
            frac = (rest + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            log_var = self._f32("posterior_log_variance_clipped", i, x)
        if self.prediction_type == "sample":
            x0 = pred
        else:
            x0 = (self._f32("sqrt_recip_alphas_cumprod", i, x) * x
                  - self._f32("sqrt_recipm1_alphas_cumprod", i, x) * pred)
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        mean = self._f32("posterior_mean_coef1", i, x) * x0 + self._f32("posterior_mean_coef2", i, x) * x
        if i == 0:
            prev = mean
        else:
            if variance_noise is None:
                from diffkern.schedulers._base import randn_like_diffusers

                variance_noise = randn_like_diffusers(tuple(x.shape), generator, x.device, x.dtype)
            prev = mean + torch.exp(0.5 * log_var) * variance_noise
        prev = prev.to(sample.dtype)
        return _StepOutput(prev, x0) if return_dict else (prev, x0)


def _karlo_coefficients(betas):
    """GaussianDiffusion.__init__'s float64 arrays for `betas` (the respaced process)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:])) if len(betas) > 1 else \
        np.log(np.maximum(posterior_variance, 1e-20))
    return dict(betas=betas, alphas_cumprod=abar, sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1), posterior_variance=posterior_variance,
                posterior_log_variance_clipped=clipped, log_betas=np.log(betas),
                posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
                posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))


_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TEXT_PROJ = {"text_seq_proj.0": "encoder_hidden_states_proj", "text_seq_proj.1": "text_encoder_hidden_states_norm",
              "clip_tok_proj": "clip_extra_context_tokens_proj", "text_feat_proj": "embedding_proj",
              "clip_emb": "clip_image_embeddings_project_to_time_embeddings"}


def _deinterleave(t, parts, head_dim, what):
    """Rows laid out per head as [p_0 | p_1 | ...] (each head_dim wide) -> one tensor per part."""
    if t.shape[0] % (parts * head_dim):
        raise CheckpointError(f"{what}: {t.shape[0]} rows do not split into heads of {parts} x {head_dim}")
    heads = t.shape[0] // (parts * head_dim)
    split = t.reshape(heads, parts, head_dim, *t.shape[1:])
    return [split[:, i].reshape(heads * head_dim, *t.shape[1:]) for i in range(parts)]


class _Mapper:
    """Collects diffusers-layout tensors from an original state dict, remembering what it read."""

    def __init__(self, sd, prefix, what):
        self.sd, self.prefix, self.what = sd, prefix, what
        self.out, self.used, self.missing = {}, set(), []

    def get(self, key):
        full = self.prefix + key
        if full not in self.sd:
            self.missing.append(full)
            return None
        self.used.add(full)
        return self.sd[full]

    def copy(self, src, dst, params=("weight", "bias")):
        for p in params:
            t = self.get(f"{src}.{p}" if p else src)
            if t is not None:
                self.out[f"{dst}.{p}" if p else dst] = t

    def has(self, key):
        return self.prefix + key in self.sd

    def resnet(self, src, dst):
        for a, b in _RESNET.items():
            if a == "skip_connection" and not self.has(f"{src}.skip_connection.weight"):
                continue
            self.copy(f"{src}.{a}", f"{dst}.{b}")

    def attention(self, src, dst, head_dim):
        self.copy(f"{src}.norm", f"{dst}.group_norm")
        for name, parts, targets in (("qkv", 3, ("to_q", "to_k", "to_v")), ("encoder_kv", 2, ("add_k_proj",
                                                                                             "add_v_proj"))):
            w, b = self.get(f"{src}.{name}.weight"), self.get(f"{src}.{name}.bias")
            if w is None or b is None:
                continue
            w = w[:, :, 0] if w.dim() == 3 else w  # the original's 1x1 conv1d
            for target, wt, bt in zip(targets, _deinterleave(w, parts, head_dim, f"{self.what} {src}.{name}"),
                                      _deinterleave(b, parts, head_dim, f"{self.what} {src}.{name}")):
                self.out[f"{dst}.{target}.weight"], self.out[f"{dst}.{target}.bias"] = wt, bt
        w = self.get(f"{src}.proj_out.weight")
        if w is not None:
            self.out[f"{dst}.to_out.0.weight"] = w[:, :, 0] if w.dim() == 3 else w
        self.copy(f"{src}.proj_out", f"{dst}.to_out.0", ("bias",))


def convert_prior(state_dict, clip_stats, config=None):
    """Karlo prior state dict (`model.` keys) + (mean, std) -> (PriorTransformer state dict, keys read)."""
    from diffkern.models.unclip.prior import DEFAULTS

    cfg = dict(DEFAULTS, **(config or {}))
    m = _Mapper(state_dict, "model.", "prior")
    for a, b in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("clip_img_proj", "proj_in"), ("text_emb_proj", "embedding_proj"),
                 ("text_enc_proj", "encoder_hidden_states_proj"), ("final_ln", "norm_out"),
                 ("out_proj", "proj_to_clip_embeddings")):
        m.copy(a, b)
    m.copy("positional_embedding", "positional_embedding", (None,))
    m.copy("prd_emb", "prd_embedding", (None,))
    for i in range(cfg["num_layers"]):
        src, dst = f"transformer.resblocks.{i}", f"transformer_blocks.{i}"
        w, b = m.get(f"{src}.attn.c_qkv.weight"), m.get(f"{src}.attn.c_qkv.bias")
        if w is not None and b is not None:
            what = f"prior {src}.attn.c_qkv"
            for t, wt, bt in zip(("to_q", "to_k", "to_v"), _deinterleave(w, 3, cfg["attention_head_dim"], what),
                                 _deinterleave(b, 3, cfg["attention_head_dim"], what)):
                m.out[f"{dst}.attn1.{t}.weight"], m.out[f"{dst}.attn1.{t}.bias"] = wt, bt
        for a, bb in (("attn.c_proj", "attn1.to_out.0"), ("mlp.c_fc", "ff.net.0.proj"), ("mlp.c_proj", "ff.net.2"),
                      ("ln_1", "norm1"), ("ln_2", "norm3")):
            m.copy(f"{src}.{a}", f"{dst}.{bb}")
    mean, std = clip_stats
    m.out["clip_mean"], m.out["clip_std"] = mean.reshape(1, -1), std.reshape(1, -1)
    return m


def _unet(m, cfg, head_dim):
    """The ADM input/middle/output block walk, shaped by the diffusers config (block types, layers)."""
    m.copy("time_embed.0", "time_embedding.linear_1")
    m.copy("time_embed.2", "time_embedding.linear_2")
    m.copy("input_blocks.0.0", "conv_in")
    levels, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    k = 1
    for i, kind in enumerate(cfg["down_block_types"]):
        attn = "CrossAttn" in kind or kind.startswith("Attn")
        for j in range(layers):
            m.resnet(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}")
            if attn:
                m.attention(f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", head_dim)
            k += 1
        if i < levels - 1:
            m.resnet(f"input_blocks.{k}.0", f"down_blocks.{i}.downsamplers.0")
            k += 1
    mid_attn = cfg.get("mid_block_type") == "UNetMidBlock2DSimpleCrossAttn" or (
        cfg.get("mid_block_type", "UNetMidBlock2D") == "UNetMidBlock2D" and cfg.get("add_attention", True))
    m.resnet("middle_block.0", "mid_block.resnets.0")
    if mid_attn:
        m.attention("middle_block.1", "mid_block.attentions.0", head_dim)
    m.resnet(f"middle_block.{2 if mid_attn else 1}", "mid_block.resnets.1")
    k = 0
    for i, kind in enumerate(cfg["up_block_types"]):
        attn = "CrossAttn" in kind or kind.startswith("Attn")
        for j in range(layers + 1):
            m.resnet(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}")
            if attn:
                m.attention(f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", head_dim)
            k += 1
        if i < levels - 1:  # the upsampling ResBlock shares the level's last output block
            m.resnet(f"output_blocks.{k - 1}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0")
    m.copy("out.0", "conv_norm_out")
    m.copy("out.2", "conv_out")
    return m


def convert_decoder(state_dict, config=None):
    """Karlo decoder state dict -> (decoder _Mapper, text projection _Mapper), both diffusers layout."""
    cfg = dict(KARLO_DECODER, **(config or {}))
    unet = _unet(_Mapper(state_dict, "model.", "decoder"), cfg, cfg["attention_head_dim"])
    proj = _Mapper(state_dict, "model.", "decoder (text projection)")
    for a, b in _TEXT_PROJ.items():
        proj.copy(a, b)
    proj.copy("cf_param", "learned_classifier_free_guidance_embeddings", (None,))
    return unet, proj


def convert_super_res(state_dict, config=None):
    """Karlo improved-SR state dict -> (first-steps _Mapper, last-step _Mapper)."""
    cfg = dict(KARLO_SUPER_RES, **(config or {}))
    head_dim = cfg.get("attention_head_dim", 8)
    return (_unet(_Mapper(state_dict, "model_first_steps.", "super-res (first steps)"), cfg, head_dim),
            _unet(_Mapper(state_dict, "model_last_step.", "super-res (last step)"), cfg, head_dim))


def read_clip_stats(path):
    """(mean, std) of the CLIP image embeddings (ViT-L-14_stats.th), read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clip_stats: no such file: {path}")
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the CLIP stats ({type(e).__name__}: {e})") from e
    if isinstance(stats, dict) and "mean" in stats and "std" in stats:
        stats = (stats["mean"], stats["std"])
    if (not isinstance(stats, (tuple, list)) or len(stats) != 2
            or not all(isinstance(t, torch.Tensor) for t in stats)):
        raise CheckpointError(f"{path}: expected a (mean, std) pair of tensors, got {type(stats).__name__}")
    return tuple(t.float().reshape(-1) for t in stats)


def _build(cls, config, mappers, path, sd, dtype, device):
    """Instantiate `cls(config)` per mapper, check keys (one error listing all problems), load."""
    from diffkern.models.weights import key_problems, materialize, on_meta

    problems = []
    for m in mappers:
        if m.missing:
            problems.append(f"{m.what}: {len(m.missing)} missing from the file: {m.missing[:20]}")
    read = set().union(*(m.used for m in mappers))
    unexpected = sorted(k for k in sd if k not in read)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {unexpected[:20]}")
    models = []
    for m, klass, cfg in zip(mappers, cls, config):
        factory = lambda klass=klass, cfg=cfg: klass(**cfg)  # noqa: E731
        module = on_meta(factory, f"{path} ({m.what})")
        problems += key_problems(module, m.out, f"{m.what}")
        models.append((module, factory, m.out))
    if problems:
        raise CheckpointError(f"{path}: the checkpoint does not fit Karlo's layout:\n  " + "\n  ".join(problems))
    return [materialize(mod, fac, out, dtype=dtype, device=device) for mod, fac, out in models]


def _read(path, what):
    from diffkern.models.weights import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_karlo: {what} checkpoint not found: {path}")
    return read_state_dict(path)


def _clip_parts(clip, dtype, device):
    if isinstance(clip, dict) and "text_encoder" in clip and "tokenizer" in clip:
        return clip["text_encoder"], clip["tokenizer"]
    if isinstance(clip, (tuple, list)) and len(clip) == 2:
        return clip
    if isinstance(clip, (str, Path)) and Path(clip).is_dir():
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from diffkern.models.weights import reading

        # Karlo pads with "!" (id 0), as diffusers' conversion sets it; the padding mask hides it anyway.
        with reading(f"{clip} (CLIP tokenizer)"):
            tokenizer = CLIPTokenizer.from_pretrained(str(clip), pad_token="!", local_files_only=True)
        with reading(f"{clip} (CLIPTextModelWithProjection)"):
            encoder = CLIPTextModelWithProjection.from_pretrained(str(clip), local_files_only=True,
                                                                  dtype=dtype or "auto")
        return encoder.to(device).eval().requires_grad_(False), tokenizer
    raise ValueError("clip: expected a local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14), a "
                     f"(text_encoder, tokenizer) pair or a dict with those keys, got {clip!r}")


def load_karlo(prior_ckpt, decoder_ckpt, sr_ckpt, clip_stats, clip, *, dtype=None, device="cpu", prior_config=None,
               decoder_config=None, super_res_config=None):
    """An UnCLIPPipeline from Karlo's original files.

    Args:
        prior_ckpt, decoder_ckpt, sr_ckpt: the three .ckpt files (prior, decoder, improved SR).
        clip_stats: ViT-L-14_stats.th, the (mean, std) of CLIP image embeddings the prior was trained on.
        clip: the CLIP text tower: a local openai/clip-vit-large-patch14 folder, or (text_encoder, tokenizer).
        dtype, device: of the built models (None keeps the files' dtype).
        prior_config, decoder_config, super_res_config: overrides of the Karlo configs (tests use tiny ones).

    Raises FileNotFoundError naming a missing file, CheckpointError listing every key problem.
    """
    from diffkern.models.unclip import PriorTransformer, UnCLIPTextProjModel
    from diffkern.models.unet_2d import UNet2DModel
    from diffkern.models.unet_2d_condition import UNet2DConditionModel
    from diffkern.pipelines.unclip import UnCLIPPipeline

    stats = read_clip_stats(clip_stats)
    sd = _read(prior_ckpt, "prior")
    pcfg = dict(KARLO_PRIOR, **(prior_config or {}))
    (prior,) = _build([PriorTransformer], [pcfg], [convert_prior(sd, stats, pcfg)], prior_ckpt, sd, dtype, device)
    sd = _read(decoder_ckpt, "decoder")
    dcfg = dict(KARLO_DECODER, **(decoder_config or {}))
    proj_cfg = dict(clip_embeddings_dim=stats[0].numel(), time_embed_dim=dcfg["block_out_channels"][0] * 4,
                    cross_attention_dim=dcfg["cross_attention_dim"])
    decoder, text_proj = _build([UNet2DConditionModel, UnCLIPTextProjModel], [dcfg, proj_cfg],
                                list(convert_decoder(sd, dcfg)), decoder_ckpt, sd, dtype, device)
    sd = _read(sr_ckpt, "super-resolution")
    scfg = dict(KARLO_SUPER_RES, **(super_res_config or {}))
    first, last = _build([UNet2DModel, UNet2DModel], [scfg, scfg], list(convert_super_res(sd, scfg)), sr_ckpt, sd,
                         dtype, device)
    text_encoder, tokenizer = _clip_parts(clip, dtype, device)
    # Karlo's own sampling (KarloSampler), not the diffusers conversion's (UnCLIPScheduler(**KARLO_SCHEDULERS))
    schedulers = {k: KarloSampler(**v) for k, v in KARLO_SAMPLERS.items()}
    return UnCLIPPipeline(prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer,
                          text_proj=text_proj, super_res_first=first, super_res_last=last, **schedulers)
