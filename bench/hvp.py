"""Hessian-vector products: what one ``hvp`` call costs, and batches under a memory limit.

Part 1 — one ``hvp(model, loss, x, y, v)`` call with one vector against the least work
the same product needs, done directly with ``torch.func`` in the same run (the forward
and first backward pass recorded once by ``vjp(grad(R))``, then one second backward
pass). A ratio near 1 means the call adds no checking forward pass and no probe
product. Tanh MLP 8-w-w-1, float64, N samples; process CPU time, best of ``--repeat``
interleaved runs, one thread.

Part 2 — ``HessianOperator.matmat`` of K vectors in a fresh process whose address space
is capped (``RLIMIT_AS`` = its current size + ``--limit-gib``, as ``ulimit -v`` would):
the default batch (sized from the free memory, see ``HessianOperator``) against a
fixed batch of ``DEFAULT_CHUNK`` vectors (``chunk_size=128``, the old default).

Usage::

    python bench/hvp.py                 # both parts
    python bench/hvp.py --part 1        # one part
    git show 5516897:torch_embed/hessian.py > /tmp/old.py
    python bench/hvp.py --part 1 --impl /tmp/old.py   # part 1 with another hessian.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch_embed.hessian import DEFAULT_CHUNK, HessianOperator, flat_loss  # noqa: E402


def mlp(width: int, n: int) -> tuple[nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).double()
    x = torch.randn(n, 8, dtype=torch.float64, generator=gen)
    y = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    return net, x, y


def direct(net: nn.Module, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """The same product with nothing around it: record once, one second backward pass."""
    fl = flat_loss(net, nn.MSELoss(), x, y)
    vjp_fn = vjp(grad(fl.fn), fl.theta)[1]
    out: Tensor = vmap(lambda u: vjp_fn(u)[0])(v.reshape(1, -1))
    return out.reshape(-1)


def part1(args: argparse.Namespace) -> None:
    impl: Any = sys.modules["torch_embed.hessian"]
    if args.impl:
        spec = importlib.util.spec_from_file_location("hessian_impl", args.impl)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot load {args.impl}")
        impl = importlib.util.module_from_spec(spec)
        sys.modules["hessian_impl"] = impl
        spec.loader.exec_module(impl)
    print("| P | N | hvp (s CPU) | direct (s CPU) | hvp ÷ direct | max abs diff |")
    print("|---|---|---|---|---|---|")
    for width, n in ((50, 256), (200, 1024)):
        net, x, y = mlp(width, n)
        p = sum(q.numel() for q in net.parameters())
        v = torch.randn(p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        hvp = impl.hvp
        hvp(net, nn.MSELoss(), x, y, v)  # one-time setup not timed
        best = {"hvp": float("inf"), "direct": float("inf")}
        outs: dict[str, Tensor] = {}
        for _ in range(args.repeat):
            for name in best:
                start = time.process_time()
                if name == "hvp":
                    outs[name] = hvp(net, nn.MSELoss(), x, y, v)
                else:
                    outs[name] = direct(net, x, y, v)
                best[name] = min(best[name], time.process_time() - start)
        diff = float((outs["hvp"] - outs["direct"]).abs().max())
        print(
            f"| {p} | {n} | {best['hvp']:.4f} | {best['direct']:.4f} | "
            f"{best['hvp'] / best['direct']:.2f} | {diff:.1e} |",
            flush=True,
        )


def worker(args: argparse.Namespace) -> None:
    """One capped matmat (run in a fresh process by part 2)."""
    net, x, y = mlp(args.width, args.samples)
    p = sum(q.numel() for q in net.parameters())
    vs = torch.randn(args.vectors, p, dtype=torch.float64, generator=torch.Generator())
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    limit = vm + int(args.limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    chunk = None if args.worker == "default" else DEFAULT_CHUNK
    op = HessianOperator(net, nn.MSELoss(), x, y, chunk_size=chunk)
    batches: list[int] = []
    product = op._products._hv

    def recorded(rows: Tensor) -> Tensor:
        batches.append(len(rows))
        out: Tensor = product(rows)
        return out

    op._products._hv = recorded
    start = time.process_time()
    try:
        op.matmat(vs)
    except MemoryError as err:
        print(
            f"| {args.worker} | {p} | {args.samples} | {args.vectors} | - | failed: "
            f"{str(err)[:90]}... |"
        )
        return
    sec = time.process_time() - start
    batch = ", ".join(f"{n}x{b}" for b, n in sorted(Counter(batches).items(), reverse=True))
    per = op._products.vector_bytes
    note = f"measured {per / 2**20:.1f} MiB per vector" if per else "fixed"
    print(
        f"| {args.worker} | {p} | {args.samples} | {args.vectors} | {batch} | ok, "
        f"{sec:.1f} s CPU; {note} |"
    )


def part2(args: argparse.Namespace) -> None:
    print(f"Address space capped at +{args.limit_gib:g} GiB.\n")
    print("| batch | P | N | K | batches (count x vectors) | result |")
    print("|---|---|---|---|---|---|")
    for mode in ("default", "fixed-128"):
        cmd = [sys.executable, __file__, "--worker", mode, "--limit-gib", str(args.limit_gib)]
        cmd += ["--width", str(args.width), "--samples", str(args.samples)]
        cmd += ["--vectors", str(args.vectors)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        run = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        lines = run.stdout.strip().splitlines()
        print(lines[-1] if lines else f"| {mode} | crashed: {run.stderr.strip()[-90:]} |||||")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="*", default=None, help="parts to run (1, 2)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--limit-gib", type=float, default=1.5)
    parser.add_argument("--width", type=int, default=300, help="part 2: hidden width")
    parser.add_argument("--samples", type=int, default=1024, help="part 2: N")
    parser.add_argument("--vectors", type=int, default=130, help="part 2: K")
    parser.add_argument("--impl", help="part 1: time hvp from this copy of hessian.py")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        worker(args)
        return
    print(f"`python bench/hvp.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print(f"torch {torch.__version__}, one thread, load avg {os.getloadavg()[0]:.1f}\n")
    parts = args.part or ["1", "2"]
    if "1" in parts:
        part1(args)
        print()
    if "2" in parts:
        part2(args)


if __name__ == "__main__":
    main()
