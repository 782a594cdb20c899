"""GLIDE / improved-DDPM timestep respacing. (The beta schedules are diffusers' own:
`betas_for_alpha_bar` and `rescale_zero_terminal_snr` are re-exported from it.)"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr

__all__ = ["betas_for_alpha_bar", "rescale_zero_terminal_snr", "respaced_betas", "space_timesteps"]


def space_timesteps(num_timesteps, section_counts):
    """Timesteps to keep from the original process (improved DDPM / GLIDE `space_timesteps`).

    section_counts: a list of ints or a string "10,15,20" (the process is cut into equal sections
    and each keeps that many evenly strided steps), "ddimN" (one integer stride giving exactly N
    steps, as in the DDIM paper) or "fastN" with N = 27 (GLIDE's "10,10,3,2,2" with the noisiest
    kept step T-1 replaced by T-3). Returns a set of ints.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired:
                    return set(range(0, num_timesteps, i))
            raise ValueError(
                f"cannot create exactly {desired} steps out of {num_timesteps} with an integer stride"
            )
        if section_counts == "fast27":
            steps = space_timesteps(num_timesteps, "10,10,3,2,2")
            # GLIDE: avoids DDIM artifacts from the noisiest timestep
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return steps
        if section_counts.startswith("fast"):
            raise ValueError(f"unknown respacing {section_counts!r}: only 'fast27' is defined (as in GLIDE)")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"respacing must be 'ddimN', 'fast27' or comma-separated ints, got {section_counts!r}"
            ) from None
    if not section_counts or any(c < 0 for c in section_counts):
        raise ValueError(
            f"section counts must be a non-empty list of non-negative ints, got {section_counts!r}"
        )
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            all_steps.append(start_idx + round(cur))
            cur += frac_stride
        start_idx += size
    return set(all_steps)


def respaced_betas(alphas_cumprod, use_timesteps):
    """(new_betas, timestep_map) of improved DDPM's SpacedDiffusion: beta_i = 1 - abar_i / abar_prev
    over the kept timesteps, so the kept alphas_cumprod are unchanged. float64 betas."""
    kept = sorted(int(t) for t in use_timesteps)
    acp = alphas_cumprod.double()[kept]
    prev = torch.cat([acp.new_ones(1), acp[:-1]])
    return 1 - acp / prev, kept
