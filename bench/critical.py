"""How fast and how reliably does ``critical_point`` reach ``|∇R| <= 1e-12`` from random starts?

A fixed, seeded table of small smooth MLPs with MSE loss (the nets torch_embed polishes:
1-d or few-d input, widths 2-60, N = 64..2000, P = 7..~2000). For each case the script
runs :func:`torch_embed.critical.critical_point` from the same random start and prints

* ``time``: wall seconds, ``lbfgs`` / ``newton``: the iterations of each phase,
  ``hessians``: dense Hessians computed and eigendecomposed,
* ``|∇R|``: the final gradient norm, recomputed here with plain autograd,
* ``conv``: whether ``gtol`` was reached, and ``loss``: the final loss,
* ``peer |∇R|``, ``peer loss``: a baseline, ``torch.optim.LBFGS`` alone (strong Wolfe,
  ``tolerance_grad=0``, ``tolerance_change=0``, history 50) from the same start, given the
  same wall time (at least 1 s): the smallest gradient norm it reached and the loss there.

One case starts next to a split of a polished narrow critical point (degenerate by
construction: its critical set is a manifold, the Hessian has structural zeros).

Usage::

    python bench/critical.py                 # the whole table (under ~3 min on 2 cores)
    python bench/critical.py --cases w2,w4   # some cases
    python bench/critical.py --no-peer       # skip the L-BFGS baseline
    python bench/critical.py --max-time 0    # no time limit per case (default 20 s)
    git show 6c2e116:torch_embed/critical.py > /tmp/old.py
    python bench/critical.py --impl /tmp/old.py   # the version before issue 3
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_embed.critical import critical_point
from torch_embed.widen import widen

F64 = torch.float64
MSE = nn.MSELoss()


def _mlp(widths: tuple[int, ...], act: type[nn.Module], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        layers.append(nn.Linear(widths[k], widths[k + 1]))
        if k < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def _stairs(n: int) -> tuple[Tensor, Tensor]:
    """Three tanh steps plus a wiggle (so that no narrow net fits it exactly)."""
    x = torch.linspace(-2, 2, n, dtype=F64).unsqueeze(1)
    y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
    return x, y + 0.3 * torch.sin(4 * x)


def _surface(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, 2, dtype=F64, generator=g) - 1
    y = (torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:]) + 0.3 * x[:, :1] * x[:, 1:]).reshape(
        n, 1
    )
    return x, y


Case = tuple[nn.Module, Tensor, Tensor]


def _one_hidden(width: int, act: type[nn.Module] = nn.Tanh, seed: int = 0, n: int = 64) -> Case:
    x, y = _stairs(n)
    return _mlp((1, width, 1), act, seed), x, y


def _two_layer() -> Case:
    x, y = _surface(256, 1)
    return _mlp((2, 16, 16, 1), nn.Tanh, 0), x, y


def _split_start() -> Case:
    """A polished 1-2-1 tanh critical point, split to width 4, moved off by 1e-4."""
    net, x, y = _one_hidden(2, seed=0)
    res = critical_point(net, MSE, x, y, gtol=1e-13)
    if not res.converged:
        raise RuntimeError(f"could not polish the narrow net of the split case: {res}")
    widen(net, [4], "split", generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-4 * torch.randn(p.shape, dtype=F64, generator=g))
    return net, x, y


def _large() -> Case:
    x, y = _surface(1000, 2)
    return _mlp((2, 40, 40, 1), nn.Tanh, 0), x, y


CASES: dict[str, Callable[[], Case]] = {
    "w2 s0": lambda: _one_hidden(2, seed=0),
    "w2 s2": lambda: _one_hidden(2, seed=2),
    "w4 s2": lambda: _one_hidden(4, seed=2),
    "w8 s1": lambda: _one_hidden(8, seed=1),
    "w16 s1": lambda: _one_hidden(16, seed=1),
    "2-16-16-1": _two_layer,
    "sigmoid w8": lambda: _one_hidden(8, nn.Sigmoid, seed=1),
    "softplus w8": lambda: _one_hidden(8, nn.Softplus, seed=1),
    "split 2->4": _split_start,
    "2-40-40-1 N=1000": _large,
}


def _grad_norm(net: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    net.zero_grad()
    loss = MSE(net(x), y)
    loss.backward()
    norm = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm()
    net.zero_grad()
    return float(norm), float(loss.detach())


def _peer(net: nn.Module, x: Tensor, y: Tensor, budget: float) -> tuple[float, float]:
    """torch.optim.LBFGS alone for ``budget`` seconds: the smallest |∇R| it reached, loss."""
    params = list(net.parameters())
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        value = MSE(net(x), y)
        value.backward()
        return value

    best = _grad_norm(net, x, y)
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        opt.step(closure)
        norm, loss = _grad_norm(net, x, y)
        if not math.isfinite(norm):
            break
        if norm < best[0]:
            best = (norm, loss)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--gtol", type=float, default=1e-12)
    parser.add_argument("--no-peer", action="store_true", help="skip the L-BFGS baseline")
    parser.add_argument(
        "--impl",
        default="",
        help="load critical_point from this file instead (e.g. an older version saved with "
        "`git show REV:torch_embed/critical.py > old.py`; --max-time is then ignored)",
    )
    parser.add_argument(
        "--max-time", type=float, default=20.0, help="critical_point's max_time per case (s)"
    )
    args = parser.parse_args()
    polish = critical_point
    if args.impl:
        spec = importlib.util.spec_from_file_location("critical_impl", args.impl)
        if spec is None or spec.loader is None:
            parser.error(f"cannot load {args.impl}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["critical_impl"] = module
        spec.loader.exec_module(module)
        polish = module.critical_point
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    for name in names:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; known: {', '.join(CASES)}")

    print(
        f"`python {' '.join(sys.argv)}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"load avg {os.getloadavg()[0]:.1f}, gtol {args.gtol:g}.\n"
    )
    print(
        "| case | P | N | time (s) | lbfgs | newton | hessians | \\|∇R\\| | conv | loss "
        "| peer \\|∇R\\| | peer loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    total = 0.0
    for name in names:
        net, x, y = CASES[name]()
        start_state = copy.deepcopy(net.state_dict())
        n_params = sum(p.numel() for p in net.parameters())
        t0 = time.perf_counter()
        kwargs = {"max_time": args.max_time} if args.max_time > 0 and not args.impl else {}
        res = polish(net, MSE, x, y, gtol=args.gtol, **kwargs)
        elapsed = time.perf_counter() - t0
        total += elapsed
        norm, loss = _grad_norm(net, x, y)
        peer = "- | -"
        if not args.no_peer:
            net.load_state_dict(start_state)
            peer_norm, peer_loss = _peer(net, x, y, max(elapsed, 1.0))
            peer = f"{peer_norm:.1e} | {peer_loss:.6g}"
        print(
            f"| {name} | {n_params} | {x.shape[0]} | {elapsed:.2f} | {res.lbfgs_iterations} | "
            f"{res.newton_iterations} | {getattr(res, 'hessian_evaluations', '-')} | "
            f"{norm:.1e} | {'yes' if norm <= args.gtol else 'NO'} | "
            f"{loss:.6g} | {peer} |",
            flush=True,
        )
    print(f"\ntotal critical_point time: {total:.1f} s")


if __name__ == "__main__":
    main()
