"""Fixtures of the model tests."""

import pytest

from diffkern import ops


@pytest.fixture
def used_backends(monkeypatch):
    """{op name: set of backend names} that the diffkern ops actually ran during the test."""
    used = {"group_norm": set(), "attention": set()}

    def spy(name, fn, which):
        def wrapped(*args, **kwargs):
            used[name].add(which(*args, **kwargs))
            return fn(*args, **kwargs)
        monkeypatch.setattr(ops, name, wrapped)

    spy("group_norm", ops.group_norm, ops.group_norm_backend)
    spy("attention", ops.attention, ops.attention_backend)
    return used
