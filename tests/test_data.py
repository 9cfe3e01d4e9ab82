"""data= (an iterable of batches) for every Hessian tool, against brute force (float64).

The data set's loss is the loss of the concatenated batches: the mean over all samples
for reduction="mean" (not a mean of batch means), the sum for "sum". References are
torch.autograd.functional on the concatenated data; the one-batch call, tested against
such references in the tools' own test files, is the reference for the tools whose
output is not a linear-algebra object (counts, certificates, reports).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import torch_embed
from torch_embed.critical import critical_point
from torch_embed.hessian import HessianOperator, flat_loss, gradient, hessian, hvp
from torch_embed.inertia import hessian_inertia
from torch_embed.inertia_change import complement_blocks, inertia_change
from torch_embed.landscape.saddles import escape, saddle_certificates
from torch_embed.report import check_embedding

F64 = torch.float64
N = 23
#: Batch sizes: one batch, 3 and 7 uneven ones (sum N).
SPLITS = {1: [N], 3: [5, 11, 7], 7: [1, 2, 3, 4, 5, 6, 2]}


def _net(seed: int = 0, widths: tuple[int, ...] = (3, 4, 2)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def _xy(n_in: int = 3, n_out: int = 2, n: int = N) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, n_in, generator=g, dtype=F64)
    return x, torch.sin(2 * x[:, :n_out]) + 0.1 * torch.randn(n, n_out, generator=g, dtype=F64)


def _batches(x: Tensor, y: Tensor, count: int) -> list[tuple[Tensor, Tensor]]:
    out, start = [], 0
    for size in SPLITS[count]:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def _flat_fn(model: nn.Module, loss_fn: Any, x: Tensor, y: Any) -> tuple[Any, Tensor]:
    params = [(n, p) for n, p in model.named_parameters()]
    sizes = [p.numel() for _, p in params]
    theta = torch.cat([p.detach().reshape(-1).double() for _, p in params])

    def f(t: Tensor) -> Tensor:
        d = {n: c.view_as(p) for (n, p), c in zip(params, torch.split(t, sizes), strict=True)}
        out: Tensor = loss_fn(torch.func.functional_call(model, d, (x,)), y)
        return out

    return f, theta


def _reference(model: nn.Module, loss_fn: Any, x: Tensor, y: Any) -> tuple[Tensor, Tensor]:
    """Dense Hessian and gradient of the loss on the whole (concatenated) data."""
    f, theta = _flat_fn(model, loss_fn, x, y)
    h = torch.autograd.functional.hessian(f, theta)
    g = torch.autograd.functional.jacobian(f, theta)
    return h, g


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("count", [1, 3, 7])
def test_hessian_gradient_hvp_over_batches_match_the_whole_data(reduction: str, count: int) -> None:
    net, (x, y) = _net(), _xy()
    loss = nn.MSELoss(reduction=reduction)
    data = _batches(x, y, count)
    h_ref, g_ref = _reference(net, loss, x, y)
    for engine in ("blocks", "reverse"):
        assert _rel(hessian(net, loss, data=data, engine=engine), h_ref) <= 1e-12
    assert _rel(gradient(net, loss, data=data), g_ref) <= 1e-12
    vecs = torch.randn(5, h_ref.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
    op = HessianOperator(net, loss, data=data, chunk_size=2)  # 3 passes over the batches
    assert _rel(op.matmat(vecs), vecs @ h_ref) <= 1e-12
    assert _rel(hvp(net, loss, vectors=vecs[0], data=data), h_ref @ vecs[0]) <= 1e-12
    value, g = flat_loss(net, loss, data=data).value_and_grad()
    with torch.no_grad():
        whole = float(loss(net(x), y))
    assert abs(float(value) - whole) <= 1e-12 * whole
    assert _rel(g, g_ref) <= 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("count", [3, 7])
def test_inertia_counts_over_batches_match_one_batch(reduction: str, count: int) -> None:
    net, (x, y) = _net(), _xy()
    loss = nn.MSELoss(reduction=reduction)
    one = hessian_inertia(net, loss, x, y)
    many = hessian_inertia(net, loss, data=_batches(x, y, count))
    assert many.as_tuple() == one.as_tuple()
    assert abs(many.tol - one.tol) <= 1e-12 * one.tol
    lam = torch.linalg.eigvalsh(_reference(net, loss, x, y)[0])
    tol = many.tol
    counts = (int((lam < -tol).sum()), int((lam.abs() <= tol).sum()), int((lam > tol).sum()))
    assert many.as_tuple() == counts


def _widened(seed: int = 3) -> tuple[nn.Module, nn.Module, torch_embed.Embedding]:
    narrow = _net(seed)
    wide = copy.deepcopy(narrow)
    emb = torch_embed.widen(wide, [6], torch_embed.Split(alpha=0.3))
    return narrow, wide, emb


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("count", [3, 7])
def test_inertia_change_and_blocks_over_batches_match_one_batch(reduction: str, count: int) -> None:
    _, wide, emb = _widened()
    x, y = _xy()
    loss = nn.MSELoss(reduction=reduction)
    data = _batches(x, y, count)
    for method in ("closed-form", "hvp"):
        ref = complement_blocks(emb, wide, loss, x, y, method=method)  # type: ignore[arg-type]
        got = complement_blocks(emb, wide, loss, data=data, method=method)  # type: ignore[arg-type]
        assert len(got) == len(ref) == 2
        for a, b in zip(got, ref, strict=True):
            assert _rel(a, b) <= 1e-12
        one = inertia_change(emb, wide, loss, x, y, method=method)  # type: ignore[arg-type]
        many = inertia_change(emb, wide, loss, data=data, method=method)  # type: ignore[arg-type]
        assert many.as_tuple() == one.as_tuple()
        assert abs(many.tol - one.tol) <= 1e-10 * one.tol
    via_method = emb.inertia_change(wide, loss, data=data, tol=1e-9)
    assert via_method.as_tuple() == inertia_change(emb, wide, loss, x, y, tol=1e-9).as_tuple()


def test_inertia_change_hvp_blocks_against_the_dense_wide_hessian() -> None:
    # brute force: before + change equals the full wide count at one tol (Sylvester)
    narrow, wide, emb = _widened()
    x, y = _xy()
    loss = nn.MSELoss()
    data = _batches(x, y, 3)
    tol = 1e-9
    change = inertia_change(emb, wide, loss, data=data, tol=tol, method="hvp")

    def counts(model: nn.Module) -> tuple[int, int, int]:
        lam = torch.linalg.eigvalsh(_reference(model, loss, x, y)[0])
        return int((lam < -tol).sum()), int((lam.abs() <= tol).sum()), int((lam > tol).sum())

    before, after = counts(narrow), counts(wide)
    assert tuple(b + c for b, c in zip(before, change.as_tuple(), strict=True)) == after


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("count", [3, 7])
def test_saddle_certificates_over_batches_match_brute_force(reduction: str, count: int) -> None:
    net, (x, y) = _net(5), _xy()
    loss = nn.MSELoss(reduction=reduction)
    one = saddle_certificates(net, loss, x, y)
    many = saddle_certificates(net, loss, data=_batches(x, y, count))
    key = {(c.layer, c.neuron, c.kind): c for c in one}
    assert len(many) == len(one)
    scale = max(abs(c.curvature) for c in one)
    for c in many:
        assert abs(c.curvature - key[(c.layer, c.neuron, c.kind)].curvature) <= 1e-10 * scale
    for c in many[:2]:  # κ = dᵀ H_wide d of the widened net on the whole data
        wide = copy.deepcopy(net)
        torch_embed.embed_(wide, c.embedding)
        h = _reference(wide, loss, x, y)[0]
        d = torch.cat([c.direction[n].reshape(-1) for n, _ in wide.named_parameters()])
        assert abs(float(d @ h @ d) - c.curvature) <= 1e-10 * scale


def test_escape_over_batches_matches_one_batch() -> None:
    net, (x, y) = _net(5), _xy()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    ra = escape(a, nn.MSELoss(), x, y, max_new=2)
    rb = escape(b, nn.MSELoss(), data=_batches(x, y, 3), max_new=2)
    assert ra.escaped and rb.escaped and len(ra.steps) == len(rb.steps) == 2
    assert abs(rb.loss_after - ra.loss_after) <= 1e-10 * ra.loss_after
    with torch.no_grad():
        whole = float(nn.MSELoss()(b(x), y))
    assert abs(rb.loss_after - whole) <= 1e-12 * rb.loss_after
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.shape == pb.shape, n
        assert torch.allclose(pa, pb, rtol=1e-8, atol=1e-10), n


def test_critical_point_over_batches_is_critical_for_the_whole_data() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    x = torch.linspace(-2, 2, 20, dtype=F64)[:, None]
    y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
    data = [(x[:7], y[:7]), (x[7:9], y[7:9]), (x[9:], y[9:])]
    res = critical_point(net, nn.MSELoss(), data=data)
    assert res.converged
    g = _reference(net, nn.MSELoss(), x, y)[1]
    assert float(g.norm()) <= 1e-11
    with torch.no_grad():
        whole = float(nn.MSELoss()(net(x), y))
    assert abs(res.loss - whole) <= 1e-12 * max(res.loss, 1e-300)


def test_check_embedding_over_batches_matches_one_batch() -> None:
    narrow, wide, emb = _widened()
    x, y = _xy()
    one = check_embedding(narrow, wide, emb, nn.MSELoss(), x, y, tol=1e-9)
    gen = (b for b in _batches(x, y, 7))  # a generator: read once, used by every count
    many = check_embedding(narrow, wide, emb, nn.MSELoss(), data=gen, tol=1e-9)
    assert many.matches and one.matches
    for attr in ("before", "after", "change", "predicted"):
        assert getattr(many, attr).as_tuple() == getattr(one, attr).as_tuple()
    assert abs(many.grad_norm_after - one.grad_norm_after) <= 1e-12 * one.grad_norm_after
    assert many.output_max_abs_diff == pytest.approx(one.output_max_abs_diff, abs=1e-15)


def test_dataloader_generator_and_plain_function_loss() -> None:
    net, (x, y) = _net(), _xy()
    h_ref = _reference(net, F.mse_loss, x, y)[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # 5, 5, 5, 5, 3
    assert _rel(hessian(net, nn.MSELoss(), data=loader), h_ref) <= 1e-12
    assert _rel(hessian(net, F.mse_loss, data=loader, reduction="mean"), h_ref) <= 1e-12

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        yield from _batches(x, y, 3)

    op = HessianOperator(net, nn.MSELoss(), data=pairs())
    e = torch.eye(h_ref.shape[0], dtype=F64)
    assert _rel(op.matmat(e[:4]), h_ref[:4]) <= 1e-12  # read once, kept: same every pass
    assert _rel(op.matmat(e[4:9]), h_ref[4:9]) <= 1e-12


def test_cross_entropy_mean_and_float32_batches() -> None:
    net = _net(widths=(3, 5, 4))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, 3, generator=g)  # float32: cast to float64 batch by batch
    y = torch.randint(0, 4, (N,), generator=g)
    h_ref, g_ref = _reference(net, nn.CrossEntropyLoss(), x.double(), y)
    data = _batches(x, y, 7)  # type: ignore[arg-type]
    assert _rel(hessian(net, nn.CrossEntropyLoss(), data=data), h_ref) <= 1e-12
    assert _rel(gradient(net, nn.CrossEntropyLoss(), data=data), g_ref) <= 1e-12


def test_kl_batchmean_weights_batches_by_samples() -> None:
    net, (x, _) = _net(widths=(3, 4, 3)), _xy()
    target = torch.softmax(torch.randn(N, 3, generator=torch.Generator().manual_seed(4)), 1)
    kl = nn.KLDivLoss(reduction="batchmean")

    def loss(out: Tensor, t: Tensor) -> Tensor:
        return kl(torch.log_softmax(out, 1), t.double())

    h_ref = _reference(net, loss, x, target.double())[0]
    data = _batches(x, target.double(), 3)
    assert _rel(hessian(net, loss, data=data, reduction="batchmean"), h_ref) <= 1e-12


def test_process_group_none_is_single_process() -> None:
    net, (x, y) = _net(), _xy()
    assert torch.equal(
        gradient(net, nn.MSELoss(), x, y, process_group=None), gradient(net, nn.MSELoss(), x, y)
    )


# ------------------------------------------------------------------ user mistakes
def test_data_argument_errors() -> None:
    net, (x, y) = _net(), _xy()
    mse = nn.MSELoss()
    with pytest.raises(TypeError, match=r"hessian: pass either one batch .* or data=.*, not both"):
        hessian(net, mse, x, y, data=[(x, y)])
    with pytest.raises(TypeError, match="needs the data"):
        gradient(net, mse)
    with pytest.raises(ValueError, match="data is empty"):
        hessian(net, mse, data=[])
    with pytest.raises(ValueError, match="data is empty"):
        inertia_change(*_widened()[1:], mse, data=iter([]))
    with pytest.raises(TypeError, match=r"iterable of .* got Tensor"):
        gradient(net, mse, data=x)
    with pytest.raises(TypeError, match=r"pairs .* batch 1 is a tuple of length 3"):
        gradient(net, mse, data=[(x, y), (x, y, y)])
    with pytest.raises(TypeError, match=r"loss_fn \(mse_loss\) does not say how it reduces"):
        hessian(net, F.mse_loss, data=[(x, y)])
    with pytest.raises(ValueError, match="reduction='sum' contradicts loss_fn"):
        hessian(net, mse, data=[(x, y)], reduction="sum")
    with pytest.raises(ValueError, match="reduction must be one of"):
        hessian(net, F.mse_loss, data=[(x, y)], reduction="avg")
    with pytest.raises(ValueError, match="has reduction='none'"):
        gradient(net, nn.MSELoss(reduction="none"), data=[(x, y)])
    with pytest.raises(ValueError, match="same number of target elements"):
        gradient(
            net,
            lambda o, t: mse(o[:, : t.shape[1]], t),
            data=[(x, y), (x, y[:, :1])],
            reduction="mean",
        )
    with pytest.raises(TypeError, match="vectors is required"):
        hvp(net, mse, data=[(x, y)])
    with pytest.raises(TypeError, match=r"process_group must be a torch.distributed"):
        gradient(net, mse, x, y, process_group="world")
    with pytest.raises(TypeError, match=r"process_group must be a torch.distributed"):
        saddle_certificates(net, mse, x, y, process_group=object())


def test_means_that_do_not_divide_by_the_sample_count_are_refused() -> None:
    net = _net(widths=(3, 4, 3))
    x, _ = _xy()
    y = torch.tensor([0, 1, 2] * 7 + [0, 1])
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    with pytest.raises(ValueError, match="class weights"):
        gradient(net, weighted, data=_batches(x, y, 3))  # type: ignore[arg-type]
    y_ign = y.clone()
    y_ign[12] = -100
    with pytest.raises(ValueError, match=r"batch 1 has targets equal to .*ignore_index"):
        gradient(net, nn.CrossEntropyLoss(), data=_batches(x, y_ign, 3))  # type: ignore[arg-type]
    # the same data with a sum is fine, and equals brute force
    s = nn.CrossEntropyLoss(weight=weighted.weight, reduction="sum")
    g_ref = _reference(net, s, x, y)[1]
    assert _rel(gradient(net, s, data=_batches(x, y, 3)), g_ref) <= 1e-12  # type: ignore[arg-type]


def test_a_distributed_sampler_that_pads_its_shards_is_refused() -> None:
    # 23 samples over 3 replicas: DistributedSampler(drop_last=False) gives every rank 8
    # indices, repeating one sample, which would count twice in the data set's loss
    net, (x, y) = _net(), _xy()
    dataset = TensorDataset(x, y)
    mse, total = nn.MSELoss(), nn.MSELoss(reduction="sum")
    message = (
        r"gradient: data is a DataLoader whose sampler, a DistributedSampler with "
        r"drop_last=False, splits 23 samples over num_replicas=3: it pads the shards to 8 "
        r"samples each by repeating 1, .* drop_last=True"
    )
    for rank in range(3):
        sampler = DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=False)
        with pytest.raises(ValueError, match=message):
            gradient(net, mse, data=DataLoader(dataset, batch_size=5, sampler=sampler))
    # a BatchSampler around one, another tool, a sum
    batches = BatchSampler(DistributedSampler(dataset, num_replicas=2, rank=1), 4, False)
    with pytest.raises(ValueError, match=r"inertia_change: .* over num_replicas=2"):
        inertia_change(*_widened()[1:], total, data=DataLoader(dataset, batch_sampler=batches))
    # what the message proposes is accepted: drop_last=True (the shards hold samples
    # 0..20, interleaved), or a data set whose size num_replicas divides; the shards'
    # sums add up to the sum over the samples they hold
    for kept, drop_last in ((x[:21], True), (x[:21], False)):
        data = dataset if drop_last else TensorDataset(kept, y[:21])
        parts = [
            gradient(
                net,
                total,
                data=DataLoader(
                    data,
                    batch_size=3,
                    sampler=DistributedSampler(
                        data, num_replicas=3, rank=r, shuffle=False, drop_last=drop_last
                    ),
                ),
            )
            for r in range(3)
        ]
        g_ref = _reference(net, total, kept, y[:21])[1]
        assert _rel(sum(parts[1:], parts[0]), g_ref) <= 1e-12
