"""Run existing diffusers code on diffkern: `patch` / `unpatch`, attention processors, fused norm
sites, scheduler swap, and a diffkern route through diffusers' attention dispatcher.

The only place in diffkern that imports diffusers at run time; importing this package does not
import diffusers (each function does, when called).

    import diffkern
    report = diffkern.patch(pipe)      # attention, GroupNorm+SiLU and the scheduler on diffkern
    print(report)
    diffkern.unpatch(pipe)             # back to diffusers' own, the very same objects
"""

from diffkern.integrations.diffusers.dispatcher import (
    attention_backend,
    diffkern_attention,
    dispatcher_unavailable,
)
from diffkern.integrations.diffusers.norms import GroupNormSiLU, SiLUFusedIntoNorm
from diffkern.integrations.diffusers.patch import PatchReport, patch, unpatch
from diffkern.integrations.diffusers.processors import DiffkernAttnAddedKVProcessor, DiffkernAttnProcessor

__all__ = [
    "DiffkernAttnAddedKVProcessor", "DiffkernAttnProcessor", "GroupNormSiLU", "PatchReport",
    "SiLUFusedIntoNorm",
    "attention_backend", "diffkern_attention", "dispatcher_unavailable", "patch", "unpatch",
]
