"""Attribute handlers: a narrow module given wide tensors and patched equals a fresh wide one.

For every supported class: build the module at a narrow and at a wide size, put the
wide module's tensors into the narrow one (as the apply step would), patch the narrow
module's attributes from :func:`attribute_updates`, and compare with the fresh wide
module: every plain attribute, ``repr`` and the forward output on a wide input (the
same tensors, so bit-identical). The reference is torch's own constructor, never the
handler's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from zoo import ZOO, ConvNeXtBlock

from torch_embed.graph import handlers
from torch_embed.graph.handlers import (
    Resize,
    attribute_updates,
    handler_for,
    no_attributes,
    register_handler,
    set_attributes,
)


@dataclass(frozen=True)
class Case:
    name: str
    narrow: Callable[[], nn.Module]
    wide: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[Tensor, ...]]  # wide inputs
    groups: int | None = None  # Resize.groups given to the top module
    give_input_shape: bool = True


def _randn(*shape: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda g: (torch.randn(*shape, generator=g, dtype=torch.float64),)


def _mha_inputs(e: int, kdim: int, vdim: int, batch_first: bool = False):
    def make(g: torch.Generator) -> tuple[Tensor, ...]:
        lead = (2, 3) if batch_first else (3, 2)
        return tuple(
            torch.randn(*lead, d, generator=g, dtype=torch.float64) for d in (e, kdim, vdim)
        )

    return make


def _indices(*shape: int, high: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda g: (torch.randint(0, high, shape, generator=g),)


CASES = [
    Case("linear", lambda: nn.Linear(3, 4), lambda: nn.Linear(5, 6), _randn(2, 5)),
    Case(
        "linear_nobias",
        lambda: nn.Linear(3, 4, bias=False),
        lambda: nn.Linear(5, 6, bias=False),
        _randn(2, 5),
    ),
    Case(
        "bilinear",
        lambda: nn.Bilinear(3, 4, 5),
        lambda: nn.Bilinear(4, 6, 7),
        lambda g: (
            torch.randn(2, 4, generator=g, dtype=torch.float64),
            torch.randn(2, 6, generator=g, dtype=torch.float64),
        ),
    ),
    Case("conv1d", lambda: nn.Conv1d(3, 4, 3), lambda: nn.Conv1d(5, 6, 3), _randn(2, 5, 7)),
    Case(
        "conv1d_unbatched",
        lambda: nn.Conv1d(3, 4, 3, groups=1),
        lambda: nn.Conv1d(5, 6, 3),
        _randn(5, 7),
    ),
    Case(
        "conv2d_grouped",
        lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
        lambda: nn.Conv2d(6, 8, 3, groups=2, padding=1),
        _randn(2, 6, 4, 4),
    ),
    Case(
        "conv2d_depthwise",
        lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False),
        lambda: nn.Conv2d(7, 7, 3, groups=7, bias=False),
        _randn(2, 7, 5, 5),
    ),
    Case(
        "conv2d_depthwise_multiplier",  # channel multiplier 2 → 3, groups kept
        lambda: nn.Conv2d(3, 6, 3, groups=3),
        lambda: nn.Conv2d(3, 9, 3, groups=3),
        _randn(2, 3, 5, 5),
    ),
    Case(
        "conv3d",
        lambda: nn.Conv3d(2, 3, 2, stride=2),
        lambda: nn.Conv3d(2, 5, 2, stride=2),
        _randn(1, 2, 4, 4, 4),
    ),
    Case(
        "conv_transpose2d",
        lambda: nn.ConvTranspose2d(3, 4, 3),
        lambda: nn.ConvTranspose2d(5, 6, 3),
        _randn(2, 5, 3, 3),
    ),
    Case(
        "conv_transpose2d_grouped",
        lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
        lambda: nn.ConvTranspose2d(6, 8, 3, groups=2),
        _randn(2, 6, 3, 3),
        groups=2,
    ),
    Case(
        "batchnorm1d",
        lambda: nn.BatchNorm1d(4),
        lambda: nn.BatchNorm1d(6),
        _randn(5, 6),
        give_input_shape=False,
    ),
    Case("batchnorm2d", lambda: nn.BatchNorm2d(4), lambda: nn.BatchNorm2d(6), _randn(3, 6, 2, 2)),
    Case(
        "batchnorm2d_bare",
        lambda: nn.BatchNorm2d(4, affine=False, track_running_stats=False),
        lambda: nn.BatchNorm2d(6, affine=False, track_running_stats=False),
        _randn(3, 6, 2, 2),
    ),
    Case(
        "instancenorm1d_unbatched",
        lambda: nn.InstanceNorm1d(4, affine=True),
        lambda: nn.InstanceNorm1d(6, affine=True),
        _randn(6, 5),
    ),
    Case(
        "instancenorm2d_bare",
        lambda: nn.InstanceNorm2d(4),
        lambda: nn.InstanceNorm2d(6),
        _randn(2, 6, 3, 3),
    ),
    Case(
        "groupnorm_channels_grow",
        lambda: nn.GroupNorm(2, 4),
        lambda: nn.GroupNorm(2, 6),
        _randn(2, 6, 3),
        give_input_shape=False,
    ),
    Case(
        "groupnorm_groups_grow",
        lambda: nn.GroupNorm(2, 4),
        lambda: nn.GroupNorm(3, 6),
        _randn(2, 6, 3),
        groups=3,
    ),
    Case(
        "groupnorm_bare",
        lambda: nn.GroupNorm(2, 4, affine=False),
        lambda: nn.GroupNorm(2, 6, affine=False),
        _randn(2, 6, 3),
    ),
    Case(
        "layernorm",
        lambda: nn.LayerNorm(4),
        lambda: nn.LayerNorm(6),
        _randn(2, 6),
        give_input_shape=False,
    ),
    Case(
        "layernorm_2d_nobias",
        lambda: nn.LayerNorm((3, 4), bias=False),
        lambda: nn.LayerNorm((3, 6), bias=False),
        _randn(2, 3, 6),
    ),
    Case(
        "layernorm_bare",
        lambda: nn.LayerNorm(4, elementwise_affine=False),
        lambda: nn.LayerNorm(6, elementwise_affine=False),
        _randn(2, 5, 6),
    ),
    Case("rmsnorm", lambda: nn.RMSNorm(4), lambda: nn.RMSNorm(6), _randn(2, 6)),
    Case(
        "rmsnorm_bare",
        lambda: nn.RMSNorm(4, elementwise_affine=False),
        lambda: nn.RMSNorm(6, elementwise_affine=False),
        _randn(2, 6),
    ),
    Case(
        "mha_head_dim_grows",
        lambda: nn.MultiheadAttention(4, 2),
        lambda: nn.MultiheadAttention(6, 2),
        _mha_inputs(6, 6, 6),
    ),
    Case(
        "mha_heads_grow",
        lambda: nn.MultiheadAttention(4, 2, batch_first=True),
        lambda: nn.MultiheadAttention(6, 3, batch_first=True),
        _mha_inputs(6, 6, 6, batch_first=True),
        groups=3,
    ),
    Case(
        "mha_kdim_vdim_bias_kv",
        lambda: nn.MultiheadAttention(4, 2, kdim=3, vdim=5, add_bias_kv=True),
        lambda: nn.MultiheadAttention(6, 2, kdim=4, vdim=7, add_bias_kv=True),
        _mha_inputs(6, 4, 7),
    ),
    Case(
        "embedding",
        lambda: nn.Embedding(5, 3, padding_idx=1),
        lambda: nn.Embedding(7, 4, padding_idx=1),
        _indices(2, 3, high=7),
    ),
    Case(
        "embedding_bag",
        lambda: nn.EmbeddingBag(5, 3, mode="mean"),
        lambda: nn.EmbeddingBag(7, 4, mode="mean"),
        _indices(2, 3, high=7),
    ),
    Case("prelu", lambda: nn.PReLU(4), lambda: nn.PReLU(6), _randn(2, 6, 3)),
]


def _attributes(module: nn.Module) -> dict[str, object]:
    """Every plain attribute (module internals such as _parameters are dicts)."""
    return {k: v for k, v in vars(module).items() if not isinstance(v, dict)}


def _take_tensors(narrow: nn.Module, wide: nn.Module) -> dict[str, Tensor]:
    """Put ``wide``'s own tensors into ``narrow`` (as the apply step would)."""
    new: dict[str, Tensor] = {}
    for name, p in wide.named_parameters(recurse=False):
        setattr(narrow, name, nn.Parameter(p.detach().clone()))
        new[name] = p
    for name, b in wide.named_buffers(recurse=False):
        setattr(narrow, name, b.clone())
        new[name] = b
    return new


def _widen_like(narrow: nn.Module, wide: nn.Module, case: Case, inputs: tuple[Tensor, ...]):
    for fqn, module in narrow.named_modules():
        tensors = _take_tensors(module, wide.get_submodule(fqn))
        top = fqn == ""
        in_shape = tuple(inputs[0].shape) if top and case.give_input_shape else None
        resize = Resize.from_tensors(tensors, in_shape, case.groups if top else None)
        set_attributes(module, attribute_updates(module, resize, name=fqn))


def _outputs(out: object) -> list[Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_patched_narrow_module_equals_fresh_wide_module(case: Case) -> None:
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    narrow, wide = case.narrow().double(), case.wide().double()
    inputs = case.inputs(gen)
    assert _attributes(narrow) != _attributes(wide)  # the patch has something to do
    _widen_like(narrow, wide, case, inputs)
    assert _attributes(narrow) == _attributes(wide)
    for fqn, module in narrow.named_modules():
        assert _attributes(module) == _attributes(wide.get_submodule(fqn)), fqn
    assert repr(narrow) == repr(wide)
    for got, want in zip(_outputs(narrow(*inputs)), _outputs(wide(*inputs)), strict=True):
        assert torch.equal(got, want)


def test_subclasses_inherit_and_their_own_registration_wins(monkeypatch) -> None:
    monkeypatch.setattr(handlers, "_HANDLERS", dict(handlers._HANDLERS))

    class MyConv(nn.Conv2d):
        pass

    conv = MyConv(3, 4, 1)
    assert handler_for(conv) is handler_for(nn.Conv2d(3, 4, 1))
    resize = Resize({"weight": (6, 3, 1, 1), "bias": (6,)})
    assert attribute_updates(conv, resize) == {"in_channels": 3, "out_channels": 6, "groups": 1}

    register_handler(MyConv, lambda module, resize: {"out_channels": 99})
    assert attribute_updates(conv, resize) == {"out_channels": 99}
    assert attribute_updates(nn.Conv2d(3, 4, 1), resize)["out_channels"] == 6


class LayerScale(nn.Module):
    """timm's layer scale: a module whose only size is its parameter's shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * x


class Scaled(nn.Module):
    """A module that keeps its width in an attribute besides its tensor's shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.kernel = (3, 3)
        self.gamma = nn.Parameter(torch.ones(dim, 3))

    def forward(self, x: Tensor) -> Tensor:
        return (self.gamma[:, 0] * x).view(-1, self.dim)


def test_unknown_class_is_refused_when_an_attribute_holds_a_changing_size(monkeypatch) -> None:
    monkeypatch.setattr(handlers, "_HANDLERS", dict(handlers._HANDLERS))
    scaled = Scaled(4)
    with pytest.raises(ValueError, match=r"'blocks.0.s' \(Scaled\).*\['dim=4'\].*register_handler"):
        attribute_updates(scaled, Resize({"gamma": (6, 3)}), name="blocks.0.s")
    # the axis of size 3 does not change: kernel=(3, 3) is no suspect; nothing changes:
    # nothing to patch, nothing refused
    assert attribute_updates(Scaled(5), Resize({"gamma": (5, 3)})) == {}
    assert attribute_updates(scaled, Resize()) == {}
    register_handler(Scaled, lambda module, resize: {"dim": resize.shapes["gamma"][0]})
    assert attribute_updates(scaled, Resize({"gamma": (6, 3)})) == {"dim": 6}


def test_unknown_class_whose_tensor_shapes_are_its_only_sizes_needs_no_handler(monkeypatch) -> None:
    monkeypatch.setattr(handlers, "_HANDLERS", dict(handlers._HANDLERS))
    assert attribute_updates(LayerScale(4), Resize({"gamma": (6,)}), name="ls") == {}
    assert attribute_updates(nn.Flatten(), Resize(input_shape=(2, 6))) == {}
    register_handler(LayerScale, no_attributes)
    assert attribute_updates(LayerScale(4), Resize({"gamma": (6,)})) == {}


def test_register_handler_validates(monkeypatch) -> None:
    monkeypatch.setattr(handlers, "_HANDLERS", dict(handlers._HANDLERS))
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_handler(nn.Linear(2, 2), no_attributes)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_handler(int, no_attributes)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"register_handler\(LayerScale, handler\).*callable"):
        register_handler(LayerScale, "no_attributes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every module class"):
        register_handler(nn.Module, no_attributes)
    assert handler_for(LayerScale(2)) is None


def test_bad_handler_results_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(handlers, "_HANDLERS", dict(handlers._HANDLERS))
    resize = Resize({"gamma": (6,)})
    register_handler(LayerScale, lambda module, resize: {"dim": 6})  # no such attribute
    with pytest.raises(TypeError, match=r"'dim'.*not an existing"):
        attribute_updates(LayerScale(4), resize)
    register_handler(LayerScale, lambda module, resize: {"gamma": 6})  # a tensor
    with pytest.raises(TypeError, match="'gamma'"):
        attribute_updates(LayerScale(4), resize)
    register_handler(LayerScale, lambda module, resize: [("training", True)])  # type: ignore
    with pytest.raises(TypeError, match="not a mapping"):
        attribute_updates(LayerScale(4), resize)


@pytest.mark.parametrize(
    ("module", "resize", "error", "match"),
    [
        (nn.Linear(3, 4), Resize({"bias_k": (4,)}), ValueError, r"no parameter or buffer.*bias"),
        (nn.Linear(3, 4), Resize({"weight": (6, 3), "bias": (7,)}), ValueError, "'bias'"),
        (nn.Linear(3, 4), Resize({"weight": (6, 3, 1)}), ValueError, "2-d tensor 'weight'"),
        (nn.Conv2d(3, 4, 3), Resize({"weight": (6, 3, 5, 5)}), ValueError, "kernel must stay"),
        (
            nn.Conv2d(4, 4, 3, groups=2),
            Resize({"weight": (6, 2, 3, 3)}),
            ValueError,
            r"Resize\(groups=\.\.\.\)",
        ),
        (
            nn.Conv2d(4, 4, 3, groups=2),
            Resize({"weight": (6, 2, 3, 3)}, input_shape=(1, 5, 4, 4)),
            ValueError,
            "5 input channels, 2 per group",
        ),
        (
            nn.Conv2d(4, 4, 3),
            Resize({"weight": (6, 4, 3, 3)}, input_shape=(1, 5, 4, 4), groups=1),
            ValueError,
            "has not 4 channels",
        ),
        (nn.GroupNorm(2, 4), Resize({"weight": (7,), "bias": (7,)}), ValueError, "num_groups=2"),
        (nn.GroupNorm(2, 4), Resize({"weight": (6,), "bias": (7,)}), ValueError, "'bias'"),
        (nn.GroupNorm(2, 4, affine=False), Resize(), ValueError, "input_shape"),
        (nn.LayerNorm(4, elementwise_affine=False), Resize(), ValueError, "input_shape"),
        (nn.LayerNorm((2, 4)), Resize({"weight": (8,)}), ValueError, "normalized_shape"),
        (
            nn.MultiheadAttention(4, 2),
            Resize({"in_proj_weight": (15, 5), "in_proj_bias": (15,)}),
            ValueError,
            r"embed_dim 5 does not split in num_heads=2",
        ),
        (
            nn.MultiheadAttention(4, 2),
            Resize({"in_proj_weight": (12, 6)}),
            ValueError,
            r"\(3E, E\)",
        ),
        (nn.Embedding(5, 3), Resize({"weight": (6,)}), ValueError, "2-d tensor"),
        # Resize itself refuses these: built inside pytest.raises
        (nn.Linear(3, 4), lambda: Resize({"weight": (6, 0)}), ValueError, "positive sizes"),
        (nn.Linear(3, 4), lambda: Resize({"weight": (6.0, 3)}), TypeError, "tuple of ints"),
        (nn.Linear(3, 4), lambda: Resize({1: (6, 3)}), TypeError, "names must be str"),
        (nn.Linear(3, 4), lambda: Resize(groups=0), ValueError, "positive int or None"),
        ("not a module", Resize(), TypeError, "expects an nn.Module"),
        (nn.Linear(3, 4), {"weight": (6, 3)}, TypeError, "expects a Resize"),
    ],
)
def test_inconsistent_or_bad_input_is_refused(module, resize, error, match) -> None:
    with pytest.raises(error, match=match):
        attribute_updates(module, resize() if callable(resize) else resize)


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = 1

    @property
    def frozen(self) -> int:
        return 0

    @frozen.setter
    def frozen(self, value: int) -> None:
        raise AttributeError("frozen cannot be set")


def test_set_attributes_restores_on_failure() -> None:
    module = _Frozen()
    with pytest.raises(AttributeError, match="frozen"):
        set_attributes(module, {"a": 2, "frozen": 3})
    assert module.a == 1
    old = set_attributes(module, {"a": 5})
    assert (module.a, old) == (5, {"a": 1})


def test_handler_errors_name_the_module_and_its_class() -> None:
    resize = Resize({"weight": (7,), "bias": (7,)})
    with pytest.raises(
        ValueError, match=r"^module 'stem\.gn' \(GroupNorm\): 7 channels do not split in num_groups"
    ):
        attribute_updates(nn.GroupNorm(2, 4), resize, name="stem.gn")
    with pytest.raises(ValueError, match=r"^GroupNorm module: 7 channels"):
        attribute_updates(nn.GroupNorm(2, 4), resize)


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_zoo_modules_unchanged_shapes_give_their_own_attributes(case) -> None:
    # Every module of the zoo that owns tensors has a built-in handler, except the
    # ConvNeXt block owning its layer scale, which needs none (no size attribute).
    for fqn, module in case.build().named_modules():
        tensors = dict(module.named_parameters(recurse=False))
        tensors.update(module.named_buffers(recurse=False))
        if not tensors:
            continue
        # a grouped conv's weight does not tell its groups: the planner always says
        groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else None
        resize = Resize.from_tensors(tensors, groups=groups)
        if isinstance(module, ConvNeXtBlock):
            assert attribute_updates(module, resize, name=fqn) == {}
            continue
        updates = attribute_updates(module, resize, name=fqn)
        assert updates, fqn
        assert updates == {k: getattr(module, k) for k in updates}, fqn
