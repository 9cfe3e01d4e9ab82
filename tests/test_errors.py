"""Every refusal: exception type, a message naming the offending layer/argument, and an
unchanged module afterwards (values, shapes, parameter identity, features)."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import replace

import pytest
import torch
from cases import Arch, build_mlp
from torch import nn
from torch.nn.utils import parametrizations, prune

from torch_embed.embedding import Embedding
from torch_embed.schemes import General, Net2Net, Null, RandomPad, Split, plan
from torch_embed.widen import embed_, widen

pytestmark = pytest.mark.usefixtures("single_thread")


def _copy(p: torch.Tensor) -> torch.Tensor | None:
    if isinstance(p, nn.parameter.UninitializedParameter):
        return None
    return p.detach().clone()


def _snapshot(net: nn.Module):
    return (
        {n: (p, _copy(p)) for n, p in net.named_parameters()},
        {n: b.clone() for n, b in net.named_buffers()},
        [
            (
                m,
                dict(vars(m)).get("in_features"),
                dict(vars(m)).get("out_features"),
                dict(vars(m)).get("num_features"),
            )
            for m in net.modules()
        ],
    )


def _assert_unchanged(net: nn.Module, snap) -> None:
    params, buffers, mods = snap
    assert [n for n, _ in net.named_parameters()] == list(params)
    for n, p in net.named_parameters():
        obj, value = params[n]
        assert p is obj, n
        if value is None:
            assert isinstance(p, nn.parameter.UninitializedParameter)
            continue
        assert p.shape == value.shape and torch.equal(p.detach(), value), n
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    for (m, fin, fout, nf), m2 in zip(mods, net.modules()):
        assert m is m2
        assert (dict(vars(m)).get("in_features"), dict(vars(m)).get("out_features")) == (fin, fout)
        assert dict(vars(m)).get("num_features") == nf


def _refused(net: nn.Module, exc: type[Exception], match: str, *args, **kwargs) -> None:
    snap = _snapshot(net)
    with pytest.raises(exc, match=match):
        widen(net, *args, **kwargs)
    _assert_unchanged(net, snap)


def _mlp(*extra_middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), *extra_middle, nn.Linear(4, 2))


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize(
    ("net", "exc", "match"),
    [
        (nn.Linear(3, 4), TypeError, r"widen expects an nn.Sequential .* got Linear"),
        (nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 2)]), TypeError, r"got ModuleList"),
        (
            _mlp(nn.LayerNorm(4)),
            TypeError,
            r"layer 1 \(LayerNorm\) cannot be widened.*Accepted: nn.Linear",
        ),
        (_mlp(nn.Tanh(), nn.Softmax(dim=-1)), TypeError, r"layer 2 \(Softmax\) cannot be widened"),
        (
            _mlp(Custom()),
            TypeError,
            r"layer 1 \(Custom\) cannot be widened: it is not a known element-wise",
        ),
        (
            nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh()), nn.Linear(4, 2)),
            TypeError,
            r"layer 1 \(Sequential\) cannot be widened: nested Sequential",
        ),
        (_mlp(nn.PReLU(4)), TypeError, r"layer 1 \(PReLU\) .*num_parameters=4"),
        (_mlp(nn.AlphaDropout(0.1)), TypeError, r"layer 1 \(AlphaDropout\)"),
        (_mlp(nn.BatchNorm2d(4)), TypeError, r"layer 1 \(BatchNorm2d\)"),
        (
            nn.Sequential(nn.Linear(3, 4), nn.Tanh()),
            ValueError,
            r"at least two nn.Linear layers .* found 1",
        ),
        (nn.Sequential(), ValueError, r"at least two nn.Linear layers .* found 0"),
        (
            nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(5, 2)),
            ValueError,
            r"layer 2 \(Linear\) has in_features=5 but the previous Linear \(layer 0\) "
            r"has out_features=4",
        ),
        (
            _mlp(nn.Tanh(), nn.BatchNorm1d(4)),
            ValueError,
            r"layer 2 \(BatchNorm1d\) must come right after a Linear",
        ),
        (
            _mlp(nn.BatchNorm1d(4), nn.BatchNorm1d(4)),
            ValueError,
            r"layer 2 \(BatchNorm1d\) must come right after",
        ),
        (
            _mlp(nn.BatchNorm1d(5)),
            ValueError,
            r"layer 1 \(BatchNorm1d\) has num_features=5 .* out_features=4",
        ),
    ],
    ids=[
        "not_sequential",
        "module_list",
        "layernorm",
        "softmax",
        "custom",
        "nested_sequential",
        "prelu_per_channel",
        "alpha_dropout",
        "batchnorm2d",
        "one_linear",
        "empty",
        "mismatched_features",
        "bn_after_activation",
        "two_bn",
        "bn_features",
    ],
)
def test_refused_modules(net, exc, match) -> None:
    _refused(net, exc, match, [5])


def test_weight_tying_refused() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    net[2].weight = net[0].weight
    _refused(
        net,
        ValueError,
        r"layer 2 \(Linear\) shares its parameter 'weight' with layer 0 \(weight tying\)",
        [5, 5],
    )


def test_same_module_twice_refused() -> None:
    act = nn.Tanh()
    lin = nn.Linear(4, 4)
    net = nn.Sequential(nn.Linear(3, 4), act, lin, act, nn.Linear(4, 1))
    _refused(net, ValueError, r"layer 3 \(Tanh\) is the same module object as layer 1", [5, 5])
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 1))
    _refused(net, ValueError, r"layer 4 \(Linear\) is the same module object as layer 2", [5, 5, 5])


def test_parametrized_layer_refused() -> None:
    net = _mlp(nn.Tanh())
    parametrizations.weight_norm(net[2])
    _refused(
        net,
        ValueError,
        r"layer 2 \(ParametrizedLinear\) is parametrized; remove the parametrization",
        [5],
    )


def _old_weight_norm(m: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of parametrizations
        torch.nn.utils.weight_norm(m)


@pytest.mark.parametrize(
    ("reparametrize", "found"),
    [
        (_old_weight_norm, r"'weight_g', 'weight_v'"),
        (torch.nn.utils.spectral_norm, r"'weight_orig', 'weight_u', 'weight_v'"),
        (
            lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
            r"'weight_mask', 'weight_orig'",
        ),
    ],
    ids=["weight_norm", "spectral_norm", "prune"],
)
@pytest.mark.parametrize("layer", [0, 2])
def test_hook_based_reparametrization_refused(reparametrize, found, layer) -> None:
    # these recompute `weight` from other tensors in a forward pre-hook; widening used to
    # succeed and leave those tensors narrow, so the next forward pass failed
    net = _mlp(nn.Tanh())
    reparametrize(net[layer])
    _refused(
        net,
        ValueError,
        rf"layer {layer} \(Linear\) holds tensors widen does not map \({found}\).*"
        r"Remove it first",
        [5],
    )


def test_extra_buffer_on_batchnorm_refused() -> None:
    net = _mlp(nn.BatchNorm1d(4), nn.Tanh())
    net[1].register_buffer("mask", torch.ones(4))
    _refused(net, ValueError, r"layer 1 \(BatchNorm1d\) holds tensors .*\('mask'\)", [5])


def _replace_weight(net: nn.Sequential) -> None:
    net[0].weight = nn.Parameter(torch.ones(6, 3))  # hand surgery: out_features still 4
    net[0].bias = nn.Parameter(torch.ones(6))
    net[2].weight = nn.Parameter(torch.ones(2, 6))


def _replace_running_mean(net: nn.Sequential) -> None:
    net[1].running_mean = torch.zeros(6)


@pytest.mark.parametrize(
    ("net", "surgery", "match"),
    [
        (
            _mlp(nn.Tanh()),
            _replace_weight,
            r"layer 0 \(Linear\) has weight of shape \(6, 3\) but in_features=3, out_features=4",
        ),
        (
            _mlp(nn.BatchNorm1d(4), nn.Tanh()),
            _replace_running_mean,
            r"layer 1 \(BatchNorm1d\) has running_mean of shape \(6,\) but num_features=4",
        ),
    ],
    ids=["linear", "batchnorm"],
)
def test_features_attributes_out_of_sync_with_tensors_refused(net, surgery, match) -> None:
    # PyTorch's forward ignores in_features/out_features, so such a network runs; widen
    # read the stale attributes, dropped the extra rows, changed the output by O(1) and
    # still reported kind=critical
    surgery(net)
    _refused(net, ValueError, match, [8])


def test_batchnorm_without_affine_or_statistics_is_accepted() -> None:
    net = _mlp(nn.BatchNorm1d(4, affine=False, track_running_stats=False), nn.Tanh())
    widen(net, [6], generator=torch.Generator().manual_seed(0))
    assert net[0].out_features == 6 and net[1].num_features == 6


@pytest.mark.parametrize(
    ("net", "match"),
    [
        (
            nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
            r"layer 0 \(Flatten\) .* before the first Linear: `widen\(module\[1:\], ...\)`",
        ),
        (
            nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.LogSoftmax(dim=1)),
            r"layer 3 \(LogSoftmax\) .* after the last Linear: `widen\(module\[:3\], ...\)`",
        ),
        (
            nn.Sequential(type("MyLinear", (nn.Linear,), {})(3, 4), nn.Tanh(), nn.Linear(4, 2)),
            r"layer 0 \(MyLinear\) cannot be widened: it is a subclass of nn.Linear",
        ),
    ],
    ids=["flatten_first", "log_softmax_last", "linear_subclass"],
)
def test_refusal_explains_the_way_out(net, match) -> None:
    _refused(net, TypeError, match, [5])


@pytest.mark.parametrize(
    "wrap",
    [nn.DataParallel, torch.optim.swa_utils.AveragedModel],
    ids=["data_parallel", "averaged_model"],
)
def test_wrapper_of_a_sequential_names_its_module(wrap) -> None:
    net = wrap(_mlp(nn.Tanh()))
    _refused(
        net, TypeError, rf"widen got a {wrap.__name__} that wraps an nn.Sequential.*`.module`", [5]
    )


def test_the_suggested_slice_widens_the_whole_network() -> None:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2), nn.LogSoftmax(dim=1)
    ).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=g)
    with torch.no_grad():
        before = net(x)
    widen(net[1:4], [7], generator=g)
    assert net[1].weight.shape == (7, 6) and net[3].weight.shape == (2, 7)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-13)


def test_lazy_layer_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Lazy modules are a new feature ..."
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LazyLinear(2))
    _refused(
        net, ValueError, r"layer 2 \(LazyLinear\) is a lazy module .* run one forward pass", [5]
    )


def test_live_autograd_graph_refused_and_module_unchanged() -> None:
    net = build_mlp(Arch(3, (4,), 2))
    out = net(torch.randn(2, 3, dtype=torch.float64))  # keeps a graph that saved the weights
    _refused(
        net,
        RuntimeError,
        r"0.weight: a computation graph built before widening still uses this parameter",
        [6],
    )
    out.sum().backward()  # the old graph still works (it was not poisoned)
    assert net[0].weight.grad.shape == (4, 3)
    del out
    widen(net, [6])  # and once it is freed, widening works
    assert net[0].out_features == 6


# ----------------------------------------------------------------------------- new_widths
NET = Arch(3, (4, 5), 2)


@pytest.mark.parametrize(
    ("widths", "match"),
    [
        ([5], r"new_widths has 1 entries but the network has 2 hidden layers \(widths \[4, 5\]\)"),
        ([5, 6, 7], r"new_widths has 3 entries"),
        ([5.0, 6], r"new width of hidden layer 0 must be an int, got float 5.0"),
        ([5, True], r"new width of hidden layer 1 must be an int, got bool True"),
        ([5, "6"], r"new width of hidden layer 1 must be an int, got str"),
        ([3, 6], r"new width 3 of hidden layer 0 \(fed by layer 0\) is below its current width 4"),
        ({1: 4}, r"new width 4 of hidden layer 1 \(fed by layer 2\) is below its current width 5"),
        ({2: 8}, r"new_widths key 2 is not a hidden-layer index; the network has 2 hidden layers"),
        ({-1: 8}, r"new_widths key -1 is not a hidden-layer index"),
        ({True: 8}, r"new_widths key True is not a hidden-layer index"),
        ({"0": 8}, r"new_widths key '0' is not a hidden-layer index"),
        (7, r"new_widths must be a sequence of 2 ints .* got int"),
        ("67", r"new_widths must be a sequence of 2 ints .* got str"),
        (None, r"new_widths may only be None with a General scheme"),
    ],
)
def test_bad_new_widths(widths, match) -> None:
    _refused(build_mlp(NET), ValueError, match, widths)


# ----------------------------------------------------------------------------- schemes
@pytest.mark.parametrize(
    ("widths", "scheme", "exc", "match"),
    [
        (
            [6, 6],
            "splitt",
            ValueError,
            r"unknown scheme 'splitt'; use one of \['net2net', 'null', 'random_pad', 'split'\]",
        ),
        ([6, 6], object(), TypeError, r"scheme must be a name or one of Split, .* got object"),
        (
            [6, 6],
            Split(alpha=float("nan")),
            ValueError,
            r"alpha must be a finite real number, a sequence or 'random'; got nan",
        ),
        ([6, 6], Split(alpha=float("inf")), ValueError, r"alpha must be a finite real number"),
        (
            [6, 6],
            Split(alpha=True),
            ValueError,
            r"alpha must be a finite real number, a sequence or 'random'; got True",
        ),
        (
            [6, 6],
            Split(alpha="half"),
            ValueError,
            r"alpha='half': use a number, a sequence or 'random'",
        ),
        (
            [6, 6],
            Split(alpha=(0.5, 0.6)),
            ValueError,
            r"k-way alpha needs at least 2 coefficients summing to 1, got \[0.5, 0.6\]",
        ),
        ([6, 6], Split(alpha=(1.0,)), ValueError, r"k-way alpha needs at least 2 coefficients"),
        (
            [7, 5],
            Split(alpha=(0.2, 0.3, 0.5)),
            ValueError,
            r"hidden layer 0 gains 3 neurons, not a multiple of 2 \(a 3-way split",
        ),
        (
            [6, 5],
            Split(select="biggest"),
            ValueError,
            r"select='biggest' is not one of \('random', 'cyclic', 'norm'\)",
        ),
        (
            [6, 5],
            Split(select=[0, 9]),
            ValueError,
            r"select index 9 is out of range for hidden layer 0 \(width 4\)",
        ),
        (
            [6, 5],
            Split(select=[0, -1]),
            ValueError,
            r"select index -1 is out of range for hidden layer 0",
        ),
        (
            [6, 5],
            Split(select=[0]),
            ValueError,
            r"select gives 1 neurons for hidden layer 0, but it gains 2",
        ),
        (
            [6, 6],
            Split(select=[0, 1]),
            ValueError,
            r"select is a flat list of indices but 2 hidden layers are widened",
        ),
        (
            [6, 6],
            Split(select=[[0, 1]]),
            ValueError,
            r"select needs one index list per hidden layer \(2\), got 1",
        ),
        (
            [6, 6],
            Split(select={5: [0]}),
            ValueError,
            r"select key 5 is not a hidden-layer index \(0..1\)",
        ),
        (
            [6, 6],
            Net2Net(noise=-0.1),
            ValueError,
            r"Net2Net.noise must be a finite number >= 0, got -0.1",
        ),
        (
            [6, 6],
            Net2Net(noise=float("nan")),
            ValueError,
            r"Net2Net.noise must be a finite number >= 0",
        ),
        (
            [6, 6],
            Null(fan_in_std=-1.0),
            ValueError,
            r"Null.fan_in_std must be a finite number >= 0, got -1.0",
        ),
        # non-finite numbers used to be accepted and wrote NaN into the weights, while
        # the embedding still reported kind=critical
        (
            [6, 7],
            Split(alpha=(float("nan"), 0.5, 0.5)),
            ValueError,
            r"a k-way alpha needs finite coefficients, got \[nan, 0.5, 0.5\]",
        ),
        (
            [6, 7],
            Split(alpha=(float("inf"), float("-inf"), 1.0)),
            ValueError,
            r"a k-way alpha needs finite coefficients",
        ),
        (
            [6, 6],
            Null(bias=float("nan")),
            ValueError,
            r"Null.bias must be a finite number, got nan",
        ),
        (
            [6, 6],
            Null(bias=float("inf")),
            ValueError,
            r"Null.bias must be a finite number, got inf",
        ),
        (
            [6, 6],
            RandomPad(scale=float("nan")),
            ValueError,
            r"RandomPad.scale must be a finite number, got nan",
        ),
        # select entries that are not ints used to be truncated by int() or to fail with
        # "'float' object is not iterable"
        (
            [6, 5],
            Split(select=[0.5, 1]),
            ValueError,
            r"select must be 'random', 'cyclic', 'norm', a list of neuron indices \(ints\)",
        ),
        ([6, 5], Split(select=[True, False]), ValueError, r"a list of neuron indices \(ints\)"),
        (
            [6, 5],
            Split(select=[[0.7, 1.2], None]),
            ValueError,
            r"select\[0\] must hold neuron indices \(ints\), got float 0.7",
        ),
        (
            [6, 5],
            Split(select={0: [0.5, 1]}),
            ValueError,
            r"select\[0\] must hold neuron indices \(ints\), got float 0.5",
        ),
        (
            [6, 5],
            Split(select={True: [0, 1]}),
            ValueError,
            r"select key True is not a hidden-layer index",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_scheme_arguments(widths, scheme, exc, match) -> None:
    _refused(build_mlp(NET), exc, match, widths, scheme, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("general", "widths", "match"),
    [
        (
            General([[0, 1, 2, 3]]),
            None,
            r"General.sources needs one entry per hidden layer \(2\), got 1",
        ),
        (
            General([[0, 1, 2, 3, 0], None]),
            [6, 5],
            r"hidden layer 0: new_widths says 6 but General.sources gives 5",
        ),
        (
            General([[0, 1, 2, 4, 0], None]),
            None,
            r"hidden layer 0: wide neuron 3 has source 4, but sources must lie in \[0, 4\)",
        ),
        (General([[0, 1, 2, -2, 3], None]), None, r"hidden layer 0: wide neuron 3 has source -2"),
        (
            General([[0, 1, 2, 2, -1], None]),
            None,
            r"hidden layer 0: narrow neurons \[3\] have no copy .* \(totality\)",
        ),
        (
            General([None, [0, 1, 2, 3]]),
            None,
            r"hidden layer 1: the wide layer has 4 neurons, fewer than the narrow layer's 5",
        ),
        (
            General([[0, 1, 2, 3, 0], None], [[0.5, 1, 1, 1, 0.6], None]),
            None,
            r"hidden layer 0: the fan-out coefficients of the copies of narrow neuron 0 sum to 1.1",
        ),
        (
            General([[0, 1, 2, 3, -1], None], [[1, 1, 1, 1, 0.2], None]),
            None,
            r"hidden layer 0: null neurons must have coefficient 0",
        ),
        (
            General([[0, 1, 2, 3, 0], None], [[0.5, 1, 1, 1], None]),
            None,
            r"hidden layer 0: coef must have shape \(5,\)",
        ),
        (
            General([[0, 1, 2, 3, 0], None], [torch.ones(4, 5, dtype=torch.float64), None]),
            None,
            r"hidden layer 0: a matrix of coefficients must have shape "
            r"\(wide_next, wide\) = \(5, 5\)",
        ),
        (
            General([[0, 1, 2, 3, 0], None], [torch.ones(5, 5, dtype=torch.float64), None]),
            None,
            r"hidden layer 0: in row 0 of the next layer, the coefficients of the copies "
            r"of narrow neuron 0 sum to 2.0",
        ),
        (
            General([[0, 1, 2, 3], None], [None]),
            None,
            r"General.coefficients needs one entry per hidden layer \(2\)",
        ),
        (
            General([[0, 1, 2, 3, 0], None], [[float("nan"), 1, 1, 1, float("nan")], None]),
            None,
            r"hidden layer 0: coef has non-finite entries \(nan or inf\)",
        ),
        (
            General([[0, 1, 2, 3, -1], None], null_bias=[0.1]),
            None,
            r"General.null_bias must be one finite number, or one per hidden layer \(2\)",
        ),
        (
            General([[0, 1, 2, 3, -1], None], null_bias=float("nan")),
            None,
            r"General.null_bias must be one finite number.*got nan",
        ),
        (
            General([[0, 1, 2, 3, 0.5], None]),
            None,
            r"General.sources\[0\] must be None or a list of ints",
        ),
        (
            General([[[0, 1], [2, 3]], None]),
            None,
            r"General.sources\[0\] must be None or a list of ints",
        ),
    ],
    ids=[
        "count",
        "width_mismatch",
        "source_range",
        "source_below_null",
        "totality",
        "narrower",
        "coef_sum",
        "null_coef",
        "coef_shape",
        "matrix_shape",
        "matrix_sum",
        "coef_count",
        "coef_nan",
        "null_bias_count",
        "null_bias_nan",
        "float_source",
        "nested_source",
    ],
)
def test_bad_general(general, widths, match) -> None:
    _refused(build_mlp(NET), ValueError, match, widths, general)


def test_generator_that_is_not_a_generator_refused() -> None:
    # a seed passed as generator= was ignored by select="cyclic" and failed deep inside
    # torch.randperm otherwise
    _refused(
        build_mlp(NET),
        TypeError,
        r"generator must be a torch.Generator or None, got int 0 .*manual_seed",
        [6, 6],
        Split(select="cyclic"),
        generator=0,
    )


def test_non_finite_fan_out_offset_refused_on_construction() -> None:
    emb = plan(
        build_mlp(NET), [6, 5], Net2Net(noise=0.5), generator=torch.Generator().manual_seed(0)
    )
    offset = torch.zeros(5, 6, dtype=torch.float64)  # (next wide width, wide width)
    offset[0, 4] = float("inf")
    with pytest.raises(ValueError, match=r"hidden layer 0: fan_out_offset has non-finite entries"):
        Embedding(emb.layout, (replace(emb.layers[0], fan_out_offset=offset), emb.layers[1]))


def test_null_bias_on_bias_free_layer_refused() -> None:
    net = build_mlp(Arch(3, (4, 5), 2, bias=(False, True, True)))
    _refused(
        net,
        ValueError,
        r"hidden layer 0: null neurons with a bias β != 0 need one place for β .* found none: "
        r"its producing layer `0` \(linear\) has no bias and no affine BatchNorm follows it",
        [6, 5],
        Null(bias=0.2),
    )


def test_embed_refuses_an_embedding_of_another_network() -> None:
    emb = plan(build_mlp(NET), [6, 6], generator=torch.Generator().manual_seed(0))
    other = build_mlp(Arch(3, (4, 6), 2))
    snap = _snapshot(other)
    with pytest.raises(
        ValueError,
        match=r"planned for a network with widths \(3, 4, 5, 2\) .* "
        r"the module has widths \(3, 4, 6, 2\)",
    ):
        embed_(other, emb)
    _assert_unchanged(other, snap)
    # the same structure with other names is refused too
    renamed = nn.Sequential()
    for i, m in enumerate(build_mlp(NET)):
        renamed.add_module(f"m{i}", m)
    with pytest.raises(
        ValueError,
        match=r"layers \['0', '2', '4'\], but the module has .* layers \['m0', 'm2', 'm4'\]",
    ):
        embed_(renamed, emb)


# ----------------------------------------------------------------------------- issue 11 §4
def _tanh_net(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def test_widen_inside_inference_mode_leaves_trainable_parameters() -> None:
    # the new tensors used to be inference tensors: the next backward failed far away
    net = _tanh_net()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(x)
    with torch.inference_mode():
        widen(net, [7], Split(alpha=0.25), generator=torch.Generator().manual_seed(0))
    assert not any(t.is_inference() for t in [*net.parameters(), *net.buffers()])
    assert torch.allclose(net(x), before, rtol=0, atol=1e-14)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x).pow(2).sum().backward()  # raised "Inference tensors cannot be saved for backward"
    opt.step()
    assert net[0].weight.grad.shape == (7, 3)


def test_module_built_under_inference_mode_refused_with_the_fix() -> None:
    with torch.inference_mode():
        net = _tanh_net()
    _refused(
        net,
        ValueError,
        r"'0.weight' of the Sequential is an inference tensor .* torch.inference_mode\(\).*"
        r"`net = copy.deepcopy\(net\)`",
        [6],
    )
    for p in net.parameters():  # half a fix: the Parameter objects keep no version counter
        p.data = p.data.clone()
    assert not any(p.is_inference() for p in net.parameters())
    _refused(net, ValueError, r"'0.weight' of the Sequential is an inference tensor", [6])
    net = copy.deepcopy(net)  # the fix the message gives works
    widen(net, [6])
    net(torch.randn(2, 3, dtype=torch.float64)).sum().backward()


def test_buffer_shared_between_layers_refused() -> None:
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.BatchNorm1d(4)
    )
    net.append(nn.Tanh()).append(nn.Linear(4, 2))
    net[4].running_mean = net[1].running_mean  # widening layer 0 used to break layer 4
    _refused(
        net,
        ValueError,
        r"layer 4 \(BatchNorm1d\) shares its buffer 'running_mean' with layer 1 "
        r"\(a shared buffer\)",
        [6, 4],
    )


@pytest.mark.parametrize(
    ("widths", "scheme", "match"),
    [
        # all outputs inf/NaN, reported as critical
        (
            [5, 5],
            Split(alpha=1e30),
            r"hidden layer 0: .* magnitudes summing to 2e\+30 .* above 1e\+08",
        ),
        ([6, 5], Split(alpha=(1e10, 1.0, -1e10)), r"magnitudes summing to 2e\+10"),
        # (1e20, 1 - 1e20) sums to 0 in float64 and passed the relative check as critical
        (
            [5, 5],
            General(
                sources=[[0, 1, 2, 3, 0], None], coefficients=[[1e20, 1, 1, 1, 1 - 1e20], None]
            ),
            r"magnitudes summing to 2e\+20 .* float64 cannot confirm that they sum to 1",
        ),
    ],
    ids=["split_1e30", "kway_1e10", "general_1e20"],
)
def test_huge_coefficients_refused(widths, scheme, match) -> None:
    _refused(build_mlp(NET), ValueError, match, widths, scheme)


def test_coefficients_refused_against_the_dtype() -> None:
    # α = 1e5 in float16: |1-α| + |α| = 2e5 times u = 4.9e-4 gave output errors of ~1
    net = _tanh_net(torch.float16)
    _refused(
        net,
        ValueError,
        r"hidden layer 0: .* summing to 2e\+05 .* rounding error of torch.float16 \(u = 0.000488\) "
        r"to 97.7 relative.* a sum up to 45.3",
        [6],
        Split(alpha=1e5),
    )
    widen(_tanh_net(torch.float16), [6], Split(alpha=10.0))  # 19 u: accepted
    widen(_tanh_net(torch.float32), [6], Split(alpha=1e3))  # 1999 u in float32: accepted
    _refused(_tanh_net(torch.float32), ValueError, r"torch.float32", [6], Split(alpha=1e4))


def test_coefficient_times_weights_overflowing_the_dtype_refused() -> None:
    net = _tanh_net(torch.float16)
    with torch.no_grad():
        net[2].weight.fill_(1e4)
    _refused(
        net,
        ValueError,
        r"write values up to 1e\+05 into torch.float16 weights, whose largest finite number "
        r"is 6.55e\+04",
        [6],
        Split(alpha=10.0),
    )


def test_embed_given_widths_says_to_use_widen() -> None:
    net = _tanh_net()
    snap = _snapshot(net)
    with pytest.raises(TypeError, match=r"embed_ takes an Embedding .* got list \[16\].*widen"):
        embed_(net, [16])  # type: ignore[arg-type]
    _assert_unchanged(net, snap)


def test_zero_width_layer_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        net = nn.Sequential(nn.Linear(3, 0), nn.Tanh(), nn.Linear(0, 2))
    _refused(net, ValueError, r"layer 0 \(Linear\) has in_features=3, out_features=0", [4])


@pytest.mark.parametrize(
    ("scheme", "exc", "match"),
    [
        (Null(bias="0.5"), TypeError, r"Null.bias must be a real number .* got str '0.5'"),
        (Null(fan_in_std=None), TypeError, r"Null.fan_in_std must be a real number"),
        (Net2Net(noise=True), TypeError, r"Net2Net.noise must be a real number .* got bool"),
        (RandomPad(scale="1"), TypeError, r"RandomPad.scale must be a real number"),
    ],
    ids=["null_bias", "null_fan_in_std", "net2net_noise", "random_pad_scale"],
)
def test_scheme_scalars_of_the_wrong_type_are_named(scheme, exc, match) -> None:
    _refused(build_mlp(NET), exc, match, [6, 6], scheme)


@pytest.mark.skipif(
    not hasattr(os, "sysconf"), reason="the CPU's memory size is read with os.sysconf"
)
def test_huge_width_refused_with_its_size_before_allocating() -> None:
    # 10**12 neurons: a bare MemoryError from the planner before
    _refused(
        build_mlp(NET),
        ValueError,
        # 8 bytes x (10**12 x (3 + 1) + 5 x (10**12 + 1) + 2 x (5 + 1))
        r"widening to hidden widths \(1000000000000, 5\) needs 72,000,000,000,136 bytes "
        r"\(67,055.2 GiB\) for the wide parameters alone, more than the [\d,]+ bytes",
        [10**12, 5],
    )


@pytest.mark.parametrize(
    "widths",
    [torch.tensor([6, 7]), torch.tensor([6, 7], dtype=torch.int32)],
    ids=["int64", "int32"],
)
def test_widths_as_a_tensor(widths) -> None:
    ref, net = build_mlp(NET), build_mlp(NET)
    e1 = widen(ref, [6, 7], Split(alpha=0.25), generator=torch.Generator().manual_seed(0))
    e2 = widen(net, widths, Split(alpha=0.25), generator=torch.Generator().manual_seed(0))
    assert e2.wide_widths == e1.wide_widths == (3, 6, 7, 2)
    assert all(
        torch.equal(a, b) for a, b in zip(ref.state_dict().values(), net.state_dict().values())
    )


def test_widths_as_a_numpy_array() -> None:
    np = pytest.importorskip("numpy")
    net = build_mlp(NET)
    widen(net, np.array([6, 7]))
    assert (net[0].out_features, net[2].out_features) == (6, 7)


@pytest.mark.parametrize(
    ("widths", "match"),
    [
        (torch.tensor([[6, 7]]), r"new_widths given as a Tensor must be 1-D .* shape \(1, 2\)"),
        (torch.tensor([6.0, 7.0]), r"new width of hidden layer 0 must be an int, got float 6.0"),
        (torch.tensor(6), r"must be 1-D .* shape \(\)"),
    ],
    ids=["2d", "float", "0d"],
)
def test_bad_widths_tensor(widths, match) -> None:
    _refused(build_mlp(NET), ValueError, match, widths)


def test_embedding_planned_on_other_activations_refused() -> None:
    # planned on Tanh, replayed on Sigmoid: the null neurons' σ(β) was Tanh's
    tanh = _tanh_net()
    sigmoid = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    emb = plan(tanh, [6], Null(bias=0.5))
    snap = _snapshot(sigmoid)
    with pytest.raises(
        ValueError,
        match=r"hidden layer 0: .* planned on activations \['Tanh'\] .* has \['Sigmoid'\]",
    ):
        embed_(sigmoid, emb)
    _assert_unchanged(sigmoid, snap)
    # same type, other parameters: caught by the null neurons' value σ(β)
    leaky = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.01), nn.Linear(4, 2)).double()
    steep = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)).double()
    emb = plan(leaky, [6], Null(bias=-1.0))
    with pytest.raises(ValueError, match=r"null neurons output σ\(β\) = -0.01, .* give -0.2"):
        embed_(steep, emb)
    embed_(copy.deepcopy(leaky), emb)  # the network it was planned on


def test_optimizer_holding_none_of_the_parameters_refused() -> None:
    net, other = _tanh_net(), _tanh_net()
    opt = torch.optim.Adam(other.parameters())  # e.g. built on a copy
    other(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    _refused(
        net,
        ValueError,
        r"the optimizer \(Adam, 4 parameters\) holds none of the module's 4 parameters",
        [6],
        optimizer=opt,
    )
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer .* got list"):
        widen(net, [6], optimizer=[opt])  # type: ignore[arg-type]


def test_frozen_bias_warning_is_given_once() -> None:
    net = _tanh_net()
    net[2].bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad])
    net(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()  # .grad, exp_avg and exp_avg_sq all meet the missing bias
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        widen(net, [6], Null(bias=0.5), optimizer=opt)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "layer '2' (Linear)" in messages[0] and "its bias is not among" in messages[0]
    assert caught[0].filename == __file__  # it points at the call to widen
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = plan(_tanh_net(), [6], Null(bias=0.5))
        frozen = _tanh_net()
        frozen[2].bias.requires_grad_(False)
        frozen(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
        embed_(frozen, emb)  # and at the call to embed_
    assert [w.filename for w in caught] == [__file__], [str(w.message) for w in caught]
