"""`diffkern generate --model sdxl` on a tiny SDXL diffusers folder: the PNG is diffusers' image, and the
option checks say what is wrong before anything is loaded."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffkern.cli import main

diffusers = pytest.importorskip("diffusers")

from . import SD_SCHEDULER_CONFIG, clip_tokenizer, tiny_vae  # noqa: E402
from .test_sdxl import _encoders, _unet  # noqa: E402


def test_generate_writes_diffusers_image_and_checks_options(tmp_path, capsys):
    tok = clip_tokenizer(tmp_path / "tok")
    enc1, enc2 = _encoders(tok)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok, unet=_unet(6),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "sdxl")
    want = pipe("a red cat", num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(3)).images[0]
    out = tmp_path / "cat.png"
    assert main(["generate", "--sdxl", str(tmp_path / "sdxl"), "--prompt", "a red cat", "--steps", "2",
                 "--height", "32", "--width", "32", "--seed", "3", "--device", "cpu", "--quiet",
                 "--output", str(out)]) == 0
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1  # uint8 rounding of equal images

    folder = str(tmp_path / "sdxl")
    for argv, message in (
            (["--sdxl", str(tmp_path / "nowhere")], "not a diffusers pipeline folder"),
            (["--sdxl", folder, "--mask-image", str(out)], "--mask-image: give the --sdxl-init-image"),
            (["--sdxl", folder, "--high-noise-frac", "1.5"], "--high-noise-frac"),
            (["--sdxl", folder, "--sdxl-scheduler", "nope"], "unknown scheduler"),
            (["--sdxl", folder, "--init-image", str(out)], "--init-image"),
            (["--checkpoint", folder], "use `diffkern generate --sdxl")):  # SD's runner would crash on it
        assert main(["generate", "--prompt", "x", "--output", str(tmp_path / "x.png"), *argv]) == 2
        assert message in capsys.readouterr().err
