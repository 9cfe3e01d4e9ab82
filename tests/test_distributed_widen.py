"""widen_ddp / widen_fsdp on 2 gloo processes (CPU), against a single-process replay.

One spawn runs every scenario (starting processes costs more than the scenarios); each
rank saves what it saw and the tests below compare the ranks bitwise with each other
and, to rounding, with a replay of the same run in this process on the concatenated data
(plain training, :func:`torch_embed.widen` with the same seed).
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torch_embed
from torch_embed.distributed import widen_ddp, widen_fsdp

WORLD = 2
NARROW_STEPS = 3
WIDE_STEPS = 3
MLP_WIDTHS = [9, 8]
CNN_WIDTHS = {"c1": 5, "c2": 6}
MLP_SEED = 7
CNN_RANK_SEEDS = (100, 101)  # torch.manual_seed per rank before widen_ddp(seed=None)


class CNN(nn.Module):
    """A small convolutional net with its own forward: widened on the traced path."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.mean(dim=(2, 3)))


def _init(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _mlp() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    return _init(net.double(), 0)


def _cnn() -> nn.Module:
    return _init(CNN().double(), 1)


def _data(kind: str) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    if kind == "mlp":
        return (
            torch.randn(16, 4, generator=g, dtype=torch.float64),
            torch.randn(16, 1, generator=g, dtype=torch.float64),
        )
    return (
        torch.randn(8, 1, 7, 7, generator=g, dtype=torch.float64),
        torch.randn(8, 2, generator=g, dtype=torch.float64),
    )


def _shard(t: Tensor, rank: int) -> Tensor:
    n = t.shape[0] // WORLD
    return t[rank * n : (rank + 1) * n]


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.05)


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _params(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _opt_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    names = {p: n for n, p in module.named_parameters()}
    return {
        names[p]: {k: v.clone() if isinstance(v, Tensor) else v for k, v in st.items()}
        for p, st in opt.state.items()
    }


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, y)


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    opt.zero_grad()
    loss = _loss(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ---- what each rank runs -------------------------------------------------------------


def _ddp_run(rank: int, kind: str) -> dict[str, Any]:
    net = _mlp() if kind == "mlp" else _cnn()
    x, y = (_shard(t, rank) for t in _data(kind))
    ddp = DDP(net)
    opt = (_adam if kind == "mlp" else _sgd)(ddp.parameters())
    losses = [_train(ddp, opt, x, y) for _ in range(NARROW_STEPS)]
    with torch.no_grad():
        before = float(_loss(ddp(x), y))
    if kind == "mlp":
        ddp, _ = widen_ddp(ddp, MLP_WIDTHS, optimizer=opt, seed=MLP_SEED)
    else:
        torch.manual_seed(CNN_RANK_SEEDS[rank])  # rank 0's draw is the one used
        ddp, _ = widen_ddp(ddp, CNN_WIDTHS, optimizer=opt, example_inputs=(x,))
    with torch.no_grad():
        after = float(_loss(ddp(x), y))
    widened, state = _params(net), _opt_state(net, opt)
    losses += [_train(ddp, opt, x, y) for _ in range(WIDE_STEPS)]
    return {
        "before": before,
        "after": after,
        "widened": widened,
        "state": state,
        "final": _params(net),
        "losses": losses,
        "type": type(ddp).__name__,
    }


def _message(fn: Callable[[], object]) -> str:
    try:
        fn()
    except (TypeError, ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _refusals(rank: int) -> dict[str, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    net = _mlp()
    x, y = (_shard(t, rank) for t in _data("mlp"))
    ddp = DDP(net)
    opt = _adam(ddp.parameters())
    _train(ddp, opt, x, y)
    out: dict[str, Any] = {"start": _params(net), "start_state": _opt_state(net, opt)}
    widths = [9, 8] if rank == 0 else [9, 7]
    out["widths"] = _message(lambda: widen_ddp(ddp, widths, optimizer=opt, seed=1))
    if rank == 1:
        with torch.no_grad():
            net[0].weight[0, 0] += 1e-12
    out["diverged"] = _message(lambda: widen_ddp(ddp, [9, 8], optimizer=opt, seed=1))
    if rank == 1:
        with torch.no_grad():
            net[0].weight.copy_(out["start"]["0.weight"])
    out["seed"] = _message(lambda: widen_ddp(ddp, [9, 8], seed=1.5))  # type: ignore[arg-type]
    out["shrink"] = _message(lambda: widen_ddp(ddp, [3, 5], optimizer=opt, seed=1))
    out["kwarg"] = _message(lambda: widen_ddp(ddp, [9, 8], seed=1, bucket_cap=3))
    out["bad_opt"] = _message(lambda: widen_ddp(ddp, [9, 8], optimizer="adam", seed=1))  # type: ignore[arg-type]
    out["after_refusals"] = _params(net)
    out["after_refusals_state"] = _opt_state(net, opt)
    # the wrapper restored after the failed widen still all-reduces: ranks stay equal
    out["restored_step"] = _train(ddp, opt, x, y)
    out["restored"] = _params(net)
    out["not_ddp"] = _message(lambda: widen_ddp(net, [9, 8], seed=1))  # type: ignore[arg-type]
    hooked = DDP(_mlp())
    hooked.register_comm_hook(None, allreduce_hook)
    out["hook"] = _message(lambda: widen_ddp(hooked, [9, 8], seed=1))
    out["hook_shape"] = tuple(hooked.module[0].weight.shape)
    # the carried settings: a wrapper with non-default ones gets them back
    custom = DDP(_mlp(), bucket_cap_mb=1, find_unused_parameters=True, dim=0)
    custom, _ = widen_ddp(custom, [7, 5], seed=3)
    out["carried"] = (custom.bucket_bytes_cap, custom.find_unused_parameters)
    # an argument given replaces its carried alias (forward_sync_buffers here)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = DDP(_mlp(), broadcast_buffers=False)
        legacy, _ = widen_ddp(legacy, [7, 5], seed=3, broadcast_buffers=False)
    out["alias_warnings"] = [str(w.message) for w in caught if "Both" in str(w.message)]
    out["alias"] = legacy.forward_sync_buffers
    return out


def _grouped(module: nn.Module) -> torch.optim.Optimizer:
    """Adam with two parameter groups: weights and biases at different rates."""
    named = list(module.named_parameters())
    return torch.optim.Adam(
        [
            {"params": [p for n, p in named if n.endswith("weight")]},
            {"params": [p for n, p in named if n.endswith("bias")], "lr": 0.02},
        ],
        lr=0.05,
    )


def _fsdp_run(rank: int, groups: bool = False) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    def shard(m: nn.Module) -> None:
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(m)

    net = _mlp()
    shard(net)
    x, y = (_shard(t, rank) for t in _data("mlp"))
    opt = _grouped(net) if groups else _adam(net.parameters())
    losses = [_train(net, opt, x, y) for _ in range(NARROW_STEPS)]
    with torch.no_grad():
        before = float(_loss(net(x), y))
    wide, wide_opt, _ = widen_fsdp(
        net,
        MLP_WIDTHS,
        build=_mlp,
        shard=shard,
        optimizer=opt,
        make_optimizer=_grouped if groups else None,
        seed=MLP_SEED,
    )
    assert wide_opt is not None
    with torch.no_grad():
        after = float(_loss(wide(x), y))
    full = StateDictOptions(full_state_dict=True)
    widened = {k: v.clone() for k, v in get_model_state_dict(wide, options=full).items()}
    losses += [_train(wide, wide_opt, x, y) for _ in range(WIDE_STEPS)]
    final = {k: v.clone() for k, v in get_model_state_dict(wide, options=full).items()}
    local = wide[0].weight.to_local().shape  # type: ignore[operator]
    return {
        "before": before,
        "after": after,
        "widened": widened,
        "final": final,
        "losses": losses,
        "local_rows": local[0],
    }


def _spectrum_run(rank: int) -> dict[str, Any]:
    """Spectra of an operator summed over the ranks' shards (the guide's claim)."""
    from torch_embed.hessian import HessianOperator
    from torch_embed.spectrum import extreme_eigenvalues, hutchinson_trace

    x, y = (_shard(t, rank) for t in _data("mlp"))
    op = HessianOperator(_mlp(), nn.MSELoss(), x, y, process_group=dist.group.WORLD)
    top = extreme_eigenvalues(op, 3)
    trace = hutchinson_trace(op, 30, generator=torch.Generator().manual_seed(0))
    return {"top": top, "trace": trace}


def _worker(rank: int, store: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        out = {
            "mlp": _ddp_run(rank, "mlp"),
            "cnn": _ddp_run(rank, "cnn"),
            "refusals": _refusals(rank),
            "fsdp": _fsdp_run(rank),
            "fsdp_groups": _fsdp_run(rank, groups=True),
            "spectrum": _spectrum_run(rank),
        }
        with open(f"{store}.rank{rank}", "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    store = tmp_path_factory.mktemp("dist") / "store"
    mp.spawn(_worker, args=(str(store),), nprocs=WORLD, join=True)
    out = []
    for r in range(WORLD):
        with open(f"{store}.rank{r}", "rb") as f:
            out.append(pickle.load(f))
    return out


# ---- the single-process reference ----------------------------------------------------


def _replay(kind: str) -> dict[str, Any]:
    """The same run in one process on all the data (equal shards: mean = mean of means)."""
    net = _mlp() if kind != "cnn" else _cnn()
    x, y = _data("mlp" if kind != "cnn" else "cnn")
    if kind == "fsdp_groups":
        opt = _grouped(net)
    else:
        opt = (_sgd if kind == "cnn" else _adam)(net.parameters())
    losses = [_train(net, opt, x, y) for _ in range(NARROW_STEPS)]
    if kind == "cnn":
        seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(100)))
        g = torch.Generator().manual_seed(seed)
        torch_embed.widen(net, CNN_WIDTHS, optimizer=opt, generator=g, example_inputs=(x,))
    else:
        g = torch.Generator().manual_seed(MLP_SEED)
        torch_embed.widen(net, MLP_WIDTHS, optimizer=opt, generator=g)
    widened, state = _params(net), _opt_state(net, opt)
    losses += [_train(net, opt, x, y) for _ in range(WIDE_STEPS)]
    return {"widened": widened, "state": state, "final": _params(net), "losses": losses}


def _assert_same(a: Any, b: Any) -> None:
    """Bitwise equality of nested dicts of tensors and numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, Tensor):
        assert a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def _assert_close(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close(a[k], b[k])
    elif isinstance(a, Tensor):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:
        assert a == pytest.approx(b, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ddp_ranks_identical_after_widening_and_training(
    ranks: list[dict[str, Any]], kind: str
) -> None:
    r0, r1 = ranks[0][kind], ranks[1][kind]
    assert r0["type"] == "DistributedDataParallel"
    for key in ("widened", "state", "final"):
        _assert_same(r0[key], r1[key])


@pytest.mark.parametrize("kind", ["mlp", "cnn", "fsdp", "fsdp_groups"])
def test_loss_continuous_at_widening(ranks: list[dict[str, Any]], kind: str) -> None:
    for r in ranks:
        assert r[kind]["after"] == pytest.approx(r[kind]["before"], rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "fsdp", "fsdp_groups"])
def test_equals_single_process_replay(ranks: list[dict[str, Any]], kind: str) -> None:
    ref = _replay(kind)
    got = ranks[0][kind]
    assert got["widened"]["0.weight" if kind != "cnn" else "c1.weight"].shape[0] == (
        MLP_WIDTHS[0] if kind != "cnn" else CNN_WIDTHS["c1"]
    )
    _assert_close(got["widened"], ref["widened"])
    _assert_close(got["final"], ref["final"])
    if not kind.startswith("fsdp"):
        _assert_close(got["state"], ref["state"])
    mean_losses = [
        sum(r[kind]["losses"][i] for r in ranks) / WORLD for i in range(len(ref["losses"]))
    ]
    _assert_close(mean_losses, ref["losses"])


def test_fsdp_ranks_identical_and_resharded(ranks: list[dict[str, Any]]) -> None:
    _assert_same(ranks[0]["fsdp"]["widened"], ranks[1]["fsdp"]["widened"])
    _assert_same(ranks[0]["fsdp"]["final"], ranks[1]["fsdp"]["final"])
    assert [r["fsdp"]["local_rows"] for r in ranks] == [5, 4]  # 9 rows over 2 ranks


def test_refusals_raise_on_every_rank_and_change_nothing(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks[0]["refusals"], ranks[1]["refusals"]
    for r in (r0, r1):
        assert r["widths"].startswith("ValueError") and "arguments" in r["widths"]
        assert r["diverged"].startswith("ValueError") and "parameters" in r["diverged"]
        assert "ranks [1]" in r["diverged"]
        assert r["seed"].startswith("TypeError") and "seed must be an int" in r["seed"]
        assert r["shrink"].startswith("ValueError")
        assert r["kwarg"].startswith("TypeError") and "bucket_cap" in r["kwarg"]
        assert r["bad_opt"].startswith("TypeError") and "Optimizer" in r["bad_opt"]
        assert r["not_ddp"].startswith("TypeError") and "DistributedDataParallel" in r["not_ddp"]
        assert r["hook"].startswith("ValueError") and "allreduce_hook" in r["hook"]
        assert r["hook_shape"] == (6, 4)
        _assert_same(r["after_refusals"], r["start"])
        _assert_same(r["after_refusals_state"], r["start_state"])
        assert r["carried"] == (2**20, True)
        assert r["alias_warnings"] == [] and r["alias"] is False
    # the restored wrapper all-reduced the next step: ranks with different data agree
    _assert_same(r0["restored"], r1["restored"])
    assert not torch.equal(r0["restored"]["0.weight"], r0["start"]["0.weight"])


def test_spectra_of_a_process_group_operator(ranks: list[dict[str, Any]]) -> None:
    """Every rank gets the same bits, and the dense eigenvalues of all the data."""
    _assert_same(ranks[0]["spectrum"], ranks[1]["spectrum"])
    x, y = _data("mlp")
    dense = torch.linalg.eigvalsh(torch_embed.hessian(_mlp(), nn.MSELoss(), x, y))
    top = ranks[0]["spectrum"]["top"]
    torch.testing.assert_close(top, dense.flip(0)[:3], rtol=0, atol=1e-10)
