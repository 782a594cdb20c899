"""Shared by the model parity tests: randomised diffusers models and a record of backends used."""

import contextlib

import torch

import diffkern

# Backend settings each parity test runs under: the plain-PyTorch references, and whatever
# diffkern picks by default (on CPU: the C++ group_norm kernel and PyTorch SDPA).
BACKENDS = ["reference", "default"]
DEFAULT_ON_CPU = {"group_norm": {"cpu"}, "attention": {"sdpa"}}


def randomise(model, seed=0, scale=0.1):
    """Perturb every parameter of a freshly initialised model, in place, and return it in eval mode.

    Default initialisation leaves every norm at weight 1 / bias 0, so a model that swapped two
    norms (or read a norm's weight under the wrong key) would still match; perturbed weights make
    every key count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def backend_context(backend):
    return diffkern.use_backend("reference") if backend == "reference" else contextlib.nullcontext()


def check_backends(used, backend, ops_expected=("group_norm", "attention")):
    """The model ran every op in `ops_expected`, each on the backend the setting implies."""
    for name in ops_expected:
        want = {"reference"} if backend == "reference" else DEFAULT_ON_CPU[name]
        assert used[name] == want, f"{name} ran on {used[name]}, expected {want}"


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()
