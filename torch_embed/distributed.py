"""Widening a model trained with ``DistributedDataParallel`` or FSDP2 (``fully_shard``).

Every rank holds a replica (DDP) or a shard (FSDP2) of the same network, so every rank
must apply the same embedding: same plan, same random draws. Both helpers draw them from
a ``torch.Generator`` seeded identically on every rank (rank 0's seed when none is
given) and compare fingerprints of the arguments, the parameters, buffers and optimizer
state across ranks before widening (refused if the ranks differ) and after it.

DDP's reducer holds the parameters (its C++ ``Reducer`` keeps them, their gradient
accumulators and buckets of the narrow sizes; the wrapper's ``Logger`` keeps the
reducer), which is why :func:`torch_embed.widen` refuses ``ddp.module`` while the
wrapper is alive. :func:`widen_ddp` releases exactly those two, widens the bare module
with :func:`torch_embed.widen` (optimizer state mapped), and wraps it again with the
same settings. FSDP2 shards parameters as ``DTensor`` s, which cannot change shape in
place: :func:`widen_fsdp` gathers the full state dicts, widens an unsharded copy and
shards it again. See docs/guide/scale.md.

Every rank must call these functions (they run collectives); an error found on one rank
is raised on every rank.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from torch_embed.embedding import Embedding
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.schemes import DEFAULT_SCHEME, Scheme
from torch_embed.widen import widen

__all__ = ["widen_ddp", "widen_fsdp"]

Widths = Sequence[int] | Mapping[int, int] | Mapping[str, int] | float | None

# Constructor arguments of DistributedDataParallel that the wrapper keeps as attributes
# of the same name; widen_ddp passes them to the new wrapper unless given.
_CARRIED = (
    "device_ids",
    "output_device",
    "dim",
    "find_unused_parameters",
    "gradient_as_bucket_view",
    "static_graph",
    "forward_sync_buffers",
    "skip_all_reduce_unused_params",
    "batched_grad_copy",
)

# Constructor arguments that set the same thing as another one (given, the other goes).
_ALIASES = {
    "broadcast_buffers": "forward_sync_buffers",
    "process_group": "device_mesh",
    "device_mesh": "process_group",
    "bucket_cap_mb": "bucket_cap_mb_list",
    "bucket_cap_mb_list": "bucket_cap_mb",
}

# Two primes below 2**31 and multipliers for the position-weighted fingerprint: a word
# (4 bytes, < 2**32) that changes changes both residues unless it changes by a multiple
# of both primes, which no 32-bit change can.
_PRIMES = (2147483647, 2147483629)
_MULTIPLIERS = (1103515245 % 2147483647, 1664525)
_CHUNK = 1 << 22

# widen's implementation signature (its overloads split widths by example_inputs)
_widen: Callable[..., Embedding | GroupEmbedding] = widen


def widen_ddp(
    ddp_model: DistributedDataParallel,
    new_widths: Widths,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int | None = None,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    **ddp_kwargs: Any,
) -> tuple[DistributedDataParallel, Embedding | GroupEmbedding]:
    """Widen the module of a DDP wrapper identically on every rank and wrap it again.

    Call it on every rank of the wrapper's process group, at the same point of
    training, with the same arguments (``example_inputs`` may be each rank's own batch).
    It checks that the ranks agree (arguments, parameters, buffers, optimizer state:
    bitwise fingerprints exchanged with ``all_gather``), releases the wrapper's reducer,
    widens ``ddp_model.module`` in place with :func:`torch_embed.widen` and a generator
    seeded with ``seed`` (the same draws on every rank), maps ``optimizer``'s state,
    checks again that the ranks agree, and returns a new wrapper. Parameters keep their
    identity, so ``optimizer`` stays valid.

    The new wrapper gets the old one's process group (or device mesh), ``device_ids``,
    ``output_device``, ``dim``, ``find_unused_parameters``,
    ``gradient_as_bucket_view``, ``static_graph``, ``forward_sync_buffers``,
    ``skip_all_reduce_unused_params``, ``batched_grad_copy`` and bucket sizes; any
    ``ddp_kwargs`` given replace them. The old wrapper must not be used afterwards (its
    reducer is gone); if widening fails, it is restored and works as before. Example
    (and the ``torchrun`` loop): docs/guide/scale.md.

    Args:
        ddp_model: The ``DistributedDataParallel`` wrapper.
        new_widths: As for :func:`torch_embed.widen`.
        scheme: As for :func:`torch_embed.widen`.
        optimizer: This rank's optimizer over the module's parameters; its state is
            mapped (as ``widen(..., optimizer=)`` does).
        seed: Seed of the generator for the scheme's random choices. ``None``: every
            rank draws one from its default generator (``torch.manual_seed``) and
            rank 0's is used.
        example_inputs: For the traced path of :func:`torch_embed.widen` (any model that
            is not an ``nn.Sequential`` MLP, or widths by group name).
        **ddp_kwargs: ``DistributedDataParallel`` arguments for the new wrapper.

    Returns:
        ``(new_wrapper, embedding)``: the new ``DistributedDataParallel`` and the
        embedding that was applied (an :class:`~torch_embed.Embedding` or a
        :class:`~torch_embed.graph.embedding.GroupEmbedding`).

    Raises:
        TypeError: ``ddp_model`` is not a ``DistributedDataParallel``, ``seed`` is not
            an int, ``optimizer`` is not a ``torch.optim.Optimizer``, a keyword is not a
            ``DistributedDataParallel`` argument; or as :func:`torch_embed.widen`.
        ValueError: The ranks differ (arguments, parameters, buffers or optimizer
            state; the message says which and on which ranks); the wrapper has a
            communication hook, ``mixed_precision`` or delayed all-reduce parameters
            (their state has the narrow sizes: widen by hand, see the guide); or as
            :func:`torch_embed.widen`. Nothing was changed.
        RuntimeError: Widening failed on some ranks only (a resource error) or gave
            different results on different ranks; the ranks that succeeded are widened.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"widen_ddp takes a torch.nn.parallel.DistributedDataParallel wrapper, got "
            f"{type(ddp_model).__name__}; for a bare module call torch_embed.widen, for "
            f"an FSDP2 (fully_shard) model torch_embed.distributed.widen_fsdp"
        )
    module = ddp_model.module
    group = ddp_model.process_group
    problem: Exception | None = None
    try:
        _check_ddp_carryable(ddp_model)
        _check_seed(seed)
        _check_optimizer(optimizer)
        _check_ddp_kwargs(ddp_kwargs)
    except (TypeError, ValueError) as err:
        problem = err
    signature = repr((new_widths, scheme, seed, sorted(ddp_kwargs)))
    seed = _agree(
        "widen_ddp",
        group,
        _device_of(module),
        problem,
        seed,
        signature,
        module,
        optimizer,
    )
    kwargs = _carried_kwargs(ddp_model)
    for key in ddp_kwargs:  # an argument given replaces its carried alias too
        kwargs.pop(_ALIASES.get(key, key), None)
    kwargs.update(ddp_kwargs)
    _release(ddp_model)
    try:
        embedding = _widen(
            module,
            new_widths,
            scheme,
            example_inputs=example_inputs,
            optimizer=optimizer,
            generator=torch.Generator().manual_seed(seed),
        )
    except Exception as err:
        _restore(ddp_model)
        _after("widen_ddp", group, _device_of(module), err, module, optimizer)
        raise
    _after("widen_ddp", group, _device_of(module), None, module, optimizer)
    return DistributedDataParallel(module, **kwargs), embedding


def widen_fsdp(
    model: nn.Module,
    new_widths: Widths,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    build: Callable[[], nn.Module],
    shard: Callable[[nn.Module], nn.Module | None],
    optimizer: torch.optim.Optimizer | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    seed: int | None = None,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    process_group: Any = None,
) -> tuple[nn.Module, torch.optim.Optimizer | None, Embedding | GroupEmbedding]:
    """Widen an FSDP2 (``fully_shard``) model through its full state dict; re-shard it.

    FSDP2 parameters are ``DTensor`` shards that cannot change shape in place, so the
    model is rebuilt: the full model and optimizer state dicts are gathered on every
    rank (``torch.distributed.checkpoint.state_dict``, ``full_state_dict=True``), loaded
    into a fresh unsharded copy from ``build()``, widened there identically on every
    rank (as :func:`widen_ddp` does, with the same checks), sharded by ``shard`` and
    given the widened optimizer state. Memory: every rank holds the full narrow and
    wide model and optimizer state for a moment.

    Args:
        model: The sharded model (``fully_shard`` applied).
        new_widths: As for :func:`torch_embed.widen`.
        scheme: As for :func:`torch_embed.widen`.
        build: Returns a new unsharded module of the narrow architecture (on the
            device to compute on; its values are overwritten).
        shard: Applies ``fully_shard`` to the widened module as was done to ``model``
            (in place, returning ``None`` or the module).
        optimizer: This rank's optimizer over ``model``; a new one over the wide model
            is returned with the mapped state.
        make_optimizer: Builds an optimizer over a module with the parameter groups of
            ``optimizer`` (called on the unsharded narrow copy, then on the sharded
            wide model). Default: ``type(optimizer)(module.parameters(),
            **optimizer.defaults)``, for one parameter group (hyper-parameters are then
            loaded from its state dict); required for several groups.
        seed: As for :func:`widen_ddp`.
        example_inputs: For the traced path of :func:`torch_embed.widen`.
        process_group: The group to check agreement over (default: the world).

    Returns:
        ``(wide_model, wide_optimizer, embedding)``; ``wide_optimizer`` is ``None``
        when ``optimizer`` is. ``model`` and ``optimizer`` are left as they were.

    Raises:
        TypeError: ``build`` does not return an ``nn.Module``, ``seed`` is not an int,
            ``optimizer`` is not a ``torch.optim.Optimizer``, or as
            :func:`torch_embed.widen`.
        ValueError: The ranks differ, ``optimizer`` has several parameter groups and
            no ``make_optimizer`` is given, or as :func:`torch_embed.widen`.
        RuntimeError: As for :func:`widen_ddp`.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    _check_optimizer(optimizer)  # before the collectives below, like any same-args error
    full = StateDictOptions(full_state_dict=True)
    group = process_group if process_group is not None else dist.group.WORLD
    model_sd = get_model_state_dict(model, options=full)
    optim_sd = None
    if optimizer is not None:
        optim_sd = get_optimizer_state_dict(model, optimizer, options=full)
    problem: Exception | None = None
    plain: nn.Module = nn.Module()
    plain_opt: torch.optim.Optimizer | None = None
    try:
        _check_seed(seed)
        if optimizer is not None and make_optimizer is None and len(optimizer.param_groups) > 1:
            raise ValueError(
                f"widen_fsdp: the {type(optimizer).__name__} has "
                f"{len(optimizer.param_groups)} parameter groups; pass "
                f"make_optimizer=(a function of the wide sharded model that builds them)"
            )
        built = build()
        if not isinstance(built, nn.Module):
            raise TypeError(
                f"widen_fsdp: build() must return an unsharded nn.Module, got "
                f"{type(built).__name__}"
            )
        plain = built
        plain.load_state_dict(model_sd)
        if optimizer is not None and optim_sd is not None:
            plain_opt = _new_optimizer(optimizer, make_optimizer, plain)
            set_optimizer_state_dict(plain, plain_opt, optim_sd, options=full)
    except (TypeError, ValueError, RuntimeError) as err:
        problem = err
    device = _device_of(plain) if problem is None else _device_of(model)
    seed = _agree(
        "widen_fsdp",
        group,
        device,
        problem,
        seed,
        repr((new_widths, scheme, seed)),
        plain,
        plain_opt,
    )
    try:
        embedding = _widen(
            plain,
            new_widths,
            scheme,
            example_inputs=example_inputs,
            optimizer=plain_opt,
            generator=torch.Generator().manual_seed(seed),
        )
    except Exception as err:
        _after("widen_fsdp", group, device, err, plain, plain_opt)
        raise
    _after("widen_fsdp", group, device, None, plain, plain_opt)
    wide_optim_sd = None
    if plain_opt is not None:
        wide_optim_sd = get_optimizer_state_dict(plain, plain_opt, options=full)
        del plain_opt
    sharded = shard(plain)  # every rank holds the same full values: keeps its shard
    wide = plain if sharded is None else sharded
    new_opt: torch.optim.Optimizer | None = None
    if optimizer is not None and wide_optim_sd is not None:
        new_opt = _new_optimizer(optimizer, make_optimizer, wide)
        set_optimizer_state_dict(wide, new_opt, wide_optim_sd, options=full)
    return wide, new_opt, embedding


def _new_optimizer(
    like: torch.optim.Optimizer,
    make: Callable[[nn.Module], torch.optim.Optimizer] | None,
    module: nn.Module,
) -> torch.optim.Optimizer:
    """An optimizer over ``module``: ``make``'s, or ``like``'s class and defaults."""
    if make is not None:
        return make(module)
    return type(like)(module.parameters(), **like.defaults)


def _check_optimizer(optimizer: object) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )


def _check_seed(seed: int | None) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")


def _check_ddp_carryable(ddp: DistributedDataParallel) -> None:
    """Refuse wrappers whose extra state has the narrow sizes and cannot be carried."""
    hooks = getattr(ddp, "_comm_hooks", [])
    if getattr(ddp, "mixed_precision", None) is not None:
        what = "mixed_precision (its low-precision parameter copies and hooks)"
    elif hooks:
        names = [getattr(h, "__name__", type(h).__name__) for h, _ in hooks]
        what = f"communication hooks {names} (their state, e.g. PowerSGD's error buffers)"
    elif getattr(ddp, "_delay_all_reduce_params", []):
        what = "delay_all_reduce_named_params (a flat gradient buffer)"
    elif getattr(ddp, "_use_python_reducer", False):
        what = "the Python reducer of compiled DDP (gradient hooks on the parameters)"
    else:
        return
    raise ValueError(
        f"widen_ddp: the {type(ddp.module).__name__}'s DistributedDataParallel wrapper "
        f"has {what}, which hold narrow sizes and cannot be carried over. Widen by hand: "
        f"`module = ddp.module; del ddp; torch_embed.widen(module, ..., "
        f"generator=torch.Generator().manual_seed(seed))` with the same seed on every "
        f"rank, then wrap it again and register a fresh hook"
    )


def _check_ddp_kwargs(ddp_kwargs: Mapping[str, Any]) -> None:
    """Refuse what DistributedDataParallel would refuse only after the widening."""
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    unknown = sorted(k for k in ddp_kwargs if k not in accepted or k in ("self", "module"))
    if unknown:
        names = [k for k in accepted if k not in ("self", "module")]
        raise TypeError(
            f"widen_ddp: {unknown} are not DistributedDataParallel arguments for the new "
            f"wrapper; accepted: {names}"
        )


def _carried_kwargs(ddp: DistributedDataParallel) -> dict[str, Any]:
    """The old wrapper's settings as constructor arguments (see ``_CARRIED``)."""
    kwargs: dict[str, Any] = {a: getattr(ddp, a) for a in _CARRIED if hasattr(ddp, a)}
    if getattr(ddp, "device_mesh", None) is not None:
        kwargs["device_mesh"] = ddp.device_mesh
    else:
        kwargs["process_group"] = ddp.process_group
    caps = list(getattr(ddp, "bucket_bytes_cap_list", []))
    if caps:
        kwargs["bucket_cap_mb_list"] = [c / 2**20 for c in caps]
    elif not getattr(ddp, "bucket_bytes_cap_default", True):
        kwargs["bucket_cap_mb"] = ddp.bucket_bytes_cap / 2**20
    return kwargs


def _release(ddp: DistributedDataParallel) -> None:
    """Drop what holds the parameters: the reducer and the logger that keeps it."""
    del ddp.reducer
    ddp.logger = None


def _restore(ddp: DistributedDataParallel) -> None:
    """Build the reducer again, as DDP's own ``__setstate__`` (unpickling) does."""
    parameters, sparse = ddp._build_params_for_reducer()
    names = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, sparse, names, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()  # type: ignore[union-attr]


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device if t.device.type != "meta" else torch.device("cpu")
    return torch.device("cpu")


def _words(t: Tensor) -> Tensor:
    """The bytes of ``t`` as non-negative int64 words (4 bytes each where they divide)."""
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.view(torch.uint8)
    if raw.numel() % 4 == 0:
        return raw.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return raw.to(torch.int64)


def _fingerprint(tensors: Iterable[Tensor], text: str, device: torch.device) -> list[int]:
    """Four ints: two position-weighted residues of all tensor words, two of ``text``.

    Integer arithmetic only, so the result is exact and does not depend on summation
    order (every rank, CPU or GPU, gets the same value for the same bytes).
    """
    acc = [torch.zeros((), dtype=torch.int64, device=device) for _ in _PRIMES]
    offset = 0
    for t in tensors:
        if t.is_meta:
            continue
        words = _words(t).to(device)
        for start in range(0, words.numel(), _CHUNK):
            w = words[start : start + _CHUNK]
            idx = torch.arange(offset + start, offset + start + w.numel(), device=device)
            for i, (p, k) in enumerate(zip(_PRIMES, _MULTIPLIERS)):
                coef = (idx % p) * k % p + 1
                acc[i] = (acc[i] + ((w % p) * coef % p).sum()) % p
        offset += words.numel()
    digest = hashlib.sha256(text.encode()).digest()
    return [int(a) for a in acc] + [
        int.from_bytes(digest[:7], "little"),
        int.from_bytes(digest[7:14], "little"),
    ]


def _state_fingerprint(
    module: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device
) -> tuple[list[int], list[int]]:
    """Fingerprints of (parameters and buffers, optimizer state) with names and shapes."""
    named = [*module.named_parameters(), *module.named_buffers()]
    text = repr([(n, tuple(t.shape), str(t.dtype)) for n, t in named])
    model_fp = _fingerprint((t for _, t in named), text, device)
    if optimizer is None:
        return model_fp, _fingerprint((), "no optimizer", device)
    index = {p: i for i, (_, p) in enumerate(module.named_parameters())}
    tensors: list[Tensor] = []
    items: list[Any] = [type(optimizer).__name__]
    for g in optimizer.param_groups:
        for key, value in sorted(g.items(), key=lambda kv: kv[0]):
            if key == "params":
                continue
            if isinstance(value, Tensor):
                tensors.append(value)
                value = (tuple(value.shape), str(value.dtype))
            items.append((key, _plain(value)))
        for p in g["params"]:
            items.append(index.get(p, -1))
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                if isinstance(value, Tensor):
                    items.append((key, tuple(value.shape), str(value.dtype)))
                    tensors.append(value)
                else:
                    items.append((key, _plain(value)))
    return model_fp, _fingerprint(tensors, repr(items), device)


def _plain(value: Any) -> str:
    """``repr`` of plain values; the type of others (whose repr may hold an address)."""
    if value is None or isinstance(value, (bool, int, float, str, complex)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr([_plain(v) for v in value])
    return type(value).__qualname__


_WHAT = ("arguments (widths, scheme, seed, keyword names)", "parameters or buffers", "optimizer")


def _gather(group: Any, row: list[int], device: torch.device) -> list[list[int]]:
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return [[int(v) for v in r.tolist()] for r in rows]


def _ranks_of(group: Any) -> list[int]:
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


def _agree(
    name: str,
    group: Any,
    device: torch.device,
    problem: Exception | None,
    seed: int | None,
    signature: str,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> int:
    """Exchange errors, seeds and fingerprints; raise on every rank unless all agree."""
    drawn = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    if problem is None:
        model_fp, opt_fp = _state_fingerprint(module, optimizer, device)
        plan_fp = _fingerprint((), signature, device)
    else:
        model_fp = opt_fp = plan_fp = [0, 0, 0, 0]
    row = [int(problem is not None), drawn, *plan_fp, *model_fp, *opt_fp]
    rows = _gather(group, row, device)
    ranks = _ranks_of(group)
    failed = [ranks[i] for i, r in enumerate(rows) if r[0]]
    if problem is not None:
        raise problem
    if failed:
        raise ValueError(
            f"{name}: ranks {failed} refused the call (see their error); nothing was changed"
        )
    for part, what in enumerate(_WHAT):
        cut = slice(2 + 4 * part, 6 + 4 * part)
        differ = [ranks[i] for i, r in enumerate(rows) if r[cut] != rows[0][cut]]
        if differ:
            raise ValueError(
                f"{name}: the ranks differ before widening: the {what} on ranks {differ} "
                f"differ from those on rank {ranks[0]}. Every rank must widen the same "
                f"replica with the same arguments (a DDP replica that diverged was "
                f"changed outside DDP, e.g. by a rank-local update); nothing was changed"
            )
    return rows[0][1]


def _after(
    name: str,
    group: Any,
    device: torch.device,
    failure: BaseException | None,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Exchange the outcome; raise on every rank if any failed or the results differ."""
    if failure is None:
        model_fp, opt_fp = _state_fingerprint(module, optimizer, device)
    else:
        model_fp = opt_fp = [0, 0, 0, 0]
    rows = _gather(group, [int(failure is not None), *model_fp, *opt_fp], device)
    ranks = _ranks_of(group)
    failed = [ranks[i] for i, r in enumerate(rows) if r[0]]
    if failure is not None and len(failed) == len(rows):
        raise failure  # every rank refused the same way: nothing was changed
    if failed:
        raise RuntimeError(
            f"{name}: widening failed on ranks {failed} only (see their error) and "
            f"succeeded on the others, so the replicas no longer agree; restore them "
            f"from a checkpoint"
        ) from failure
    differ = [ranks[i] for i, r in enumerate(rows) if r[1:] != rows[0][1:]]
    if differ:
        raise RuntimeError(
            f"{name}: after widening, the parameters or optimizer state on ranks "
            f"{differ} differ from rank {ranks[0]}'s although the inputs agreed (a "
            f"nondeterministic operation?); restore the replicas from a checkpoint"
        )
