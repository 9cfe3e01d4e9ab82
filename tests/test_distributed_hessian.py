"""process_group=: 2 and 3 gloo processes on the CPU against one process (float64).

Each rank holds a shard of the batches (the 3-process run leaves rank 1 without data);
every rank must get the same result, equal to the single-process result on the
concatenated data within 1e-12 relative. The processes are spawned
(torch.multiprocessing), rendezvous through a FileStore in tmp_path, and write their
results there.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

import torch_embed
from torch_embed._blocks import (
    data_signals,
    layer_signals,
    null_coupling,
    split_coupling,
    splitting_matrix,
)
from torch_embed._data import batch_source
from torch_embed.critical import critical_point
from torch_embed.hessian import gradient, hessian, hvp
from torch_embed.inertia import hessian_inertia
from torch_embed.inertia_change import inertia_change
from torch_embed.landscape.saddles import saddle_certificates

F64 = torch.float64
N = 23
#: Batch sizes per rank, for 2 and for 3 processes (rank 1 of 3 has no data).
SHARDS = {2: [[5, 11], [7]], 3: [[1, 2, 3], [], [4, 5, 6, 2]]}
REDUCTION = {2: "mean", 3: "sum"}


def _problem() -> tuple[nn.Module, nn.Module, torch_embed.Embedding, Tensor, Tensor, Tensor]:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, [6], torch_embed.Split(alpha=0.3))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 3, generator=g, dtype=F64)
    y = torch.sin(2 * x[:, :2])
    vecs = torch.randn(3, sum(p.numel() for p in net.parameters()), generator=g, dtype=F64)
    return net, wide, emb, x, y, vecs


def _fit_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    x = torch.linspace(-2, 2, 20, dtype=F64)[:, None]
    return net, x, torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)


def _results(loss: Any, main: dict[str, Any], fit: dict[str, Any]) -> dict[str, Any]:
    """Every tool's result for one way of passing the data (one batch, or a shard)."""
    net, wide, emb, _, _, vecs = _problem()
    certs = saddle_certificates(net, loss, **main)
    fit_net, _, _ = _fit_problem()
    res = critical_point(fit_net, nn.MSELoss(reduction=loss.reduction), **fit)
    return {
        "gradient": gradient(net, loss, **main),
        "hvp": hvp(net, loss, vectors=vecs, **main),
        "hessian": hessian(net, loss, **main),
        "inertia": hessian_inertia(net, loss, **main).as_tuple(),
        "change": inertia_change(emb, wide, loss, **main).as_tuple(),
        "change_hvp": inertia_change(emb, wide, loss, **main, method="hvp").as_tuple(),
        "certificates": [(c.layer, c.neuron, c.kind, c.curvature) for c in certs],
        "critical": (
            res.converged,
            torch.cat([p.detach().reshape(-1) for p in fit_net.parameters()]),
        ),
    }


def _sums(signals: Any) -> dict[str, Tensor]:
    """The closed forms' sums over samples (layer 0, neuron 1, a null slope of 0.7)."""
    return {
        "S": splitting_matrix(signals, 1),
        "G": split_coupling(signals, 1),
        "G_null": null_coupling(signals, 0.7),
    }


def _shared_work(loss: nn.Module, shard: list[Any], group: Any) -> dict[str, Any]:
    """What one rank holds and computes of the closed forms and of inertia_change's spectra.

    The rows of the layer's signals (this rank's samples only: nothing is gathered),
    the sums built from them (all-reduced), and how many eigendecompositions this rank
    ran (each block's on one rank only).
    """
    net, wide, emb, _, _, _ = _problem()
    signals = data_signals(net, loss, batch_source("t", loss, data=shard, process_group=group), 0)
    module = importlib.import_module("torch_embed.inertia_change")
    original, calls = module.eigenvalues, []

    def counted(matrix: Tensor) -> Tensor:
        calls.append(matrix.shape[0])
        return original(matrix)

    module.eigenvalues = counted
    try:
        change = inertia_change(emb, wide, loss, data=shard, process_group=group)
    finally:
        module.eigenvalues = original
    return {
        "rows": int(signals.h.shape[0]),
        "sums": _sums(signals),
        "eigen_calls": len(calls),
        "change_tol_gap": (change.tol, change.gap),
    }


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        _, _, _, x, y, _ = _problem()
        _, fx, fy = _fit_problem()  # 20 samples: the shards' first 20
        sizes = SHARDS[world]
        start = sum(sum(s) for s in sizes[:rank])
        shard, fit_shard = [], []
        for size in sizes[rank]:
            shard.append((x[start : start + size], y[start : start + size]))
            if start < len(fx):
                fit_shard.append((fx[start : start + size], fy[start : start + size]))
            start += size
        group = dist.group.WORLD
        loss = nn.MSELoss(reduction=REDUCTION[world])
        results = _results(
            loss,
            {"data": shard, "process_group": group},
            {"data": fit_shard, "process_group": group},
        )
        results["shared"] = _shared_work(loss, shard, group)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_agree_with_one_process_on_the_concatenated_data(world: int, tmp_path: Path) -> None:
    # forkserver: one server process imports torch_embed (and the L-BFGS machinery)
    # once; every rank is a fork of it, not a fresh interpreter importing torch again
    multiprocessing.set_forkserver_preload(["torch_embed", "torch._dynamo", __name__])
    mp.start_processes(
        _worker,
        args=(world, str(tmp_path / "store"), str(tmp_path)),
        nprocs=world,
        start_method="forkserver",
    )
    _, _, _, x, y, _ = _problem()
    _, fx, fy = _fit_problem()
    loss = nn.MSELoss(reduction=REDUCTION[world])
    ref = _results(loss, {"inputs": x, "targets": y}, {"inputs": fx, "targets": fy})
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in ranks[1:]:  # the same bits on every rank
        for key in ("gradient", "hvp", "hessian"):
            assert torch.equal(r[key], ranks[0][key]), key
        assert r["certificates"] == ranks[0]["certificates"]
        assert torch.equal(r["critical"][1], ranks[0]["critical"][1])
    got = ranks[0]
    for key in ("gradient", "hvp", "hessian"):
        assert float((got[key] - ref[key]).abs().max()) <= 1e-12 * float(ref[key].abs().max())
    for key in ("inertia", "change", "change_hvp"):
        assert got[key] == ref[key], key
    # the closed forms: each rank holds only its own samples' rows and sums them; the
    # all-reduced sums equal the one-process sums on the concatenated data, bit-equal
    # on every rank; each block's eigendecomposition runs on one rank only
    for r, result in enumerate(ranks):
        assert result["shared"]["rows"] == sum(SHARDS[world][r])
    one = _sums(layer_signals(_problem()[0], loss, x, y, 0))
    for key, want in one.items():
        for r in ranks[1:]:
            assert torch.equal(r["shared"]["sums"][key], got["shared"]["sums"][key]), key
        err = float((got["shared"]["sums"][key] - want).abs().max())
        assert err <= 1e-12 * float(want.abs().max()), key
    assert sum(r["shared"]["eigen_calls"] for r in ranks) == 2  # two added neurons
    assert all(r["shared"]["change_tol_gap"] == got["shared"]["change_tol_gap"] for r in ranks)
    scale = max(abs(c[3]) for c in ref["certificates"])
    want = {c[:3]: c[3] for c in ref["certificates"]}
    assert len(got["certificates"]) == len(want)
    for *k, value in got["certificates"]:
        assert abs(value - want[tuple(k)]) <= 1e-10 * scale
    assert got["critical"][0] and ref["critical"][0]
    assert torch.allclose(got["critical"][1], ref["critical"][1], rtol=1e-8, atol=1e-9)
