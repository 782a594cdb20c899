"""`diffkern generate --prompts` in one process: PNG text chunks and manifest, images equal to single
`--prompt --seed` runs and independent of --batch-size, resume, an interrupted run's logs merged, GLIDE,
and exit 2 for bad combinations."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffkern
from diffkern.cli import main
from diffkern.distributed import png_text, read_records
from tests.distributed._helpers import SD_ARGS, files

PROMPTS = ["a photo of a cat", "a red dog", "the moon"]


def _run(sd_dir, prompts, outdir, *extra):
    return main(["generate", "--checkpoint", str(sd_dir / "sd"), *SD_ARGS, "--prompts", str(prompts),
                 "--outdir", str(outdir), *extra])


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_pngs_carry_their_settings_and_equal_single_prompt_runs(sd_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert _run(sd_dir, prompts, tmp_path / "b3", "--batch-size", "3", "--seed", "40", "--guidance", "6") == 0
    records = read_records(tmp_path / "b3" / "manifest.jsonl")
    assert [(r["index"], r["file"], r["prompt"], r["seed"]) for r in records] == [
        (i, f"{i:06d}.png", p, 40 + i) for i, p in enumerate(PROMPTS)]
    text = png_text(tmp_path / "b3" / "000001.png")
    assert text == {"prompt": "a red dog", "seed": "41", "model": "sd", "scheduler": "DDIMScheduler", "steps": "2",
                    "guidance": "6.0", "height": "32", "width": "32", "diffkern_version": diffkern.__version__}
    assert {k: str(v) for k, v in records[1].items() if k not in ("index", "file")} == text
    # each image is the one `--prompt P --seed S` draws alone; in another batch size the same up to float
    # rounding (BLAS may round a batch of 3 differently from a batch of 1: at most one 8-bit level here)
    assert _run(sd_dir, prompts, tmp_path / "b1", "--seed", "40", "--guidance", "6") == 0
    for name in files(tmp_path / "b1"):
        assert np.abs(_pixels(tmp_path / "b1" / name) - _pixels(tmp_path / "b3" / name)).max() <= 1
    out = tmp_path / "alone.png"
    assert main(["generate", "--checkpoint", str(sd_dir / "sd"), *SD_ARGS, "--prompt", PROMPTS[2], "--seed", "42",
                 "--guidance", "6", "--output", str(out)]) == 0
    assert np.array_equal(_pixels(out), _pixels(tmp_path / "b1" / "000002.png"))


def test_jsonl_lines_set_seed_steps_guidance_negative_and_size(sd_dir, tmp_path):
    lines = [{"prompt": "a cat", "seed": 5, "steps": 3, "guidance": 1.0},
             {"prompt": "a dog", "negative_prompt": "red", "size": [16, 32]}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _run(sd_dir, prompts, tmp_path / "o", "--batch-size", "2", "--num-images", "2") == 0
    records = read_records(tmp_path / "o" / "manifest.jsonl")
    assert [(r["prompt"], r["seed"], r["steps"], r["guidance"]) for r in records] == [
        ("a cat", 5, 3, 1.0), ("a cat", 6, 3, 1.0), ("a dog", 2, 2, 7.5), ("a dog", 3, 2, 7.5)]
    assert records[2]["negative_prompt"] == "red" and (records[2]["height"], records[2]["width"]) == (16, 32)
    assert _pixels(tmp_path / "o" / "000003.png").shape == (16, 32, 3)
    out = tmp_path / "alone.png"
    argv = ["generate", "--checkpoint", str(sd_dir / "sd"), "--prompt", "a dog", "--negative-prompt", "red",
            "--seed", "3", "--steps", "2", "--height", "16", "--width", "32", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    assert np.array_equal(_pixels(out), _pixels(tmp_path / "o" / "000003.png"))


def test_resume_makes_only_what_is_missing_and_merges_an_interrupted_runs_log(sd_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "o"
    assert _run(sd_dir, prompts, out) == 0
    full = files(out)
    manifest = (out / "manifest.jsonl").read_text()
    # an interrupted run: image 2 never written, the manifest never merged (only rank 0's log is there)
    (out / "000002.png").unlink()
    (out / ".manifest").mkdir()
    (out / ".manifest" / "rank-0.jsonl").write_text(manifest.splitlines()[1] + "\n{\"torn")
    (out / "manifest.jsonl").write_text(manifest.splitlines()[0] + "\n")
    mtimes = {n: (out / n).stat().st_mtime_ns for n in files(out)}
    capsys.readouterr()
    assert _run(sd_dir, prompts, out, "--resume") == 0
    out_text = capsys.readouterr().out
    assert "1 images written in " in out_text and ", 2 already there" in out_text
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes} == mtimes
    assert files(out) == full and (out / "manifest.jsonl").read_text() == manifest
    assert not (out / ".manifest").exists()
    assert _run(sd_dir, prompts, out) == 0  # without --resume: everything again, the same bytes
    assert "3 images written in " in capsys.readouterr().out and files(out) == full


def test_glide_prompt_file(glide_files, tmp_path):
    from diffkern.pipelines.glide import GlidePipeline
    from tests.pipelines.test_glide import tiny

    base, tok, options = glide_files
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a corgi"}\n{"prompt": "corgi", "guidance": 5, "steps": "2"}\n')
    argv = ["generate", "--base", str(base), "--tokenizer", str(tok), "--base-options", json.dumps(options),
            "--base-respacing", "3", "--quiet", "--prompts", str(prompts), "--outdir", str(tmp_path / "o"),
            "--seed", "7"]
    assert main(argv) == 0
    records = read_records(tmp_path / "o" / "manifest.jsonl")
    assert [(r["seed"], r["steps"], r["guidance"], r["model"]) for r in records] == [
        (7, "3", 3.0, "base.pt"), (8, "2", 5, "base.pt")]
    pipe = GlidePipeline(tiny(options, 0), options, tokenizer=tok)
    expected = pipe("corgi", guidance_scale=5.0, base_respacing="2", progress=False,
                    generator=[torch.Generator().manual_seed(8)]).images[0]
    assert np.array_equal(_pixels(tmp_path / "o" / "000001.png"), np.asarray(expected, dtype=np.int16))
    prompts.write_text('{"prompt": "a corgi", "negative_prompt": "cat"}\n')
    assert main(argv) == 2  # GLIDE has no negative prompt: refused, not ignored


@pytest.mark.parametrize("extra, needle", [
    (["--outdir", "X"], "--outdir: goes with --prompts"),
    (["--cfg-parallel"], "--cfg-parallel: goes with --prompts"),
    (["--prompts", "P"], "--prompt, --prompts: give one of them"),
])
def test_single_prompt_mode_refuses_batch_options(sd_dir, extra, needle, capsys):
    argv = ["generate", "--checkpoint", str(sd_dir / "sd"), "--prompt", "a cat", *extra]
    assert main(argv) == 2 and needle in capsys.readouterr().err


def test_batch_mode_errors_exit_2(sd_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "colour": "red"}\n')
    assert _run(sd_dir, prompts, tmp_path / "o") == 2
    assert "p.jsonl:1: unknown key(s) colour" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(sd_dir / "sd"), "--prompts", str(prompts)]) == 2
    assert "--outdir DIR" in capsys.readouterr().err
    prompts.write_text("a cat\n")
    assert _run(sd_dir, prompts, tmp_path / "o", "--cfg-parallel") == 2  # one process: no pair
    assert "even number of processes" in capsys.readouterr().err
    assert _run(sd_dir, prompts, tmp_path / "o", "--output", "x.png") == 2
    assert not (tmp_path / "o").exists()
