"""Find a block's residual branches and their writers by recording one eager forward.

A block ``y = x + b₁(x) + b₂(x + b₁(x)) + …`` (pre-norm transformers, residual MLPs)
becomes the identity when every branch output ``bₖ`` is zero. :func:`record_blocks`
runs the model once on the example input under a ``TorchDispatchMode`` that logs every
aten op of the chosen blocks with the identities of its input and output tensors (the
tensors themselves are kept alive, so identities are never reused), and
:func:`analyse_block` follows the *residual stream*: starting from the block's input, an
``add`` of a stream tensor and a non-stream tensor continues the stream, and its other
operand is a branch output. Walking back from a branch output through view-like ops,
bias adds and scalings reaches the *writer*: the matrix parameter of the last
``mm``/``addmm``/``bmm``/convolution (``o_proj``, ``down_proj``, ``out_proj``, ``c_proj``,
``fc2``). A block whose output is not on the stream (post-norm: ``LN(x + b(x))``) is
refused with the op that left it.

This is an eager recorder, not a trace: it sees exactly what ran on the example input
(no export restrictions, keyword arguments and caches pass through), and like any trace
it specialises to that input. The result is always checked by running the rewritten
model (:mod:`torch_embed.deepen`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["BlockRoles", "analyse_block", "record_blocks"]

# ops that only re-index or copy their one data input
_VIEWS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "alias",
        "clone",
        "contiguous",
        "detach",
        "transpose",
        "t",
        "permute",
        "unsqueeze",
        "squeeze",
        "expand",
        "flatten",
        "_to_copy",
        "lift_fresh",
        "native_dropout",
        "dropout",
    }
)
# ops whose matrix parameter makes them a branch's writer
_AFFINE = frozenset(
    {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution"}
)


@dataclass
class _Op:
    name: str
    inputs: list[int]
    outputs: list[int]
    owner: str


@dataclass
class _Record:
    """What ran inside one block: its ops, its input and output tensor ids."""

    ops: list[_Op] = field(default_factory=list)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    keep: list[Tensor] = field(default_factory=list)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.active: list[tuple[_Record, list[str]]] = []

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.active:
            rec, stack = self.active[-1]
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
            outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
            rec.keep.extend(ins + outs)
            name = str(func.overloadpacket.__name__).rstrip("_")
            owner = stack[-1] if stack else ""
            rec.ops.append(_Op(name, [id(t) for t in ins], [id(t) for t in outs], owner))
        return out


@contextmanager
def record_blocks(blocks: Mapping[str, nn.Module]) -> Iterator[dict[str, _Record]]:
    """Record the ops of each named block during the forward run inside the context.

    Args:
        blocks: ``{fqn: block}``; each block's first call is recorded.

    Yields:
        ``{fqn: record}``, filled once the context's forward has run.
    """
    records: dict[str, _Record] = {}
    recorder = _Recorder()
    handles = []

    def enter(fqn: str, stack: list[str], sub: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if sub == "":
                if fqn in records:
                    return
                rec = _Record(args=args, kwargs=dict(kwargs))
                records[fqn] = rec
                recorder.active.append((rec, stack))
            if recorder.active and recorder.active[-1][1] is stack:
                stack.append(sub)

        return hook

    def leave(fqn: str, stack: list[str], sub: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not recorder.active or recorder.active[-1][1] is not stack:
                return
            if stack and stack[-1] == sub:
                stack.pop()
            if sub == "":
                rec, _ = recorder.active.pop()
                rec.output = output

        return hook

    try:
        for fqn, block in blocks.items():
            stack: list[str] = []
            for sub, m in block.named_modules():
                handles.append(
                    m.register_forward_pre_hook(enter(fqn, stack, sub), with_kwargs=True)
                )
                handles.append(
                    m.register_forward_hook(
                        leave(fqn, stack, sub), with_kwargs=True, always_call=True
                    )
                )
        with recorder:
            yield records
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class BlockRoles:
    """What the stream analysis found in one block (names relative to the block).

    Attributes:
        writers: Per residual branch, in order, the writer's matrix parameter.
        writer_biases: Per branch, the bias added right after the writer, or ``None``.
        affine: Every parameter an affine op of the block consumes (matrix weights and
            the biases of the same modules), in ``named_parameters()`` order: zeroed by
            a "null" insertion.
    """

    writers: tuple[str, ...]
    writer_biases: tuple[str | None, ...]
    affine: tuple[str, ...]


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    for a in (*args, kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(a, Tensor) and a.is_floating_point():
            return a
    return None


def analyse_block(block: nn.Module, record: _Record, where: str) -> BlockRoles:
    """Follow the residual stream of one recorded block; find its branches' writers.

    Args:
        block: The block.
        record: Its record from :func:`record_blocks`.
        where: How messages name the block (``"`layers.0` (GPTBlock)"``).

    Raises:
        ValueError: The block has no floating input, its output is not its input plus
            branch outputs (post-norm, scaled stream, no residual), or a branch does not
            end in an affine map with a parameter matrix.
    """
    x = _first_tensor(record.args, record.kwargs)
    outs = [t for t in tree_leaves(record.output) if isinstance(t, Tensor)]
    if x is None or not outs:
        raise ValueError(f"deepen: block {where} has no floating tensor input or output")
    params = {id(p): n for n, p in block.named_parameters()}
    param_of: dict[int, str] = dict(params)
    producer: dict[int, _Op] = {}
    stream = {id(x)}
    data = {id(x)}
    branches: list[int] = []
    last_exit: _Op | None = None
    for op in record.ops:
        for o in op.outputs:
            producer[o] = op
        on = [i for i in op.inputs if i in stream]
        sources = {param_of.get(i) for i in op.inputs}
        if len(sources) == 1 and None not in sources:  # t, split, view, ... of one parameter
            for o in op.outputs:
                param_of[o] = param_of[op.inputs[0]]
        if any(i in data for i in op.inputs):
            data.update(op.outputs)
        if op.name == "add" and len(op.inputs) == 2 and len(on) == 1:
            other = op.inputs[1] if op.inputs[0] in stream else op.inputs[0]
            if other in data:
                branches.append(other)
                stream.update(op.outputs)
                continue
        if op.name in ("view", "_unsafe_view", "reshape", "alias", "clone", "contiguous") and on:
            stream.update(op.outputs[:1])
            continue
        if on:
            last_exit = op
    if id(outs[0]) not in stream:
        how = (
            f"it leaves the stream through aten.{last_exit.name} in "
            f"`{last_exit.owner or '(the block itself)'}`"
            if last_exit is not None
            else "it is not computed from its input by residual adds"
        )
        raise ValueError(
            f"deepen: block {where}'s output is not its input plus residual branches "
            f"({how}); a block with zero branches would not be the identity (post-norm "
            f"blocks LN(x + f(x)) and scaled streams are not exact: GROWTH.md §3). Use "
            f"pre-norm blocks (e.g. norm_first=True); in a plain nn.Sequential MLP, insert "
            f"an identity layer after a ReLU with mode='identity'"
        )
    if not branches:
        raise ValueError(f"deepen: block {where} has no residual branch (no `x + f(x)`)")
    writers: list[str] = []
    biases: list[str | None] = []
    for b in branches:
        w, bias = _writer(b, producer, param_of, data, where)
        writers.append(w)
        biases.append(bias)
    affine: list[str] = []
    for op in record.ops:
        if op.name in _AFFINE:
            for i in op.inputs:
                n = param_of.get(i)
                if n is not None and n not in affine:
                    affine.append(n)
    own = dict(block.named_parameters())
    for n in list(affine):
        for cand in (n.replace("weight", "bias"), n[: -len("weight")] + "bias"):
            if cand != n and cand in own and cand not in affine:
                affine.append(cand)
    ordered = tuple(n for n in own if n in set(affine))  # the block's parameter order
    return BlockRoles(tuple(writers), tuple(biases), ordered)


def _writer(
    start: int,
    producer: Mapping[int, _Op],
    param_of: Mapping[int, str],
    data: set[int],
    where: str,
) -> tuple[str, str | None]:
    """Walk back from a branch output to the matrix parameter that writes it."""
    bias: str | None = None
    cur = start
    seen: list[str] = []
    while cur in producer:
        op = producer[cur]
        seen.append(op.name)
        mats = [param_of[i] for i in op.inputs if i in param_of]
        if op.name in _AFFINE and mats:
            ours = [m for m in mats if m not in (bias,)]
            weight = next((m for m in ours if "bias" not in m.rsplit(".", 1)[-1]), ours[-1])
            if op.name in ("addmm", "baddbmm") and len(ours) > 1:
                bias = next(m for m in ours if m != weight)
            return weight, bias
        flow = [i for i in op.inputs if i in data and i not in param_of]
        if op.name == "add" and len(flow) == 1 and len(mats) == 1 and bias is None:
            bias = mats[0]
        elif len(flow) != 1 or (op.name not in _VIEWS and op.name not in ("mul", "div", "add")):
            break
        cur = flow[0]
    raise ValueError(
        f"deepen: a residual branch of block {where} does not end in an affine map with a "
        f"parameter matrix (walking back from the residual add: "
        f"{' <- '.join(seen) or 'no op'}); its writer cannot be zeroed"
    )
