"""GlidePipeline end to end with tiny random GLIDE models: shapes, determinism, output types,
guidance wiring, several prompts per batch, CLIP + free guidance against float64 steps, DDIM
inversion round trips, inpainting, tokenizers and checkpoint errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffkern.models.glide import create_model
from diffkern.models.glide.clip import create_clip_model
from diffkern.models.glide.diffusion import create_gaussian_diffusion, get_named_beta_schedule
from diffkern.models.glide.tokenizer import ClipTokenizer, GlideTokenizer, bytes_to_unicode
from diffkern.models.loading import CheckpointError
from diffkern.pipelines.glide import GlidePipeline
from tests.models._helpers import randomise

COMMON = dict(num_channels=32, num_res_blocks=1, attention_resolutions="8", num_head_channels=16, dropout=0.0,
              text_ctx=6, xf_width=32, xf_layers=1, xf_heads=2, use_fp16=False, diffusion_steps=40)
BASE = dict(COMMON, image_size=16, channel_mult="1,2", noise_schedule="squaredcos_cap_v2")
UP = dict(COMMON, image_size=32, channel_mult="1,1,2", noise_schedule="linear", super_res=True)
FAST = dict(base_respacing="3", upsample_respacing="2", progress=False)
F64 = torch.float64


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


def tiny64(options, seed):
    """A float64 tiny model: the pipeline then samples in float64 (the UNet casts its torso to .dtype)."""
    model = tiny(options, seed).double()
    model.dtype = F64
    return model


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def clip_bpe(tmp_path_factory):
    """A tiny CLIP BPE merges file."""
    path = tmp_path_factory.mktemp("clip_bpe") / "bpe.txt"
    merges = [("c", "o"), ("co", "r"), ("g", "i</w>"), ("cor", "gi</w>")]
    path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return path


def tiny_clip(clip_bpe, dtype=None):
    torch.manual_seed(0)
    return create_clip_model(tokenizer=ClipTokenizer.from_path(clip_bpe), image_size=16, patch_size=8,
                             n_vocab=600, max_text_len=7, n_embd=8, n_head_state_text=4, n_head_text=2,
                             n_xf_blocks_text=1, n_head_state_image=4, n_head_image=2, n_xf_blocks_image=1,
                             n_timesteps=40, dtype=dtype)


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


def test_clip_guidance(vocab_dir, clip_bpe, monkeypatch):
    p = GlidePipeline(tiny(BASE, 0), BASE, tokenizer=vocab_dir, clip_model=tiny_clip(clip_bpe))

    def run(s, **kw):
        return p("a corgi", use_clip_guidance=True, clip_guidance_scale=s, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **FAST, **kw).images

    assert (run(500.0) - run(0.0)).abs().max() > 1e-4
    rows = []
    original = p.base_model.forward
    monkeypatch.setattr(p.base_model, "forward",
                        lambda x, *a, **kw: rows.append(x.shape[0]) or original(x, *a, **kw))
    run(500.0)  # guidance_scale "auto": the clip_guided notebook's, no free guidance
    run(500.0, guidance_scale=3.0)  # both: [cond; uncond] rows
    assert rows == [1] * 3 + [2] * 3


def test_clip_and_free_guidance_match_float64_steps(vocab_dir, clip_bpe):
    """Two prompts, both guidances, two DDPM steps by hand in float64: the step's mean from the
    guided eps (learned variance from the conditional half), then + variance * CLIP's gradient at x_t
    (OpenAI's condition_mean), then the step noise. Unclamped x0, so every pixel sees the guided eps."""
    model, clip = tiny64(BASE, 0), tiny_clip(clip_bpe, F64)
    p = GlidePipeline(model, BASE, tokenizer=vocab_dir, clip_model=clip)
    prompts, s, clip_s = ["a corgi", "a cat"], 3.0, 5.0
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.5
    # "2,0": t = 0 and 19 of 40, abar 0.5 (not ~0), so that the unclamped x0 stays near [-1, 1]
    got = p(prompts, guidance_scale=s, use_clip_guidance=True, clip_guidance_scale=clip_s, base_noise=x_T,
            base_respacing="2,0", base_clip_denoised=False, generator=torch.Generator().manual_seed(1),
            output_type="pt", progress=False).images

    d = create_gaussian_diffusion(BASE["diffusion_steps"], BASE["noise_schedule"], "2,0")
    b = d.betas
    a = torch.cumprod(1 - b, 0)
    a_prev = torch.cat([torch.ones(1, dtype=F64), a[:-1]])
    post_var = b * (1 - a_prev) / (1 - a)
    log_var_min = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # OpenAI's clipped log variance
    tok, ctx = GlideTokenizer.from_path(vocab_dir), BASE["text_ctx"]
    end = model.token_embedding.num_embeddings - 1  # GLIDE pads with the model's last id, masked out
    rows = [tok.encode(q) for q in prompts] + [[], []]  # the conditional rows, then the empty prompt's
    tokens = torch.tensor([r + [end] * (ctx - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (ctx - len(r)) for r in rows])
    grad_fn = clip.cond_fn(prompts, clip_s)
    step_noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = x_T
    for i in (1, 0):
        t = d.timestep_map[i].expand(2)
        c, u = model(torch.cat([x, x]), torch.cat([t, t]), tokens=tokens, mask=mask).chunk(2)
        eps = u[:, :3] + s * (c[:, :3] - u[:, :3])
        x0 = (x - (1 - a[i]).sqrt() * eps) / a[i].sqrt()
        mean = (b[i] * a_prev[i].sqrt() * x0 + (1 - a_prev[i]) * (1 - b[i]).sqrt() * x) / (1 - a[i])
        frac = (c[:, 3:] + 1) / 2
        log_var = frac * b[i].log() + (1 - frac) * log_var_min[i]
        grad = grad_fn(x, t)
        assert grad.abs().max() > 1e-2  # CLIP's gradient moves the step
        x = mean + log_var.exp() * grad + (i > 0) * (0.5 * log_var).exp() * step_noise
    assert (x.abs() < 1).float().mean() > 0.5  # most pixels escape the final clamp to [0, 1]
    # float32 step coefficients (the schedulers round them once)
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_several_prompts_batch_like_each_prompt_alone(vocab_dir, monkeypatch):
    """Prompt-major rows, [cond of every image; uncond of every image] in one base call, and with one
    generator per image every image equals the same prompt and generator sampled alone (float64, so
    that the upsampler's 8-bit quantisation of the base samples cannot flip on batch rounding)."""
    p = GlidePipeline(tiny64(BASE, 0), BASE, tiny64(UP, 1), UP, tokenizer=vocab_dir)
    kw = dict(output_type="pt", **FAST)
    both = p(["a corgi", "a cat"], batch_size=2, generator=gens(0, 1, 2, 3), **kw).images
    assert both.shape == (4, 3, 32, 32)
    alone = torch.cat([p("a corgi", batch_size=2, generator=gens(0, 1), **kw).images,
                       p("a cat", batch_size=2, generator=gens(2, 3), **kw).images])
    torch.testing.assert_close(both, alone, rtol=1e-12, atol=1e-12)
    tok = GlideTokenizer.from_path(vocab_dir)
    ids = [tok.encode("a corgi"), tok.encode("a cat")]
    torch.testing.assert_close(p(tokens=ids, batch_size=2, generator=gens(0, 1, 2, 3), **kw).images, both,
                               rtol=0, atol=0)
    same_prompt = p(["a corgi", "a corgi"], batch_size=2, generator=gens(0, 1, 2, 3), **kw).images
    torch.testing.assert_close(same_prompt[:2], both[:2], rtol=1e-12, atol=1e-12)
    assert (same_prompt[2:] - both[2:]).abs().max() > 1e-4  # the second prompt is used

    seen = []
    original = p.base_model.forward
    monkeypatch.setattr(p.base_model, "forward", lambda x, t, tokens=None, **k: seen.append(tokens.clone())
                        or original(x, t, tokens, **k))
    p(["a corgi", "a cat"], batch_size=2, guidance_scale=3.0, **kw)
    end = p.base_model.token_embedding.num_embeddings - 1  # GLIDE pads with the model's last id
    want = [ids[n // 2] + [end] * (6 - len(ids[n // 2])) for n in range(4)] + [[end] * 6] * 4
    assert len(seen) == 3 and all(s.tolist() == want for s in seen)


class GaussianDataUNet(torch.nn.Module):
    """The exact eps of data N(0, 0.25) plus 0.05 x a tiny text-conditional UNet's eps (and its variance
    channels). A bare random UNet is no noise predictor: inverting it drives x towards
    sqrt(abar) x_0 -> 0, where its GroupNorms' 1 / std make eps's Lipschitz constant blow up and the
    fixed-point iteration diverge. Here eps is ~x at the noisy end, as a trained model's."""

    def __init__(self, unet, options):
        super().__init__()
        self.unet, self.token_embedding = unet, unet.token_embedding
        schedule = get_named_beta_schedule(options["noise_schedule"], options["diffusion_steps"])
        self.alphas_cumprod = torch.cumprod(1 - schedule, 0)

    def forward(self, x, t, tokens=None, mask=None):
        out = self.unet(x, t, tokens=tokens, mask=mask)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * x / (0.25 * a + 1 - a)
        return torch.cat([eps + 0.05 * out[:, :3], out[:, 3:]], 1)


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_invert_then_sample_reconstructs(vocab_dir, guidance_scale):
    """invert -> __call__(base_noise=x_T, DDIM, unclamped, same respacing / prompt / guidance) returns
    the image, float64. Each fixed-point iteration contracts by ~(the step's eps coefficient) x Lip(eps);
    with eps ~ x at the noisy end that is ~1 - sqrt(abar_next / abar): "4,0" (4 steps over the first
    half of the process, abar 1 -> 0.07) contracts by ~0.6 per iteration (16 leave ~5e-5), where
    "ddim4" (down to abar 9e-4, ~0.87 per iteration) would need ~60 iterations for 1e-4."""
    options = dict(BASE, noise_schedule="linear")
    p = GlidePipeline(GaussianDataUNet(tiny64(options, 0), options), options, tokenizer=vocab_dir)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7), dtype=F64) * 1.6 - 0.8
    errors = []
    for iterations in (0, 16):
        x_T = p.invert(image, "a corgi", guidance_scale=guidance_scale, respacing="4,0",
                       fixed_point_iterations=iterations, progress=False)
        assert x_T.shape == (2, 3, 16, 16) and x_T.dtype == F64
        back = p("a corgi", batch_size=2, base_noise=x_T, base_sampler="ddim", base_respacing="4,0",
                 base_clip_denoised=False, guidance_scale=guidance_scale, output_type="pt",
                 progress=False).images
        errors.append((back * 2 - 1 - image).abs().max().item())
    assert errors[0] > 0.05 and errors[1] < 1e-3, errors  # first order without the iterations


def test_invert_inputs(vocab_dir):
    p = GlidePipeline(tiny(BASE, 0), BASE, tokenizer=vocab_dir)
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))
    x_T = p.invert([image, image], respacing="2", progress=False)  # no prompt: the empty one
    assert x_T.shape == (2, 3, 16, 16) and x_T.dtype == torch.float32
    torch.testing.assert_close(p.invert(image, tokens=[], respacing="2", progress=False), x_T[:1])
    by_prompt = p.invert(torch.zeros(2, 3, 20, 20), ["a corgi", "a cat"], respacing="2", progress=False)
    assert by_prompt.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="one per image"):
        p.invert(torch.zeros(3, 3, 16, 16), ["a corgi", "a cat"], progress=False)
    with pytest.raises(ValueError, match="image"):
        p.invert(torch.zeros(2, 4, 16, 16), progress=False)
    with pytest.raises(ValueError, match="fixed_point_iterations"):
        p.invert(image, fixed_point_iterations=-1, respacing="2", progress=False)


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
    with pytest.raises(TypeError, match="prompt: expected"):
        pipe(["a corgi", 3], **FAST)
    with pytest.raises(TypeError, match="tokens: expected"):
        pipe(tokens="a corgi", **FAST)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe("a corgi", guidance_scale="high", **FAST)
    with pytest.raises(ValueError, match="base_sampler"):
        pipe("a corgi", base_sampler="euler", **FAST)
    with pytest.raises(ValueError, match=r"base_noise: expected a tensor \(4, 3, 16, 16\)"):
        pipe(["a corgi", "a cat"], batch_size=2, base_noise=torch.zeros(2, 3, 16, 16), **FAST)
    with pytest.raises(ValueError, match="generator: expected one torch.Generator or a list of 4"):
        pipe(["a corgi", "a cat"], batch_size=2, generator=gens(0, 1), **FAST)


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
