"""Hugging Face ``transformers`` models on the traced path: tracing, handlers, config.

Three things make a ``transformers`` model widen like any other traced model:

- **Tracing.** A causal LM returns a ``DynamicCache`` that ``torch.export`` cannot
  flatten. :func:`tracing` turns ``config.use_cache`` off while the model is traced
  (and puts it back), so users still pass ``(input_ids,)`` and the trace holds the
  logits only.
- **Handlers** (:mod:`torch_embed.graph.handlers`) for the module classes whose sizes
  live in attributes: ``transformers.pytorch_utils.Conv1D`` (GPT-2; its weight is
  ``(in, out)``: ``nx``, ``nf``) and the LLaMA, Qwen2, Mistral, Qwen3, Phi-3 and Gemma 1-3
  RMSNorms (no shape attribute; eps is ``variance_epsilon`` or ``eps``). They
  are registered by
  :func:`register_handlers` the first time a handler is looked up for a module of the
  ``transformers`` package, so ``import torch_embed`` never imports ``transformers``.
- **Attributes copied from the config** in ``__init__`` that no own tensor shows and
  ``forward`` reads: GPT-2's ``split_size``, BERT's ``attention_head_size``, LLaMA's
  and Qwen2's ``num_key_value_groups`` (eager attention), the MLPs' sizes
  (:func:`transformers_updates`).
- **Config fields.** :func:`config_updates` gives the new ``hidden_size``,
  ``intermediate_size`` (``n_inner``), ``num_attention_heads``,
  ``num_key_value_heads``, ``head_dim`` and eps fields of a widened BERT, GPT-2,
  LLaMA, Qwen2, Mistral, Qwen3, Phi-3 or Gemma (1, 2, 3 text) model, read from its new tensor
  shapes and module attributes. They are checked by building the model class from the
  new config on the ``meta`` device and comparing every parameter and buffer shape and
  every float attribute its modules derive from the config (Gemma's embedding scale
  ``√hidden_size``): only a config that rebuilds the widened model is set (so
  ``save_pretrained``/``from_pretrained`` round-trips). Per-layer widths, which one
  config number cannot hold, leave the config as it was, with a ``UserWarning`` that
  says why.
- **Norms that scale by ``1 + weight``** (Gemma's RMSNorms, found by
  :func:`scales_by_one_plus_weight`; :func:`norm_offsets` names them for the planner):
  the zero-fill's gain on ``γ`` is an affine map of the stored weight,
  ``w' = √(D/D')·(1 + w) − 1`` (:attr:`torch_embed.graph.gather.AxisMap.shift`).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from torch_embed.graph.handlers import Resize, register_handler

__all__ = [
    "config_updates",
    "is_transformers_model",
    "norm_offsets",
    "register_handlers",
    "scales_by_one_plus_weight",
    "tracing",
    "transformers_updates",
]


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (never imports transformers)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    return isinstance(model, transformers.PreTrainedModel)


@contextmanager
def tracing(model: nn.Module) -> Iterator[None]:
    """Trace a ``transformers`` model with ``config.use_cache`` off, then put it back.

    The cache is a second output ``torch.export`` cannot flatten, and the logits do not
    depend on it; only a ``PreTrainedModel`` itself has the config to switch. The HF
    RMSNorms, written out in their forward (``pow``, ``mean``, ``rsqrt``, ``mul`` around
    float32 casts), are recognised as RMSNorm by the op rules (graph/ops.py) like any
    hand-written RMSNorm.
    """
    if "transformers" not in sys.modules:
        yield
        return
    config = getattr(model, "config", None) if is_transformers_model(model) else None
    cache = config is not None and getattr(config, "use_cache", False)
    try:
        if cache:
            config.use_cache = False  # type: ignore[union-attr]
        yield
    finally:
        if cache:
            config.use_cache = True  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- handlers
def _conv1d(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    """``transformers.pytorch_utils.Conv1D``: weight ``(nx, nf)``, bias ``(nf,)``."""
    shape = resize.shape(module, "weight")
    if shape is None or len(shape) != 2:
        raise ValueError(f"expected a 2-d weight (nx, nf), got shape {shape}")
    nx, nf = shape
    bias = resize.shape(module, "bias")
    if bias is not None and bias != (nf,):
        raise ValueError(f"'bias' has shape {bias}, inconsistent with weight (nx, nf) = {shape}")
    return {"nx": nx, "nf": nf}


def _rms_norm(module: nn.Module, resize: Resize, /) -> Mapping[str, object]:
    """``LlamaRMSNorm`` and its copies: the weight's shape is its only size."""
    shape = resize.shape(module, "weight")
    if shape is None or len(shape) != 1:
        raise ValueError(f"expected a 1-d weight, got shape {shape}")
    return {}


#: ``(module path, class name)`` of the RMSNorm classes registered with :func:`_rms_norm`.
_RMS_NORMS = (
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
    ("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm"),
    ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm"),
    ("transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm"),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm"),
)


def register_handlers() -> None:
    """Register the handlers of ``transformers``' module classes (imports transformers).

    Called by :func:`torch_embed.graph.handlers.handler_for` the first time it meets a
    module of the ``transformers`` package; calling it again registers them again.

    Raises:
        ImportError: ``transformers`` is not installed.
    """
    import importlib

    pytorch_utils = importlib.import_module("transformers.pytorch_utils")
    register_handler(pytorch_utils.Conv1D, _conv1d)
    for path, name in _RMS_NORMS:
        try:
            cls = getattr(importlib.import_module(path), name)
        except (ImportError, AttributeError):  # a transformers without this model
            continue
        register_handler(cls, _rms_norm)


# ----------------------------------------------------------------------------- config
class _View:
    """The widened model as it will be: new tensor shapes and module attributes."""

    def __init__(
        self,
        model: nn.Module,
        shapes: Mapping[str, tuple[int, ...]],
        attrs: Mapping[int, Mapping[str, object]],
    ) -> None:
        self.model = model
        self.shapes = dict(shapes)
        self.attrs = attrs
        self.state = [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
        self.current = dict(self.state)

    def shape(self, fqn: str, tensor: torch.Tensor | None = None) -> tuple[int, ...]:
        """The new shape of the tensor ``fqn`` (``tensor``: the tensor, if at hand)."""
        if fqn in self.shapes:
            return self.shapes[fqn]
        return tuple((tensor if tensor is not None else self.current[fqn]).shape)

    def sizes(self, pattern: str, axis: int) -> list[int]:
        """The new size of ``axis`` of every tensor whose FQN matches ``pattern``."""
        rx = re.compile(pattern)
        return [self.shape(n, t)[axis] for n, t in self.state if rx.search(n)]

    def attr(self, module: nn.Module, name: str) -> Any:
        return self.attrs.get(id(module), {}).get(name, getattr(module, name))

    def module_attrs(self, pattern: str, name: str) -> list[Any]:
        """The new value of attribute ``name`` of every module whose FQN or class matches."""
        rx = re.compile(pattern)
        return [
            self.attr(m, name)
            for fqn, m in self.model.named_modules()
            if (rx.search(fqn) or rx.fullmatch(type(m).__name__)) and hasattr(m, name)
        ]


def _llama(v: _View) -> dict[str, list[Any]]:
    head_dims = v.module_attrs(r"\.self_attn$", "head_dim")
    q = v.sizes(r"\.self_attn\.q_proj\.weight$", 0)
    k = v.sizes(r"\.self_attn\.k_proj\.weight$", 0)
    return {
        "hidden_size": v.sizes(r"embed_tokens\.weight$", 1),
        "intermediate_size": v.sizes(r"\.mlp\.up_proj\.weight$", 0),
        "num_attention_heads": [r / d for r, d in zip(q, head_dims)],
        "num_key_value_heads": [r / d for r, d in zip(k, head_dims)],
        "head_dim": head_dims,  # after the heads: its default is hidden_size // heads
        "rms_norm_eps": _rms_eps(v),
    }


def _rms_eps(v: _View) -> list[Any]:
    """The eps of every RMSNorm: ``variance_epsilon`` (LLaMA, Qwen, Phi-3) or ``eps`` (Gemma)."""
    return [*v.module_attrs(r".*RMSNorm", "variance_epsilon"), *v.module_attrs(r".*RMSNorm", "eps")]


def _phi3(v: _View) -> dict[str, list[Any]]:
    """Phi-3: q, k, v fused in ``qkv_proj``, gate and up in ``gate_up_proj``.

    ``qkv_proj`` has ``(heads + 2·kv_heads)·head_dim`` rows, ``o_proj``
    ``heads·head_dim`` columns, ``gate_up_proj`` ``2·intermediate_size`` rows.
    """
    head_dims = v.module_attrs(r"\.self_attn$", "head_dim")
    qkv = v.sizes(r"\.self_attn\.qkv_proj\.weight$", 0)
    o = v.sizes(r"\.self_attn\.o_proj\.weight$", 1)
    return {
        "hidden_size": v.sizes(r"embed_tokens\.weight$", 1),
        "intermediate_size": [r / 2 for r in v.sizes(r"\.mlp\.gate_up_proj\.weight$", 0)],
        "num_attention_heads": [c / d for c, d in zip(o, head_dims)],
        "num_key_value_heads": [(r - c) / (2 * d) for r, c, d in zip(qkv, o, head_dims)],
        "head_dim": head_dims,  # Phi3Config has none: read as hidden_size // heads
        "rms_norm_eps": _rms_eps(v),
    }


def _gpt2(v: _View) -> dict[str, list[Any]]:
    return {
        "n_embd": v.sizes(r"wte\.weight$", 1),
        "n_inner": v.sizes(r"\.mlp\.c_fc\.weight$", 1),
        "n_head": v.module_attrs(r"\.attn$", "num_heads"),
        "layer_norm_epsilon": v.module_attrs("LayerNorm", "eps"),
    }


def _bert(v: _View) -> dict[str, list[Any]]:
    return {
        "hidden_size": v.sizes(r"word_embeddings\.weight$", 1),
        "intermediate_size": v.sizes(r"\.intermediate\.dense\.weight$", 0),
        "num_attention_heads": v.module_attrs(r"\.attention\.self$", "num_attention_heads"),
        "layer_norm_eps": v.module_attrs("LayerNorm", "eps"),
    }


def _get(config: Any, new: Mapping[str, object], field: str) -> int:
    value: Any = new.get(field, getattr(config, field))
    return int(value)


#: Fields a model reads with a default when the config has none (or ``None``): the
#: default, from the config and the fields already updated. Qwen2Config declares no
#: ``head_dim``, but Qwen2Attention reads ``getattr(config, "head_dim", ...)``.
_READ_WITH_DEFAULT: dict[str, Callable[[Any, Mapping[str, object]], int]] = {
    "n_inner": lambda c, new: 4 * _get(c, new, "n_embd"),
    "head_dim": lambda c, new: _get(c, new, "hidden_size") // _get(c, new, "num_attention_heads"),
}

#: How each ``config.model_type``'s size fields are read from the widened model.
_FIELDS: dict[str, Callable[[_View], dict[str, list[Any]]]] = {
    "llama": _llama,
    "qwen2": _llama,
    "mistral": _llama,
    "qwen3": _llama,
    "gemma": _llama,
    "gemma2": _llama,
    "gemma3_text": _llama,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "bert": _bert,
}


def _mismatches(model: nn.Module, config: Any, view: _View) -> list[str]:
    """What differs between the widened model and one built from ``config``.

    Every parameter and buffer shape, and every float attribute a module derives from
    the config in ``__init__`` (Gemma's embedding scale ``√hidden_size``, an attention's
    ``scaling``, a norm's eps): a model rebuilt with another constant computes another
    function, and on the ``meta`` device only the attributes show the constants.
    """
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        fresh = type(model)(config)
    shapes = {
        n: tuple(t.shape)
        for n, t in [
            *fresh.named_parameters(remove_duplicate=False),
            *fresh.named_buffers(remove_duplicate=False),
        ]
    }
    out = []
    for name, tensor in view.state:
        want = view.shape(name, tensor)
        got = shapes.get(name)
        if got != want:
            out.append(f"`{name}` is {want}, the config builds {got}")
    modules = dict(fresh.named_modules())
    for fqn, module in model.named_modules():
        twin = modules.get(fqn)
        for attr, value in vars(module).items() if twin is not None else ():
            built = vars(twin).get(attr)
            if not isinstance(value, float) or not isinstance(built, float):
                continue
            now = view.attr(module, attr)
            if not math.isclose(now, built, rel_tol=1e-12):
                out.append(f"`{fqn}.{attr}` is {now:.6g}, the config builds {built:.6g}")
    return out


def _gpt2_attention(v: _View, fqn: str, m: nn.Module) -> dict[str, object]:
    """GPT-2 splits ``c_attn``'s output into q, k, v by ``split_size`` (= heads·head_dim)."""
    if getattr(m, "is_cross_attention", True):  # c_attn holds k, v only; q_attn holds q
        return {}
    return {"split_size": v.shape(f"{fqn}.c_attn.weight")[1] // 3}


def _bert_attention(v: _View, fqn: str, m: nn.Module) -> dict[str, object]:
    """BERT views q, k, v as ``(..., -1, attention_head_size)``."""
    rows = v.shape(f"{fqn}.query.weight")[0]
    heads = int(v.attr(m, "num_attention_heads"))
    return {"all_head_size": rows, "attention_head_size": rows // heads}


def _gqa_attention(v: _View, fqn: str, m: nn.Module) -> dict[str, object]:
    """LLaMA-style attention repeats each kv head ``num_key_value_groups`` times.

    The eager attention path reads it; the sdpa path lets ``enable_gqa`` infer it, so a
    stale value would only show after switching ``attn_implementation``.
    """
    q = v.shape(f"{fqn}.q_proj.weight")[0]
    k = v.shape(f"{fqn}.k_proj.weight")[0]
    return {"num_key_value_groups": q // k} if q % k == 0 else {}


def _gated_mlp(v: _View, fqn: str, m: nn.Module) -> dict[str, object]:
    """LLaMA-style MLPs keep their sizes as attributes (not read by ``forward``)."""
    out, in_ = v.shape(f"{fqn}.up_proj.weight")
    return {"intermediate_size": out, "hidden_size": in_}


#: Module attributes a ``transformers`` class derives from its config in ``__init__``
#: and no tensor of its own shows: ``{class name: rule}``, each rule giving the new
#: values from the widened model.
_MODULE_RULES: dict[str, Callable[[_View, str, nn.Module], dict[str, object]]] = {
    "GPT2Attention": _gpt2_attention,
    "BertSelfAttention": _bert_attention,
    "LlamaAttention": _gqa_attention,
    "Qwen2Attention": _gqa_attention,
    "MistralAttention": _gqa_attention,
    "Qwen3Attention": _gqa_attention,
    "GemmaAttention": _gqa_attention,
    "Gemma2Attention": _gqa_attention,
    "Gemma3Attention": _gqa_attention,
    "LlamaMLP": _gated_mlp,
    "Qwen2MLP": _gated_mlp,
    "MistralMLP": _gated_mlp,
    "Qwen3MLP": _gated_mlp,
    "GemmaMLP": _gated_mlp,
    "Gemma2MLP": _gated_mlp,
    "Gemma3MLP": _gated_mlp,
}


def transformers_updates(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    updates: Sequence[tuple[object, Mapping[str, object]]],
) -> tuple[list[tuple[object, dict[str, object]]], list[str]]:
    """Module attributes and config fields of a widened ``transformers`` model.

    The module attributes of :data:`_MODULE_RULES` (GPT-2's ``split_size``, BERT's
    ``attention_head_size``, ...) that ``updates`` does not set already, then
    :func:`config_updates` on top of both.

    Args:
        model: The model before its new tensors are installed.
        shapes: The new shape of every tensor that changes, under each of its FQNs.
        updates: The module attribute updates that will be set, ``(module, {attr: value})``.

    Returns:
        ``(updates to add, caveats)``: see :func:`config_updates`.
    """
    if "transformers" not in sys.modules or not shapes:
        return [], []
    view = _View(model, shapes, _merged(updates))
    extra: list[tuple[object, dict[str, object]]] = []
    for fqn, module in model.named_modules():
        rule = _MODULE_RULES.get(type(module).__name__)
        if rule is None or not type(module).__module__.startswith("transformers."):
            continue
        values = {
            k: val
            for k, val in rule(view, fqn, module).items()
            if hasattr(module, k) and view.attr(module, k) == getattr(module, k)
            and getattr(module, k) != val
        }  # fmt: skip
        if values:
            extra.append((module, values))
    caveats: list[str] = []
    for prefix, root in _pretrained_roots(model):  # the model, or HF models inside it
        own = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
        config, why = config_updates(root, own, [*updates, *extra])
        extra.extend(config)
        caveats.extend(why)
    return extra, caveats


_ONE_PLUS_WEIGHT = re.compile(r"\b1(?:\.0*)?\s*\+\s*self\.weight\b")


_ONE_PLUS_WEIGHT_SEEN: dict[type, bool] = {}


def scales_by_one_plus_weight(cls: type[nn.Module]) -> bool:
    """Whether ``cls.forward`` multiplies by ``1 + self.weight`` (Gemma's RMSNorms).

    Such a norm's scale is ``γ = 1 + w``: its weight ``w`` is stored as ``γ − 1``.

    >>> from torch import nn
    >>> scales_by_one_plus_weight(nn.RMSNorm)
    False
    """
    if cls not in _ONE_PLUS_WEIGHT_SEEN:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):  # no source (a compiled or dynamically made class)
            source = ""
        _ONE_PLUS_WEIGHT_SEEN[cls] = _ONE_PLUS_WEIGHT.search(source) is not None
    return _ONE_PLUS_WEIGHT_SEEN[cls]


def norm_offsets(model: nn.Module, modules: Iterable[str]) -> dict[str, float]:
    """``{FQN: 1.0}`` for each of ``modules`` that scales by ``1 + weight``.

    The zero-fill (graph/fill.py) keeps an RMSNorm's output with ``γ_old × √(D/D')``;
    for these norms that is ``w' = √(D/D')·(1 + w) − 1`` on the stored weight
    (:attr:`torch_embed.graph.gather.AxisMap.shift`). A name that is not a submodule of
    ``model`` is left out.

    >>> from torch import nn
    >>> norm_offsets(nn.Sequential(nn.RMSNorm(4)), ["0"])
    {}
    """
    out: dict[str, float] = {}
    for fqn in dict.fromkeys(modules):
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            continue
        if scales_by_one_plus_weight(type(module)):
            out[fqn] = 1.0
    return out


def _pretrained_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(FQN prefix, module)`` of each outermost ``PreTrainedModel`` in ``model``."""
    out: list[tuple[str, nn.Module]] = []
    for fqn, m in model.named_modules():  # pre-order: outer models come first
        inside = any(fqn.startswith(p) for p, _ in out)
        if is_transformers_model(m) and not inside:
            out.append((f"{fqn}." if fqn else "", m))
    return out


def _merged(updates: Sequence[tuple[object, Mapping[str, object]]]) -> dict[int, dict[str, object]]:
    out: dict[int, dict[str, object]] = {}
    for m, u in updates:
        out.setdefault(id(m), {}).update(u)
    return out


def config_updates(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    updates: Sequence[tuple[object, Mapping[str, object]]],
) -> tuple[list[tuple[object, dict[str, object]]], list[str]]:
    """The config field updates of a widened ``transformers`` model, and what is left out.

    Args:
        model: The model before its new tensors are installed.
        shapes: The new shape of every tensor that changes, under each of its FQNs.
        updates: The module attribute updates that will be set, ``(module, {attr: value})``.

    Returns:
        ``([(config, {field: value})], [])`` when a config with the new fields rebuilds
        every parameter and buffer shape of the widened model (``([], [])`` if nothing
        changes, or for a model that is not a ``PreTrainedModel``); otherwise
        ``([], [why])``: the config is left as it was, and ``why`` says which sizes it
        cannot hold, for a warning.
    """
    config = getattr(model, "config", None)
    if not is_transformers_model(model) or config is None or not shapes:
        return [], []
    view = _View(model, shapes, _merged(updates))
    model_type = str(getattr(config, "model_type", ""))
    reader = _FIELDS.get(model_type)
    new: dict[str, object] = {}
    unclear: list[str] = []
    for field, values in (reader(view) if reader is not None else {}).items():
        distinct = sorted(set(values))
        if not distinct or not (hasattr(config, field) or field in _READ_WITH_DEFAULT):
            continue
        value = distinct[0]
        if len(distinct) > 1:
            shown = [int(d) if float(d).is_integer() else d for d in distinct]
            unclear.append(f"`{field}` would need one value per layer, {shown}")
            continue
        if not field.endswith(("eps", "epsilon")):
            if float(value) != int(value):
                unclear.append(f"`{field}` would be {value}, not a whole number")
                continue
            value = int(value)
        current = getattr(config, field, None)
        if current is None and field in _READ_WITH_DEFAULT:
            current = _READ_WITH_DEFAULT[field](config, new)
        if current != value:
            new[field] = value
    try:
        candidate = copy.deepcopy(config)
        for field, value in new.items():
            setattr(candidate, field, value)
        validate = getattr(candidate, "validate", None)  # transformers 5's strict configs
        if new and callable(validate):
            validate()  # what save_pretrained runs
        mismatches = _mismatches(model, candidate, view)
    except Exception as error:  # the config class validates its fields (hidden % heads)
        first = str(error).strip().splitlines()
        unclear.append(f"{type(error).__name__}: {' '.join(first[-1:]).strip().rstrip('.')}"[:300])
        mismatches = []
    if not mismatches and not unclear:
        return ([(config, new)] if new else []), []
    kind = type(config).__name__
    if unclear:
        why = unclear
    else:
        why = mismatches[:3]
        if reader is None:
            why.insert(0, f"torch_embed knows no size fields of model_type {model_type!r}")
    return [], [
        f"the config ({kind}) cannot describe the widened {type(model).__name__}: "
        + "; ".join(why)
        + ". It was left as it was, so save_pretrained/from_pretrained will not rebuild "
        "this model (the model itself is widened exactly)"
    ]
