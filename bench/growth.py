"""Student-teacher growth: escape by widening vs Net2Net, null neurons and GradMax.

The GradMax student-teacher setting (ANCHORS.md): a teacher MLP ``d_in -> 10 -> d_out``
with tanh, 1000 Gaussian inputs, MSE. A tanh student starts at width 5, grows by one
neuron every ``K = 200`` full-batch Adam steps, five times, then trains 500 more steps
(1500 in all, final width 10). Growth methods, each with the optimizer state carried
(mapped through the embedding by ``widen``) or reset (a fresh Adam after each growth):

* ``escape``   - :func:`torch_embed.landscape.saddles.escape`: split (any α within the
  bound, signed splits included) or null neuron along the most negative certified
  curvature, plus the line-search step along it;
* ``net2net``  - ``Net2Net()``: a random neuron split in two equal halves (α = 1/2);
* ``null``     - ``Null(fan_in_std=0.1)``: zero fan-out, random fan-in;
* ``gradmax``  - zero fan-out, fan-in along the top left singular vector of
  ``G' = σ'(0) Σ_i h̃_i δ_iᵀ`` (weights part), with the same norm as the random fan-in
  (an :class:`~torch_embed.Embedding` with ``null_fan_in``, GradMax's choice).

Reported: final training loss and the number of steps to reach a target loss, each as
a ratio to a width-10 student trained from scratch for the same 1500 steps, per seed
(ratio < 1: better than scratch); final-loss ratios are averaged geometrically, since
the losses span decades. Target = the scratch student's loss at step ``5K`` (when the
growing students reach width 10).

Usage::

    python bench/growth.py --quick      # 1 seed, K = 100, 250 more steps; < 30 s
    python bench/growth.py              # 3 seeds, < 4 min
    python bench/growth.py --write      # also update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import RESULTS, write_results  # noqa: E402

from torch_embed._blocks import layer_signals, null_coupling  # noqa: E402
from torch_embed.embedding import Embedding  # noqa: E402
from torch_embed.landscape.saddles import escape  # noqa: E402
from torch_embed.schemes import Net2Net, Null, plan  # noqa: E402
from torch_embed.widen import embed_, widen  # noqa: E402

SECTION = "## bench/growth.py"
MSE = nn.MSELoss()
METHODS = ("escape", "net2net", "null", "gradmax")


@dataclass
class Config:
    d_in: int = 10
    d_out: int = 5
    teacher_width: int = 10
    n: int = 1000
    start: int = 5
    grow_every: int = 200
    grows: int = 5
    tail: int = 500
    lr: float = 1e-2
    fan_in_std: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def steps(self) -> int:
        return self.grow_every * self.grows + self.tail


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)
    jumps: list[float] = field(default_factory=list)  # loss change at each growth
    notes: list[str] = field(default_factory=list)


def make_data(cfg: Config, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    teacher = nn.Sequential(
        nn.Linear(cfg.d_in, cfg.teacher_width), nn.Tanh(), nn.Linear(cfg.teacher_width, cfg.d_out)
    )
    with torch.no_grad():
        teacher[0].weight.copy_(torch.randn(cfg.teacher_width, cfg.d_in, generator=g) * 2)
        teacher[0].weight.div_(math.sqrt(cfg.d_in))
        teacher[0].bias.copy_(torch.randn(cfg.teacher_width, generator=g) * 0.5)
        teacher[2].weight.copy_(torch.randn(cfg.d_out, cfg.teacher_width, generator=g))
        teacher[2].weight.div_(math.sqrt(cfg.teacher_width))
        teacher[2].bias.zero_()
        x = torch.randn(cfg.n, cfg.d_in, generator=g)
        y = teacher(x)
    return x, y


def make_student(cfg: Config, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(cfg.d_in, width), nn.Tanh(), nn.Linear(width, cfg.d_out))


def full_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(MSE(net(x), y))


def gradmax_embedding(net: nn.Sequential, x, y, norm: float) -> Embedding:
    """A null neuron whose fan-in is GradMax's: the top left singular vector of G'."""
    signals = layer_signals(net, MSE, x, y, 0)
    g_prime = null_coupling(signals, 1.0)[: net[0].in_features]  # weights part, σ'(0) = 1
    u = torch.linalg.svd(g_prime, full_matrices=False).U[:, 0]
    m = net[0].out_features
    emb = plan(net, [m + 1], Null(bias=0.0))
    fan_in = torch.zeros(m + 1, net[0].in_features, dtype=torch.float64)
    fan_in[m] = norm * u
    return Embedding(emb.layout, (replace(emb.layers[0], null_fan_in=fan_in),))


def grow(method: str, net: nn.Sequential, x, y, opt, cfg: Config, gen, run: Run) -> None:
    m = net[0].out_features
    if method == "escape":
        res = escape(net, MSE, x, y, optimizer=opt)
        if res.escaped:
            c = res.steps[0].certificate
            run.notes.append(c.situation)
        else:  # no certified negative curvature: fall back to an equal split
            widen(net, [m + 1], Net2Net(), optimizer=opt, generator=gen)
            run.notes.append("fallback")
    elif method == "net2net":
        widen(net, [m + 1], Net2Net(), optimizer=opt, generator=gen)
    elif method == "null":
        widen(net, [m + 1], Null(fan_in_std=cfg.fan_in_std), optimizer=opt, generator=gen)
    elif method == "gradmax":
        emb = gradmax_embedding(net, x, y, cfg.fan_in_std * math.sqrt(cfg.d_in))
        embed_(net, emb, optimizer=opt)
    else:
        raise ValueError(method)


def train(cfg: Config, seed: int, data, method: str | None, carry: bool) -> Run:
    x, y = data
    width = cfg.start if method is not None else cfg.start + cfg.grows
    net = make_student(cfg, width, seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    run = Run()
    for step in range(cfg.steps):
        if method is not None and step and step % cfg.grow_every == 0:
            if step // cfg.grow_every <= cfg.grows:
                before = full_loss(net, x, y)
                grow(method, net, x, y, opt if carry else None, cfg, gen, run)
                run.jumps.append(full_loss(net, x, y) - before)
                if not carry:
                    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        opt.zero_grad()
        loss = MSE(net(x), y)
        run.losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        del loss  # its graph holds the parameters: widen refuses while it is alive
    run.losses.append(full_loss(net, x, y))
    assert method is None or net[0].out_features == cfg.start + cfg.grows
    return run


def steps_to(losses: list[float], target: float) -> float:
    return next((float(i) for i, v in enumerate(losses) if v <= target), math.inf)


def fmt(v: float, digits: int = 2) -> str:
    return "never" if not math.isfinite(v) else f"{v:.{digits}f}"


def run_all(cfg: Config) -> str:
    rows: dict[str, list[dict[str, float]]] = {}
    notes: dict[str, list[str]] = {}
    for seed in cfg.seeds:
        data = make_data(cfg, seed)
        scratch = train(cfg, seed, data, None, True)
        target = scratch.losses[cfg.grow_every * cfg.grows]
        s_final, s_steps = scratch.losses[-1], steps_to(scratch.losses, target)
        rows.setdefault("scratch width 10", []).append(
            {"final": s_final, "rf": 1.0, "steps": s_steps, "rs": 1.0, "jump": 0.0}
        )
        for method in METHODS:
            for carry in (True, False):
                name = f"{method}, {'carried' if carry else 'reset'} state"
                run = train(cfg, seed, data, method, carry)
                steps = steps_to(run.losses, target)
                rows.setdefault(name, []).append(
                    {
                        "final": run.losses[-1],
                        "rf": run.losses[-1] / s_final,
                        "steps": steps,
                        "rs": steps / s_steps,
                        "jump": statistics.fmean(run.jumps),
                    }
                )
                notes.setdefault(name, []).extend(run.notes)
        print(f"seed {seed} done", file=sys.stderr, flush=True)
    lines = [
        "| method | final loss | ÷ scratch | steps to target | ÷ scratch | mean Δloss at growth "
        "| escape chose |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, rs in rows.items():
        finals = [r["final"] for r in rs]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        steps = [r["steps"] for r in rs]
        mean_steps = statistics.fmean(steps) if all(map(math.isfinite, steps)) else math.inf
        ratio_s = [r["rs"] for r in rs]
        mean_rs = statistics.fmean(ratio_s) if all(map(math.isfinite, ratio_s)) else math.inf
        chose = notes.get(name, [])
        summary = ", ".join(f"{k} {chose.count(k)}" for k in sorted(set(chose))) or ""
        lines.append(
            f"| {name} | {statistics.fmean(finals):.2e} ± {sd:.1e} | "
            f"{statistics.geometric_mean(r['rf'] for r in rs):.2g} | {fmt(mean_steps, 0)} | "
            f"{fmt(mean_rs)} | {statistics.fmean(r['jump'] for r in rs):+.2e} | {summary} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, K=100, tail 250 (< 30 s)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    cfg = Config()
    if args.quick:
        cfg = Config(grow_every=100, tail=250, seeds=(0,))
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    table = run_all(cfg)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    cmd = " ".join(["python bench/growth.py", *(a for a in argv if a != "--write")])
    header = (
        f"Command: `{cmd}` ({elapsed:.0f} s wall, {cpu:.0f} s CPU; torch {torch.__version__}, "
        f"{platform.machine()}, 1 thread). Teacher {cfg.d_in} -> {cfg.teacher_width} -> "
        f"{cfg.d_out} tanh, {cfg.n} Gaussian inputs, MSE; student width {cfg.start}, +1 "
        f"neuron every {cfg.grow_every} full-batch Adam (lr {cfg.lr:g}) steps, {cfg.grows} "
        f"times, then {cfg.tail} more ({cfg.steps} steps); mean over seeds "
        f"{list(cfg.seeds)}. ÷ scratch: ratio to a width-{cfg.start + cfg.grows} student "
        f"trained from scratch for {cfg.steps} steps, per seed, then averaged (geometric "
        f"mean for the final loss, whose values span decades; < 1 is better). Target = the scratch "
        f"student's loss at step {cfg.grow_every * cfg.grows}. Δloss at growth: loss right "
        f"after minus right before growing (0 for exact embeddings; escape steps down).\n"
    )
    text = header + "\n" + table + "\n"
    print(text)
    print(f"elapsed {elapsed:.1f} s wall, {cpu:.1f} s CPU")
    if args.write:
        write_results(text, f"`{cmd}`", SECTION)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
