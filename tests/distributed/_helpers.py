"""Tiny pipelines on disk for the distributed tests, and a torchrun launcher on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SD_ARGS = ["--steps", "2", "--height", "32", "--width", "32", "--quiet"]


def save_tiny_sd(folder):
    """A tiny random SD pipeline folder (diffusers' save_pretrained layout), 32x32 pixels."""
    import diffusers

    from tests.pipelines import SD_SCHEDULER_CONFIG, clip_tokenizer, tiny_clip, tiny_unet, tiny_vae

    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=clip_tokenizer(folder / "tok"), unet=tiny_unet(),
        scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def save_tiny_glide(folder):
    """base.pt (16 px, tests/pipelines/test_glide.py's BASE) + a GPT-2 BPE tokenizer folder."""
    from diffkern.models.glide.tokenizer import bytes_to_unicode
    from tests.pipelines.test_glide import BASE, tiny

    tok = folder / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    merges = [("Ġ", "c"), ("o", "r"), ("g", "i"), ("or", "gi"), ("Ġc", "orgi")]
    vocab = list(bytes_to_unicode().values()) + ["".join(m) for m in merges] + ["<|endoftext|>"]
    (tok / "encoder.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (tok / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    torch.save(tiny(BASE, 0).state_dict(), folder / "base.pt")
    return folder / "base.pt", tok, BASE


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, timeout=240):
    """`torchrun --nproc-per-node nproc ARGS` on this machine only (127.0.0.1, a free port), one thread
    per process; returns the CompletedProcess (stdout and stderr captured)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={nproc}",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def files(folder):
    """{name: bytes} of the PNGs in a folder."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}
