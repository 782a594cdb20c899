"""Two processes under torchrun (gloo, 127.0.0.1): prompts sharded by rank with byte-identical PNGs and
one merged manifest, a failing rank reported with its prompt and nothing written lost, CFG-parallel
images equal to one process's (SD through the CLI, GLIDE through the Python API). One launch runs
every case (tests/distributed/_worker.py): starting processes is most of the time."""

import json

import numpy as np
import pytest
from PIL import Image

from diffkern.cli import main
from diffkern.distributed import read_records
from tests.distributed._helpers import ROOT, SD_ARGS, files, torchrun

PROMPTS = ["a photo of a cat", "a red dog", "the moon", "an astronaut", "a blue painting"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, sd_dir, glide_files):
    d = tmp_path_factory.mktemp("multiprocess")
    sd = sd_dir / "sd"
    glide, glide_tok, glide_options = glide_files
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    bad = [{"prompt": p} for p in PROMPTS]
    # more steps than the scheduler's 1000 training steps: a setting only the loaded scheduler can refuse, so it
    # fails at run time, on rank 1 (a height of 33, say, is now refused by the CLI before anything is loaded)
    bad[3]["steps"] = 1001
    (d / "bad.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bad))
    cfg = {"sd": str(sd), "sd_args": SD_ARGS, "prompts": str(d / "prompts.txt"), "bad_prompts": str(d / "bad.jsonl"),
           "out_dp": str(d / "dp"), "out_cfg": str(d / "cfg"), "glide": str(glide), "glide_tok": str(glide_tok),
           "glide_options": glide_options, "report": str(d / "rank-RANK.json")}
    (d / "cfg.json").write_text(json.dumps(cfg))
    proc = torchrun([ROOT / "tests" / "distributed" / "_worker.py", d / "cfg.json"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((d / f"rank-{r}.json").read_text()) for r in range(2)]
    return d, proc, reports


@pytest.fixture
def single(sd_dir):
    """Run the CLI in this process (one process) on the tiny SD folder."""

    def run(prompts, outdir, *extra):
        assert main(["generate", "--checkpoint", str(sd_dir / "sd"), *SD_ARGS, "--prompts", str(prompts),
                     "--outdir", str(outdir), *extra]) == 0

    return run


def test_two_ranks_on_gloo(launched):
    _, _, reports = launched
    assert [(r["rank"], r["world"], r["backend"]) for r in reports] == [(0, 2, "gloo"), (1, 2, "gloo")]


def test_failing_rank_reported_nothing_lost_and_resume_finishes_byte_identical(launched, single, tmp_path):
    d, proc, reports = launched
    assert [r["status_dp"] for r in reports] == [1, 1]  # every rank exits with the failure
    # batches of 1 dealt round-robin: rank 1 has images 1 and 3 and fails on 3 (line 4); all stop after
    # that round, so image 4 (rank 0's third) is not made
    assert "rank 1 failed on image 3 (prompt line 4: 'an astronaut'" in proc.stderr
    assert "1001" in proc.stderr and "--resume" in proc.stderr
    dp = d / "dp"
    assert sorted(files(dp)) == ["000000.png", "000001.png", "000002.png"]
    assert [r["index"] for r in read_records(dp / "manifest.jsonl")] == [0, 1, 2]
    assert not (dp / ".manifest").exists()  # the rank logs were merged
    # fix the line and resume in one process: only the missing images are made
    (d / "fixed.txt").write_text("\n".join(PROMPTS) + "\n")
    before = {n: (dp / n).stat().st_mtime_ns for n in files(dp)}
    single(d / "fixed.txt", dp, "--resume")
    assert {n: (dp / n).stat().st_mtime_ns for n in before} == before
    single(d / "fixed.txt", tmp_path / "fresh")
    assert files(dp) == files(tmp_path / "fresh")  # 2 ranks + resume == 1 process, byte for byte
    assert read_records(dp / "manifest.jsonl") == read_records(tmp_path / "fresh" / "manifest.jsonl")


def test_cfg_parallel_sd_cli_equals_one_process(launched, single, tmp_path):
    d, _, reports = launched
    assert [r["status_cfg"] for r in reports] == [0, 0]
    # 5 prompts in batches of 2 -> 3 batches x 2 steps, each guided step split over the pair
    assert [r["sd_split_calls"] for r in reports] == [6, 6]
    single(d / "prompts.txt", tmp_path / "one", "--batch-size", "2")
    # the pair runs each half of the guided batch alone: equal up to BLAS rounding of a half batch (on
    # this tiny UNet the bytes were equal when written; one 8-bit level is allowed, see _worker._glide_cfg)
    assert sorted(files(d / "cfg")) == sorted(files(tmp_path / "one")) and len(files(d / "cfg")) == 5
    for name in files(d / "cfg"):
        a, b = (np.asarray(Image.open(p / name), dtype=np.int16) for p in (d / "cfg", tmp_path / "one"))
        assert np.abs(a - b).max() <= 1, name
    assert read_records(d / "cfg" / "manifest.jsonl") == read_records(tmp_path / "one" / "manifest.jsonl")


def test_cfg_parallel_glide_api_equals_one_process(launched):
    _, _, reports = launched
    # equal up to float rounding (see _worker._glide_cfg): within one 8-bit level
    assert all(r["glide_max_diff"] < 2e-3 and r["glide_max_levels"] <= 1 for r in reports), reports
    assert [r["glide_split_calls"] for r in reports] == [3, 3]  # respacing "3": 3 guided base steps
