"""Time and peak memory of ``torch_embed.widen`` on a large MLP, against a lower bound.

The MLP has ``--depth`` hidden layers of ``n`` units (input and output ``n`` too) and is
widened to ``w`` units per hidden layer with ``Split(alpha)``. The lower bound is what
any in-place widening must do at least: allocate the new tensors (the wide parameters,
plus the wide Adam moments with ``adam``) and write each of them once, measured as
``torch.empty(shape).copy_(source)`` for the same shapes. Ratios widen / bound are
printed (wall time, and process CPU time, which other processes on a shared machine
disturb less); the targets are time <= 2x and peak extra memory <= 1.5x the new tensors.

Every repeat runs in a fresh subprocess (bound first, then widen, each peak reset):
on CPU the peak is read from ``/proc/self/status`` (VmHWM, reset through
``/proc/self/clear_refs``), on CUDA from ``torch.cuda.max_memory_allocated``. The
"extra" memory is the peak during the call minus the resident memory just before it.

Usage::

    python bench/widen.py                      # 4 hidden layers 4096 -> 8192, CPU
    python bench/widen.py --quick              # 1024 -> 2048, one repeat
    python bench/widen.py --device cuda --sizes 4096:8192,8192:16384
    python bench/widen.py --threads 1,2 --alpha 0.3333333333333333
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model, proc_status_kib

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- child
def _rss(key: str) -> int:
    return proc_status_kib(key) * 1024


def _child(cfg: dict) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from torch_embed.schemes import Split
    from torch_embed.widen import widen

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    dt = getattr(torch, cfg["dtype"])
    n, w, depth = cfg["narrow"], cfg["wide"], cfg["depth"]
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    wide_shapes = []
    for k in range(depth + 1):
        fan_in, fan_out = (n if k == 0 else w), (n if k == depth else w)
        wide_shapes += [(fan_out, fan_in), (fan_out,)]
    copies = 3 if cfg["adam"] else 1  # parameters, and exp_avg + exp_avg_sq
    new_numel = copies * sum(int(torch.Size(s).numel()) for s in wide_shapes)

    # 1. the lower bound: allocate every new tensor and write it once
    src = torch.empty(new_numel, device=dev, dtype=dt).uniform_()
    keep = []
    sync()
    before = _start(cuda)
    t0, c0 = time.perf_counter(), time.process_time()
    offset = 0
    for _ in range(copies):
        for shape in wide_shapes:
            size = int(torch.Size(shape).numel())
            keep.append(
                torch.empty(shape, device=dev, dtype=dt).copy_(
                    src[offset : offset + size].view(shape)
                )
            )
            offset += size
    sync()
    result = {
        "bound_seconds": time.perf_counter() - t0,
        "bound_cpu": time.process_time() - c0,
        "bound_extra": _peak(cuda) - before,
    }
    del src, keep  # large blocks go back to the OS (CPU) or stay cached (CUDA)

    # 2. widen (planning included: it is what a user waits for)
    layers: list[nn.Module] = []
    for k in range(depth + 1):
        layers.append(nn.Linear(n, n, device=dev, dtype=dt))
        if k < depth:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers)
    opt = None
    if cfg["adam"]:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for p in net.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    sync()
    before = _start(cuda)
    t0, c0 = time.perf_counter(), time.process_time()
    widen(net, [w] * depth, Split(alpha=cfg["alpha"]), optimizer=opt, generator=gen)
    sync()
    result["widen_seconds"] = time.perf_counter() - t0
    result["widen_cpu"] = time.process_time() - c0
    result["widen_extra"] = _peak(cuda) - before
    assert net[0].out_features == w
    result["new_bytes"] = new_numel * _itemsize(dt)
    return result


def _itemsize(dt) -> int:
    import torch

    return torch.empty((), dtype=dt).element_size()


def _start(cuda: bool) -> int:
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    return _rss("VmRSS")


def _peak(cuda: bool) -> int:
    if cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    return _rss("VmHWM")


# ----------------------------------------------------------------------------- parent
def _run(cfg: dict) -> dict:
    # glibc raises its mmap threshold after large frees and then keeps freed memory
    # resident for reuse, which would hide part of the peak from VmHWM; a fixed
    # threshold returns every large block to the OS when it is freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine(device: str) -> str:
    cpu = cpu_model() or platform.processor() or "unknown CPU"
    import torch

    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    desc += f", Python {platform.python_version()}"
    if device == "cuda" and torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sizes", default="4096:8192", help="narrow:wide pairs, comma separated")
    ap.add_argument("--depth", type=int, default=4, help="hidden layers")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement (min time)")
    ap.add_argument("--threads", default="0", help="torch threads, comma separated (0: default)")
    ap.add_argument("--alpha", type=float, default=0.5, help="Split alpha")
    ap.add_argument("--quick", action="store_true", help="1024:2048, one repeat")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.sizes, args.repeats = "1024:2048", 1
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# bench/widen.py: {args.depth} hidden layers, Split(alpha={args.alpha:g}), {args.dtype}"
    )
    print(f"# machine: {_machine(args.device)}; device {args.device}; load average {load0:.1f}")
    header = (
        f"{'narrow->wide':>13} {'threads':>7} {'state':>6} {'new MiB':>8} {'bound s':>8} "
        f"{'widen s':>8} {'time x':>7} {'cpu x':>6} {'bound MiB':>9} {'widen MiB':>9} "
        f"{'mem x':>6}  target"
    )
    print(header)
    misses = 0
    for n, w in sizes:
        for nt in threads:
            for adam in (False, True):
                base = {
                    "device": args.device,
                    "dtype": args.dtype,
                    "narrow": n,
                    "wide": w,
                    "depth": args.depth,
                    "adam": adam,
                    "threads": nt,
                    "alpha": args.alpha,
                }
                runs = [_run(base) for _ in range(args.repeats)]
                tb = min(r["bound_seconds"] for r in runs)
                tw = min(r["widen_seconds"] for r in runs)
                cb = min(r["bound_cpu"] for r in runs)
                cw = min(r["widen_cpu"] for r in runs)
                mb = min(r["bound_extra"] for r in runs)
                mw = min(r["widen_extra"] for r in runs)
                new = runs[0]["new_bytes"]
                ok = tw <= 2 * tb and mw <= 1.5 * new
                misses += not ok
                mib = 2**20
                print(
                    f"{f'{n}->{w}':>13} {nt or 'default':>7} {'adam' if adam else 'none':>6} "
                    f"{new / mib:8.0f} {tb:8.3f} {tw:8.3f} {tw / tb:7.2f} {cw / cb:6.2f} "
                    f"{mb / mib:9.0f} {mw / mib:9.0f} {mw / new:6.2f}  {'ok' if ok else 'MISS'}",
                    flush=True,
                )
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# load average at the end {load1:.1f}; time x = widen / bound (wall, min of "
        f"{args.repeats}), cpu x = the same in process CPU time, mem x = widen peak extra "
        f"/ new tensors"
    )
    return 1 if misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
