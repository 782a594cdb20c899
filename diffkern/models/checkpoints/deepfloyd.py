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


# UNetModel's arguments in IF's own code (deepfloyd_if/model/unet.py) and SuperResUNetModel's extra one, with
# IF's defaults for the optional ones; config.yml's `params` are passed to it as keyword arguments.
_REQUIRED = ("in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions", "activation",
             "encoder_dim", "att_pool_heads", "encoder_channels", "image_size")
_OPTIONAL = dict(disable_self_attentions=None, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, precision="32", num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, efficient_activation=False,
                 scale_skip_connection=False, interpolate_mode="bilinear")
# IF's get_activation names -> diffusers act_fn; gelu_jit is OpenAI's tanh GELU (built as "gelu", then switched
# to the tanh form module by module: see _use_tanh_gelu)
_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_jit": "gelu"}


def _bad(message):
    from diffkern.models.compvis import CheckpointError

    return CheckpointError(f"config.yml: {message}")


def _int(params, key, minimum=None):
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"params.{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _bad(f"params.{key} must be at least {minimum}, got {value}")
    return value


def _int_list(value, key, *, allow_str=True):
    """IF reads "a,b" strings and lists (or tuples); a single int is taken as a one-element list."""
    if isinstance(value, str) and allow_str:
        parts = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        raise _bad(f"params.{key} must be a list or a comma-separated string of integers, got {value!r}")
    out = []
    for v in parts:
        try:
            if isinstance(v, bool) or isinstance(v, float):
                raise ValueError
            out.append(int(v))
        except (TypeError, ValueError):
            raise _bad(f"params.{key}: {v!r} is not an integer (in {value!r})") from None
    if not out:
        raise _bad(f"params.{key} is empty")
    return out


def _resolutions(value, key, size):
    """IF's reading of attention_resolutions / disable_self_attentions: a string lists RESOLUTIONS, turned into
    downsample factors image_size // r; a list gives the downsample factors themselves."""
    values = _int_list(value, key)
    if any(v <= 0 for v in values):
        raise _bad(f"params.{key} must be positive, got {value!r}")
    return {size // v for v in values} if isinstance(value, str) else set(values)


def read_params(params):
    """config.yml's `params` checked and completed as IF's UNetModel reads them: a dict with every argument
    (IF's defaults filled in), channel_mult / num_res_blocks as lists, and the sets `attn` (downsample
    factors with attention) and `no_self` (those whose self-attention is disabled). CheckpointError
    naming the key for anything IF would refuse or crash on, or that diffkern cannot build."""
    if not isinstance(params, dict):
        raise _bad(f"params must be a mapping of the UNet's arguments, got {type(params).__name__}")
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise _bad(f"params.{missing[0]} is missing (not a DeepFloyd IF UNet config?)"
                   + (f"; also missing: {', '.join(missing[1:])}" if missing[1:] else ""))
    unknown = sorted(set(params) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _bad(f"unknown UNet argument(s) {', '.join(map(str, unknown))} (IF's UNetModel takes "
                   f"{', '.join(_REQUIRED + tuple(_OPTIONAL))})")
    p = dict(_OPTIONAL, **params)
    size = _int(p, "image_size", 1)
    for key in ("in_channels", "model_channels", "out_channels", "encoder_dim", "encoder_channels", "att_pool_heads"):
        _int(p, key, 1)
    mult = _int_list(p["channel_mult"], "channel_mult")
    if any(m <= 0 for m in mult):
        raise _bad(f"params.channel_mult must be positive, got {p['channel_mult']!r}")
    blocks = _int_list(p["num_res_blocks"], "num_res_blocks")
    blocks = blocks * len(mult) if len(blocks) == 1 else blocks
    if len(blocks) != len(mult) or any(b < 1 for b in blocks):
        raise _bad(f"params.num_res_blocks must be one positive integer or one per level ({len(mult)}), "
                   f"got {p['num_res_blocks']!r}")
    attn = _resolutions(p["attention_resolutions"], "attention_resolutions", size)
    disabled = p["disable_self_attentions"]
    if not disabled:
        no_self = set()
    elif disabled is True:
        # IF: the attention_resolutions value as given; a string then compares characters with the integer
        # downsample factors and disables nothing (its code's reading, kept)
        no_self = set() if isinstance(p["attention_resolutions"], str) else set(attn)
    else:
        no_self = _resolutions(disabled, "disable_self_attentions", size)
    if p["activation"] not in _ACTIVATIONS:
        raise _bad(f"params.activation {p['activation']!r} is not supported (IF's names diffkern builds: "
                   f"{', '.join(_ACTIVATIONS)}; 'none' has no diffusers equivalent)")
    if p["dims"] != 2:
        raise _bad(f"params.dims={p['dims']!r}: diffkern builds 2-D UNets only")
    if p["num_classes"] is not None:
        raise _bad("params.num_classes: class-conditional IF UNets (label_emb) are not supported")
    if not p["resblock_updown"]:
        raise _bad("params.resblock_updown=False (conv up/downsamplers) is not an IF layout diffkern builds")
    heads, head_channels = _int(p, "num_heads"), _int(p, "num_head_channels")
    up_heads = _int(p, "num_heads_upsample")
    if head_channels == 0 or head_channels < -1:
        raise _bad(f"params.num_head_channels must be positive or -1 (use num_heads), got {head_channels}")
    if head_channels == -1 and heads < 1:
        raise _bad(f"params.num_heads must be at least 1, got {heads}")
    if up_heads == 0 or up_heads < -1:
        raise _bad(f"params.num_heads_upsample must be positive or -1 (= num_heads), got {up_heads}")
    p.update(channel_mult=mult, num_res_blocks=blocks, attn=attn, no_self=no_self, image_size=size)
    return p


def _head_dims(p):
    """Head width per level (diffusers' attention_head_dim for SimpleCrossAttn blocks: the WIDTH), from
    num_head_channels, or from num_heads (then channels // num_heads, level by level, as IF's AttentionBlock)."""
    mc, mult, levels = p["model_channels"], p["channel_mult"], len(p["channel_mult"])
    ds = [2 ** i for i in range(levels)]
    channels = [mc * m for m in mult]
    used = [i for i in range(levels) if ds[i] in p["attn"]] + [levels - 1]  # + the middle block
    if p["num_head_channels"] != -1:
        hc = p["num_head_channels"]
        for i in used:
            if channels[i] % hc:
                raise _bad(f"attention channels {channels[i]} (level {i}) are not divisible by num_head_channels {hc}")
        return hc, [hc] * levels
    heads = p["num_heads"]
    up = heads if p["num_heads_upsample"] == -1 else p["num_heads_upsample"]
    if up != heads:
        raise _bad(f"num_heads_upsample={up} differs from num_heads={heads}: diffusers' UNet has one head layout "
                   "per level for both directions")
    for i in used:
        if channels[i] % heads:
            raise _bad(f"attention channels {channels[i]} (level {i}) are not divisible by num_heads {heads}")
    dims = [c // heads for c in channels]
    if len(set(dims[i] for i in used)) == 1:
        return dims[used[0]], dims
    # diffusers reads attention_head_dim[i] for down block i AND up block i (not the level up block i mirrors),
    # and [-1] for the middle: one tuple must give every attention its width.
    tup = list(dims)
    for i in range(levels):
        j = levels - 1 - i
        if ds[j] in p["attn"] and (ds[i] not in p["attn"] or dims[i] == dims[j]):
            tup[i] = dims[j]
        elif ds[j] in p["attn"]:
            raise _bad(f"num_heads={heads} gives level {i} heads of {dims[i]} and level {j} heads of {dims[j]}; "
                       "diffusers' UNet2DConditionModel reads one attention_head_dim for down block "
                       f"{i} and up block {i} (which mirrors level {j}), so this layout cannot be built")
    if tup[-1] != dims[-1]:
        raise _bad(f"num_heads={heads}: the middle block's head width {dims[-1]} conflicts with up block "
                   f"{levels - 1}'s {tup[-1]} in diffusers' attention_head_dim")
    return tuple(tup), dims


def _levels(params):
    """(multipliers, res blocks per level, attention ds set, self-attention-disabled ds set)."""
    p = params if "attn" in params else read_params(params)
    return p["channel_mult"], p["num_res_blocks"], p["attn"], p["no_self"]


def convert_deepfloyd_config(params, state_dict=None):
    """diffusers UNet2DConditionModel config of an original IF UNet (config.yml's `params`, every form IF's
    UNetModel reads: see read_params); with the state dict, a noise-level embedding (`aug_proj`, stage II)
    becomes class_embed_type="timestep". Raises CheckpointError (a ValueError) naming the key at fault."""
    p = read_params(params)
    mult, blocks, attn, no_self = p["channel_mult"], p["num_res_blocks"], p["attn"], p["no_self"]
    mc, levels = p["model_channels"], len(mult)
    ds = [2 ** i for i in range(levels)]
    down = ["SimpleCrossAttnDownBlock2D" if d in attn else "ResnetDownsampleBlock2D" for d in ds]
    up = ["SimpleCrossAttnUpBlock2D" if d in attn else "ResnetUpsampleBlock2D" for d in reversed(ds)]
    act = _ACTIVATIONS[p["activation"]]
    efficient = bool(p["efficient_activation"])
    scale = 1 / 0.7071 if p["scale_skip_connection"] else 1.0
    if no_self and no_self >= {d for d in ds if d in attn} | {ds[-1]}:
        only_cross = True
    else:
        only_cross = tuple(d in no_self for d in ds) if no_self else False
    head_dim, _ = _head_dims(p)
    config = {
        "sample_size": p["image_size"], "in_channels": p["in_channels"],
        "out_channels": p["out_channels"], "block_out_channels": [mc * m for m in mult],
        "layers_per_block": blocks[0] if len(set(blocks)) == 1 else list(blocks),
        "down_block_types": down, "up_block_types": up, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "cross_attention_dim": p["encoder_channels"],
        "attention_head_dim": head_dim,
        "cross_attention_norm": "group_norm", "addition_embed_type": "text",
        "addition_embed_type_num_heads": p["att_pool_heads"], "act_fn": act,
        "resnet_time_scale_shift": "scale_shift" if p["use_scale_shift_norm"] else "default",
        "time_embedding_dim": mc * max(mult), "time_embedding_act_fn": act if efficient else None,
        "resnet_skip_time_act": efficient, "resnet_out_scale_factor": scale, "mid_block_scale_factor": scale,
        "only_cross_attention": only_cross, "upcast_attention": False,
    }
    if only_cross is not True and ds[-1] in no_self:
        config["mid_block_only_cross_attention"] = True
    if p["encoder_dim"] != p["encoder_channels"]:
        config["encoder_hid_dim"] = p["encoder_dim"]
    if state_dict is not None and "aug_proj.0.weight" in state_dict:
        config["class_embed_type"] = "timestep"
    return config


def _split_heads(weight, bias, parts, head_dim, name="qkv"):
    """Rows grouped per head as [part_0 | part_1 | ...] (head_dim each) -> one tensor per part."""
    if weight.shape[0] == 0 or weight.shape[0] % (parts * head_dim) or bias.shape[:1] != weight.shape[:1]:
        raise _bad(f"{name}: {tuple(weight.shape)} weight / {tuple(bias.shape)} bias do not split into heads of "
                   f"{parts} x {head_dim} rows (num_heads / num_head_channels / disable_self_attentions do not "
                   "match the weights)")
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
    w, b = sd[f"{old}.qkv.weight"], sd[f"{old}.qkv.bias"]
    w = w[:, :, 0] if w.dim() == 3 else w
    if self_attention:
        (q, k, v), (qb, kb, vb) = _split_heads(w, b, 3, head_dim, f"{old}.qkv")
        out.update({f"{new}.to_k.weight": k, f"{new}.to_k.bias": kb, f"{new}.to_v.weight": v,
                    f"{new}.to_v.bias": vb})
    else:
        q, qb = w, b
    out.update({f"{new}.to_q.weight": q, f"{new}.to_q.bias": qb})
    kv_w, kv_b = sd[f"{old}.encoder_kv.weight"], sd[f"{old}.encoder_kv.bias"]
    kv_w = kv_w[:, :, 0] if kv_w.dim() == 3 else kv_w
    (ek, ev), (ekb, evb) = _split_heads(kv_w, kv_b, 2, head_dim, f"{old}.encoder_kv")
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
    p = read_params(params)
    mult, blocks, attn, no_self = _levels(p)
    _, head_dims = _head_dims(p)  # per level: IF's heads split each level's channels
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
                _attention(sd, f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", out,
                           head_dims[level], d not in no_self)
            i += 1
        if level < levels - 1:
            _resnet(sd, f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", out)
            i += 1
    d_mid = 2 ** (levels - 1)
    _resnet(sd, "middle_block.0", "mid_block.resnets.0", out)
    _attention(sd, "middle_block.1", "mid_block.attentions.0", out, head_dims[-1], d_mid not in no_self)
    _resnet(sd, "middle_block.2", "mid_block.resnets.1", out)
    i = 0
    for u, level in enumerate(reversed(range(levels))):
        d = 2 ** level
        for j in range(blocks[level] + 1):
            _resnet(sd, f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", out)
            nxt = 1
            if d in attn:
                _attention(sd, f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", out,
                           head_dims[level], d not in no_self)
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
    """(state dict, config.yml params) of an original IF folder (pytorch_model.bin + config.yml); every problem
    with the files is FileNotFoundError (missing) or CheckpointError naming the file."""
    import yaml

    from diffkern.models.compvis import CheckpointError
    from diffkern.models.weights import read_state_dict

    weights, cfg = os.path.join(folder, "pytorch_model.bin"), os.path.join(folder, "config.yml")
    missing = [p for p in (weights, cfg) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{folder}: not a DeepFloyd IF checkpoint folder; missing {missing}")
    try:
        with open(cfg, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{cfg}: cannot read the YAML file ({type(e).__name__}: {first})") from e
    params = doc.get("params") if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise CheckpointError(f"{cfg}: expected a `params:` mapping (the UNet's arguments), got "
                              f"{type(doc).__name__ if not isinstance(doc, dict) else type(params).__name__}")
    return read_state_dict(weights), params


def _use_tanh_gelu(module):
    """IF's activation "gelu_jit" (OpenAI's tanh GELU): every GELU of a model built with act_fn "gelu" (nn.GELU
    modules and the GELU fused into diffkern's GroupNorm) switched to the tanh form."""
    from diffkern.nn.group_norm import GroupNorm

    switched = 0
    for m in module.modules():
        if isinstance(m, torch.nn.GELU):
            m.approximate = "tanh"
            switched += 1
        elif isinstance(m, GroupNorm) and getattr(m, "activation", None) == "gelu":
            m.activation = "gelu_tanh"
            switched += 1
    return switched


def load_deepfloyd_unet(folder, *, dtype=None, device="cpu", sample_size=None):
    """diffkern's UNet2DConditionModel from an original IF folder (config.yml in any form IF's UNetModel reads:
    see read_params). sample_size overrides the config's (diffusers does so for IF-III, whose config.yml states
    it wrongly). dtype None keeps the file's (config.yml's `precision` is IF's run-time choice, not the file's).

    Raises FileNotFoundError for a missing file and CheckpointError naming the folder for anything else
    (unreadable files, a config IF would refuse, keys or shapes that do not fit)."""
    from diffkern.models.compvis import CheckpointError
    from diffkern.models.unet_2d_condition import UNet2DConditionModel
    from diffkern.models.weights import key_problems, materialize, on_meta

    state, params = read_deepfloyd_folder(folder)
    try:
        config, converted = convert_deepfloyd_unet(state, params)
    except (KeyError, ValueError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise CheckpointError(f"{folder}: {text}") from e
    if sample_size is not None:
        config["sample_size"] = sample_size
    factory = lambda: UNet2DConditionModel(**config)  # noqa: E731
    unet = on_meta(factory, f"{folder} (config.yml)")
    problems = key_problems(unet, converted, str(folder))
    if problems:
        raise CheckpointError(f"{folder}: the weights do not fit the config.yml's UNet:\n  " + "\n  ".join(problems))
    unet = materialize(unet, factory, converted, dtype=dtype, device=device)
    if params.get("activation") == "gelu_jit":
        _use_tanh_gelu(unet)
        unet.deepfloyd_activation = "gelu_jit"  # the config says "gelu": diffusers has no tanh GELU act_fn
    return unet
