"""Modules on top of diffkern.ops, state-dict compatible with their torch.nn counterparts."""

from diffkern.nn.attention import Attention
from diffkern.nn.group_norm import GroupNorm

__all__ = ["Attention", "GroupNorm"]
