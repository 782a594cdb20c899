"""GLIDE's ADM blocks against float64 versions of OpenAI's equations and against contiguous-layout
attention modules whose weights are permuted into OpenAI's interleaved qkv layout."""

import math

import pytest
import torch
import torch.nn.functional as F

import diffkern
from diffkern.models.glide.blocks import AttentionBlock, ResBlock, timestep_embedding
from tests.models._helpers import BACKENDS, backend_context, max_diff, randomise

TOL = 1e-4  # float32 module vs float64 equations: a few float32 roundings over sums of <= ~600 terms


def _d(t):
    return t.detach().double()


def _group_norm(x, norm):
    return F.group_norm(x, 32, _d(norm.weight), _d(norm.bias), 1e-5)


def _conv(x, conv):
    return F.conv2d(x, _d(conv.weight), _d(conv.bias), stride=conv.stride, padding=conv.padding)


def _conv1x1(x, conv):
    """Conv1d with kernel 1 on (B, Cin, L), written as a matrix product."""
    return torch.einsum("oc,bcl->bol", _d(conv.weight)[:, :, 0], x) + _d(conv.bias)[None, :, None]


def attention_block_f64(block, x, enc=None):
    """OpenAI's AttentionBlock from the equations, in float64, one head at a time with explicit
    per-head interleaved slices and encoder keys concatenated first."""
    x = x.double()
    B, C, H, W = x.shape
    heads, ch = block.num_heads, C // block.num_heads
    qkv = _conv1x1(_group_norm(x, block.norm).reshape(B, C, H * W), block.qkv)
    ekv = None if enc is None else _conv1x1(enc.double(), block.encoder_kv)
    out = torch.empty(B, C, H * W, dtype=torch.float64)
    for b in range(B):
        for h in range(heads):
            base = 3 * ch * h
            q, k, v = (qkv[b, base + j * ch:base + (j + 1) * ch] for j in range(3))
            if ekv is not None:
                ek, ev = ekv[b, 2 * ch * h:2 * ch * h + ch], ekv[b, 2 * ch * h + ch:2 * ch * (h + 1)]
                k, v = torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
            weights = torch.softmax(q.T @ k / math.sqrt(ch), dim=-1)  # (T, S)
            out[b, h * ch:(h + 1) * ch] = v @ weights.T
    return x + _conv1x1(out, block.proj_out).reshape(B, C, H, W)


def resblock_f64(block, x, emb, up=False, down=False):
    """OpenAI's ResBlock from the equations, in float64."""
    x, emb = x.double(), emb.double()
    h = F.silu(_group_norm(x, block.in_layers[0]))
    if up:
        h, x = (F.interpolate(t, scale_factor=2, mode="nearest") for t in (h, x))
    if down:
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = _conv(h, block.in_layers[2])
    lin = block.emb_layers[1]
    e = (F.silu(emb) @ _d(lin.weight).T + _d(lin.bias))[:, :, None, None]
    norm = block.out_layers[0]
    if block.use_scale_shift_norm:
        scale, shift = e.chunk(2, dim=1)
        h = _group_norm(h, norm) * (1 + scale) + shift
    else:
        h = _group_norm(h + e, norm)
    h = _conv(F.silu(h), block.out_layers[3])
    skip = block.skip_connection
    x = x if isinstance(skip, torch.nn.Identity) else _conv(x, skip)
    return x + h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,head_channels,text_len", [(1, -1, None), (2, -1, 5), (1, 16, 7)])
def test_attention_block_matches_f64_equations(backend, heads, head_channels, text_len):
    torch.manual_seed(0)
    C, enc_width = 64, 24
    block = randomise(AttentionBlock(C, num_heads=heads, num_head_channels=head_channels,
                                     encoder_channels=enc_width if text_len else None))
    x = 1 + torch.randn(2, C, 5, 3)
    enc = torch.randn(2, enc_width, text_len) if text_len else None
    with backend_context(backend), torch.no_grad():
        got = block(x, enc)
    assert max_diff(got, attention_block_f64(block, x, enc)) < TOL


def _interleave(weight, parts, heads):
    """Rows laid out [part_0 | part_1 | ...] (each heads x ch) -> OpenAI's per head [p_0 | p_1 | ...]."""
    ch = weight.shape[0] // parts // heads
    return weight.reshape(parts, heads, ch, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def test_attention_block_loads_interleaved_layout_of_torch_multihead_attention():
    """torch.nn.MultiheadAttention (in_proj laid out [q | k | v]) as the external truth: its weights,
    permuted into OpenAI's per-head interleaved qkv layout and loaded, give the same outputs."""
    torch.manual_seed(1)
    C, heads = 64, 4
    mha = randomise(torch.nn.MultiheadAttention(C, heads, batch_first=True))
    block = randomise(AttentionBlock(C, num_heads=heads))
    state = {k: v for k, v in block.state_dict().items() if k.startswith("norm.")}
    state["qkv.weight"] = _interleave(mha.in_proj_weight.detach(), 3, heads)[:, :, None]
    state["qkv.bias"] = _interleave(mha.in_proj_bias.detach(), 3, heads)
    state["proj_out.weight"] = mha.out_proj.weight.detach()[:, :, None]
    state["proj_out.bias"] = mha.out_proj.bias.detach()
    block.load_state_dict(state)
    x = torch.randn(2, C, 4, 5)
    with torch.no_grad():
        tokens = block.norm(x).flatten(2).transpose(1, 2)
        want = x + mha(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
        assert max_diff(block(x), want) < TOL


def test_attention_block_loads_interleaved_layout_of_prefix_attention():
    """diffkern.nn.Attention (to_qkv [q | k | v], to_prefix_kv [k | v]) with its weights permuted into
    OpenAI's interleaved qkv / encoder_kv layout gives identical outputs with text tokens."""
    torch.manual_seed(2)
    C, heads, enc_width = 64, 2, 24
    ref = randomise(diffkern.nn.Attention(C, heads=heads, dim_head=C // heads, fused_qkv=True,
                                          prefix_dim=enc_width, qkv_bias=True))
    block = randomise(AttentionBlock(C, num_heads=heads, encoder_channels=enc_width))
    state = {k: v for k, v in block.state_dict().items() if k.startswith("norm.")}
    state.update({
        "qkv.weight": _interleave(ref.to_qkv.weight.detach(), 3, heads)[:, :, None],
        "qkv.bias": _interleave(ref.to_qkv.bias.detach(), 3, heads),
        "encoder_kv.weight": _interleave(ref.to_prefix_kv.weight.detach(), 2, heads)[:, :, None],
        "encoder_kv.bias": _interleave(ref.to_prefix_kv.bias.detach(), 2, heads),
        "proj_out.weight": ref.to_out[0].weight.detach()[:, :, None],
        "proj_out.bias": ref.to_out[0].bias.detach(),
    })
    block.load_state_dict(state)
    x, enc = torch.randn(2, C, 3, 3), torch.randn(2, enc_width, 6)
    with torch.no_grad():
        tokens = block.norm(x).flatten(2).transpose(1, 2)
        want = x + ref(tokens, prefix=enc.transpose(1, 2)).transpose(1, 2).reshape(x.shape)
        assert max_diff(block(x, enc), want) < TOL


def test_attention_block_rejects_text_without_encoder_kv():
    with pytest.raises(ValueError, match="encoder_out"):
        AttentionBlock(32)(torch.randn(1, 32, 2, 2), torch.randn(1, 8, 3))


@pytest.mark.parametrize("scale_shift", [True, False])
@pytest.mark.parametrize("cin,cout,updown",
                         [(32, 64, None), (64, 64, "up"), (64, 64, "down"), (32, 32, None)])
def test_resblock_matches_f64_equations(scale_shift, cin, cout, updown):
    torch.manual_seed(3)
    emb_ch = 16
    block = randomise(ResBlock(cin, emb_ch, dropout=0.5, out_channels=cout, use_scale_shift_norm=scale_shift,
                               up=updown == "up", down=updown == "down"))
    x, emb = 2 + torch.randn(2, cin, 6, 4), torch.randn(2, emb_ch)
    with torch.no_grad():
        got = block(x, emb)
    want = resblock_f64(block, x, emb, up=updown == "up", down=updown == "down")
    assert got.shape == want.shape
    assert max_diff(got, want) < TOL


def test_resblock_state_dict_keys():
    keys = set(ResBlock(32, 16, 0.0, out_channels=64, use_scale_shift_norm=True, down=True).state_dict())
    assert keys == {f"{m}.{p}" for m in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0",
                                         "out_layers.3", "skip_connection") for p in ("weight", "bias")}


def test_timestep_embedding_is_openais_cos_then_sin():
    t = torch.tensor([0.0, 3.0, 999.0])
    dim, half = 7, 3
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args), torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    assert max_diff(timestep_embedding(t, dim), want) < 1e-4
