"""GroupNorm module with optional fused scale-shift and SiLU / GELU."""

import torch

from diffkern import ops
from diffkern.ops.group_norm import ACTIVATIONS


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm plus a fused activation and ADM scale-shift, on diffkern.ops.group_norm.

    Same parameters and state_dict keys (weight, bias) as torch.nn.GroupNorm, so checkpoints load
    either way. forward(x, scale=None, shift=None) computes
    act((GN(x) * weight + bias) * (1 + scale) + shift) with scale, shift of shape (N, C).

    Args:
        num_groups, num_channels, eps, affine, device, dtype: as torch.nn.GroupNorm.
        activation: None, "silu", "gelu" (erf, nn.GELU()) or "gelu_tanh" (nn.GELU(approximate="tanh")).
        backend: forced backend name for every call, or None to dispatch per call.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation=None, backend=None,
                 device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"GroupNorm: activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, x, scale=None, shift=None):
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, scale=scale, shift=shift,
                              activation=self.activation, backend=self.backend)

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation!r}"
