"""Tiny random-weight unCLIP components (diffusers layouts), built offline and seeded.

Sizes follow diffusers' own unCLIP pipeline tests, shrunk: CLIP width 32, a 1-layer prior, a 16x16
decoder and a 32x32 super-resolution stage, so a full pipeline runs in about a second.
"""

from __future__ import annotations

import torch

from tests.models._helpers import randomise
from tests.pipelines import clip_tokenizer

CLIP_DIM = 32
DECODER = dict(sample_size=16, in_channels=3, out_channels=6,
               down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
               up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
               cross_attention_dim=CLIP_DIM, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
               class_embed_type="identity", norm_num_groups=4)
SUPER_RES = dict(sample_size=32, layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",) * 2,
                 up_block_types=("ResnetUpsampleBlock2D",) * 2, block_out_channels=(8, 16), in_channels=6,
                 out_channels=3, add_attention=False, norm_num_groups=4)


def clip_text(seed=0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=CLIP_DIM,
                         projection_dim=CLIP_DIM, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                         num_hidden_layers=2, vocab_size=128, max_position_embeddings=77)
    return CLIPTextModelWithProjection(cfg).eval()


def clip_vision(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=CLIP_DIM, projection_dim=CLIP_DIM, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, intermediate_size=37, patch_size=8)
    return CLIPVisionModelWithProjection(cfg).eval()


def feature_extractor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=32, size=32)


def diffusers_components(tmp_path, seed=0):
    """The components of diffusers' UnCLIPPipeline (randomised so every weight matters)."""
    import diffusers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(seed)
    prior = randomise(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12,
                                                 embedding_dim=CLIP_DIM, num_layers=1), seed + 1)
    with torch.no_grad():  # clip_std 0 would collapse every embedding onto clip_mean
        prior.clip_std.abs_().add_(1.0)
    decoder = randomise(diffusers.UNet2DConditionModel(**DECODER), seed + 2, scale=0.05)
    text_proj = randomise(UnCLIPTextProjModel(clip_embeddings_dim=CLIP_DIM, time_embed_dim=64,
                                              cross_attention_dim=CLIP_DIM), seed + 3)
    sr_first = randomise(diffusers.UNet2DModel(**SUPER_RES), seed + 4, scale=0.05)
    sr_last = randomise(diffusers.UNet2DModel(**SUPER_RES), seed + 5, scale=0.05)
    return dict(prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=clip_text(seed),
                tokenizer=clip_tokenizer(tmp_path / "tokenizer"), super_res_first=sr_first, super_res_last=sr_last,
                prior_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                          num_train_timesteps=1000, clip_sample_range=5.0),
                decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range",
                                                            prediction_type="epsilon", num_train_timesteps=1000),
                super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log",
                                                              prediction_type="epsilon", num_train_timesteps=1000))


def diffkern_decoder_or_none(decoder):
    """diffkern's conversion of the unCLIP decoder, or None while diffkern's UNet lacks its blocks."""
    from diffkern.models import from_diffusers

    try:
        return from_diffusers(decoder)
    except (ValueError, TypeError):
        return None


class ModelInputs:
    """Records the first input of every call of the given models (a stage's x_t at each step, before
    any clamping), so a parity test also sees stages whose final output saturates at random weights."""

    def __init__(self, **models):
        self.models, self.seen, self.handles = models, {k: [] for k in models}, []

    def __enter__(self):
        for name, model in self.models.items():
            def hook(module, args, kwargs, name=name):
                x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                self.seen[name].append(x.detach().clone())
            self.handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        return self.seen

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def stage_models(pipe, names=("prior", "decoder", "super_res_first", "super_res_last")):
    return {n: getattr(pipe, n) for n in names if hasattr(pipe, n)}


def max_stage_diff(want, got):
    """Largest |difference| over every recorded model input, per stage (the call counts must agree)."""
    out = {}
    for name in want:
        assert len(want[name]) == len(got[name]), (name, len(want[name]), len(got[name]))
        out[name] = max((a.double() - b.double()).abs().max().item() for a, b in zip(want[name], got[name]))
    return out


MODEL_NAMES = ("prior", "decoder", "text_encoder", "text_proj", "image_encoder", "super_res_first", "super_res_last")


def in_float64(pipe):
    """A shallow copy of `pipe` whose models are float64 copies (schedulers, tokenizer shared).

    Why: the first reverse step (t = 999) divides by sqrt(alpha_bar_999) ~ 6e-3, so float32 rounding
    differences of 1e-6 in a model output become ~1e-2 in the few elements of x0 that the clip to
    [-1, 1] leaves alone; in float64 every stage of the two pipelines must agree to ~1e-12."""
    import copy

    twin = copy.copy(pipe)
    done = {}
    for name in MODEL_NAMES:
        model = getattr(pipe, name, None)
        if model is not None:
            if id(model) not in done:
                done[id(model)] = copy.deepcopy(model).double()
            setattr(twin, name, done[id(model)])
    return twin


def check_parity(ref, ours, dtype, call):
    """Run `call(pipe)` on both; fp32: final images within 1e-3; fp64: every stage's model inputs and
    the images within 1e-8. Returns the float32/64 images of ours."""
    import numpy as np

    if dtype == torch.float64:
        ref, ours = in_float64(ref), in_float64(ours)
    with ModelInputs(**stage_models(ref)) as seen_ref:
        want = call(ref)
    with ModelInputs(**stage_models(ours)) as seen:
        got = call(ours)
    assert got.shape == want.shape
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    assert np.abs(got.astype(np.float64) - want.astype(np.float64)).max() < tol
    if dtype == torch.float64:
        diffs = max_stage_diff(seen_ref, seen)
        assert max(diffs.values()) < 1e-8, diffs
    return got, seen
