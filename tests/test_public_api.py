"""The public API: every name in __all__ imports, and the package surface stays thin."""

import importlib

import pytest
import torch
from torch import nn

import torch_embed


@pytest.mark.parametrize("name", torch_embed.__all__)
def test_every_public_name_imports(name: str) -> None:
    assert getattr(torch_embed, name) is not None


def test_all_has_no_duplicates_and_no_private_names() -> None:
    assert len(set(torch_embed.__all__)) == len(torch_embed.__all__)
    assert not [n for n in torch_embed.__all__ if n.startswith("_") and n != "__version__"]


def test_submodules_expose_all() -> None:
    for mod in (
        "landscape",
        "testing",
        "embedding",
        "schemes",
        "widen",
        "inertia",
        "hessian",
        "spectrum",
        "distributed",
    ):
        module = importlib.import_module(f"torch_embed.{mod}")
        for name in module.__all__:
            assert hasattr(module, name), f"torch_embed.{mod}.__all__ lists missing {name}"


def test_compiled_module_refused_with_a_hint() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    compiled = torch.compile(net, backend="eager")
    with pytest.raises(TypeError, match="_orig_mod"):
        torch_embed.widen(compiled, [4])
    assert net[0].out_features == 3
