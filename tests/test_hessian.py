"""torch_embed.hessian against brute-force torch.autograd.functional.hessian (float64)."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_embed.hessian import (
    HessianOperator,
    dense_hessian,
    flat_loss,
    gradient,
    hessian,
    hvp,
)

F64 = torch.float64


def _mlp(
    widths: list[int], act: Callable[[], nn.Module], bias: bool, bn: bool = False
) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            layers.append(act())
    return nn.Sequential(*layers)


def _reference(model: nn.Module, loss_fn: Any, x: Tensor, y: Any) -> tuple[Tensor, Tensor]:
    """Dense Hessian and gradient by torch.autograd.functional on a float64 deep copy."""
    ref = copy.deepcopy(model).double()
    params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in params]
    theta = torch.cat([p.detach().reshape(-1) for _, p in params])
    x64 = x.double()
    y64 = y.double() if y.is_floating_point() else y

    def f(t: Tensor) -> Tensor:
        d = {n: c.view_as(p) for (n, p), c in zip(params, torch.split(t, sizes))}
        return loss_fn(torch.func.functional_call(ref, d, (x64,)), y64)

    h = torch.autograd.functional.hessian(f, theta)
    g = torch.autograd.functional.jacobian(f, theta)
    return h, g


def _custom_loss(out: Tensor, target: Tensor) -> Tensor:
    return ((out - target) ** 2).sum(dim=1).mean() + 0.1 * (out**4).mean()


# (id, widths, activation, bias, loss, classification)
CASES: list[tuple[str, list[int], Callable[[], nn.Module], bool, Any, bool]] = [
    ("tanh-mse-d1", [3, 4], nn.Tanh, True, nn.MSELoss(), False),
    ("tanh-mse-d2", [3, 5, 2], nn.Tanh, True, nn.MSELoss(), False),
    ("tanh-Fmse-d3", [2, 4, 3, 2], nn.Tanh, True, F.mse_loss, False),
    ("sigmoid-mse-nobias", [3, 5, 2], nn.Sigmoid, False, nn.MSELoss(), False),
    ("softplus-custom", [3, 4, 3], nn.Softplus, True, _custom_loss, False),
    ("gelu-ce", [3, 5, 4], nn.GELU, True, nn.CrossEntropyLoss(), True),
    ("silu-mse-nobias", [3, 5, 2], nn.SiLU, False, nn.MSELoss(), False),
    ("silu-mse-bias-d3", [2, 4, 4, 1], nn.SiLU, True, nn.MSELoss(), False),
    ("relu-mse", [3, 6, 2], nn.ReLU, True, nn.MSELoss(), False),
    ("elu-ce-nobias-d3", [3, 4, 4, 3], nn.ELU, False, nn.CrossEntropyLoss(), True),
    ("tanh-sum-mse", [3, 4, 2], nn.Tanh, True, nn.MSELoss(reduction="sum"), False),
    ("gelu-custom-d3", [2, 3, 3, 2], nn.GELU, False, _custom_loss, False),
]


def _data(case_in: int, case_out: int, classification: bool, n: int = 11) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, case_in, generator=g)
    if classification:
        return x, torch.randint(0, case_out, (n,), generator=g)
    return x, torch.randn(n, case_out, generator=g)


@pytest.mark.parametrize("engine", ["auto", "reverse"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hessian_matches_autograd_reference(case: Any, engine: str) -> None:
    _name, widths, act, bias, loss_fn, classification = case
    torch.manual_seed(0)
    model = _mlp(widths, act, bias).double()
    x, y = _data(widths[0], widths[-1], classification)
    h = hessian(model, loss_fn, x, y, chunk_size=7, engine=engine)
    ref, gref = _reference(model, loss_fn, x, y)
    assert h.dtype == F64 and h.shape == ref.shape
    assert torch.equal(h, h.T)
    assert (h - ref).abs().max() <= 1e-10 * ref.abs().max()
    g = gradient(model, loss_fn, x, y)
    assert torch.allclose(g, gref, rtol=1e-12, atol=1e-15)


def test_batchnorm_eval_and_float32_model_cast_to_float64() -> None:
    torch.manual_seed(1)
    model = _mlp([3, 5, 2], nn.Tanh, True, bn=True)  # float32 on purpose
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x, y = _data(3, 2, False)
    h = hessian(model, nn.MSELoss(), x, y)
    ref, _ = _reference(model.eval(), nn.MSELoss(), x, y)
    assert h.dtype == F64
    assert (h - ref).abs().max() <= 1e-10 * ref.abs().max()
    # float32 computation on request
    h32 = hessian(model, nn.MSELoss(), x, y, dtype=torch.float32)
    assert h32.dtype == torch.float32
    assert (h32.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_train_mode_batchnorm_and_dropout_refused_unless_allowed() -> None:
    torch.manual_seed(2)
    model = _mlp([3, 4, 2], nn.Tanh, True, bn=True).double()
    x, y = _data(3, 2, False)
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) is in train mode"):
        hessian(model, nn.MSELoss(), x, y)
    drop = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.2), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"module '2' \(Dropout\)"):
        hessian(drop, nn.MSELoss(), x, y)
    # opt-in: the train-mode loss (batch statistics), model's own statistics untouched
    before = model[1].running_mean.clone(), int(model[1].num_batches_tracked)
    h = hessian(model, nn.MSELoss(), x, y, allow_train_mode=True)
    ref, _ = _reference(model, nn.MSELoss(), x, y)  # deep copy in train mode
    assert (h - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert torch.equal(model[1].running_mean, before[0])
    assert int(model[1].num_batches_tracked) == before[1]


def test_train_mode_dropout_uses_one_mask_for_every_block() -> None:
    torch.manual_seed(7)
    drop = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).double()
    x, y = _data(3, 2, False)
    torch.manual_seed(123)
    h = hessian(drop, nn.MSELoss(), x, y, allow_train_mode=True)
    torch.manual_seed(123)
    ref, _ = _reference(drop, nn.MSELoss(), x, y)  # one forward pass: one mask
    assert (h - ref).abs().max() <= 1e-10 * ref.abs().max()
    torch.manual_seed(124)  # another mask gives another Hessian: the check has teeth
    other, _ = _reference(drop, nn.MSELoss(), x, y)
    assert (other - ref).abs().max() > 1e-3 * ref.abs().max()


def test_no_double_backward_activation_refused_naming_layer() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Hardsigmoid(), nn.Linear(3, 1)).double()
    x, y = _data(2, 1, False)
    with pytest.raises(ValueError, match=r"module '1' \(Hardsigmoid\) has no second derivative"):
        hessian(model, nn.MSELoss(), x, y)
    with pytest.raises(ValueError, match="Hardsigmoid"):
        HessianOperator(model, nn.MSELoss(), x, y)


def test_unregistered_module_without_double_backward_gives_clear_error() -> None:
    class Hard(nn.Module):  # not in the registry: found by the probe instead
        def forward(self, z: Tensor) -> Tensor:
            return F.hardsigmoid(z)

    model = nn.Sequential(nn.Linear(2, 3), Hard(), nn.Linear(3, 1)).double()
    x, y = _data(2, 1, False)
    with pytest.raises(ValueError, match="cannot compute second derivatives"):
        hessian(model, nn.MSELoss(), x, y)
    with pytest.raises(ValueError, match="cannot compute Hessian-vector products"):
        hessian(model, nn.MSELoss(), x, y, engine="reverse")


def test_forward_engine_matches_and_mse_pitfall_is_explained() -> None:
    torch.manual_seed(3)
    model = _mlp([3, 4, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False)
    ref, _ = _reference(model, _custom_loss, x, y)
    h = hessian(model, _custom_loss, x, y, engine="forward")
    assert (h - ref).abs().max() <= 1e-10 * ref.abs().max()
    with pytest.raises(ValueError, match=r"forward-over-reverse fails for F\.mse_loss"):
        hessian(model, nn.MSELoss(), x, y, engine="forward")
    with pytest.raises(ValueError, match="engine must be"):
        hessian(model, nn.MSELoss(), x, y, engine="sideways")
    with pytest.raises(ValueError, match="needs a FlatLoss"):
        dense_hessian(lambda t: (t**2).sum(), torch.ones(3, dtype=F64), engine="blocks")
    with pytest.raises(ValueError, match="engine must be"):
        hessian(model, nn.MSELoss(), x, y, engine="sideways")


def test_memory_error_before_allocation() -> None:
    model = _mlp([3, 4, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False)
    with pytest.raises(MemoryError, match=r"P=26 .*HessianOperator"):
        hessian(model, nn.MSELoss(), x, y, max_bytes=1000)
    # a matrix far larger than any machine: refused from the real available memory
    with pytest.raises(MemoryError, match=r"P=1000000"):
        dense_hessian(lambda t: (t**2).sum(), torch.zeros(1_000_000, dtype=F64))


def test_chunk_sizes_agree_exactly_and_frozen_parameters_excluded() -> None:
    torch.manual_seed(4)
    model = _mlp([3, 4, 2], nn.Tanh, True).double()
    model[0].bias.requires_grad_(False)
    x, y = _data(3, 2, False)
    fl = flat_loss(model, nn.MSELoss(), x, y)
    assert fl.names == ("0.weight", "2.weight", "2.bias")
    assert fl.numel == 12 + 8 + 2
    assert torch.equal(fl.unflatten(fl.theta)["2.weight"], model[2].weight.detach())
    hs = [hessian(model, nn.MSELoss(), x, y, chunk_size=c) for c in (1, 5, 22, 100)]
    ref, _ = _reference(model, nn.MSELoss(), x, y)
    assert hs[0].shape == (22, 22)
    for h in hs:
        assert (h - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_hvp_and_operator_match_dense() -> None:
    torch.manual_seed(5)
    model = _mlp([3, 5, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False)
    ref, _ = _reference(model, nn.MSELoss(), x, y)
    p = ref.shape[0]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(p, dtype=F64, generator=g)
    vs = torch.randn(4, p, dtype=F64, generator=g)
    assert torch.allclose(hvp(model, nn.MSELoss(), x, y, v), ref @ v, rtol=1e-10, atol=1e-13)
    assert torch.allclose(hvp(model, nn.MSELoss(), x, y, vs), vs @ ref, rtol=1e-10, atol=1e-13)
    op = HessianOperator(model, nn.MSELoss(), x, y, chunk_size=3)
    assert op.shape == (p, p) and op.dtype == F64
    assert torch.allclose(op.matvec(v), ref @ v, rtol=1e-10, atol=1e-13)
    assert torch.allclose(op.matmat(vs), vs @ ref, rtol=1e-10, atol=1e-13)
    assert torch.allclose(op @ vs.T, ref @ vs.T, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match=r"expected vectors of shape \(32,\)"):
        op.matmat(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        HessianOperator(model, nn.MSELoss(), x, y, chunk_size=0)
    with pytest.raises(TypeError, match="max_bytes must be an int"):
        HessianOperator(model, nn.MSELoss(), x, y, max_bytes=1e9)  # type: ignore[arg-type]


def test_to_scipy_eigsh_finds_extreme_eigenvalues() -> None:
    pytest.importorskip("scipy")
    from scipy.sparse.linalg import eigsh

    torch.manual_seed(6)
    model = _mlp([3, 6, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False)
    ref, _ = _reference(model, nn.MSELoss(), x, y)
    lam = torch.linalg.eigvalsh(ref)
    top = eigsh(HessianOperator(model, nn.MSELoss(), x, y).to_scipy(), k=2, which="LA")[0]
    assert abs(max(top) - float(lam[-1])) <= 1e-8 * float(lam.abs().max())


def test_loss_must_be_scalar() -> None:
    model = _mlp([3, 4, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False)
    with pytest.raises(ValueError, match="scalar"):
        gradient(model, nn.MSELoss(reduction="none"), x, y)


def test_model_and_loss_errors_are_not_reported_as_missing_second_derivatives() -> None:
    """A shape mismatch in the forward pass is the user's bug, not a Hessian limitation."""
    model = _mlp([3, 4, 2], nn.Tanh, True).double()
    x, y = _data(5, 2, False)  # 5 input features for a 3-input network
    for call in (
        lambda: hessian(model, nn.MSELoss(), x, y),
        lambda: hessian(model, nn.MSELoss(), x, y, engine="reverse"),
        lambda: HessianOperator(model, nn.MSELoss(), x, y),
    ):
        with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
            call()
        assert "second derivative" not in str(info.value)
        assert "Hessian-vector" not in str(info.value)


def test_model_parameters_grads_mode_and_rng_untouched() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2))
    x, y = _data(3, 2, False)
    nn.MSELoss()(model(x), y).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    h = hessian(model, nn.MSELoss(), x, y, allow_train_mode=True)
    op = HessianOperator(model, nn.MSELoss(), x, y, allow_train_mode=True)
    assert h.dtype == F64 and op.dtype == F64  # float32 model, float64 result (documented)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p.detach(), before[n][0]) and torch.equal(p.grad, before[n][1])


def _hessian_module() -> Any:
    return sys.modules["torch_embed.hessian"]  # the module, not the re-exported function


def _record_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of vectors of every batched product built from now on."""
    mod = _hessian_module()
    sizes: list[int] = []
    real_vmap = mod.vmap

    def counting_vmap(f: Callable[..., Any], *a: Any, **kw: Any) -> Callable[..., Any]:
        batched = real_vmap(f, *a, **kw)

        def run(v: Tensor) -> Any:
            sizes.append(int(v.shape[0]))
            return batched(v)

        return run

    monkeypatch.setattr(mod, "vmap", counting_vmap)
    return sizes


def test_matmat_batches_sized_from_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11 §5: a fixed batch of 128 vectors once asked for 9.4 GB at P ≈ 1e6."""
    mod = _hessian_module()
    torch.manual_seed(9)
    model = _mlp([3, 6, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False, n=40)
    ref, _ = _reference(model, nn.MSELoss(), x, y)
    p = ref.shape[0]
    g = torch.Generator().manual_seed(1)
    vs = torch.randn(20, p, dtype=F64, generator=g)
    sizes = _record_batches(monkeypatch)
    op = HessianOperator(model, nn.MSELoss(), x, y)
    # one vector needs no sizing: not measured
    assert torch.allclose(op.matvec(vs[0]), ref @ vs[0], rtol=1e-10, atol=1e-13)
    assert sizes == [1] and op._products.vector_bytes is None
    # the first of several runs alone and measures what one vector allocates
    sizes.clear()
    assert torch.allclose(op.matmat(vs[:3]), vs[:3] @ ref, rtol=1e-10, atol=1e-13)
    assert sizes == [1, 2]
    per = op._products.vector_bytes
    assert per is not None and per >= 2 * p * 8
    # free memory for the (20, P) result plus 3.5 vectors' work in MEMORY_FRACTION of it
    need = vs.numel() * 8
    free = need + int(3.5 * per / mod.MEMORY_FRACTION)
    monkeypatch.setattr(mod, "_available_bytes", lambda device: free)
    sizes.clear()
    out = op.matmat(vs)
    assert sizes == [3] * 6 + [2]
    assert torch.allclose(out, vs @ ref, rtol=1e-10, atol=1e-13)
    # plenty of memory: one batch; too little even for the result: refused up front
    monkeypatch.setattr(mod, "_available_bytes", lambda device: 2**40)
    sizes.clear()
    assert torch.allclose(op.matmat(vs), vs @ ref, rtol=1e-10, atol=1e-13)
    assert sizes == [20]
    monkeypatch.setattr(mod, "_available_bytes", lambda device: need - 1)
    with pytest.raises(MemoryError, match=r"20 vectors of P=\d+ .*fewer vectors"):
        op.matmat(vs)
    # max_bytes overrides the probe; an explicit chunk_size is used as given
    small = HessianOperator(model, nn.MSELoss(), x, y, max_bytes=need + 1)
    sizes.clear()
    assert torch.allclose(small.matmat(vs), vs @ ref, rtol=1e-10, atol=1e-13)
    assert sizes == [1] * 20
    monkeypatch.setattr(mod, "_available_bytes", lambda device: 2**40)
    fixed = HessianOperator(model, nn.MSELoss(), x, y, chunk_size=7)
    sizes.clear()
    assert torch.allclose(fixed.matmat(vs), vs @ ref, rtol=1e-10, atol=1e-13)
    assert sizes == [7, 7, 6]


def test_measured_vector_memory_grows_with_the_batch_not_with_p() -> None:
    """The activations of the N samples, not the P parameters, dominate a product."""
    torch.manual_seed(10)
    model = _mlp([3, 16, 2], nn.Tanh, True).double()
    measured = []
    for n in (40, 400):
        x, y = _data(3, 2, False, n=n)
        op = HessianOperator(model, nn.MSELoss(), x, y)
        op.matmat(torch.ones(2, op.shape[0], dtype=F64))
        assert op._products.vector_bytes is not None
        measured.append(op._products.vector_bytes)
    p = HessianOperator(model, nn.MSELoss(), x, y).shape[0]
    assert measured[1] > 5 * measured[0]  # 10x the samples
    assert measured[1] > 20 * 2 * p * 8  # far above the 2·P numbers of input and output


def test_allocation_failure_is_a_memory_error_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU allocator's RuntimeError is not reworded as a missing second derivative."""
    mod = _hessian_module()
    model = _mlp([3, 4, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False)

    def failing_vmap(f: Callable[..., Any], *a: Any, **kw: Any) -> Callable[..., Any]:
        def run(v: Tensor) -> Tensor:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ...")

        return run

    monkeypatch.setattr(mod, "vmap", failing_vmap)
    with pytest.raises(MemoryError, match="smaller chunk_size"):
        hvp(model, nn.MSELoss(), x, y, torch.ones(3, 26, dtype=F64))


@pytest.mark.parametrize("k", [None, 5])
def test_hvp_costs_one_forward_and_no_probe(monkeypatch: pytest.MonkeyPatch, k: Any) -> None:
    """One hvp call: the loss runs once and the second backward sees only the k vectors."""
    torch.manual_seed(11)
    model = _mlp([3, 5, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False)
    ref, _ = _reference(model, nn.MSELoss(), x, y)
    p = ref.shape[0]
    calls: list[int] = []

    def loss(out: Tensor, target: Tensor) -> Tensor:
        calls.append(1)
        return F.mse_loss(out, target)

    rows = _record_batches(monkeypatch)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(p, dtype=F64, generator=g) if k is None else torch.randn(k, p, generator=g)
    out = hvp(model, loss, x, y, v)
    expected = ref @ v if k is None else v.double() @ ref
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-13)
    assert len(calls) == 1  # one forward pass (recorded with its backward), no check pass
    assert sum(rows) == (1 if k is None else k)  # no probe vector
    if k is None:
        assert rows == [1]  # one vector: exactly one Hessian-vector product


def test_hvp_casts_mapping_vectors_and_dict_inputs() -> None:
    """float32 {name: tensor} vectors and dict inputs are cast like tensors (issue 11 §5)."""

    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, batch: dict[str, Tensor]) -> Tensor:
            h: Tensor = self.out(torch.tanh(self.lin(batch["x"]) * batch["scale"]))
            return h

    torch.manual_seed(12)
    model = DictNet()  # float32
    x, y = _data(3, 2, False)
    inputs = {"x": x, "scale": torch.full((1, 4), 1.5)}
    ref64 = copy.deepcopy(model).double()
    params = dict(ref64.named_parameters())
    names = list(params)
    sizes = [q.numel() for q in params.values()]
    in64 = {k: t.double() for k, t in inputs.items()}

    def f(t: Tensor) -> Tensor:
        d = {n: c.view_as(params[n]) for n, c in zip(names, torch.split(t, sizes))}
        return F.mse_loss(torch.func.functional_call(ref64, d, (in64,)), y.double())

    theta = torch.cat([q.detach().reshape(-1) for q in params.values()])
    ref = torch.autograd.functional.hessian(f, theta)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(theta.numel(), generator=g)  # float32
    expected = ref @ v.double()
    out = hvp(model, F.mse_loss, inputs, y, v)
    assert out.dtype == F64 and torch.allclose(out, expected, rtol=1e-10, atol=1e-13)
    # the same vector as a {name: float32 tensor} mapping: a dict of the same shapes back
    as_map = {n: c.view_as(params[n]).float() for n, c in zip(names, torch.split(v, sizes))}
    got = hvp(model, F.mse_loss, inputs, y, as_map)
    assert list(got) == names
    for n, c in zip(names, torch.split(expected, sizes)):
        assert got[n].dtype == F64 and got[n].shape == params[n].shape
        assert torch.allclose(got[n], c.view_as(params[n]), rtol=1e-10, atol=1e-13)
    # k vectors with a leading dimension
    vs = torch.randn(3, theta.numel(), generator=g)
    batch = {n: c.reshape(3, *params[n].shape) for n, c in zip(names, torch.split(vs, sizes, 1))}
    got_k = hvp(model, F.mse_loss, inputs, y, batch)
    flat = torch.cat([got_k[n].reshape(3, -1) for n in names], 1)
    assert torch.allclose(flat, vs.double() @ ref, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match=r"missing \['out.bias'\], unknown \['bogus'\]"):
        hvp(model, F.mse_loss, inputs, y, {**{n: as_map[n] for n in names[:-1]}, "bogus": v})
    with pytest.raises(ValueError, match=r"vectors\['lin.bias'\] has shape \(5,\)"):
        hvp(model, F.mse_loss, inputs, y, {**as_map, "lin.bias": torch.ones(5)})
    with pytest.raises(TypeError, match=r"vectors\['lin.bias'\] must be a tensor"):
        hvp(model, F.mse_loss, inputs, y, {**as_map, "lin.bias": [1.0] * 4})  # type: ignore[dict-item]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and sets RLIMIT_AS")
def test_available_memory_respects_address_space_limit() -> None:
    """``ulimit -v`` (how bench scripts cap memory) bounds the batches, not only RAM."""
    code = (
        "import resource, sys, torch, torch_embed.hessian\n"
        "m = sys.modules['torch_embed.hessian']\n"
        "vm = [l for l in open('/proc/self/status') if l.startswith('VmSize')][0]\n"
        "vm = int(vm.split()[1]) * 1024\n"
        "hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, hard))\n"
        "print(m._available_bytes(torch.device('cpu')))\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False
    )
    assert run.returncode == 0, run.stderr
    got = int(run.stdout.split()[-1])
    assert 2**29 < got <= 2**30


def test_available_memory_respects_cgroup_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _hessian_module()
    monkeypatch.setattr(mod, "_CGROUP_DIR", str(tmp_path))
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000000\n")
    assert mod._cgroup_available() is None
    (tmp_path / "memory.max").write_text("5000000\n")
    assert mod._cgroup_available() == 4_000_000
    assert mod._available_bytes(torch.device("cpu")) <= 4_000_000


@pytest.mark.parametrize("engine", ["blocks", "reverse"])
def test_dense_hessian_batches_sized_from_memory_left_beside_the_matrix(
    monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    torch.manual_seed(13)
    model = _mlp([3, 6, 2], nn.Tanh, True).double()
    x, y = _data(3, 2, False, n=200)
    ref, _ = _reference(model, nn.MSELoss(), x, y)
    p = ref.shape[0]  # 38: blocks of 18, 6, 12 and 2 rows
    sizes = _record_batches(monkeypatch)
    # plenty of memory: one batch per block (blocks) or for all rows (reverse), after
    # the first row, which runs alone to measure what a row costs
    h = hessian(model, nn.MSELoss(), x, y, engine=engine, max_bytes=2**40)
    assert (h - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert sizes == ([1, 17, 6, 12, 2] if engine == "blocks" else [1, 37])
    # just enough for the matrix and the up-front check's two 38-row chunks: half of
    # what is left holds less than one measured row (its activations: 200 samples x 6
    # neurons), so the rows go one at a time
    sizes.clear()
    need = p * p * 8 + 2 * p * p * 8
    h = hessian(model, nn.MSELoss(), x, y, engine=engine, max_bytes=need)
    assert (h - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert sizes == [1] * p
