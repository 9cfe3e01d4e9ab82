"""widen on traced models (issue 12, the apply side), driven by the zoo (tests/zoo.py).

References are brute force, never the code's own output: the narrow model's forward
pass (the wide model must give the same output), autograd on the wide model (its
gradient must equal the narrow gradient mapped through the embedding), and a replay of
SGD-momentum/Adam on the mapped gradients (the optimizer state widen maps must equal
it). Widths are drawn at random; a width a group's rule forbids must be refused with
the rule named, and a multiple of the size is then used.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import Tensor, nn
from zoo import ZOO, ZooCase, by_name

import torch_embed
from torch_embed.embedding import Embedding, EmbeddingKind
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.graph.groups import width_groups
from torch_embed.schemes import DEFAULT_SCHEME, Scheme
from torch_embed.widen import widen

# null units under ReLU never learn: widen warns (test_dead_null_units_warn checks it)
pytestmark = pytest.mark.filterwarnings(
    "ignore:width group .* null units with zero fan-in:UserWarning"
)

SCHEMES: list[Scheme] = [
    torch_embed.Split(alpha="random"),
    torch_embed.Split(alpha=(0.2, -0.3, 1.1)),  # 3-way, signed
    torch_embed.Split(alpha=1.7, select="cyclic"),  # a signed split
    torch_embed.Net2Net(),
    torch_embed.Null(),
    DEFAULT_SCHEME,  # Net2Net with exact symmetric noise
]
RULE = re.compile(
    r"(LayerNorm at `[\w.]+`: uniform copies or mean-fill|RMSNorm at `[\w.]+`: uniform copies "
    r"or zero-fill|GroupNorm at `[\w.]+`: uniform copies \()|grouped conv at "
    r"`[\w.]+` \(groups=\d+\): every group must grow by the same amount|a 3-way split adds 2"
)


def _cases() -> list[object]:
    out = []
    for case in ZOO:
        for mode in ("train", "eval") if case.batchnorm else ("train",):
            out.append(pytest.param(case, mode, id=f"{case.name}-{mode}"))
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _widen_some(
    model: nn.Module,
    x: tuple[Tensor, ...],
    name: str,
    size: int,
    scheme: Scheme,
    g: torch.Generator,
) -> GroupEmbedding | None:
    """Widen group ``name`` to a random width; a refused width must name its rule."""
    width = size + int(torch.randint(1, 2 * size + 1, (1,), generator=g))
    try:
        emb = widen(model, {name: width}, scheme, example_inputs=x, generator=g)
    except ValueError as error:
        if RULE.search(str(error)) is None and "null units change" not in str(error):
            raise
        if isinstance(scheme, torch_embed.Null):
            return None  # null units under a norm: refused, and no width would do
        emb = widen(model, {name: 3 * size}, scheme, example_inputs=x, generator=g)
    assert isinstance(emb, GroupEmbedding)
    return emb


@pytest.mark.parametrize(("case", "mode"), _cases())
def test_every_group_is_exact(case: ZooCase, mode: str) -> None:
    """Every growable group of every zoo model, under a rotating scheme: output kept."""
    g = torch.Generator().manual_seed(sum(map(ord, case.name)))
    x = case.example_inputs()
    for k, expected in enumerate(e for e in case.expected if e.growable):
        scheme = SCHEMES[(k + len(case.name)) % len(SCHEMES)]
        model = getattr(case.build(), mode)()
        with torch.no_grad():
            before = model(*x)
        params = {n: p for n, p in model.named_parameters()}
        emb = _widen_some(model, x, expected.name, expected.size, scheme, g)
        if emb is None:
            continue
        with torch.no_grad():
            after = model(*x)
        assert _rel(after, before) <= 1e-12, (expected.name, scheme)
        assert emb.sizes[expected.name][1] > expected.size
        for n, p in model.named_parameters():
            assert params[n] is p  # identity kept
        assert model.training == (mode == "train")


@pytest.mark.parametrize(
    "name",
    [
        "resnet_basic",
        "convnext_block",
        "groupnorm",
        "densenet_block",
        "resnext_grouped_conv",
        "mobilenetv2_inverted_residual",
        "conv_flatten_linear",
    ],
)
def test_factor_widens_every_group(name: str) -> None:
    case = by_name(name)
    model, x = case.build(), case.example_inputs()
    with torch.no_grad():
        before = model(*x)
    emb = widen(model, 1.5, torch_embed.Split(alpha="random"), example_inputs=x)
    assert isinstance(emb, GroupEmbedding)
    growable = {e.name for e in case.expected if e.growable}
    assert set(emb.sizes) == growable
    for old, new in emb.sizes.values():
        assert new >= 1.5 * old
    with torch.no_grad():
        assert _rel(model(*x), before) <= 1e-12
    # the widened model traces again, with the new sizes
    wide = {grp.name: grp.size for grp in width_groups(model, x)}
    for n, (_, new) in emb.sizes.items():
        assert wide[n] == new


def _loss(model: nn.Module, x: tuple[Tensor, ...], r: Tensor | None = None) -> Tensor:
    out = model(*x)
    if r is None:
        r = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * r).sum() + 0.5 * (out**2).sum()


GRAD_CASES = [
    "mlp_residual",
    "mlp_batchnorm",
    "conv_flatten_linear",
    "resnet_bottleneck",
    "densenet_block",
    "mobilenetv2_inverted_residual",
    "resnext_grouped_conv",
    "squeeze_excitation",
    "convnext_block",
    "groupnorm",
]


@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradient_maps(name: str) -> None:
    """The wide gradient (autograd) equals the narrow one mapped; ``.grad`` is mapped."""
    case = by_name(name)
    g = torch.Generator().manual_seed(7)
    x = case.example_inputs()
    for k, expected in enumerate(e for e in case.expected if e.growable):
        scheme = SCHEMES[k % len(SCHEMES)]
        model = case.build()
        _loss(model, x).backward()
        narrow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            emb = _widen_some(model, x, expected.name, expected.size, scheme, g)
        if emb is None:
            continue
        warned = [w for w in caught if issubclass(w.category, torch_embed.ApproximateStateWarning)]
        if emb.kind is not EmbeddingKind.CRITICAL:  # see test_norm_gradients_need_equal_shares
            caveats = [r for r in emb.reasons if not r.startswith("Net2Net noise")]
            assert all("unequal coefficients" in r for r in caveats), emb.reasons
            assert bool(warned) == bool(caveats)  # .grad said to be approximate
            continue
        assert not warned
        mapped = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        _loss(model, x).backward()
        for n, p in model.named_parameters():
            assert p.grad is not None and mapped[n] is not None
            assert p.grad.shape == mapped[n].shape, n
            scale = max(float(narrow[n].abs().max()), 1e-3)
            err = float((p.grad - mapped[n]).abs().max())
            assert err <= 1e-11 * scale, (expected.name, scheme, n, err)


@pytest.mark.parametrize(
    "name",
    [
        "mlp_batchnorm",
        "resnet_basic",
        "mobilenetv2_inverted_residual",
        "resnext_grouped_conv",
        "densenet_block",
    ],
)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_optimizer_state_equals_replay(name: str, opt: str) -> None:
    case = by_name(name)
    x = case.example_inputs()
    model = case.build()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}

    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if opt == "sgd":
            return torch.optim.SGD(params, lr=0.01, momentum=0.9)
        return torch.optim.Adam(params, lr=0.01)

    optimizer = make(list(model.parameters()))
    grads: list[dict[str, Tensor]] = []
    for _ in range(3):
        optimizer.zero_grad()
        _loss(model, x).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})  # type: ignore[union-attr]
        optimizer.step()
    emb = widen(
        model,
        2,  # every growable group
        torch_embed.Split(alpha="random"),
        example_inputs=x,
        optimizer=optimizer,
        generator=torch.Generator().manual_seed(3),
    )
    assert isinstance(emb, GroupEmbedding) and emb.kind is EmbeddingKind.CRITICAL
    assert len(emb.sizes) == len(case.expected)
    # replay: a fresh wide optimizer fed the narrow run's gradients through the map
    wide_init = emb.apply(init)
    replay = {n: nn.Parameter(t.clone()) for n, t in wide_init.items()}
    replay_opt = make(list(replay.values()))
    for grad in grads:
        for n, gw in emb.map_gradients(grad).items():
            replay[n].grad = gw
        replay_opt.step()
    for n, p in model.named_parameters():
        got, want = optimizer.state[p], replay_opt.state[replay[n]]
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, Tensor) and value.is_floating_point() and value.dim():
                assert got[key].shape == value.shape, (n, key)
                err = float((got[key] - value).abs().max())
                assert err <= 1e-12 * max(float(value.abs().max()), 1e-12), (n, key, err)
            else:
                assert float(got[key]) == float(value), (n, key)
    optimizer.step()  # the optimizer works on the new shapes


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _unchanged(model: nn.Module, snap: dict[str, Tensor], ids: dict[str, int]) -> None:
    now = model.state_dict()
    assert sorted(now) == sorted(snap)
    for n, t in snap.items():
        assert now[n].shape == t.shape and torch.equal(now[n], t), n
    for n, p in model.named_parameters():
        assert id(p) == ids[n]


def test_layer_norm_partial_copy_refused() -> None:
    case = by_name("convnext_block")
    model, x = case.build(), case.example_inputs()
    snap, ids = _snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match=r"LayerNorm at `block\.norm`: uniform copies or mean-fill"
    ):
        widen(model, {"stem": 6}, "split", example_inputs=x)
    with pytest.raises(ValueError, match=r"LayerNorm at `block\.norm`.*null units"):
        widen(model, {"block.dwconv": 8}, "null", example_inputs=x)  # an alias of stem
    _unchanged(model, snap, ids)
    assert model.block.norm.normalized_shape == (4,)


def test_group_norm_and_grouped_conv_refusals() -> None:
    case = by_name("groupnorm")
    model, x = case.build(), case.example_inputs()
    snap, ids = _snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"GroupNorm at `gn1`: uniform copies"):
        widen(model, {"conv1": 12}, "split", example_inputs=x)
    _unchanged(model, snap, ids)
    case = by_name("resnext_grouped_conv")
    model, x = case.build(), case.example_inputs()
    snap, ids = _snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"grouped conv at `block\.conv2` \(groups=2\)"):
        widen(model, {"block.conv1": 5}, "split", example_inputs=x)
    _unchanged(model, snap, ids)


def test_group_norm_copies_stay_in_their_group() -> None:
    """8 channels in 2 groups → 16: the wide channel j of group q copies a channel of q."""
    case = by_name("groupnorm")
    model, x = case.build(), case.example_inputs()
    emb = widen(model, {"conv1": 16}, "split", example_inputs=x)
    assert isinstance(emb, GroupEmbedding)
    src = emb.maps["conv1"].source
    assert (src // 4).tolist() == (torch.arange(16) // 8).tolist()
    assert torch.bincount(src, minlength=8).tolist() == [2] * 8
    assert model.gn1.num_channels == 16 and model.gn1.num_groups == 2


def test_unknown_and_rigid_names() -> None:
    case = by_name("unknown_custom_op")
    model, x = case.build(), case.example_inputs()
    snap, ids = _snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"no width group named 'nope'.*'fc2'"):
        widen(model, {"nope": 9}, "split", example_inputs=x)
    with pytest.raises(ValueError, match=r"'fc1' cannot grow: .*roll_channels"):
        widen(model, {"fc1": 9}, "split", example_inputs=x)
    with pytest.raises(ValueError, match="cannot shrink"):
        widen(model, {"fc2": 2}, "split", example_inputs=x)
    with pytest.raises(ValueError, match="needs example_inputs"):
        widen(model, {"fc2": 6}, "split")
    with pytest.raises(ValueError, match="select for a traced model must be"):
        widen(model, {"fc2": 6}, torch_embed.Split(select=[[0], [1]]), example_inputs=x)
    _unchanged(model, snap, ids)


class _HardCoded(nn.Module):
    """A forward that writes a width as a number: the trace cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.fc2 = nn.Linear(6, 2)
        self.width = 6

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h[:, : self.width])


def test_output_check_rolls_back() -> None:
    """A width hard-coded in forward: the re-run differs, everything is undone."""
    torch.manual_seed(0)
    model = _HardCoded().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters())
    _loss(model, (x,)).backward()
    optimizer.step()
    snap, ids = _snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    state = {
        n: {k: v.clone() for k, v in optimizer.state[p].items()}
        for n, p in model.named_parameters()
    }
    with pytest.raises(ValueError, match="left unchanged"):
        widen(model, {"fc1": 9}, "split", example_inputs=x, optimizer=optimizer)
    _unchanged(model, snap, ids)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])  # type: ignore[arg-type]
        for k, v in state[n].items():
            assert torch.equal(optimizer.state[p][k], v)
    assert (model.fc1.out_features, model.fc2.in_features) == (6, 6)


@pytest.mark.parametrize(
    ("scheme", "widths"),
    [
        (torch_embed.Split(alpha="random"), [12, 7]),
        (torch_embed.Split(alpha=0.3, select="cyclic"), [8, 6]),
        (torch_embed.Split(alpha=(0.2, 0.3, 0.5)), [11, 8]),
        (torch_embed.Net2Net(), [12, 7]),
        (torch_embed.Null(), [9, 6]),
    ],
)
def test_sequential_mlp_plans_as_today(scheme: Scheme, widths: list[int]) -> None:
    """A Sequential MLP widened by group names gets today's map and today's tensors."""
    net = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)
    ).double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    today = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "hidden layer 1: null neurons", UserWarning)
        planned = widen(today, widths, scheme, generator=torch.Generator().manual_seed(5))
    wide = copy.deepcopy(net)
    emb = widen(
        wide,
        {"0": widths[0], "2": widths[1]},
        scheme,
        example_inputs=x,
        generator=torch.Generator().manual_seed(5),
    )
    assert isinstance(emb, GroupEmbedding)
    for name, lm in zip(("0", "2"), planned.layers):
        assert torch.equal(emb.maps[name].source, lm.source)
        assert torch.equal(emb.maps[name].coef, lm.coef)
    for (n, a), (m, b) in zip(wide.state_dict().items(), today.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    # a list of hidden widths with example_inputs: today's path and result type
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "hidden layer 1: null neurons", UserWarning)
        seq = widen(copy.deepcopy(net), widths, scheme, example_inputs=x)
    assert isinstance(seq, Embedding)
    with torch.no_grad():
        assert _rel(wide(x), net(x)) <= 1e-12


@pytest.mark.parametrize(("name", "group"), [("convnext_block", "stem"), ("groupnorm", "conv1")])
def test_norm_gradients_need_equal_shares(name: str, group: str) -> None:
    """Under LayerNorm/GroupNorm, uniform copies keep the output for any α, but the
    gradient maps only with equal shares 1/k: autograd shows both, and ``kind`` says so."""
    case = by_name(name)
    x = case.example_inputs()
    size = case.group(group).size
    errors = {}
    for scheme in (torch_embed.Net2Net(), torch_embed.Split(alpha=0.3)):
        model = case.build()
        with torch.no_grad():
            before = model(*x)
        _loss(model, x).backward()
        critical = isinstance(scheme, torch_embed.Net2Net)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            emb = widen(model, {group: 2 * size}, scheme, example_inputs=x)
        # the mapped .grad is said to be approximate exactly when it is
        assert bool(caught) == (not critical)
        assert isinstance(emb, GroupEmbedding)
        with torch.no_grad():
            assert _rel(model(*x), before) <= 1e-12
        mapped = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        _loss(model, x).backward()
        errors[type(scheme).__name__] = max(
            _rel(p.grad, mapped[n])
            for n, p in model.named_parameters()  # type: ignore[arg-type]
        )
        assert (emb.kind is EmbeddingKind.CRITICAL) == critical
        if not critical:
            assert "unequal coefficients" in emb.reasons[0]
    assert errors["Net2Net"] <= 1e-12
    assert errors["Split"] > 1e-3


class _Twice(nn.Module):
    """One Linear called twice: its rows and columns are the same group ("tied")."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.mid = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.mid(h))
        return self.out(torch.tanh(self.mid(h)))


def test_module_called_twice_and_inference_mode() -> None:
    torch.manual_seed(0)
    model = _Twice().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    before = model(x).detach()
    with torch.inference_mode():  # the new tensors are made outside it
        emb = widen(model, {"mid": 8}, torch_embed.Split(alpha=-0.4), example_inputs=x)
    assert isinstance(emb, GroupEmbedding) and emb.sizes == {"a": (5, 8)}
    assert model.mid.weight.shape == (8, 8) and not model.mid.weight.is_inference()
    assert _rel(model(x).detach(), before) <= 1e-12


def test_sequential_subclass_with_forward_is_traced() -> None:
    """A Sequential subclass that overrides forward is a custom model: the list form
    (hidden widths by position) is refused, group names work and are exact."""
    case = by_name("sequential_subclass_residual")
    model, x = case.build(), case.example_inputs()
    with torch.no_grad():
        before = model(*x)
    with pytest.raises(TypeError, match=r"plain nn.Sequential MLPs.*\['0'\]"):
        widen(model, [9], example_inputs=x)
    emb = widen(model, {"0": 9}, example_inputs=x)
    assert isinstance(emb, GroupEmbedding)
    with torch.no_grad():
        assert _rel(model(*x), before) <= 1e-12


class _Reduce(nn.Module):
    """A reduction over the hidden features: a sum (only null units keep it) or a max
    (only copies keep it)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        r = h.sum(-1, keepdim=True) if self.op == "sum" else h.amax(-1, keepdim=True)
        return self.out(h) + r


@pytest.mark.parametrize(
    ("op", "allowed", "refused"), [("sum", "null", "split"), ("max", "split", "null")]
)
def test_reductions_over_a_group(op: str, allowed: str, refused: str) -> None:
    torch.manual_seed(0)
    model = _Reduce(op).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    snap, ids = _snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"aten\.a?{op}.* over width group 'a'"):
        widen(model, {"a": 8}, refused, example_inputs=x)
    _unchanged(model, snap, ids)
    before = model(x).detach()
    emb = widen(model, {"a": 8}, allowed, example_inputs=x)
    assert _rel(model(x).detach(), before) <= 1e-12
    if op == "max":  # the max's gradient goes to one of the equal copies
        assert emb.kind is EmbeddingKind.OUTPUT_PRESERVING and "max" in emb.reasons[0]


class _SigmoidMLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.sigmoid(self.a(x)))


def test_null_units_with_nonzero_value_map_through_the_reader_bias() -> None:
    """σ(0) = 1/2: null units keep the output, and their fan-out columns get the gradient
    σ(β)·∂R/∂b of the reader's bias, as for MLPs: widen measures the value they feed
    the reader and maps ``.grad`` and the optimizer state with it (autograd and an Adam
    replay agree). Without a reader bias the map's 0 is wrong, and widen says so."""
    torch.manual_seed(0)
    model = _SigmoidMLP().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _loss(model, (x,)).backward()
    opt.step()  # Adam state to map
    opt.zero_grad()
    _loss(model, (x,)).backward()  # the gradient at the point that is widened
    before = model(x).detach()
    emb = widen(model, {"a": 6}, torch_embed.Null(bias=0.5), example_inputs=x, optimizer=opt)
    assert emb.kind is EmbeddingKind.CRITICAL, emb.reasons
    assert _rel(model(x).detach(), before) <= 1e-12
    mapped = model.out.weight.grad.clone()  # type: ignore[union-attr]
    state = {k: v.clone() for k, v in opt.state[model.out.weight].items() if k != "step"}
    bias_state = opt.state[model.out.bias]
    sigma = torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))
    for k, v in state.items():  # the brute-force value: σ(β)·(bias state), σ(β)² for squares
        factor = sigma**2 if k == "exp_avg_sq" else sigma
        expected = factor * bias_state[k][:, None].expand(-1, 2)
        assert float((v[:, 4:] - expected).abs().max()) <= 1e-15, k
    model.zero_grad(set_to_none=True)
    _loss(model, (x,)).backward()
    true = model.out.weight.grad
    assert true is not None
    assert float((true - mapped).abs().max()) <= 1e-12 * float(true.abs().max())
    # a reader without a bias: nothing carries the gradient, widen measures and warns
    nobias = _SigmoidMLP(bias=False).double()
    _loss(nobias, (x,)).backward()
    with pytest.warns(torch_embed.ApproximateStateWarning, match="hold 0.5, not 0"):
        emb = widen(nobias, {"a": 6}, "null", example_inputs=x)
    assert emb.kind is EmbeddingKind.OUTPUT_PRESERVING
    assert "`out.weight`" in emb.reasons[0]


def test_null_columns_refuse_a_bias_under_other_optimizer_rules() -> None:
    """As for MLPs: the null columns' state comes from the reader's bias, which is exact
    only when both follow the same recursion; other betas are refused, model untouched."""
    torch.manual_seed(0)
    model = _SigmoidMLP().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    rest = [p for n, p in model.named_parameters() if n != "out.bias"]
    opt = torch.optim.Adam([{"params": rest}, {"params": [model.out.bias], "betas": (0.5, 0.9)}])
    _loss(model, (x,)).backward()
    opt.step()
    snap = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"null neurons of the layer `out` reads take their"):
        widen(model, {"a": 6}, torch_embed.Null(bias=0.5), example_inputs=x, optimizer=opt)
    for n, t in model.state_dict().items():
        assert torch.equal(t, snap[n]), n
    assert model.a.out_features == 4 and model.out.weight.grad.shape == (2, 4)  # type: ignore[union-attr]


class _Tied(nn.Module):
    """Two Linear layers sharing one weight (two FQNs, one Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.m1 = nn.Linear(5, 5)
        self.m2 = nn.Linear(5, 5)
        self.m2.weight = self.m1.weight
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.m1(torch.tanh(self.a(x))))
        return self.out(torch.tanh(self.m2(h)))


def test_tied_weight_is_mapped_once() -> None:
    torch.manual_seed(0)
    model = _Tied().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _loss(model, (x,)).backward()
    optimizer.step()
    momentum = optimizer.state[model.m1.weight]["momentum_buffer"].clone()
    before = model(x).detach()
    emb = widen(model, {"m1": 8}, torch_embed.Net2Net(), example_inputs=x, optimizer=optimizer)
    assert isinstance(emb, GroupEmbedding)
    assert model.m2.weight is model.m1.weight and model.m1.weight.shape == (8, 8)
    assert (model.m1.in_features, model.m1.out_features) == (8, 8)
    assert (model.m2.in_features, model.m2.out_features) == (8, 8)
    assert _rel(model(x).detach(), before) <= 1e-12
    (name,) = [n for n in emb.tensors if n.endswith(".weight") and n[:2] in ("m1", "m2")]
    want = emb.map_gradients({name: momentum})[name]
    assert torch.equal(optimizer.state[model.m1.weight]["momentum_buffer"], want)


def test_refusals_leave_the_model_untouched() -> None:
    """A module of unknown class owning a widened tensor, a parametrized weight and a
    DataParallel wrapper: refused with what to do, nothing changed."""
    case = by_name("convnext_block")
    model, x = case.build(), case.example_inputs()
    model.block.dim = 4  # a user's module keeping its width in an attribute
    snap, ids = _snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"'block' \(ConvNeXtBlock\).*'dim=4'.*register_handler"):
        widen(model, {"stem": 8}, "net2net", example_inputs=x)
    _unchanged(model, snap, ids)
    model = by_name("mlp_custom_forward").build()
    x = by_name("mlp_custom_forward").example_inputs()
    torch.nn.utils.parametrizations.weight_norm(model.fc2)
    with pytest.raises(ValueError, match="parametrized"):
        widen(model, {"fc1": 7}, example_inputs=x)
    with pytest.raises(TypeError, match="wrapper"):
        widen(nn.DataParallel(by_name("mlp_custom_forward").build()), {"fc1": 7}, example_inputs=x)


def test_default_scheme_noise_breaks_symmetry_and_keeps_output() -> None:
    """The default (Net2Net with noise) on a conv → flatten → Linear head: the copies'
    columns differ, the output is kept, and apply is repeatable."""
    case = by_name("conv_flatten_linear")
    model, x = case.build(), case.example_inputs()
    narrow = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        before = model(*x)
    emb = widen(model, {"2": 6}, example_inputs=x, generator=torch.Generator().manual_seed(0))
    assert isinstance(emb, GroupEmbedding) and emb.kind is EmbeddingKind.OUTPUT_PRESERVING
    with torch.no_grad():
        assert _rel(model(*x), before) <= 1e-12
    src = emb.maps["2"].source.tolist()
    s = next(u for u in src if src.count(u) == 2)
    j, k = [i for i, u in enumerate(src) if u == s]
    w = model.get_submodule("5").weight.detach().view(5, 6, 4)  # (out, channel, H·W)
    w0 = narrow["5.weight"].view(5, 4, 4)
    assert float((w[:, j] - w[:, k]).abs().min()) > 0  # every entry of the pair differs
    assert float((w[:, j] + w[:, k] - w0[:, s]).abs().max()) <= 1e-13 * float(w0.abs().max())
    again = emb.apply(narrow)
    for n, t in model.state_dict().items():
        assert torch.equal(again[n], t), n


class _RMSNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))  # type: ignore[no-any-return]


def test_a_norm_refusal_names_its_own_fill() -> None:
    """Split to a non-multiple under an RMSNorm: the message names zero-fill, RMSNorm's
    rule (it said "mean-fill", LayerNorm's, for every norm), and the model is unchanged;
    Null then grows it at that width."""
    torch.manual_seed(0)
    model = _RMSNormed().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    before = model(x).detach()
    with pytest.raises(ValueError, match=r"RMSNorm at `norm`: uniform copies or zero-fill \("):
        torch_embed.widen(model, {"fc1": 9}, "split", example_inputs=x)
    assert model.fc1.out_features == 6
    torch_embed.widen(model, {"fc1": 9}, torch_embed.Null(), example_inputs=x)
    assert model.fc1.out_features == 9
    assert float((model(x).detach() - before).abs().max()) <= 1e-12 * float(before.abs().max())
