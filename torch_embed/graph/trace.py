"""Trace one forward pass of a model into a small op graph (owner FQNs, shapes, arguments).

:func:`trace` tries ``torch.export.export(model, args, strict=False)`` first and falls
back to ``torch.fx.symbolic_trace``; both give the same :class:`Traced` form, so the op
vocabulary (:mod:`torch_embed.graph.ops`) is written once, at the aten level. The model
is never changed: the trace runs under ``torch.no_grad``, every module's train/eval flag
is put back, and a buffer a train-mode forward updates (BatchNorm running statistics)
is restored bit for bit.

A trace specialises Python control flow and sizes to the example input: a branch taken
on a value, or a size written into ``forward`` (``x.view(-1, 128)``), is recorded as
the constant it was.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torch_embed._sequential import elementwise_info
from torch_embed.graph.hf import tracing

__all__ = ["Ref", "Traced", "TracedNode", "Tracer", "check_model", "trace"]

Tracer = Literal["auto", "export", "fx"]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Ref:
    """A reference to a traced value (a node, an input or a parameter/buffer) by name."""

    name: str


@dataclass(frozen=True)
class TracedNode:
    """One op of the traced forward.

    Attributes:
        name: Unique name of the value it produces.
        op: The op's name at the aten level without overload (``"conv2d"``, ``"add"``,
            ``"getitem"``); in-place variants lose their trailing ``_``; ops outside the
            ``aten`` namespace keep it (``"mylib::sort_channels"``).
        args: Positional arguments: :class:`Ref` for traced values, Python constants
            (ints, lists, ...) otherwise.
        kwargs: Keyword arguments, likewise.
        module: FQN of the innermost module whose forward ran the op (``""``: the root).
        module_type: That module's class name.
        shape: The output's shape, a tuple of shapes for ops returning several tensors,
            ``None`` for a non-tensor result.
    """

    name: str
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    module: str = ""
    module_type: str = ""
    shape: Any = None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument ``index`` (positional) or ``name`` (keyword), else ``default``."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)

    @property
    def where(self) -> str:
        """``aten.<op> in `<module>` (<type>)``: how messages name this op."""
        op = self.op if "::" in self.op else f"aten.{self.op}"
        owner = (
            f"`{self.module}` ({self.module_type})" if self.module else "the model's own forward"
        )
        return f"{op} in {owner}"


@dataclass(frozen=True)
class Traced:
    """A traced forward pass.

    Attributes:
        tracer: ``"torch.export"`` or ``"torch.fx"``.
        inputs: The user inputs, as ``(name, shape)`` (``shape`` ``None`` for non-tensors).
        tensors: Parameters and buffers by value name: ``name -> (fqn, shape)``.
        constants: Tensors the forward created or held that are not parameters or
            buffers (lifted constants): ``name -> (attribute name, shape)``.
        nodes: The ops in execution order.
        outputs: The user outputs (:class:`Ref` or constants).
    """

    tracer: str
    inputs: tuple[tuple[str, Shape | None], ...]
    tensors: dict[str, tuple[str, Shape]]
    constants: dict[str, tuple[str, Shape]]
    nodes: tuple[TracedNode, ...]
    outputs: tuple[Any, ...]


# ----------------------------------------------------------------------------- checks
_WRAPPERS = {
    "DataParallel": "`.module`",
    "DistributedDataParallel": "`.module` (and wrap it again after widening)",
    "FullyShardedDataParallel": "`.module` after gathering full parameters "
    "(FSDP shards them; widen the unsharded model, then shard again)",
    "OptimizedModule": "`._orig_mod` (torch.compile's wrapper; compile again afterwards)",
}


def check_model(model: object, example_inputs: object, caller: str) -> tuple[Any, ...]:
    """Refuse what cannot be traced faithfully; return ``example_inputs`` as a tuple.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or is a DDP/DataParallel/FSDP/
            ``torch.compile`` wrapper; ``example_inputs`` is not a tensor or a tuple;
            a parameter, buffer or input is an inference tensor.
        ValueError: A module is parametrized or lazy and not initialized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects an nn.Module, got {type(model).__name__}")
    for cls in type(model).__mro__:
        if cls.__name__ in _WRAPPERS or cls.__name__ == "FSDPModule":
            key = "FullyShardedDataParallel" if cls.__name__ == "FSDPModule" else cls.__name__
            raise TypeError(
                f"{caller} got a {type(model).__name__} wrapper ({cls.__name__}); pass the "
                f"wrapped module {_WRAPPERS[key]}"
            )
    if isinstance(example_inputs, torch.Tensor):
        args: tuple[Any, ...] = (example_inputs,)
    elif isinstance(example_inputs, tuple):
        args = example_inputs
    else:
        raise TypeError(
            f"{caller}: example_inputs must be a tensor or a tuple of the forward's positional "
            f"arguments, got {type(example_inputs).__name__}"
            + (" (pass a tuple, not a list)" if isinstance(example_inputs, list) else "")
        )
    for k, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_inference():
            raise TypeError(
                f"{caller}: example input {k} is an inference tensor (made under "
                f"torch.inference_mode), which cannot be traced; pass `x.clone()` made "
                f"outside inference mode"
            )
    for name, sub in model.named_modules(remove_duplicate=False):
        kind = f"`{name}` ({type(sub).__name__})" if name else f"the model ({type(sub).__name__})"
        if torch.nn.utils.parametrize.is_parametrized(sub):
            raise ValueError(
                f"{caller}: module {kind} is parametrized; remove the parametrization "
                f"(torch.nn.utils.parametrize.remove_parametrizations) first"
            )
        if isinstance(sub, nn.modules.lazy.LazyModuleMixin) and sub.has_uninitialized_params():  # type: ignore[misc]
            raise ValueError(
                f"{caller}: module {kind} is a lazy module whose shapes are not known yet; "
                f"run one forward pass first"
            )
    for what, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for fqn, t in named:
            if t.is_inference():
                raise TypeError(
                    f"{caller}: {what} `{fqn}` is an inference tensor (created under "
                    f"torch.inference_mode), which cannot be traced or updated in place; "
                    f"rebuild it outside inference mode (e.g. `p.data = p.data.clone()` "
                    f"under torch.no_grad)"
                )
    return args


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run a block that may update buffers, flags or the RNG; restore them bit for bit.

    A buffer updated in place (BatchNorm's running statistics in train mode) gets its
    values back; one the forward replaced by another tensor is put back itself. A
    forward that draws random numbers (train-mode dropout, run by the fx tracer) leaves
    the CPU generator, and those of the CUDA devices the model is on, as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]
    tensors = (*model.parameters(), *model.buffers())
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for m, name, b, old in saved:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                if b.is_meta:  # no values to restore
                    continue
                if not torch.equal(b, old):  # NaN != NaN: copied back, same bits
                    b.copy_(old)


# ----------------------------------------------------------------------------- export
def _shape(val: object) -> Any:
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    if isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val):
        return tuple(_shape(v) for v in val)
    return None


def _owner(node: torch.fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    fqn, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return str(fqn), name.rsplit(".", 1)[-1]


def _op_name(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._opname
    elif isinstance(target, torch._ops.OpOverloadPacket):
        ns, name = target._qualified_op_name.split("::", 1)[0], target.__name__
    else:
        ns, name = "", getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name if ns in ("aten", "") else f"{ns}::{name}"


def _convert(x: object, values: dict[str, Any]) -> Any:
    if isinstance(x, torch.fx.Node):
        if x.name in values:
            return values[x.name]
        return Ref(x.name)
    if isinstance(x, (list, tuple)):
        return type(x)(_convert(v, values) for v in x)
    if isinstance(x, dict):
        return {k: _convert(v, values) for k, v in x.items()}
    return x


def _trace_export(model: nn.Module, args: tuple[Any, ...]) -> Traced:
    from torch.export.graph_signature import InputKind, OutputKind

    ep = torch.export.export(model, args, strict=False)
    sig = ep.graph_signature
    tensors: dict[str, tuple[str, Shape]] = {}
    constants: dict[str, tuple[str, Shape]] = {}
    inputs: list[tuple[str, Shape | None]] = []
    user_outputs = {
        spec.arg.name
        for spec in sig.output_specs
        if spec.kind == OutputKind.USER_OUTPUT and hasattr(spec.arg, "name")
    }
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in sig.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None or name not in placeholders:
            continue
        shape = _shape(placeholders[name].meta.get("val"))
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensors[name] = (str(spec.target), shape)
        elif spec.kind == InputKind.USER_INPUT:
            inputs.append((name, shape))
        elif shape is not None:
            constants[name] = (str(spec.target or name), shape)
    nodes: list[TracedNode] = []
    outputs: tuple[Any, ...] = ()
    for node in ep.graph.nodes:
        if node.op == "call_function":
            module, mtype = _owner(node)
            nodes.append(
                TracedNode(
                    node.name,
                    _op_name(node.target),
                    _convert(node.args, {}),
                    _convert(dict(node.kwargs), {}),
                    module,
                    mtype,
                    _shape(node.meta.get("val")),
                )
            )
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            outputs = tuple(
                _convert(o, {})
                for o in outs
                if not isinstance(o, torch.fx.Node) or o.name in user_outputs
            )
        elif node.op not in ("placeholder", "get_attr"):
            raise RuntimeError(f"unexpected {node.op} node {node.name} in the exported graph")
    return Traced("torch.export", tuple(inputs), tensors, constants, tuple(nodes), outputs)


# ----------------------------------------------------------------------------- fx
def _module_call(mod: nn.Module, x: Any, owner: str) -> tuple[str, tuple[Any, ...]] | None:
    """The aten-level op and arguments an ``nn`` leaf module's forward amounts to."""

    def p(attr: str) -> Ref | None:
        return (
            Ref(f"{owner}.{attr}" if owner else attr)
            if getattr(mod, attr, None) is not None
            else None
        )

    if type(mod) is nn.Linear:
        return "linear", (x, p("weight"), p("bias"))
    if type(mod) is nn.Embedding:
        return "embedding", (p("weight"), x)
    if isinstance(mod, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                        nn.ConstantPad2d, nn.ConstantPad3d)):  # fmt: skip
        return "constant_pad_nd", (x, list(mod.padding), getattr(mod, "value", 0.0))
    if type(mod) is nn.Upsample:
        return "upsample", (x,)
    if isinstance(mod, nn.modules.conv._ConvNd) and type(mod).__module__.startswith("torch.nn"):
        k = len(mod.kernel_size)
        if mod.transposed:
            return f"conv_transpose{k}d", (
                x, p("weight"), p("bias"), mod.stride, mod.padding, mod.output_padding,
                mod.groups, mod.dilation,
            )  # fmt: skip
        return f"conv{k}d", (
            x,
            p("weight"),
            p("bias"),
            mod.stride,
            mod.padding,
            mod.dilation,
            mod.groups,
        )
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return "batch_norm", (
            x, p("weight"), p("bias"), p("running_mean"), p("running_var"), mod.training,
            mod.momentum, mod.eps, False,
        )  # fmt: skip
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        return "instance_norm", (
            x, p("weight"), p("bias"), p("running_mean"), p("running_var"), True,
            mod.momentum, mod.eps, False,
        )  # fmt: skip
    if type(mod) is nn.LayerNorm:
        return "layer_norm", (x, list(mod.normalized_shape), p("weight"), p("bias"), mod.eps)
    if type(mod) is getattr(nn, "RMSNorm", None):
        return "rms_norm", (x, list(mod.normalized_shape), p("weight"), mod.eps)  # type: ignore[arg-type]
    if type(mod) is nn.GroupNorm:
        return "group_norm", (x, mod.num_groups, p("weight"), p("bias"), mod.eps)
    if type(mod) is nn.Flatten:
        return "flatten", (x, mod.start_dim, mod.end_dim)
    if type(mod) is nn.Unflatten:
        return "unflatten", (x, mod.dim, list(mod.unflattened_size))
    if isinstance(mod, nn.modules.dropout._DropoutNd):
        return "dropout", (x, mod.p, mod.training)
    if type(mod) is nn.PReLU:
        return "prelu", (x, p("weight"))
    if type(mod) in (nn.Softmax, nn.LogSoftmax):
        return ("softmax" if type(mod) is nn.Softmax else "log_softmax"), (x, mod.dim)
    if elementwise_info(mod) is not None:
        return "elementwise_module", (x,)
    pools = {
        nn.MaxPool1d: "max_pool1d", nn.MaxPool2d: "max_pool2d", nn.MaxPool3d: "max_pool3d",
        nn.AvgPool1d: "avg_pool1d", nn.AvgPool2d: "avg_pool2d", nn.AvgPool3d: "avg_pool3d",
        nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d", nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
        nn.AdaptiveAvgPool3d: "adaptive_avg_pool3d", nn.AdaptiveMaxPool1d: "adaptive_max_pool1d",
        nn.AdaptiveMaxPool2d: "adaptive_max_pool2d", nn.AdaptiveMaxPool3d: "adaptive_max_pool3d",
    }  # fmt: skip
    if type(mod) in pools:
        return pools[type(mod)], (x,)
    return None


_FX_RENAME = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "iadd": "add",
    "imul": "mul",
    "isub": "sub",
    "itruediv": "div",
}
_FX_VARARGS = {"view", "reshape", "permute", "expand", "repeat", "tile"}


def _trace_fx(model: nn.Module, args: tuple[Any, ...]) -> Traced:
    # non-tensor arguments (flags, sizes) are traced as the constants they are
    names = list(inspect.signature(model.forward).parameters)
    concrete = {n: a for n, a in zip(names, args) if not isinstance(a, torch.Tensor)}
    gm = torch.fx.symbolic_trace(model, concrete_args=concrete or None)
    results: dict[str, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            results[n.name] = out
            return out

        def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
            # the leaf's own forward, as the graph records it: the user's forward hooks
            # are not the trace's to run (a hook that collects activations would get a
            # spurious call, and only on the first read of a structure)
            return self.fetch_attr(target).forward(*args, **kwargs)

    _Recorder(gm).run(*args)
    tensor_fqns = {id(t): fqn for fqn, t in model.named_parameters(remove_duplicate=False)}
    tensor_fqns.update({id(t): fqn for fqn, t in model.named_buffers(remove_duplicate=False)})
    tensors: dict[str, tuple[str, Shape]] = {}
    constants: dict[str, tuple[str, Shape]] = {}
    inputs: list[tuple[str, Shape | None]] = []
    nodes: list[TracedNode] = []
    # non-tensor results (sizes read from tensors, ints) are folded into the arguments
    folded = {
        k: v
        for k, v in results.items()
        if not isinstance(v, torch.Tensor) and _shape(v) is None and not isinstance(v, nn.Module)
    }
    for node in gm.graph.nodes:  # a parameter read by get_attr is the same value
        t = results.get(node.name)
        if node.op == "placeholder" and node.name != node.target and isinstance(t, torch.Tensor):
            folded[node.name] = Ref(str(node.target))  # the forward's own argument name
        if node.op == "get_attr" and isinstance(t, torch.Tensor) and id(t) in tensor_fqns:
            folded[node.name] = Ref(tensor_fqns[id(t)])
    outputs: tuple[Any, ...] = ()
    for name, mod in model.named_modules(remove_duplicate=False):
        for attr in list(mod._parameters) + list(mod._buffers):
            t = getattr(mod, attr)
            if isinstance(t, torch.Tensor):
                fqn = f"{name}.{attr}" if name else attr
                tensors.setdefault(fqn, (tensor_fqns.get(id(t), fqn), tuple(t.shape)))
    for node in gm.graph.nodes:
        out = results.get(node.name)
        shape = _shape(out)
        if node.op == "placeholder":
            inputs.append((str(node.target), shape))
            continue
        if node.op == "get_attr":
            if node.name not in folded and shape is not None:
                constants[node.name] = (str(node.target), shape)
            continue
        if node.op == "output":
            outs = torch.utils._pytree.tree_leaves(node.args[0])  # as export flattens them
            outputs = tuple(_convert(o, folded) for o in outs)
            continue
        if node.name in folded:
            continue
        owner, mtype = _owner(node)
        args_ = _convert(node.args, folded)
        kwargs = _convert(dict(node.kwargs), folded)
        if node.op == "call_module":
            mod = model.get_submodule(str(node.target))
            owner, mtype = str(node.target), type(mod).__name__
            call = _module_call(mod, args_[0] if args_ else None, owner)
            op, args_ = call if call is not None else (f"module::{mtype}", args_)
            kwargs = {}
        elif node.op == "call_method":
            op = str(node.target)
            if op in _FX_VARARGS and len(args_) > 1 and not isinstance(args_[1], (list, tuple)):
                args_ = (args_[0], list(args_[1:]))
        else:
            target = node.target
            op = _op_name(target)
            op = _FX_RENAME.get(op, op)
            if target is torch.nn.functional.batch_norm:  # (x, mean, var, weight, bias, ...)
                x, rm, rv, *rest = args_
                w, b = (
                    ([*rest, kwargs.get("weight"), kwargs.get("bias")])[:2]
                    if len(rest) < 2
                    else rest[:2]
                )
                args_, kwargs = (x, w, b, rm, rv), {}
            elif target is operator.getitem and isinstance(
                results.get(node.args[0].name), torch.Tensor
            ):  # type: ignore[union-attr]
                op = "tensor_getitem"
        nodes.append(TracedNode(node.name, op, tuple(args_), kwargs, owner, mtype, shape))
    return Traced("torch.fx", tuple(inputs), tensors, constants, tuple(nodes), outputs)


_TRACERS: dict[str, Callable[[nn.Module, tuple[Any, ...]], Traced]] = {
    "export": _trace_export,
    "fx": _trace_fx,
}


def trace(model: nn.Module, args: tuple[Any, ...], tracer: Tracer = "auto") -> Traced:
    """Trace ``model(*args)`` without changing the model (see the module docstring).

    Raises:
        ValueError: ``tracer`` is unknown, or tracing failed (the message gives each
            tracer's error).
    """
    if tracer not in ("auto", "export", "fx"):
        raise ValueError(f"tracer must be 'auto', 'export' or 'fx', got {tracer!r}")
    order = ("export", "fx") if tracer == "auto" else (tracer,)
    errors: list[str] = []
    for name in order:
        try:
            # the forward runs on fake tensors (export) or once more (fx): its warnings
            # are the tracer's business, and a warning turned into an error by a filter
            # must not make the trace fail over to the other tracer
            with _untouched(model), tracing(model), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _TRACERS[name](model, args)
        except Exception as exc:  # any tracer failure: try the next, report all
            label = (
                "torch.export.export(strict=False)"
                if name == "export"
                else "torch.fx.symbolic_trace"
            )
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"{label} failed with {type(exc).__name__}: {first[:300]}")
    raise ValueError(
        f"could not trace {type(model).__name__}: "
        + "; ".join(errors)
        + ". Make the forward traceable (no data-dependent Python control flow on tensor "
        "values), or pass example_inputs that the forward accepts"
    )
