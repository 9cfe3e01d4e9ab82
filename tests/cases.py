"""Shared case tables for the test suite: activations, architectures, schemes.

Everything here is deterministic (seeded ``torch.Generator``s) and usable both from
plain ``pytest.mark.parametrize`` tables and from hypothesis strategies.

* :data:`ACTIVATIONS`: every element-wise module type torch_embed accepts, with the
  parameters a user might set (``LeakyReLU(0.1)``, ``Softplus(beta=2)``, ...), and
  whether it is continuous (the floating-point error bound needs a Lipschitz constant).
* :class:`Arch` and :func:`build_mlp`: an MLP description (depth, widths, bias, BatchNorm,
  Dropout, activations) and the ``nn.Sequential`` it builds, in eval mode, with random
  weights *and* random BatchNorm statistics and affine parameters.
* :func:`archs`: a hypothesis strategy of :class:`Arch`.
* :data:`SCHEME_NAMES`, :func:`scheme_cases`: planning recipes covering every scheme and
  option (Split with α inside and outside [0, 1], k-way and random α and every select;
  Null with a bias and with a random fan-in; Net2Net with and without noise; General
  with vector and matrix coefficients; compositions), each with the kind it must have.
* :func:`critical_matrix_general`: a matrix-form General embedding that satisfies the
  backward condition (so it is critical) although its coefficients differ per row.
* :func:`randn_mlp`, :func:`randn_data` and the brute-force references
  :func:`flat_loss`, :func:`brute_hessian`, :func:`brute_gradient`, :func:`counts`:
  small float64 networks with ``N(0, 1)`` weights and dense autograd Hessians, for the
  tests of the curvature code (blocks, inertia change, report).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from torch_embed.embedding import Embedding, EmbeddingKind
from torch_embed.schemes import General, Net2Net, Null, RandomPad, Split, plan


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activation:
    """An accepted element-wise module, how to build it, and what the bound can say."""

    name: str
    make: Callable[[], nn.Module]
    continuous: bool = True  # False: no Lipschitz constant, forward_error_bound refuses it


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("Identity", nn.Identity),
        Activation("Tanh", nn.Tanh),
        Activation("Sigmoid", nn.Sigmoid),
        Activation("ReLU", nn.ReLU),
        Activation("ReLU6", nn.ReLU6),
        Activation("LeakyReLU", lambda: nn.LeakyReLU(0.1)),
        Activation("PReLU", lambda: nn.PReLU(num_parameters=1, init=0.3)),
        Activation("GELU", nn.GELU),
        Activation("GELU_tanh", lambda: nn.GELU(approximate="tanh")),
        Activation("SiLU", nn.SiLU),
        Activation("Mish", nn.Mish),
        Activation("Softplus", lambda: nn.Softplus(beta=2.0)),
        Activation("ELU", lambda: nn.ELU(alpha=1.3)),
        Activation("CELU", lambda: nn.CELU(alpha=0.7)),
        Activation("SELU", nn.SELU),
        Activation("Hardtanh", lambda: nn.Hardtanh(-1.5, 2.0)),
        Activation("Softsign", nn.Softsign),
        Activation("Tanhshrink", nn.Tanhshrink),
        Activation("LogSigmoid", nn.LogSigmoid),
        Activation("Hardswish", nn.Hardswish),
        Activation("Hardsigmoid", nn.Hardsigmoid),
        Activation("Softshrink", lambda: nn.Softshrink(0.3)),
        Activation("Hardshrink", lambda: nn.Hardshrink(0.3), continuous=False),
    ]
}
ACTIVATION_NAMES: tuple[str, ...] = tuple(ACTIVATIONS)
CONTINUOUS_ACTIVATIONS: tuple[str, ...] = tuple(n for n, a in ACTIVATIONS.items() if a.continuous)

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, *LOW_PRECISION)


# ----------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """An MLP: ``Linear -> [BatchNorm1d] -> activation -> [Dropout] -> ... -> Linear``.

    ``hidden`` has one width per hidden layer; ``bias`` one flag per Linear (hidden
    layers + output); ``batchnorm``, ``activation`` and ``dropout`` one entry per hidden
    layer.
    """

    in_features: int
    hidden: tuple[int, ...]
    out_features: int
    bias: tuple[bool, ...] = ()
    batchnorm: tuple[bool, ...] = ()
    activation: tuple[str, ...] = ()
    dropout: tuple[bool, ...] = ()
    weight_scale: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.hidden)
        defaults = {
            "bias": (True,) * (n + 1),
            "batchnorm": (False,) * n,
            "activation": ("Tanh",) * n,
            "dropout": (False,) * n,
        }
        for name, default in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, default)
        assert len(self.bias) == n + 1 and len(self.batchnorm) == n
        assert len(self.activation) == n and len(self.dropout) == n

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.in_features, *self.hidden, self.out_features)

    def can_store_bias(self, layer: int) -> bool:
        """Whether hidden layer ``layer`` has a place for a null neuron's bias."""
        return self.bias[layer] or self.batchnorm[layer]


def build_mlp(arch: Arch, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Build ``arch`` with seeded random weights and BatchNorm statistics, in eval mode.

    Weights are ``U(-1, 1) · weight_scale / sqrt(fan_in)`` (like ``nn.Linear``'s default,
    but from a seeded generator); BatchNorm gets running means in ``[-1, 1]``, variances
    in ``[0.5, 2]``, weights ``±[0.5, 1.5]`` and biases in ``[-0.5, 0.5]`` so that copying
    the statistics of the right neuron matters.
    """
    g = torch.Generator().manual_seed(seed)

    def u(*shape: int) -> torch.Tensor:
        return 2 * torch.rand(*shape, generator=g, dtype=torch.float64) - 1

    layers: list[nn.Module] = []
    widths = arch.widths
    for k in range(len(widths) - 1):
        lin = nn.Linear(widths[k], widths[k + 1], bias=arch.bias[k], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(u(widths[k + 1], widths[k]) * arch.weight_scale / math.sqrt(widths[k]))
            if lin.bias is not None:
                lin.bias.copy_(u(widths[k + 1]) * arch.weight_scale / math.sqrt(widths[k]))
        layers.append(lin)
        if k == len(widths) - 2:
            break
        if arch.batchnorm[k]:
            bn = nn.BatchNorm1d(widths[k + 1], dtype=torch.float64)
            with torch.no_grad():
                m = widths[k + 1]
                bn.running_mean.copy_(u(m))  # type: ignore[union-attr]
                bn.running_var.copy_(1.25 + 0.75 * u(m))  # type: ignore[union-attr]
                sign = torch.where(u(m) >= 0, 1.0, -1.0).to(torch.float64)
                bn.weight.copy_(sign * (1.0 + 0.5 * u(m)))
                bn.bias.copy_(0.5 * u(m))
            layers.append(bn)
        layers.append(ACTIVATIONS[arch.activation[k]].make().to(torch.float64))
        if arch.dropout[k]:
            layers.append(nn.Dropout(0.3))
    net = nn.Sequential(*layers).eval()
    return net.to(dtype)


def random_inputs(
    arch: Arch | int, n: int = 16, *, seed: int = 1, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``n`` standard normal inputs for ``arch`` (or for ``arch`` input features)."""
    d = arch if isinstance(arch, int) else arch.in_features
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def archs(
    draw: st.DrawFn,
    *,
    max_depth: int = 3,
    max_width: int = 6,
    activations: Sequence[str] = ACTIVATION_NAMES,
    batchnorm: bool = True,
    dropout: bool = True,
) -> Arch:
    """Hypothesis strategy: 1..max_depth hidden layers, widths 1..max_width, any mix."""
    depth = draw(st.integers(1, max_depth))
    hidden = tuple(draw(st.integers(1, max_width)) for _ in range(depth))
    return Arch(
        in_features=draw(st.integers(1, 4)),
        hidden=hidden,
        out_features=draw(st.integers(1, 3)),
        bias=tuple(draw(st.booleans()) for _ in range(depth + 1)),
        batchnorm=tuple(batchnorm and draw(st.booleans()) for _ in range(depth)),
        activation=tuple(draw(st.sampled_from(list(activations))) for _ in range(depth)),
        dropout=tuple(dropout and draw(st.booleans()) for _ in range(depth)),
    )


# ----------------------------------------------------------------------------- schemes
Planner = Callable[[nn.Module, torch.Generator], Embedding]


@dataclass(frozen=True)
class SchemeCase:
    """A way to plan an embedding of a network, and the kind the result must have."""

    name: str
    plan: Planner = field(repr=False)
    kind: EmbeddingKind
    description: str = ""


SCHEME_NAMES = (
    "split_half",
    "split_alpha",
    "split_random_alpha",
    "split_kway",
    "null",
    "null_fan_in",
    "net2net",
    "net2net_noise",
    "general_vector",
    "general_matrix",
    "composition",
)
"""Every function-preserving scheme family :func:`scheme_cases` can draw (RandomPad aside)."""

SELECTS = ("random", "cyclic", "norm", "explicit", "mapping")


def _hidden_widths(net: nn.Module) -> list[int]:
    from torch_embed._sequential import read_sequential

    return list(read_sequential(net).hidden_widths)


def _storable(net: nn.Module) -> list[bool]:
    from torch_embed._sequential import read_sequential

    layout = read_sequential(net)
    out = []
    for k, hidden in enumerate(layout.hidden):
        if hidden.batchnorm is not None:
            out.append(net.get_submodule(hidden.batchnorm).bias is not None)
        else:
            out.append(layout.linears[k].has_bias)
    return out


def _select(kind: str, widths: Sequence[int], counts: Sequence[int], g: torch.Generator) -> object:
    """A ``select`` argument of the given kind for ``counts[l]`` picks in layer ``l``."""
    if kind in ("random", "cyclic", "norm"):
        return kind
    picks = [torch.randint(0, m, (c,), generator=g).tolist() for m, c in zip(widths, counts)]
    if kind == "explicit":
        return picks
    return {l: p for l, p in enumerate(picks) if p}


@st.composite
def scheme_cases(
    draw: st.DrawFn,
    arch: Arch,
    *,
    names: Sequence[str] = SCHEME_NAMES,
    max_extra: int = 4,
) -> tuple[SchemeCase, str]:
    """Hypothesis strategy: a :class:`SchemeCase` for networks of ``arch``, and its label.

    The case's planner draws the remaining randomness (which neurons, random α, noise)
    from the generator it is given, so a case is reproducible from a seed.
    """
    name = draw(st.sampled_from(list(names)))
    hidden = list(arch.hidden)
    n = len(hidden)
    extra = [draw(st.integers(0, max_extra)) for _ in range(n)]
    if sum(extra) == 0:
        extra[draw(st.integers(0, n - 1))] = 1
    sel = draw(st.sampled_from(SELECTS))
    storable = [arch.can_store_bias(l) for l in range(n)]
    beta = draw(st.floats(-1.5, 1.5)) if all(storable) else 0.0
    label = f"{name}(extra={extra}, select={sel}, beta={beta:.3g})"
    new = [m + e for m, e in zip(hidden, extra)]

    if name == "split_half":
        return _case(
            name,
            lambda net, g: plan(net, new, Split(0.5, _select(sel, hidden, extra, g)), generator=g),
        ), label
    if name == "split_alpha":
        alpha = draw(st.floats(-2.5, 3.5).filter(lambda a: abs(a) > 1e-3 and abs(1 - a) > 1e-3))
        return _case(
            name,
            lambda net, g: plan(
                net, new, Split(alpha, _select(sel, hidden, extra, g)), generator=g
            ),
        ), f"{label} α={alpha:.4g}"
    if name == "split_random_alpha":
        return _case(
            name,
            lambda net, g: plan(
                net, new, Split("random", _select(sel, hidden, extra, g)), generator=g
            ),
        ), label
    if name == "split_kway":
        k = draw(st.integers(2, 4))
        raw = [draw(st.floats(-1.0, 2.0)) for _ in range(k - 1)]
        alphas = (1.0 - sum(raw), *raw)
        groups = [draw(st.integers(0, 2)) for _ in range(n)]
        if sum(groups) == 0:
            groups[0] = 1
        widths_k = [m + gr * (k - 1) for m, gr in zip(hidden, groups)]
        return _case(
            name,
            lambda net, g: plan(
                net, widths_k, Split(alphas, _select(sel, hidden, groups, g)), generator=g
            ),
        ), f"{name}(k={k}, groups={groups}, select={sel}, alphas={[round(a, 3) for a in alphas]})"
    if name == "null":
        # critical iff every widened layer's next Linear has a bias or σ(β) = 0: the
        # kind is checked against autograd by the tests, not predicted here
        return _case(name, lambda net, g: plan(net, new, Null(bias=beta), generator=g), None), label
    if name == "null_fan_in":
        kind = EmbeddingKind.OUTPUT_PRESERVING
        return _case(
            name, lambda net, g: plan(net, new, Null(bias=beta, fan_in_std=0.7), generator=g), kind
        ), label
    if name == "net2net":
        return _case(
            name,
            lambda net, g: plan(
                net, new, Net2Net(0.0, _select(sel, hidden, extra, g)), generator=g
            ),
        ), label
    if name == "net2net_noise":
        # with a single new copy per neuron there may be no pair to put noise on: then
        # the embedding is still critical, so only check the kind when pairs exist
        return _case(
            name,
            lambda net, g: plan(
                net, new, Net2Net(0.5, _select(sel, hidden, extra, g)), generator=g
            ),
            None,
        ), label
    if name == "general_vector":
        return _case(name, lambda net, g: general_vector(net, new, g, beta), None), label
    if name == "general_matrix":
        return _case(name, lambda net, g: general_matrix(net, new, g, beta), None), label
    if name == "composition":
        return _case(name, lambda net, g: composition(net, new, g), None), label
    raise AssertionError(name)


def _case(
    name: str, planner: Planner, kind: EmbeddingKind | None = EmbeddingKind.CRITICAL
) -> SchemeCase:
    return SchemeCase(name, planner, kind)  # type: ignore[arg-type]


def random_sources(m: int, wide: int, g: torch.Generator, *, null: bool = True) -> list[int]:
    """A shuffled total source map: every narrow neuron once, the rest random or null."""
    extra = torch.randint(-1 if null else 0, m, (wide - m,), generator=g).tolist()
    src = list(range(m)) + extra
    perm = torch.randperm(wide, generator=g).tolist()
    return [src[i] for i in perm]


def random_coefficients(src: Sequence[int], g: torch.Generator) -> list[float]:
    """Per-neuron fan-out coefficients summing to 1 over each neuron's copies, 0 for nulls."""
    coef = torch.zeros(len(src), dtype=torch.float64)
    for s in set(src) - {-1}:
        idx = [j for j, t in enumerate(src) if t == s]
        c = 2.0 * torch.rand(len(idx), generator=g, dtype=torch.float64) - 0.5
        c[0] = 1.0 - c[1:].sum()
        coef[idx] = c
    return coef.tolist()


def general_vector(
    net: nn.Module, new: Sequence[int], g: torch.Generator, beta: float = 0.0
) -> Embedding:
    """A General embedding with shuffled sources, nulls and random vector coefficients."""
    hidden = _hidden_widths(net)
    sources = [random_sources(m, w, g) for m, w in zip(hidden, new)]
    coefs = [random_coefficients(s, g) for s in sources]
    return plan(net, new, General(sources, coefs, null_bias=beta), generator=g)


def general_matrix(
    net: nn.Module, new: Sequence[int], g: torch.Generator, beta: float = 0.0
) -> Embedding:
    """A General embedding with random ``(wide_next, wide)`` coefficients per layer.

    Every row sums to 1 over the copies of each narrow neuron, so the function is
    preserved; the backward condition generally fails (output-preserving).
    """
    hidden = _hidden_widths(net)
    sources = [random_sources(m, w, g) for m, w in zip(hidden, new)]
    wide_next = [*new[1:], _out_features(net)]
    coefs = []
    for l, src in enumerate(sources):
        rows = [random_coefficients(src, g) for _ in range(wide_next[l])]
        coefs.append(torch.tensor(rows, dtype=torch.float64))
    return plan(net, new, General(sources, coefs, null_bias=beta), generator=g)


def _out_features(net: nn.Module) -> int:
    lins = [m for m in net if isinstance(m, nn.Linear)]
    return lins[-1].out_features


def composition(net: nn.Module, new: Sequence[int], g: torch.Generator) -> Embedding:
    """Split part of the way, then Null-and-split the rest, composed with ``then``."""
    import copy

    from torch_embed.widen import embed_

    hidden = _hidden_widths(net)
    mid = [m + (w - m) // 2 for m, w in zip(hidden, new)]
    first = plan(net, mid, Split(alpha=0.3), generator=g)
    mid_net = copy.deepcopy(net)
    embed_(mid_net, first)
    second = general_vector(mid_net, new, g, 0.0)
    return first.then(second)


def critical_matrix_general(net: nn.Module, g: torch.Generator) -> Embedding:
    """A critical matrix-form General embedding of a net with >= 2 hidden layers.

    Hidden layer 0 gets a ``(wide_1, wide_0)`` coefficient matrix ``C = v 1ᵀ + u wᵀ``
    (broadcast over rows), where ``v`` are vector coefficients, ``w`` sums to zero over
    the copies of each layer-0 neuron (rows still sum to 1: output preserved) and ``u``
    satisfies ``Σ_{i ∈ copies(s)} c1_i u_i = 0`` for each layer-1 neuron ``s`` (the
    backward condition: error scalings ``β = v`` exist). Layer 1 splits neuron 0 three
    ways so that ``u`` can be non-zero.
    """
    hidden = _hidden_widths(net)
    assert len(hidden) >= 2, "needs two hidden layers"
    m0, m1 = hidden[0], hidden[1]
    src0 = [*range(m0), 0, 0, m0 - 1, -1]
    v = torch.tensor(random_coefficients(src0, g), dtype=torch.float64)
    w = torch.zeros(len(src0), dtype=torch.float64)
    copies0 = [j for j, s in enumerate(src0) if s == 0]
    w[copies0] = torch.tensor([0.4, -0.1, -0.3], dtype=torch.float64)
    src1 = [*range(m1), 0, 0]
    c1 = torch.ones(len(src1), dtype=torch.float64)
    c1[[0, m1, m1 + 1]] = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    u = torch.zeros(len(src1), dtype=torch.float64)
    u[[0, m1, m1 + 1]] = torch.tensor(
        [0.6, -0.5, -1.0 / 0.3 * (0.5 * 0.6 - 0.2 * 0.5)], dtype=torch.float64
    )
    C = v[None, :] + u[:, None] * w[None, :]
    sources: list[list[int] | None] = [src0, src1] + [None] * (len(hidden) - 2)
    coefs: list[object] = [C, c1.tolist()] + [None] * (len(hidden) - 2)
    return plan(net, None, General(sources, coefs), generator=g)  # type: ignore[arg-type]


def random_pad(net: nn.Module, new: Sequence[int], g: torch.Generator) -> Embedding:
    """The non-preserving baseline."""
    return plan(net, new, RandomPad(), generator=g)


# ----------------------------------------------------------------------------- brute force
F64 = torch.float64


def symmetric_offsets(emb: Embedding, scale: float, g: torch.Generator) -> Embedding:
    """``emb`` plus symmetric fan-out offsets ``±scale·ε`` on each pair of copies.

    What ``landscape.condense`` builds, and what Net2Net's noise was before it was drawn
    at apply time: the offsets cancel over each pair, so the function is kept.
    """
    wide = emb.wide_widths
    layers = []
    for l, lm in enumerate(emb.layers):
        off = torch.zeros(wide[l + 2], lm.wide, dtype=torch.float64)
        for s in range(int(lm.source.max()) + 1):
            copies = (lm.source == s).nonzero().flatten().tolist()
            for a, b in zip(copies[0::2], copies[1::2]):
                n = scale * torch.randn(wide[l + 2], generator=g, dtype=torch.float64)
                off[:, a], off[:, b] = n, -n
        layers.append(replace(lm, fan_out_offset=off))
    return Embedding(emb.layout, tuple(layers))


SMOOTH_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}
"""Twice-differentiable activations by the short names the curvature tests use."""


def randn_mlp(
    widths: Sequence[int],
    act: str = "tanh",
    *,
    bias: bool | Sequence[bool] = True,
    seed: int = 0,
) -> nn.Sequential:
    """``Linear, act, ..., Linear`` in float64, every weight and bias ``~ N(0, 1)``.

    ``bias`` is one flag for every Linear or one per Linear. Unit-scale weights keep the
    activations out of their linear range, so second derivatives matter.
    """
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b, bias=bias if isinstance(bias, bool) else bias[k]).double()
        with torch.no_grad():
            for p in lin.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        layers += [lin, SMOOTH_ACTIVATIONS[act]()]
    return nn.Sequential(*layers[:-1])


def randn_data(
    widths: Sequence[int], n: int = 12, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` standard normal inputs and targets for a network of these widths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=F64)
    y = torch.randn(n, widths[-1], generator=g, dtype=F64)
    return x, y


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flat_loss(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(f, θ)``: the loss as a function of the flat float64 parameter vector, and θ.

    Written independently of :mod:`torch_embed.hessian` (plain ``functional_call``), so
    the tests do not check the library against itself. Floating buffers (BatchNorm
    statistics) are cast to float64 with the parameters.
    """
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = {k: v.double() if v.is_floating_point() else v for k, v in model.named_buffers()}

    def f(theta: torch.Tensor) -> torch.Tensor:
        state, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            state[n] = theta[i : i + k].view(s)
            i += k
        return loss_fn(functional_call(model, {**state, **buffers}, (x,)), y)

    return f, torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def brute_hessian(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The dense float64 Hessian of the loss (``torch.autograd.functional.hessian``)."""
    f, theta = flat_loss(model, loss_fn, x, y)
    return torch.autograd.functional.hessian(f, theta)  # type: ignore[no-any-return]


def brute_gradient(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The flat float64 gradient of the loss (``torch.autograd.functional.jacobian``)."""
    f, theta = flat_loss(model, loss_fn, x, y)
    return torch.autograd.functional.jacobian(f, theta)  # type: ignore[no-any-return]


def counts(ev: torch.Tensor, tol: float) -> tuple[int, int, int]:
    """``(negative, zero, positive)`` counts of eigenvalues ``ev`` with zero tolerance ``tol``."""
    return (int((ev < -tol).sum()), int((ev.abs() <= tol).sum()), int((ev > tol).sum()))


def adam_replay(
    emb: object, init: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]], lr: float
) -> tuple[dict[str, nn.Parameter], torch.optim.Adam]:
    """Adam replayed on the wide model: start at ``emb.apply(init)`` (the embedded narrow
    start), then one step per narrow gradient mapped by ``emb.map_gradients``. What an
    optimizer whose state ``widen`` mapped must hold (the brute-force reference)."""
    replay = {n: nn.Parameter(t.clone()) for n, t in emb.apply(init).items()}  # type: ignore[attr-defined]
    optimizer = torch.optim.Adam(list(replay.values()), lr=lr)
    for grad in grads:
        for n, g in emb.map_gradients(grad).items():  # type: ignore[attr-defined]
            replay[n].grad = g
        optimizer.step()
    return replay, optimizer
