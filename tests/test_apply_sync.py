"""The apply paths read no device data to the host and move each index map once.

On an accelerator, ``.item()``/``bool(t)``/``tolist()`` of a device tensor (the ATen op
``aten._local_scalar_dense``) waits for the device, and so does a blocking host-to-device
copy. Both apply paths decide everything on the CPU index maps, so the same code runs on
"meta" tensors (which have no data) and the dispatch log of a meta run shows every
host read and every host-to-device copy the path would make on a GPU.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from torch_embed.graph.groups import width_groups
from torch_embed.graph.plan import plan_groups
from torch_embed.schemes import DEFAULT_SCHEME, Null, Split, plan
from torch_embed.widen import widen

META = torch.device("meta")


class _Log(TorchDispatchMode):
    """Counts host reads of non-CPU tensors and host-to-device copies."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.uploads: list[tuple[str, tuple[int, ...], bytes]] = []  # dtype, shape, bytes

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default:
            if any(t.device.type != "cpu" for t in tensors):
                self.reads.append(str(func))
                raise RuntimeError("host read of a device tensor")  # as a GPU would wait
        src = None
        if func is torch.ops.aten._to_copy.default and tensors[0].device.type == "cpu":
            if kwargs.get("device") is not None and torch.device(kwargs["device"]) == META:
                src = tensors[0]
        if func is torch.ops.aten.copy_.default and args[0].device == META:
            src = args[1] if args[1].device.type == "cpu" else None
        if src is not None:
            value = src.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            self.uploads.append((str(src.dtype), tuple(src.shape), value))
        return func(*args, **kwargs)


def _run(fn: Callable[[], dict[str, Tensor]]) -> tuple[dict[str, Tensor], _Log]:
    log = _Log()
    with torch.no_grad(), log:
        out = fn()
    return out, log


def _meta(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.empty_like(v, device=META) for k, v in state.items()}


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv3(torch.relu(self.conv2(h))))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("scheme", ["split", DEFAULT_SCHEME], ids=["split", "net2net-noise"])
@pytest.mark.parametrize("what", ["apply", "map_gradients", "map_second_moments"])
def test_traced_apply_is_sync_free_and_uploads_maps_once(what: str, scheme: Any) -> None:
    """The traced path on meta tensors: no host read, the shapes of the CPU run, and
    each distinct index map or factor moves to the device once per call (a group's map
    serves a conv's rows, its BatchNorm's entries and the next conv's columns). Net2Net's
    noise (drawn on the host) is added on the tensors' device, a grouped conv's too."""
    gen = torch.Generator().manual_seed(0)
    model = _CNN().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    emb = plan_groups(width_groups(model, x), 1.5, scheme, generator=gen)
    state = {n: t.detach() for n, t in model.state_dict().items() if n in emb.tensors}
    cpu = getattr(emb, what)(state)
    meta = _meta(state)
    out, log = _run(lambda: getattr(emb, what)(meta))
    assert log.reads == []
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in cpu.items()}
    assert all(v.device == META for v in out.values())
    _, again = _run(lambda: getattr(emb, what)(meta))
    assert log.uploads and len(set(log.uploads)) == len(log.uploads)
    assert again.reads == [] and sorted(again.uploads) == sorted(log.uploads)


@pytest.mark.parametrize("scheme", [Split(alpha=1 / 3), Null(bias=0.5)], ids=["split", "null"])
@pytest.mark.parametrize("what", ["apply", "map_gradients", "map_second_moments"])
def test_mlp_apply_is_sync_free_and_uploads_each_map_once(scheme: Any, what: str) -> None:
    """The MLP path on meta tensors: no host read, and each index map or factor moves
    to the device once per call (not once per tensor that uses it: a layer's sources
    serve its weight rows, bias, BatchNorm entries and the next weight's columns)."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)
    )
    emb = plan(net, [8, 9], scheme, generator=gen)
    state = dict(net.state_dict())
    cpu = getattr(emb, what)(state)
    out, log = _run(lambda: getattr(emb, what)(_meta(state)))
    assert log.reads == []
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in cpu.items()}
    assert log.uploads and len(set(log.uploads)) == len(log.uploads)


class _Tainted(TorchDispatchMode):
    """Counts per-value host reads (``aten._local_scalar_dense``: ``.item()``,
    ``float(t)``, ``bool(t)``) of anything computed from the given tensors.

    A CPU stand-in for a device: the model's tensors and all results of ops that read
    them are "on the device". (A batched ``tolist()`` of a CPU tensor does not dispatch
    and is not seen: this guards against reads per layer or per value.)
    """

    def __init__(self, roots: list[Tensor]) -> None:
        super().__init__()
        self.keep: list[Any] = []  # storages alive, so that their addresses are not reused
        self.storages: set[int] = set()
        self.reads = 0
        for t in roots:
            self._mark(t)

    def _mark(self, t: Tensor) -> None:
        if t.untyped_storage().data_ptr() == 0:
            return  # an empty tensor: no data to read, and the address is shared
        self.keep.append(t.untyped_storage())  # not ``t``: no autograd graph kept alive
        self.storages.add(t.untyped_storage().data_ptr())

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        hot = any(a.untyped_storage().data_ptr() in self.storages for a in flat)
        self.reads += int(hot and func is torch.ops.aten._local_scalar_dense.default)
        out = func(*args, **kwargs)
        if hot:
            for o in tree_flatten(out)[0]:
                if isinstance(o, Tensor):
                    self._mark(o)
        return out


def test_mlp_widen_with_adam_reads_no_value_of_the_model() -> None:
    """The whole MLP widen with Adam state reads no single value of the model or its
    state to the host (it did one ``float(max|W|)`` per hidden layer for the overflow
    check; now one batched read per device)."""
    gen = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for k in range(5):
        layers += [nn.Linear(8, 8)] + ([nn.Tanh()] if k < 4 else [])
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(3, 8, generator=gen)).sum().backward()
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
    mode = _Tainted([p.detach() for p in net.parameters()] + state)
    with mode:
        widen(net, [12] * 4, Split(), optimizer=opt, generator=gen)
    assert net[0].out_features == 12
    assert mode.reads == 0


def _noise_by_pairs(t: Tensor, source: Tensor, axis: int, groups: int, seed: int) -> Tensor:
    """Net2Net's noise added pair by pair, as GroupEmbedding documents it: the copies
    of each narrow unit in order, paired (j, k); ε drawn per pair from the tensor's
    generator; column j gets +noise·w_j·ε and column k the same subtracted."""
    t = t.clone()
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for unit in range(int(source.max()) + 1):
        copies = (source == unit).nonzero().flatten().tolist()
        pairs += [(copies[i], copies[i + 1]) for i in range(0, len(copies) - 1, 2)]
    pairs.sort(key=lambda p: (int(source[p[0]]), p[0]))
    share = source.numel() // groups
    for j, k in pairs:
        if groups == 1:
            col_j, col_k = t.select(axis, j), t.select(axis, k)
        else:
            w = t.view(groups, t.shape[0] // groups, share, *t.shape[2:])
            col_j, col_k = w[j // share, :, j % share], w[k // share, :, k % share]
        eps = torch.randn(col_j.shape, generator=gen, dtype=torch.float64)
        offset = (4.0 * col_j.to(torch.float64) * eps).to(t.dtype)
        col_j += offset
        col_k -= offset
    return t


def test_traced_noise_is_the_pair_by_pair_definition_bit_for_bit() -> None:
    """The batched noise (one gather and two index writes per tensor) gives the bits
    of the per-pair definition, for plain and grouped convolutions. The reference maps
    each tensor axis by axis in the embedding's order (plain axes, then a grouped
    in-axis) with noise-free one-axis embeddings, adding the noise pair by pair after
    each consumer axis."""
    gen = torch.Generator().manual_seed(1)
    model = _CNN().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    emb = plan_groups(width_groups(model, x), 2.0, DEFAULT_SCHEME, generator=gen)
    assert emb.noise == 4.0
    state = {n: t.detach() for n, t in model.state_dict().items() if n in emb.tensors}
    with torch.no_grad():
        noisy = emb.apply(state)
    split = {a.tensor for a in emb.axes if a.role == "split" and a.tensor.endswith("weight")}
    assert {a.groups for a in emb.axes if a.tensor in split and a.role == "split"} == {1, 2}
    for name in split:
        want = state[name]
        axes = [a for a in emb.axes if a.tensor == name]
        for a in sorted(axes, key=lambda a: a.groups > 1):
            one = dataclasses.replace(emb, axes=(a,), noise=0.0)
            with torch.no_grad():
                want = one.apply({name: want})[name]
            if a.role == "split":
                key = (emb.seed ^ zlib.crc32(f"{a.tensor}:{a.axis}".encode())) % 2**63
                want = _noise_by_pairs(want, a.source, a.axis, a.groups, key)
        assert torch.equal(noisy[name], want), name
    plain = dataclasses.replace(emb, noise=0.0).apply(state)
    assert all(not torch.equal(noisy[n], plain[n]) for n in split)
