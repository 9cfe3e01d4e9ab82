"""How conservative is ``forward_error_bound``? Measured error / bound, per dtype and scheme.

A widening is output-preserving when ``|wide(x) - narrow(x)| <= bound(narrow, x) +
bound(wide, x)`` (torch_embed/exactness.py). This script widens random MLPs (tanh, GELU
and ReLU, with and without BatchNorm in eval mode) with each scheme, evaluates both
networks in each dtype on random inputs, and reports

* ``max ratio``: the largest ``|wide - narrow| / (bound_narrow + bound_wide)`` over all
  outputs and networks (must be <= 1; the smaller, the more conservative the bound),
* ``median ratio``: the median over networks of each network's largest ratio,
* ``exact %``: the share of outputs that are bit-identical after widening,
* ``eval ratio``: for reference, the largest ``|narrow_dtype(x) - narrow_float64(x)| /
  bound_narrow`` (the bound against the evaluation error it is meant to cover).

Usage::

    python bench/exactness.py            # 3 architectures x 8 seeds, 256 inputs
    python bench/exactness.py --quick    # 2 seeds
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_embed.exactness import forward_error_bound
from torch_embed.schemes import General, Net2Net, Null, Split, plan
from torch_embed.widen import embed_

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ARCHS = {
    "tanh 16-64-64-4": (16, (64, 64), 4, nn.Tanh, False),
    "gelu+bn 16-64-64-4": (16, (64, 64), 4, nn.GELU, True),
    "relu 16-128-4": (16, (128,), 4, nn.ReLU, False),
}


def build(arch: tuple, seed: int) -> nn.Sequential:
    d_in, hidden, d_out, act, bn = arch
    g = torch.Generator().manual_seed(seed)
    widths = (d_in, *hidden, d_out)
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        lin = nn.Linear(widths[k], widths[k + 1], dtype=torch.float64)
        bound = 1 / math.sqrt(widths[k])
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.uniform_(-bound, bound, generator=g)
        layers.append(lin)
        if k < len(widths) - 2:
            if bn:
                norm = nn.BatchNorm1d(widths[k + 1], dtype=torch.float64)
                with torch.no_grad():
                    norm.running_mean.uniform_(-0.5, 0.5, generator=g)
                    norm.running_var.uniform_(0.5, 2.0, generator=g)
                    norm.weight.uniform_(0.5, 1.5, generator=g)
                    norm.bias.uniform_(-0.5, 0.5, generator=g)
                layers.append(norm)
            layers.append(act())
    return nn.Sequential(*layers).eval()


def schemes(hidden: tuple[int, ...]) -> dict:
    """name -> (new widths, scheme factory taking a generator)."""
    double = [2 * m for m in hidden]

    def general(g: torch.Generator) -> General:
        sources, coefs = [], []
        for m, w in zip(hidden, double):
            src = list(range(m)) + torch.randint(0, m, (w - m,), generator=g).tolist()
            coef = torch.zeros(w, dtype=torch.float64)
            for s in range(m):
                idx = [j for j, t in enumerate(src) if t == s]
                c = 2.0 * torch.rand(len(idx), generator=g, dtype=torch.float64) - 0.5
                c[0] = 1.0 - c[1:].sum()
                coef[idx] = c
            sources.append(src)
            coefs.append(coef)
        return General(sources, coefs)

    return {
        "Split(1/2)": (double, lambda g: Split(alpha=0.5)),
        "Split(1/3)": (double, lambda g: Split(alpha=1 / 3)),
        "Split(-0.7)": (double, lambda g: Split(alpha=-0.7)),
        "Split(random)": (double, lambda g: Split(alpha="random")),
        "Split k=3": (
            [3 * m for m in hidden],
            lambda g: Split(alpha=(0.2, 0.3, 0.5), select="cyclic"),
        ),
        "Net2Net": ([m + m // 2 for m in hidden], lambda g: Net2Net()),
        "Net2Net(noise)": (double, lambda g: Net2Net(noise=0.5)),
        "Null(0.3)": (double, lambda g: Null(bias=0.3)),
        "General(random)": (double, general),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    seeds = 2 if args.quick else args.seeds
    torch.set_num_threads(1)  # small matrices; and results independent of thread count
    print(
        f"# bench/exactness.py: {len(ARCHS)} architectures x {seeds} seeds, "
        f"{args.inputs} standard-normal inputs; ratio = |wide - narrow| / bound"
    )
    print(
        f"{'dtype':>9} {'scheme':>16} {'max ratio':>10} {'median ratio':>13} {'exact %':>8} "
        f"{'eval ratio':>11}"
    )
    worst = 0.0
    for dname, dtype in DTYPES.items():
        for sname in schemes((1,)):
            ratios, exact, total, evals = [], 0, 0, []
            for arch in ARCHS.values():
                widths, factory = schemes(arch[1])[sname]
                for seed in range(seeds):
                    ref = build(arch, seed)
                    net = copy.deepcopy(ref).to(dtype)
                    g = torch.Generator().manual_seed(1000 + seed)
                    x = torch.randn(args.inputs, arch[0], generator=g, dtype=torch.float64)
                    x = x.to(dtype)
                    emb = plan(net, widths, factory(g), generator=g)
                    wide = copy.deepcopy(net)
                    embed_(wide, emb)
                    with torch.no_grad():
                        y, yw = net(x).double(), wide(x).double()
                        y64 = ref(x.double())
                    bn = forward_error_bound(net, x)
                    bound = bn + forward_error_bound(wide, x)
                    diff = (yw - y).abs()
                    ratios.append(float((diff / bound.clamp(min=1e-300)).max()))
                    exact += int((diff == 0).sum())
                    total += diff.numel()
                    if dtype != torch.float64:
                        evals.append(float(((y - y64).abs() / bn.clamp(min=1e-300)).max()))
            worst = max(worst, max(ratios))
            ev = f"{max(evals):11.2e}" if evals else f"{'-':>11}"
            print(
                f"{dname:>9} {sname:>16} {max(ratios):10.2e} {statistics.median(ratios):13.2e} "
                f"{100 * exact / total:8.1f} {ev}",
                flush=True,
            )
    print(f"# largest ratio over everything: {worst:.3g} (the criterion needs <= 1)")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
