"""unCLIP (Karlo) model steps for the models suite: the prior step (CFG batch 2, 77 text tokens + 4 = 81),
the decoder step (2, 3, 64, 64) and the super-resolution step (1, 6, 256, 256), at Karlo's configurations
with random weights. On a CPU (without --full-size): the prior with 2 of its 20 layers (full width),
the decoder at 16x16 and the SR model at 64x64, full channel configurations."""

from __future__ import annotations

import torch

from diffkern.bench import harness
from diffkern.models.checkpoints.karlo import KARLO_DECODER, KARLO_SUPER_RES

# Module constants, so that a smoke test can swap in tiny configurations.
KARLO_PRIOR = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768)
DECODER, SUPER_RES = KARLO_DECODER, KARLO_SUPER_RES
CPU_SIZES = dict(prior_layers=2, decoder_side=16, sr_side=64)
KINDS = ("unclip-prior", "unclip-decoder", "unclip-sr")


def case_specs(full):
    """(name, kind, shape, config) of the three rows."""
    layers = KARLO_PRIOR["num_layers"] if full else min(CPU_SIZES["prior_layers"], KARLO_PRIOR["num_layers"])
    prior = dict(KARLO_PRIOR, num_layers=layers)
    side, sr = (64, 256) if full else (CPU_SIZES["decoder_side"], CPU_SIZES["sr_side"])
    tag = "" if layers == KARLO_PRIOR["num_layers"] else f" ({layers} of {KARLO_PRIOR['num_layers']} layers)"
    return [("karlo-prior-step" + tag, "unclip-prior", (2, 81, prior["embedding_dim"]), prior),
            ("karlo-decoder-step", "unclip-decoder", (2, 3, side, side), DECODER),
            ("karlo-sr-step", "unclip-sr", (1, 6, sr, sr), SUPER_RES)]


def callables(case, device, diffusers):
    """{"diffkern": fn, "diffusers": fn (when diffusers is installed)} with the same random weights."""
    from diffkern import models

    g = torch.Generator().manual_seed(0)
    dt = case.dtype
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dt)  # noqa: E731
    cls = {"unclip-prior": "PriorTransformer", "unclip-decoder": "UNet2DConditionModel",
           "unclip-sr": "UNet2DModel"}[case.kind]
    torch.manual_seed(0)
    if diffusers is not None:
        ref = getattr(diffusers, cls)(**case.config).to(device=device, dtype=dt).eval()
        ours = models.from_diffusers(ref).eval()
    else:
        ref, ours = None, getattr(models, cls)(**case.config).to(device=device, dtype=dt).eval()
    t = torch.tensor(500, device=device)
    B = case.shape[0]
    if case.kind == "unclip-prior":
        D = case.config["embedding_dim"]
        x, proj, text = rnd(B, D), rnd(B, D), rnd(B, 77, D)
        mask = torch.ones(B, 77, dtype=torch.bool, device=device)
        mask[:, 20:] = False  # a padded prompt: the causal + padding bias is in play
        call = lambda m: m(x, t, proj, encoder_hidden_states=text, attention_mask=mask)[0]  # noqa: E731
    elif case.kind == "unclip-decoder":
        temb = rnd(B, case.config["block_out_channels"][0] * 4)  # the text projection's additive embedding
        x, ctx = rnd(*case.shape), rnd(B, 81, case.config["cross_attention_dim"])
        mask = torch.ones(B, 81, dtype=torch.bool, device=device)
        mask[:, 30:] = False
        call = lambda m: _sample(m(sample=x, timestep=t, encoder_hidden_states=ctx, class_labels=temb,  # noqa: E731
                                   attention_mask=mask))
    else:
        x = rnd(*case.shape)
        call = lambda m: _sample(m(x, t))  # noqa: E731
    fns = {"diffkern": lambda: call(ours)}
    if ref is not None:
        fns["diffusers"] = lambda: call(ref)
    return fns


def _sample(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def targets(rows, device):
    """Issue 13's GPU target: the decoder step (fp16, (2, 3, 64, 64)) >= 1.5x diffusers eager."""
    out = []
    for r in rows:
        if device.type != "cuda" or not r.case.startswith("karlo-decoder-step") or r.backend != "diffkern":
            continue
        ref = next((x for x in rows if x.case == r.case and x.backend == "diffusers"), None)
        if ref is not None:
            out.append(harness.target(f"Karlo decoder step {r.dtype} vs diffusers eager", ref.median_us / r.median_us,
                                      1.5, harness.weakest(r, ref)))
    return out
