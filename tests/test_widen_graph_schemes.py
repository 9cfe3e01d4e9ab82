"""Every scheme on the traced path, planned by the MLP path's one planner (issue 12).

``schemes.plan_units`` plans the units of an MLP's hidden layers and of a traced model's
width groups. Checked here against brute force: the narrow model's forward pass (the
wide model must give the same output, float64, <= 1e-12 relative), autograd on the wide
model for the critical schemes (its gradient must equal the mapped narrow gradient), and
the Sequential MLP path (a Sequential widened by group names must give bit-identical
tensors for every scheme whose tensors draw no random numbers).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from zoo import ConvNeXtBlock, by_name

import torch_embed
from torch_embed.embedding import Embedding, EmbeddingKind
from torch_embed.graph import handlers
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.graph.groups import WidthGroup, width_groups
from torch_embed.graph.plan import group_rules
from torch_embed.schemes import Scheme
from torch_embed.widen import widen

CASES = [
    "mlp_custom_forward",
    "mlp_residual",
    "mlp_batchnorm",
    "conv2d_bn",
    "conv_flatten_linear",
    "resnet_basic",
    "densenet_block",
    "mobilenetv2_inverted_residual",
    "resnext_grouped_conv",
    "squeeze_excitation",
    "groupnorm",
    "convnext_block",
]
RULE = re.compile(
    r"(LayerNorm at `[\w.]+`: uniform copies or mean-fill|RMSNorm at `[\w.]+`: uniform copies "
    r"or zero-fill|GroupNorm at `[\w.]+`: uniform copies \()|grouped conv at "
    r"`[\w.]+` \(groups=\d+\): every group must grow by the same amount"
)


@pytest.fixture(autouse=True)
def _layer_scale_handler() -> Iterator[None]:
    """The zoo's ConvNeXt block owns its layer scale ``gamma``: its shape is its size."""
    before = dict(handlers._HANDLERS)
    handlers.register_handler(ConvNeXtBlock, handlers.no_attributes)
    yield
    handlers._HANDLERS.clear()
    handlers._HANDLERS.update(before)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _loss(model: nn.Module, x: tuple[Tensor, ...]) -> Tensor:
    out = model(*x)
    r = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * r).sum() + 0.5 * (out**2).sum()


def _general(group: WidthGroup, g: torch.Generator) -> torch_embed.General:
    """A random General map of ``group`` that its rules allow, in a shuffled order:
    random copies (or null units), random coefficients summing to 1 per narrow unit."""
    rules = group_rules(group)
    n, parts = group.size, rules.segments
    seg = n // parts
    src: list[int] = []
    for q in range(parts):
        units = list(range(q * seg, (q + 1) * seg))
        if rules.uniform:
            extra = units  # every unit once more
        else:
            extra = []
            for _ in range(2):
                pick = units[int(torch.randint(0, seg, (1,), generator=g))]
                null = rules.no_copies or (
                    not rules.no_null and bool(torch.rand(1, generator=g) < 0.3)
                )
                extra.append(-1 if null else pick)
        part = units + extra
        order = torch.randperm(len(part), generator=g).tolist()
        src.extend(part[i] for i in order)
    coef = [0.0] * len(src)
    for s in range(n):
        copies = [j for j, t in enumerate(src) if t == s]
        shares = (torch.rand(len(copies), generator=g, dtype=torch.float64) + 0.5).tolist()
        total = sum(shares)
        for j, a in zip(copies[:-1], shares[:-1]):
            coef[j] = a / total
        coef[copies[-1]] = 1.0 - sum(coef[j] for j in copies[:-1])
    return torch_embed.General(sources={group.name: src}, coefficients={group.name: coef})


def _schemes(group: WidthGroup, g: torch.Generator) -> list[Scheme]:
    parts = group_rules(group).segments
    seg = group.size // parts
    return [
        torch_embed.Split(alpha="random", select="norm"),
        torch_embed.Net2Net(select="norm"),
        torch_embed.Null(fan_in_std=0.5),
        _general(group, g),
        torch_embed.Split(alpha=0.3, select=[q * seg for q in range(parts)]),
    ]


def _width(group: WidthGroup, scheme: Scheme) -> int | None:
    """The width each test scheme asks for (None: the General map gives it)."""
    if isinstance(scheme, torch_embed.General):
        return None
    rules = group_rules(group)
    if rules.uniform:
        return 2 * group.size  # every unit copied once
    if isinstance(scheme, torch_embed.Split) and not isinstance(scheme.select, str):
        return group.size + rules.segments  # one copy of each segment's first unit
    return group.size + 2 * rules.segments


@pytest.mark.filterwarnings("ignore:width group .* null units with zero fan-in:UserWarning")
@pytest.mark.parametrize("name", CASES)
def test_new_schemes_keep_output_and_map_gradients(name: str) -> None:
    """General, Null(fan_in_std), select='norm' and explicit indices on every growable
    group: the output is kept; for the critical embeddings the wide gradient (autograd)
    is the mapped narrow one. A width or scheme the group's rules forbid names its rule."""
    case = by_name(name)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = case.example_inputs()
    checked = 0
    for expected in (e for e in case.expected if e.growable):
        group = width_groups(case.build(), x).find(expected.name)
        for scheme in _schemes(group, g):
            model = case.build()
            _loss(model, x).backward()
            narrow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            with torch.no_grad():
                before = model(*x)
            width = _width(group, scheme)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch_embed.ApproximateStateWarning)
                    emb = widen(
                        model,
                        None if width is None else {group.name: width},
                        scheme,
                        example_inputs=x,
                        generator=g,
                    )
            except ValueError as error:  # a rule forbids it: the message names it
                uniform = bool(group_rules(group).uniform)
                assert RULE.search(str(error)), (group.name, scheme, str(error))
                assert uniform and (isinstance(scheme, torch_embed.Null) or "select" in str(error))
                continue
            assert isinstance(emb, GroupEmbedding)
            with torch.no_grad():
                assert _rel(model(*x), before) <= 1e-12, (group.name, scheme)
            assert emb.sizes[group.name][1] > group.size
            checked += 1
            if emb.kind is not EmbeddingKind.CRITICAL:
                assert isinstance(scheme, torch_embed.Null) or any(
                    "unequal coefficients" in r for r in emb.reasons
                ), emb.reasons
                continue
            mapped = {n: p.grad for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            _loss(model, x).backward()
            for n, p in model.named_parameters():
                assert p.grad is not None and mapped[n] is not None
                scale = max(float(narrow[n].abs().max()), 1e-3)
                err = float((p.grad - mapped[n]).abs().max())
                assert err <= 1e-11 * scale, (group.name, scheme, n, err)
    assert checked


def test_random_pad_changes_output_and_kind_says_so() -> None:
    """RandomPad on traced models: random new units, kind ``none``, widen does not roll back."""
    for name in ("resnet_basic", "conv_flatten_linear", "mlp_custom_forward"):
        case = by_name(name)
        model, x = case.build(), case.example_inputs()
        with torch.no_grad():
            before = model(*x)
        group = next(e for e in case.expected if e.growable)
        emb = widen(
            model,
            {group.name: group.size + 3},
            torch_embed.RandomPad(),
            example_inputs=x,
            generator=torch.Generator().manual_seed(0),
        )
        assert emb.kind is EmbeddingKind.NONE
        with torch.no_grad():
            assert _rel(model(*x), before) > 1e-6
        wide = width_groups(model, x).find(group.name)
        assert wide.size == group.size + 3


class _BiasMLP(nn.Module):
    """A custom-forward MLP with a bias-free hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.act = nn.ReLU()
        self.b = nn.Linear(5, 4, bias=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.b(self.act(self.a(x)))))


def test_null_bias_is_stored_once_or_refused() -> None:
    """Null(bias=β): β goes into the group's one bias (a BatchNorm's when there is one);
    a group without one, or with several (a residual stream), is refused untouched."""
    torch.manual_seed(0)
    model = _BiasMLP().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    widen(model, {"a": 8}, torch_embed.Null(bias=0.5), example_inputs=x)
    assert model.a.bias[5:].tolist() == [0.5] * 3
    assert bool((model.a.weight[5:] == 0).all()) and bool((model.b.weight[:, 5:] == 0).all())
    with torch.no_grad():
        assert _rel(model(x), before) <= 1e-12
    with pytest.raises(ValueError, match=r"width group 'b': null units with a bias .* none"):
        widen(model, {"b": 6}, torch_embed.Null(bias=0.5), example_inputs=x)
    case = by_name("conv2d_bn")
    bn_model, cx = case.build(), case.example_inputs()
    group = next(e for e in case.expected if e.growable)
    with torch.no_grad():
        before = bn_model(*cx)
    widen(bn_model, {group.name: group.size + 2}, torch_embed.Null(bias=0.5), example_inputs=cx)
    bns = [m for m in bn_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(m.bias[-2:].tolist() == [0.5, 0.5] for m in bns)
    with torch.no_grad():
        assert _rel(bn_model(*cx), before) <= 1e-12
    res = by_name("resnet_basic")
    res_model, rx = res.build(), res.example_inputs()
    state = copy.deepcopy(res_model.state_dict())
    with pytest.raises(ValueError, match=r"width group 'conv1': null units with a bias"):
        widen(res_model, {"conv1": 6}, torch_embed.Null(bias=0.5), example_inputs=rx)
    for k, v in res_model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_rules_refuse_general_and_explicit_indices() -> None:
    """A General map or explicit indices that break a group's rule: ValueError naming the
    norm or conv and the rule, and the model untouched."""
    ln = by_name("convnext_block")
    model, x = ln.build(), ln.example_inputs()
    state = copy.deepcopy(model.state_dict())
    size = ln.group("stem").size
    partial = [*range(size), 0]
    with pytest.raises(ValueError, match=r"LayerNorm at `[\w.]+`: uniform copies"):
        widen(model, None, torch_embed.General(sources={"stem": partial}), example_inputs=x)
    rx = by_name("resnext_grouped_conv")
    rmodel, rxx = rx.build(), rx.example_inputs()
    grouped = next(e for e in rx.expected if e.growable and "grouped" in e.note.lower())
    gr = width_groups(rmodel, rxx).find(grouped.name)
    parts = group_rules(gr).segments
    assert parts > 1
    with pytest.raises(ValueError, match=r"grouped conv at `[\w.]+` \(groups=\d+\): every group"):
        widen(
            rmodel,
            {gr.name: gr.size + parts},
            torch_embed.Split(select=[0] * parts),
            example_inputs=rxx,
        )
    crossing = list(range(gr.size)) + [gr.size - 1] * parts  # copies outside their group
    with pytest.raises(ValueError, match=r"grouped conv at .*own group"):
        widen(rmodel, None, torch_embed.General(sources={gr.name: crossing}), example_inputs=rxx)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_shares_are_checked_on_the_traced_path() -> None:
    """The MLP path's share checks: coefficients summing to 1, amplification limit."""
    case = by_name("mlp_custom_forward")
    model, x = case.build(), case.example_inputs()
    group = next(e for e in case.expected if e.growable)
    n = group.size
    with pytest.raises(ValueError, match="magnitudes summing to 2e\\+30"):
        widen(model, {group.name: n + 1}, torch_embed.Split(alpha=1e30), example_inputs=x)
    bad = torch_embed.General(
        sources={group.name: [*range(n), 0]}, coefficients={group.name: [0.5] + [1.0] * n}
    )
    with pytest.raises(ValueError, match=r"narrow neuron 0 sum to 1.5; they must sum to 1"):
        widen(model, None, bad, example_inputs=x)
    matrix = torch_embed.General(
        sources={group.name: [*range(n), 0]}, coefficients={group.name: torch.ones(2, n + 1)}
    )
    # a matrix (one coefficient per connection, tests/test_general_matrix_graph.py):
    # one row per output row of the one Linear reading the group (fc2: 6)
    with pytest.raises(ValueError, match=r"must have shape \(wide_next, wide\) = \(6, 6\)"):
        widen(model, None, matrix, example_inputs=x)


def test_dead_null_units_warn_on_the_traced_path() -> None:
    """As for MLPs: zero fan-in and β <= 0 under ReLU never learn; widen says so."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"width group 'a': null units .* never learn"):
        widen(_BiasMLP().double(), {"a": 7}, torch_embed.Null(), example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        widen(_BiasMLP().double(), {"a": 7}, torch_embed.Null(bias=0.1), example_inputs=x)
        widen(_BiasMLP().double(), {"a": 7}, torch_embed.Null(fan_in_std=0.1), example_inputs=x)


_NET = [(3, 5), (5, 4), (4, 2)]


def _sequential() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)
    ).double()


@pytest.mark.parametrize(
    ("mlp", "traced", "same_tensors"),
    [
        (torch_embed.Split(alpha=0.3, select="norm"), None, True),
        (torch_embed.Net2Net(select="norm"), None, True),
        (
            torch_embed.Split(select=[[1, 1], [0]]),
            torch_embed.Split(select={"0": [1, 1], "2": [0]}),
            True,
        ),
        (torch_embed.Null(bias=0.25), None, True),
        (
            torch_embed.General(sources=[[0, 1, 2, 3, 4, 2, -1], [3, 2, 1, 0, 0]], null_bias=0.5),
            torch_embed.General(
                sources={"0": [0, 1, 2, 3, 4, 2, -1], "2": [3, 2, 1, 0, 0]}, null_bias=0.5
            ),
            True,
        ),
        (torch_embed.Null(fan_in_std=0.5), None, False),
        (torch_embed.RandomPad(), None, False),
        # Net2Net's noise: one implementation (graph.gather), one seed per embedding
        # drawn after the units, so the same bits on both paths
        (torch_embed.Net2Net(noise=4.0), None, True),
        (torch_embed.Net2Net(noise=0.5, select="cyclic"), None, True),
    ],
)
def test_sequential_plans_as_today_for_every_scheme(
    mlp: Scheme, traced: Scheme | None, same_tensors: bool
) -> None:
    """A Sequential MLP widened by group names gets the MLP path's map of units (and,
    where no random numbers are drawn for the tensors, bit-identical tensors)."""
    net = _sequential()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    today = copy.deepcopy(net)
    planned = widen(today, [7, 5], mlp, generator=torch.Generator().manual_seed(5))
    assert isinstance(planned, Embedding)
    wide = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_embed.ApproximateStateWarning)
        emb = widen(
            wide,
            {"0": 7, "2": 5},
            traced if traced is not None else mlp,
            example_inputs=x,
            generator=torch.Generator().manual_seed(5),
        )
    assert isinstance(emb, GroupEmbedding)
    for name, lm in zip(("0", "2"), planned.layers):
        assert torch.equal(emb.maps[name].source, lm.source)
        assert torch.equal(emb.maps[name].coef, lm.coef)
        if same_tensors:
            assert torch.equal(emb.maps[name].null_bias, lm.null_bias)
    for (n, a), (m, b) in zip(wide.state_dict().items(), today.state_dict().items()):
        assert n == m and a.shape == b.shape, n
        if same_tensors:
            assert torch.equal(a, b), n
    assert (emb.kind is EmbeddingKind.NONE) == (planned.kind is EmbeddingKind.NONE)


@pytest.mark.parametrize("scheme", [torch_embed.Split(alpha=1 / 3), torch_embed.Net2Net()])
def test_float32_tensors_are_rounded_as_on_the_mlp_path(scheme: Scheme) -> None:
    """Coefficients such as 1/3 are not float32 numbers: both paths multiply in float64
    and round once (graph.gather._put), so a float32 Sequential widened by group names gets
    the MLP path's bits, and those are the float64 products rounded once."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    today, wide = copy.deepcopy(net), copy.deepcopy(net)
    emb = widen(today, [12, 11], scheme, generator=torch.Generator().manual_seed(5))
    assert isinstance(emb, Embedding)
    widen(
        wide,
        {"0": 12, "2": 11},
        scheme,
        example_inputs=x,
        generator=torch.Generator().manual_seed(5),
    )
    for (n, a), b in zip(wide.state_dict().items(), today.state_dict().values()):
        assert torch.equal(a, b), n
    rows, cols = emb.layers[1].source, emb.layers[0]
    reference = (net[2].weight.detach().double()[rows][:, cols.source] * cols.coef).float()
    assert torch.equal(wide[2].weight.detach(), reference)


def test_float32_net2net_noise_is_the_same_on_both_paths() -> None:
    """The default scheme's noise comes from one implementation: a float32 Sequential
    widened as an MLP and by group names gets the same bits, the noise included (shares
    such as 1/3 are not float32 numbers, so the noise scales rounded columns)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    today, wide, plain = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    emb = widen(today, [12, 11], generator=torch.Generator().manual_seed(5))
    assert isinstance(emb, Embedding) and emb.noise == 4.0
    traced = widen(wide, {"0": 12, "2": 11}, example_inputs=x, generator=_g5())
    assert isinstance(traced, GroupEmbedding) and traced.noise == 4.0
    for (n, a), b in zip(wide.state_dict().items(), today.state_dict().values()):
        assert torch.equal(a, b), n
    widen(plain, [12, 11], torch_embed.Net2Net(), generator=_g5())
    assert not torch.equal(plain[2].weight, today[2].weight)  # the noise is there


def _g5() -> torch.Generator:
    return torch.Generator().manual_seed(5)
