"""width_groups: trace any model into width groups (issue 12, the read side).

The expectations come from elsewhere than the tracer: the zoo's hand-written groups
(tests/zoo.py), today's ``read_sequential`` Layout for Sequential MLPs, and brute-force
forward passes (a unit whose every reader is zeroed cannot change the output; a unit
whose readers are kept does).
"""

from __future__ import annotations

import pytest
import torch
from cases import ACTIVATION_NAMES, Arch, archs, build_mlp, random_inputs
from hypothesis import given, settings
from torch import Tensor, nn
from torch.func import functional_call
from zoo import ZOO, ZooCase, by_name

import torch_embed
from torch_embed._sequential import read_sequential
from torch_embed.graph.groups import AxisUse, WidthGroup, WidthGroups, width_groups

CASES = [pytest.param(case, id=case.name) for case in ZOO]
BN_CASES = [pytest.param(case, id=case.name) for case in ZOO if case.batchnorm]
# the fx fallback on a spread of architectures (each export+fx pair costs time)
FX_CASES = [
    pytest.param(by_name(n), id=n)
    for n in (
        "mlp_residual",
        "sequential_reused_relu",
        "conv_flatten_linear",
        "resnet_basic",
        "densenet_block",
        "mobilenetv2_inverted_residual",
        "resnext_grouped_conv",
        "convnext_block",
        "channel_sort",
    )
]


def _listed(groups: list[WidthGroup]) -> list[WidthGroup]:
    """The zoo's convention: hidden groups that some parameter writes."""
    return [g for g in groups if g.hidden and any(u.role == "producer" for u in g.producers)]


def _check_against_zoo(case: ZooCase, groups: WidthGroups) -> None:
    got = {g.name: g for g in _listed(groups)}
    assert sorted(got) == sorted(e.name for e in case.expected)
    for e in case.expected:
        g = got[e.name]
        assert (g.size, g.growable) == (e.size, e.growable), e
        assert set(e.aliases) <= set(g.aliases), (e.aliases, g.aliases)
        for alias in e.aliases:
            assert groups.find(alias) is g
        if not e.growable:
            assert g.reason is not None


@pytest.mark.parametrize("case", CASES)
def test_zoo_groups_match_the_hand_written_expectation(case: ZooCase) -> None:
    _check_against_zoo(case, width_groups(case.build(), case.example_inputs()))


def _records(groups: WidthGroups) -> list[tuple[object, ...]]:
    return [
        (
            g.name,
            g.size,
            g.growable,
            g.aliases,
            sorted((u.tensor, u.axis, u.role, u.offset, u.stride, u.repeats) for u in g.producers),
            sorted((u.tensor, u.axis, u.role, u.offset, u.stride, u.repeats) for u in g.consumers),
            sorted(c.kind for c in g.constraints),
        )
        for g in groups
    ]


@pytest.mark.parametrize("case", FX_CASES)
def test_fx_fallback_finds_the_same_groups(case: ZooCase) -> None:
    model = case.build()
    fx = width_groups(model, case.example_inputs(), tracer="fx")
    exported = width_groups(model, case.example_inputs(), tracer="export")
    assert (fx.tracer, exported.tracer) == ("torch.fx", "torch.export")
    _check_against_zoo(case, fx)
    assert _records(fx) == _records(exported)


@pytest.mark.parametrize("case", BN_CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_left_bit_identical(case: ZooCase, train: bool) -> None:
    model = case.build().train(train)
    last = list(model.modules())[-1]  # the head: a mixed train/eval state must come back
    last.train(not train)
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: t.clone() for k, t in model.state_dict(keep_vars=True).items()}
    ids = {k: id(t) for k, t in model.state_dict(keep_vars=True).items()}
    # fx runs the real forward (train-mode BatchNorm updates its statistics); export
    # runs on fake tensors: both in train mode, export alone in eval mode
    for tracer in ("export", "fx") if train else ("export",):
        width_groups(model, case.example_inputs(), tracer=tracer)  # type: ignore[arg-type]
    after = model.state_dict(keep_vars=True)
    assert {k: id(t) for k, t in after.items()} == ids
    for k, t in after.items():
        assert t.dtype == before[k].dtype and torch.equal(t, before[k]), k
    assert {n: m.training for n, m in model.named_modules()} == modes
    # the trace really ran a train-mode forward that would have updated the statistics
    if train:
        model(*case.example_inputs())
        assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_unknown_op_is_rigid_and_named() -> None:
    case = by_name("channel_sort")
    groups = width_groups(case.build(), case.example_inputs())
    fc1 = groups.find("fc1")
    assert not fc1.growable and fc1.hidden
    assert fc1.reason is not None and "aten.sort" in fc1.reason
    custom_case = by_name("unknown_custom_op")
    custom = width_groups(custom_case.build(), custom_case.example_inputs())
    reason = custom.find("fc1").reason
    assert reason is not None and "torch_embed_zoo::roll_channels" in reason


class _Gather(nn.Module):
    """An unknown op inside a named submodule: the reason must name that module."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.gather(x, 1, torch.zeros_like(x, dtype=torch.long))


def test_unknown_op_reason_names_its_module() -> None:
    net = nn.Sequential(nn.Linear(3, 4), _Gather(), nn.Linear(4, 2)).double()
    groups = width_groups(net, torch.randn(2, 3, dtype=torch.float64))
    g = groups.find("0")
    assert not g.growable and g.reason is not None
    assert "aten.gather" in g.reason and "`1` (_Gather)" in g.reason


def test_sequential_subclass_is_traced_by_its_real_forward() -> None:
    case = by_name("sequential_subclass_residual")
    model = case.build()
    assert isinstance(model, nn.Sequential)
    g = width_groups(model, case.example_inputs()).find("0")
    # the skip h + f(h) couples the first Linear's rows with the middle Linear's rows,
    # which a layer-by-layer reading of the Sequential would not do
    rows = {(u.tensor, u.axis) for u in g.producers if u.role == "producer"}
    assert ("0.weight", 0) in rows and ("2.weight", 0) in rows
    assert {(u.tensor, u.axis) for u in g.consumers} == {("2.weight", 1), ("4.weight", 1)}


# ----------------------------------------------------------------------------- one code path
MLP_ARCHS = [
    Arch(3, (5,), 2),
    Arch(2, (1, 4), 3, bias=(False, True, False)),
    Arch(4, (3, 5, 2), 1, batchnorm=(True, False, True), dropout=(False, True, True)),
    Arch(3, (4, 4), 2, bias=(False, False, True), batchnorm=(True, True)),
    *[
        Arch(2, (3, 2), 2, activation=(a, b), batchnorm=(k % 2 == 0, k % 3 == 0))
        for k, (a, b) in enumerate(zip(ACTIVATION_NAMES, (*ACTIVATION_NAMES[1:], "Tanh")))
    ],
]


@pytest.mark.parametrize("arch", MLP_ARCHS, ids=str)
def test_sequential_mlp_groups_are_the_layout(arch: Arch) -> None:
    _assert_groups_are_the_layout(arch)


@settings(max_examples=15)
@given(arch=archs(max_depth=3, max_width=5))
def test_sequential_mlp_groups_are_the_layout_for_any_mlp(arch: Arch) -> None:
    _assert_groups_are_the_layout(arch)


def _assert_groups_are_the_layout(arch: Arch) -> None:
    net = build_mlp(arch)
    layout = read_sequential(net)
    groups = width_groups(net, random_inputs(arch))
    hidden = [g for g in groups if g.hidden]
    assert [g.name for g in hidden] == [h.linear for h in layout.hidden]
    for k, (g, h) in enumerate(zip(hidden, layout.hidden)):
        lin, nxt = layout.linears[k], layout.linears[k + 1]
        assert g.growable and g.size == lin.out_features == nxt.in_features
        writes = {("weight", 0)} | ({("bias", 0)} if lin.has_bias else set())
        expected = {(f"{lin.name}.{t}", a, "producer") for t, a in writes}
        if h.batchnorm is not None:
            expected |= {
                (f"{h.batchnorm}.{t}", 0, "per-channel")
                for t in ("weight", "bias", "running_mean", "running_var")
            }
        assert {(u.tensor, u.axis, u.role) for u in g.producers} == expected
        assert [(u.tensor, u.axis, u.role) for u in g.consumers] == [
            (f"{nxt.name}.weight", 1, "consumer")
        ]
        assert all((u.offset, u.stride, u.repeats) == (0, 1, ()) for u in g.producers)
        assert g.aliases == ((h.batchnorm,) if h.batchnorm else ())
        assert g.constraints == ()
        identity = {n for n in h.activations if isinstance(net.get_submodule(n), nn.Identity)}
        assert set(g.through) == set(h.activations) - identity  # nn.Identity runs no op
    rigid = [g for g in groups if not g.hidden]
    assert {g.reason for g in rigid} == {"model input `input`", "model output"}


# ----------------------------------------------------------------------------- placements
def _indices(u: AxisUse, unit: int) -> list[int]:
    """The indices of ``unit`` along ``u.axis`` (AxisUse's documented formula)."""
    out = [u.offset + unit * u.stride]
    for count, step in u.repeats:
        out = [i + r * step for i in out for r in range(count)]
    return out


def _zero(model: nn.Module, uses: tuple[AxisUse, ...], unit: int) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    new: dict[str, Tensor] = {}
    for u in uses:
        t = new.get(u.tensor, params[u.tensor].detach().clone())
        t.index_fill_(u.axis, torch.tensor(_indices(u, unit)), 0.0)
        new[u.tensor] = t
    return new


def _bump(model: nn.Module, g: WidthGroup, unit: int, base: dict[str, Tensor]) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    new = dict(base)
    for u in g.producers:
        if u.role != "producer":
            continue
        t = new.get(u.tensor, params[u.tensor].detach().clone()).clone()
        idx = torch.tensor(_indices(u, unit))
        t.index_add_(u.axis, idx, torch.ones_like(t.index_select(u.axis, idx)))
        new[u.tensor] = t
    return new


PLACEMENT_CASES = [
    pytest.param(by_name(n), id=n)
    for n in (
        "mlp_residual",
        "flatten_tokens_linear",
        "conv_flatten_linear",
        "resnet_basic",
        "densenet_block",
        "squeeze_excitation",
        "mobilenetv2_inverted_residual",
    )
]


@pytest.mark.parametrize("case", PLACEMENT_CASES)
def test_consumers_are_every_reader_of_each_unit(case: ZooCase) -> None:
    """Zero a unit's consumer entries: moving its producers no longer moves the output.

    Checks offsets (cat), strides and repeats (flatten) and completeness of the consumer
    list against forward passes, without trusting any bookkeeping of the tracer.
    """
    model = case.build().eval()
    (x,) = case.example_inputs()
    groups = width_groups(model, (x,))
    checked = 0
    for g in _listed(groups):
        for unit in (0, g.size - 1):
            zeroed = _zero(model, g.consumers, unit)
            with torch.no_grad():
                a = functional_call(model, zeroed, (x,))
                b = functional_call(model, _bump(model, g, unit, zeroed), (x,))
                c = functional_call(model, _bump(model, g, unit, {}), (x,))
                d = model(x)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # no reader left
            assert (c - d).abs().max() > 1e-6  # the readers were real
            checked += 1
    assert checked >= 2


def test_flatten_consumer_placement_by_hand() -> None:
    case = by_name("conv_flatten_linear")
    model = case.build()
    (x,) = case.example_inputs()
    g = width_groups(model, (x,)).find("2")  # conv with 4 channels, flattened into Linear 5
    (u,) = g.consumers
    lin = model.get_submodule("5")
    hw = lin.in_features // g.size
    assert (u.tensor, u.axis, u.offset, u.stride, u.repeats) == ("5.weight", 1, 0, hw, ((hw, 1),))


def test_densenet_concat_offsets_by_hand() -> None:
    case = by_name("densenet_block")
    groups = width_groups(case.build(), case.example_inputs())
    offsets = {
        (name, u.tensor): u.offset
        for name in ("conv0", "layer1.conv", "layer2.conv")
        for u in groups.find(name).consumers
    }
    # layer2 reads cat(conv0: 4, layer1: 3); the head reads cat(4, 3, 2)
    assert offsets[("conv0", "layer2.conv.weight")] == 0
    assert offsets[("layer1.conv", "layer2.conv.weight")] == 4
    assert offsets[("layer2.conv", "head.2.weight")] == 7
    # norm5 scales every part: a per-channel producer of each, at its offset
    parts = ("conv0", "layer1.conv", "layer2.conv")
    norm5 = {
        u.offset for n in parts for u in groups.find(n).producers if u.tensor == "norm5.weight"
    }
    assert norm5 == {0, 4, 7}


# ----------------------------------------------------------------------------- constraints
def test_constraints_name_the_norm_and_the_rule() -> None:
    convnext = width_groups(
        by_name("convnext_block").build(), by_name("convnext_block").example_inputs()
    )
    kinds = {c.kind: c for c in convnext.find("stem").constraints}
    # the layer scale (gamma * x, then + residual) is one use of gamma, not weight tying
    assert set(kinds) == {"layer_norm", "depthwise_conv"}
    assert "LayerNorm" in kinds["layer_norm"].op and "mean-fill" in kinds["layer_norm"].rule
    gn = width_groups(by_name("groupnorm").build(), by_name("groupnorm").example_inputs())
    (c,) = [c for c in gn.find("conv1").constraints if c.kind == "group_norm"]
    assert c.groups == by_name("groupnorm").build().get_submodule(c.module).num_groups
    rx = width_groups(
        by_name("resnext_grouped_conv").build(), by_name("resnext_grouped_conv").example_inputs()
    )
    g = rx.find("block.conv1")
    (c,) = g.constraints
    assert c.kind == "grouped_conv" and c.groups == 2
    (u,) = g.consumers
    assert (u.tensor, u.axis, u.groups) == ("block.conv2.weight", 1, 2)


# ----------------------------------------------------------------------------- refusals
def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_wrappers_refused_with_how_to_unwrap() -> None:
    net = _mlp()
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"DataParallel.*`\.module`"):
        width_groups(nn.DataParallel(net), x)
    with pytest.raises(TypeError, match="_orig_mod"):
        width_groups(torch.compile(net, backend="eager"), x)


def test_parametrized_and_inference_refused_untouched() -> None:
    class Scale(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return 2 * w

    net = _mlp()
    torch.nn.utils.parametrize.register_parametrization(net[0], "weight", Scale())
    with pytest.raises(ValueError, match=r"module `0` \(ParametrizedLinear\) is parametrized"):
        width_groups(net, torch.randn(2, 3))
    with torch.inference_mode():
        frozen = _mlp()
    with pytest.raises(TypeError, match=r"parameter `0.weight` is an inference tensor"):
        width_groups(frozen, torch.randn(2, 3))
    with torch.inference_mode():
        x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="example input 0 is an inference tensor"):
        width_groups(_mlp(), x)


def test_wrong_arguments_refused() -> None:
    with pytest.raises(TypeError, match=r"expects an nn\.Module, got function"):
        width_groups(lambda x: x, torch.randn(2, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a list"):
        width_groups(_mlp(), [torch.randn(2, 3)])
    with pytest.raises(TypeError, match="tensor or a tuple"):
        width_groups(_mlp(), {"x": torch.randn(2, 3)})
    with pytest.raises(ValueError, match="tracer must be"):
        width_groups(_mlp(), torch.randn(2, 3), tracer="jit")  # type: ignore[arg-type]


def test_untraceable_model_reports_both_tracers() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:  # data-dependent control flow: neither tracer takes it
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(
        ValueError, match=r"torch\.export.*failed.*torch\.fx\.symbolic_trace failed"
    ):
        width_groups(Branchy(), torch.randn(2, 3))


def test_public_api_and_table() -> None:
    assert torch_embed.width_groups is width_groups
    assert torch_embed.WidthGroup is WidthGroup
    groups = width_groups(by_name("resnet_basic").build(), by_name("resnet_basic").example_inputs())
    table = str(groups).splitlines()
    assert table[0].split() == ["group", "size", "growable", "producers", "consumers", "notes"]
    assert len(table) == len(groups) + 1
    assert isinstance(groups, list) and groups.find("layer1.1.bn2").name == "conv1"
    with pytest.raises(KeyError, match="no width group named 'nope'"):
        groups.find("nope")


def test_a_norm_over_a_concat_is_no_groups_alias() -> None:
    case = by_name("densenet_block")
    groups = width_groups(case.build(), case.example_inputs())
    assert groups.find("norm0").name == "conv0"  # norm0 scales exactly conv0's channels
    for name in ("norm5", "layer2.norm"):  # each scales a concatenation of three groups
        with pytest.raises(KeyError):
            groups.find(name)


# ----------------------------------------------------------------------------- op coverage
def _readers_check(model: nn.Module, x: Tensor, names: list[str]) -> WidthGroups:
    """The forward-pass reader check of each named group; returns all groups."""
    model = model.double().eval()
    groups = width_groups(model, (x,))
    for name in names:
        g = groups.find(name)
        for unit in range(g.size):
            zeroed = _zero(model, g.consumers, unit)
            with torch.no_grad():
                a = functional_call(model, zeroed, (x,))
                b = functional_call(model, _bump(model, g, unit, zeroed), (x,))
                c = functional_call(model, _bump(model, g, unit, {}), (x,))
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            assert (c - model(x)).abs().max() > 1e-6
    return groups


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


class SwiGLU(nn.Module):
    """A gated MLP: up writes 2h features, chunked into a gate and a value, multiplied."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(3, 4)
        self.up = nn.Linear(4, 2 * 5)
        self.down = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        gate, value = self.up(h).chunk(2, dim=-1)
        return self.head(h + self.down(nn.functional.silu(gate) * value))


def test_gated_mlp_gate_and_value_are_one_group_at_two_offsets() -> None:
    groups = _readers_check(SwiGLU(), _x(6, 3), ["fc_in", "up"])
    up = groups.find("up")
    assert (up.size, up.growable) == (5, True)
    rows = sorted((u.tensor, u.offset) for u in up.producers)
    assert rows == [("up.bias", 0), ("up.bias", 5), ("up.weight", 0), ("up.weight", 5)]
    assert {c.kind for c in up.constraints} == {"chunk"}
    assert groups.find("down").name == "fc_in"


class RawParameters(nn.Module):
    """An MLP written with bare Parameters and ``@``: no nn.Linear at all."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(3, 6, generator=g))
        self.b1 = nn.Parameter(torch.randn(6, generator=g))
        self.w2 = nn.Parameter(torch.randn(6, 2, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2


def test_bare_parameters_and_matmul() -> None:
    groups = _readers_check(RawParameters(), _x(5, 3), ["w1"])
    g = groups.find("w1")
    assert g.size == 6 and g.growable and g.hidden
    assert {(u.tensor, u.axis) for u in g.producers} == {("w1", 1), ("b1", 0)}
    assert [(u.tensor, u.axis, u.role) for u in g.consumers] == [("w2", 0, "consumer")]


class HeadsReshape(nn.Module):
    """Linear to 6 features viewed as 2 heads × 3 dims, an op per head, flattened back."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.qkv(x).view(x.shape[0], 2, 3)
        h = h * torch.sigmoid(h.mean(dim=-1, keepdim=True))  # a per-head gate
        return self.out(h.flatten(1))


def test_view_factors_a_group_into_heads_and_head_dims() -> None:
    # the mean over head dims reads every dim: only the heads have readers alone
    groups = _readers_check(HeadsReshape(), _x(5, 4), ["qkv[0]"])
    heads, dims = groups.find("qkv[0]"), groups.find("qkv[1]")
    assert (heads.size, dims.size) == (2, 3)
    (w,) = [u for u in heads.producers if u.tensor == "qkv.weight"]
    assert (w.offset, w.stride, w.repeats) == (0, 3, ((3, 1),))  # head h owns rows 3h..3h+2
    (w,) = [u for u in dims.producers if u.tensor == "qkv.weight"]
    assert (w.offset, w.stride, w.repeats) == (0, 1, ((2, 3),))  # dim d: rows d, d+3
    assert {c.kind for c in dims.constraints} >= {"mean"}  # the mean over head dims


class ChannelsLastHead(nn.Module):
    """conv -> permute to channels-last -> flatten -> Linear: channel c reads every C-th."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1)
        return self.out(torch.tanh(self.fc(h)))


def test_channels_last_flatten_interleaves_channels() -> None:
    groups = _readers_check(ChannelsLastHead(), _x(2, 2, 4, 4), ["conv", "fc"])
    (u,) = groups.find("conv").consumers
    assert (u.tensor, u.offset, u.stride, u.repeats) == ("fc.weight", 0, 1, ((16, 3),))


class FixedSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)) + torch.ones(5, dtype=x.dtype))


def test_a_tensor_of_a_size_written_in_forward_pins_its_group() -> None:
    g = width_groups(FixedSize().double(), _x(4, 3)).find("fc1")
    assert not g.growable and g.hidden
    assert g.reason is not None and "aten.ones" in g.reason and "fixed" in g.reason


class ChannelPad(nn.Module):
    """Zero channels padded onto a conv's output: the next conv reads them at offset 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1)
        self.conv2 = nn.Conv2d(5, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.pad(torch.tanh(self.conv1(x)), (0, 0, 0, 0, 1, 1))
        return self.conv2(h)


def test_channel_padding_shifts_the_readers() -> None:
    groups = _readers_check(ChannelPad(), _x(2, 2, 3, 3), ["conv1"])
    (u,) = groups.find("conv1").consumers
    assert (u.tensor, u.axis, u.offset) == ("conv2.weight", 1, 1)


class TiedLM(nn.Module):
    """An embedding whose matrix is also the output projection (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, idx: Tensor) -> Tensor:
        return nn.functional.linear(torch.tanh(self.mid(self.emb(idx))), self.emb.weight)


def test_weight_tying_is_one_group_with_a_tied_constraint() -> None:
    groups = width_groups(TiedLM().double(), torch.tensor([[0, 3, 6]]))
    g = groups.find("emb")
    assert g.growable and g.size == 4 and groups.find("mid") is g
    (tied,) = [c for c in g.constraints if c.kind == "tied"]
    assert "`emb.weight` is used by 2 ops" in tied.rule


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (SwiGLU, _x(6, 3)),
        (RawParameters, _x(5, 3)),
        (HeadsReshape, _x(5, 4)),
        (ChannelsLastHead, _x(2, 2, 4, 4)),
        (ChannelPad, _x(2, 2, 3, 3)),
        (TiedLM, torch.tensor([[0, 3, 6]])),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_fx_and_export_agree_on_custom_models(make: type[nn.Module], x: Tensor) -> None:
    model = make().double()
    assert _records(width_groups(model, x, tracer="fx")) == _records(
        width_groups(model, x, tracer="export")
    )


class MaskedWeight(nn.Module):
    """A weight computed from two parameters (w * mask) and applied with F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.w = nn.Parameter(torch.randn(4, 5, generator=torch.Generator().manual_seed(1)))
        self.mask = nn.Parameter(torch.rand(4, 5, generator=torch.Generator().manual_seed(2)))
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.linear(torch.tanh(self.fc1(x)), self.w * self.mask)
        return self.fc2(torch.tanh(h))


def test_a_weight_derived_from_two_parameters() -> None:
    groups = _readers_check(MaskedWeight(), _x(5, 3), ["fc1", "w"])
    fc1, w = groups.find("fc1"), groups.find("w")
    assert [(u.tensor, u.axis, u.role) for u in fc1.consumers] == [("w", 1, "consumer")]
    assert ("mask", 1, "per-channel") in {(u.tensor, u.axis, u.role) for u in fc1.producers}
    assert {(u.tensor, u.axis, u.role) for u in w.producers} == {
        ("w", 0, "producer"),
        ("mask", 0, "per-channel"),
    }
    assert not any(c.kind == "tied" for g in groups for c in g.constraints)


# ----------------------------------------------------------------------------- axis layouts
def test_layouts_give_the_indices_after_widening() -> None:
    """Resized layouts against the indices torch's own flatten/permute/cat produce."""
    groups = width_groups(ChannelsLastHead().double(), _x(2, 2, 4, 4))
    layout = groups.layouts[("fc.weight", 1)]
    assert str(layout) == "(<4> × <4> × conv)"
    wide = layout.resized({"conv": 5})
    (slot,) = wide.placements()
    positions = torch.arange(4 * 4 * 5).view(4, 4, 5)  # channels-last, flattened
    for c in range(5):
        assert slot.indices(c) == sorted(positions[:, :, c].flatten().tolist())
    assert wide.size == 80

    case = by_name("densenet_block")
    groups = width_groups(case.build(), case.example_inputs())
    layout = groups.layouts[("head.2.weight", 1)]
    assert str(layout) == "(conv0 + layer1.conv + layer2.conv)"
    widths = {"conv0": 6, "layer1.conv": 5, "layer2.conv": 2}
    parts = [torch.full((w,), k) for k, w in enumerate(widths.values())]
    owner = torch.cat(parts)  # which part each channel of the concatenation comes from
    unit = torch.cat([torch.arange(w) for w in widths.values()])
    for slot in layout.resized(widths).placements():
        k = list(widths).index(slot.group)
        for i in range(widths[slot.group]):
            (j,) = slot.indices(i)
            assert (owner[j].item(), unit[j].item()) == (k, i)

    groups = width_groups(HeadsReshape().double(), _x(5, 4))
    layout = groups.layouts[("qkv.weight", 0)].resized({"qkv[0]": 3, "qkv[1]": 4})
    heads, dims = layout.placements()
    rows = torch.arange(12).view(3, 4)  # view(N, heads, dims) of the Linear's rows
    assert [heads.indices(h) for h in range(3)] == rows.tolist()
    assert [dims.indices(d) for d in range(4)] == rows.T.tolist()


def test_every_use_agrees_with_its_layout() -> None:
    for case in (by_name("resnet_basic"), by_name("densenet_block")):
        groups = width_groups(case.build(), case.example_inputs())
        for g in groups:
            for u in g.producers + g.consumers:
                slots = groups.layouts[(u.tensor, u.axis)].placements()
                assert (g.name, u.offset, u.stride, u.repeats) in {
                    (s.group, s.offset, s.stride, s.repeats) for s in slots
                }


class TwoInputs(nn.Module):
    """Two inputs, a flag and a size, a buffer, a plain tensor attribute, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 2)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4))
        self.offset = torch.ones(4)  # not a buffer: its size is fixed

    def forward(self, x: Tensor, y: Tensor, shift: bool, k: int) -> dict[str, Tensor]:
        h = torch.relu(self.a(x) + self.b(y)) * self.scale * k
        if shift:
            h = h + self.offset
        return {"out": self.c(h)}


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_several_inputs_flags_buffers_and_plain_tensors(tracer: str) -> None:
    model = TwoInputs()
    args = (torch.randn(2, 3), torch.randn(2, 2))
    free = width_groups(model, (*args, False, 3), tracer=tracer)  # type: ignore[arg-type]
    a = free.find("b")
    assert (
        a.name == "a"
        and a.growable
        and ("scale", 0, "per-channel") in {(u.tensor, u.axis, u.role) for u in a.producers}
    )
    assert [g.name for g in free if not g.hidden] == ["<input x>", "<input y>", "c"]
    pinned = width_groups(model, (*args, True, 3), tracer=tracer).find("a")  # type: ignore[arg-type]
    assert not pinned.growable and "tensor constant `offset`" in str(pinned.reason)


class TypeAsAndRoll(nn.Module):
    def __init__(self, roll_features: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(2, 4)
        self.out1, self.out2 = nn.Linear(4, 2), nn.Linear(4, 2)
        self.dim = 1 if roll_features else 0

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        g = torch.tanh(self.fc2(y))
        h = torch.roll(torch.tanh(self.fc1(x)), 1, dims=self.dim).type_as(g)
        return self.out1(h) + self.out2(g)


def test_type_as_couples_nothing_and_roll_pins_only_its_axis() -> None:
    args = (_x(4, 3), _x(4, 2))
    groups = width_groups(TypeAsAndRoll(roll_features=False).double(), args)
    assert groups.find("fc1") is not groups.find("fc2")  # type_as reads only the dtype
    assert groups.find("fc1").growable  # rolled along the batch
    fc1 = width_groups(TypeAsAndRoll(roll_features=True).double(), args).find("fc1")
    assert not fc1.growable and "aten.roll" in str(fc1.reason)


class Counter(nn.Module):
    """A forward that rebinds a buffer to a new tensor (not an in-place update)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls = self.calls + 1
        return self.fc(x)


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_a_rebound_buffer_is_put_back(tracer: str) -> None:
    model = Counter()
    calls = model.calls
    width_groups(model, torch.randn(2, 3), tracer=tracer)  # type: ignore[arg-type]
    assert model.calls is calls and model.calls.item() == 0.0


@pytest.mark.parametrize("case", CASES)
def test_every_feature_axis_of_every_tensor_is_accounted_for(case: ZooCase) -> None:
    """No parameter or buffer axis is silently left out of the groups."""
    model = case.build()
    groups = width_groups(model, case.example_inputs())
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for fqn, t in tensors.items():
        if t.dim() == 0:  # num_batches_tracked
            continue
        owner = model.get_submodule(fqn.rpartition(".")[0])
        grouped = isinstance(owner, nn.modules.conv._ConvNd) and owner.groups > 1
        axes = [0] if t.dim() == 1 or (grouped and fqn.endswith("weight")) else [0, 1]
        for axis in axes:
            layout = groups.layouts[(fqn, axis)]
            assert layout.size == t.shape[axis], (fqn, axis)


def test_lazy_module_refused() -> None:
    net = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"`0` \(LazyLinear\) is a lazy module"):
        width_groups(net, torch.randn(2, 3))


class CatThenFlatten(nn.Module):
    """Two convs concatenated, then flattened into a Linear: a sum inside a product."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 3, 1)
        self.fc = nn.Linear(5 * 2 * 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return self.fc(torch.flatten(h, 1))


class SwapHalves(nn.Module):
    """A Linear viewed as 3 × 4, each row's halves swapped, and flattened back."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 12), nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        first, second = self.lin(x).view(x.shape[0], 3, 4).chunk(2, dim=-1)
        return self.out(torch.cat([torch.tanh(second), first], dim=-1).reshape(x.shape[0], 12))


def test_nested_sums_and_products() -> None:
    groups = _readers_check(CatThenFlatten(), _x(2, 2, 2, 2), ["a", "b"])
    assert str(groups.layouts[("fc.weight", 1)]) == "((a + b) × <2> × <2>)"
    (b,) = groups.find("b").consumers
    assert (b.offset, b.stride, b.repeats) == (8, 4, ((4, 1),))
    groups = _readers_check(SwapHalves(), _x(4, 3), ["lin[0]", "lin[1]", "lin[2]"])
    assert str(groups.layouts[("lin.weight", 0)]) == "(lin[0] × (lin[1] + lin[2]))"
    assert str(groups.layouts[("out.weight", 1)]) == "(lin[0] × (lin[2] + lin[1]))"


class Decoder(nn.Module):
    """Conv, transposed conv (weight is in × out), BatchNorm, InstanceNorm, Upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.up_conv = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.up = nn.Upsample(scale_factor=2)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.up_conv(torch.tanh(self.conv(x)))))
        return self.out(self.up(self.inorm(h)))


def test_transposed_conv_reads_axis_0_and_writes_axis_1() -> None:
    model, x = Decoder(), _x(2, 2, 3, 3)
    groups = _readers_check(model, x, ["conv", "up_conv"])
    assert [(u.tensor, u.axis) for u in groups.find("conv").consumers] == [("up_conv.weight", 0)]
    up = groups.find("up_conv")
    assert ("up_conv.weight", 1, "producer") in {(u.tensor, u.axis, u.role) for u in up.producers}
    assert up.aliases == ("bn", "inorm")
    fx = width_groups(model, x, tracer="fx")
    assert _records(fx) == _records(width_groups(model, x, tracer="export"))
