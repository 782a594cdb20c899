"""`diffkern generate` on hostile input: every bad option, file, folder or prompt line is one line on stderr
(no traceback), exit status 2, found BEFORE any model is loaded or image made, and earlier outputs survive.

A toy family (diffkern.cli.FAMILIES takes one registry line) records whether it was asked to load; the real
families are driven with stand-in files that are never read, so a check that came after loading would
show as a load error instead of the message asserted here.
"""

import json
import sys
import types

import pytest

from diffkern import cli
from diffkern.cli import main

PNG_BYTES = None


def _one_line_error(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) >= 1 and lines[0].startswith("diffkern generate: error: "), err
    return lines[0]


@pytest.fixture
def toy(monkeypatch):
    """A family that takes --steps / --height / --width per line and records every load."""
    from PIL import Image

    fam = types.ModuleType("toy_hostile")
    fam.NAME, fam.SELECT, fam.SHARED = "Toy", "--toy", ("steps", "height", "width")
    fam.LINE_KEYS = ("steps", "height", "width")
    fam.loads = []
    fam.add_arguments = lambda group: group.add_argument("--toy")
    fam.selected_by = lambda args: args.toy is not None

    def generate(args):
        fam.loads.append("generate")
        return []

    class Runner:
        accepts, defaults, metadata, pipe = ("steps", "height", "width"), {"steps": 1}, {"model": "toy"}, None

        def __call__(self, jobs, generators):
            return [Image.new("RGB", (4, 4), (j.seed % 256, 0, 0)) for j in jobs]

    def make_runner(args, device):
        fam.loads.append("runner")
        return Runner()

    fam.generate, fam.make_runner = generate, make_runner
    monkeypatch.setitem(sys.modules, "toy_hostile", fam)
    monkeypatch.setitem(cli.FAMILIES, "toy", "toy_hostile")
    return fam


def _earlier_run(toy, tmp_path):
    """An outdir with two images and their manifest, as a finished earlier run leaves it."""
    prompts = tmp_path / "ok.txt"
    prompts.write_text("a\nb\n")
    out = tmp_path / "out"
    assert main(["generate", "--toy", "t", "--prompts", str(prompts), "--outdir", str(out), "--quiet"]) == 0
    toy.loads.clear()
    return out, {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "x", "steps": 0}', '"steps" must be at least 1'),
    ('{"prompt": "x", "steps": "abc"}', '"steps" must be a positive integer for Toy'),
    ('{"prompt": "x", "steps": -3}', '"steps" must be at least 1'),
    ('{"prompt": "x", "height": 0}', '"height" must be positive'),
    ('{"prompt": "x", "guidance": 2.0}', "Toy does not take per-prompt guidance"),
    ('{"prompt": "x", "seed": 18446744073709551616}', '"seed" must fit in 64 bits'),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": 5}', 'needs "prompt": a string'),
])
def test_bad_prompt_lines_fail_before_loading_and_keep_earlier_outputs(toy, tmp_path, capsys, line, expected):
    out, before = _earlier_run(toy, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n' + line + "\n")
    capsys.readouterr()
    assert main(["generate", "--toy", "t", "--prompts", str(bad), "--outdir", str(out), "--quiet"]) == 2
    msg = _one_line_error(capsys.readouterr().err)
    assert expected in msg and f"{bad}:2" in msg, msg
    assert toy.loads == []
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("argv, expected", [
    (["--height", "0"], "--height: must be at least 1, got 0"),
    (["--steps", "-1"], "--steps: must be at least 1"),
    (["--guidance", "nan"], "--guidance: must be a finite number"),
    (["--num-images", "0"], "--num-images: must be at least 1"),
    (["--seed", str(2 ** 64)], "--seed: must fit in 64 bits"),
])
def test_bad_values_fail_before_loading(toy, tmp_path, capsys, argv, expected):
    assert main(["generate", "--toy", "t", "--prompt", "p", "--output", str(tmp_path / "o.png"), *argv]) == 2
    assert expected in _one_line_error(capsys.readouterr().err)
    assert toy.loads == []


def test_outdir_that_is_a_file_or_unwritable_fails_before_loading(toy, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    for outdir, expected in ((a_file, "exists and is not a folder"), (a_file / "sub", "is a file, not a folder"),
                             ("/proc/diffkern-no/out", "cannot write in /proc")):
        assert main(["generate", "--toy", "t", "--prompts", str(prompts), "--outdir", str(outdir)]) == 2
        assert expected in _one_line_error(capsys.readouterr().err), outdir
    assert a_file.read_text() == "keep me" and toy.loads == []


def test_output_that_is_a_folder_or_unwritable(tmp_path, capsys):
    """The real SD family: --output problems are found before the (empty) checkpoint folder is read."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "a_file").write_text("x")
    for output, expected in ((tmp_path / "dir.png", "is a folder"),
                             ("/proc/diffkern-no/x.png", "cannot write in /proc"),
                             (tmp_path / "a_file" / "x.png", "exists and is not a folder"),
                             (tmp_path / "a_file" / "deeper" / "x.png", "cannot be made"),
                             (tmp_path / "x.nope", "needs an image extension")):
        assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "p", "--output", str(output)]) == 2
        msg = _one_line_error(capsys.readouterr().err)
        assert expected in msg and "cannot load" not in msg, (output, msg)


def test_sd_checks_sizes_strength_and_init_image_before_loading(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()  # no model_index.json: loading would fail with "cannot load checkpoint"
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_bytes(b"\x89PNG but not really")
    base = ["generate", "--checkpoint", str(ckpt), "--prompt", "p", "--output", str(tmp_path / "o.png")]
    for extra, expected in ((["--height", "33"], "--height: must be a positive multiple of 8"),
                            (["--width", "4"], "--width: must be a positive multiple of 8"),
                            (["--init-image", str(not_an_image)], "--init-image: "),
                            (["--init-image", str(tmp_path / "none.png")], "--init-image: no such file"),
                            (["--strength", "1.5"], "--strength: must be in [0, 1]"),
                            (["--eta", "inf"], "--eta: must be a finite number")):
        assert main(base + extra) == 2
        msg = _one_line_error(capsys.readouterr().err)
        assert expected in msg and "cannot load" not in msg, (extra, msg)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "height": 33}\n')
    assert main(["generate", "--checkpoint", str(ckpt), "--prompts", str(prompts),
                 "--outdir", str(tmp_path / "o")]) == 2
    msg = _one_line_error(capsys.readouterr().err)
    assert '"height": must be a positive multiple of 8' in msg and ":1" in msg, msg


def test_glide_unclip_if_check_before_loading(tmp_path, capsys):
    base = tmp_path / "base.pt"
    base.write_bytes(b"never read")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "steps": "abc"}\n')
    assert main(["generate", "--base", str(base), "--prompts", str(prompts), "--outdir", str(tmp_path / "o")]) == 2
    assert "'abc' does not respace 1000 diffusion steps" in _one_line_error(capsys.readouterr().err)
    prompts.write_text('{"prompt": "a", "steps": "0"}\n')
    assert main(["generate", "--base", str(base), "--prompts", str(prompts), "--outdir", str(tmp_path / "o")]) == 2
    assert "does not respace" in _one_line_error(capsys.readouterr().err)

    karlo = tmp_path / "karlo"
    karlo.mkdir()
    for extra, expected in ((["--prompt", "p", "--prior-steps", "1"], "--prior-steps: must be at least 2"),
                            (["--image", str(base), "--text-diff", "a", "b", "--thetas", "0,2"],
                             "--thetas: expected comma-separated numbers in [0, 1]"),
                            (["--image", str(base)], "--image: "),
                            (["--prompt", "p", "--output", str(tmp_path)], "--output")):
        assert main(["generate", "--karlo", str(karlo), *extra]) == 2
        msg = _one_line_error(capsys.readouterr().err)
        assert expected in msg and "cannot load" not in msg, (extra, msg)

    stage1 = tmp_path / "if1"
    stage1.mkdir()
    (stage1 / "model_index.json").write_text("{}")
    for extra, expected in ((["--if-steps", "0"], "--if-steps: stage I needs at least 1 step"),
                            (["--if-guidance", "4,nan"], "--if-guidance: 'nan' is not a valid value"),
                            (["--if-low-res-noise", "per_call"], "--if-low-res-noise: stage II's option"),
                            (["--output", str(tmp_path / "a.png" / "b.png")], None)):
        (tmp_path / "a.png").write_text("a file")
        assert main(["generate", "--if-stage1", str(stage1), "--prompt", "p", *extra]) == 2
        msg = _one_line_error(capsys.readouterr().err)
        assert (expected or "--output") in msg and "cannot load" not in msg, (extra, msg)


def test_resume_with_a_corrupted_manifest_finishes_and_rewrites_it(toy, tmp_path, capsys):
    out, _ = _earlier_run(toy, tmp_path)
    manifest = out / "manifest.jsonl"
    good = manifest.read_text().splitlines()
    manifest.write_bytes(("\n".join([good[0], "{torn", "[1, 2]", '{"index": "x", "file": "a.png"}',
                                     '{"index": 1, "file": "../../etc/passwd"}']) + "\n").encode() + b"\xff\xfe\n")
    (out / "000001.png").unlink()
    prompts = tmp_path / "ok.txt"
    capsys.readouterr()
    assert main(["generate", "--toy", "t", "--prompts", str(prompts), "--outdir", str(out), "--resume", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "skipped 5 unreadable line(s)" in err, err
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [(r["index"], r["file"]) for r in records] == [(0, "000000.png"), (1, "000001.png")]
    assert (out / "000001.png").is_file()


def test_manifest_that_is_a_folder_fails_before_loading(toy, tmp_path, capsys):
    out, _ = _earlier_run(toy, tmp_path)
    (out / "manifest.jsonl").unlink()
    (out / "manifest.jsonl").mkdir()
    assert main(["generate", "--toy", "t", "--prompts", str(tmp_path / "ok.txt"), "--outdir", str(out),
                 "--resume"]) == 2
    assert "manifest.jsonl exists and is not a file" in _one_line_error(capsys.readouterr().err)
    assert toy.loads == []
