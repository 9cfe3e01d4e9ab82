"""Scale: HVP throughput and inertia_change time at P = 1e5..1e7; 1 vs 2 vs 4 gloo processes.

Part 1 — one process. A tanh MLP 32-w-w-1 with w chosen for P ≈ 1e5, 1e6, 1e7, N = 256
samples, MSE, in float32 and float64 (a size whose estimated memory exceeds 80% of the
free memory is skipped with the reason printed). Columns: building a
``HessianOperator`` (forward and first backward recorded once), one product with it
(best of ``--repeat``), the peer: plain double backward (``torch.autograd.grad`` with
``create_graph=True``, then the gradient of ``g·v``: forward, backward and second
backward for every product), their ratio, and one default ``inertia_change`` call for
a ``Split`` of 2 neurons per hidden layer (closed-form blocks plus the power iteration
for ‖H‖ behind its default tolerance). curvlinops (``pip install
curvlinops-for-pytorch``) is a further peer when it is installed: its
``HessianLinearOperator`` product on the same model and batch.

Part 2 — data parallel. The same N samples (``--n``, 2048) split evenly over k = 1, 2,
4 gloo processes (one thread each, ``torch.multiprocessing.spawn``, a FileStore): each
rank multiplies its shard's Hessian (mean loss, weighted n_r/N) and the products are
summed with ``all_reduce``. With the library's data-parallel API (``process_group=`` on
``HessianOperator``, from the "data" work) that call is measured; without it, this
script's own all-reduce of per-rank ``HessianOperator`` products. Time per product =
the slowest rank's, best of ``--repeat``; speed-up = t(1) / t(k) measured in the same
run; efficiency = speed-up / k. On a loaded machine wall time also measures the share
of the cores the k processes win from other work, so the CPU time summed over the
ranks is printed too: CPU ÷ 1 process is the work that splitting the data adds.
Every k's product is compared with k = 1's (max relative difference, which must be
at rounding level). Where ``inertia_change`` takes ``process_group=``, one such call
per k is timed too (a ``Split`` of 2 neurons per hidden layer, each rank passing its
shard; its counts must not depend on k), after a tiny call that pays each process's
one-time imports. Processes beyond the cores this machine gives
us cannot speed anything up: the cores and the load average are printed.

Usage::

    python bench/scale.py                    # both parts (~10 min on a 2-core machine)
    python bench/scale.py --write            # ... and its block in bench/RESULTS.md
    python bench/scale.py --quick            # smoke run: P ≈ 1e4, k = 1, 2 (seconds)
    python bench/scale.py --part 2 --procs 1 2 --p 1e6
    python bench/scale.py --part 1 --device cuda
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import cpu_model, write_results  # noqa: E402

import torch_embed  # noqa: E402
from torch_embed.hessian import HessianOperator  # noqa: E402

SECTION = "## bench/scale.py"
D_IN = 32


def width_for(p: float) -> int:
    """Hidden width w of a 32-w-w-1 MLP with P = w² + (D_IN + 3)·w + 1 closest to p."""
    b = D_IN + 3
    return max(2, round((-b + math.sqrt(b * b + 4 * (p - 1))) / 2))


def mlp(width: int, n: int, dtype: torch.dtype, device: str) -> tuple[nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(D_IN, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).to(dtype=dtype, device=device)
    x = torch.randn(n, D_IN, dtype=dtype, generator=gen).to(device)
    y = torch.randn(n, 1, dtype=dtype, generator=gen).to(device)
    return net, x, y


def n_params(width: int) -> int:
    return width * width + (D_IN + 3) * width + 1


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def estimate_bytes(width: int, n: int, dtype: torch.dtype) -> int:
    """Parameters, flat copies, vectors, two recorded graphs (~12 P) plus activations."""
    size = torch.empty((), dtype=dtype).element_size()
    return size * (12 * n_params(width) + 16 * n * width)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], repeat: int, device: str) -> float:
    best = math.inf
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def plain_hvp(net: nn.Module, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """The peer: forward, backward with create_graph, backward of g·v, every time."""
    params = [p for p in net.parameters() if p.requires_grad]
    loss = nn.functional.mse_loss(net(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    parts = torch.split(v, [p.numel() for p in params])
    dot = sum((g.reshape(-1) * u).sum() for g, u in zip(grads, parts))
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])


def curvlinops_hvp(net: nn.Module, x: Tensor, y: Tensor, v: Tensor) -> Callable[[], object] | str:
    """A curvlinops product on the same batch, or why it is not measured."""
    try:
        from curvlinops import HessianLinearOperator  # type: ignore[import-not-found]
    except ImportError:
        return "not installed here (pip install curvlinops-for-pytorch, 3.0.1 on PyPI, adds it)"
    params = [p for p in net.parameters() if p.requires_grad]
    op = HessianLinearOperator(net, nn.MSELoss(), params, [(x, y)], check_deterministic=False)
    return lambda: op @ v


def part1(args: argparse.Namespace) -> str:
    rows = [
        "Part 1: one process, tanh MLP 32-w-w-1, N = "
        f"{args.n1} samples, MSE; times in seconds (best of {args.repeat}); "
        "plain = double backward from scratch per product; inertia_change: Split of 2 "
        "neurons per hidden layer, default tolerance.",
        "",
        "| P | w | dtype | build | HVP | HVP/s | plain | plain ÷ HVP | curvlinops "
        "| inertia_change | blocks (−, 0, +) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    print("\n".join(rows), flush=True)
    missing = ""
    for target in args.p:
        width = width_for(target)
        for dtype in args.dtypes:
            need, free = estimate_bytes(width, args.n1, dtype), available_bytes(args.device)
            p = n_params(width)
            if need > 0.8 * free:
                row = (
                    f"| {p:.2e} | {width} | {dtype_name(dtype)} | skipped: needs ~"
                    f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free |"
                )
                rows.append(row)
                print(row, flush=True)
                continue
            row, why = part1_row(width, dtype, args)
            missing = why or missing
            rows.append(row)
            print(row, flush=True)
    notes = [
        "",
        "blocks: the inertia of the complement blocks inertia_change sums (one eigenvalue "
        "per new direction of the 4 added neurons, about 4w). The model is not at a "
        "critical point: the counts show the size of the work, not a change of the "
        "landscape.",
    ]
    if missing:
        notes.append(f"curvlinops: {missing}.")
    print("\n".join(notes), flush=True)
    return "\n".join(rows + notes)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def warm_up(dtype: torch.dtype, device: str) -> None:
    """One tiny build and product first: the first call pays one-time import costs."""
    net, x, y = mlp(4, 8, dtype, device)
    HessianOperator(net, nn.MSELoss(), x, y, dtype=dtype).matvec(
        torch.ones(n_params(4), dtype=dtype, device=device)
    )


def operator_times(
    net: nn.Module, x: Tensor, y: Tensor, v: Tensor, dtype: torch.dtype, args: argparse.Namespace
) -> tuple[float, float]:
    """Build time and best product time of a HessianOperator (freed on return)."""
    sync(args.device)
    t = time.perf_counter()
    op = HessianOperator(net, nn.MSELoss(), x, y, dtype=dtype)
    sync(args.device)
    build = time.perf_counter() - t
    op.matvec(v)  # first product: allocator warm-up
    return build, best_time(lambda: op.matvec(v), args.repeat, args.device)


def part1_row(width: int, dtype: torch.dtype, args: argparse.Namespace) -> tuple[str, str]:
    """One row of the table, and why curvlinops was not measured ("" if it was)."""
    warm_up(dtype, args.device)
    net, x, y = mlp(width, args.n1, dtype, args.device)
    p = n_params(width)
    v = torch.randn(p, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(args.device)
    build, hvp = operator_times(net, x, y, v, dtype, args)
    plain = best_time(lambda: plain_hvp(net, x, y, v), args.repeat, args.device)
    peer = curvlinops_hvp(net, x, y, v)
    if isinstance(peer, str):
        peer_text = "—"
    else:
        peer_text = f"{best_time(peer, args.repeat, args.device):.3g}"
        del peer  # its recorded state would keep a graph alive, which widen refuses
    emb = torch_embed.widen(
        net,
        [width + 2, width + 2],
        torch_embed.Split(alpha=0.5),
        generator=torch.Generator().manual_seed(0),
    )
    sync(args.device)
    t = time.perf_counter()
    change = torch_embed.inertia_change(emb, net, nn.MSELoss(), x, y)
    sync(args.device)
    t_change = time.perf_counter() - t
    row = (
        f"| {p:.2e} | {width} | {dtype_name(dtype)} | {build:.3g} | {hvp:.3g} | "
        f"{1 / hvp:.3g} | {plain:.3g} | {plain / hvp:.2f} | {peer_text} | {t_change:.3g} | "
        f"{change.negative}, {change.zero}, {change.positive} |"
    )
    return row, peer if isinstance(peer, str) else ""


def library_data_parallel() -> bool:
    """Whether HessianOperator takes ``process_group=`` (the library's data-parallel API)."""
    return "process_group" in inspect.signature(HessianOperator).parameters


def library_inertia_change_parallel() -> bool:
    """Whether inertia_change takes ``process_group=``."""
    return "process_group" in inspect.signature(torch_embed.inertia_change).parameters


def slowest(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Best over ``repeat`` runs of the slowest rank's wall time, of the CPU time summed
    over the ranks, and the last result."""
    result = None
    wall = cpu = math.inf
    for _ in range(repeat):
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        took = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
        used = torch.tensor([time.process_time() - c], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        dist.all_reduce(used)
        wall, cpu = min(wall, float(took)), min(cpu, float(used))
    return wall, cpu, result


def hvp_time(
    net: nn.Module, xs: Tensor, ys: Tensor, n: int, repeat: int
) -> tuple[float, float, Tensor]:
    """Data-parallel products: the library's when it has process_group=, else our own."""
    v = torch.randn(
        sum(p.numel() for p in net.parameters()),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
    )
    if library_data_parallel():
        group = dist.group.WORLD
        op = HessianOperator(net, nn.MSELoss(), xs, ys, process_group=group)  # type: ignore[call-arg]

        def product() -> Tensor:
            return op.matvec(v)
    else:
        local = HessianOperator(net, nn.MSELoss(), xs, ys)
        weight = xs.shape[0] / n

        def product() -> Tensor:
            out = local.matvec(v) * weight
            dist.all_reduce(out)
            return out

    product()  # warm-up (one-time costs)
    return slowest(product, repeat)


def warm_up_change(rank: int, k: int) -> None:
    """One tiny distributed inertia_change first: its first call imports torch._dynamo.

    ``torch.func.grad_and_value`` (the gradient behind the default tolerance) imports it
    on first use, about 2 CPU-seconds that every process pays once, so k processes would
    pay them k times in the CPU column without doing more of the work being measured.
    """
    net, x, y = mlp(4, 8 * k, torch.float64, "cpu")
    split = torch_embed.Split(alpha=0.5)
    emb = torch_embed.widen(net, [5, 5], split, generator=torch.Generator().manual_seed(0))
    shard = slice(rank * 8, (rank + 1) * 8)
    torch_embed.inertia_change(
        emb, net, nn.MSELoss(), x[shard], y[shard], process_group=dist.group.WORLD
    )


def worker(rank: int, k: int, store: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=k)
    try:
        width = width_for(args.p2)
        net, x, y = mlp(width, args.n, torch.float64, "cpu")
        shard = slice(rank * args.n // k, (rank + 1) * args.n // k)
        xs, ys = x[shard], y[shard]
        out: dict[str, Any] = {}
        out["time"], out["cpu"], out["hvp"] = hvp_time(net, xs, ys, args.n, args.repeat)
        if library_inertia_change_parallel():
            warm_up_change(rank, k)
            emb = torch_embed.widen(
                net,
                [width + 2, width + 2],
                torch_embed.Split(alpha=0.5),
                generator=torch.Generator().manual_seed(0),
            )
            out["change_time"], out["change_cpu"], change = slowest(
                lambda: torch_embed.inertia_change(
                    emb, net, nn.MSELoss(), xs, ys, process_group=dist.group.WORLD
                ),
                1,
            )
            out["change"] = (change.negative, change.zero, change.positive)
        if rank == 0:
            torch.save(out, f"{store}.out")
    finally:
        dist.destroy_process_group()


def part2(args: argparse.Namespace) -> str:
    width = width_for(args.p2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    engine = (
        "the library's HessianOperator(..., process_group=)"
        if library_data_parallel()
        else "this script's all_reduce of per-rank HessianOperator products (the library "
        "has no process_group= yet)"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [
        f"Part 2: data parallel over gloo, P = {n_params(width):.2e} (w = {width}), N = "
        f"{args.n} samples split evenly, float64, one thread per process; {engine}. "
        f"Cores available to this run: {cores}; 1-min load average at the start: {load:.1f}.",
        "",
        "| processes | s per HVP | speed-up vs 1 | efficiency | CPU s (all ranks) "
        "| CPU ÷ 1 process | max rel diff vs 1 | inertia_change s | speed-up vs 1 "
        "| CPU s (all ranks) | CPU ÷ 1 process | blocks (−, 0, +) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    print("\n".join(rows), flush=True)
    base: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.procs:
            store = f"{tmp}/store{k}"
            mp.spawn(worker, args=(k, store, args), nprocs=k, join=True)
            out = torch.load(f"{store}.out")
            if base is None:
                base = out
            diff = float(((out["hvp"] - base["hvp"]).abs().max() / base["hvp"].abs().max()).item())
            speed = base["time"] / out["time"]
            row = (
                f"| {k} | {out['time']:.3g} | {speed:.2f} | {speed / k:.2f} | "
                f"{out['cpu']:.3g} | {out['cpu'] / base['cpu']:.2f} | {diff:.1e} |"
            )
            if "change" in out:
                ratio = base["change_time"] / out["change_time"]
                counts = ", ".join(map(str, out["change"]))
                cpu_ratio = out["change_cpu"] / base["change_cpu"]
                row += f" {out['change_time']:.3g} | {ratio:.2f} | {out['change_cpu']:.3g} |"
                row += f" {cpu_ratio:.2f} | {counts} |"
            else:
                row += " — | — | — | — | — |"
            rows.append(row)
            print(rows[-1], flush=True)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows.append("")
    rows.append(
        f"1-min load average at the end: {end_load:.1f} on {cores} cores (above the cores, "
        f"other work competes with the ranks: wall times then say little, CPU times more)."
    )
    if library_inertia_change_parallel():
        rows.append(
            "inertia_change: a Split of 2 neurons per hidden layer, default tolerance, "
            "inertia_change(..., process_group=) on each rank's shard (one run, after a "
            "tiny call that pays the one-time imports); the counts must not depend on the "
            "number of processes."
        )
    else:
        rows.append(
            "inertia_change over processes: not measured (this torch_embed's "
            "inertia_change has no process_group=)."
        )
    return "\n".join(rows)


def machine() -> str:
    cpu = cpu_model() or platform.processor() or platform.machine()
    return f"{cpu}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P ≈ 1e4, k = 1, 2 (smoke test)")
    parser.add_argument("--part", nargs="*", default=None, help="parts to run: 1, 2 (default all)")
    parser.add_argument("--p", type=float, nargs="*", default=None, help="part 1: target P")
    parser.add_argument("--p2", type=float, default=None, help="part 2: target P (1e6)")
    parser.add_argument("--n1", type=int, default=256, help="part 1: samples")
    parser.add_argument("--n", type=int, default=2048, help="part 2: samples over all ranks")
    parser.add_argument("--procs", type=int, nargs="*", default=None, help="part 2: k (1 2 4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best)")
    parser.add_argument("--device", default="cpu", help="part 1 device (part 2: CPU, gloo)")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md's block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.p = args.p or [1e4]
        args.p2 = args.p2 or 1e4
        args.procs = args.procs or [1, 2]
        args.n = min(args.n, 256)
        args.repeat = 1
    args.p = args.p or [1e5, 1e6, 1e7]
    args.p2 = args.p2 or 1e6
    args.procs = args.procs or [1, 2, 4]
    args.dtypes = [torch.float64] if args.quick else [torch.float32, torch.float64]
    parts = args.part or ["1", "2"]
    command = "python bench/scale.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--write")
    print(f"`{command}` on {machine()}, one thread per process.", flush=True)
    texts = [f"`{command}` on {machine()}, one thread per process."]
    for key in parts:
        texts.append({"1": part1, "2": part2}[key](args))
    if args.write:
        write_results("\n\n".join(texts), f"`{command}`", SECTION)


if __name__ == "__main__":
    main()
