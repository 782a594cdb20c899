"""Public functional ops. Each op family lives in its own module with its backend table."""

from diffkern._dispatch import available_backends, registered_ops, unavailable_reasons
from diffkern.ops.attention import attention, attention_backend
from diffkern.ops.dynamic_threshold import dynamic_threshold, dynamic_threshold_backend
from diffkern.ops.group_norm import group_norm, group_norm_backend
from diffkern.ops.guided_step import guided_step, guided_step_backend
from diffkern.ops.sampler_update import sampler_update, sampler_update_backend

__all__ = ["attention", "attention_backend", "dynamic_threshold", "dynamic_threshold_backend", "group_norm", "group_norm_backend", "guided_step", "guided_step_backend", "sampler_update", "sampler_update_backend", "available_backends", "unavailable_reasons", "registered_ops"]
