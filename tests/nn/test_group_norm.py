"""diffkern.nn.GroupNorm: a drop-in for torch.nn.GroupNorm, plus scale-shift and SiLU."""

import pytest
import torch

import diffkern


def test_state_dict_interchangeable_with_torch():
    ours = diffkern.nn.GroupNorm(4, 16, activation="silu")
    theirs = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(ours(x), torch.nn.functional.silu(theirs(x)), atol=1e-5, rtol=1e-5)
    theirs.load_state_dict(ours.state_dict())


def test_scale_shift_forward_and_backward():
    m = diffkern.nn.GroupNorm(2, 6)
    x = torch.randn(3, 6, 4, requires_grad=True)
    scale, shift = torch.randn(3, 6), torch.randn(3, 6)
    y = m(x, scale, shift)
    ref = torch.nn.functional.group_norm(x, 2, m.weight, m.bias) * (1 + scale[..., None]) + shift[..., None]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert m.weight.grad is not None and x.grad is not None


def test_no_affine_and_forced_backend():
    m = diffkern.nn.GroupNorm(1, 3, affine=False, backend="reference")
    assert m.weight is None and not list(m.parameters())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(m(x), torch.nn.functional.group_norm(x, 1))
    assert "activation=None" in repr(m)


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        diffkern.nn.GroupNorm(2, 4, activation="relu")
