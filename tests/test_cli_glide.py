"""`diffkern generate` for GLIDE: tiny random GLIDE checkpoints saved with torch.save into tmp_path
(16 px base, 32 px upsampler, 2-3 respaced steps), the PNGs the CLI writes against GlidePipeline's,
and exit 2 with a message (never a traceback) for missing or bad files and options."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffkern.cli import main
from diffkern.models.glide import clip as glide_clip
from diffkern.models.glide.tokenizer import bytes_to_unicode
from diffkern.pipelines.glide import GlidePipeline
from tests.pipelines.test_glide import BASE, UP, tiny

PROMPT = "a corgi"
TINY_CLIP = dict(image_size=16, patch_size=8, n_vocab=600, max_text_len=7, n_embd=8, n_head_state_text=4,
                 n_head_text=2, n_xf_blocks_text=1, n_head_state_image=4, n_head_image=2, n_xf_blocks_image=1,
                 n_timesteps=40)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: intra-op threads only wait for each other (see tests/pipelines/test_glide.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """base.pt, upsample.pt, base_inpaint.pt and a tokenizer folder as OpenAI ships them (gzipped BPE
    files of a tiny vocabulary, plus CLIP's bpe_simple_vocab_16e6.txt for the noised CLIP)."""
    import gzip

    d = tmp_path_factory.mktemp("glide_cli")
    tok = d / "tokenizer"
    tok.mkdir()
    merges = [("Ġ", "c"), ("o", "r"), ("g", "i"), ("or", "gi"), ("Ġc", "orgi")]
    vocab = list(bytes_to_unicode().values()) + ["".join(m) for m in merges] + ["<|endoftext|>"]
    encoder = json.dumps({v: i for i, v in enumerate(vocab)})
    (tok / "encoder.json.gz").write_bytes(gzip.compress(encoder.encode()))
    bpe = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (tok / "vocab.bpe.gz").write_bytes(gzip.compress(bpe.encode()))
    clip_merges = [("c", "o"), ("co", "r"), ("g", "i</w>"), ("cor", "gi</w>")]
    (tok / "bpe_simple_vocab_16e6.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in clip_merges) + "\n")
    models = {"base": tiny(BASE, 0), "upsample": tiny(UP, 1),
              "base_inpaint": tiny(dict(BASE, inpaint=True), 2)}
    for name, model in models.items():
        torch.save(model.state_dict(), d / f"{name}.pt")
    return d, models


def _argv(d, out, *extra, upsampler=False):
    argv = ["generate", "--base", str(d / "base.pt"), "--tokenizer", str(d / "tokenizer"), "--prompt", PROMPT,
            "--base-options", json.dumps(BASE), "--base-respacing", "3", "--quiet", "--output", str(out)]
    if upsampler:
        argv += ["--upsampler", str(d / "upsample.pt"), "--upsampler-options", json.dumps(UP),
                 "--upsample-respacing", "2"]
    return argv + list(extra)


def _png(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_base_only_writes_the_64px_stage_glide_pipeline_draws(files, tmp_path, capsys):
    d, models = files
    out = tmp_path / "sub" / "base.png"
    assert main(_argv(d, out, "--seed", "4")) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "no --upsampler" in captured.err
    pipe = GlidePipeline(models["base"], BASE, tokenizer=d / "tokenizer")
    expected = pipe(PROMPT, guidance_scale=3.0, base_respacing="3", progress=False,
                    generator=torch.Generator().manual_seed(4)).images[0]
    got = _png(out)
    assert got.shape == (16, 16, 3)
    assert np.array_equal(got, np.asarray(expected, dtype=np.int16))  # GLIDE's default guidance 3.0 was used


def test_base_and_upsampler_several_images(files, tmp_path):
    d, _ = files
    out = tmp_path / "up.png"
    assert main(_argv(d, out, "--batch-size", "2", "--guidance", "5", "--upsample-temp", "0.9",
                      "--backend", "reference", upsampler=True)) == 0
    a, b = _png(tmp_path / "up-0.png"), _png(tmp_path / "up-1.png")
    assert a.shape == b.shape == (32, 32, 3) and not np.array_equal(a, b)  # two different noise draws


def test_inpaint_keeps_the_white_part_of_the_mask(files, tmp_path):
    d, _ = files
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    pixels = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(image)
    keep = np.zeros((16, 16), np.uint8)
    keep[:, :8] = 255  # white = keep
    Image.fromarray(keep).save(mask)
    out = tmp_path / "fill.png"
    argv = _argv(d, out, "--inpaint-image", str(image), "--mask", str(mask))
    argv[argv.index("--base") + 1] = str(d / "base_inpaint.pt")
    argv[argv.index("--base-options") + 1] = json.dumps(dict(BASE, inpaint=True))
    assert main(argv) == 0
    got = _png(out)
    assert got.shape == (16, 16, 3)
    # the known half comes back (the last x0 is the known image there), the other half is drawn anew
    assert np.abs(got[:, :8] - pixels[:, :8]).max() <= 2
    assert np.abs(got[:, 8:] - pixels[:, 8:]).mean() > 20


def test_clip_guidance(files, tmp_path, monkeypatch):
    d, _ = files
    for key, value in TINY_CLIP.items():  # from_checkpoints builds the released CLIP's config: shrink it
        monkeypatch.setitem(glide_clip.CLIP_CONFIG, key, value)
    torch.manual_seed(0)
    clip = glide_clip.create_clip_model()
    torch.save(clip.image_encoder.state_dict(), tmp_path / "clip_image_enc.pt")
    torch.save(clip.text_encoder.state_dict(), tmp_path / "clip_text_enc.pt")
    clip_args = ["--clip-image", str(tmp_path / "clip_image_enc.pt"),
                 "--clip-text", str(tmp_path / "clip_text_enc.pt")]
    plain, guided = tmp_path / "plain.png", tmp_path / "clip.png"
    assert main(_argv(d, plain, "--guidance", "0")) == 0
    # the CLIP tokenizer is found in the --tokenizer folder (bpe_simple_vocab_16e6.txt)
    assert main(_argv(d, guided, *clip_args, "--clip-guidance-scale", "500")) == 0
    assert _png(guided).shape == (16, 16, 3) and not np.array_equal(_png(guided), _png(plain))
    # both guidances at once: classifier-free (--guidance) on top of CLIP's
    both = tmp_path / "both.png"
    assert main(_argv(d, both, *clip_args, "--clip-guidance-scale", "500", "--guidance", "4")) == 0
    assert not np.array_equal(_png(both), _png(guided))


def _exit_2(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_missing_base_tokenizer_and_files_exit_2(files, tmp_path, capsys):
    d, _ = files
    out = tmp_path / "x.png"
    _exit_2(capsys, ["generate", "--model", "glide", "--prompt", PROMPT], "no GLIDE base model given (--base",
            "base.pt", "upsample_inpaint.pt", "clip_image_enc.pt", "openaipublic.blob.core.windows.net",
            "encoder.json.gz")
    _exit_2(capsys, _argv(d, out, "--upsampler", str(tmp_path / "nowhere.pt")),
            f"--upsampler: file not found: {tmp_path / 'nowhere.pt'}", "upsample.pt")
    argv = _argv(d, out)
    del argv[argv.index("--tokenizer"):argv.index("--tokenizer") + 2]
    _exit_2(capsys, argv, "no tokenizer given", "encoder.json.gz + vocab.bpe.gz", "glide_text2im")
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    argv = _argv(d, out)
    argv[argv.index("--tokenizer") + 1] = str(empty)
    _exit_2(capsys, argv, "--tokenizer:", "encoder.json.gz")
    assert not out.exists()


def test_corrupt_and_mismatched_checkpoints_exit_2(files, tmp_path, capsys):
    d, _ = files
    corrupt = tmp_path / "base.pt"
    corrupt.write_bytes((d / "base.pt").read_bytes()[:200])
    argv = _argv(d, tmp_path / "x.png")
    argv[argv.index("--base") + 1] = str(corrupt)
    _exit_2(capsys, argv, "cannot load the GLIDE checkpoints", str(corrupt))
    # an inpainting model where text-to-image wants base.pt: the key problems, and what goes where
    argv[argv.index("--base") + 1] = str(d / "base_inpaint.pt")
    _exit_2(capsys, argv, "do not fit", "input_blocks.0.0.weight", "need --inpaint-image and --mask")
    _exit_2(capsys, _argv(d, tmp_path / "x.png", "--model", "glide", "--base-options", '{"image_sise": 64}'),
            "--base-options: unknown option(s) image_sise")


def test_options_of_the_other_family_and_bad_combinations_exit_2(files, tmp_path, capsys):
    d, _ = files
    out = str(tmp_path / "x.png")
    _exit_2(capsys, _argv(d, out, "--steps", "20"), "--steps: Stable Diffusion / LDM options",
            "--base-respacing")
    _exit_2(capsys, ["generate", "--checkpoint", str(tmp_path), "--base", str(d / "base.pt"),
                     "--prompt", PROMPT],
            "--checkpoint (Stable Diffusion / LDM) or --base (GLIDE), not both")
    _exit_2(capsys, ["generate", "--model", "sd", "--checkpoint", str(tmp_path), "--upsampler", "u.pt",
                     "--prompt", PROMPT], "--upsampler: GLIDE options")
    _exit_2(capsys, _argv(d, out, "--mask", str(d / "base.pt")), "both --inpaint-image IMAGE and --mask MASK")
    _exit_2(capsys, _argv(d, out, "--clip-image", str(d / "base.pt")), "both --clip-image")
    _exit_2(capsys, _argv(d, out, "--base-respacing", "fast9"), "--base-respacing: 'fast9'")
    _exit_2(capsys, _argv(d, out, "--dtype", "bf16"), "GLIDE runs in fp32 or fp16")
