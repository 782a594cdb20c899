"""The benchmark suite (the main job) runs end to end and writes its table, JSON and markdown."""

import json

import torch

from diffkern.bench import __main__ as bench
from diffkern.bench import end_to_end, group_norm, harness, models, report, timing


def _no_timing(monkeypatch):
    """Smoke tests: every candidate runs once, every timing is a steady 1 ms (no measuring)."""
    def fake(fns, device, log=None, **kw):
        for fn in fns.values():
            if fn is not None:
                fn()
        return {n: (None if fn is None else timing.Timing([1e-3] * 7)) for n, fn in fns.items()}

    monkeypatch.setattr(harness, "time_cpu", lambda fn, min_run_time=0.5: (fn(), 1e-3)[1])
    monkeypatch.setattr(timing, "interleaved", fake)


def test_bench_quick_run_writes_results(tmp_path, capsys, monkeypatch):
    _no_timing(monkeypatch)
    kernel_suites = [op for op in bench.SUITES if op not in ("models", "end_to_end")]  # see the tests below
    assert bench.main(["--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path),
                       "--ops", *kernel_suites]) == 0
    out = capsys.readouterr().out
    assert "| case" in out and "reference" in out
    assert list(tmp_path.glob("attention-*.json"))
    (json_file,) = tmp_path.glob("group_norm-*.json")
    data = json.loads(json_file.read_text())
    assert {"date", "git_sha", "torch", "device", "command", "allocator"} <= set(data["environment"])
    backends = {r["backend"] for r in data["rows"]}
    assert {"reference", "cpu"} <= backends
    assert all(r["gbps"] > 0 for r in data["rows"] if r["gbps"] is not None)
    assert list(tmp_path.glob("group_norm-*.md"))
    assert "load average" in out and "== summary" in out and "targets:" in out
    (index,) = tmp_path.glob("index-*-quick.md")
    text = index.read_text()
    for op in kernel_suites:
        assert f"| {op} | [{op}-" in text
    assert "load average at the start" in text


def test_default_output_is_the_untracked_folder():
    import subprocess
    from pathlib import Path

    assert bench.DEFAULT_OUT == "benchmarks/out"
    root = Path(bench.__file__).resolve().parents[2]
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/out/x.json"], cwd=root)
    assert ignored.returncode == 0, "benchmarks/out/ must be gitignored"


def test_cases_cover_the_issue_shapes():
    shapes = {c.shape for c in group_norm.cases(torch.device("cpu"))}
    assert set(group_norm.SD15) <= shapes and set(group_norm.GLIDE) <= shapes
    gpu = group_norm.cases(torch.device("cuda"))
    assert {str(c.dtype) for c in gpu} == {"torch.float16", "torch.bfloat16"}
    assert {c.layout for c in gpu} == {"contiguous", "channels_last"}


TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=16)


def test_models_suite_runs_on_tiny_configs(tmp_path, capsys, monkeypatch):
    """The real configurations are too big for CI: the same suite on tiny ones, every case."""
    _no_timing(monkeypatch)
    monkeypatch.setattr(models, "SD15_UNET", TINY_UNET)
    monkeypatch.setattr(models, "SD21_UNET", dict(TINY_UNET, use_linear_projection=True, attention_head_dim=(2, 4)))
    monkeypatch.setattr(models, "SD_VAE", TINY_VAE)
    from diffkern.models import glide

    tiny_glide = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", num_head_channels=16,
                      attention_resolutions="8", text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2)
    monkeypatch.setattr(glide, "model_and_diffusion_defaults",
                        lambda: dict(glide.model_creation.model_and_diffusion_defaults(), **tiny_glide))
    monkeypatch.setattr(glide, "model_and_diffusion_defaults_upsampler",
                        lambda: dict(glide.model_creation.model_and_diffusion_defaults_upsampler(), **tiny_glide))
    from diffkern.bench import models_if  # DeepFloyd IF rows: tiny UNets, small update shapes

    monkeypatch.setattr(models_if, "CPU_SIZES", dict(i_channels=32, ii_channels=32, head=16, i_side=16, ii_side=16,
                                                     x4_side=16))
    tiny_if = dict(channel_mult="1,2", num_res_blocks=1, attention_resolutions="8", encoder_dim=32,
                   encoder_channels=32, att_pool_heads=2, image_size=16)
    monkeypatch.setattr(models_if, "IF_I_XL", dict(models_if.IF_I_XL, **tiny_if))
    monkeypatch.setattr(models_if, "IF_II", dict(models_if.IF_II, **tiny_if, disable_self_attentions="8"))
    monkeypatch.setattr(models_if, "X4_UNET", dict(TINY_UNET, in_channels=7, num_class_embeds=1000,
                                                   cross_attention_dim=32))
    monkeypatch.setattr(models_if, "UPDATE_SHAPES", ((2, 3, 16, 16),))
    from tests.pipelines._unclip import DECODER as TINY_DECODER, SUPER_RES as TINY_SR
    from diffkern.bench import models_unclip  # Karlo rows: the tiny unCLIP test components' configs

    monkeypatch.setattr(models_unclip, "KARLO_PRIOR", dict(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                                           embedding_dim=32))
    monkeypatch.setattr(models_unclip, "DECODER", TINY_DECODER)
    monkeypatch.setattr(models_unclip, "SUPER_RES", TINY_SR)
    monkeypatch.setattr(models_unclip, "CPU_SIZES", dict(prior_layers=1, decoder_side=16, sr_side=16))
    assert bench.main(["--device", "cpu", "--full", "--no-compile", "--out", str(tmp_path), "--ops", "models"]) == 0
    (json_file,) = tmp_path.glob("models-*.json")
    rows = json.loads(json_file.read_text())["rows"]
    cases = {r["case"].split()[0] for r in rows}
    assert cases == {"sd15-unet-step", "sd21-unet-step", "sd-vae-decode", "sd15-loop", "glide-base-step",
                     "glide-upsample-step", "if-I-step", "if-II-step", "if-III-step", "if-update",
                     "karlo-prior-step", "karlo-decoder-step", "karlo-sr-step"}
    for case in cases - {"glide-base-step", "glide-upsample-step"}:
        assert {"reference", "diffkern", "diffusers"} <= {r["backend"] for r in rows if r["case"].startswith(case)}

    assert list(tmp_path.glob("models-*.csv"))


TINY_GLIDE = dict(num_channels=32, num_res_blocks=1, num_head_channels=16,
                  attention_resolutions="8", text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2)


def test_end_to_end_suite_writes_the_family_table_csv_and_plot(tmp_path, capsys, monkeypatch):
    """Whole pipelines on tiny configs: one row per family and backend with s/image, it/s and memory."""
    monkeypatch.setattr(models, "SD15_UNET", TINY_UNET)
    monkeypatch.setattr(models, "SD_VAE", TINY_VAE)
    from diffkern.models import glide

    monkeypatch.setattr(glide, "model_and_diffusion_defaults",
                        lambda: dict(glide.model_creation.model_and_diffusion_defaults(), **TINY_GLIDE,
                                     channel_mult="1,2,2"))  # the suite's CPU sizes: base 32, upsampler 64
    monkeypatch.setattr(glide, "model_and_diffusion_defaults_upsampler",
                        lambda: dict(glide.model_creation.model_and_diffusion_defaults_upsampler(), **TINY_GLIDE,
                                     channel_mult="1,1,2,2"))
    monkeypatch.setattr(end_to_end, "ROUNDS", {"cpu": 1})  # one timed call per backend (the suite runs 3)
    # one sample has no measurable spread: accept it here, so that the speed-up plot has bars
    assert bench.main(["--device", "cpu", "--full", "--no-compile", "--max-spread", "inf", "--out", str(tmp_path),
                       "--ops", "end_to_end"]) == 0
    (json_file,) = tmp_path.glob("end_to_end-*.json")
    rows = json.loads(json_file.read_text())["rows"]
    assert {(r["extra"]["family"], r["backend"]) for r in rows} == {
        ("sd15", "reference"), ("sd15", "diffkern"), ("sd15", "diffusers"), ("glide", "reference"),
        ("glide", "diffkern")}
    for r in rows:
        e = r["extra"]
        assert e["s_per_image"] > 0 and e["denoise_it_s"] > 0 and e["peak_mib"] > 0
        assert abs(r["median_us"] - 1e6 * e["s_per_image"]) < 1e-6 * r["median_us"]
    md = next(tmp_path.glob("end_to_end-*.md")).read_text()
    assert "| family | size | steps | backend | s / image | denoising it/s | peak memory |" in md
    assert "| sd15 | 64x64 | 3 | diffusers |" in md and "| glide | 32->64 | 3+2 | diffkern |" in md
    csv_text = next(tmp_path.glob("end_to_end-*.csv")).read_text().splitlines()
    assert csv_text[0].startswith("op,case,") and "extra.s_per_image" in csv_text[0] and len(csv_text) == 6
    if report.plots_unavailable() is None:
        (png,) = tmp_path.glob("end_to_end-*-speedup.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in md


def test_report_plots_speedups_and_roofline_from_rows(tmp_path):
    rows = [harness.Row("op", "c1", (1,), "float16", "contiguous", b, 10.0, gb, s, None, "", ex)
            for b, gb, s, ex in [("reference", 100.0, 1.0, {}), ("cuda", 400.0, 4.0, {}),
                                 ("triton", None, 2.0, {"tflops": 300.0})]]
    paths, md = report.write_reports(rows, tmp_path, "op-x", "cuda", copy_gbps=800.0, matmul_tflops=600.0)
    assert [p.name for p in paths] == (["op-x.csv"] if report.plots_unavailable() else
                                       ["op-x.csv", "op-x-speedup.png", "op-x-roofline.png"])
    assert md[0] == "CSV: [op-x.csv](op-x.csv)"
    lines = (tmp_path / "op-x.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[3].endswith(",300.0")


def test_matplotlib_stays_out_of_the_import():
    import subprocess
    import sys

    code = "import sys, diffkern.bench.__main__, diffkern.bench.report; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() \
        == "False"


def test_report_redraws_from_a_results_json(tmp_path, capsys):
    rows = [harness.Row("op", "c1", (2, 3), "float32", "contiguous", b, 5.0, 10.0, s) for b, s in
            [("reference", 1.0), ("cpu", 3.0)]]
    env = {"command": "x", "device": "CPU (test)"}
    json_path, _ = harness.write_results(rows, env, tmp_path, "op-cpu")
    assert report.main([str(json_path), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "op-cpu.csv").read_text().splitlines()[2].startswith("op,c1,2x3,float32")
    assert ("op-cpu-speedup.png" in capsys.readouterr().out) == (report.plots_unavailable() is None)
