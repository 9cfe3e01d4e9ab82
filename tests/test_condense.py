"""condense / effective_widths: the inverse of widening, checked by forward passes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import torch_embed
from torch_embed.landscape.condense import condense, effective_widths


def _net(widths, act=nn.Tanh, bias=True, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = []
    for k in range(len(widths) - 1):
        layers.append(nn.Linear(widths[k], widths[k + 1], bias=bias))
        if k < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def _x(n, d, seed=1, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _same_state(a, b, atol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


SCHEMES = [
    torch_embed.Split(alpha=0.5),
    torch_embed.Split(alpha=0.3),
    torch_embed.Split(alpha=-0.7),  # signed split
    torch_embed.Split(alpha="random"),
    torch_embed.Split(alpha=(0.2, 0.5, 0.3), select="cyclic"),
    torch_embed.Net2Net(),
    torch_embed.Null(bias=0.4),
    torch_embed.Null(bias=0.0, fan_in_std=0.5),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_round_trip_recovers_narrow_network(scheme, seed):
    narrow = _net([3, 4, 3, 2], act=nn.Tanh, seed=seed)
    x = _x(20, 3, seed)
    y_narrow = narrow(x).detach()
    wide = copy.deepcopy(narrow)
    gen = torch.Generator().manual_seed(seed)
    emb = torch_embed.widen(wide, [8, 7], scheme, generator=gen)
    wide_state = copy.deepcopy(wide.state_dict())
    res = condense(wide)
    # widths and weights of the narrow network come back (up to the summed shares)
    assert res.widths == (4, 3) == narrow_widths(narrow)
    assert res.original_widths == (8, 7)
    assert res.merged + res.dropped == 8
    _same_state(wide, narrow, atol=1e-12)
    torch.testing.assert_close(wide(x), y_narrow, rtol=0, atol=1e-12)
    # the returned embedding undoes the condensation: same weights as the wide net
    assert res.embedding.wide_widths == emb.wide_widths
    torch_embed.embed_(wide, res.embedding)
    for k, v in wide.state_dict().items():
        torch.testing.assert_close(v, wide_state[k], rtol=0, atol=1e-12, msg=k)
    critical = not (isinstance(scheme, torch_embed.Null) and scheme.fan_in_std > 0)
    assert res.embedding.is_critical == critical


def narrow_widths(net):
    return tuple(m.out_features for m in net if isinstance(m, nn.Linear))[:-1]


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid])
def test_round_trip_mixed_composition_and_no_bias(act):
    narrow = _net([2, 3, 3, 1], act=act, bias=False, seed=5)
    x = _x(16, 2)
    y = narrow(x).detach()
    wide = copy.deepcopy(narrow)
    gen = torch.Generator().manual_seed(3)
    torch_embed.widen(wide, [5, 4], torch_embed.Split(alpha=0.25), generator=gen)
    torch_embed.widen(wide, [7, 6], torch_embed.Split(alpha=1.5, select="random"), generator=gen)
    res = condense(wide)
    assert res.widths == (3, 3)
    torch.testing.assert_close(wide(x), y, rtol=0, atol=1e-12)
    _same_state(wide, narrow, atol=1e-12)


def test_general_embedding_with_reordered_copies():
    # copies interleaved with the originals and a null neuron in the middle
    narrow = _net([2, 3, 2], seed=3)
    x = _x(10, 2)
    y = narrow(x).detach()
    wide = copy.deepcopy(narrow)
    scheme = torch_embed.General(sources=[[2, 0, -1, 1, 0, 2]], null_bias=0.3)
    torch_embed.widen(wide, None, scheme)
    res = condense(wide)
    assert res.widths == (3,)
    torch.testing.assert_close(wide(x), y, rtol=0, atol=1e-12)
    torch_embed.embed_(wide, res.embedding)
    torch.testing.assert_close(wide(x), y, rtol=0, atol=1e-12)


def test_non_proportional_fan_out_comes_back_through_offsets():
    narrow = _net([2, 3, 2], seed=4)
    x = _x(10, 2)
    wide = copy.deepcopy(narrow)
    gen = torch.Generator().manual_seed(0)
    torch_embed.widen(wide, [5], torch_embed.Net2Net(noise=0.5), generator=gen)
    wide_state = copy.deepcopy(wide.state_dict())
    res = condense(wide)
    assert res.widths == (3,)
    torch.testing.assert_close(wide(x), narrow(x), rtol=0, atol=1e-12)
    assert res.embedding.kind is torch_embed.EmbeddingKind.OUTPUT_PRESERVING
    torch_embed.embed_(wide, res.embedding)
    for k, v in wide.state_dict().items():
        torch.testing.assert_close(v, wide_state[k], rtol=0, atol=1e-12, msg=k)


def test_constant_neuron_folds_into_next_bias():
    net = _net([2, 3, 2], act=nn.Sigmoid, seed=6)
    with torch.no_grad():
        net[0].weight[1] = 0.0  # neuron 1 outputs the constant sigmoid(b_1)
    x = _x(10, 2)
    y = net(x).detach()
    b1 = float(net[0].bias[1].detach())
    col = net[2].weight[:, 1].detach().clone()
    bias = net[2].bias.detach().clone()
    res = condense(net)
    assert res.widths == (2,) and res.dropped == 1
    torch.testing.assert_close(net(x), y, rtol=0, atol=1e-14)
    expected = bias + torch.sigmoid(torch.tensor(b1, dtype=torch.float64)) * col
    torch.testing.assert_close(net[2].bias.detach(), expected, rtol=0, atol=1e-15)
    torch_embed.embed_(net, res.embedding)
    torch.testing.assert_close(net(x), y, rtol=0, atol=1e-14)


def test_constant_neuron_without_next_bias_is_kept_unless_zero():
    net = _net([2, 3, 2], act=nn.Sigmoid, seed=6)
    net[2].bias = None
    with torch.no_grad():
        net[0].weight[1] = 0.0
    assert effective_widths(net) == (3,)  # sigmoid(b) != 0 and nowhere to fold it
    relu = _net([2, 3, 2], act=nn.ReLU, seed=6)
    relu[2].bias = None
    with torch.no_grad():
        relu[0].weight[1] = 0.0
        relu[0].bias[1] = -0.5  # relu(-0.5) = 0: the neuron is dead
    x = _x(10, 2)
    y = relu(x).detach()
    assert condense(relu).widths == (2,)
    # a few ulps, not bitwise: the 2-column product may take another GEMM kernel (FMA or
    # not, another summation order) than the 3-column one did
    ulps = 4 * torch.finfo(y.dtype).eps
    torch.testing.assert_close(relu(x), y, rtol=ulps, atol=ulps * float(y.abs().max()))


def test_cancelling_fan_outs_are_kept():
    net = _net([2, 2, 1], seed=7)
    with torch.no_grad():
        net[0].weight[1] = net[0].weight[0]
        net[0].bias[1] = net[0].bias[0]
        net[2].weight[0, 1] = -net[2].weight[0, 0]
    assert effective_widths(net) == (2,)


def test_cos_merges_parallel_relu_neurons():
    net = _net([3, 3, 2], act=nn.ReLU, seed=8)
    with torch.no_grad():
        net[0].weight[2] = 2.5 * net[0].weight[0]
        net[0].bias[2] = 2.5 * net[0].bias[0]
    x = _x(30, 3)
    y = net(x).detach()
    assert effective_widths(net) == (3,)  # not equal, only parallel
    res = condense(net, cos=1 - 1e-12)
    assert res.widths == (2,)
    torch.testing.assert_close(net(x), y, rtol=0, atol=1e-12)
    # the embedding reproduces the function (not the weights) at the original width
    torch_embed.embed_(net, res.embedding)
    assert net[0].out_features == 3
    torch.testing.assert_close(net(x), y, rtol=0, atol=1e-12)


def test_cos_one_merges_parallel_rows_whatever_the_rounding():
    """``cos=1``: rows parallel up to rounding merge. Their computed cosine is 1 ± a few
    ulps, by the dot and norm kernels' summation order (here, on an AMD EPYC, about a
    quarter of random pairs came out below 1 and were kept apart: a CPU-dependent
    width; this test failed without the slack)."""
    k = 40
    net = _net([5, 2 * k, 2], act=nn.ReLU, seed=9)
    gen = torch.Generator().manual_seed(9)
    factors = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        net[0].weight[k:] = factors[:, None] * net[0].weight[:k]
        net[0].bias[k:] = factors * net[0].bias[:k]
    x = _x(30, 5)
    y = net(x).detach()
    assert condense(net, cos=1.0).widths == (k,)
    torch.testing.assert_close(net(x), y, rtol=1e-12, atol=1e-12)


def test_cos_refused_for_non_homogeneous_and_batchnorm():
    with pytest.raises(ValueError, match=r"layer 1 \(Tanh\) of hidden layer 0"):
        condense(_net([2, 3, 1]), cos=0.99)
    bn = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="BatchNorm1d"):
        condense(bn, cos=0.99)
    with pytest.raises(ValueError, match="cos must lie"):
        condense(_net([2, 3, 1], act=nn.ReLU), cos=1.5)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="atol must be a finite number"):
            condense(_net([2, 3, 1]), atol=bad)
    with pytest.raises(TypeError, match="atol must be a real number >= 0, got str"):
        condense(_net([2, 3, 1]), atol="1e-8")  # type: ignore[arg-type]


def test_batchnorm_split_round_trip():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = _x(12, 2)
    net.train()
    net(x)  # non-trivial running statistics
    net.eval()
    y = net(x).detach()
    torch_embed.widen(net, [6], torch_embed.Split(alpha=0.5))
    res = condense(net)
    assert res.widths == (3,) and net[1].num_features == 3
    torch.testing.assert_close(net(x), y, rtol=0, atol=1e-12)


def test_float32_keeps_dtype_parameters_and_effective_widths_is_pure():
    narrow = _net([3, 5, 2], dtype=torch.float32, seed=10)
    x = _x(8, 3, dtype=torch.float32)
    y = narrow(x).detach()
    wide = copy.deepcopy(narrow)
    torch_embed.widen(wide, [9], torch_embed.Split(alpha=0.5))
    before = copy.deepcopy(wide.state_dict())
    assert effective_widths(wide) == (5,)
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())
    weight = wide[0].weight
    res = condense(wide)
    assert wide[0].weight is weight and weight.dtype == torch.float32
    assert res.widths == (5,)
    torch.testing.assert_close(wide(x), y, rtol=0, atol=1e-6)


def test_rows_equal_only_after_the_previous_layer_is_merged():
    # matrix coefficients: the two copies of layer-1 neuron 0 distribute their weight
    # differently over the copies of layer-0 neuron 0, so their rows differ until the
    # layer-0 copies are merged (a second pass merges them)
    torch.manual_seed(0)
    net = _net([2, 2, 2, 1], seed=11)
    x = _x(10, 2)
    y = net(x).detach()
    c0 = torch.tensor([[0.3, 1.0, 0.7], [0.5, 1.0, 0.5], [0.6, 1.0, 0.4]], dtype=torch.float64)
    scheme = torch_embed.General(sources=[[0, 1, 0], [0, 1, 0]], coefficients=[c0, None])
    wide = copy.deepcopy(net)
    torch_embed.widen(wide, None, scheme)
    res = condense(wide)
    assert res.widths == (2, 2) and res.merged == 2
    torch.testing.assert_close(wide(x), y, rtol=0, atol=1e-13)
    _same_state(wide, net, atol=1e-13)
    torch_embed.embed_(wide, res.embedding)  # the function comes back (weights: see docs)
    assert wide[0].out_features == wide[2].out_features == 3
    torch.testing.assert_close(wide(x), y, rtol=0, atol=1e-13)
