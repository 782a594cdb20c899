"""`FusedResnetBlock2D`: the class a patched diffusers ResnetBlock2D takes (see norms.py for why a
class). Imported when a block is patched or a patched model is unpickled, so importing diffkern's
integration never imports diffusers."""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D

from diffkern.integrations.diffusers.norms import GroupNormAct
from diffkern.integrations.diffusers.processors import warn_deprecated_scale


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D with norm1 -> act and norm2 (-> scale-shift) -> act as one fused
    `GroupNormAct` call each, act being the block's nonlinearity (SiLU, or GELU in DeepFloyd IF's
    resnets; the norms carry it). Never constructed: `diffkern.patch` sets it as a block's class."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not (isinstance(self.norm1, GroupNormAct) and isinstance(self.norm2, GroupNormAct)):
            return ResnetBlock2D.forward(self, input_tensor, temb, *args, **kwargs)
        warn_deprecated_scale(args, kwargs)

        hidden_states = self.norm1(input_tensor)  # GroupNorm + act
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
            # GroupNorm, * (1 + scale) + shift, act
            hidden_states = self.norm2(hidden_states, scale=time_scale, shift=time_shift)
        elif self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)  # GroupNorm + act
        else:  # e.g. the VAE decoder's "group" blocks, which have no time embedding
            hidden_states = self.norm2(hidden_states)  # GroupNorm + act

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:  # as diffusers: avoid DDP's gradient stride warning
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor
