"""DeepFloyd IF / Imagen rows of the models suite (random weights: speed does not depend on values).

- if-I-step: the stage I UNet, CFG batch 2, 3 x 64 x 64, 77 T5 tokens of width 4096 (IF-I-XL, 4.3B).
- if-II-step: a stage II UNet, batch 2, 6 x 256 x 256 (image + noised upscale), noise level as class label.
- if-III-step: the SD x4 upscaler UNet (IF's stage III), batch 2, 7 x 256 x 256 latents (-> 1024 pixels).
- if-update: the element-wise part of an IF step, guidance on the eps channels + learned-range variance +
  dynamic thresholding (ratio 0.95) + DDPM update, at sample (4, 3, 256, 256) and (1, 3, 1024, 1024):
  diffusers' chain (chunk / split / CFG / cat, then DDPMScheduler.step with _threshold_sample) against
  diffkern's DDPMScheduler.step (one fused guided_step pass + the quantile selection).
  `targets` turns the 256 row into the share of a stage II step it costs on each side.
On a CPU (without --full-size) the UNets shrink to what a CPU runs in seconds: stage I at 64 channels (of 704)
and 32 x 32, stage II at 32 channels (of 128) and 64 x 64, both with 32-wide heads, stage III at 32 x 32
latents; the update rows keep their sizes.
"""

from __future__ import annotations

import torch

from diffkern.bench import harness
from diffkern.models.checkpoints.deepfloyd import convert_deepfloyd_config

KINDS = ("if-unet", "if-update")
IF_I_XL = dict(image_size=64, in_channels=3, out_channels=6, model_channels=704, channel_mult="1,2,3,4",
               num_res_blocks=3, attention_resolutions="32,16,8", num_head_channels=64, encoder_dim=4096,
               encoder_channels=2816, att_pool_heads=64, activation="gelu", use_scale_shift_norm=True,
               resblock_updown=True, efficient_activation=True, scale_skip_connection=True)
# A stage II shape as deep-floyd's IF-II (5 levels, resnets (2, 2, 3, 5, 5), cross-attention only at 32 / 16).
IF_II = dict(image_size=256, in_channels=6, out_channels=6, model_channels=128, channel_mult="1,2,4,6,8",
             num_res_blocks="2,2,3,5,5", attention_resolutions="32,16", num_head_channels=64,
             encoder_dim=4096, encoder_channels=1536, att_pool_heads=64, activation="gelu",
             use_scale_shift_norm=True, resblock_updown=True, efficient_activation=True,
             scale_skip_connection=True,
             disable_self_attentions="32,16")
# stabilityai/stable-diffusion-x4-upscaler's unet/config.json
X4_UNET = dict(sample_size=128, in_channels=7, out_channels=4, layers_per_block=2,
               block_out_channels=(256, 512, 512, 1024), attention_head_dim=8, cross_attention_dim=1024,
               down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
               up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
               only_cross_attention=(True, True, True, False), num_class_embeds=1000,
               use_linear_projection=True)
IF_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                    variance_type="learned_range", thresholding=True, dynamic_thresholding_ratio=0.95,
                    sample_max_value=1.0, prediction_type="epsilon")


# CPU sizes (without --full-size): narrow UNets (32-wide heads), small inputs; tests shrink them further.
CPU_SIZES = dict(i_channels=64, ii_channels=32, head=32, i_side=32, ii_side=64, x4_side=32)
UPDATE_SHAPES = ((4, 3, 256, 256), (1, 3, 1024, 1024))


def _config(params, sr, model_channels=None):
    small = {}
    if model_channels is not None:
        small = dict(model_channels=model_channels, num_head_channels=CPU_SIZES["head"])
    config = convert_deepfloyd_config(dict(params, **small))
    if sr:
        config["class_embed_type"] = "timestep"
    return config


def case_specs(full):
    """(name, kind, shape, config) of the IF rows."""
    c = CPU_SIZES
    i_side, ii_side, x4_side = (64, 256, 256) if full else (c["i_side"], c["ii_side"], c["x4_side"])
    i_ch, ii_ch = (None, None) if full else (c["i_channels"], c["ii_channels"])
    tag = "" if full else " (reduced width)"
    return [
        ("if-I-step" + tag, "if-unet", (2, 3, i_side, i_side),
         dict(_config(IF_I_XL, False, i_ch), text=IF_I_XL["encoder_dim"])),
        ("if-II-step" + tag, "if-unet", (2, 6, ii_side, ii_side),
         dict(_config(IF_II, True, ii_ch), text=IF_II["encoder_dim"])),
        ("if-III-step", "if-unet", (2, 7, x4_side, x4_side),
         dict(X4_UNET, text=X4_UNET["cross_attention_dim"])),
    ] + [("if-update", "if-update", shape, IF_SCHEDULER) for shape in UPDATE_SHAPES]


def callables(case, device, diffusers):
    """{"diffkern": fn, "diffusers": fn (when diffusers is installed)} of one row."""
    if case.kind == "if-update":
        return _update_callables(case, device, diffusers)
    from diffkern import models

    config = {k: v for k, v in case.config.items() if k != "text"}
    g = torch.Generator().manual_seed(0)
    dt = case.dtype
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dt)  # noqa: E731
    torch.manual_seed(0)
    if diffusers is not None:
        ref = diffusers.UNet2DConditionModel(**config).to(device=device, dtype=dt).eval()
        ours = models.from_diffusers(ref).eval()
    else:
        ref, ours = None, models.UNet2DConditionModel(**config).to(device=device, dtype=dt).eval()
    B = case.shape[0]
    x, text, t = rnd(*case.shape), rnd(B, 77, case.config["text"]), torch.tensor(500, device=device)
    labels = None
    if config.get("class_embed_type") == "timestep" or config.get("num_class_embeds"):
        labels = torch.full((B,), 100, device=device, dtype=torch.long)

    def call(m):
        out = m(x, t, encoder_hidden_states=text, class_labels=labels)
        return out if isinstance(out, torch.Tensor) else out[0]

    fns = {"diffkern": lambda: call(ours)}
    if ref is not None:
        fns["diffusers"] = lambda: call(ref)
    return fns


def _update_callables(case, device, diffusers):
    """IF's per-step update on the UNet's (2B, 6, H, W) output: CFG on the eps channels, variance from
    the text branch, learned-range DDPM step with dynamic thresholding."""
    from diffkern import schedulers

    g = torch.Generator().manual_seed(0)
    B, C, H, W = case.shape
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    out = torch.randn(2 * B, 2 * C, H, W, generator=g).to(device=device, dtype=case.dtype) * 3
    uncond, cond = out.chunk(2)
    w = 4.0
    ours = schedulers.DDPMScheduler(**case.config)
    ours.set_timesteps(50, device=device)
    t = int(ours.timesteps[20])
    # both sides draw the step's noise from a generator, as the pipelines do
    gen = torch.Generator(device=device).manual_seed(0)
    fns = {"diffkern": lambda: ours.step(cond, t, x, uncond_output=uncond, guidance_scale=w, generator=gen,
                                         return_dict=False)[0]}
    if diffusers is not None:
        theirs = diffusers.DDPMScheduler(**case.config)
        theirs.set_timesteps(50, device=device)

        def chain():
            u, c = out.chunk(2)
            u_eps, _ = u.split(C, dim=1)
            c_eps, var = c.split(C, dim=1)
            pred = torch.cat([u_eps + w * (c_eps - u_eps), var], dim=1)
            return theirs.step(pred, t, x, generator=gen, return_dict=False)[0]

        fns["diffusers"] = chain
    return fns


def targets(rows, device):
    """Issue 14's GPU target (stage II step >= 1.5x diffusers eager, fp16) and the update's share of a
    stage II step on each side (informational: always 'met')."""
    out = []
    by = {(r.case, r.backend): r for r in rows}
    step = next((r for r in rows if r.case.startswith("if-II-step")), None)
    for r in rows:
        if r.case.startswith("if-II-step") and r.backend == "diffkern" and device.type == "cuda":
            ref = by.get((r.case, "diffusers"))
            if ref is not None:
                out.append(harness.target(f"IF stage II step {r.dtype} vs diffusers eager",
                                          ref.median_us / r.median_us, 1.5, harness.weakest(r, ref)))
    upd = [r for r in rows if r.case.startswith("if-update") and "256, 256" in r.case]
    if step is not None and upd:
        for side in ("diffusers", "diffkern"):
            u, s = by.get((upd[0].case, side)), by.get((step.case, side))
            if u is not None and s is not None:
                share = u.median_us / (u.median_us + s.median_us)
                out.append((f"IF update (4, 3, 256, 256) as a share of update + {step.case} on {side}: "
                            f"{100 * share:.1f}% ({u.median_us / 1e3:.2f} ms)", True))
    return out
