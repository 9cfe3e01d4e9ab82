"""Small full-batch training loops and the networks and initialisations of the papers.

The experiments train tiny MLPs on the whole data set at every step (full-batch
gradient descent or Adam), as the papers do. :func:`train` records the loss on a grid
of steps and shows a progress line when a run takes more than a few seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from torch_embed.experiments.progress import Progress

if TYPE_CHECKING:
    from torch_embed.critical import CriticalPointResult

__all__ = [
    "BatchedMLP",
    "History",
    "batched_mse",
    "find_plateaus",
    "log_grid",
    "mlp",
    "narrow_critical_net",
    "small_init_",
    "threads",
    "train",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
}


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the old value after.

    The experiments' networks are tiny: their matrices are far too small to gain from
    intra-op parallelism, and on a busy 2-core machine two threads were measured 5x
    slower than one for a full-batch Adam step of a width-2 net. ``None`` leaves the
    setting alone.

    Example:
        >>> old = torch.get_num_threads()
        >>> with threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == old
        True
    """
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def mlp(
    widths: Sequence[int],
    activation: Literal["tanh", "sigmoid", "relu"] = "tanh",
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """A fully connected ``nn.Sequential``: ``Linear, act, Linear, act, ..., Linear``.

    Args:
        widths: ``(input, hidden_1, ..., output)``; at least three entries.
        activation: The element-wise activation of every hidden layer.
        dtype: Parameter dtype.
        device: Parameter device.

    Example:
        >>> mlp([1, 3, 1])
        Sequential(
          (0): Linear(in_features=1, out_features=3, bias=True)
          (1): Tanh()
          (2): Linear(in_features=3, out_features=1, bias=True)
        )
    """
    if len(widths) < 3:
        raise ValueError(f"widths needs input, at least one hidden and output width: {widths}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        layers.append(nn.Linear(widths[k], widths[k + 1], dtype=dtype, device=device))
        if k < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def small_init_(
    module: nn.Module,
    *,
    exponent: float,
    width: int | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """The papers' small initialisation: every weight and bias ``~ N(0, 1/m^exponent)``.

    Args:
        module: The network (its parameters are overwritten in place).
        exponent: ``γ`` in the variance ``1/m^γ`` (3 for Fig. 1, 6 for Figs. 3(b), 5).
        width: ``m``; default the largest ``out_features`` of the hidden Linear layers.
        generator: A CPU ``torch.Generator`` (the draws are made on the CPU in float64
            and then copied, so a seed gives the same network on every device).

    Example:
        >>> net = mlp([1, 100, 1])
        >>> small_init_(net, exponent=3, generator=torch.Generator().manual_seed(0))
        >>> 0.0005 < net[0].weight.std().item() < 0.0015  # 100**-1.5 = 0.001
        True
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if width is None:
        hidden = [lin.out_features for lin in linears[:-1]]
        if not hidden:
            raise ValueError("small_init_ needs a network with at least one hidden layer")
        width = max(hidden)
    std = float(width) ** (-exponent / 2)
    with torch.no_grad():
        for p in module.parameters():
            draw = torch.randn(p.shape, generator=generator, dtype=torch.float64) * std
            p.copy_(draw.to(p.dtype))


class BatchedMLP(nn.Module):
    """``runs`` independent one-hidden-layer MLPs trained as one module.

    Many small training runs (Fig. 4's hundreds of restarts, Fig. 1's narrow nets) cost
    about as much as one when their parameters are stacked: every step is one batched
    matrix product instead of ``runs`` tiny ones. With :func:`batched_mse` (the sum of
    the runs' mean losses) each run's gradient is exactly its own, and plain gradient
    descent and Adam (element-wise) update each run exactly as if it were alone.

    Args:
        runs: Number of networks.
        widths: ``(input, hidden, output)``.
        activation: Hidden activation.
        generator: CPU generator for the initialisation.
        std: Standard deviation of a normal initialisation of every weight and bias;
            ``None`` draws like ``nn.Linear``'s default (uniform, bound ``1/sqrt(fan_in)``).
        dtype: Parameter dtype.
        device: Parameter device.

    Example:
        >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
        >>> nets = BatchedMLP(3, (1, 2, 1), generator=torch.Generator().manual_seed(0))
        >>> out = nets(x)
        >>> out.shape
        torch.Size([3, 8, 1])
        >>> single = nets.unbatch()[1]
        >>> torch.allclose(single(x), out[1])
        True
    """

    def __init__(
        self,
        runs: int,
        widths: tuple[int, int, int],
        activation: Literal["tanh", "sigmoid", "relu"] = "tanh",
        *,
        generator: torch.Generator | None = None,
        std: float | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}")
        d_in, m, d_out = widths
        self.widths = widths
        self.activation = activation
        self.act = _ACTIVATIONS[activation]()

        def draw(*shape: int, fan_in: int) -> nn.Parameter:
            if std is None:
                bound = 1.0 / fan_in**0.5
                t = (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1) * bound
            else:
                t = torch.randn(shape, generator=generator, dtype=torch.float64) * std
            return nn.Parameter(t.to(device=device, dtype=dtype))

        self.w1 = draw(runs, m, d_in, fan_in=d_in)
        self.b1 = draw(runs, m, fan_in=d_in)
        self.w2 = draw(runs, d_out, m, fan_in=m)
        self.b2 = draw(runs, d_out, fan_in=m)

    @property
    def runs(self) -> int:
        """Number of networks."""
        return int(self.w1.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        """Outputs of every run, shape ``(runs, N, output)``."""
        h = self.act(torch.einsum("nd,kmd->knm", x, self.w1) + self.b1[:, None, :])
        out: Tensor = torch.einsum("knm,kom->kno", h, self.w2) + self.b2[:, None, :]
        return out

    def unbatch(self) -> list[nn.Sequential]:
        """Each run as its own ``nn.Sequential`` (copies, same dtype and device)."""
        nets = []
        for k in range(self.runs):
            net = mlp(self.widths, self.activation, dtype=self.w1.dtype, device=self.w1.device)
            first, last = net[0], net[2]
            assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)  # built above
            with torch.no_grad():
                first.weight.copy_(self.w1[k])
                first.bias.copy_(self.b1[k])
                last.weight.copy_(self.w2[k])
                last.bias.copy_(self.b2[k])
            nets.append(net)
        return nets


def batched_mse(output: Tensor, target: Tensor) -> Tensor:
    """Sum over runs of each run's mean squared error (the loss for :class:`BatchedMLP`).

    Example:
        >>> batched_mse(torch.ones(2, 3, 1), torch.zeros(3, 1))
        tensor(2.)
    """
    return ((output - target) ** 2).mean(dim=(1, 2)).sum()


@dataclass
class History:
    """The loss recorded during :func:`train`.

    Attributes:
        steps: Step numbers at which the loss was recorded (``0`` = before training).
        losses: The full-batch loss at those steps.
        seconds: Wall-clock time of the run.
    """

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> float:
        """The last recorded loss."""
        return self.losses[-1]


def train(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    steps: int,
    lr: float,
    method: Literal["gd", "adam"] = "adam",
    record_every: int | None = None,
    record_at: Collection[int] | None = None,
    label: str | None = None,
    history: History | None = None,
    callback: Callable[[int, float], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> History:
    """Train ``model`` full-batch in place with plain gradient descent or Adam.

    Args:
        model: The network.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the scalar loss.
        inputs: All training inputs.
        targets: All training targets.
        steps: Number of optimizer steps.
        lr: Learning rate.
        method: ``"gd"`` (``torch.optim.SGD`` without momentum) or ``"adam"``.
        record_every: Record the loss every so many steps (default ``steps // 500``);
            the loss after the last step is always recorded.
        record_at: Record at exactly these steps (and the last) instead, e.g.
            :func:`log_grid`.
        label: Text of the progress line (shown only if the run takes over 3 s).
        history: Continue this history (its step numbers go on from its last one).
        callback: Called as ``callback(step, loss)`` at every recorded step (before the
            update of that step), e.g. to snapshot the model.
        optimizer: Step this optimizer (its state carried on, e.g. restored from a
            snapshot) instead of a new one; it must be of the kind ``method`` names and
            have learning rate ``lr``.

    Returns:
        The :class:`History` (the one passed in, extended, if any).

    Example:
        >>> x = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]
        >>> net = mlp([1, 4, 1])
        >>> h = train(net, nn.MSELoss(), x, x**2, steps=200, lr=0.05, record_every=100)
        >>> h.steps, h.losses[-1] < h.losses[0]
        ([0, 100, 200], True)
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    kinds: dict[str, type[torch.optim.Optimizer]] = {
        "gd": torch.optim.SGD,
        "adam": torch.optim.Adam,
    }
    if method not in kinds:
        raise ValueError(f"method must be 'gd' or 'adam', got {method!r}")
    opt: torch.optim.Optimizer
    if optimizer is None:
        opt = torch.optim.SGD(params, lr=lr) if method == "gd" else torch.optim.Adam(params, lr=lr)
    else:
        rates = {float(g["lr"]) for g in optimizer.param_groups}
        if type(optimizer) is not kinds[method] or rates != {float(lr)}:
            raise ValueError(
                f"optimizer is {type(optimizer).__name__} with lr {sorted(rates)}; method "
                f"{method!r} with lr {lr} needs {kinds[method].__name__} with lr {lr}"
            )
        opt = optimizer
    every = max(1, steps // 500) if record_every is None else max(1, int(record_every))
    marks = None if record_at is None else frozenset(int(s) for s in record_at)
    hist = History() if history is None else history
    offset = hist.steps[-1] if hist.steps else 0
    start = time.perf_counter()
    with Progress(label or f"training ({method})", steps) as bar:
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            due = step % every == 0 if marks is None else step in marks
            if due or step == steps:
                if not (hist.steps and hist.steps[-1] == offset + step):
                    hist.steps.append(offset + step)
                    hist.losses.append(float(loss.detach()))
                    if callback is not None:
                        callback(offset + step, hist.losses[-1])
                bar.update(step, f"loss {hist.losses[-1]:.3e}")
            if step == steps:
                break
            loss.backward()
            opt.step()
    hist.seconds += time.perf_counter() - start
    return hist


def narrow_critical_net(
    x: Tensor, y: Tensor, *, seed: int, steps: int, label: str
) -> tuple[nn.Sequential, History, CriticalPointResult]:
    """The width-2 tanh network of the demo and Fig. 3(a), trained and polished.

    ``nn.Linear``'s default initialisation after ``torch.manual_seed(seed)``, ``steps``
    full-batch Adam steps (lr 0.02) on the MSE, then
    :func:`~torch_embed.critical.critical_point` with ``gtol=1e-14`` (L-BFGS, then
    Newton). On the 1D staircase every seed tried (0-5) reaches the same local minimum
    up to the network's symmetries.

    Args:
        x: Inputs, shape ``(N, 1)``; the network is built on their device.
        y: Targets, shape ``(N, 1)``.
        seed: Seed of ``torch.manual_seed`` (the global generator) for the initialisation.
        steps: Adam steps before polishing.
        label: Text of the training progress line.

    Returns:
        The network (float64, at the polished point), its training history and the
        result of the polish.
    """
    from torch_embed.critical import critical_point

    loss_fn = nn.MSELoss()
    torch.manual_seed(seed)
    net = mlp([1, 2, 1], "tanh", device=x.device)
    hist = train(net, loss_fn, x, y, steps=steps, lr=0.02, label=label)
    polish = critical_point(net, loss_fn, x, y, gtol=1e-14)
    return net, hist, polish


def find_plateaus(
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    slope: float = 0.2,
    decades: float = 0.25,
    noise: float = 0.01,
    start: int = 1,
) -> list[tuple[int, int]]:
    """Plateaus of a loss curve: stretches that look flat on log-log axes.

    A stretch of recorded points ``i..j`` is flat when the loss changes no faster than
    ``slope`` on log-log axes, ``log(max L / min L) <= slope · log(t_j / t_i) +
    log(1 + noise)`` over the stretch; a plateau is a maximal flat stretch (grown
    greedily from the left) that spans at least ``decades`` decades of steps. Points
    before step ``start`` are ignored (``log 0``).

    Args:
        steps: Recorded step numbers, increasing.
        losses: The loss at those steps.
        slope: Largest ``|d log L / d log t|`` of a plateau (a descent between plateaus
            is typically steeper than 1).
        decades: Shortest plateau, in decades of steps.
        noise: Relative wiggle always allowed (e.g. gradient-descent oscillation).
        start: First step considered.

    Returns:
        ``(i, j)`` index pairs into ``steps``, in order.

    Example:
        >>> steps = list(range(0, 10001, 100))
        >>> losses = [1.0 if s < 3000 else 0.5 if s < 7000 else 0.1 for s in steps]
        >>> [(steps[i], steps[j]) for i, j in find_plateaus(steps, losses)]
        [(100, 2900), (3000, 6900)]
    """
    found: list[tuple[int, int]] = []
    n = len(steps)
    i = 0
    while i < n:
        if steps[i] < max(start, 1):
            i += 1
            continue
        lo = hi = losses[i]
        j = i
        while j + 1 < n:
            nlo, nhi = min(lo, losses[j + 1]), max(hi, losses[j + 1])
            span = math.log(steps[j + 1] / steps[i])
            if nlo <= 0 or math.log(nhi / nlo) > slope * span + math.log1p(noise):
                break
            lo, hi, j = nlo, nhi, j + 1
        if j > i and math.log10(steps[j] / steps[i]) >= decades:
            found.append((i, j))
            i = j + 1
        else:
            i += 1
    return found


def log_grid(steps: int, points: int = 200) -> list[int]:
    """About ``points`` step numbers from 0 to ``steps``, half log-spaced, half linear.

    A loss curve recorded there looks smooth on a log-step axis (plateaus early in
    training are resolved) and on a linear one.

    Example:
        >>> log_grid(1000, 10)
        [0, 1, 6, 32, 178, 200, 400, 600, 800, 1000]
    """
    if steps <= 0:
        return [0]
    half = max(points // 2, 2)
    logs = {round(10 ** (k * math.log10(steps) / (half - 1))) for k in range(half)}
    lins = {round(k * steps / half) for k in range(half + 1)}
    return sorted({0} | {s for s in logs | lins if 0 <= s <= steps})
