"""Benchmarks for Hessians and inertia counts (issue 3), printed side by side.

Part 1 — building the dense float64 Hessian of a tanh MLP (8 -> w -> w -> 2, N = 256
samples, mean-squared error written out as ``((out - y)**2).mean()`` so that every
variant can run; ``nn.MSELoss`` breaks forward-over-reverse) at P ≈ 1k, 4k, 8k:
``torch_embed.hessian.hessian`` against ``torch.autograd.functional.hessian`` (default
and ``vectorize=True``) and ``torch.func.hessian``, all on the same flat loss function.
Every variant runs in a fresh subprocess; time is the best of ``--repeat`` runs, peak
memory is the growth of the process's peak resident set (``VmHWM`` in
``/proc/self/status``) during the build, or ``torch.cuda.max_memory_allocated`` growth
with ``--device cuda``. The results of all variants are compared entrywise.

Part 2 — counting the inertia of a symmetric matrix with known inertia (``Q D Qᵀ``, ``Q``
a product of 8 random Householder reflections, ``D`` with 5% exact zeros and random signs)
at n = 250 ... 8000 (``--sizes`` to choose): ``inertia(method="ldl")`` (two Bunch-Kaufman
factorizations plus the Lanczos gap estimate) against ``method="eigh"``, same default
tolerance rule; the counts must agree with each other and with ``D``. Wall and process
CPU time, each the best of several interleaved runs after an untimed warm-up; with one
thread on a loaded machine the CPU time is the steadier measure. It sets
``AUTO_LDL_MIN_SIZE``, the CPU crossover of ``method="auto"``.

Part 3 — the inertia after widening: ``before + inertia_change`` (per-step complement
blocks, :mod:`torch_embed.inertia_change`) against recounting the wide Hessian in full
(``hessian_inertia``), for the P ≈ 4k net of part 1 (N = 3072) at an exact critical
point (targets whose residual lies in ``ker Jᵀ``), widened by one neuron and by 10% of
its hidden neurons (``Split(alpha=0.5)``). The counts must be the same. (Slow: the
setup QR of the 6144×4062 Jacobian and the two full counts take ~25 min on a loaded
2-core machine; ``--quick`` uses P ≈ 1k, N = 1024.)

Usage::

    python bench/inertia.py                 # full run (several minutes on 2 cores)
    python bench/inertia.py --quick         # small sizes (< 1 min)
    python bench/inertia.py --part 2        # one part only (parts: 1, 2, ...)
    python bench/inertia.py --part 2 --sizes 300 500 1000   # part 2 at chosen sizes
    python bench/inertia.py --device cuda   # on a GPU
    python bench/inertia.py --write         # also append the tables to bench/RESULTS.md

Add a part by defining ``partN(args) -> str`` (returns the printed Markdown) and adding
it to ``PARTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import RESULTS, cpu_model, proc_status_kib  # noqa: E402

from torch_embed.hessian import flat_loss, hessian  # noqa: E402
from torch_embed.inertia import inertia  # noqa: E402

SECTION = "## bench/inertia.py"
N_SAMPLES = 256


# --------------------------------------------------------------------------- helpers
def machine() -> str:
    """One line describing where the numbers came from."""
    cpu = cpu_model() or platform.processor() or platform.machine()
    try:
        load = f"load avg {os.getloadavg()[0]:.1f}"
    except OSError:
        load = "load n/a"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {load}"
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mean_square(out: Tensor, target: Tensor) -> Tensor:
    return ((out - target) ** 2).mean()


def width_for(p_target: int) -> int:
    """Hidden width w of 8 -> w -> w -> 2 with P = w² + 12w + 2 closest to p_target."""
    return min(range(4, 400), key=lambda w: abs(w * w + 12 * w + 2 - p_target))


def bench_net(width: int, device: str) -> tuple[nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)
    ).double()
    x = torch.randn(N_SAMPLES, 8, dtype=torch.float64, generator=gen)
    y = torch.randn(N_SAMPLES, 2, dtype=torch.float64, generator=gen)
    return net.to(device), x.to(device), y.to(device)


# --------------------------------------------------------------------------- part 1
def _variants() -> dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    def ours(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return hessian(net, mean_square, x, y)

    def ours_reverse(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return hessian(net, mean_square, x, y, engine="reverse")

    def ours_forward(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return hessian(net, mean_square, x, y, engine="forward")

    def af(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        fl = flat_loss(net, mean_square, x, y)
        return torch.autograd.functional.hessian(fl.fn, fl.theta)

    def af_vec(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        fl = flat_loss(net, mean_square, x, y)
        return torch.autograd.functional.hessian(fl.fn, fl.theta, vectorize=True)

    def func(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        fl = flat_loss(net, mean_square, x, y)
        return torch.func.hessian(fl.fn)(fl.theta)

    return {
        "torch_embed.hessian": ours,
        "torch_embed.hessian(engine='reverse')": ours_reverse,
        "torch_embed.hessian(engine='forward')": ours_forward,
        "autograd.functional.hessian": af,
        "autograd.functional.hessian(vectorize=True)": af_vec,
        "torch.func.hessian": func,
    }


OURS = "torch_embed.hessian"


def worker(variant: str, width: int, device: str) -> dict[str, Any]:
    """Run one Hessian build in this (fresh) process; report time, memory, a fingerprint."""
    fn = _variants()[variant]
    fn(*bench_net(4, device))  # warm-up: one-time imports and dispatch setup not timed
    net, x, y = bench_net(width, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc_status_kib("VmRSS") * 1024
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    h = fn(net, x, y)
    _sync(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = proc_status_kib("VmHWM") * 1024 - base
    h = h.detach().to(torch.float64)
    probe = torch.Generator().manual_seed(1)
    idx = torch.randint(0, h.shape[0], (64, 2), generator=probe).to(h.device)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_bytes": peak,
        "P": h.shape[0],
        "sample": h[idx[:, 0], idx[:, 1]].cpu().tolist(),
        "scale": float(h.abs().max()),
        "asym": float((h - h.T).abs().max()),
    }


def run_worker(
    variant: str, width: int, device: str, timeout: float, mem_limit_gb: float
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", variant, "--width", str(width)]
    cmd += ["--device", device, "--threads", str(torch.get_num_threads())]

    def limit_memory() -> None:  # a runaway baseline must not take the machine down
        if mem_limit_gb > 0 and device == "cpu":  # CUDA reserves huge address space
            lim = int(mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=limit_memory,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if "alloc" in last.lower() or "memory" in last.lower():
            last = f"out of memory (address-space limit {mem_limit_gb:g} GiB)"
        return {"error": last[:80]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def part1(args: argparse.Namespace) -> str:
    sizes = [300] if args.quick else [1000, 4000, 8000]
    repeat = 1 if args.quick else args.repeat
    # the row-by-row autograd.functional default is 20x slower: full runs only
    variants = list(_variants())
    if args.quick:  # three variants; the row-by-row autograd.functional default is 20x slower
        variants = [OURS, "autograd.functional.hessian(vectorize=True)", "torch.func.hessian"]
    lines = [
        "### Part 1: dense Hessian build (float64, tanh MLP 8-w-w-2, N=256)",
        "",
        "| P | variant | wall (s) | CPU (s) | peak mem (MiB) | wall ÷ ours | CPU ÷ ours "
        "| mem ÷ ours | max rel diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for p_target in sizes:
        width = width_for(p_target)
        results: dict[str, dict[str, Any]] = {}
        for _ in range(
            repeat if p_target <= 4000 else 1
        ):  # interleave repeats so load changes hit every variant
            for v in variants:
                r = run_worker(v, width, args.device, args.timeout, args.mem_limit_gb)
                old = results.get(v)
                if old is None or ("error" in old and "error" not in r):
                    results[v] = r
                elif "error" not in r:  # keep the best of each measure
                    for key in ("seconds", "cpu_seconds", "peak_bytes"):
                        old[key] = min(old[key], r[key])
        ours = results[OURS]
        ref = torch.tensor(ours.get("sample", [0.0]))
        best_other: dict[str, Any] | None = None
        for v in variants:
            r = results[v]
            if "error" in r:
                p_err = width * width + 12 * width + 2
                lines.append(f"| {p_err} | {v} | failed: {r['error']} |||||||")
                continue
            p = r["P"]
            diff = float((torch.tensor(r["sample"]) - ref).abs().max()) / max(ours["scale"], 1e-300)
            t_ratio = r["seconds"] / ours["seconds"]
            c_ratio = r["cpu_seconds"] / ours["cpu_seconds"]
            m_ratio = r["peak_bytes"] / max(ours["peak_bytes"], 1)
            lines.append(
                f"| {p} | {v} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                f"{r['peak_bytes'] / 2**20:.0f} | {t_ratio:.2f} | {c_ratio:.2f} | "
                f"{m_ratio:.2f} | {diff:.1e} |"
            )
            if not v.startswith("torch_embed") and (
                best_other is None or r["seconds"] < best_other["seconds"]
            ):
                best_other = dict(r, name=v)
        if best_other is not None and "error" not in ours:
            summary.append(
                f"P={ours['P']}: fastest baseline {best_other['name']}: wall "
                f"{best_other['seconds']:.2f} s vs {ours['seconds']:.2f} s "
                f"({best_other['seconds'] / ours['seconds']:.2f}x), CPU "
                f"{best_other['cpu_seconds'] / ours['cpu_seconds']:.2f}x; peak memory "
                f"{ours['peak_bytes'] / 2**20:.0f} MiB vs "
                f"{best_other['peak_bytes'] / 2**20:.0f} MiB"
            )
    lines += ["", *[f"- {s}" for s in summary]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 2
def planted(n: int, device: str, seed: int = 0) -> tuple[Tensor, tuple[int, int, int]]:
    """``Q D Qᵀ`` with ``Q`` = 8 Householder reflections; returns it and D's inertia."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, dtype=torch.float64, generator=gen).sign()
    d *= torch.exp(2 * torch.randn(n, dtype=torch.float64, generator=gen))
    d[torch.randperm(n, generator=gen)[: n // 20]] = 0.0
    a = torch.diag(d).to(device)
    for _ in range(8):
        v = torch.randn(n, 1, dtype=torch.float64, generator=gen).to(device)
        v /= v.norm()
        av = a @ v
        # (I - 2vvᵀ) A (I - 2vvᵀ) = A - 2 v (Av)ᵀ - 2 (Av) vᵀ + 4 (vᵀAv) v vᵀ
        a = a - 2 * v @ av.T - 2 * av @ v.T + 4 * float(v.T @ av) * (v @ v.T)
    counts = (int((d < 0).sum()), int((d == 0).sum()), int((d > 0).sum()))
    return (a + a.T) / 2, counts


def part2(args: argparse.Namespace) -> str:
    sizes = [200, 600] if args.quick else [250, 500, 1000, 2000, 4000, 8000]
    sizes = args.sizes or sizes
    lines = [
        "### Part 2: inertia counting, ldl vs eigh (float64, default tolerance)",
        "",
        "| n | eigh (s) | ldl (s) | eigh ÷ ldl | eigh CPU (s) | ldl CPU (s) | CPU eigh ÷ ldl "
        "| counts eigh | counts ldl | planted | gap eigh | gap ldl |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    warm, _ = planted(64, args.device)  # one-time LAPACK/thread-pool setup is not timed
    for method in ("eigh", "ldl"):
        inertia(warm, method=method)
    for n in sizes:
        a, planted_counts = planted(n, args.device)
        best: dict[str, tuple[float, Any]] = {}
        cpu: dict[str, float] = {}  # process CPU time: steadier than wall time under load
        # best of 5 below n = 2000 (millisecond timings are noisy), of 2 up to 4000
        repeats = 1 if args.quick or n >= 4000 else 2 if n >= 2000 else 5
        for _ in range(repeats):  # interleaved, so load changes hit both methods
            for method in ("eigh", "ldl"):
                _sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                res = inertia(a, method=method)
                _sync(args.device)
                sec = time.perf_counter() - start
                cpu[method] = min(cpu.get(method, float("inf")), time.process_time() - cpu_start)
                if method not in best or sec < best[method][0]:
                    best[method] = (sec, res)
        (te, re_), (tl, rl) = best["eigh"], best["ldl"]
        ce, cl = cpu["eigh"], cpu["ldl"]
        lines.append(
            f"| {n} | {te:.4f} | {tl:.4f} | {te / tl:.2f} | {ce:.4f} | {cl:.4f} | "
            f"{ce / max(cl, 1e-9):.2f} | {re_.as_tuple()} | {rl.as_tuple()} | {planted_counts} "
            f"| {re_.gap:.1e} | {rl.gap:.1e} |"
        )
        print(lines[-1], flush=True)
        del a
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 3
def critical_targets(net: nn.Module, x: Tensor, residual: float, seed: int = 0) -> Tensor:
    """Targets that make the net's current parameters an exact critical point of the MSE.

    The residual ``r = f(x) - y`` is drawn in ``ker Jᵀ`` (``J = ∂f(x)/∂θ``; needs
    ``N·out > P``) with RMS ``residual``, so ``∇R = (2/(N·out)) Jᵀ r = 0`` up to rounding:
    a critical point with non-zero residuals (so the residual-weighted Hessian terms
    are not trivial), without any optimisation.
    """
    from torch.func import functional_call, jacrev

    params = {n: p.detach() for n, p in net.named_parameters()}
    jac = jacrev(lambda ps: functional_call(net, ps, (x,)), chunk_size=128)(params)
    jmat = torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in jac.values()], 1)
    del jac
    if jmat.shape[0] <= jmat.shape[1]:
        raise ValueError(f"need N·out > P, got {jmat.shape[0]} <= {jmat.shape[1]}")
    q, _ = torch.linalg.qr(jmat)
    del jmat
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(q.shape[0], dtype=q.dtype, generator=gen).to(q.device)
    r = z - q @ (q.T @ z)
    r *= residual * r.numel() ** 0.5 / r.norm()
    with torch.no_grad():
        out: Tensor = net(x) - r.view(x.shape[0], -1)
    return out


def part3(args: argparse.Namespace) -> str:
    import copy

    from torch_embed.hessian import gradient
    from torch_embed.inertia import hessian_inertia
    from torch_embed.inertia_change import inertia_change
    from torch_embed.schemes import Split
    from torch_embed.widen import widen

    width = width_for(1000 if args.quick else 4000)
    n = 1024 if args.quick else 3072
    net, _, _ = bench_net(width, args.device)  # part 1's net; more samples than part 1
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, dtype=torch.float64, generator=gen).to(args.device)
    loss = nn.MSELoss()
    start = time.perf_counter()
    y = critical_targets(net, x, 0.3)
    setup = time.perf_counter() - start
    p = sum(q.numel() for q in net.parameters())
    g0 = float(gradient(net, loss, x, y).norm())
    _sync(args.device)
    start = time.perf_counter()
    before = hessian_inertia(net, loss, x, y)
    _sync(args.device)
    t_before = time.perf_counter() - start
    lines = [
        "### Part 3: inertia after widening, before + inertia_change vs full recount",
        "",
        f"8 → {width} → {width} → 2 tanh MLP, P = {p}, N = {n}, `nn.MSELoss`, at an exact "
        f"critical point (residual in ker Jᵀ, |∇R| = {g0:.1e}; setup {setup:.0f} s). "
        f"Before (full): {before} in {t_before:.1f} s. Widening: `Split(alpha=0.5)`, random "
        f"neurons. *change, tol=before.tol* passes the before count's tolerance; *change, "
        f"default tol* estimates ‖H_wide‖ by power iteration first. Full recount: "
        f"`hessian_inertia` of the wide model (dense Hessian + default method). Change: best "
        f"of 3.",
        "",
        "| widening | P wide | full recount (s) | change, tol=before.tol (s) | ratio "
        "| change, default tol (s) | ratio | full counts | before + change | same |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    hidden = 2 * width
    k = max(1, round(0.1 * hidden))
    for label, new in (
        ("+1 neuron", [width + 1, width]),
        (f"+10% ({k} neurons)", [width + k // 2, width + k - k // 2]),
    ):
        wide = copy.deepcopy(net)
        emb = widen(wide, new, Split(alpha=0.5), generator=torch.Generator().manual_seed(1))
        p_wide = sum(q.numel() for q in wide.parameters())
        _sync(args.device)
        start = time.perf_counter()
        after = hessian_inertia(wide, loss, x, y)
        _sync(args.device)
        t_full = time.perf_counter() - start
        best: dict[str, tuple[float, Any]] = {}
        for mode in ("before", "default"):
            for _ in range(3):
                _sync(args.device)
                start = time.perf_counter()
                change = inertia_change(
                    emb, wide, loss, x, y, tol=before.tol if mode == "before" else None
                )
                _sync(args.device)
                sec = time.perf_counter() - start
                if mode not in best or sec < best[mode][0]:
                    best[mode] = (sec, change)
        (tb, cb), (td, cd) = best["before"], best["default"]
        same = (before + cb).as_tuple() == after.as_tuple() == (before + cd).as_tuple()
        lines.append(
            f"| {label} | {p_wide} | {t_full:.2f} | {tb:.3f} | {t_full / tb:.0f}x | {td:.3f} "
            f"| {t_full / td:.0f}x | {after.as_tuple()} | {(before + cb).as_tuple()} "
            f"| {'yes' if same else 'NO'} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


PARTS: dict[str, Callable[[argparse.Namespace], str]] = {"1": part1, "2": part2, "3": part3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 1 min")
    parser.add_argument("--part", nargs="*", default=None, help="parts to run (default all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="part 2: matrix sizes n")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant (best kept)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per variant run")
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=12.0,
        help="address-space limit per variant process (CPU; 0 = none)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two OpenMP threads "
        "spin-wait on each other and made timings 3-6x slower and erratic)",
    )
    parser.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.width, args.device)))
        return
    parts = args.part or list(PARTS)
    header = f"{SECTION}\n\n`python bench/inertia.py{' --quick' if args.quick else ''}"
    header += f"{' --part ' + ' '.join(parts) if args.part else ''}"
    header += f"{' --sizes ' + ' '.join(map(str, args.sizes)) if args.sizes else ''}"
    header += f"{' --threads ' + str(args.threads) if args.threads != 1 else ''}"
    header += f"{' --device ' + args.device if args.device != 'cpu' else ''}` on {machine()}."
    out = [header]
    print(header, flush=True)
    for key in parts:
        text = PARTS[key](args)
        print("\n" + text, flush=True)
        out.append(text)
    if args.write:
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        RESULTS.write_text(old.rstrip("\n") + "\n\n" + "\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
