"""GroupNorm -> SiLU sites of diffusers models, run as one fused `diffkern.ops.group_norm` call.

Design (module replacement, chosen so that state dicts, LoRA and hooks keep working):

* The GroupNorm module is replaced by a `GroupNormSiLU` holding the *same* `weight` / `bias`
  Parameter objects under the same names: state_dict keys are unchanged, `load_state_dict`, LoRA
  fusing and in-place weight edits are visible to it (nothing is baked in), and hooks attached
  after patching (accelerate offloading, diffusers' HookRegistry) find an ordinary module with
  parameters. Modules that already carry hooks are left alone (a replacement would drop them),
  and reported.
* `conv_norm_out -> conv_act` (UNet2DConditionModel, UNet2DModel, the VAE Encoder / Decoder):
  the activation module is used nowhere else, so it becomes `SiLUFusedIntoNorm`, a pass-through.
* `ResnetBlock2D` uses one `nonlinearity` module three times (after norm1, on the time embedding,
  after norm2) and, in the `scale_shift` mode, applies the time embedding between norm2 and the
  SiLU; a pass-through cannot express that. So the block gets a per-instance `forward` (an
  instance attribute, as accelerate's own hooks are): hooks attached later wrap it as they wrap
  any forward; it calls every submodule as a module (conv1, time_emb_proj, dropout, ...), and
  falls back to the class's forward when its norms are not the fused ones (after `unpatch`).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from diffkern import ops
from diffkern.integrations.diffusers.processors import warn_deprecated_scale

_HOOK_ATTRS = ("_hf_hook", "_diffusers_hook")


def has_hooks(module: nn.Module) -> bool:
    """True when accelerate / diffusers hooks or an instance-level forward sit on the module."""
    return any(hasattr(module, a) for a in _HOOK_ATTRS) or "forward" in module.__dict__


class GroupNormSiLU(nn.Module):
    """GroupNorm, optional ADM scale-shift, then SiLU in one `diffkern.ops.group_norm` call.

    Built by `from_group_norm` around an existing `nn.GroupNorm`'s Parameters (shared, not copied).
    forward(x, scale=None, shift=None) = silu(group_norm(x) * (1 + scale) + shift); scale / shift
    are (N, C) or (N, C, 1, ...) (the shape ResnetBlock2D's time embedding has).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> "GroupNormSiLU":
        """A GroupNormSiLU sharing `norm`'s weight and bias Parameters (same objects)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_groups, new.num_channels = norm.num_groups, norm.num_channels
        new.eps, new.affine = norm.eps, norm.affine
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
            return F.silu(y)
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, scale=scale, shift=shift,
                              activation="silu")

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                "activation=silu")


class SiLUFusedIntoNorm(nn.Identity):
    """Pass-through standing where a SiLU was: the SiLU runs fused in the GroupNormSiLU before it."""


def to_group_norm(fused: GroupNormSiLU, original: nn.GroupNorm) -> nn.GroupNorm:
    """The original GroupNorm, given the fused module's current Parameters (moved / reloaded ones)."""
    original.register_parameter("weight", fused.weight)
    original.register_parameter("bias", fused.bias)
    original.train(fused.training)
    return original


def _is_plain_group_norm(m) -> bool:
    return type(m) is nn.GroupNorm


def _is_silu(m) -> bool:
    return type(m) is nn.SiLU


# ---------------------------------------------------------------------------------------------
# ResnetBlock2D


def resnet_reasons(block) -> list:
    """Why a ResnetBlock2D cannot take the fused forward (empty: it can)."""
    from diffusers.models.resnet import ResnetBlock2D

    why = []
    if type(block).forward is not ResnetBlock2D.forward:
        why.append(f"{type(block).__name__} overrides ResnetBlock2D.forward")
    if not _is_silu(block.nonlinearity):
        why.append(f"activation is {type(block.nonlinearity).__name__}, not SiLU")
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


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with norm1->SiLU and norm2(->scale-shift)->SiLU fused."""
    if not (isinstance(self.norm1, GroupNormSiLU) and isinstance(self.norm2, GroupNormSiLU)):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    warn_deprecated_scale(args, kwargs)

    hidden_states = self.norm1(input_tensor)  # GroupNorm + SiLU
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails on large batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]

    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is "
                             f"{self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states, scale=time_scale, shift=time_shift)  # GN, scale-shift, SiLU
    elif self.time_embedding_norm == "default":
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = self.norm2(hidden_states)  # GroupNorm + SiLU
    else:  # e.g. the VAE decoder's "group" blocks, which have no time embedding
        hidden_states = self.norm2(hidden_states)  # GroupNorm + SiLU

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:  # as diffusers: avoid DDP's gradient stride warning
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


def patch_resnet(block) -> None:
    """Fuse a ResnetBlock2D's two norm sites (resnet_reasons(block) must be empty)."""
    block._diffkern_saved = {"norm1": block.norm1, "norm2": block.norm2}
    block.norm1 = GroupNormSiLU.from_group_norm(block.norm1)
    block.norm2 = GroupNormSiLU.from_group_norm(block.norm2)
    block.forward = types.MethodType(_fused_resnet_forward, block)


def unpatch_resnet(block) -> None:
    saved = block.__dict__.pop("_diffkern_saved")
    for name in ("norm1", "norm2"):
        setattr(block, name, to_group_norm(getattr(block, name), saved[name]))
    fwd = block.__dict__.get("forward")
    if isinstance(fwd, types.MethodType) and fwd.__func__ is _fused_resnet_forward:
        del block.__dict__["forward"]
    # else a hook attached after patching wraps our forward; it falls back to the class forward now


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
    if not _is_silu(act):
        why.append(f"conv_act is {type(act).__name__}, not SiLU")
    return why


def patch_out_norm(module) -> None:
    module._diffkern_saved = {"conv_norm_out": module.conv_norm_out, "conv_act": module.conv_act}
    module.conv_norm_out = GroupNormSiLU.from_group_norm(module.conv_norm_out)
    module.conv_act = SiLUFusedIntoNorm()


def unpatch_out_norm(module) -> None:
    saved = module.__dict__.pop("_diffkern_saved")
    module.conv_norm_out = to_group_norm(module.conv_norm_out, saved["conv_norm_out"])
    module.conv_act = saved["conv_act"]


def is_patched_out_norm(module) -> bool:
    return "conv_norm_out" in module.__dict__.get("_diffkern_saved", ())
