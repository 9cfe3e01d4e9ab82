"""data=: what splitting the data into batches costs in time and saves in memory.

``HessianOperator(net, loss, data=batches).matmat(V)`` for the same N samples given as
1, 4 and 16 batches: one batch records its forward and first backward pass once, at
construction; several batches record each batch again for every batched pass of
products, so the time grows by about one forward and one backward pass per pass, while
the memory holds one batch's graph at a time. Each configuration runs in a fresh process
(one thread), which reports its process CPU time for construction plus ``--passes``
calls of ``matmat`` of ``K`` vectors (best of ``--repeat``), and its peak resident
memory above the baseline after the data was built (``ru_maxrss``). Ratios are against
the one-batch run of the same invocation.

Usage::

    python bench/data.py                       # tanh MLP 8-256-256-1, N = 8192, K = 8
    python bench/data.py --width 128 --n 4096  # smaller
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch_embed.hessian import HessianOperator  # noqa: E402


def _child(width: int, n: int, batches: int, k: int, passes: int, repeat: int) -> dict[str, float]:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).double()
    x = torch.randn(n, 8, dtype=torch.float64, generator=gen)
    y = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    p = sum(q.numel() for q in net.parameters())
    vecs = torch.randn(k, p, dtype=torch.float64, generator=gen)
    data = list(zip(x.chunk(batches), y.chunk(batches), strict=True))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.process_time()
        op = HessianOperator(net, nn.MSELoss(), data=data, chunk_size=k)
        for _ in range(passes):
            out = op.matmat(vecs)
        best = min(best, time.process_time() - t0)
        del op
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out is not None
    return {"p": p, "seconds": best, "peak_mib": (peak - base) / 1024, "norm": float(out.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--k", type=int, default=8, help="vectors per pass")
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        res = _child(args.width, args.n, args.child, args.k, args.passes, args.repeat)
        print(json.dumps(res))
        return
    rows = []
    for b in args.batches:
        cmd = [sys.executable, __file__, "--child", str(b)]
        cmd += ["--width", str(args.width), "--n", str(args.n), "--k", str(args.k)]
        cmd += ["--passes", str(args.passes), "--repeat", str(args.repeat)]
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": ""}
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append((b, json.loads(done.stdout.strip().splitlines()[-1])))
    first = rows[0][1]
    print(
        f"tanh MLP 8-{args.width}-{args.width}-1 (P = {first['p']}), N = {args.n}, "
        f"K = {args.k} vectors x {args.passes} passes, one thread, CPU time best of "
        f"{args.repeat}"
    )
    print(
        f"{'batches':>8} {'seconds':>9} {'x time':>7} {'peak MiB':>9} {'x memory':>9} {'|HV|':>12}"
    )
    for b, r in rows:
        print(
            f"{b:>8} {r['seconds']:>9.3f} {r['seconds'] / first['seconds']:>7.2f} "
            f"{r['peak_mib']:>9.1f} {r['peak_mib'] / max(first['peak_mib'], 1e-9):>9.2f} "
            f"{r['norm']:>12.6g}"
        )


if __name__ == "__main__":
    main()
