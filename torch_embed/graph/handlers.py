"""Per module class: the shape attributes to patch when a module's tensors grow.

When a width group grows, the apply step gives every module it touches new parameter
and buffer tensors. Modules also keep their sizes in plain attributes
(``Linear.in_features``, ``Conv2d.groups``, ``LayerNorm.normalized_shape``,
``MultiheadAttention.head_dim``, ...) that ``extra_repr``, ``load_state_dict`` checks and
sometimes ``forward`` read, so those must follow. A *handler*, registered per module
class and found along the class's MRO (subclasses inherit it), turns a :class:`Resize`
(the new shapes of the module's own tensors, optionally the new shape of its input and
the new number of channel groups) into the attribute updates to make.

:func:`attribute_updates` computes the updates without touching the module, so the
apply step can compute all of them first, then set them with :func:`set_attributes`,
which returns the old values to set back if anything later fails.

Built in: ``Linear``, ``Bilinear``, ``Conv``/``ConvTranspose`` 1d-3d, ``BatchNorm``/
``InstanceNorm``/``SyncBatchNorm``, ``GroupNorm``, ``LayerNorm``, ``RMSNorm``,
``MultiheadAttention``, ``Embedding``, ``EmbeddingBag``, ``PReLU``; ``transformers``'
``Conv1D`` and LLaMA/Qwen2/Mistral RMSNorms are registered by
:mod:`torch_embed.graph.hf` when the first module of that package is looked up (so
``import torch_embed`` does not import ``transformers``). A module of any other
class whose own tensors change shape is accepted with nothing to patch when none of its
plain attributes holds one of the sizes that change (timm's ``LayerScale``, a model's own
position embedding or cls token: their tensors' shapes are all there is to their width),
and refused with a ``ValueError`` that names those attributes and asks for
:func:`register_handler` when one does (``self.dim = 32``: it would go stale).
Handlers patch *shape* attributes only: values such as a LayerNorm's ``eps`` rescaled
by a mean-fill are the planner's to set.

Example: a depthwise convolution grows from 8 to 11 channels (``groups`` follows):

>>> from torch import nn
>>> conv = nn.Conv2d(8, 8, 3, groups=8)
>>> attribute_updates(conv, Resize({"weight": (11, 1, 3, 3), "bias": (11,)}, (2, 11, 5, 5)))
{'in_channels': 11, 'out_channels': 11, 'groups': 11}
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeVar

import torch
from torch import nn

__all__ = [
    "Handler",
    "Resize",
    "attribute_updates",
    "handler_for",
    "no_attributes",
    "register_handler",
    "set_attributes",
]


def _shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list | torch.Size) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise TypeError(f"Resize: {what} must be a tuple of ints, got {value!r}")
    if any(d < 1 for d in value):
        raise ValueError(f"Resize: {what} must have positive sizes, got {tuple(value)}")
    return tuple(value)


@dataclass(frozen=True)
class Resize:
    """What the apply step knows about one module's new sizes.

    Attributes:
        shapes: The new shape of each of the module's own parameters and buffers that
            changes, by local name (``{"weight": (out, in_per_group, *kernel)}``).
            Tensors not listed keep their current shape.
        input_shape: The new shape of the tensor the module reads (first positional
            argument), when known. Needed where no tensor shows a size: a LayerNorm
            or GroupNorm without affine parameters, a grouped conv's input channels.
        groups: The new number of channel groups where the planner chooses it: a conv's
            ``groups``, GroupNorm's ``num_groups``, MultiheadAttention's ``num_heads``.
            ``None`` keeps the current number (a conv derives it from ``input_shape``).

    Example:
        >>> import torch
        >>> Resize.from_tensors({"weight": torch.zeros(6, 3)}).shapes["weight"]
        (6, 3)
    """

    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    groups: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shapes, Mapping):
            raise TypeError(f"Resize: shapes must be a mapping, got {type(self.shapes)}")
        shapes = {}
        for name, shape in self.shapes.items():
            if not isinstance(name, str):
                raise TypeError(f"Resize: tensor names must be str, got {name!r}")
            shapes[name] = _shape(shape, f"shapes[{name!r}]")
        object.__setattr__(self, "shapes", MappingProxyType(shapes))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", _shape(self.input_shape, "input_shape"))
        if self.groups is not None and (
            not isinstance(self.groups, int) or isinstance(self.groups, bool) or self.groups < 1
        ):
            raise ValueError(f"Resize: groups must be a positive int or None, got {self.groups!r}")

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        input_shape: tuple[int, ...] | None = None,
        groups: int | None = None,
    ) -> Resize:
        """A :class:`Resize` with the shapes of the new tensors themselves."""
        return cls({k: tuple(t.shape) for k, t in tensors.items()}, input_shape, groups)

    def shape(self, module: nn.Module, name: str) -> tuple[int, ...] | None:
        """The new shape of ``module``'s own tensor ``name``; ``None`` if it has none."""
        if name in self.shapes:
            return self.shapes[name]
        tensor = getattr(module, name, None)
        return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None


class Handler(Protocol):
    """Computes a module's shape-attribute updates from its :class:`Resize`.

    Called with the module before its attributes are patched (its tensors may already
    be the new ones); returns ``{attribute: new value}`` for existing attributes only,
    and raises ``ValueError`` when the new shapes are inconsistent.
    """

    def __call__(self, module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
        """Return the attribute updates for ``module``."""
        ...


_HANDLERS: dict[type[nn.Module], Handler] = {}


def register_handler(cls: type[nn.Module], handler: Handler) -> None:
    """Register the attribute handler of a module class (and its subclasses).

    A later registration for the same class replaces the earlier one; a subclass's own
    registration wins over its base class's.

    Args:
        cls: An ``nn.Module`` subclass (not ``nn.Module`` itself).
        handler: A callable ``(module, resize) -> {attribute: value}``.

    Raises:
        TypeError: If ``cls`` is not an ``nn.Module`` subclass or ``handler`` is not
            callable.
        ValueError: If ``cls`` is ``nn.Module`` itself (it would cover every module).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Scale(nn.Module):
        ...     def __init__(self, dim: int) -> None:
        ...         super().__init__()
        ...         self.dim = dim
        ...         self.gamma = nn.Parameter(torch.ones(dim))
        >>> attribute_updates(Scale(4), Resize({"gamma": (6,)}))
        Traceback (most recent call last):
        ValueError: Scale module: ... attributes ['dim=4'] hold the old sizes; ...
        >>> register_handler(Scale, lambda module, resize: {"dim": resize.shapes["gamma"][0]})
        >>> attribute_updates(Scale(4), Resize({"gamma": (6,)}))
        {'dim': 6}
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_handler expects an nn.Module subclass, got {cls!r}")
    if cls is nn.Module:
        raise ValueError(
            "register_handler(nn.Module, ...) would apply to every module class; "
            "register the handler for your own module class"
        )
    if not callable(handler):
        raise TypeError(
            f"register_handler({cls.__name__}, handler): handler must be callable "
            f"(module, resize) -> {{attribute: value}}, got {handler!r}"
        )
    _HANDLERS[cls] = handler


#: Packages whose module classes get handlers on first sight: ``{package: module}``,
#: where ``module.register_handlers()`` registers them (imports the package itself, so
#: ``import torch_embed`` does not).
_LAZY = {"transformers": "torch_embed.graph.hf"}


def handler_for(module: nn.Module) -> Handler | None:
    """The handler registered for ``type(module)`` or its nearest base class, if any."""
    package = type(module).__module__.partition(".")[0]
    if package in _LAZY:
        importlib.import_module(_LAZY.pop(package)).register_handlers()
    for klass in type(module).__mro__:
        handler = _HANDLERS.get(klass)
        if handler is not None:
            return handler
    return None


def _own_tensors(module: nn.Module) -> set[str]:
    names = {n for n, _ in module.named_parameters(recurse=False)}
    return names | {n for n, _ in module.named_buffers(recurse=False)}


def _size_attributes(module: nn.Module, resize: Resize) -> list[str]:
    """``module``'s plain int (or int tuple) attributes equal to a size that changes.

    A module without a handler may still keep a width in an attribute (``self.dim``)
    that its ``forward`` or ``extra_repr`` reads; those are the ones that would go
    stale. Sizes that do not change (the other axes of the tensors) are not suspects.
    """
    changing: set[int] = set()
    for name, new in resize.shapes.items():
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            changing |= {old for old, n in zip(tensor.shape, new, strict=False) if old != n}
            if tensor.dim() != len(new):
                changing |= set(tensor.shape)
    suspects = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or isinstance(value, bool):
            continue
        values = value if isinstance(value, tuple | list) else (value,)
        if any(isinstance(v, int) and not isinstance(v, bool) and v in changing for v in values):
            suspects.append(f"{attr}={value!r}")
    return sorted(suspects)


def attribute_updates(module: nn.Module, resize: Resize, *, name: str = "") -> dict[str, object]:
    """The shape attributes of ``module`` to set for the new sizes in ``resize``.

    Nothing is modified. A module with no registered handler gets no updates unless one
    of its plain int attributes equals a size that changes; then it is refused.

    Args:
        module: The module whose tensors change.
        resize: Its new tensor shapes (and input shape, groups where needed).
        name: The module's FQN, for messages.

    Returns:
        ``{attribute: new value}``, ready for :func:`set_attributes`.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module`` or ``resize`` not a
            :class:`Resize`, or a handler returns something else than a mapping of
            existing attribute names.
        ValueError: If ``resize`` names a tensor the module does not own, the class has
            no handler but an attribute holds a size that changes, or the new shapes are
            inconsistent.

    Example:
        >>> from torch import nn
        >>> attribute_updates(nn.LayerNorm(4), Resize({"weight": (6,), "bias": (6,)}))
        {'normalized_shape': (6,)}
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"attribute_updates expects an nn.Module, got {type(module)}")
    if not isinstance(resize, Resize):
        raise TypeError(f"attribute_updates expects a Resize, got {type(resize)}")
    cls = type(module).__name__
    where = f"module {name!r} ({cls})" if name else f"{cls} module"
    own = _own_tensors(module)
    unknown = sorted(set(resize.shapes) - own)
    if unknown:
        raise ValueError(
            f"{where} has no parameter or buffer {unknown}; its own tensors are {sorted(own)}"
        )
    handler = handler_for(module)
    if handler is None:
        suspects = _size_attributes(module, resize)
        if not suspects:
            return {}
        raise ValueError(
            f"{where}: its tensors {sorted(resize.shapes)} would change shape, and its "
            f"attributes {suspects} hold the old sizes; torch_embed does not know whether "
            f"they must follow. Register a handler: "
            f"torch_embed.graph.handlers.register_handler({cls}, handler) "
            f"(no_attributes if the tensors' shapes are its only sizes)"
        )
    try:
        updates = handler(module, resize)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    if not isinstance(updates, Mapping):
        raise TypeError(f"the handler of {cls} returned {type(updates)}, not a mapping")
    for attr in updates:
        if not isinstance(attr, str) or attr in own or not hasattr(module, attr):
            raise TypeError(
                f"the handler of {cls} returned an update for {attr!r}, which is not an "
                f"existing non-tensor attribute of {where}"
            )
    return dict(updates)


def set_attributes(module: nn.Module, updates: Mapping[str, object]) -> dict[str, object]:
    """Set ``updates`` on ``module``; return the old values (set them back to undo).

    If setting one attribute fails, those already set are restored before the error
    propagates, so the module is left as it was.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(3, 4)
        >>> old = set_attributes(lin, {"out_features": 6})
        >>> lin.out_features, old
        (6, {'out_features': 4})
        >>> _ = set_attributes(lin, old)
        >>> lin.out_features
        4
    """
    old: dict[str, object] = {}
    try:
        for attr, value in updates.items():
            before = getattr(module, attr)
            setattr(module, attr, value)
            old[attr] = before
    except BaseException:
        for attr, value in reversed(old.items()):
            setattr(module, attr, value)
        raise
    return old


# ----------------------------------------------------------------------------- handlers
# Handlers raise plain ValueErrors; attribute_updates prefixes the module's name and class.
def no_attributes(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    """Handler for modules whose tensors' shapes are their only sizes (layer scale)."""
    return {}


def _required(module: nn.Module, resize: Resize, name: str, ndim: int) -> tuple[int, ...]:
    shape = resize.shape(module, name)
    if shape is None or len(shape) != ndim:
        raise ValueError(f"expected a {ndim}-d tensor {name!r}, got shape {shape}")
    return shape


def _expect(module: nn.Module, resize: Resize, name: str, expected: tuple[int, ...]) -> None:
    shape = resize.shape(module, name)
    if shape is not None and shape != expected:
        raise ValueError(f"{name!r} has shape {shape}, inconsistent with {expected}")


_M = TypeVar("_M", bound=nn.Module)


def _as(module: nn.Module, cls: type[_M]) -> _M:
    if not isinstance(module, cls):
        raise TypeError(f"the {cls.__name__} handler got a {type(module).__name__}")
    return module


def _linear(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    out, in_ = _required(module, resize, "weight", 2)
    _expect(module, resize, "bias", (out,))
    return {"in_features": in_, "out_features": out}


def _bilinear(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    out, in1, in2 = _required(module, resize, "weight", 3)
    _expect(module, resize, "bias", (out,))
    return {"in1_features": in1, "in2_features": in2, "out_features": out}


def _conv(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    conv = _as(module, nn.modules.conv._ConvNd)
    kernel = tuple(conv.kernel_size)
    weight = _required(conv, resize, "weight", 2 + len(kernel))
    if weight[2:] != kernel:
        raise ValueError(f"the kernel must stay {kernel}, got weight shape {weight}")
    # the input's channel count: unbatched (C, *spatial) or batched (N, C, *spatial)
    in_shape = resize.input_shape
    channels_in: int | None = None
    if in_shape is not None:
        axis = len(in_shape) - len(kernel) - 1
        if axis not in (0, 1):
            raise ValueError(f"input shape {in_shape} does not fit kernel {kernel}")
        channels_in = in_shape[axis]
    if resize.groups is not None:
        groups = resize.groups
    elif channels_in is not None and not conv.transposed:
        if channels_in % weight[1]:
            raise ValueError(f"{channels_in} input channels, {weight[1]} per group")
        groups = channels_in // weight[1]
    elif conv.groups == 1:
        groups = 1
    else:
        raise ValueError(
            f"a grouped conv (groups={conv.groups}) cannot tell its new groups from its "
            "weight alone; pass Resize(groups=...) or its input_shape",
        )
    if conv.transposed:
        in_, out = weight[0], weight[1] * groups
    else:
        out, in_ = weight[0], weight[1] * groups
    if in_ % groups or out % groups:
        raise ValueError(f"{in_} in and {out} out channels do not split in {groups} groups")
    if channels_in is not None and channels_in != in_:
        raise ValueError(f"input shape {in_shape} has not {in_} channels")
    _expect(conv, resize, "bias", (out,))
    return {"in_channels": in_, "out_channels": out, "groups": groups}


def _channels(module: nn.Module, resize: Resize, names: tuple[str, ...], batch_dims: int) -> int:
    """The new channel count from per-channel tensors, else from the input shape."""
    shapes = {n: s for n in names if (s := resize.shape(module, n)) is not None}
    if shapes:
        channels = next(iter(shapes.values()))[0]
        for n, s in shapes.items():
            if s != (channels,):
                raise ValueError(f"{n!r} has shape {s}, other tensors give {channels}")
        return channels
    if resize.input_shape is None or len(resize.input_shape) <= batch_dims:
        raise ValueError("without affine parameters it needs Resize(input_shape=...)")
    return resize.input_shape[batch_dims]


def _batch_norm(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    batch = 1
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and resize.input_shape:
        batch = int(len(resize.input_shape) != module._get_no_batch_dim())
    names = ("weight", "bias", "running_mean", "running_var")
    return {"num_features": _channels(module, resize, names, batch)}


def _group_norm(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    channels = _channels(module, resize, ("weight", "bias"), 1)
    old_groups = _as(module, nn.GroupNorm).num_groups
    groups = resize.groups if resize.groups is not None else old_groups
    if channels % groups:
        raise ValueError(
            f"{channels} channels do not split in num_groups={groups}; grow every group "
            "equally or pass Resize(groups=...) to duplicate whole groups",
        )
    return {"num_channels": channels, "num_groups": groups}


def _layer_norm(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    norm = module if isinstance(module, nn.LayerNorm) else _as(module, nn.RMSNorm)
    old = tuple(norm.normalized_shape)
    shape = resize.shape(module, "weight")
    if shape is None:
        if resize.input_shape is None or len(resize.input_shape) < len(old):
            raise ValueError("without affine parameters it needs Resize(input_shape=...)")
        shape = resize.input_shape[len(resize.input_shape) - len(old) :]
    if len(shape) != len(old):
        raise ValueError(f"normalized_shape {old} cannot become {shape}")
    _expect(module, resize, "bias", shape)
    return {"normalized_shape": shape}


def _multihead_attention(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    mha = _as(module, nn.MultiheadAttention)
    if mha._qkv_same_embed_dim:
        rows, embed = _required(module, resize, "in_proj_weight", 2)
        if rows != 3 * embed:
            raise ValueError(
                f"in_proj_weight must be (3E, E), got {(rows, embed)}: embed_dim is both "
                f"the width of the attention's input and num_heads × head_dim, so its heads "
                f"or head_dim grow only together with its input's width group (to "
                f"{rows // 3} here)"
            )
        kdim = vdim = embed
    else:
        embed, _ = _required(module, resize, "q_proj_weight", 2)
        _expect(module, resize, "q_proj_weight", (embed, embed))
        kdim = _required(module, resize, "k_proj_weight", 2)[1]
        vdim = _required(module, resize, "v_proj_weight", 2)[1]
        _expect(module, resize, "k_proj_weight", (embed, kdim))
        _expect(module, resize, "v_proj_weight", (embed, vdim))
    _expect(module, resize, "in_proj_bias", (3 * embed,))
    _expect(module, resize, "bias_k", (1, 1, embed))
    _expect(module, resize, "bias_v", (1, 1, embed))
    heads = resize.groups if resize.groups is not None else mha.num_heads
    if embed % heads:
        raise ValueError(f"embed_dim {embed} does not split in num_heads={heads}")
    return {
        "embed_dim": embed,
        "kdim": kdim,
        "vdim": vdim,
        "num_heads": heads,
        "head_dim": embed // heads,
    }


def _embedding(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    num, dim = _required(module, resize, "weight", 2)
    emb = module if isinstance(module, nn.Embedding) else _as(module, nn.EmbeddingBag)
    padding_idx = emb.padding_idx
    if padding_idx is not None and not 0 <= padding_idx < num:
        raise ValueError(f"padding_idx {padding_idx} is outside {num} embeddings")
    return {"num_embeddings": num, "embedding_dim": dim}


def _prelu(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    return {"num_parameters": _required(module, resize, "weight", 1)[0]}


for _cls, _handler in [
    (nn.Linear, _linear),
    (nn.Bilinear, _bilinear),
    (nn.modules.conv._ConvNd, _conv),
    (nn.modules.batchnorm._NormBase, _batch_norm),
    (nn.GroupNorm, _group_norm),
    (nn.LayerNorm, _layer_norm),
    (nn.MultiheadAttention, _multihead_attention),
    (nn.Embedding, _embedding),
    (nn.EmbeddingBag, _embedding),
    (nn.PReLU, _prelu),
]:
    register_handler(_cls, _handler)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_handler(nn.RMSNorm, _layer_norm)
