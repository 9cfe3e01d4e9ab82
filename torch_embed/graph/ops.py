"""The op vocabulary: each traced op's rule for how it couples feature axes.

Every tensor axis is an atom of :class:`~torch_embed.graph.atoms.Atoms`. :func:`interpret`
gives a traced op's output its atoms and records what the op says about its inputs:

- **pass / unify** (element-wise ops of any arity, with broadcasting: activations,
  dropout, residual ``+``, gates ``*``, ``where``): axes of equal size at the same
  broadcast position are the same features; a size-1 axis broadcasts and couples nothing;
- **contract** (``linear``, ``matmul``, ``conv``): the input's feature axis meets the
  weight's *in* axis (the weight reads the group: a *consumer*), the weight's *out* axis
  makes a new group (a *producer*, with the bias); grouped and depthwise convolutions
  add their rule as a constraint;
- **per-channel** (``batch_norm``, ``instance_norm``, a parameter multiplied or added
  element-wise, ``prelu``): its tensors follow the channel (copied with it);
- **factor / sum** (``view``, ``flatten``, ``permute``, ``cat``, ``split``, ``chunk``,
  ``pad``): axes are merged, split, reordered or concatenated
  (:class:`~torch_embed.graph.atoms.Atoms` keeps offsets and strides);
- **constrain** (``layer_norm``, ``rms_norm``, ``group_norm``, ``softmax`` and
  reductions over a feature axis): the group may grow only by the maps GROWTH.md §2
  allows, recorded as a :class:`Constraint`;
- **attention** (``scaled_dot_product_attention``; an explicit ``q @ k^T`` followed,
  through scalings and masks, by a softmax): the head axis is batch-like (q, k, v
  heads are one group; with GQA the query heads are the product kv heads × queries per
  kv head, as ``repeat_interleave`` or ``expand`` + ``reshape`` make it), the query/key
  head_dim is an ``"attention"`` constraint with the scale the trace shows, the value
  head_dim passes to the output;
- **rigid**: factories with fixed sizes (``torch.ones(8)``), ``select`` of one entry,
  and **every op not listed here**: its axes cannot grow, and the reason names the op
  and its module. An unknown op is never assumed element-wise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch_embed.graph.atoms import Atoms
from torch_embed.graph.trace import Ref, Traced, TracedNode

__all__ = ["Constraint", "Interpretation", "Use", "interpret"]

Axes = tuple[int, ...]


@dataclass(frozen=True)
class Constraint:
    """A rule that limits how a group may grow (it does not forbid growth).

    Attributes:
        kind: ``"layer_norm"``, ``"rms_norm"``, ``"group_norm"``, ``"grouped_conv"``,
            ``"depthwise_conv"``, ``"softmax"``, ``"attention"``, ``"mean"``, ``"sum"``, ``"max"``,
            ``"var"``, ``"norm"``, ``"chunk"``, ``"split"``, ``"reshape"``, ``"contraction"``,
            ``"tied"`` (a tensor used by several ops).
        op: The op as messages name it (``aten.layer_norm in `blocks.0.norm` (LayerNorm)``).
        module: The owning module's FQN.
        rule: What stays exact, in words.
        groups: The ``groups``/``num_groups`` of a grouped conv or GroupNorm, else 1.
        scale: For ``"attention"`` (a head_dim contracted between queries and keys
            before a softmax): the constant the scores are multiplied by in the trace,
            ``None`` when the op computes it (``scaled_dot_product_attention`` without
            ``scale=``: ``1/√head_dim``).
    """

    kind: str
    op: str
    module: str
    rule: str
    groups: int = 1
    scale: float | None = None

    def __str__(self) -> str:
        return f"{self.op}: {self.rule}"


_RULES = {
    "layer_norm": "every unit copied the same number of times, or mean-fill (γ and eps rescaled)",
    "rms_norm": "every unit copied the same number of times, or zero-fill (γ and eps rescaled)",
    "group_norm": "every channel copied the same number of times inside its group, or whole "
    "groups duplicated",
    "softmax": "copies change the normalisation; needs a temperature or zero-extension rule",
    "mean": "every unit copied the same number of times, or mean-fill",
    "var": "every unit copied the same number of times",
    "norm": "every unit copied the same number of times (and the norm rescaled)",
    "sum": "only null (zero) units keep a sum over the axis",
    "max": "copies keep a max/min over the axis; null units do not",
    "contraction": "contracted between two activations (not a weight): copies scale the "
    "result; zero-extended instead (new units null on both sides)",
    "attention": "head_dim inside a softmax: zero-extended (new query and key dims null) "
    "with the temperature kept (queries and keys × (d'/d)^(1/4) when the scale is "
    "1/√head_dim); never under rotary embeddings",
    "chunk": "every chunk grows by the same amount",
    "split": "the sizes are constants of the trace: forward must compute them from the "
    "tensor for the group to grow, which a re-trace after widening has to confirm",
    "reshape": "the target size is a constant of the trace: if forward writes it as a number "
    "instead of computing it from the tensor, the group cannot grow (a re-trace after "
    "widening has to confirm)",
}


@dataclass(frozen=True)
class Use:
    """A parameter or buffer axis that reads or writes the features of an atom."""

    atom: int
    tensor: str
    axis: int
    role: str  # "producer" | "consumer" | "per-channel" | "unknown" | "kernel"
    node: int  # index of the op in the traced graph
    module: str
    op: str
    groups: int = 1


@dataclass
class Interpretation:
    """The atoms of a traced graph and everything the ops said about them."""

    atoms: Atoms = field(default_factory=Atoms)
    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[int, tuple[str, int]] = field(default_factory=dict)
    uses: list[Use] = field(default_factory=list)
    rigid: list[tuple[int, str, str]] = field(default_factory=list)  # (atom, kind, reason)
    constraints: list[tuple[int, Constraint]] = field(default_factory=list)
    through: list[tuple[int, int, str]] = field(default_factory=list)  # (atom, node, module)
    index: int = -1  # the node being interpreted
    # scores q @ k^T between activations: name -> (qk atom, scale so far, head axes)
    scores: dict[str, tuple[int, float, int | None, int | None]] = field(default_factory=dict)
    # (module, q head axis, kv head axis, qk head_dim axis, value head_dim axis or None)
    # of every attention found
    attentions: list[tuple[str, int | None, int | None, int, int | None]] = field(
        default_factory=list
    )
    # attention weights softmax(q @ k^T) awaiting their ``@ v``: name -> index in attentions
    probs: dict[str, int] = field(default_factory=dict)
    # (module, kind, normalised axes, weight FQN or None, eps) of every LayerNorm/RMSNorm
    norms: list[tuple[str, str, Axes, str | None, float | None]] = field(default_factory=list)
    # index in norms -> (output node, bias FQN or None) of a layer_norm/rms_norm op
    norm_nodes: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    # index in norms -> FQN of the weight of the one linear that reads its output (the
    # LM head after the final norm), where one linear alone reads it
    norm_heads: dict[int, str] = field(default_factory=dict)
    # head_dim axes of nn.MultiheadAttention (embed_dim = num_heads × head_dim = its input)
    packed: list[int] = field(default_factory=list)
    # squares x² (pow 2, x * x) and means of squares awaiting their eps (index in norms)
    squares: set[str] = field(default_factory=set)
    pending_rms: dict[str, int] = field(default_factory=dict)
    # part of a split parameter axis -> the whole axis (see ``use``)
    part_of: dict[int, int] = field(default_factory=dict)
    # axes made by repeating entries (expand of a size-1 axis, repeat_interleave): GQA's n_rep
    repeats: list[int] = field(default_factory=list)

    # -- helpers used by the rules
    def fresh(self, shape: tuple[int, ...]) -> Axes:
        """New atoms for a tensor of ``shape``."""
        return tuple(self.atoms.new(s) for s in shape)

    def axes(self, x: Any) -> Axes | None:
        """The atoms of a traced tensor argument, ``None`` for anything else."""
        if isinstance(x, Ref):
            v = self.values.get(x.name)
            if isinstance(v, tuple) and all(isinstance(a, int) for a in v):
                return v
        return None

    def unify(self, a: int, b: int, node: TracedNode) -> None:
        """Declare two axes the same features (``node`` names the op in conflicts)."""
        self.atoms.union(a, b, node.where)

    def use(self, group: int, param: int, role: str, node: TracedNode, groups: int = 1) -> None:
        """Record that the tensor axis ``param`` (if it is one) has ``role`` on ``group``.

        A part of a parameter axis split by ``split``/``chunk`` (``nn.MultiheadAttention``
        slicing its packed ``in_proj_weight`` into q and kv rows) stands for the whole
        axis: the use covers every group of it, at its offsets.
        """
        if param not in self.origin and param in self.part_of:
            group = param = self.part_of[param]
        origin = self.origin.get(param)
        if origin is not None:
            self.uses.append(
                Use(group, origin[0], origin[1], role, self.index, node.module, node.op, groups)
            )

    def copy(self, atom: int, node: TracedNode) -> int:
        """A new atom unified with ``atom`` (an activation axis made by a weight axis)."""
        if atom not in self.origin:
            return atom
        new = self.atoms.new(self.atoms.size(atom))
        self.unify(atom, new, node)
        return new

    def pin(self, atom: int, reason: str, kind: str = "op") -> None:
        """Make ``atom`` rigid; ``kind`` is "op", "input", "output" or "spatial"."""
        self.rigid.append((atom, kind, reason))

    def constrain(
        self,
        atom: int,
        kind: str,
        node: TracedNode,
        rule: str = "",
        groups: int = 1,
        scale: float | None = None,
    ) -> None:
        """Record a :class:`Constraint` on ``atom`` (size-1 axes have none)."""
        if self.atoms.size(atom) > 1:
            c = Constraint(kind, node.where, node.module, rule or _RULES[kind], groups, scale)
            self.constraints.append((atom, c))


Rule = Callable[[Interpretation, TracedNode], Any]


def _tensor_args(it: Interpretation, node: TracedNode) -> list[Axes]:
    out: list[Axes] = []

    def walk(x: Any) -> None:
        ax = it.axes(x)
        if ax is not None:
            out.append(ax)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(node.args)
    walk(tuple(node.kwargs.values()))
    return out


def _dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


# ----------------------------------------------------------------------------- rules
def _elementwise(it: Interpretation, node: TracedNode) -> Any:
    shape = node.shape
    if not isinstance(shape, tuple) or (shape and not isinstance(shape[0], int)):
        return _unknown(it, node)
    operands = _tensor_args(it, node)
    out: list[int] = []
    for pos in range(1, len(shape) + 1):
        size = shape[-pos]
        found = [ax[-pos] for ax in operands if len(ax) >= pos and it.atoms.size(ax[-pos]) == size]
        if not found:
            out.append(it.atoms.new(size))
            continue
        for a in found[1:]:
            it.unify(found[0], a, node)
        # the result is an activation if any operand is one (x * gamma), else a weight
        # derived from parameters (w * mask), whose role the op that reads it records
        rep = next((a for a in found if a not in it.origin), found[0])
        for a in found:
            if a != rep:
                it.use(rep, a, "per-channel", node)
        out.append(rep)
    axes = tuple(reversed(out))
    if node.module and len(operands) == 1 and not any(u.node == it.index for u in it.uses):
        it.through.extend((a, it.index, node.module) for a in axes)
    return axes


def _unknown(it: Interpretation, node: TracedNode, why: str = "") -> Any:
    reason = why or f"{node.where} is not in torch_embed's op vocabulary"
    for ax in _tensor_args(it, node):
        for a in ax:
            it.pin(a, reason)
            it.use(a, a, "unknown", node)
    return _fresh_pinned(it, node.shape, reason)


def _fresh_pinned(it: Interpretation, shape: Any, reason: str) -> Any:
    if shape is None:
        return None
    if shape and not isinstance(shape[0], int):
        return tuple(_fresh_pinned(it, s, reason) for s in shape)
    axes = it.fresh(shape)
    for a in axes:
        it.pin(a, reason)
    return axes


def _factory(it: Interpretation, node: TracedNode) -> Any:
    return _fresh_pinned(
        it, node.shape, f"{node.where} creates a tensor of a size fixed in the graph"
    )


def _like(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    return x if x is not None else _unknown(it, node)


def _ignore(it: Interpretation, node: TracedNode) -> Any:
    return None if node.shape is None else _unknown(it, node)


def _linear(it: Interpretation, node: TracedNode) -> Any:
    x, w, b = (
        it.axes(node.arg(0, "input")),
        it.axes(node.arg(1, "weight")),
        it.axes(node.arg(2, "bias")),
    )
    if x is None or w is None or len(w) != 2:
        return _unknown(it, node)
    it.unify(x[-1], w[1], node)
    it.use(x[-1], w[1], "consumer", node)
    it.use(w[0], w[0], "producer", node)
    if w[1] not in it.origin and x[-1] not in it.origin:
        it.constrain(x[-1], "contraction", node)
    if b is not None:
        it.unify(b[0], w[0], node)
        it.use(w[0], b[0], "producer", node)
    return (*x[:-1], it.copy(w[0], node))


def _matmul(it: Interpretation, node: TracedNode) -> Any:
    ops = [it.axes(a) for a in node.args[:3]]
    bias = None
    if node.op in ("addmm", "baddbmm"):
        bias, ops = ops[0], ops[1:]
    a, b = ops[0], ops[1]
    shape = node.shape
    if a is None or b is None or len(a) < 2 or len(b) < 2 or not isinstance(shape, tuple):
        return _unknown(it, node)
    it.unify(a[-1], b[-2], node)
    params = [ax for ax in (a[-1], b[-2]) if ax in it.origin]
    for p in params:
        it.use(a[-1], p, "consumer", node)
    if not params:
        it.constrain(a[-1], "contraction", node)
        heads = (a[-3], b[-3]) if len(a) >= 3 and len(b) >= 3 else (None, None)
        it.scores[node.name] = (a[-1], 1.0, *heads)
    it.use(a[-2], a[-2], "producer", node)
    it.use(b[-1], b[-1], "producer", node)
    batch = shape[:-2]
    lead: list[int] = []
    for pos in range(1, len(batch) + 1):
        found = [
            ax[-2 - pos]
            for ax in (a, b)
            if len(ax) >= pos + 2 and it.atoms.size(ax[-2 - pos]) == batch[-pos]
        ]
        for f in found[1:]:
            it.unify(found[0], f, node)
        lead.append(found[0] if found else it.atoms.new(batch[-pos]))
    out = (*reversed(lead), it.copy(a[-2], node), it.copy(b[-1], node))
    if bias is not None:
        for pos in range(1, len(bias) + 1):
            if it.atoms.size(bias[-pos]) == shape[-pos]:
                it.unify(out[-pos], bias[-pos], node)
                it.use(out[-pos], bias[-pos], "producer", node)
    return out


def _sdpa(it: Interpretation, node: TracedNode) -> Any:
    """``scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale, enable_gqa)``.

    ``q`` is ``(*batch, Hq, L, E)``, ``k`` ``(*batch, H, S, E)``, ``v`` ``(*batch, H, S, Ev)``.
    The head axis is batch-like: q, k and v heads are one group (with ``enable_gqa``,
    the q heads are the product ``(H, Hq/H)``: q head ``h`` reads kv head ``h // n_rep``).
    ``E`` is contracted between queries and keys inside the softmax (an ``"attention"``
    constraint), ``S`` between the weights and ``v``; ``Ev`` passes to the output.
    """
    q, k, v = (it.axes(node.arg(i, n)) for i, n in enumerate(("query", "key", "value")))
    shape = node.shape
    if q is None or k is None or v is None or min(len(q), len(k), len(v)) < 2:
        return _unknown(it, node)
    if not isinstance(shape, tuple) or not shape or not isinstance(shape[0], int):
        return _unknown(it, node)  # the native variants return (out, logsumexp, ...)
    mask = it.axes(node.arg(3, "attn_mask"))
    scale = node.arg(6, "scale")
    gqa = bool(node.arg(7, "enable_gqa", False))
    it.unify(q[-1], k[-1], node)
    it.unify(k[-2], v[-2], node)
    it.constrain(k[-2], "softmax", node)
    it.constrain(q[-1], "attention", node, scale=None if scale is None else float(scale))
    heads = (q[-3], k[-3]) if len(q) >= 3 and len(k) >= 3 else (None, None)
    it.attentions.append((node.module, *heads, q[-1], v[-1]))
    if node.module_type == "MultiheadAttention":
        it.packed.append(q[-1])
    for pos in range(3, len(q) + 1):
        qa = q[-pos]
        for other in (k, v):
            if len(other) < pos:
                continue
            oa = other[-pos]
            sq, so = it.atoms.size(qa), it.atoms.size(oa)
            if sq == so:
                it.unify(qa, oa, node)
            elif pos == 3 and gqa and so > 1 and sq % so == 0:
                kv, _rep = it.atoms.refine(qa, "prod", [so, sq // so])
                it.unify(kv, oa, node)
            elif so != 1 and sq != 1:
                return _unknown(it, node, f"{node.where}: q, k, v batch axes do not match")
    if mask is not None:
        scores = (*q[:-1], k[-2])
        for pos in range(1, min(len(mask), len(scores)) + 1):
            if it.atoms.size(mask[-pos]) == it.atoms.size(scores[-pos]) > 1:
                it.unify(mask[-pos], scores[-pos], node)
    return (*q[:-1], it.copy(v[-1], node))


def _repeat_interleave(it: Interpretation, node: TracedNode) -> Any:
    """``x.repeat_interleave(r, dim)``: entry ``i`` becomes ``r`` consecutive copies."""
    x = it.axes(node.args[0])
    shape = node.shape
    reps = node.arg(1, "repeats")
    d = node.arg(2, "dim")
    if x is None or not isinstance(shape, tuple) or not isinstance(reps, int) or d is None:
        return _unknown(it, node)
    d = _dim(int(d), len(x))
    if reps == 1:
        return x
    out = list(x)
    rep = it.atoms.new(reps)
    it.repeats.append(rep)
    out[d] = it.atoms.product([x[d], rep])
    return tuple(out)


_SCORE_PASS = frozenset(
    {
        "masked_fill", "add", "sub", "where", "to", "_to_copy", "type_as", "contiguous",
        "clone", "float", "double", "dropout", "alias",
    }
)  # fmt: skip


def _track_rms(it: Interpretation, node: TracedNode) -> None:
    """Squares, and the eps added to a mean of squares (an RMSNorm written out)."""
    args = node.args
    binary = len(args) > 1 and isinstance(args[0], Ref)
    if binary and (
        (node.op == "pow" and args[1] == 2) or (node.op == "mul" and args[0] == args[1])
    ):
        it.squares.add(node.name)
    elif node.op == "add" and len(args) > 1 and isinstance(args[0], Ref):
        k = it.pending_rms.pop(args[0].name, None)
        if k is not None and isinstance(args[1], (int, float)) and not isinstance(args[1], bool):
            module, kind, axes, weight, _ = it.norms[k]
            it.norms[k] = (module, kind, axes, weight, float(args[1]))


def _track_scores(it: Interpretation, node: TracedNode) -> None:
    """Follow ``q @ k^T`` through its scaling and masking to a softmax (explicit attention)."""
    _track_rms(it, node)
    refs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, Ref)]
    if not refs:
        return
    if node.op in ("matmul", "bmm") and isinstance(node.args[0], Ref):
        k = it.probs.get(node.args[0].name)
        v = it.axes(node.args[1]) if len(node.args) > 1 else None
        if k is not None and v is not None and len(v) >= 2:  # softmax(...) @ v
            module, qh, kh, dim, _ = it.attentions[k]
            it.attentions[k] = (module, qh, kh, dim, v[-1])
    for r in refs:
        if r.name in it.probs and node.op in _SCORE_PASS:  # dropout, casts
            it.probs[node.name] = it.probs[r.name]
    if not any(r.name in it.scores for r in refs):
        return
    src = next(r.name for r in refs if r.name in it.scores)
    atom, scale, qh, kh = it.scores[src]
    if node.op in ("mul", "div") and len(node.args) > 1:
        other = node.args[1] if isinstance(node.args[0], Ref) else node.args[0]
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other:
            c = float(other)
            it.scores[node.name] = (atom, scale * c if node.op == "mul" else scale / c, qh, kh)
        return
    if node.op in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        it.constrain(atom, "attention", node, scale=scale)
        it.probs[node.name] = len(it.attentions)
        it.attentions.append((node.module, qh, kh, atom, None))
        return
    if node.op in _SCORE_PASS:
        it.scores[node.name] = (atom, scale, qh, kh)


def _conv(it: Interpretation, node: TracedNode) -> Any:
    x, w, b = it.axes(node.args[0]), it.axes(node.args[1]), it.axes(node.arg(2, "bias"))
    shape = node.shape
    if x is None or w is None or not isinstance(shape, tuple):
        return _unknown(it, node)
    if node.op == "convolution":
        transposed, groups = bool(node.arg(6, "transposed")), int(node.arg(8, "groups", 1))
    elif node.op.startswith("conv_transpose"):
        transposed, groups = True, int(node.arg(6, "groups", 1))
    else:
        transposed, groups = False, int(node.arg(6, "groups", 1))
    k = len(w) - 2
    ch = len(x) - k - 1
    for a in w[2:]:
        it.use(a, a, "kernel", node)
    xc = x[ch]
    if transposed:
        if groups != 1:
            return _unknown(
                it, node, f"{node.where}: a grouped transposed convolution is not supported"
            )
        it.unify(xc, w[0], node)
        it.use(xc, w[0], "consumer", node)
        it.use(w[1], w[1], "producer", node)
        out_c = w[1]
    elif groups == 1:
        it.unify(xc, w[1], node)
        it.use(xc, w[1], "consumer", node)
        it.use(w[0], w[0], "producer", node)
        out_c = w[0]
    elif groups == it.atoms.size(xc) and it.atoms.size(w[1]) == 1 and it.atoms.size(w[0]) == groups:
        it.unify(xc, w[0], node)
        it.use(xc, w[0], "per-channel", node, groups)
        it.use(w[1], w[1], "kernel", node)
        it.constrain(
            xc, "depthwise_conv", node,
            "groups grows with the channels (new channels get copied filters)", groups,
        )  # fmt: skip
        out_c = xc
    else:
        rule = (
            f"grows by a multiple of groups={groups}, every group by the same amount; "
            f"copies stay in their group"
        )
        it.use(xc, w[1], "consumer", node, groups)
        it.use(w[1], w[1], "kernel", node)
        it.use(w[0], w[0], "producer", node, groups)
        it.constrain(xc, "grouped_conv", node, rule, groups)
        it.constrain(w[0], "grouped_conv", node, rule, groups)
        out_c = w[0]
    if b is not None:
        it.unify(b[0], out_c, node)
        it.use(out_c, b[0], "per-channel" if out_c == xc else "producer", node, groups)
    spatial = it.fresh(shape[ch + 1 :])
    for a in spatial:
        it.pin(a, f"spatial axis of {node.where}", "spatial")
    return (*x[:ch], it.copy(out_c, node), *spatial)


def _per_channel(it: Interpretation, node: TracedNode) -> Any:
    """batch_norm / instance_norm and their native forms: (x, weight, bias, mean, var, ...)."""
    x = it.axes(node.args[0])
    if x is None:
        return _unknown(it, node)
    ch = 1 if len(x) > 1 else 0
    for i in range(1, 5):
        p = it.axes(node.arg(i, ("weight", "bias", "running_mean", "running_var")[i - 1]))
        if p is not None and len(p) == 1:
            it.unify(x[ch], p[0], node)
            it.use(x[ch], p[0], "per-channel", node)
    return _with_extras(it, node, x)


def _with_extras(it: Interpretation, node: TracedNode, x: Axes) -> Any:
    """``x``'s axes as the output, or as the first of a tuple output (native ops)."""
    shape = node.shape
    if shape and not isinstance(shape[0], int):
        return (x, *(it.fresh(s) if s is not None else None for s in shape[1:]))
    return x


def _norm(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    if x is None:
        return _unknown(it, node)
    kind = "rms_norm" if node.op in ("rms_norm", "_fused_rms_norm") else "layer_norm"
    k = len(node.args[1])
    params = (2, 3) if kind == "layer_norm" else (2,)
    for a in x[len(x) - k :]:
        it.constrain(a, kind, node)
    for i in params:
        p = it.axes(node.arg(i, "weight" if i == 2 else "bias"))
        if p is not None and len(p) == k:
            for pa, xa in zip(p, x[len(x) - k :]):
                it.unify(xa, pa, node)
                it.use(xa, pa, "per-channel", node)
    w = it.axes(node.arg(2, "weight"))
    weight = it.origin[w[0]][0] if w and w[0] in it.origin else None
    bb = it.axes(node.arg(3, "bias")) if kind == "layer_norm" else None
    bias = it.origin[bb[0]][0] if bb and bb[0] in it.origin else None
    eps = node.arg(4 if kind == "layer_norm" else 3, "eps")
    eps = float(eps) if isinstance(eps, (int, float)) else None
    it.norm_nodes[len(it.norms)] = (node.name, bias)
    it.norms.append((node.module, kind, x[len(x) - k :], weight, eps))
    return _with_extras(it, node, x)


def _group_norm(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    if x is None:
        return _unknown(it, node)
    if node.op == "native_group_norm":  # (x, w, b, N, C, HxW, group, eps)
        g, params = int(node.args[6]), (1, 2)
    else:  # (x, num_groups, w, b, eps)
        g, params = int(node.args[1]), (2, 3)
    it.constrain(x[1], "group_norm", node, groups=g)
    for i in params:
        p = it.axes(node.arg(i, ""))
        if p is not None and len(p) == 1:
            it.unify(x[1], p[0], node)
            it.use(x[1], p[0], "per-channel", node)
    return _with_extras(it, node, x)


def _prelu(it: Interpretation, node: TracedNode) -> Any:
    x, w = it.axes(node.args[0]), it.axes(node.args[1])
    if x is None or w is None:
        return _unknown(it, node)
    if len(w) == 1 and it.atoms.size(w[0]) > 1:
        ch = 1 if len(x) > 1 else 0
        it.unify(x[ch], w[0], node)
        it.use(x[ch], w[0], "per-channel", node)
    elif node.module:  # one slope for every feature: an element-wise activation
        it.through.extend((a, it.index, node.module) for a in x)
    return x


_REDUCE_KIND = {
    "mean": "mean", "nanmean": "mean", "sum": "sum", "nansum": "sum", "prod": "sum",
    "amax": "max", "amin": "max", "max": "max", "min": "max", "logsumexp": "softmax",
    "var": "var", "std": "var", "var_mean": "var", "std_mean": "var",
    "linalg_vector_norm": "norm", "norm": "norm",
}  # fmt: skip


def _reduce(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    shape = node.shape
    if x is None or shape is None:
        return _unknown(it, node)
    if node.op in ("linalg_vector_norm", "norm"):
        dims, keep = node.arg(2, "dim"), bool(node.arg(3, "keepdim", False))
    else:
        dims, keep = node.arg(1, "dim"), bool(node.arg(2, "keepdim", False))
    if isinstance(dims, int):
        dims = [dims]
    reduced = set(range(len(x))) if not dims else {_dim(int(d), len(x)) for d in dims}
    src = node.args[0]
    # mean(x²) over the feature axes: an RMSNorm written out (Hugging Face's LlamaRMSNorm)
    rms = node.op == "mean" and isinstance(src, Ref) and src.name in it.squares
    for d in reduced:
        it.constrain(x[d], "rms_norm" if rms else _REDUCE_KIND[node.op], node)
    if rms:
        it.pending_rms[node.name] = len(it.norms)
        it.norms.append((node.module, "rms_norm", tuple(x[d] for d in sorted(reduced)), None, None))
    out: list[int] = []
    for d, a in enumerate(x):
        if d not in reduced:
            out.append(a)
        elif keep:
            out.append(it.atoms.new(1))
    first = tuple(out)
    if shape and not isinstance(shape[0], int):  # (values, indices) or (var, mean)
        if any(tuple(s) != tuple(it.atoms.size(a) for a in first) for s in shape):
            return _unknown(it, node)
        return tuple(first for _ in shape)
    if tuple(it.atoms.size(a) for a in first) != tuple(shape):
        return _unknown(it, node)
    return first


def _argreduce(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    if x is not None:
        d = node.arg(1, "dim")
        for a in x if d is None else (x[_dim(int(d), len(x))],):
            it.pin(a, f"{node.where} returns positions along the axis, which copies change")
    return it.fresh(node.shape) if node.shape is not None else None


def _softmax(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    if x is None:
        return _unknown(it, node)
    it.constrain(x[_dim(int(node.args[1]), len(x))], "softmax", node)
    return x


def _ordered(it: Interpretation, node: TracedNode) -> Any:
    """cumsum, flip, roll: the result depends on the order of entries along an axis."""
    x = it.axes(node.args[0])
    if x is None:
        return _unknown(it, node)
    dims = node.arg(2, "dims") if node.op == "roll" else node.arg(1, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or range(len(x)))
    for d in dims:
        it.pin(x[_dim(int(d), len(x))], f"{node.where} depends on the order along the axis")
    return x


def reshape_axes(
    it: Interpretation, x: Axes, shape: tuple[int, ...], node: TracedNode
) -> Axes | None:
    """Axes of ``shape`` for a row-major reshape of ``x`` (``None`` if not expressible)."""
    atoms = it.atoms
    leaves = atoms.factors(list(x))
    out: list[int] = []
    i = 0
    for s in shape:
        if s == 1:
            out.append(atoms.new(1))
            continue
        taken: list[int] = []
        have = 1
        while have < s:
            if i >= len(leaves):
                return None
            leaf = leaves[i]
            size = atoms.size(leaf)
            need = s // have
            if s % have:
                return None
            if size <= need:
                if need % size:
                    return None
                taken.append(leaf)
                have *= size
                i += 1
            else:
                if size % need:
                    return None
                head, tail = atoms.refine(leaf, "prod", [need, size // need])
                taken.append(head)
                have *= need
                leaves[i] = tail
        out.append(atoms.product(taken))
    if i != len(leaves):
        return None
    return tuple(out)


def _reshape(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    shape = node.shape
    if x is None or not isinstance(shape, tuple):
        return _unknown(it, node)
    out = reshape_axes(it, x, shape, node)
    if out is None:
        sizes = tuple(it.atoms.size(a) for a in x)
        return _unknown(
            it, node, f"{node.where} reshapes {sizes} to {shape} in a way torch_embed cannot factor"
        )
    if node.op in ("view", "reshape", "_unsafe_view"):
        target = list(node.arg(1, "size") or [])
        grown = [a for a, t in zip(out, target) if t != -1 and it.atoms.size(a) > 1 and a not in x]
        for a in grown:
            it.constrain(a, "reshape", node)
    return out


def _permute(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    if x is None:
        return _unknown(it, node)
    n = len(x)
    if node.op == "permute":
        order = [_dim(int(d), n) for d in node.args[1]]
    elif node.op in ("t", "numpy_T"):
        order = list(reversed(range(n)))
    elif node.op in ("movedim", "moveaxis"):
        src, dst = node.args[1], node.args[2]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [_dim(s, n) for s in src], [_dim(d, n) for d in dst]
        rest = [d for d in range(n) if d not in src]
        order = [-1] * n
        for s, d in zip(src, dst):
            order[d] = s
        it_rest = iter(rest)
        order = [o if o >= 0 else next(it_rest) for o in order]
    else:  # transpose, swapaxes, swapdims
        d0, d1 = _dim(int(node.args[1]), n), _dim(int(node.args[2]), n)
        order = list(range(n))
        order[d0], order[d1] = order[d1], order[d0]
    return tuple(x[d] for d in order)


def _expand(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    shape = node.shape
    if x is None or not isinstance(shape, tuple):
        return _unknown(it, node)
    out: list[int] = []
    for pos in range(1, len(shape) + 1):
        if pos <= len(x) and it.atoms.size(x[-pos]) == shape[-pos]:
            out.append(x[-pos])
        else:
            out.append(it.atoms.new(shape[-pos]))
            if pos <= len(x) and shape[-pos] > 1:
                it.repeats.append(out[-1])
    return tuple(reversed(out))


def _repeat(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    shape = node.shape
    if x is None or not isinstance(shape, tuple):
        return _unknown(it, node)
    reps = list(node.args[1])
    reps = [1] * (len(shape) - len(reps)) + reps  # tile: fewer repeats than axes
    out: list[int] = []
    for pos in range(1, len(shape) + 1):
        r = reps[-pos]
        if pos <= len(x):
            a = x[-pos]
            out.append(a if r == 1 else it.atoms.product([it.atoms.new(r), a]))
        else:
            out.append(it.atoms.new(shape[-pos]))
    return tuple(reversed(out))


def _select(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    if x is None:
        return _unknown(it, node)
    d = _dim(int(node.args[1]), len(x))
    if it.atoms.size(x[d]) > 1:
        it.pin(x[d], f"{node.where} picks entry {node.args[2]} of the axis")
    return x[:d] + x[d + 1 :]


def _slice(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    shape = node.shape
    if x is None or not isinstance(shape, tuple):
        return _unknown(it, node)
    d = _dim(int(node.arg(1, "dim", 0)), len(x))
    if shape[d] == it.atoms.size(x[d]):
        return x
    it.pin(x[d], f"{node.where} takes entries {node.args[2:]} of the axis")
    return (*x[:d], it.atoms.new(shape[d]), *x[d + 1 :])


def _split(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    shapes = node.shape
    if x is None or not isinstance(shapes, tuple) or not shapes or not isinstance(shapes[0], tuple):
        return _unknown(it, node)
    if node.op == "unbind":
        d = _dim(int(node.arg(1, "dim", 0)), len(x))
        if it.atoms.size(x[d]) > 1:
            it.pin(x[d], f"{node.where} splits the axis into single entries")
        return tuple(x[:d] + x[d + 1 :] for _ in shapes)
    d = _dim(int(node.arg(2, "dim", 0)), len(x))
    sizes = [int(s[d]) for s in shapes]
    parts = it.atoms.refine(x[d], "sum", sizes) if len(sizes) > 1 else (x[d],)
    whole = it.part_of.get(x[d], x[d])
    if whole in it.origin:
        it.part_of.update((p, whole) for p in parts)
    kind = (
        "chunk"
        if node.op == "chunk" or (node.op == "split" and len(set(sizes[:-1])) <= 1)
        else "split"
    )
    if len(sizes) > 1:
        for p in parts:
            it.constrain(p, kind, node)
    return tuple((*x[:d], p, *x[d + 1 :]) for p in parts)


def _cat(it: Interpretation, node: TracedNode) -> Any:
    tensors = [it.axes(t) for t in node.arg(0, "tensors")]
    shape = node.shape
    if any(t is None for t in tensors) or not isinstance(shape, tuple):
        return _unknown(it, node)
    parts = [t for t in tensors if t is not None and len(t) == len(shape)]
    d = _dim(int(node.arg(1, "dim", 0)), len(shape))
    for axis in range(len(shape)):
        if axis != d:
            for t in parts[1:]:
                it.unify(parts[0][axis], t[axis], node)
    cat = it.atoms.concat([t[d] for t in parts if it.atoms.size(t[d]) > 0])
    return (*parts[0][:d], cat, *parts[0][d + 1 :])


def _stack(it: Interpretation, node: TracedNode) -> Any:
    tensors = [it.axes(t) for t in node.arg(0, "tensors")]
    shape = node.shape
    if any(t is None for t in tensors) or not tensors or not isinstance(shape, tuple):
        return _unknown(it, node)
    parts = [t for t in tensors if t is not None]
    for t in parts[1:]:
        for a, b in zip(parts[0], t):
            it.unify(a, b, node)
    d = _dim(int(node.arg(1, "dim", 0)), len(shape))
    return (*parts[0][:d], it.atoms.new(len(parts)), *parts[0][d:])


def _pad(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    shape = node.shape
    if x is None or not isinstance(shape, tuple):
        return _unknown(it, node)
    pads = list(node.arg(1, "pad"))
    out = list(x)
    for k in range(len(pads) // 2):
        d = len(x) - 1 - k
        lo, hi = int(pads[2 * k]), int(pads[2 * k + 1])
        if lo == 0 and hi == 0:
            continue
        copies = node.op == "pad" and node.arg(2, "mode", "constant") != "constant"
        if node.op not in ("constant_pad_nd", "pad") or copies or lo < 0 or hi < 0:
            it.pin(x[d], f"{node.where} pads the axis with copies of its own entries")
            out[d] = it.atoms.new(shape[d])
            continue
        reason = f"{node.where} pads the axis with a fixed number of entries"
        extra = [it.atoms.new(n) for n in (lo, hi) if n]
        for e in extra:
            it.pin(e, reason)
        out[d] = it.atoms.concat(([extra[0]] if lo else []) + [x[d]] + ([extra[-1]] if hi else []))
    return tuple(out)


def _spatial(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    shape = node.shape
    m = re.search(r"(\d)d", node.op)
    if x is None or shape is None or (m is None and node.op != "upsample"):
        return _unknown(it, node)
    k = int(m.group(1)) if m is not None else len(x) - 2  # fx's nn.Upsample: (N, C, *spatial)
    first = shape if isinstance(shape[0], int) else shape[0]
    keep = x[: len(x) - k]
    spatial = it.fresh(first[len(keep) :])
    for a in spatial:
        it.pin(a, f"spatial axis of {node.where}", "spatial")
    out = (*keep, *spatial)
    if isinstance(shape[0], int):
        return out
    return tuple(out if tuple(s) == tuple(first) else it.fresh(s) for s in shape)


def _embedding(it: Interpretation, node: TracedNode) -> Any:
    w, idx = it.axes(node.args[0]), it.axes(node.args[1])
    if w is None or idx is None or len(w) != 2:
        return _unknown(it, node)
    it.use(w[0], w[0], "kernel", node)
    it.use(w[1], w[1], "producer", node)
    return (*idx, it.copy(w[1], node))


def _getitem(it: Interpretation, node: TracedNode) -> Any:
    src = node.args[0]
    v = it.values.get(src.name) if isinstance(src, Ref) else None
    if isinstance(v, tuple) and v and not isinstance(v[0], int):
        return v[int(node.args[1])]
    return _unknown(it, node)


def _dropout_native(it: Interpretation, node: TracedNode) -> Any:
    x = it.axes(node.args[0])
    return _with_extras(it, node, x) if x is not None else _unknown(it, node)


# Each rule and the aten op names (no overload; in-place variants without "_") it covers.
_TABLE: tuple[tuple[Rule, str], ...] = (
    (
        _elementwise,
        "relu relu6 gelu silu sigmoid tanh hardtanh hardswish hardsigmoid elu celu selu "
        "leaky_relu rrelu mish softplus softshrink hardshrink log_sigmoid log_sigmoid_forward "
        "tanhshrink softsign abs neg exp exp2 expm1 log log1p log2 log10 sqrt rsqrt square "
        "sin cos tan asin acos atan sinh cosh asinh acosh atanh erf erfc erfinv reciprocal "
        "sign sgn clamp clamp_min clamp_max clip floor ceil round trunc frac positive "
        "nan_to_num threshold logit dropout alpha_dropout feature_dropout "
        "feature_alpha_dropout contiguous clone detach alias lift_fresh_copy to _to_copy "
        "float double half bfloat16 elementwise_module add sub rsub mul div "
        "true_divide floor_divide remainder fmod pow float_power maximum minimum fmax fmin "
        "where masked_fill lerp addcmul addcdiv atan2 hypot eq ne lt le gt ge logical_and "
        "logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor bitwise_not "
        "copysign xlogy heaviside isnan isinf isfinite",
    ),
    (
        _like,
        "zeros_like ones_like full_like empty_like rand_like randn_like randint_like type_as",
    ),
    (
        _factory,
        "ones zeros full empty arange rand randn randint new_zeros new_ones new_full "
        "new_empty eye linspace scalar_tensor empty_strided",
    ),
    (
        _ignore,
        "_assert_tensor_metadata _assert_scalar _assert_async sym_constrain_range "
        "sym_constrain_range_for_size",
    ),
    (_linear, "linear"),
    (_matmul, "matmul mm bmm addmm"),
    (_sdpa, "scaled_dot_product_attention"),
    (_repeat_interleave, "repeat_interleave"),
    (
        _conv,
        "conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d conv_transpose3d",
    ),
    (
        _per_channel,
        "batch_norm instance_norm native_batch_norm _native_batch_norm_legit "
        "_native_batch_norm_legit_no_training _batch_norm_with_update _batch_norm_no_update",
    ),
    (_norm, "layer_norm native_layer_norm rms_norm _fused_rms_norm"),
    (_group_norm, "group_norm native_group_norm"),
    (_prelu, "prelu _prelu_kernel"),
    (_reduce, " ".join(_REDUCE_KIND)),
    (_argreduce, "argmax argmin"),
    (_softmax, "softmax log_softmax _softmax _log_softmax"),
    (_ordered, "cumsum cumprod flip roll"),
    (
        _reshape,
        "view reshape _unsafe_view view_copy flatten unflatten squeeze unsqueeze view_as "
        "reshape_as",
    ),
    (_permute, "permute transpose swapaxes swapdims t numpy_T movedim moveaxis"),
    (_expand, "expand expand_as broadcast_to"),
    (_repeat, "repeat tile"),
    (_select, "select"),
    (_slice, "slice narrow"),
    (_split, "split split_with_sizes chunk unbind tensor_split"),
    (_cat, "cat concat concatenate"),
    (_stack, "stack"),
    (
        _pad,
        "constant_pad_nd pad reflection_pad1d reflection_pad2d reflection_pad3d "
        "replication_pad1d replication_pad2d replication_pad3d",
    ),
    (
        _spatial,
        "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d "
        "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d "
        "adaptive_max_pool2d adaptive_max_pool3d max_pool2d_with_indices "
        "max_pool3d_with_indices _adaptive_avg_pool2d _adaptive_avg_pool3d "
        "upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d "
        "upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d "
        "_upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d "
        "_upsample_bilinear2d_aa _upsample_bicubic2d_aa upsample",
    ),
    (_embedding, "embedding"),
    (_getitem, "getitem"),
    (_dropout_native, "native_dropout"),
)
_VOCABULARY: dict[str, Rule] = {op: rule for rule, names in _TABLE for op in names.split()}


def known_ops() -> frozenset[str]:
    """The op names (aten level, no overload) the vocabulary has a rule for."""
    return frozenset(_VOCABULARY)


def _refs(x: Any) -> list[str]:
    if isinstance(x, Ref):
        return [x.name]
    if isinstance(x, (list, tuple)):
        return [n for v in x for n in _refs(v)]
    if isinstance(x, dict):
        return [n for v in x.values() for n in _refs(v)]
    return []


_TO_HEAD = frozenset(
    {
        "getitem", "view", "reshape", "_unsafe_view", "slice", "alias", "contiguous", "clone",
        "to", "_to_copy", "dropout", "type_as",
    }
)  # fmt: skip


def _norm_heads(it: Interpretation, traced: Traced) -> None:
    """Record the linear that alone reads a norm's output (a tied LM head's fold point).

    The output may pass through ops that keep its last axis (``view``, a ``slice`` of
    the positions, casts, dropout) on its way; every value on the way has one reader
    and none is a model output.
    """
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(traced.nodes):
        for name in dict.fromkeys(_refs((node.args, node.kwargs))):
            readers.setdefault(name, []).append(k)
    outputs = set(_refs(traced.outputs))
    for index, (name, _) in it.norm_nodes.items():
        width = it.atoms.size(it.norms[index][2][-1])
        while name not in outputs and len(readers.get(name, [])) == 1:
            k = readers[name][0]
            node = traced.nodes[k]
            if node.op == "linear":
                heads = {u.tensor for u in it.uses if u.node == k and u.role == "consumer"}
                first = node.args[0]
                if isinstance(first, Ref) and first.name == name and len(heads) == 1:
                    it.norm_heads[index] = heads.pop()
                break
            shape = node.shape
            if (
                node.op not in _TO_HEAD
                or (node.op == "getitem" and node.args[1:2] != (0,))
                or not isinstance(shape, tuple)
                or not shape
                or shape[-1] != width
                or (node.op == "slice" and node.arg(1, "dim", 0) in (-1, len(shape) - 1))
            ):
                break
            name = node.name


def interpret(traced: Traced) -> Interpretation:
    """Give every axis of ``traced`` its atoms and record uses, pins and constraints."""
    it = Interpretation()
    by_fqn: dict[str, Axes] = {}  # a tensor reached under two names has one set of axes
    for name, (fqn, shape) in traced.tensors.items():
        if fqn not in by_fqn:
            by_fqn[fqn] = it.fresh(shape)
            for k, a in enumerate(by_fqn[fqn]):
                it.origin[a] = (fqn, k)
        it.values[name] = by_fqn[fqn]
    for name, (label, shape) in traced.constants.items():
        it.values[name] = _fresh_pinned(
            it, shape, f"tensor constant `{label}` is held by the model as a plain attribute "
            "(not a parameter or buffer), so its size is fixed",
        )  # fmt: skip
    for name, in_shape in traced.inputs:
        if in_shape is not None:
            inp = it.fresh(in_shape)
            it.values[name] = inp
            for a in inp:
                it.pin(a, f"model input `{name}`", "input")
    for k, node in enumerate(traced.nodes):
        it.index = k
        rule = _VOCABULARY.get(node.op, _unknown)
        try:
            it.values[node.name] = rule(it, node)
        except (IndexError, TypeError, ValueError, KeyError) as exc:
            it.values[node.name] = _unknown(
                it, node, f"{node.where} has arguments torch_embed could not read ({exc})"
            )
        _track_scores(it, node)

    def pin_output(x: Any, k: int) -> None:
        ax = it.axes(x)
        if ax is not None:
            for a in ax:
                it.pin(a, "model output" + (f" {k}" if len(traced.outputs) > 1 else ""), "output")
        elif isinstance(x, (list, tuple)):
            for v in x:
                pin_output(v, k)
        elif isinstance(x, dict):
            for v in x.values():
                pin_output(v, k)

    for k, out in enumerate(traced.outputs):
        pin_output(out, k)
    _norm_heads(it, traced)
    for atom, why in it.atoms.conflicts:
        it.pin(atom, why)
    return it
