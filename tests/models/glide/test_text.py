"""GLIDE's text transformer and text conditioning against float64 versions of OpenAI's equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffkern.models.glide import create_model
from diffkern.models.glide.blocks import timestep_embedding
from diffkern.models.glide.text import Transformer
from tests.models._helpers import BACKENDS, backend_context, max_diff, randomise

TOL = 1e-4  # float32 modules vs float64 equations


def _d(t):
    return t.detach().double()


def _linear(x, lin):
    return x @ _d(lin.weight).T + _d(lin.bias)


def _layer_norm(x, ln):
    return F.layer_norm(x, (x.shape[-1],), _d(ln.weight), _d(ln.bias), 1e-5)


def transformer_f64(xf, x):
    """OpenAI's xf.Transformer from the equations, in float64: per head h, c_qkv's outputs
    [3 ch h, 3 ch (h+1)) are [q_h | k_h | v_h]; full (unmasked, non-causal) softmax attention."""
    x = x.double()
    B, T, W = x.shape
    for blk in xf.resblocks:
        heads = blk.attn.heads
        ch = W // heads
        qkv = _linear(_layer_norm(x, blk.ln_1), blk.attn.c_qkv)
        att = torch.empty(B, T, W, dtype=torch.float64)
        for h in range(heads):
            base = 3 * ch * h
            q, k, v = (qkv[..., base + j * ch:base + (j + 1) * ch] for j in range(3))
            att[..., h * ch:(h + 1) * ch] = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(ch), dim=-1) @ v
        x = x + _linear(att, blk.attn.c_proj)
        x = x + _linear(F.gelu(_linear(_layer_norm(x, blk.ln_2), blk.mlp.c_fc)), blk.mlp.c_proj)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_matches_f64_equations(backend):
    torch.manual_seed(0)
    xf = randomise(Transformer(n_ctx=9, width=48, layers=2, heads=3))
    x = torch.randn(2, 9, 48)
    with backend_context(backend), torch.no_grad():
        got = xf(x)
    assert max_diff(got, transformer_f64(xf, x)) < TOL


def test_transformer_state_dict_keys():
    keys = set(Transformer(4, 32, 1, 2).state_dict())
    assert keys == {f"resblocks.0.{m}.{p}" for m in ("ln_1", "attn.c_qkv", "attn.c_proj", "ln_2", "mlp.c_fc",
                                                     "mlp.c_proj") for p in ("weight", "bias")}


def _tiny(**changes):
    options = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                   attention_resolutions="16,8", num_head_channels=16, dropout=0.0, text_ctx=6, xf_width=32,
                   xf_layers=2, xf_heads=2, use_fp16=False)
    options.update(changes)
    torch.manual_seed(0)
    return randomise(create_model(**options))


def test_encode_text_padding_embedding_and_last_token_projection():
    """Positions where mask is False carry padding_embedding (whatever their token id), and the last
    position's transformer output, projected, is xf_proj."""
    model = _tiny()
    tokens = torch.randint(0, 50257, (2, 6))
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    with torch.no_grad():
        xf_proj, xf_out = model.encode_text(tokens, mask)
        xf_in = _d(model.token_embedding.weight)[tokens] + _d(model.positional_embedding)[None]
        xf_in = torch.where(mask[..., None], xf_in, _d(model.padding_embedding)[None])
        want = _layer_norm(transformer_f64(model.transformer, xf_in), model.final_ln)
        assert xf_out.shape == (2, 32, 6)  # (B, xf_width, text_ctx): the AttentionBlocks' encoder_out
        assert max_diff(xf_out, want.transpose(1, 2)) < TOL
        assert max_diff(xf_proj, _linear(want[:, -1], model.transformer_proj)) < TOL
        # Masked-out token ids do not matter.
        other = tokens.clone()
        other[0, 3:] = (other[0, 3:] + 1) % 50257
        assert torch.equal(model.encode_text(other, mask)[1], xf_out)


def test_text_projection_is_added_to_the_time_embedding():
    """forward == the torso run on time_embed(t) + xf_proj with xf_out as every block's text."""
    model = _tiny()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    tokens, mask = torch.randint(0, 50257, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        xf_proj, xf_out = model.encode_text(tokens, mask)
        emb = model.time_embed(timestep_embedding(t, 32)) + xf_proj
        assert torch.equal(model(x, t, tokens, mask), model._torso(x, emb, xf_out))


def test_no_padding_embedding_without_xf_padding():
    model = _tiny(xf_padding=False)
    assert not hasattr(model, "padding_embedding")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randint(0, 50257, (1, 6)))
    assert out.shape == (1, 6, 16, 16)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.zeros(1, 6, dtype=torch.long)), "mask"),
    (lambda m: m(torch.randn(1, 3, 16, 16), torch.tensor([1])), "tokens"),
    (lambda m: m.encode_text(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5).bool()), "tokens"),
    (lambda m: m.encode_text(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 5).bool()), "mask"),
])
def test_text_input_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(_tiny())
