"""CFG-parallel: the two halves of every guided model call on the two ranks of a pair (xDiT's idea).

The pipelines batch a guided step as ONE model call on 2B rows ([uncond; cond] for SD, [cond;
uncond] for GLIDE). BatchSplitModel wraps that model: each rank of the pair runs its half of the
rows, the halves are exchanged with all_gather, and both ranks continue with the full output, so
both take the same scheduler step (same per-image generators) and stay equal, and the images are
those of one process. Nothing in the pipelines changes: enable_cfg_parallel swaps the model for
the wrapper. Unguided calls whose batch splits evenly are split the same way (data parallel
within the pair); others run whole on both ranks.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_ATTRS = ("unet", "base_model", "upsampler_model")  # the denoisers of diffkern's pipelines


class BatchSplitModel(nn.Module):
    """`module` run on this rank's share of the batch (dim 0), the shares all_gathered over `group`.

    Positional and keyword tensors whose first dimension is the batch are split (x, batched t, text
    embeddings, tokens, masks, ...); others (a scalar t) go whole. Attributes the pipelines read
    (config, dtype, ...) are the wrapped module's.
    """

    def __init__(self, module, group, rank, size):
        super().__init__()
        self.module, self.group, self.part, self.parts = module, group, rank, size
        self.split_calls = 0  # calls that ran split (tests check that CFG-parallel really ran)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args, **kwargs):
        # the batch is the first tensor argument's first dimension (x, or sample= for diffusers-style calls)
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        n = 0 if first is None else first.shape[0]
        if n == 0 or n % self.parts:
            return self.module(*args, **kwargs)
        m = n // self.parts
        self.split_calls += 1
        rows = slice(self.part * m, (self.part + 1) * m)

        def cut(v):
            return v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

        out = self.module(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
        out = out if isinstance(out, torch.Tensor) else out[0]  # diffusers models return an output object
        shares = [torch.empty_like(out) for _ in range(self.parts)]
        torch.distributed.all_gather(shares, out.contiguous(), group=self.group)
        return torch.cat(shares)


def enable_cfg_parallel(pipe, context, attrs=MODEL_ATTRS):
    """Wrap the pipeline's denoisers (`attrs` that it has) in BatchSplitModel over the context's pair;
    returns the pipeline. A single-process context (no pair) leaves it as it is."""
    if not context.cfg_parallel:
        return pipe
    wrapped = 0
    for name in attrs:
        model = getattr(pipe, name, None)
        if model is not None and not isinstance(model, BatchSplitModel):
            setattr(pipe, name, BatchSplitModel(model, context.cfg_group, context.cfg_rank, 2))
            wrapped += 1
    if not wrapped:
        raise ValueError(f"pipe: {type(pipe).__name__} has none of {', '.join(attrs)} to run CFG-parallel")
    return pipe


def disable_cfg_parallel(pipe, attrs=MODEL_ATTRS):
    """Undo enable_cfg_parallel; returns the pipeline."""
    for name in attrs:
        model = getattr(pipe, name, None)
        if isinstance(model, BatchSplitModel):
            setattr(pipe, name, model.module)
    return pipe
