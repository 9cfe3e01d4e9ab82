"""Warm starts: widen an MLP mid-training and keep training with the same optimizer.

Trains a narrow MLP (64 -> 16 -> 10, tanh, cross-entropy) on scikit-learn's bundled
digits (no download), widens the hidden layer to 64 at a fixed step with each scheme,
and continues for a fixed budget; the first scheme is ``widen``'s default
(``torch_embed.schemes.DEFAULT_SCHEME``). Each scheme is run twice: with the SAME optimizer
object, its state mapped by ``widen(..., optimizer=opt)`` ("mapped"), and with a new
optimizer after widening ("reset"). Baselines: random padding (``RandomPad``: new units
randomly initialised, the function changes), the narrow network trained on without
widening, and the wide network trained from scratch for the same total number of steps.

Measured per run (training loss on the full training set, every step):

* ``Δ widen``: loss of the widened network minus the loss just before widening (same
  parameters, same data): the function's continuity.
* ``worst Δ (20)``: the largest loss over the first 20 steps after widening minus the
  pre-widening loss (positive: the loss went up; how hard the optimizer jolts).
* ``final``: the loss after the budget; ``÷ scratch``: its ratio to the wide network
  trained from scratch.
* ``steps to target``: total steps (from step 0) until the loss first reaches the loss
  the narrow network ends with; ``÷ scratch`` likewise.

Averages over seeds (mean ± std over seeds for the final loss).

Usage::

    python bench/warmstart.py                 # full run (3 seeds, Adam and SGD+momentum)
    python bench/warmstart.py --quick         # 1 seed, shorter, Adam only (< 30 s)
    python bench/warmstart.py --write         # also update bench/RESULTS.md
    python bench/warmstart.py --sweep         # Adam: mapped ÷ reset over lr and beta2

``--sweep`` asks when the mapped state loses to a reset under Adam. Resetting Adam is a
training intervention of its own (a warm restart: fresh second moments, larger steps),
so next to each scheme's mapped ÷ reset ratio it prints the control: the narrow network
reset at the same step without widening, reset ÷ not reset. Ratios are per seed, then
geometric means over seeds (final losses span decades across the grid).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, write_results

import torch_embed
from torch_embed.schemes import DEFAULT_SCHEME

EVAL = 5  # full-training-set loss every EVAL steps ...
WINDOW = 20  # ... and every step for WINDOW steps after widening
SECTION = "## bench/warmstart.py"

SCHEMES: dict[str, torch_embed.Scheme] = {
    "default: net2net + noise 4": DEFAULT_SCHEME,
    "split α=1/2": torch_embed.Split(alpha=0.5),
    "split α=1/4": torch_embed.Split(alpha=0.25),
    "net2net": torch_embed.Net2Net(),
    "net2net + noise 0.5": torch_embed.Net2Net(noise=0.5),
    "net2net + noise 8": torch_embed.Net2Net(noise=8.0),
    "null β=0.5": torch_embed.Null(bias=0.5),
    "null, fan-in std 0.1": torch_embed.Null(fan_in_std=0.1),
    "random pad (baseline b)": torch_embed.RandomPad(),
}


@dataclass
class Config:
    narrow: int = 16
    wide: int = 64
    pre_steps: int = 200
    post_steps: int = 600
    batch: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    optimizers: tuple[str, ...] = ("adam", "sgd")
    adam_lr: float = 3e-3
    adam_beta2: float = 0.999
    sgd_lr: float = 0.05


def make_optimizer(name: str, params, cfg: Config) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.adam_lr, betas=(0.9, cfg.adam_beta2))
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.sgd_lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    mean = x[tr].mean(0)
    return x[tr] - mean, y[tr], x[te] - mean, y[te]


def make_mlp(width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))


@dataclass
class Run:
    losses: list[float]  # full-training-set loss before each step, and at the end
    pre: float = math.nan  # loss just before widening
    at_widen: float = math.nan  # loss of the widened network at the same point
    test_acc: float = math.nan


def train(
    cfg: Config,
    opt_name: str,
    seed: int,
    data: tuple[torch.Tensor, ...],
    *,
    width: int,
    widen_with: torch_embed.Scheme | None = None,
    reset: bool = False,
) -> Run:
    xtr, ytr, xte, yte = data
    net = make_mlp(width, seed)
    opt = make_optimizer(opt_name, net.parameters(), cfg)
    batches = torch.Generator().manual_seed(1000 + seed)
    loss_fn = nn.CrossEntropyLoss()
    total = cfg.pre_steps + cfg.post_steps
    run = Run(losses=[])

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(net(xtr), ytr))

    p = cfg.pre_steps
    for step in range(total):
        if step == p and (widen_with is not None or reset):
            run.pre = full_loss()
            gen = torch.Generator().manual_seed(2000 + seed)
            if widen_with is not None:
                mapped = None if reset else opt
                torch_embed.widen(net, [cfg.wide], widen_with, optimizer=mapped, generator=gen)
            if reset:
                opt = make_optimizer(opt_name, net.parameters(), cfg)
            run.at_widen = full_loss()
        # every EVAL-th step, and every step just after widening (NaN elsewhere)
        dense = p <= step <= p + WINDOW
        run.losses.append(full_loss() if dense or step % EVAL == 0 else math.nan)
        idx = torch.randint(len(xtr), (cfg.batch,), generator=batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        del loss
    run.losses.append(full_loss())
    with torch.no_grad():
        run.test_acc = float((net(xte).argmax(1) == yte).float().mean())
    return run


def steps_to(losses: list[float], target: float) -> float:
    """First step whose loss is <= target (resolution EVAL steps away from the widening)."""
    for i, v in enumerate(losses):
        if v <= target:
            return float(i)
    return math.inf


def fmt_steps(v: float) -> str:
    return "never" if not math.isfinite(v) else f"{v:.0f}"


NARROW, RESTARTED, SCRATCH = (
    "narrow, no widening",
    "narrow, optimizer reset only",
    "wide from scratch (c)",
)


def label(scheme: str, reset: bool) -> str:
    return f"{scheme}, {'reset state (a)' if reset else 'mapped state'}"


def seed_runs(
    cfg: Config, opt_name: str, seed: int, data, *, scratch: bool = True
) -> dict[str, Run]:
    """Every run of one seed, by table label: the narrow baselines, the wide network from
    scratch (unless ``scratch=False``), each scheme with the state mapped and reset."""
    runs = {
        NARROW: train(cfg, opt_name, seed, data, width=cfg.narrow),
        RESTARTED: train(cfg, opt_name, seed, data, width=cfg.narrow, reset=True),
    }
    if scratch:
        runs[SCRATCH] = train(cfg, opt_name, seed, data, width=cfg.wide)
    for name, scheme in SCHEMES.items():
        for reset in (False, True):
            runs[label(name, reset)] = train(
                cfg, opt_name, seed, data, width=cfg.narrow, widen_with=scheme, reset=reset
            )
    return runs


def run_table(cfg: Config, opt_name: str, data) -> tuple[str, dict[str, dict[str, float]]]:
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in cfg.seeds:
        runs = seed_runs(cfg, opt_name, seed, data)
        scratch = runs[SCRATCH]
        target = runs[NARROW].losses[-1]
        s_final, s_steps = scratch.losses[-1], steps_to(scratch.losses, target)
        p = cfg.pre_steps
        for label, r in runs.items():
            post = r.losses[p : p + WINDOW + 1]
            pre = r.pre if not math.isnan(r.pre) else r.losses[p]
            st = steps_to(r.losses, target)
            rows.setdefault(label, []).append(
                {
                    "jump": r.at_widen - r.pre if not math.isnan(r.pre) else 0.0,
                    "worst": max(post) - pre,
                    "final": r.losses[-1],
                    "final_ratio": r.losses[-1] / s_final,
                    "steps": st,
                    "steps_ratio": st / s_steps if math.isfinite(st) else math.inf,
                    "test_acc": r.test_acc,
                }
            )
    summary: dict[str, dict[str, float]] = {}
    lines = [
        f"| run ({opt_name}) | max abs Δ widen | worst Δ (20) | final loss | ÷ scratch | "
        f"steps to target | ÷ scratch | test acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, items in rows.items():
        mean = {k: statistics.fmean(d[k] for d in items) for k in items[0]}
        mean["jump"] = max(abs(d["jump"]) for d in items)
        finals = [d["final"] for d in items]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        summary[label] = mean
        lines.append(
            f"| {label} | {mean['jump']:.1e} | {mean['worst']:+.4f} | {mean['final']:.4f} ± "
            f"{sd:.4f} | {mean['final_ratio']:.2f} | {fmt_steps(mean['steps'])} | "
            f"{mean['steps_ratio']:.2f} | {100 * mean['test_acc']:.1f}% |"
        )
    return "\n".join(lines), summary


def mapped_vs_reset(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    """Final loss with the mapped state over final loss with a reset optimizer (< 1: mapped
    is better), per scheme and optimizer."""
    opts = list(summaries)
    lines = [
        "| scheme | " + " | ".join(f"{o}: mapped ÷ reset final loss" for o in opts) + " |",
        "|---|" + "---:|" * len(opts),
    ]
    for name in SCHEMES:
        ratios = [
            summaries[o][label(name, False)]["final"] / summaries[o][label(name, True)]["final"]
            for o in opts
        ]
        lines.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    ratios = [summaries[o][RESTARTED]["final"] / summaries[o][NARROW]["final"] for o in opts]
    lines.append(
        "| (control: narrow, reset ÷ not reset) | " + " | ".join(f"{r:.2f}" for r in ratios) + " |"
    )
    return "\n".join(lines)


SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SWEEP_BETA2S = (0.9, 0.99, 0.999)


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def sweep(cfg: Config, data) -> str:
    """Adam over an lr x beta2 grid: per scheme, mapped ÷ reset final loss, next to the
    control (narrow network, reset ÷ not reset). Both < 1 together means resetting Adam
    helps on its own; mapped ÷ reset near 1 where the control is near 1 means the mapped
    state costs nothing beyond the restart."""
    lines = [
        "| Adam lr | β2 | narrow final loss | control: reset ÷ not reset | "
        + " | ".join(f"{n}: mapped ÷ reset" for n in SCHEMES)
        + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(SCHEMES),
    ]
    for lr in SWEEP_LRS:
        for beta2 in SWEEP_BETA2S:
            c = Config(**{**cfg.__dict__, "adam_lr": lr, "adam_beta2": beta2})
            narrow_final, control = [], []
            ratios: dict[str, list[float]] = {n: [] for n in SCHEMES}
            for seed in c.seeds:
                runs = seed_runs(c, "adam", seed, data, scratch=False)
                final = {k: r.losses[-1] for k, r in runs.items()}
                narrow_final.append(final[NARROW])
                control.append(final[RESTARTED] / final[NARROW])
                for name in SCHEMES:
                    ratios[name].append(final[label(name, False)] / final[label(name, True)])
            line = (
                f"| {lr:g} | {beta2:g} | {geomean(narrow_final):.2e} | "
                f"{geomean(control):.2f} | "
                + " | ".join(f"{geomean(v):.2f}" for v in ratios.values())
                + " |"
            )
            print(line, flush=True)
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, shorter, Adam only")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    parser.add_argument(
        "--sweep", action="store_true", help="Adam only: mapped ÷ reset over an lr x beta2 grid"
    )
    parser.add_argument("--pre-steps", type=int, help="steps before widening")
    parser.add_argument("--post-steps", type=int, help="steps after widening")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to average over")
    parser.add_argument("--wide", type=int, help="hidden width after widening (64)")
    parser.add_argument("--optimizers", nargs="+", choices=["adam", "sgd"])
    parser.add_argument("--adam-lr", type=float, help="Adam learning rate (3e-3)")
    parser.add_argument("--adam-beta2", type=float, help="Adam beta2 (0.999)")
    parser.add_argument("--sgd-lr", type=float, help="SGD learning rate (0.05)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    cfg = Config()
    if args.quick:
        cfg = Config(pre_steps=100, post_steps=200, seeds=(0,), optimizers=("adam",))
    for field in ("pre_steps", "post_steps", "wide", "adam_lr", "adam_beta2", "sgd_lr"):
        if getattr(args, field) is not None:
            setattr(cfg, field, getattr(args, field))
    if args.seeds:
        cfg.seeds = tuple(args.seeds)
    if args.optimizers:
        cfg.optimizers = tuple(args.optimizers)
    torch.set_num_threads(1)
    data = load_data()
    t0, c0 = time.perf_counter(), time.process_time()
    if args.sweep:
        table = sweep(cfg, data)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        text = (
            f"Command: `python bench/warmstart.py --sweep --write` ({elapsed:.0f} s wall, "
            f"{cpu:.0f} s CPU; torch {torch.__version__}, 1 thread). The benchmark's setup "
            f"(digits, 64 -> {cfg.narrow} -> 10 tanh, batch {cfg.batch}, widened to "
            f"{cfg.wide} after {cfg.pre_steps} steps, {cfg.post_steps} more) under Adam with "
            f"beta1 0.9 over a grid of learning rates and beta2. Entries are final "
            f"training losses' ratios per seed, geometric mean over seeds "
            f"{list(cfg.seeds)}; < 1: the first is lower.\n\n" + table + "\n"
        )
        print(f"elapsed {elapsed:.1f} s wall, {cpu:.1f} s CPU")
        if args.write:
            write_results(text, "`python bench/warmstart.py --sweep`", SECTION)
            print(f"updated {RESULTS}")
        return
    tables, summaries = [], {}
    for opt_name in cfg.optimizers:
        table, summaries[opt_name] = run_table(cfg, opt_name, data)
        tables.append(table)
        print(table, "\n", flush=True)
    verdict = mapped_vs_reset(summaries)
    print(verdict, "\n")
    tables.append(verdict)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    cmd = " ".join(["python bench/warmstart.py", *(a for a in argv if a != "--write")])
    opts = {
        "adam": f"Adam lr {cfg.adam_lr:g} betas (0.9, {cfg.adam_beta2:g})",
        "sgd": f"SGD lr {cfg.sgd_lr:g} momentum 0.9",
    }
    header = (
        f"Command: `{cmd.rstrip()} --write` ({elapsed:.0f} s wall, {cpu:.0f} s CPU; torch "
        f"{torch.__version__}, {platform.machine()}, 1 thread). Digits (sklearn, "
        f"1437 train / 360 test), "
        f"64 -> {cfg.narrow} -> 10 tanh MLP, cross-entropy, batch {cfg.batch}; widened to "
        f"{cfg.wide} after {cfg.pre_steps} steps, then {cfg.post_steps} more; "
        f"{', '.join(opts[o] for o in cfg.optimizers)}; mean over seeds "
        f"{list(cfg.seeds)}. Losses are on the full training set. Target = the narrow "
        f"network's final loss. ÷ scratch = ratio to the wide network trained from "
        f"scratch for the same {cfg.pre_steps + cfg.post_steps} steps (c).\n"
    )
    text = header + "\n" + "\n\n".join(tables) + "\n"
    print(f"elapsed {elapsed:.1f} s wall, {cpu:.1f} s CPU")
    if args.write:
        write_results(text, f"`{cmd.rstrip()}`", SECTION)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
