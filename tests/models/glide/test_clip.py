"""GLIDE's noised CLIP: OpenAI's key layout, shapes, and the embeddings and CLIP-guidance gradient
against an independent float64 computation (OpenAI's padded block attention with -1e10 masks)."""

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffkern.models.glide.clip import CLIP_CONFIG, create_clip_model
from diffkern.models.glide.diffusion import create_gaussian_diffusion

F64 = torch.float64
TINY = dict(image_size=8, patch_size=4, n_vocab=50, max_text_len=7, n_embd=6, n_head_state_text=4, n_head_text=2,
            n_xf_blocks_text=2, n_head_state_image=4, n_head_image=3, n_xf_blocks_image=2, n_timesteps=20)


def expected_keys(input_keys, n_blocks, n_state, n_embd):
    keys = dict(input_keys)
    for i in range(n_blocks):
        p = f"blocks.block_{i}."
        for name in ("f_attn.ln", "f_mlp.ln"):
            keys[p + name + ".g"] = keys[p + name + ".b"] = (n_state,)
        for name in ("f_q", "f_k", "f_v", "f_c"):
            keys[p + f"f_attn.{name}.w"] = (n_state, n_state)
            if name != "f_k":  # OpenAI's key projection has no bias
                keys[p + f"f_attn.{name}.b"] = (n_state,)
        keys.update({p + "f_mlp.f_1.w": (4 * n_state, n_state), p + "f_mlp.f_1.b": (4 * n_state,),
                     p + "f_mlp.f_2.w": (n_state, 4 * n_state), p + "f_mlp.f_2.b": (n_state,)})
    keys.update({"blocks.output.ln.g": (n_state,), "blocks.output.ln.b": (n_state,), "blocks.output.f.w": (n_embd, n_state)})
    return keys


def test_default_config_key_layout():
    assert CLIP_CONFIG["image_size"] == 64 and CLIP_CONFIG["patch_size"] == 4 and CLIP_CONFIG["max_text_len"] == 77
    with torch.device("meta"):
        clip = create_clip_model()
    image = {k: tuple(v.shape) for k, v in clip.image_encoder.state_dict().items()}
    text = {k: tuple(v.shape) for k, v in clip.text_encoder.state_dict().items()}
    assert image == expected_keys({"blocks.input.w_t": (1000, 768), "blocks.input.patch_proj": (768, 3, 4, 4),
                                   "blocks.input.w_pos": (257, 768), "blocks.input.ln.g": (768,),
                                   "blocks.input.ln.b": (768,)}, 12, 768, 512)
    assert text == expected_keys({"blocks.input.w_voc": (65536, 512), "blocks.input.w_pos": (77, 512)}, 12, 512, 512)
    assert len(image) == 188 and len(text) == 185


def tiny_clip(seed=0, dtype=F64):
    torch.manual_seed(seed)
    clip = create_clip_model(dtype=dtype, **TINY)
    with torch.no_grad():  # trained-looking LayerNorms and biases, not ones and zeros
        for name, p in clip.named_parameters():
            if name.endswith((".g", ".b")):
                p.add_(torch.randn_like(p) * 0.1)
    return clip


def test_tiny_forward_shapes():
    clip = tiny_clip(dtype=torch.float32)
    z = clip.image_embeddings(torch.rand(3, 3, 8, 8) * 2 - 1, torch.tensor([0, 5, 19]))
    assert z.shape == (3, 6) and torch.allclose(z.norm(dim=-1), torch.ones(3))
    tokens = torch.randint(0, 50, (2, 7))
    assert clip.text_embeddings(tokens=tokens, lengths=torch.tensor([3, 7])).shape == (2, 6)
    with pytest.raises(ValueError, match="t must be"):
        clip.image_encoder(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images must be"):
        clip.image_embeddings(torch.zeros(1, 3, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="tokenizer"):
        clip.text_embeddings(["a corgi"])
    with pytest.raises(TypeError, match="unknown options"):
        create_clip_model(n_layers=3)


# -- independent float64 computation -------------------------------------------------------------------

def ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".g"], sd[p + ".b"], 1e-5)


def blocks(h, sd, n_blocks, n_heads, causal):
    """OpenAI's way: pad to a multiple of 32, attend with a -1e10 bias on padded (and future) keys."""
    B, n, W = h.shape
    N = 32 * math.ceil(n / 32)
    keep = torch.zeros(N, N, dtype=torch.bool)
    keep[:, :n] = True
    if causal:
        keep &= torch.ones(N, N, dtype=torch.bool).tril()
    bias = torch.where(keep, 0.0, -1e10).to(F64)
    d = W // n_heads
    for i in range(n_blocks):
        p = f"blocks.block_{i}."
        r = ln(h, sd, p + "f_attn.ln")
        q = r @ sd[p + "f_attn.f_q.w"].T + sd[p + "f_attn.f_q.b"]
        k = r @ sd[p + "f_attn.f_k.w"].T
        v = r @ sd[p + "f_attn.f_v.w"].T + sd[p + "f_attn.f_v.b"]
        q, k, v = (F.pad(t, (0, 0, 0, N - n)).view(B, N, n_heads, d).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax((q * d**-0.25) @ (k * d**-0.25).transpose(-1, -2) + bias, dim=-1)
        a = (w @ v).transpose(1, 2).reshape(B, N, W)[:, :n]
        h = h + a @ sd[p + "f_attn.f_c.w"].T + sd[p + "f_attn.f_c.b"]
        r = ln(h, sd, p + "f_mlp.ln")
        r = F.gelu(r @ sd[p + "f_mlp.f_1.w"].T + sd[p + "f_mlp.f_1.b"]) @ sd[p + "f_mlp.f_2.w"].T + sd[p + "f_mlp.f_2.b"]
        h = h + r
    return h


def ref_image_embedding(sd, x, t):
    # OpenAI keeps CLIP's pixel statistics as float32 tensors: their rounded values are the constants
    means = torch.tensor([122.77093945, 116.74601272, 104.09373519]).to(F64).view(1, 3, 1, 1)
    stds = torch.tensor([68.50053285, 66.63215831, 70.32316309]).to(F64).view(1, 3, 1, 1)
    pix = ((x + 1) * 127.5 - means) / stds
    patches = F.conv2d(pix, sd["blocks.input.patch_proj"], stride=TINY["patch_size"]).flatten(2).transpose(1, 2)
    h = torch.cat([sd["blocks.input.w_t"][t][:, None], patches], 1) + sd["blocks.input.w_pos"]
    h = blocks(ln(h, sd, "blocks.input.ln"), sd, TINY["n_xf_blocks_image"], TINY["n_head_image"], causal=False)
    z = ln(h[:, 0], sd, "blocks.output.ln") @ sd["blocks.output.f.w"].T
    return z / (z.norm(dim=-1, keepdim=True) + 1e-12)


def ref_text_embedding(sd, tokens, lengths):
    h = sd["blocks.input.w_voc"][tokens] + sd["blocks.input.w_pos"]
    h = blocks(h, sd, TINY["n_xf_blocks_text"], TINY["n_head_text"], causal=True)
    z = ln(h[torch.arange(len(tokens)), lengths - 1], sd, "blocks.output.ln") @ sd["blocks.output.f.w"].T
    return z / (z.norm(dim=-1, keepdim=True) + 1e-12)


def test_embeddings_match_independent_float64():
    clip = tiny_clip()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=g, dtype=F64) * 2 - 1
    t = torch.tensor([0, 7, 19])
    tokens = torch.randint(0, 50, (3, 7), generator=g)
    lengths = torch.tensor([2, 7, 4])
    img_sd = {k: v.detach() for k, v in clip.image_encoder.state_dict().items()}
    txt_sd = {k: v.detach() for k, v in clip.text_encoder.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(clip.image_embeddings(x, t), ref_image_embedding(img_sd, x, t), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(clip.text_embeddings(tokens=tokens, lengths=lengths),
                                   ref_text_embedding(txt_sd, tokens, lengths), rtol=1e-10, atol=1e-12)


def test_cond_fn_gradient_matches_autograd_of_independent_float64():
    clip = tiny_clip()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 50, (2, 7), generator=g)
    lengths = torch.tensor([5, 3])
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([3, 11])
    got = clip.cond_fn(grad_scale=2.5, tokens=tokens, lengths=lengths)(x, t)

    img_sd = {k: v.detach() for k, v in clip.image_encoder.state_dict().items()}
    txt_sd = {k: v.detach() for k, v in clip.text_encoder.state_dict().items()}
    x_var = x.clone().requires_grad_(True)
    # OpenAI's logit scale is a float32 tensor log(100): exp of that rounded value, not 100 exactly
    scale = torch.tensor(math.log(100.0), dtype=torch.float32).to(F64).exp()
    loss = scale * (ref_text_embedding(txt_sd, tokens, lengths) * ref_image_embedding(img_sd, x_var, t)).sum()
    want = torch.autograd.grad(loss, x_var)[0] * 2.5
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert not got.requires_grad


def test_cond_fn_drives_the_sampler():
    """CLIP guidance through p_sample_loop at float32: runs, and a larger grad_scale moves the sample."""
    clip = tiny_clip(dtype=torch.float32)
    d = create_gaussian_diffusion(20, "squaredcos_cap_v2", "4")
    model_fn = lambda x, t: torch.cat([x * 0.5, torch.zeros_like(x)], 1)  # noqa: E731
    tokens, lengths = torch.randint(0, 50, (1, 7)), torch.tensor([4])
    run = lambda s: d.p_sample_loop(model_fn, (1, 3, 8, 8), generator=torch.Generator().manual_seed(0),  # noqa: E731
                                    cond_fn=clip.cond_fn(grad_scale=s, tokens=tokens, lengths=lengths))
    base, guided = run(0.0), run(50.0)
    assert torch.isfinite(guided).all() and (guided - base).abs().max() > 1e-4


def test_clip_tokenizer_matches_transformers(tmp_path):
    """Our CLIP BPE against transformers' CLIPTokenizer on the same tiny files; OpenAI's single
    bpe_simple_vocab file builds the same vocabulary layout (bytes, bytes + </w>, merges, specials)."""
    from transformers import CLIPTokenizer

    from diffkern.models.glide.tokenizer import ClipTokenizer, bytes_to_unicode

    merges = [("c", "o"), ("co", "r"), ("g", "i</w>"), ("cor", "gi</w>"), ("t", "h"), ("th", "e</w>")]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (tmp_path / "merges.txt").write_text(merges_text)
    (tmp_path / "bpe_simple_vocab.txt.gz").write_bytes(gzip.compress(merges_text.encode()))
    hf = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = ClipTokenizer.from_path(tmp_path)
    assert ClipTokenizer.from_path(tmp_path / "bpe_simple_vocab.txt.gz").encoder == ours.encoder
    for text in ["a corgi in the field", "The  CORGI!! 3.14 it's"]:
        assert ours.encode(text) == hf.encode(text)[1:-1]
    assert ours.encode("the corgi &amp; it") == ours.encode("the corgi & it")  # CLIP unescapes HTML
    ids = ours.encode("the corgi")
    padded, length = ours.padded_tokens_and_len(ids, 6)
    assert padded == [ours.start_token, *ids, ours.end_token] + [0] * (4 - len(ids)) and length == len(ids) + 2
    assert ours.decode(ids) == "the corgi"
