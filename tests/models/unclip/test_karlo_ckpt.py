"""load_karlo on tiny files written in Karlo's original layout (from diffusers models' weights).

The original-layout writer below walks the diffusers modules (as diffusers' conversion script does) and
interleaves heads by stacking, while diffkern's reader walks the config and de-interleaves by reshaping:
two independent routes that must meet in the same weights, checked through the models' outputs.
"""

import pytest
import torch

from diffkern.models import CheckpointError
from diffkern.models.checkpoints.karlo import load_karlo, read_clip_stats
from tests.models._helpers import max_diff
from tests.pipelines._unclip import DECODER, SUPER_RES, diffkern_decoder_or_none, diffusers_components

diffusers = pytest.importorskip("diffusers")
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _interleave(tensors, head_dim):
    """[(H*d, ...)] per part -> rows per head [p0_h; p1_h; ...] (OpenAI's qkv layout)."""
    heads = tensors[0].shape[0] // head_dim
    return torch.stack([t.reshape(heads, head_dim, *t.shape[1:]) for t in tensors], 1).reshape(
        -1, *tensors[0].shape[1:])


def _put(out, prefix, module, names):
    for ours, theirs in names.items():
        sub = getattr(module, ours, None)
        if sub is not None:
            out[f"{prefix}.{theirs}.weight"] = sub.weight.detach().clone()
            out[f"{prefix}.{theirs}.bias"] = sub.bias.detach().clone()


def _attention(out, prefix, attn, head_dim):
    _put(out, prefix, attn, {"group_norm": "norm"})
    w = _interleave([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight], head_dim)
    out[f"{prefix}.qkv.weight"], out[f"{prefix}.qkv.bias"] = w[:, :, None], _interleave(
        [attn.to_q.bias, attn.to_k.bias, attn.to_v.bias], head_dim)
    w = _interleave([attn.add_k_proj.weight, attn.add_v_proj.weight], head_dim)
    out[f"{prefix}.encoder_kv.weight"], out[f"{prefix}.encoder_kv.bias"] = w[:, :, None], _interleave(
        [attn.add_k_proj.bias, attn.add_v_proj.bias], head_dim)
    out[f"{prefix}.proj_out.weight"] = attn.to_out[0].weight[:, :, None].clone()
    out[f"{prefix}.proj_out.bias"] = attn.to_out[0].bias.clone()


def original_unet(unet, prefix, head_dim):
    out = {}
    _put(out, prefix, unet.time_embedding, {"linear_1": "time_embed.0", "linear_2": "time_embed.2"})
    _put(out, prefix, unet, {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"})
    k = 1
    for block in unet.down_blocks:
        for j, resnet in enumerate(block.resnets):
            _put(out, f"{prefix}.input_blocks.{k}.0", resnet, RESNET)
            if getattr(block, "attentions", None):
                _attention(out, f"{prefix}.input_blocks.{k}.1", block.attentions[j], head_dim)
            k += 1
        if block.downsamplers:
            _put(out, f"{prefix}.input_blocks.{k}.0", block.downsamplers[0], RESNET)
            k += 1
    mid = unet.mid_block
    _put(out, f"{prefix}.middle_block.0", mid.resnets[0], RESNET)
    has_attn = getattr(mid, "attentions", None) and mid.attentions[0] is not None
    if has_attn:
        _attention(out, f"{prefix}.middle_block.1", mid.attentions[0], head_dim)
    _put(out, f"{prefix}.middle_block.{2 if has_attn else 1}", mid.resnets[1], RESNET)
    k = 0
    for block in unet.up_blocks:
        attn = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            _put(out, f"{prefix}.output_blocks.{k}.0", resnet, RESNET)
            if attn:
                _attention(out, f"{prefix}.output_blocks.{k}.1", attn[j], head_dim)
            k += 1
        if block.upsamplers:
            _put(out, f"{prefix}.output_blocks.{k - 1}.{2 if attn else 1}", block.upsamplers[0], RESNET)
    return out


def original_prior(prior):
    out, d = {}, prior.config.attention_head_dim
    _put(out, "model", prior, {"proj_in": "clip_img_proj", "embedding_proj": "text_emb_proj",
                               "encoder_hidden_states_proj": "text_enc_proj", "norm_out": "final_ln",
                               "proj_to_clip_embeddings": "out_proj"})
    _put(out, "model", prior.time_embedding, {"linear_1": "time_embed.0", "linear_2": "time_embed.2"})
    out["model.positional_embedding"] = prior.positional_embedding.detach().clone()
    out["model.prd_emb"] = prior.prd_embedding.detach().clone()
    for i, block in enumerate(prior.transformer_blocks):
        p, a = f"model.transformer.resblocks.{i}", block.attn1
        out[f"{p}.attn.c_qkv.weight"] = _interleave([a.to_q.weight, a.to_k.weight, a.to_v.weight], d)
        out[f"{p}.attn.c_qkv.bias"] = _interleave([a.to_q.bias, a.to_k.bias, a.to_v.bias], d)
        _put(out, p, a.to_out, {"0": "attn.c_proj"})
        _put(out, p, block.ff.net[0], {"proj": "mlp.c_fc"})
        _put(out, p, block.ff.net, {"2": "mlp.c_proj"})
        _put(out, p, block, {"norm1": "ln_1", "norm3": "ln_2"})
    return out


def original_text_proj(tp):
    out = {"model.cf_param": tp.learned_classifier_free_guidance_embeddings.detach().clone()}
    _put(out, "model", tp, {"encoder_hidden_states_proj": "text_seq_proj.0",
                            "text_encoder_hidden_states_norm": "text_seq_proj.1",
                            "clip_extra_context_tokens_proj": "clip_tok_proj", "embedding_proj": "text_feat_proj",
                            "clip_image_embeddings_project_to_time_embeddings": "clip_emb"})
    return out


@pytest.fixture(scope="module")
def karlo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("karlo_ckpt")
    c = diffusers_components(root)
    if diffkern_decoder_or_none(c["decoder"]) is None:
        pytest.skip("diffkern's UNet2DConditionModel does not build the unCLIP decoder yet")
    head = DECODER["attention_head_dim"]
    files = {"prior": root / "prior.ckpt", "decoder": root / "decoder.ckpt", "sr": root / "sr.ckpt",
             "stats": root / "ViT-L-14_stats.th"}
    with torch.no_grad():
        torch.save({"state_dict": original_prior(c["prior"]), "global_step": 1}, files["prior"])
        dec = {**original_unet(c["decoder"], "model", head), **original_text_proj(c["text_proj"])}
        torch.save({"state_dict": dec}, files["decoder"])
        sr = {**original_unet(c["super_res_first"], "model_first_steps", 8),
              **original_unet(c["super_res_last"], "model_last_step", 8)}
        torch.save({"state_dict": sr}, files["sr"])
        torch.save((c["prior"].clip_mean[0].clone(), c["prior"].clip_std[0].clone()), files["stats"])
    return files, c


def _load(files, c, **kw):
    prior_cfg = dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1)
    return load_karlo(files["prior"], files["decoder"], files["sr"], files["stats"], clip=(c["text_encoder"],
                      c["tokenizer"]), prior_config=prior_cfg, decoder_config=DECODER, super_res_config=SUPER_RES,
                      **kw)


def test_load_karlo_matches_the_diffusers_models(karlo_files):
    files, c = karlo_files
    pipe = _load(files, c)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x, proj, text = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g), torch.randn(2, 77, 32,
                                                                                                        generator=g)
        mask = torch.ones(2, 77, dtype=torch.bool)
        mask[0, 9:] = False
        assert max_diff(pipe.prior(x, 500, proj, text, mask)[0], c["prior"](x, 500, proj, text, mask)[0]) < 1e-5
        assert torch.equal(pipe.prior.clip_std, c["prior"].clip_std)
        kw = dict(image_embeddings=x, prompt_embeds=proj, text_encoder_hidden_states=text[:, :7],
                  do_classifier_free_guidance=False)
        for a, b in zip(pipe.text_proj(**kw), c["text_proj"](**kw)):
            assert max_diff(a, b) < 1e-6
        ctx, temb = c["text_proj"](**kw)
        ctx_mask = torch.ones(2, ctx.shape[1], dtype=torch.bool)
        ctx_mask[1, 6:] = False
        s = torch.randn(2, 3, 16, 16, generator=g)
        want = c["decoder"](s, 321, encoder_hidden_states=ctx, class_labels=temb, attention_mask=ctx_mask).sample
        got = pipe.decoder(sample=s, timestep=321, encoder_hidden_states=ctx, class_labels=temb,
                           attention_mask=ctx_mask)
        assert max_diff(getattr(got, "sample", got), want) < 1e-4
        s6 = torch.randn(1, 6, 32, 32, generator=g)
        for ours, ref in ((pipe.super_res_first, c["super_res_first"]), (pipe.super_res_last, c["super_res_last"])):
            assert max_diff(ours(s6, 999).sample, ref(s6, 999).sample) < 1e-4
    # original files sample as Karlo's code does (x0 clamp 10, float64 coefficients; test_karlo_sampling.py)
    assert type(pipe.prior_scheduler).__name__ == "KarloSampler"
    assert pipe.prior_scheduler.config.clip_sample_range == 10.0
    assert pipe.decoder_scheduler.config.variance_type == "learned_range"


def test_key_problems_are_listed(karlo_files, tmp_path):
    files, c = karlo_files
    sd = torch.load(files["prior"], weights_only=True)["state_dict"]
    sd.pop("model.prd_emb")
    sd["model.transformer.resblocks.0.ln_1.weight"] = torch.zeros(5)
    sd["model.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "prior.ckpt"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(CheckpointError) as err:
        _load({**files, "prior": bad}, c)
    msg = str(err.value)
    assert "model.prd_emb" in msg and "model.extra.weight" in msg and "norm1.weight" in msg


def test_missing_files_and_bad_stats(karlo_files, tmp_path):
    files, c = karlo_files
    with pytest.raises(FileNotFoundError, match="decoder"):
        _load({**files, "decoder": tmp_path / "nope.ckpt"}, c)
    (tmp_path / "stats.th").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="stats"):
        read_clip_stats(tmp_path / "stats.th")
    with pytest.raises(ValueError, match="clip"):
        load_karlo(files["prior"], files["decoder"], files["sr"], files["stats"], clip=42,
                   prior_config=dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1),
                   decoder_config=DECODER, super_res_config=SUPER_RES)
