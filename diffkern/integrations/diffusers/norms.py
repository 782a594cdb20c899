"""GroupNorm -> SiLU / GELU sites of diffusers models, run as one fused `diffkern.ops.group_norm` call.

The activation is the one the site applies: nn.SiLU -> "silu", nn.GELU() -> "gelu" (erf; diffusers'
act_fn "gelu", DeepFloyd IF's resnets and conv_norm_out), nn.GELU(approximate="tanh") -> "gelu_tanh".
Anything else (Mish, ReLU, a subclass) is left to diffusers and reported.

Design (module replacement, chosen so that state dicts, LoRA and hooks keep working):

* The GroupNorm module is replaced by a `GroupNormAct` (old name `GroupNormSiLU`) holding the *same* `weight` / `bias`
  Parameter objects under the same names: state_dict keys are unchanged, `load_state_dict`, LoRA
  fusing and in-place weight edits are visible to it (nothing is baked in), and hooks attached
  after patching (accelerate offloading, diffusers' HookRegistry) find an ordinary module with
  parameters. Modules that already carry hooks are left alone (a replacement would drop them),
  and reported.
* `conv_norm_out -> conv_act` (UNet2DConditionModel, UNet2DModel, the VAE Encoder / Decoder):
  the activation module is used nowhere else, so it becomes `ActFusedIntoNorm` (`SiLUFusedIntoNorm`
  for SiLU), a pass-through.
* `ResnetBlock2D` uses one `nonlinearity` module three times (after norm1, on the time embedding,
  after norm2) and, in the `scale_shift` mode, applies the time embedding between norm2 and the
  activation; a pass-through cannot express that. So the block's class becomes `FusedResnetBlock2D`, a
  subclass whose forward fuses both sites (isinstance checks still see a ResnetBlock2D). A class,
  not a per-instance bound method, because a bound method in the instance dict does not survive
  pickling (torch.save of a whole model): it fails to load, or comes back as diffusers' forward
  over the fused norms (SiLU applied twice); a class is found by name. Hooks attached later (accelerate's `add_hook_to_module`, diffusers'
  HookRegistry) wrap `module.forward` as for any module; blocks already carrying an instance-level
  forward (a hook) are left. The forward calls every submodule as a module (conv1, time_emb_proj,
  dropout, ...) and falls back to diffusers' forward when its norms are not the fused ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffkern import ops
from diffkern.integrations.diffusers.processors import warn_deprecated_scale

_HOOK_ATTRS = ("_hf_hook", "_diffusers_hook")


def has_hooks(module: nn.Module) -> bool:
    """True when accelerate / diffusers hooks or an instance-level forward sit on the module."""
    return any(hasattr(module, a) for a in _HOOK_ATTRS) or "forward" in module.__dict__


def fused_activation(module) -> str | None:
    """The ops.group_norm activation name an activation module computes exactly ("silu", "gelu",
    "gelu_tanh"), or None when it is not one the kernels fuse (only these exact classes: a subclass
    may compute something else)."""
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return None


def _eager_activation(y, activation):
    if activation == "silu":
        return F.silu(y)
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


class GroupNormAct(nn.Module):
    """GroupNorm, optional ADM scale-shift, then SiLU or GELU in one `diffkern.ops.group_norm` call.

    Built by `from_group_norm` around an existing `nn.GroupNorm`'s Parameters (shared, not copied).
    forward(x, scale=None, shift=None) = act(group_norm(x) * (1 + scale) + shift); scale / shift
    are (N, C) or (N, C, 1, ...) (the shape ResnetBlock2D's time embedding has). `activation` is
    "silu" (the default, and what modules pickled before GELU existed hold), "gelu" or "gelu_tanh".
    """

    activation = "silu"  # class default: instances pickled as GroupNormSiLU carry no attribute

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str = "silu"):
        super().__init__()
        _check_activation(activation)
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, activation: str = "silu") -> "GroupNormAct":
        """A GroupNormAct sharing `norm`'s weight and bias Parameters (same objects)."""
        _check_activation(activation)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_groups, new.num_channels = norm.num_groups, norm.num_channels
        new.eps, new.affine = norm.eps, norm.affine
        new.activation = activation
        new.register_parameter("weight", norm.weight)
        new.register_parameter("bias", norm.bias)
        new.train(norm.training)
        return new

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None):
        N, C = x.shape[0], x.shape[1]
        if scale is not None:
            scale, shift = scale.reshape(scale.shape[0], -1), shift.reshape(shift.shape[0], -1)
        fusable = (self.weight is None or self.weight.dtype == x.dtype) and (
            scale is None or (scale.shape == (N, C) and shift.shape == (N, C) and scale.dtype == x.dtype
                              and shift.dtype == x.dtype))
        if not fusable:  # mixed dtypes or a broadcast time embedding: the eager chain, as diffusers runs it
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            if scale is not None:
                extra = (1,) * (x.dim() - 2)
                y = y * (1 + scale.reshape(scale.shape + extra)) + shift.reshape(shift.shape + extra)
            return _eager_activation(y, self.activation)
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, scale=scale, shift=shift,
                              activation=self.activation)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation}")


# The name before GELU: pickles and callers of diffkern.integrations.diffusers.GroupNormSiLU keep working.
GroupNormSiLU = GroupNormAct


def _check_activation(activation):
    if activation not in ("silu", "gelu", "gelu_tanh"):
        raise ValueError(f"GroupNormAct: activation must be 'silu', 'gelu' or 'gelu_tanh', got {activation!r}")


class ActFusedIntoNorm(nn.Identity):
    """Pass-through standing where an activation was: it runs fused in the GroupNormAct before it."""


class SiLUFusedIntoNorm(ActFusedIntoNorm):
    """Pass-through standing where a SiLU was: the SiLU runs fused in the GroupNormAct before it."""


def to_group_norm(fused: GroupNormAct, original: nn.GroupNorm) -> nn.GroupNorm:
    """The original GroupNorm, given the fused module's current Parameters (moved / reloaded ones)."""
    original.register_parameter("weight", fused.weight)
    original.register_parameter("bias", fused.bias)
    original.train(fused.training)
    return original


def _is_plain_group_norm(m) -> bool:
    return type(m) is nn.GroupNorm


# ---------------------------------------------------------------------------------------------
# ResnetBlock2D


def resnet_reasons(block) -> list:
    """Why a ResnetBlock2D cannot take the fused forward (empty: it can)."""
    from diffusers.models.resnet import ResnetBlock2D

    why = []
    if type(block) is not ResnetBlock2D:
        why.append(f"{type(block).__name__} is a subclass of ResnetBlock2D")
    if fused_activation(block.nonlinearity) is None:
        why.append(f"activation is {block.nonlinearity!r}, not SiLU or GELU")
    for name in ("norm1", "norm2"):
        m = getattr(block, name)
        if not _is_plain_group_norm(m):
            why.append(f"{name} is {type(m).__name__}, not nn.GroupNorm")
        elif has_hooks(m):
            why.append(f"{name} carries hooks (patch before enabling offloading / caching)")
    if has_hooks(block):
        why.append("the block carries hooks or an instance forward "
                   "(patch before enabling offloading / caching)")
    return why


def patch_resnet(block) -> None:
    """Fuse a ResnetBlock2D's two norm sites with its nonlinearity (resnet_reasons(block) must be empty)."""
    from diffkern.integrations.diffusers._fused_resnet import FusedResnetBlock2D

    act = fused_activation(block.nonlinearity)
    block._diffkern_saved = {"norm1": block.norm1, "norm2": block.norm2, "class": type(block)}
    block.norm1 = GroupNormAct.from_group_norm(block.norm1, act)
    block.norm2 = GroupNormAct.from_group_norm(block.norm2, act)
    block.__class__ = FusedResnetBlock2D


def unpatch_resnet(block) -> None:
    saved = block.__dict__.pop("_diffkern_saved")
    for name in ("norm1", "norm2"):
        setattr(block, name, to_group_norm(getattr(block, name), saved[name]))
    # a hook attached after patching still holds the fused forward: it falls back to diffusers' now
    block.__class__ = saved["class"]


def is_patched_resnet(block) -> bool:
    return "norm1" in block.__dict__.get("_diffkern_saved", ())


# ---------------------------------------------------------------------------------------------
# conv_norm_out -> conv_act


def _out_norm_owners():
    """Classes whose forward is known to run conv_norm_out then conv_act, and use conv_act nowhere else."""
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    return (UNet2DConditionModel, UNet2DModel, Encoder, Decoder)


def out_norm_reasons(module):
    """None when the module has no conv_norm_out site; else why it cannot be fused (empty: it can)."""
    norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
    if not isinstance(norm, nn.Module):
        return None
    owners = [c for c in _out_norm_owners() if isinstance(module, c)]
    why = []
    if not owners or type(module).forward is not owners[0].forward:
        why.append(f"{type(module).__name__}.forward is not one whose conv_norm_out -> conv_act was checked")
    if not _is_plain_group_norm(norm):
        why.append(f"conv_norm_out is {type(norm).__name__}, not nn.GroupNorm")
    elif has_hooks(norm):
        why.append("conv_norm_out carries hooks (patch before enabling offloading / caching)")
    if fused_activation(act) is None:
        why.append(f"conv_act is {act!r}, not SiLU or GELU")
    return why


def patch_out_norm(module) -> None:
    act = fused_activation(module.conv_act)
    module._diffkern_saved = {"conv_norm_out": module.conv_norm_out, "conv_act": module.conv_act}
    module.conv_norm_out = GroupNormAct.from_group_norm(module.conv_norm_out, act)
    module.conv_act = SiLUFusedIntoNorm() if act == "silu" else ActFusedIntoNorm()


def unpatch_out_norm(module) -> None:
    saved = module.__dict__.pop("_diffkern_saved")
    module.conv_norm_out = to_group_norm(module.conv_norm_out, saved["conv_norm_out"])
    module.conv_act = saved["conv_act"]


def is_patched_out_norm(module) -> bool:
    return "conv_norm_out" in module.__dict__.get("_diffkern_saved", ())
