"""DeepFloyd IF's original checkpoints (deep-floyd/IF: pytorch_model.bin + config.yml) -> diffusers layout.

    config, state = convert_deepfloyd_unet(torch.load("IF-I-XL-v1.0/pytorch_model.bin"),
                                           yaml.safe_load(open("IF-I-XL-v1.0/config.yml"))["params"])
    unet = load_deepfloyd_unet("IF-II-L-v1.0")        # diffkern's UNet2DConditionModel, weights loaded

The original UNet is guided-diffusion's with IF's additions; the mapping (diffusers' key names):
  time_embed.{0,2}           -> time_embedding.linear_{1,2}
  aug_proj.{0,2}             -> class_embedding.linear_{1,2}   (stage II's noise-level embedding)
  encoder_proj               -> encoder_hid_proj               (T5 4096 -> encoder_channels)
  encoder_pooling.{0,1,2,3}  -> add_embedding.{norm1,pool,proj,norm2}  (text pooled into the time embedding)
  input_blocks / middle_block / output_blocks -> down_blocks / mid_block / up_blocks (resnets, attentions,
      ResBlock up/down samplers), ResBlock in_layers/emb_layers/out_layers/skip_connection ->
      norm1, conv1 / time_emb_proj / norm2, conv2 / conv_shortcut
  attention qkv (1x1 conv1d, per head [q_h; k_h; v_h]) -> to_q / to_k / to_v (only to_q where self-attention
      is disabled); encoder_kv (per head [k_h; v_h]) -> add_k_proj / add_v_proj; norm -> group_norm,
      norm_encoder -> norm_cross, proj_out -> to_out.0
Config flags: efficient_activation -> time_embedding_act_fn + resnet_skip_time_act; scale_skip_connection
(x 0.7071) -> resnet_out_scale_factor = mid_block_scale_factor = 1 / 0.7071; disable_self_attentions ->
only_cross_attention.
"""

from __future__ import annotations

import os

import torch

__all__ = ["convert_deepfloyd_config", "convert_deepfloyd_unet", "load_deepfloyd_unet",
           "read_deepfloyd_folder"]

_RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_POOLING_PARTS = {"0": "norm1", "1": "pool", "2": "proj", "3": "norm2"}


def _ints(value, name):
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    raise ValueError(f"config.yml: {name} must be a list or a comma-separated string, got {value!r}")


def _levels(params):
    """(multipliers, res blocks per level, attention ds set, self-attention-disabled ds set)."""
    mult = _ints(params["channel_mult"], "channel_mult")
    blocks = _ints(params["num_res_blocks"], "num_res_blocks")
    blocks = blocks * len(mult) if len(blocks) == 1 else blocks
    size = int(params["image_size"])
    attn = {size // r for r in _ints(params["attention_resolutions"], "attention_resolutions")}
    disabled = params.get("disable_self_attentions")
    if not disabled:
        no_self = set()
    elif disabled is True:
        no_self = set(attn)
    else:
        no_self = {size // r for r in _ints(disabled, "disable_self_attentions")}
    return mult, blocks, attn, no_self


def convert_deepfloyd_config(params, state_dict=None):
    """diffusers UNet2DConditionModel config of an original IF UNet (config.yml's `params`); with the
    state dict, a noise-level embedding (`aug_proj`, stage II) becomes class_embed_type="timestep"."""
    for key in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "image_size",
                "encoder_dim", "encoder_channels", "num_head_channels"):
        if key not in params:
            raise ValueError(f"config.yml: params.{key} is missing (not a DeepFloyd IF UNet config?)")
    if not params.get("resblock_updown", False):
        raise NotImplementedError("config.yml: resblock_updown=False (conv up/downsamplers) is not an IF "
                                  "layout")
    mult, blocks, attn, no_self = _levels(params)
    mc, levels = int(params["model_channels"]), len(mult)
    ds = [2 ** i for i in range(levels)]
    down = ["SimpleCrossAttnDownBlock2D" if d in attn else "ResnetDownsampleBlock2D" for d in ds]
    up = ["SimpleCrossAttnUpBlock2D" if d in attn else "ResnetUpsampleBlock2D" for d in reversed(ds)]
    act = params.get("activation", "gelu")
    efficient = bool(params.get("efficient_activation", False))
    scale = 1 / 0.7071 if params.get("scale_skip_connection", False) else 1.0
    if no_self and no_self >= {d for d in ds if d in attn} | {ds[-1]}:
        only_cross = True
    else:
        only_cross = tuple(d in no_self for d in ds) if no_self else False
    config = {
        "sample_size": int(params["image_size"]), "in_channels": int(params["in_channels"]),
        "out_channels": int(params["out_channels"]), "block_out_channels": [mc * m for m in mult],
        "layers_per_block": blocks[0] if len(set(blocks)) == 1 else list(blocks),
        "down_block_types": down, "up_block_types": up, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "cross_attention_dim": int(params["encoder_channels"]),
        "attention_head_dim": int(params["num_head_channels"]),
        "cross_attention_norm": "group_norm", "addition_embed_type": "text",
        "addition_embed_type_num_heads": int(params.get("att_pool_heads", 64)), "act_fn": act,
        "resnet_time_scale_shift": "scale_shift" if params.get("use_scale_shift_norm", False) else "default",
        "time_embedding_dim": mc * max(mult), "time_embedding_act_fn": act if efficient else None,
        "resnet_skip_time_act": efficient, "resnet_out_scale_factor": scale, "mid_block_scale_factor": scale,
        "only_cross_attention": only_cross, "upcast_attention": False,
    }
    if only_cross is not True and ds[-1] in no_self:
        config["mid_block_only_cross_attention"] = True
    if int(params["encoder_dim"]) != int(params["encoder_channels"]):
        config["encoder_hid_dim"] = int(params["encoder_dim"])
    if state_dict is not None and "aug_proj.0.weight" in state_dict:
        config["class_embed_type"] = "timestep"
    return config


def _split_heads(weight, bias, parts, head_dim):
    """Rows grouped per head as [part_0 | part_1 | ...] (head_dim each) -> one tensor per part."""
    out_w, out_b = [[] for _ in range(parts)], [[] for _ in range(parts)]
    for n, start in enumerate(range(0, weight.shape[0], head_dim)):
        out_w[n % parts].append(weight[start:start + head_dim])
        out_b[n % parts].append(bias[start:start + head_dim])
    return [torch.cat(w) for w in out_w], [torch.cat(b) for b in out_b]


def _resnet(sd, old, new, out):
    keys = [k for k in sd if k.startswith(old + ".")]
    if not keys:
        raise KeyError(f"deepfloyd checkpoint: no {old}.* weights (expected a ResBlock there)")
    for key in keys:
        rest = key[len(old) + 1:]
        for part, name in _RESNET_PARTS.items():
            if rest.startswith(part + "."):
                out[f"{new}.{name}.{rest[len(part) + 1:]}"] = sd[key]
                break
        else:
            raise KeyError(f"{key}: not a ResBlock weight")


def _attention(sd, old, new, out, head_dim, self_attention):
    w, b = sd[f"{old}.qkv.weight"][:, :, 0], sd[f"{old}.qkv.bias"]
    if self_attention:
        (q, k, v), (qb, kb, vb) = _split_heads(w, b, 3, head_dim)
        out.update({f"{new}.to_k.weight": k, f"{new}.to_k.bias": kb, f"{new}.to_v.weight": v,
                    f"{new}.to_v.bias": vb})
    else:
        q, qb = w, b
    out.update({f"{new}.to_q.weight": q, f"{new}.to_q.bias": qb})
    kv_w, kv_b = sd[f"{old}.encoder_kv.weight"][:, :, 0], sd[f"{old}.encoder_kv.bias"]
    (ek, ev), (ekb, evb) = _split_heads(kv_w, kv_b, 2, head_dim)
    out.update({f"{new}.add_k_proj.weight": ek, f"{new}.add_k_proj.bias": ekb, f"{new}.add_v_proj.weight": ev,
                f"{new}.add_v_proj.bias": evb})
    for a, d in (("norm", "group_norm"), ("norm_encoder", "norm_cross")):
        out[f"{new}.{d}.weight"], out[f"{new}.{d}.bias"] = sd[f"{old}.{a}.weight"], sd[f"{old}.{a}.bias"]
    out[f"{new}.to_out.0.weight"] = sd[f"{old}.proj_out.weight"][:, :, 0]
    out[f"{new}.to_out.0.bias"] = sd[f"{old}.proj_out.bias"]


def convert_deepfloyd_unet(state_dict, params):
    """(diffusers config, diffusers state dict) of an original IF UNet's state dict and config.yml params.

    Raises KeyError naming any original key the mapping did not use (so a layout change cannot pass
    silently) or any it needed and did not find."""
    config = convert_deepfloyd_config(params, state_dict)
    mult, blocks, attn, no_self = _levels(params)
    head_dim = int(params["num_head_channels"])
    sd = _Tracked(state_dict)
    out = {}
    direct = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "aug_proj.0": "class_embedding.linear_1", "aug_proj.2": "class_embedding.linear_2",
              "encoder_proj": "encoder_hid_proj", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out",
              "out.2": "conv_out"}
    for old, new in direct.items():
        for p in ("weight", "bias"):
            if f"{old}.{p}" in sd.keys():
                out[f"{new}.{p}"] = sd[f"{old}.{p}"]
    for key in [k for k in sd if k.startswith("encoder_pooling.")]:
        idx, rest = key.split(".", 2)[1:]
        out[f"add_embedding.{_POOLING_PARTS[idx]}.{rest}"] = sd[key]

    levels, i = len(mult), 1
    for level in range(levels):
        d = 2 ** level
        for j in range(blocks[level]):
            _resnet(sd, f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", out)
            if d in attn:
                _attention(sd, f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", out, head_dim,
                           d not in no_self)
            i += 1
        if level < levels - 1:
            _resnet(sd, f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", out)
            i += 1
    d_mid = 2 ** (levels - 1)
    _resnet(sd, "middle_block.0", "mid_block.resnets.0", out)
    _attention(sd, "middle_block.1", "mid_block.attentions.0", out, head_dim, d_mid not in no_self)
    _resnet(sd, "middle_block.2", "mid_block.resnets.1", out)
    i = 0
    for u, level in enumerate(reversed(range(levels))):
        d = 2 ** level
        for j in range(blocks[level] + 1):
            _resnet(sd, f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", out)
            nxt = 1
            if d in attn:
                _attention(sd, f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", out, head_dim,
                           d not in no_self)
                nxt = 2
            if level and j == blocks[level]:
                _resnet(sd, f"output_blocks.{i}.{nxt}", f"up_blocks.{u}.upsamplers.0", out)
            i += 1
    left = sorted(set(state_dict) - sd.used)
    if left:
        raise KeyError(f"deepfloyd checkpoint: keys the IF layout does not place: {left[:10]}"
                       f"{' ...' if len(left) > 10 else ''} ({len(left)} in all)")
    return config, out


class _Tracked(dict):
    """The original state dict, recording which keys the mapping read (every key must be read once)."""

    def __init__(self, state):
        super().__init__(state)
        self.used = set()

    def __getitem__(self, key):
        if key not in self.keys():
            raise KeyError(f"deepfloyd checkpoint: {key} is missing (the config.yml implies it)")
        self.used.add(key)
        return super().__getitem__(key)

    def __iter__(self):  # iteration (prefix scans) does not count as reading
        return iter(list(self.keys()))


def read_deepfloyd_folder(folder):
    """(state dict, config.yml params) of an original IF folder (pytorch_model.bin + config.yml)."""
    import yaml

    weights, cfg = os.path.join(folder, "pytorch_model.bin"), os.path.join(folder, "config.yml")
    missing = [p for p in (weights, cfg) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{folder}: not a DeepFloyd IF checkpoint folder; missing {missing}")
    with open(cfg) as f:
        params = (yaml.safe_load(f) or {}).get("params")
    if not isinstance(params, dict):
        raise ValueError(f"{cfg}: expected a `params:` mapping (the UNet's arguments)")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state, params


def load_deepfloyd_unet(folder, *, dtype=None, device="cpu", sample_size=None):
    """diffkern's UNet2DConditionModel from an original IF folder. sample_size overrides the config's
    (diffusers does so for IF-III, whose config.yml states it wrongly)."""
    from diffkern.models.unet_2d_condition import UNet2DConditionModel

    state, params = read_deepfloyd_folder(folder)
    config, converted = convert_deepfloyd_unet(state, params)
    if sample_size is not None:
        config["sample_size"] = sample_size
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.to(device=device, dtype=dtype).eval()
