"""Growing a small transformer mid-training, against the large model trained from scratch.

Task (generated in code, no download): modular addition. Each example is the sequence
``a b =`` over the tokens ``0..p-1`` and ``=``; the target is ``(a + b) mod p`` read at
the last position. Half of the ``p²`` pairs (a seeded permutation) are the training
set; the loss is the full-batch training cross-entropy, the accuracy is measured on the
other half at the end.

Model: a pre-LayerNorm GPT-style encoder written here (token and position embeddings,
``layers`` blocks of multi-head self-attention with separate q/k/v/o ``nn.Linear`` and
``F.scaled_dot_product_attention``, a GELU MLP, a final LayerNorm and a linear head).

Each *variant* grows one dimension of the narrow model (``d = 32``, 4 heads, FFN 64,
8 per head, one layer) at step ``--grow-at`` with :func:`torch_embed.widen` (widths, by group) or
:func:`torch_embed.deepen` (a block), the Adam state mapped by the same call, then keeps
training the same optimizer. Widths grow by ``widen``'s default scheme (Net2Net with
symmetric noise), except the residual stream to a non-multiple width: under LayerNorm
only a mean-fill (the ``Null`` scheme) keeps the function there. Its baseline is the
*target* shape trained from scratch for the same total number of steps, from the same
seed. Printed per variant (over seeds):

* ``Δ grow``: training loss just after growing minus just before (continuity; the
  function is kept, so this is rounding).
* ``final loss`` / ``scratch final loss``: geometric means over seeds.
* ``final ÷ scratch``: the grown model's final loss over the scratch model's (geometric
  mean, and the range over seeds).
* ``steps ÷ scratch``: per seed, steps (from step 0, the narrow phase included) until
  the grown model first reaches the scratch model's final loss, over the scratch run's
  total steps; ``never`` when it does not within the budget.
* ``acc`` / ``acc scratch``: held-out accuracy at the end.

A variant that the library refuses is printed with the refusal's message: growth there
is not supported (yet), and that is a result too.

Usage::

    python bench/growth_transformer.py            # 3 seeds, all variants
    python bench/growth_transformer.py --quick    # 1 seed, short (smoke test)
    python bench/growth_transformer.py --write    # also update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from _common import cpu_model, write_results
from torch import Tensor, nn

import torch_embed


@dataclass(frozen=True)
class Config:
    """The model's shape."""

    d: int = 32
    heads: int = 4
    head_dim: int = 8
    ffn: int = 64
    layers: int = 1


class Attention(nn.Module):
    """Multi-head self-attention with separate projections (no causal mask)."""

    def __init__(self, d: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = head_dim
        self.q = nn.Linear(d, heads * head_dim)
        self.k = nn.Linear(d, heads * head_dim)
        self.v = nn.Linear(d, heads * head_dim)
        self.o = nn.Linear(heads * head_dim, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Block(nn.Module):
    """A pre-LayerNorm transformer block."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d)
        self.attn = Attention(cfg.d, cfg.heads, cfg.head_dim)
        self.ln2 = nn.LayerNorm(cfg.d)
        self.fc1 = nn.Linear(cfg.d, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings, ``layers`` blocks, final LayerNorm, linear head."""

    def __init__(self, cfg: Config, vocab: int, length: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d)
        self.pos = nn.Parameter(0.02 * torch.randn(length, cfg.d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d)
        self.head = nn.Linear(cfg.d, vocab - 1)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))[:, -1]


def task(p: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All ``a b =`` sequences mod ``p``, split in half by a seeded permutation."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
    y = (a.flatten() + b.flatten()) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(1000 + seed))
    n = p * p // 2
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


Grow = Callable[[TinyGPT, torch.optim.Optimizer, Tensor, torch.Generator], None]


def group_of(model: nn.Module, example: Tensor, producer: str, size: int) -> str:
    """The name of the growable width group of ``size`` that ``producer`` writes."""
    for g in torch_embed.width_groups(model, (example,)):
        names = {u.module for u in g.producers}
        if producer in names and g.size == size:
            if not g.growable:
                raise ValueError(f"group {g.name!r} is not growable: {g.reason}")
            return g.name
    raise ValueError(f"no width group of size {size} produced by {producer!r}")


def widen_by(
    producer: str,
    old: Callable[[Config], int],
    new: int,
    scheme: torch_embed.Scheme | str = torch_embed.schemes.DEFAULT_SCHEME,
) -> Grow:
    """Grow the group that ``producer`` writes (of the size ``old(cfg)``) to ``new``."""

    def grow(m: TinyGPT, opt: torch.optim.Optimizer, x: Tensor, g: torch.Generator) -> None:
        cfg = config_of(m)
        name = group_of(m, x, producer, old(cfg))
        torch_embed.widen(m, {name: new}, scheme, example_inputs=(x,), optimizer=opt, generator=g)

    return grow


def deepen_after(index: int, mode: str) -> Grow:
    """Insert a block after ``blocks[index]`` (``deepen``'s ``mode``)."""

    def grow(m: TinyGPT, opt: torch.optim.Optimizer, x: Tensor, g: torch.Generator) -> None:
        deepen = getattr(torch_embed, "deepen", None)
        if deepen is None:
            raise ValueError("torch_embed.deepen is not available in this version")
        deepen(m, {"blocks": [index]}, mode=mode, optimizer=opt, example_inputs=(x,))

    return grow


def config_of(m: TinyGPT) -> Config:
    """The shape of a (possibly grown) model, read from its tensors."""
    block = m.blocks[0]
    if not isinstance(block, Block):
        raise TypeError(f"blocks[0] is a {type(block).__name__}, not a Block")
    return Config(
        d=m.tok.weight.shape[1],
        heads=block.attn.num_heads,
        head_dim=block.attn.head_dim,
        ffn=block.fc1.out_features,
        layers=len(m.blocks),
    )


def variants(base: Config) -> list[tuple[str, Grow, Config]]:
    """(name, growth, target shape) for every dimension, ×2 and a non-multiple."""
    ffn = "blocks.0.fc1"
    q = "blocks.0.attn.q"
    heads_x2, heads_odd = 2 * base.heads, base.heads + base.heads // 2
    ffn_x2, ffn_odd, d_x2, d_odd = 2 * base.ffn, 3 * base.ffn // 2, 2 * base.d, 3 * base.d // 2
    return [
        ("FFN ×2", widen_by(ffn, lambda c: c.ffn, ffn_x2), replace(base, ffn=ffn_x2)),
        ("FFN ×1.5", widen_by(ffn, lambda c: c.ffn, ffn_odd), replace(base, ffn=ffn_odd)),
        ("heads ×2", widen_by(q, lambda c: c.heads, heads_x2), replace(base, heads=heads_x2)),
        ("heads ×1.5", widen_by(q, lambda c: c.heads, heads_odd), replace(base, heads=heads_odd)),
        ("residual ×2", widen_by("tok", lambda c: c.d, d_x2), replace(base, d=d_x2)),
        # a LayerNorm'd stream grows to a non-multiple width only by mean-fill (Null)
        (
            "residual ×1.5 (mean-fill)",
            widen_by("tok", lambda c: c.d, d_odd, torch_embed.Null()),
            replace(base, d=d_odd),
        ),
        ("depth +1 (null)", deepen_after(0, "null"), replace(base, layers=base.layers + 1)),
        ("depth +1 (zero_out)", deepen_after(0, "zero_out"), replace(base, layers=base.layers + 1)),
    ]


@dataclass
class Run:
    """One training run's losses (per step) and final held-out accuracy."""

    losses: list[float]
    accuracy: float
    jump: float = 0.0


def train(
    model: TinyGPT,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    lr: float,
    grow: Grow | None = None,
    grow_at: int = 0,
    seed: int = 0,
) -> Run:
    """Full-batch Adam; ``grow`` is applied before step ``grow_at``."""
    x, y, xt, yt = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    jump = 0.0
    for step in range(steps):
        if grow is not None and step == grow_at:
            with torch.no_grad():
                before = F.cross_entropy(model(x), y).item()
            grow(model, opt, x[:8], torch.Generator().manual_seed(seed))
            with torch.no_grad():
                jump = F.cross_entropy(model(x), y).item() - before
        losses.append(_step(model, opt, x, y))
    with torch.no_grad():
        acc = (model(xt).argmax(-1) == yt).double().mean().item()
    return Run(losses, acc, jump)


def _step(model: TinyGPT, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    """One Adam step; the loss tensor (and its graph) dies here, so ``widen`` may run."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def steps_to(losses: list[float], target: float) -> int | None:
    """The first step (1-based) whose loss is at most ``target``."""
    for i, v in enumerate(losses):
        if v <= target:
            return i + 1
    return None


def main() -> int:
    """Run the variants and print the table."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 seed, short runs (smoke test)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--p", type=int, default=23, help="modulus")
    ap.add_argument("--steps", type=int, default=1200, help="total Adam steps per run")
    ap.add_argument("--grow-at", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.grow_at = 1, 120, 40
    torch.set_num_threads(1)
    base = Config()
    vocab = args.p + 1
    rows = []
    t0 = time.perf_counter()
    for name, grow, target in variants(base):
        finals: list[float] = []
        stepsr: list[str] = []
        losses: list[tuple[float, float]] = []
        jumps, accs, accs_s = [], [], []
        refused = ""
        for seed in range(args.seeds):
            data = task(args.p, seed)
            torch.manual_seed(seed)
            scratch = train(TinyGPT(target, vocab), data, args.steps, args.lr)
            torch.manual_seed(seed)
            narrow = TinyGPT(base, vocab)
            try:
                grown = train(narrow, data, args.steps, args.lr, grow, args.grow_at, seed)
            except (ValueError, TypeError) as e:
                refused = str(e).splitlines()[0][:110]
                break
            goal = scratch.losses[-1]
            s = steps_to(grown.losses, goal)
            finals.append(grown.losses[-1] / goal)
            stepsr.append("never" if s is None else f"{s / args.steps:.2f}")
            losses.append((grown.losses[-1], goal))
            jumps.append(grown.jump)
            accs.append(grown.accuracy)
            accs_s.append(scratch.accuracy)
        if refused:
            rows.append(f"| {name} | refused: {refused} | | | | | | |")
            continue
        gm = math.exp(statistics.fmean(math.log(v) for v in finals))
        grown_l = math.exp(statistics.fmean(math.log(a) for a, _ in losses))
        scratch_l = math.exp(statistics.fmean(math.log(b) for _, b in losses))
        rows.append(
            f"| {name} | {max(abs(j) for j in jumps):.1e} | {grown_l:.2e} | {scratch_l:.2e} | "
            f"{gm:.2f} ({min(finals):.2f}-{max(finals):.2f}) | {' / '.join(stepsr)} | "
            f"{statistics.fmean(accs):.2f} | {statistics.fmean(accs_s):.2f} |"
        )
        print(rows[-1], flush=True)
    wall = time.perf_counter() - t0
    head = (
        "| variant | max abs Δ grow | final loss | scratch final loss | final ÷ scratch "
        "(range) | steps ÷ scratch per seed | acc | acc scratch |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    cmd = "python bench/growth_transformer.py" + (" --quick" if args.quick else "")
    text = (
        f"`{cmd}` ({args.seeds} seeds, p = {args.p}, {args.steps} Adam steps, lr {args.lr}, "
        f"grown at step {args.grow_at}; narrow d = {base.d}, {base.heads} heads, FFN "
        f"{base.ffn}, {base.layers} layer; torch {torch.__version__}, "
        f"{cpu_model() or platform.machine()}, 1 thread, {wall:.0f} s)\n\n{head}\n"
        + "\n".join(rows)
    )
    print(text)
    if args.write:
        write_results(text, cmd, "## bench/growth_transformer.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
