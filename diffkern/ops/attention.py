"""attention: scaled dot-product attention with text prefix, causal mask and bias, with its backend table."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffkern import _dispatch, _ext
from diffkern.ops import _backends
from diffkern.kernels import reference

OP = "attention"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM_TRITON = 256


def attention(q, k, v, *, attn_bias=None, causal=False, scale=None, kv_prefix=None, backend=None):
    """softmax(q k^T * scale + attn_bias) v, with optional always-visible prefix keys and causal mask.

    Args:
        q: (B, H, Sq, D). k, v: (B, H, Sk, D). Any strides (views of a fused qkv projection or
            ``x.view(B, S, H, D).transpose(1, 2)`` are read in place by the Triton kernel).
            float16, bfloat16 or float32 (float64 on the reference and sdpa backends). The Triton
            kernel runs float32 inputs in full float32 (no tf32) and accumulates in float32.
        attn_bias: additive float bias, or bool keep-mask (True = attend, SDPA's meaning),
            broadcastable to (B, H, Sq, Sp + Sk) with at most 4 dims (a 1-d bias is per key, a 2-d one
            (Sq, Sp + Sk)): key-padding masks, relative position biases.
        causal: query i sees main key j <= i (top-left, as SDPA's is_causal, also for Sq != Sk);
            prefix keys stay visible.
        scale: softmax scale, a finite number (0 and negative included), default D ** -0.5.
        kv_prefix: (kp, vp), each (B, H, Sp, D): keys/values attended before k/v, never
            concatenated by the Triton kernel (GLIDE / DALL-E 2 / Imagen ``encoder_kv``).
        backend: "triton", "sdpa", "xformers" or "reference"; None chooses (see diffkern.use_backend).

    Returns:
        (B, H, Sq, D) in q's dtype. Differentiable in q, k, v, the prefix and a float attn_bias on
        every backend.

    Masks, NaN and Inf (every backend; tests/ops/test_attention_nonfinite.py):
        - A key is masked for a query by causal, a False in a bool attn_bias, or a -inf float
          attn_bias entry.
        - A query row whose keys are all masked returns exactly 0 and passes no gradient, whatever
          its query and its masked keys, values and bias entries hold.
        - A NaN reaches every output element it feeds, never turned into 0: a NaN in q row i makes
          output row i NaN; in key j (k or kv_prefix[0]), every row that sees key j; in value
          (j, d), column d of every row that sees key j; in a visible attn_bias entry (i, j), row i.
          A NaN attn_bias entry that causal masks feeds nothing.
        - An Inf does the same with "non-finite" for NaN: Inf or NaN, whichever the arithmetic
          gives (+Inf scores give NaN rows, inf - inf in the softmax). A score that comes out -inf
          acts as a masked key.
        - A finite float attn_bias entry stays finite whatever q's dtype: sdpa and xformers take the
          mask in q's dtype, so a wider bias (float32 beside float16 q) is shifted per row by its
          largest visible finite entry before the cast (softmax ignores the shift).
        - Everything else stays finite. One exception, as in every fused kernel: a non-finite k or
          v of a key that a row masks may still reach that row (0 * NaN in the probabilities x
          values product, or NaN + -inf in a peer's scores), so masking is no NaN filter.
        - Gradients follow this only for fully masked rows (zero); with non-finite inputs they are
          otherwise unspecified (a backend may return NaN or 0 where the forward is NaN).

    Equivalent PyTorch (no prefix, no fully masked rows)::

        F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=causal, scale=scale)
    """
    call = _check(q, k, v, attn_bias, causal, scale, kv_prefix)
    return _dispatch.select(OP, call, q.device.type, backend).run(call)


def attention_backend(q, k, v, *, attn_bias=None, causal=False, scale=None, kv_prefix=None, backend=None):
    """Name of the backend `attention` would use for these arguments (raises as it would)."""
    call = _check(q, k, v, attn_bias, causal, scale, kv_prefix)
    return _dispatch.select(OP, call, q.device.type, backend).name


@dataclass
class _Call:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    causal: bool
    scale: float
    kp: torch.Tensor | None
    vp: torch.Tensor | None

    @property
    def total_keys(self):
        return self.k.shape[2] + (0 if self.kp is None else self.kp.shape[2])


def _check_4d(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"attention: {name} must have rank 4 (B, H, S, D), got shape {tuple(t.shape)}")


def _check(q, k, v, attn_bias, causal, scale, kv_prefix):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(t, name)
    if not q.is_floating_point():
        raise TypeError(f"attention: q must be a floating-point tensor, got {q.dtype}")
    B, H, Sq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} must be on q's device {q.device}, got {t.device}")
        if t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            raise ValueError(f"attention: {name} must be (B={B}, H={H}, S, D={D}), got {tuple(t.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    kp = vp = None
    if kv_prefix is not None:
        if not isinstance(kv_prefix, (tuple, list)) or len(kv_prefix) != 2:
            raise TypeError("attention: kv_prefix must be a (keys, values) pair of tensors")
        kp, vp = kv_prefix
        for name, t in (("kv_prefix[0]", kp), ("kv_prefix[1]", vp)):
            _check_4d(t, name)
            if t.dtype != q.dtype:
                raise TypeError(f"attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"attention: {name} must be on q's device {q.device}, got {t.device}")
            if t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
                raise ValueError(f"attention: {name} must be (B={B}, H={H}, Sp, D={D}), got {tuple(t.shape)}")
        if kp.shape[2] != vp.shape[2]:
            raise ValueError("attention: kv_prefix keys and values must have the same length")
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor):
            raise TypeError(f"attention: attn_bias must be a Tensor or None, got {type(attn_bias).__name__}")
        if attn_bias.dtype != torch.bool and not attn_bias.is_floating_point():
            raise TypeError(f"attention: attn_bias must be float or bool, got {attn_bias.dtype}")
        if attn_bias.device != q.device:
            raise ValueError(f"attention: attn_bias must be on q's device {q.device}, got {attn_bias.device}")
        full = (B, H, Sq, k.shape[2] + (0 if kp is None else kp.shape[2]))
        try:
            if attn_bias.dim() > 4 or torch.broadcast_shapes(attn_bias.shape, full) != full:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"attention: attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to "
                             f"(B, H, Sq, Sp + Sk) = {full}") from None
        # one rank for every backend: a lower-rank bias (a per-key (Sk,) bias, a (Sq, Sk) mask) becomes a
        # 4-d view, so that the backends' mask algebra indexes dims -1 / -2 as (Sq, keys) (issue 22)
        attn_bias = attn_bias[(None,) * (4 - attn_bias.dim())]
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = D ** -0.5 if D > 0 else 1.0  # D = 0: every score is 0 whatever the scale
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a number or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale!r}")
    return _Call(q, k, v, attn_bias, causal, float(scale), kp, vp)


# ---------------------------------------------------------------------------------------------
# backends

def _run_reference(c):
    prefix = None if c.kp is None else (c.kp, c.vp)
    return reference.attention(c.q, c.k, c.v, attn_bias=c.bias, causal=c.causal, scale=c.scale, kv_prefix=prefix)


def _keep_mask(c):
    """Bool (.., Sq, Sp + Sk) of visible keys from causal + bool bias, or None when all are visible."""
    Sq, Sp = c.q.shape[2], 0 if c.kp is None else c.kp.shape[2]
    keep = None
    if c.causal:
        i = torch.arange(Sq, device=c.q.device)[:, None]
        j = torch.arange(c.total_keys, device=c.q.device)[None, :]
        keep = (j < Sp) | (j - Sp <= i)
    if c.bias is not None and c.bias.dtype == torch.bool:
        keep = c.bias if keep is None else keep & c.bias
    return keep


def _dead_rows(c, keep):
    """Bool (.., Sq, 1): rows whose keys are all masked, or None. Peers return NaN there."""
    rows = None if keep is None else ~keep
    if c.bias is not None and c.bias.is_floating_point():
        neg = torch.isneginf(c.bias)
        rows = neg if rows is None else neg | rows
    if rows is None:
        return None
    # over every key: a bias broadcast on the key dim (size 1) must not stand for zero keys (issue 22)
    return rows.expand(rows.shape[:-1] + (c.total_keys,)).all(-1, keepdim=True)


def _fit_bias(bias, keep, dtype):
    """A float bias the peer kernels can take in q's dtype: they want the mask in q's dtype, and a wider
    bias (float32 beside float16 q, float64 beside float32) can overflow there (a finite -1e5 would
    become -inf and mask its key, +1e5 would become +inf and a NaN row). Softmax ignores a per-row
    constant, so each row is shifted by its largest finite visible entry (detached: the row's softmax
    gradient sums to 0) before the cast; -inf, +inf and NaN entries stay what they are."""
    if torch.finfo(bias.dtype).max <= torch.finfo(dtype).max:
        return bias
    visible = torch.isfinite(bias) if keep is None else torch.isfinite(bias) & keep
    if visible.shape[-1] == 0:  # no keys: nothing to shift
        return bias
    top = bias.detach().masked_fill(~visible, float("-inf")).amax(-1, keepdim=True)
    return bias - torch.where(torch.isinf(top), 0.0, top)


def _peer_mask(c):
    """(mask for a peer kernel: float additive or bool keep, dead rows). Dead rows get an all-visible
    mask so the peer computes finite values (and gradients) there; the caller zeroes them."""
    keep = _keep_mask(c)
    dead = _dead_rows(c, keep)
    if c.bias is not None and c.bias.is_floating_point():
        bias = _fit_bias(c.bias, keep, c.q.dtype).to(c.q.dtype)
        mask = bias if keep is None else torch.where(keep, bias, float("-inf"))
        if dead is not None:
            mask = torch.where(dead, 0.0, mask)
    else:
        mask = keep
        if dead is not None and mask is not None:
            mask = mask | dead
    return mask, dead


def _with_prefix(c):
    if c.kp is None:
        return c.k, c.v
    return torch.cat([c.kp, c.k], dim=2), torch.cat([c.vp, c.v], dim=2)


def _nan_rows(c, k):
    """Bool (B, H, Sq, 1): rows with a NaN in their query or in a key they see (unmasked SDPA call)."""
    rows = torch.isnan(c.q).any(-1, keepdim=True)
    keys = torch.isnan(k).any(-1)                                  # (B, H, Sp + Sk)
    if not c.causal:
        return rows | keys.any(-1)[..., None, None]
    seen = keys.cummax(-1).values                                  # row i sees keys 0..i (top-left)
    last = torch.arange(c.q.shape[2], device=k.device).clamp_max(k.shape[2] - 1)
    return rows | seen[..., last, None]


def _no_keys(c):
    """The output when there is no key at all (Sp + Sk = 0): every row is fully masked, so exactly 0,
    with a (zero) gradient path to q. Peers return NaN there for a NaN anywhere in q (torch 2.13 SDPA)."""
    return c.q.masked_fill(torch.ones((), dtype=torch.bool, device=c.q.device), 0.0)


def _run_sdpa(c):
    if c.total_keys == 0:
        return _no_keys(c)
    k, v = _with_prefix(c)
    # torch's is_causal path returns NaN rows for scale <= 0 (it scales the -inf mask: 0 * -inf), so
    # a non-positive scale takes the explicit-mask path below (issue 22)
    if c.bias is None and (not c.causal or (c.kp is None and c.scale > 0)):
        out = F.scaled_dot_product_attention(c.q, k, v, is_causal=c.causal, scale=c.scale)
        if c.q.device.type == "cpu" and k.shape[2] > 0:
            # torch's CPU SDPA (its flash kernel, at some shapes) takes a row whose scores are all NaN for
            # a fully masked one and returns 0 there, hiding the NaN (issue 11). Such a row has a NaN
            # query or NaN in every key it sees, key 0 included (every row sees key 0 here), so one sum
            # of q and of key 0 (NaN if they hold one, or if +Inf meets -Inf) decides whether the exact
            # row fix runs. Measured on 1 CPU thread (diffkern.bench.attention.sdpa_nan_check_cost):
            # the check is ~70 us of a ~4.5 ms (2, 8, 1024, 77, 40) call (1.6%); whole calls came out
            # 0-8% slower than torch SDPA alone, within this shared machine's noise. Compiled: no
            # data-dependent branch, the fix always runs (inductor fuses it into one pass).
            if torch.compiler.is_compiling() or torch.isnan(c.q.sum() + k[:, :, :1].sum()):
                out = out.masked_fill(_nan_rows(c, k), float("nan"))
        return out
    mask, dead = _peer_mask(c)
    out = F.scaled_dot_product_attention(c.q, k, v, attn_mask=mask, scale=c.scale)
    return out if dead is None else out.masked_fill(dead, 0.0)


def _run_xformers(c):
    import xformers.ops as xops

    if c.total_keys == 0:
        return _no_keys(c)
    k, v = _with_prefix(c)
    bias, dead = None, None
    if c.bias is not None or c.causal:
        mask, dead = _peer_mask(c)
        full = (c.q.shape[0], c.q.shape[1], c.q.shape[2], c.total_keys)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=c.q.device, dtype=c.q.dtype).masked_fill(~mask, float("-inf"))
        # xformers wants a dense bias whose rows start 8-element aligned: pad the key dim, then slice
        pad = -c.total_keys % 8
        bias = F.pad(mask.to(c.q.dtype).expand(full), (0, pad))[..., :c.total_keys]
    t = (lambda x: x.transpose(1, 2))  # xformers wants (B, S, H, D)
    out = xops.memory_efficient_attention(t(c.q), t(k), t(v), attn_bias=bias, scale=c.scale).transpose(1, 2)
    return out if dead is None else out.masked_fill(dead, 0.0)


def _run_triton(c):
    from diffkern.ops import _attention_triton

    return _attention_triton.run(c)


# ---------------------------------------------------------------------------------------------
# backend table

@_ext.cached
def _xformers_unavailable():
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if not torch.cuda.is_available():
        return "xformers needs a CUDA GPU"
    return ""


def _xformers_reasons(c):
    return _backends.tensor_reasons(c.q, ("cuda",), KERNEL_DTYPES)


def _triton_reasons(c):
    why = _backends.device_reasons(c.q, _backends.triton_device_types())
    if c.q.shape[-1] > MAX_HEAD_DIM_TRITON or c.q.shape[-1] < 1:
        why.append(f"head dim {c.q.shape[-1]} not supported (takes 1 to {MAX_HEAD_DIM_TRITON})")
    if c.q.device.type == "cuda" and c.q.shape[0] * c.q.shape[1] > 65535:  # B * H is grid axis 1
        why.append(f"at most 65535 batch x heads on a GPU, got {c.q.shape[0] * c.q.shape[1]}")
    return why + _backends.dtype_reasons(c.q, KERNEL_DTYPES)

_fam = _dispatch.op_family(OP)
_fam.register(_dispatch.Backend("reference", _run_reference, lambda: "",
                                _backends.takes("q", None, KERNEL_DTYPES + (torch.float64,)),
                                "plain math, float32 scores and softmax (materialises Sq x Sk)"))
_fam.register(_dispatch.Backend("sdpa", _run_sdpa, lambda: "",
                                _backends.takes("q", None, KERNEL_DTYPES + (torch.float64,)),
                                "torch scaled_dot_product_attention (prefix concatenated, masks built)"))
_fam.register(_dispatch.Backend("xformers", _run_xformers, _xformers_unavailable, _xformers_reasons,
                                "xformers memory_efficient_attention (prefix concatenated)"))
_fam.register(_dispatch.Backend("triton", _run_triton,
                                _backends.triton_unavailable,
                                _triton_reasons, "Triton FlashAttention-2 forward + backward"))
# CPU: SDPA (the Triton interpreter is for tests). CUDA: unmeasured so far, so SDPA first (its own
# dispatcher picks flash/efficient/cudnn); benchmarks/results/ will decide the order per head dim.
_fam.priority = {"cpu": ["sdpa", "reference"], "cuda": ["sdpa", "triton", "xformers", "reference"]}
