"""Public functional ops. Each op family lives in its own module with its backend table."""

from diffkern._dispatch import available_backends, registered_ops, unavailable_reasons
from diffkern.ops.attention import attention, attention_backend
from diffkern.ops.group_norm import group_norm, group_norm_backend

__all__ = ["attention", "attention_backend", "group_norm", "group_norm_backend", "available_backends", "unavailable_reasons", "registered_ops"]
