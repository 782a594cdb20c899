"""The `diffkern` command: clear exit-2 messages without a checkpoint, and `generate` end to end on
tiny diffusers pipeline folders saved in tmp_path (2 steps at 32x32)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from diffkern.cli import main
from tests.pipelines import (
    SD_SCHEDULER_CONFIG,
    bert_tokenizer,
    clip_tokenizer,
    tiny_clip,
    tiny_ldmbert,
    tiny_unet,
    tiny_vae,
)

PROMPT = "a photo of a cat"


def test_no_checkpoint_exits_2_with_where_to_put_weights(capsys):
    assert main(["generate", "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint given" in err and "model_index.json" in err
    assert "runwayml/stable-diffusion-v1-5" in err and ".safetensors" in err and "Traceback" not in err


def test_missing_checkpoint_path_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "-m", "diffkern", "generate", "--checkpoint", str(missing),
                           "--prompt", PROMPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"checkpoint not found: {missing}" in proc.stderr
    assert "CompVis/ldm-text2im-large-256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_command_and_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["paint"]) == 2
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", PROMPT, "--backend", "warp"]) == 2
    assert "unknown backend 'warp'" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", PROMPT, "--output", "x.nope"]) == 2
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", PROMPT]) == 2  # no model_index.json
    assert "cannot load checkpoint" in capsys.readouterr().err


def test_info_and_bench_delegate(capsys):
    assert main(["info", "--json"]) == 0
    assert '"diffkern"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # argparse of diffkern.bench answers --help
        main(["bench", "--help"])
    assert exit_.value.code == 0 and "--quick" in capsys.readouterr().out


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("sd")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=clip_tokenizer(root / "tok"), unet=tiny_unet(),
        scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


def test_generate_writes_the_png_diffusers_draws(sd_folder, tmp_path, capsys):
    folder, reference = sd_folder
    out = tmp_path / "sub" / "out.png"
    argv = ["generate", "--checkpoint", str(folder), "--prompt", PROMPT, "--negative-prompt", "a dog",
            "--steps", "2", "--seed", "3", "--height", "32", "--width", "32", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, negative_prompt="a dog", num_inference_steps=2, height=32, width=32,
                         generator=torch.Generator().manual_seed(3)).images[0]
    got = _png(out)
    assert got.shape == (32, 32, 3)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1  # rounding to 8 bits at most


def test_generate_img2img_ddpm_several_images(sd_folder, tmp_path):
    from PIL import Image

    folder, _ = sd_folder
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(init)
    out = tmp_path / "edit.png"
    argv = ["generate", "--checkpoint", str(folder), "--prompt", PROMPT, "--steps", "3",
            "--scheduler", "ddpm", "--init-image", str(init), "--strength", "0.6", "--num-images", "2",
            "--backend", "reference", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    a, b = _png(tmp_path / "edit-0.png"), _png(tmp_path / "edit-1.png")
    assert a.shape == b.shape == (32, 32, 3) and not np.array_equal(a, b)  # two different noise draws


def test_generate_ldm_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.LDMTextToImagePipeline(
        vqvae=tiny_vae(levels=4), bert=tiny_ldmbert(), tokenizer=bert_tokenizer(tmp_path / "tok"),
        unet=tiny_unet(), scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG))
    pipe.save_pretrained(tmp_path / "ldm")
    out = tmp_path / "ldm.png"
    argv = ["generate", "--checkpoint", str(tmp_path / "ldm"), "--prompt", PROMPT, "--steps", "2",
            "--guidance", "6", "--height", "32", "--width", "32", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, num_inference_steps=2, guidance_scale=6.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(_png(out) - np.asarray(expected, dtype=np.int16)).max() <= 1


def _single_file(path):
    """A CompVis-layout SD 1.x file from diffusers / transformers models shaped by SD's rules (8 heads,
    32 groups, 64-wide CLIP heads), which is what the single-file loader infers configs from."""
    from diffkern.models import compvis
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                        num_attention_heads=1, num_hidden_layers=2))
    unet_sd = compvis.unet_to_compvis(unet.state_dict(), dict(unet.config))
    sd = {compvis.UNET_PREFIX + k: v for k, v in unet_sd.items()}
    sd.update({compvis.VAE_PREFIX + k: v for k, v in compvis.vae_to_compvis(vae.state_dict()).items()})
    sd.update({compvis.CLIP_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k: v
               for k, v in clip.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def test_generate_single_file_needs_and_takes_a_tokenizer(tmp_path, capsys):
    pytest.importorskip("diffusers")
    ckpt = tmp_path / "tiny-sd.safetensors"
    _single_file(ckpt)
    out = tmp_path / "single.png"
    argv = ["generate", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--steps", "2", "--height", "32",
            "--width", "32", "--quiet", "--output", str(out)]
    assert main(argv) == 2
    assert "--tokenizer" in capsys.readouterr().err and not out.exists()
    clip_tokenizer(tmp_path / "tok")
    assert main(argv + ["--tokenizer", str(tmp_path / "tok")]) == 0
    assert _png(out).shape == (32, 32, 3)


def test_a_model_family_plugs_in_with_one_registry_line(monkeypatch, tmp_path, capsys):
    """diffkern.cli.FAMILIES: a module with the documented attributes gets both modes and the checks."""
    import types

    from PIL import Image

    from diffkern import cli
    from diffkern.distributed import read_records

    toy = types.ModuleType("toy_family")
    toy.NAME, toy.SELECT, toy.SHARED = "Toy", "--toy", ("steps",)
    toy.add_arguments = lambda group: group.add_argument("--toy")
    toy.selected_by = lambda args: args.toy is not None
    calls = []
    toy.generate = lambda args: calls.append((args.toy, args.prompt, args.steps)) or []

    class Runner:
        accepts, defaults, metadata, pipe = ("steps",), {"steps": 1}, {"model": "toy"}, None

        def __call__(self, jobs, generators):
            return [Image.new("RGB", (4, 4), (j.seed, j.settings["steps"], 0)) for j in jobs]

    toy.make_runner = lambda args, device: Runner()
    monkeypatch.setitem(sys.modules, "toy_family", toy)
    monkeypatch.setitem(cli.FAMILIES, "toy", "toy_family")
    assert main(["generate", "--toy", "t", "--prompt", "p", "--steps", "3"]) == 0 and calls == [("t", "p", 3)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 9}\n')
    assert main(["generate", "--model", "toy", "--prompts", str(prompts), "--outdir", str(tmp_path / "o"),
                 "--seed", "5", "--quiet"]) == 0
    assert [(r["seed"], r["steps"], r["model"]) for r in read_records(tmp_path / "o" / "manifest.jsonl")] == [
        (5, 1, "toy"), (6, 9, "toy")]
    assert Image.open(tmp_path / "o" / "000001.png").getpixel((0, 0)) == (6, 9, 0)
    capsys.readouterr()
    assert main(["generate", "--toy", "t", "--checkpoint", "x", "--prompt", "p"]) == 2
    assert "give --checkpoint (Stable Diffusion / LDM) or --toy (Toy), not both" in capsys.readouterr().err
    assert main(["generate", "--toy", "t", "--negative-prompt", "n", "--prompt", "p"]) == 2
    assert "--negative-prompt: Stable Diffusion / LDM options, not Toy's" in capsys.readouterr().err
    assert main(["generate", "--model", "sd", "--toy", "t", "--prompt", "p"]) == 2
    assert "--toy: Toy options, not Stable Diffusion / LDM's" in capsys.readouterr().err


def test_generate_scheduler_by_alias_draws_what_diffusers_draws(sd_folder, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder, reference = sd_folder
    out = tmp_path / "k.png"
    argv = ["generate", "--checkpoint", str(folder), "--prompt", PROMPT, "--steps", "3", "--seed", "1",
            "--scheduler", "dpm++2m_karras", "--height", "32", "--width", "32", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    pipe = diffusers.StableDiffusionPipeline(**reference.components)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(reference.scheduler.config,
                                                                       use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, num_inference_steps=3, height=32, width=32,
                    generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(_png(out) - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_generate_unknown_scheduler_is_a_usage_error(sd_folder, capsys):
    folder, _ = sd_folder
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--checkpoint", str(folder), "--prompt", PROMPT, "--scheduler", "nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--scheduler" in err and "unknown scheduler 'nope'" in err and "euler_a" in err
