"""GlidePipeline end to end with tiny random GLIDE models: shapes, determinism, output types,
guidance wiring, inpainting, tokenizers and checkpoint errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffkern.models.glide import create_model
from diffkern.models.glide.clip import create_clip_model
from diffkern.models.glide.tokenizer import ClipTokenizer, GlideTokenizer, bytes_to_unicode
from diffkern.models.loading import CheckpointError
from diffkern.pipelines.glide import GlidePipeline
from tests.models._helpers import randomise

COMMON = dict(num_channels=32, num_res_blocks=1, attention_resolutions="8", num_head_channels=16, dropout=0.0,
              text_ctx=6, xf_width=32, xf_layers=1, xf_heads=2, use_fp16=False, diffusion_steps=40)
BASE = dict(COMMON, image_size=16, channel_mult="1,2", noise_schedule="squaredcos_cap_v2")
UP = dict(COMMON, image_size=32, channel_mult="1,1,2", noise_schedule="linear", super_res=True)
FAST = dict(base_respacing="3", upsample_respacing="2", progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny UNets' convolutions are microseconds of work: on a busy CPU, intra-op threads waiting
    for each other made this file ~50x slower (seconds per sampling step). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """A tiny GPT-2-style vocabulary (encoder.json + vocab.bpe, as OpenAI ships them)."""
    d = tmp_path_factory.mktemp("glide_vocab")
    merges = [("Ġ", "c"), ("o", "r"), ("g", "i"), ("or", "gi"), ("Ġc", "orgi")]
    vocab = list(bytes_to_unicode().values()) + ["".join(m) for m in merges] + ["<|endoftext|>"]
    (d / "encoder.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return d


def tiny(options, seed):
    torch.manual_seed(seed)
    return randomise(create_model(**options), seed=seed, scale=0.05)


@pytest.fixture(scope="module")
def pipe(vocab_dir):
    return GlidePipeline(tiny(BASE, 0), BASE, tiny(UP, 1), UP, tokenizer=vocab_dir)


def test_text_to_image_shapes_types_and_determinism(pipe):
    run = lambda **kw: pipe("a corgi", batch_size=2, generator=torch.Generator().manual_seed(0), **FAST, **kw)  # noqa: E731
    pt = run(output_type="pt").images
    assert pt.shape == (2, 3, 32, 32) and pt.min() >= 0 and pt.max() <= 1
    torch.testing.assert_close(run(output_type="pt").images, pt, rtol=0, atol=0)
    arr = run(output_type="np").images
    assert arr.shape == (2, 32, 32, 3) and np.allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = run(output_type="pil").images
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    other = pipe("a corgi", batch_size=2, generator=torch.Generator().manual_seed(1), output_type="pt", **FAST)
    assert (other.images - pt).abs().max() > 1e-3


def test_prompt_and_tokens_agree_and_guidance_matters(pipe, vocab_dir):
    tok = GlideTokenizer.from_path(vocab_dir)
    ids = tok.encode("A Corgi")
    base_only = GlidePipeline(pipe.base_model, BASE, tokenizer=tok)
    run = lambda **kw: base_only(generator=torch.Generator().manual_seed(3), output_type="pt", **FAST, **kw).images  # noqa: E731
    by_text = run(prompt="a corgi")
    assert by_text.shape == (1, 3, 16, 16)
    torch.testing.assert_close(run(tokens=ids), by_text, rtol=0, atol=0)
    assert (run(prompt="a corgi", guidance_scale=8.0) - by_text).abs().max() > 1e-4
    assert (run(prompt="a corgi", guidance_scale=None) - by_text).abs().max() > 1e-4


def test_upsampler_gets_quantised_base_samples_and_tempered_noise(pipe, monkeypatch):
    seen = {}
    original = pipe.upsampler_model.forward

    def spy(x, t, tokens=None, mask=None, **kw):
        seen.setdefault("x_T", x.clone())
        seen["low_res"] = kw["low_res"]
        seen["tokens"] = tokens
        return original(x, t, tokens, mask, **kw)

    monkeypatch.setattr(pipe.upsampler_model, "forward", spy)
    pipe("a corgi", generator=torch.Generator().manual_seed(0), output_type="pt", upsample_temp=0.5, **FAST)
    low = seen["low_res"]
    torch.testing.assert_close(((low + 1) * 127.5).round(), (low + 1) * 127.5, rtol=0, atol=1e-4)
    assert seen["tokens"].shape == (1, UP["text_ctx"])
    assert 0.3 < seen["x_T"].std() < 0.7  # noise * 0.5


def test_inpaint(vocab_dir):
    base_o, up_o = dict(BASE, inpaint=True), dict(UP, inpaint=True)
    pipe = GlidePipeline(tiny(base_o, 2), base_o, tiny(up_o, 3), up_o, tokenizer=vocab_dir)
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))
    mask = torch.ones(16, 16)
    mask[:, 8:] = 0
    out = pipe.inpaint(image, mask, "a corgi", generator=torch.Generator().manual_seed(0), output_type="pt", **FAST)
    assert out.images.shape == (1, 3, 32, 32)
    # the known region comes back (up to the last step's x0 being exactly the known image)
    known = torch.from_numpy(np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255).permute(2, 0, 1)
    assert (out.images[0, :, :, :16] - known[:, :, :16]).abs().max() < 0.02
    with pytest.raises(ValueError, match="inpainting model"):
        pipe("a corgi", **FAST)


def test_clip_guidance(vocab_dir, tmp_path):
    merges = [("c", "o"), ("co", "r"), ("g", "i</w>"), ("cor", "gi</w>")]
    (tmp_path / "bpe.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    torch.manual_seed(0)
    clip = create_clip_model(tokenizer=ClipTokenizer.from_path(tmp_path / "bpe.txt"), image_size=16, patch_size=8,
                             n_vocab=600, max_text_len=7, n_embd=8, n_head_state_text=4, n_head_text=2,
                             n_xf_blocks_text=1, n_head_state_image=4, n_head_image=2, n_xf_blocks_image=1,
                             n_timesteps=40)
    p = GlidePipeline(tiny(BASE, 0), BASE, tokenizer=vocab_dir, clip_model=clip)
    run = lambda s: p("a corgi", use_clip_guidance=True, clip_guidance_scale=s, output_type="pt",  # noqa: E731
                      generator=torch.Generator().manual_seed(0), **FAST).images
    assert (run(500.0) - run(0.0)).abs().max() > 1e-4


def test_argument_errors(pipe):
    with pytest.raises(ValueError, match="exactly one"):
        pipe(**FAST)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a corgi", output_type="latent", **FAST)
    with pytest.raises(ValueError, match="batch_size"):
        pipe("a corgi", batch_size=0, **FAST)
    with pytest.raises(ValueError, match="tokens: ids"):
        pipe(tokens=[10**6], **FAST)
    with pytest.raises(ValueError, match="tokenizer"):
        GlidePipeline(pipe.base_model, BASE)("a corgi", **FAST)
    with pytest.raises(ValueError, match="clip_model"):
        pipe("a corgi", use_clip_guidance=True, **FAST)
    with pytest.raises(ValueError, match="inpainting models"):
        pipe.inpaint(torch.zeros(3, 16, 16), torch.ones(16, 16), "a corgi", **FAST)


def test_from_checkpoints_and_bad_files(pipe, tmp_path, vocab_dir):
    base_pt, up_pt = tmp_path / "base.pt", tmp_path / "upsample.pt"
    torch.save(pipe.base_model.state_dict(), base_pt)
    torch.save(pipe.upsampler_model.state_dict(), up_pt)
    loaded = GlidePipeline.from_checkpoints(base_pt, up_pt, tokenizer=vocab_dir, base_options=BASE,
                                            upsampler_options=UP)
    kw = dict(generator=torch.Generator().manual_seed(5), output_type="pt", **FAST)
    torch.testing.assert_close(loaded("a corgi", **kw).images,
                               pipe("a corgi", **dict(kw, generator=torch.Generator().manual_seed(5))).images)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(base_pt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        GlidePipeline.from_checkpoints(corrupt, base_options=BASE)
    sd = pipe.base_model.state_dict()
    sd.pop("out.2.weight")
    sd["extra.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.pt"
    torch.save(sd, partial)
    with pytest.raises(CheckpointError, match=r"(?s)partial.pt.*missing: out\.2\.weight.*unexpected: extra\.weight"):
        GlidePipeline.from_checkpoints(partial, base_options=BASE)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        GlidePipeline.from_checkpoints(tmp_path / "nowhere.pt", base_options=BASE)


def test_glide_tokenizer_matches_transformers_gpt2(vocab_dir, tmp_path):
    """Our byte-level BPE against transformers' GPT2Tokenizer on the same files (GLIDE lowercases)."""
    from transformers import GPT2Tokenizer

    (tmp_path / "vocab.json").write_text((vocab_dir / "encoder.json").read_text())
    (tmp_path / "merges.txt").write_text((vocab_dir / "vocab.bpe").read_text())
    hf = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = GlideTokenizer.from_path(vocab_dir)
    assert GlideTokenizer.from_path(tmp_path).encoder == ours.encoder  # Hugging Face file names too
    for text in ["a corgi in a field", "An Oil Painting of a CORGI!!  3.14 it's", "émoji 🐶 corgi\n"]:
        assert ours.encode(text) == hf.encode(text.lower())
        assert ours.decode(ours.encode(text)) == text.lower().strip()
    ids = ours.encode("a corgi")
    assert ours.end_token == ours.n_vocab - 1
    assert ours.padded_tokens_and_mask(ids, 5) == (ids + [ours.end_token] * 3, [True] * 2 + [False] * 3)
    assert ours.padded_tokens_and_mask(list(range(9)), 4) == ([0, 1, 2, 3], [True] * 4)
    with pytest.raises(FileNotFoundError, match="merges"):
        (tmp_path / "merges.txt").unlink()
        GlideTokenizer.from_path(tmp_path)
