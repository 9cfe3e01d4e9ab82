"""The demo and the reproductions (--quick), plus the experiments' building blocks.

The demo's numbers are re-derived independently: the narrow network is rebuilt from the
returned state and its gradient and Hessian inertia are recomputed with
``torch.autograd.functional.hessian`` and ``eigvalsh``, not with the library.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tol_reference import reference_rule
from torch import nn

from torch_embed.experiments import FIGURES, FigureResult, Headline, format_headline, run_figure
from torch_embed.experiments.data import digits, iris, staircase
from torch_embed.experiments.progress import Progress
from torch_embed.experiments.training import (
    BatchedMLP,
    batched_mse,
    find_plateaus,
    mlp,
    threads,
    train,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- brute-force references
def _flat_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, (c.view(s) for c, s in zip(theta.split(sizes), shapes))))
        out = torch.func.functional_call(net, params, (x,))
        return ((out - y) ** 2).mean()

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return loss, theta


def _reference_inertia(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int]:
    """Counts of the dense float64 Hessian by the default rule (tests/tol_reference.py)."""
    loss, theta = _flat_loss(net, x, y)
    h = torch.autograd.functional.hessian(loss, theta)
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(t), t)
    lam = torch.linalg.eigvalsh((h + h.T) / 2)
    return reference_rule(lam, float(g.norm()))[1]


# ------------------------------------------------------------------------------ demo
@pytest.fixture(scope="module")
def demo_result(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``torch-embed demo --quick`` run in-process; the result is caught on its way out."""
    from torch_embed import cli
    from torch_embed.experiments import demo

    out = tmp_path_factory.mktemp("demo")
    text = io.StringIO()
    caught = []
    real = demo.run_demo

    def spy(**kwargs):  # type: ignore[no-untyped-def]
        caught.append(real(stream=text, **kwargs))
        return caught[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "run_demo", spy)
        status = cli.main(["demo", "--quick", "--out", str(out)])
    return caught[0], text.getvalue(), out, status


@pytest.mark.slow
def test_demo_quick_exits_0_and_writes_its_figure(demo_result) -> None:  # type: ignore[no-untyped-def]
    result, _, out, status = demo_result
    assert status == 0
    assert result.figure == out / "demo.png"
    assert result.figure.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_demo_every_scheme_is_critical_and_irreversible(demo_result) -> None:  # type: ignore[no-untyped-def]
    result, text, _, _ = demo_result
    assert result.ok
    assert len(result.schemes) == 6
    for s in result.schemes:
        assert s.kind == "critical", s.name
        assert s.output_diff < 1e-12, s.name
        assert s.grad_after < 1e-10, s.name
        assert all(a >= b for a, b in zip(s.after_full, s.before)), s.name
        assert s.after_full == s.after_change, s.name
        assert sum(s.after_full) == len(s.eigenvalues_after)
        # each scheme adds parameters: the total grows by (new neurons) x 3 for 1-m-1
        added = sum(s.wide_widths) - sum(s.narrow_widths)
        assert sum(s.after_full) - sum(s.before) == 3 * added
    assert text.count("irreversibility held: yes") == 6
    assert "full == before + change: yes" in text


@pytest.mark.slow
def test_demo_numbers_match_a_brute_force_recount(demo_result) -> None:  # type: ignore[no-untyped-def]
    from torch_embed.experiments.demo import demo_schemes
    from torch_embed.widen import widen

    result, _, _, _ = demo_result
    x, y = staircase(50)
    narrow = mlp([1, 2, 1])
    narrow.load_state_dict(result.narrow_state)
    loss, theta = _flat_loss(narrow, x, y)
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(t), t)
    assert float(g.norm()) < 1e-10  # polished to a critical point
    assert _reference_inertia(narrow, x, y) == result.before
    for (name, config, widths), measured in zip(demo_schemes()[:2], result.schemes[:2]):
        wide = mlp([1, 2, 1])
        wide.load_state_dict(result.narrow_state)
        widen(wide, widths, config)
        assert _reference_inertia(wide, x, y) == measured.after_full, name


# ------------------------------------------------------------------------ reproductions
@pytest.mark.slow
def test_fig3a_quick_reproduces_the_0_1_2_pattern(tmp_path: Path) -> None:
    result = run_figure("fig3a", quick=True, out=tmp_path, stream=io.StringIO())
    assert result.numbers["negative"] == [0, 1, 2]
    assert result.numbers["zero"][1] - result.numbers["zero"][0] == 1
    assert result.numbers["zero"][2] - result.numbers["zero"][1] == 1
    assert result.agrees
    stored = json.loads((tmp_path / "fig3a.json").read_text())
    assert stored["numbers"]["negative"] == [0, 1, 2]
    assert stored["headline"][0]["paper"] == "0 -> 1 -> 2"
    assert all(h["criterion"] for h in stored["headline"])
    assert (tmp_path / "fig3a.png").read_bytes()[:8] == PNG_MAGIC


def _brute_counts(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, floor: float
) -> tuple[int, ...]:
    """Counts of the dense autograd Hessian, zero = max(P·eps·max|λ|, 10·|∇R|, floor)."""
    loss, theta = _flat_loss(net, x, y)
    h = torch.autograd.functional.hessian(loss, theta)
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(t), t)
    lam = torch.linalg.eigvalsh((h + h.T) / 2)
    tol = max(lam.numel() * 2.0**-52 * float(lam.abs().max()), 10 * float(g.norm()), floor)
    return (int((lam < -tol).sum()), int((lam.abs() <= tol).sum()), int((lam > tol).sum()))


def _split_by_hand(net: nn.Sequential, neuron: int) -> nn.Sequential:
    """An equal split written out: copy the fan-in row, halve the fan-out column."""
    first, last = net[0], net[2]
    w1 = torch.cat([first.weight, first.weight[neuron : neuron + 1]])
    b1 = torch.cat([first.bias, first.bias[neuron : neuron + 1]])
    w2 = torch.cat([last.weight, last.weight[:, neuron : neuron + 1] / 2], 1)
    w2[:, neuron] /= 2
    wide = mlp([first.in_features, first.out_features + 1, last.out_features], "sigmoid")
    wide.load_state_dict({"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": last.bias})
    return wide


def _check_fig3b(result: FigureResult) -> None:
    from torch_embed.experiments.fig3b import FLAT, GTOL

    counts = result.numbers["inertia"]
    # the critical point is the saddle of a plateau training left, not the end of
    # training (where Adam creeps along a valley to infinity): the analysed snapshot lies
    # in that plateau, and training went on to a clearly lower loss
    n = result.numbers
    start, end = n["plateau"]
    assert start <= n["polished_snapshot"] <= end < n["train_steps"][-1]
    assert n["train_losses"][-1] <= 0.9 * n["train_losses"][n["train_steps"].index(end)]
    assert n["train_losses"][-1] < n["loss"]
    for before, after in itertools.pairwise(counts):
        assert all(b >= a for a, b in zip(before, after))  # irreversibility
    negative = result.numbers["negative"]
    assert all(b >= a + 1 for a, b in itertools.pairwise(negative))  # >= 1 more per split
    assert max(result.numbers["grad_norm"]) <= GTOL
    assert not any(result.numbers["ambiguous"])
    # brute force: rebuild the polished width-2 net, recount, split by hand, recount
    x, y = iris()
    net = mlp([4, 2, 3], "sigmoid")
    net.load_state_dict(
        {k: torch.tensor(v, dtype=torch.float64) for k, v in result.numbers["state"].items()}
    )
    loss, theta = _flat_loss(net, x, y)
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(t), t)
    assert float(g.norm()) <= GTOL
    assert _brute_counts(net, x, y, FLAT) == tuple(counts[0])
    for k, neuron in enumerate(result.numbers["split_neurons"]):
        with torch.no_grad():
            net = _split_by_hand(net, neuron)
        assert _brute_counts(net, x, y, FLAT) == tuple(counts[k + 1])


@pytest.mark.slow
def test_committed_full_fig3b_is_a_critical_point_with_the_stated_counts() -> None:
    """The full run's JSON (docs/_static/figures/full) passes the quick run's checks.

    Its stored width-2 state is rebuilt, its gradient and counts recomputed with an
    autograd Hessian, and split by hand twice; the 500k-step run is not rerun here.
    """
    path = Path(__file__).parent.parent / "docs" / "_static" / "figures" / "full" / "fig3b.json"
    stored = json.loads(path.read_text())
    assert stored["quick"] is False
    headline = [
        Headline(h["quantity"], h["paper"], h["measured"], h["agrees"]) for h in stored["headline"]
    ]
    result = FigureResult("fig3b", stored["title"], False, {}, headline, stored["numbers"])
    _check_fig3b(result)


def _check_fig4(result: FigureResult) -> None:
    classes = result.numbers["classes"]
    assert len(classes) >= 2
    assert any(max(c["widths"]) > c["label"] for c in classes)
    for c in classes:
        assert all(m["grad_norm"] < 1e-10 for m in c["members"])


def _check_fig5(result: FigureResult) -> None:
    n = result.numbers
    assert n["reduced_width"] < 400
    assert 1 <= n["groups_at_snapshot"] < 100
    # the reduced net computes the wide net's function at the snapshot
    assert (
        abs(n["loss_reduced_at_snapshot"] - n["loss_wide_at_snapshot"])
        <= 1e-3 * (n["loss_wide_at_snapshot"])
    )
    # the same optimizer-state treatment: the wide net goes on with its own Adam state,
    # so from the snapshot it retraces the original run (a fresh Adam would not)
    s0 = n["snapshot_step"]
    original = dict(zip(n["steps"], n["losses"]))
    retraced = [
        (original[s0 + s], loss)
        for s, loss in zip(n["continue_steps"], n["continue_wide"])
        if s > 0 and s0 + s in original
    ]
    assert retraced
    for before, again in retraced:
        assert abs(before - again) <= 1e-4 * before
    # direction: the reduced net moves less than the wide one does
    assert n["reduced_relative_change"] < n["wide_relative_drop"]


def _check_fig1(result: FigureResult) -> None:
    plateaus = result.numbers["plateaus"]
    assert len(plateaus) >= 1
    # direction of the claim: a plateau's output is a narrow critical function
    matched = [p for p in plateaus if p["matches"]]
    assert matched
    for p in matched:
        assert p["nearest_distance"] <= 0.1 * math.sqrt(p["loss"])
        assert p["distance_by_width"][p["nearest_width"]] == p["nearest_distance"]
    assert all(c["grad_norm"] < 1e-10 for c in result.numbers["narrow_critical_points"])
    # the staircase row is judged by its stated criterion: [1] is not "1, 2, 3"
    widths = [p["nearest_width"] for p in matched]
    row = next(h for h in result.headline if h.quantity.startswith("widths of the matched"))
    assert row.agrees == (len(set(widths)) >= 3 and widths == sorted(widths))
    # one meaning of "effective width": the effective_widths count, nothing else
    for h in result.headline:
        assert "effective width" not in h.quantity
    for p in plateaus:
        assert p["effective_width"] >= p["groups"] >= 1


CHECKS = {
    "fig1": _check_fig1,
    "fig3b": _check_fig3b,
    "fig4": _check_fig4,
    "fig5": _check_fig5,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_every_other_figure_runs_quick_and_writes_its_files(name: str, tmp_path: Path) -> None:
    text = io.StringIO()
    result = run_figure(name, quick=True, out=tmp_path, stream=text)
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    stored = json.loads((tmp_path / f"{name}.json").read_text())
    assert stored["name"] == name and stored["quick"] is True
    assert stored["headline"], "a headline compares the paper with the measurement"
    assert all({"paper", "measured", "verdict"} <= set(h) for h in stored["headline"])
    printed = text.getvalue()
    assert name in printed and "paper" in printed and "measured" in printed
    # every row is decided by a stated criterion, printed and stored
    assert all(h.criterion for h in result.headline)
    assert all(h["criterion"] for h in stored["headline"])
    assert all(f"agrees if ({h.quantity}): {h.criterion}" in printed for h in result.headline)
    CHECKS[name](result)


def test_figures_are_all_registered() -> None:
    assert set(FIGURES) == {"fig1", "fig3a", "fig3b", "fig4", "fig5"}


def test_run_figure_without_matplotlib_prints_the_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch_embed.experiments import fig3a

    def fake_run(**kwargs: object) -> FigureResult:
        return FigureResult("fig3a", "t", True, {}, [Headline("q", "1", "1", True)], {"n": 1.0})

    monkeypatch.setattr(fig3a, "run", fake_run)
    text = io.StringIO()
    result = run_figure("fig3a", quick=True, out=tmp_path, stream=text)
    assert result.figure is None
    assert "pip install 'torch-embed[plot]'" in text.getvalue()
    assert json.loads((tmp_path / "fig3a.json").read_text())["numbers"] == {"n": 1.0}


def test_new_figure_is_none_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_embed.experiments import plotting

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert plotting.have_matplotlib() is False
    assert plotting.new_figure(1, 2) is None


def test_unknown_figure_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fig1, fig3a"):
        run_figure("fig2", out=tmp_path)


def test_headline_table_marks_exact_number_differences() -> None:
    rows = [
        Headline("pattern", "0 -> 1", "0 -> 1", True),
        Headline("count", "58", "3", False, exact=True),
    ]
    result = FigureResult("figX", "title", False, {}, rows, {})
    text = format_headline(result)
    assert "differs" in text and "NO" not in text
    assert result.agrees  # exact-number rows do not decide
    result.headline.append(Headline("claim", "yes", "no", False))
    assert not result.agrees and "NO" in format_headline(result)


# ----------------------------------------------------------------------------- data
def test_staircase_is_the_stated_formula() -> None:
    x, y = staircase(50)
    assert x.shape == (50, 1) and y.dtype == torch.float64
    assert float(x.min()) == -15.0 and float(x.max()) == 15.0
    xs = [-15 + 30 * i / 49 for i in range(50)]
    expected = [math.tanh(v + 7.5) + math.tanh(v) / 2 + math.tanh(v - 7.5) / 4 for v in xs]
    assert torch.allclose(y.flatten(), torch.tensor(expected, dtype=torch.float64), atol=1e-14)


def test_staircase_keeps_dtype_and_rejects_tiny_n() -> None:
    x, y = staircase(10, dtype=torch.float32)
    assert x.dtype == y.dtype == torch.float32
    with pytest.raises(ValueError, match="n >= 2"):
        staircase(1)


def test_iris_and_digits_loaders() -> None:
    x, y = iris()
    assert x.shape == (150, 4) and y.shape == (150, 3)
    assert torch.allclose(x.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(y.sum(1), torch.ones(150, dtype=torch.float64))
    x, y = digits(1000)
    assert x.shape == (1000, 64) and y.shape == (1000, 10)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    with pytest.raises(ValueError, match="1797"):
        digits(5000)


def test_missing_scikit_learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'torch-embed\[data\]'"):
        iris()


# ------------------------------------------------------------------------- training
def test_batched_runs_get_exactly_their_own_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    nets = BatchedMLP(3, (2, 4, 2), "tanh", generator=gen)
    x = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    batched_mse(nets(x), y).backward()
    for k, single in enumerate(nets.unbatch()):
        nn.MSELoss()(single(x), y).backward()
        assert torch.allclose(single[0].weight.grad, nets.w1.grad[k], atol=1e-15)
        assert torch.allclose(single[0].bias.grad, nets.b1.grad[k], atol=1e-15)
        assert torch.allclose(single[2].weight.grad, nets.w2.grad[k], atol=1e-15)
        assert torch.allclose(single[2].bias.grad, nets.b2.grad[k], atol=1e-15)


@pytest.mark.parametrize("method", ["gd", "adam"])
def test_null_tanh_neurons_stay_null_in_training(method: str) -> None:
    """fig4 trains narrow runs as width-3 runs with null neurons: they must stay null."""
    nets = BatchedMLP(2, (1, 3, 1), "tanh", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in (nets.w1, nets.b1):
            p[0, 1:] = 0.0
        nets.w2[0, :, 1:] = 0.0
    x, y = staircase(20)
    train(nets, batched_mse, x, y, steps=50, lr=0.05, method=method)  # type: ignore[arg-type]
    assert torch.count_nonzero(nets.w1[0, 1:]) == 0
    assert torch.count_nonzero(nets.b1[0, 1:]) == 0
    assert torch.count_nonzero(nets.w2[0, :, 1:]) == 0
    assert torch.count_nonzero(nets.w1[1]) == 3  # the other run does train all three


def test_train_records_history_and_calls_back() -> None:
    net = mlp([1, 3, 1])
    x, y = staircase(20)
    seen: list[int] = []
    hist = train(
        net,
        nn.MSELoss(),
        x,
        y,
        steps=20,
        lr=0.01,
        record_every=5,
        callback=lambda s, _: seen.append(s),
    )
    assert hist.steps == [0, 5, 10, 15, 20] == seen
    assert hist.losses[-1] < hist.losses[0]
    hist = train(net, nn.MSELoss(), x, y, steps=10, lr=0.01, record_every=5, history=hist)
    assert hist.steps[-2:] == [25, 30]
    with pytest.raises(ValueError, match="'gd' or 'adam'"):
        train(net, nn.MSELoss(), x, y, steps=1, lr=0.1, method="sgd")  # type: ignore[arg-type]


def test_find_plateaus_on_a_staircase_curve() -> None:
    steps = list(range(0, 10001, 100))
    losses = [1.0 if s < 3000 else 0.5 if s < 7000 else 0.1 for s in steps]
    found = [(steps[i], steps[j]) for i, j in find_plateaus(steps, losses, decades=0.1)]
    assert found == [(100, 2900), (3000, 6900), (7000, 10000)]
    # the last step is only 0.15 decades long: not a plateau at the default 0.25
    assert len(find_plateaus(steps, losses)) == 2
    # a slow drift (slope 0.1 on log-log axes) is a plateau, a power law of slope 1 is not
    drift = [(s + 1) ** -0.1 for s in steps]
    assert find_plateaus(steps, drift) == [(1, len(steps) - 1)]
    assert find_plateaus(steps, [1.0 / (s + 1) for s in steps]) == []  # always moving


def test_train_goes_on_with_a_given_optimizer_and_refuses_a_mismatch() -> None:
    x, y = staircase(20)
    torch.manual_seed(0)
    net = mlp([1, 3, 1])
    twin = mlp([1, 3, 1])
    twin.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    train(net, nn.MSELoss(), x, y, steps=10, lr=0.01, optimizer=opt)
    train(net, nn.MSELoss(), x, y, steps=10, lr=0.01, optimizer=opt)
    # reference: 20 plain Adam steps written out
    ref = torch.optim.Adam(twin.parameters(), lr=0.01)
    for _ in range(20):
        ref.zero_grad()
        nn.MSELoss()(twin(x), y).backward()
        ref.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"Adam with lr 0\.1"):
        train(net, nn.MSELoss(), x, y, steps=1, lr=0.1, optimizer=opt)
    with pytest.raises(ValueError, match="needs SGD"):
        train(net, nn.MSELoss(), x, y, steps=1, lr=0.01, method="gd", optimizer=opt)


def test_reduced_adam_state_keeps_each_kept_neurons_moments() -> None:
    from torch_embed.experiments.fig5 import reduced_adam_state
    from torch_embed.landscape.condense import condense

    gen = torch.Generator().manual_seed(0)
    net = mlp([3, 4, 2], "relu")
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        net[0].weight[2] = 2 * net[0].weight[0]  # neuron 2 is parallel to neuron 0
        net[0].bias[2] = 2 * net[0].bias[0]
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    nn.MSELoss()(net(x), torch.zeros(16, 2, dtype=torch.float64)).backward()
    opt.step()
    names = [n for n, _ in net.named_parameters()]
    wide_state = opt.state_dict()
    result = condense(net, atol=1e-12, cos=0.999)
    source = result.embedding.layers[0].source
    assert result.widths == (3,) and source.tolist() == [0, 1, 0, 2]
    state = reduced_adam_state(wide_state, source, names)
    kept = [0, 1, 3]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state["state"][0][key], wide_state["state"][0][key][kept])
        assert torch.equal(state["state"][1][key], wide_state["state"][1][key][kept])
        assert torch.equal(state["state"][2][key], wide_state["state"][2][key][:, kept])
        assert torch.equal(state["state"][3][key], wide_state["state"][3][key])
    reduced_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    reduced_opt.load_state_dict(state)  # fits the condensed parameters


def test_counts_pin_their_tolerance() -> None:
    from torch_embed.experiments.counts import count, count_tolerance

    h = torch.diag(torch.tensor([-2.0, 5e-11, 1e-6, 3.0], dtype=torch.float64))
    assert count_tolerance(h, 1e-12) == 1e-11
    assert count(h, 1e-12).as_tuple() == (1, 0, 3)
    assert count(h, 1e-12, floor=1e-10).as_tuple() == (1, 1, 2)
    assert not count(h, 1e-12, floor=1e-10).ambiguous  # gap 1e-6 / 5e-11 = 2e4


def test_threads_context_restores_the_setting() -> None:
    old = torch.get_num_threads()
    with threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    with pytest.raises(ValueError), threads(0):
        pass


def test_progress_is_silent_for_short_steps_and_reports_long_ones() -> None:
    quiet = io.StringIO()
    with Progress("short", total=10, delay=60.0, stream=quiet) as bar:
        for i in range(10):
            bar.update(i + 1)
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    with Progress("long", total=4, delay=0.0, stream=loud) as bar:
        for i in range(4):
            bar.update(i + 1, extra="loss 1")
    lines = loud.getvalue().splitlines()
    assert lines[0].startswith("  long:") and "(1/4)" in lines[0]
    assert "(4/4)" in lines[-1] and "loss 1" in lines[-1]
    assert len(lines) == 2  # not a tty: at most one line per 10 s, plus the final one
