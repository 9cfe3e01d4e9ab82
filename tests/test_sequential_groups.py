"""A Sequential MLP is read through its traced width groups (issue 12: one code path).

``read_sequential`` derives the :class:`Layout` from the groups the tracer finds. The
expectations here are hand-written chains (which Linear feeds each hidden layer, which
BatchNorm1d and activations follow it), brute-force forward passes, and the refusals a
module-by-module walk cannot see: a registered "element-wise" module whose forward is
not element-wise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import torch_embed
from torch_embed._sequential import (
    _CACHE,
    HiddenLayer,
    Layout,
    LinearLayer,
    read_sequential,
    register_elementwise,
)
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.graph.plan import plan_maps
from torch_embed.widen import widen

pytestmark = pytest.mark.usefixtures("single_thread")


class Cube(nn.Module):
    def forward(self, z: Tensor) -> Tensor:
        return z**3


class Flip(nn.Module):
    """Registered as element-wise by mistake: it reverses the features."""

    def __init__(self, flip: bool = True) -> None:
        super().__init__()
        self.flip = flip

    def forward(self, z: Tensor) -> Tensor:
        return z.flip(-1) if self.flip else torch.tanh(z)


class Centre(nn.Module):
    """Registered as element-wise by mistake: it subtracts the mean over the features."""

    def forward(self, z: Tensor) -> Tensor:
        return z - z.mean(dim=-1, keepdim=True)


def _lin(name: str, fan_in: int, fan_out: int, bias: bool = True) -> LinearLayer:
    return LinearLayer(name, fan_in, fan_out, bias)


def _hidden(net: nn.Sequential, linear: str, bn: str | None, acts: tuple[str, ...]) -> HiddenLayer:
    return HiddenLayer(linear, bn, acts, tuple(type(net.get_submodule(a)) for a in acts))


def _chains() -> list[tuple[str, nn.Sequential, Layout]]:
    """MLPs and their layouts written by hand."""
    out = []
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)
    )  # BatchNorm before the activation
    out.append(
        (
            "bn_before_activation",
            net,
            Layout((_lin("0", 3, 4), _lin("3", 4, 2)), (_hidden(net, "0", "1", ("2",)),)),
        )
    )
    net = nn.Sequential(
        nn.Linear(3, 5, bias=False),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(5, 4, bias=False),
        nn.Linear(4, 2),
    )  # no bias, Dropout, and a hidden layer without activation
    out.append(
        (
            "no_bias_dropout_linear_layer",
            net,
            Layout(
                (_lin("0", 3, 5, False), _lin("3", 5, 4, False), _lin("4", 4, 2)),
                (_hidden(net, "0", None, ("1", "2")), _hidden(net, "3", None, ())),
            ),
        )
    )
    net = nn.Sequential()
    net.add_module("inp", nn.Linear(2, 3))
    net.add_module("act", nn.PReLU())
    net.add_module("same", nn.Identity())
    net.add_module("mid", nn.Linear(3, 6))
    net.add_module("norm", nn.BatchNorm1d(6, affine=False, track_running_stats=False))
    net.add_module("cube", Cube())
    net.add_module("out", nn.Linear(6, 1))
    net.add_module("squash", nn.Sigmoid())  # after the last Linear: untouched
    out.append(
        (
            "prelu_identity_registered_tensorless_bn",
            net,
            Layout(
                (_lin("inp", 2, 3), _lin("mid", 3, 6), _lin("out", 6, 1)),
                (
                    _hidden(net, "inp", None, ("act", "same")),
                    _hidden(net, "mid", "norm", ("cube",)),
                ),
            ),
        )
    )
    net = nn.Sequential(
        nn.BatchNorm1d(3), nn.Linear(3, 4), nn.BatchNorm1d(4), nn.GELU(), nn.Linear(4, 3)
    )  # input normalisation before the first Linear: not a hidden layer
    out.append(
        (
            "input_batchnorm",
            net,
            Layout((_lin("1", 3, 4), _lin("4", 4, 3)), (_hidden(net, "1", "2", ("3",)),)),
        )
    )
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layout_is_the_hand_written_chain(clean_registry, dtype) -> None:
    register_elementwise(Cube)
    for name, net, expected in _chains():
        net = net.to(dtype)
        for device in ("cpu", "meta"):
            layout = read_sequential(copy.deepcopy(net).to(device))
            assert layout == expected, name
            assert [h.activation_types for h in layout.hidden] == [
                h.activation_types for h in expected.hidden
            ], name


def test_batchnorm_after_the_activation_is_refused() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError, match=r"layer 2 \(BatchNorm1d\) must come right after a Linear layer"
    ):
        read_sequential(net)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (
            Flip(),
            r"hidden layer 0 \(fed by layer 0\) cannot be widened: aten.flip in `1` \(Flip\) "
            r"depends on the order along the axis",
        ),
        (
            Centre(),
            r"hidden layer 0 \(fed by layer 0\) cannot be widened as an MLP layer: aten.mean "
            r"in `1` \(Centre\) constrains it",
        ),
    ],
    ids=["flip", "centre"],
)
def test_a_registered_module_that_is_not_elementwise_is_refused(
    clean_registry, module: nn.Module, match: str
) -> None:
    """Regression: the registry was trusted, so a Sequential with a registered module
    that mixes the features was widened, and its output changed without a warning."""
    register_elementwise(type(module))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), module, nn.Linear(4, 2)).double()
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=match):
        widen(net, [6], torch_embed.Split(), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    # the traced output of the same net: widening it by copies would not keep it
    x = torch.randn(5, 3, dtype=torch.float64)
    wide = nn.Sequential(nn.Linear(3, 6), module, nn.Linear(6, 2)).double()
    with torch.no_grad():
        wide[0].weight.copy_(torch.cat([net[0].weight, net[0].weight[:2]]))
        wide[0].bias.copy_(torch.cat([net[0].bias, net[0].bias[:2]]))
        half = net[2].weight[:, :2] / 2
        wide[2].weight.copy_(
            torch.cat([net[2].weight[:, :2] - half, net[2].weight[:, 2:], half], 1)
        )
        wide[2].bias.copy_(net[2].bias)
        assert float((wide(x) - net(x)).abs().max()) > 1e-3


def test_custom_modules_are_read_again_every_call(clean_registry) -> None:
    """A registered module's forward may depend on its state: its Sequential is traced
    on every call (only torch.nn modules, whose forward the shapes determine, are cached)."""
    register_elementwise(Flip)
    act = Flip(flip=False)
    net = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2))
    assert read_sequential(net).hidden[0].activations == ("1",)
    act.flip = True
    with pytest.raises(ValueError, match=r"aten.flip in `1` \(Flip\)"):
        read_sequential(net)


def test_the_cache_follows_the_structure() -> None:
    """A cached Layout is reused for the same structure and never for another one."""
    _CACHE.clear()
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    first = read_sequential(net)
    assert read_sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))) is first
    net[1] = nn.ReLU()
    assert read_sequential(net).hidden[0].activation_types == (nn.ReLU,)
    net[0], net[2] = nn.Linear(3, 7, bias=False), nn.Linear(7, 2)
    assert read_sequential(net).linears[:2] == (_lin("0", 3, 7, False), _lin("2", 7, 2))
    widen(net, [9], torch_embed.Split(), generator=torch.Generator().manual_seed(0))
    assert read_sequential(net).widths == (3, 9, 2)
    net.add_module("3", nn.Sigmoid())
    net.add_module("4", nn.Linear(2, 5))
    assert read_sequential(net).widths == (3, 9, 2, 5)
    assert read_sequential(net).hidden[1] == HiddenLayer("2", None, ("3",))


def test_null_bias_keeps_float64_in_the_planned_maps() -> None:
    """Regression: the group planner made the null bias with torch.where(null, β, 0.0),
    a float32 tensor: the map's β = 0.7 was 0.699999988 (the maps the MLP path builds
    its Embedding from, and the traced path composes and checks dead units with)."""

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    emb = widen(model, {"a": 6}, torch_embed.Null(bias=0.7), example_inputs=x)
    assert isinstance(emb, GroupEmbedding)
    assert emb.maps["a"].null_bias.tolist() == [0.0] * 4 + [0.7, 0.7]
    assert model.a.bias[4:].tolist() == [0.7, 0.7]


def test_null_bias_before_a_batchnorm_without_affine_is_refused_on_the_traced_path() -> None:
    """Regression: the traced planner stored β in the Linear's bias although a BatchNorm
    without affine bias follows it and re-centres that bias (the MLP path refused)."""

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = (
                nn.Linear(3, 4),
                nn.BatchNorm1d(4, affine=False),
                nn.Linear(4, 2),
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.bn(self.a(x))))

    torch.manual_seed(0)
    model = MLP().double().eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"width group 'a': .* BatchNorm `bn` has no affine bias"):
        widen(model, {"a": 6}, torch_embed.Null(bias=0.3), example_inputs=x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    widen(model, {"a": 6}, torch_embed.Null(bias=0.0), example_inputs=x)
    assert model.a.out_features == 6


def test_a_matrix_of_coefficients_needs_one_linear_reader() -> None:
    """``plan_maps`` passes a ``(wide_next, wide)`` matrix through for a group one Linear
    reads (an MLP's hidden layer) and refuses it for a group several tensors read."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            return self.c(h + torch.tanh(self.b(h)))

    src = torch.tensor([0, 1, 2, 3, 0])
    matrix = torch.ones(2, 5, dtype=torch.float64)
    matrix[:, 0], matrix[:, 4] = 0.25, 0.75
    x = torch.randn(5, 3)
    groups = torch_embed.width_groups(Residual(), x)
    with pytest.raises(ValueError, match=r"a matrix of coefficients .* needs exactly one Linear"):
        plan_maps(
            groups, {"a": 5}, torch_embed.General({"a": src}), general={"a": (src, matrix, 0.0)}
        )
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    groups = torch_embed.width_groups(mlp, x)
    maps, _ = plan_maps(
        groups, {"0": 5}, torch_embed.General([src]), general={"0": (src, matrix, 0.0)}
    )
    assert torch.equal(maps["0"].coef, matrix) and torch.equal(maps["0"].source, src)


def test_a_module_built_under_inference_mode_is_read() -> None:
    """Its train-mode BatchNorm cannot update inference tensors outside inference mode:
    the trace runs inside it, the buffers are left as they were, and widen still refuses
    the module with its own message."""
    _CACHE.clear()
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    assert read_sequential(net).hidden == (HiddenLayer("0", "1", ("2",)),)
    assert int(net[1].num_batches_tracked) == 0 and float(net[1].running_var.min()) == 1.0
    with pytest.raises(ValueError, match=r"'0.weight' of the Sequential is an inference tensor"):
        widen(net, [6])


@pytest.mark.parametrize("tracer", ["fx", "auto"])
def test_reading_leaves_the_random_generator_as_it_was(tracer: str) -> None:
    """Regression: the fx tracer runs the forward, and a train-mode Dropout drew from the
    global generator, so `torch.manual_seed(0); widen(net, ...)` then changed the next
    random numbers, depending on whether the structure had been read before."""
    _CACHE.clear()
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2)).train()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    read_sequential(net)
    torch_embed.width_groups(net, torch.zeros(2, 3), tracer=tracer)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), expected)


def test_reading_runs_no_forward_hook() -> None:
    """Regression: the fx tracer ran the leaf modules with their hooks, so a hook that
    collects activations got a spurious call on the first read of a structure."""
    _CACHE.clear()
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    calls: list[object] = []
    net[1].register_forward_hook(lambda _m, _i, out: calls.append(out))
    net[0].register_forward_pre_hook(lambda _m, args: calls.append(args))
    read_sequential(net)
    torch_embed.width_groups(net, torch.zeros(2, 3), tracer="fx")
    assert calls == []
