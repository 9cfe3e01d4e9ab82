"""torch_embed.testing: the helpers pass on correct widenings and fail usefully on wrong ones."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import torch_embed
from torch_embed.testing import (
    assert_critical,
    assert_embedding_nondecreasing,
    assert_function_preserved,
    assert_gradients_mapped,
    assert_inertia_nondecreasing,
    default_dtype,
    default_tolerances,
)

F64 = torch.float64


def _net(dtype: torch.dtype = F64, act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 2)).to(dtype)


def _data(dtype: torch.dtype = F64, n: int = 16, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(n, 2, generator=g, dtype=torch.float64).to(dtype),
    )


def _widened(
    scheme: torch_embed.Scheme | str, dtype: torch.dtype = F64, act: type[nn.Module] = nn.Tanh
) -> tuple[nn.Sequential, nn.Sequential, torch_embed.Embedding]:
    net = _net(dtype, act)
    narrow = copy.deepcopy(net)
    emb = torch_embed.widen(net, [9, 7], scheme, generator=torch.Generator().manual_seed(2))
    return narrow, net, emb


CRITICAL_SCHEMES = [
    torch_embed.Split(alpha=0.5),
    torch_embed.Split(alpha=1 / 3),
    torch_embed.Split(alpha=-0.7),  # signed split
    torch_embed.Net2Net(),
    torch_embed.Null(bias=0.4),
]


# ---------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    "scheme", [*CRITICAL_SCHEMES, torch_embed.Net2Net(noise=0.5), torch_embed.Null(fan_in_std=1.0)]
)
def test_function_preserved_passes_on_function_preserving_schemes(scheme, dtype):
    narrow, wide, _ = _widened(scheme, dtype)
    x, _ = _data(dtype)
    assert_function_preserved(narrow, wide, x)


def test_function_preserved_fails_on_a_broken_fan_out_split_with_the_worst_element():
    narrow, wide, emb = _widened(torch_embed.Split(alpha=0.5, select=[[1, 2, 3, 4], [0, 1, 2]]))
    copy_index = 5  # first appended copy in hidden layer 0: a copy of narrow neuron 1
    assert int(emb.layers[0].source[copy_index]) == 1
    with torch.no_grad():
        wide[2].weight[:, copy_index] *= 1.01  # the two halves no longer sum to the original
    x, _ = _data()
    with torch.no_grad():
        diff = (wide(x) - narrow(x)).abs()
    with pytest.raises(AssertionError) as info:
        assert_function_preserved(narrow, wide, x)
    text = str(info.value)
    assert text.startswith("widened output differs from the reference output")
    # brute force: every element is off by far more than the bound, and the worst is the
    # largest difference (the bound is ~1e-15, differences ~1e-3)
    n_bad = int((diff > 1e-12).sum())
    assert f"mismatched elements: {n_bad} / {diff.numel()}" in text
    worst = divmod(int(diff.argmax()), diff.shape[1])
    assert f"worst at index {worst}" in text
    expected = narrow(x)[worst].item()
    assert f"expected {expected:.17g}" in text
    allowed = re.search(r"> allowed ([0-9.e+-]+)", text)
    assert allowed is not None and 0 < float(allowed.group(1)) < 1e-12
    assert "forward_error_bound(reference, x) + forward_error_bound(widened, x)" in text


def test_function_preserved_fails_on_random_padding():
    narrow, wide, emb = _widened(torch_embed.RandomPad())
    assert emb.kind is torch_embed.EmbeddingKind.NONE
    with pytest.raises(AssertionError, match="mismatched elements"):
        assert_function_preserved(narrow, wide, _data()[0])


def test_function_preserved_default_bound_is_dtype_aware():
    """In float32 a split is off by rounding; the default bound accepts that, atol=0 does not."""
    narrow, wide, _ = _widened(torch_embed.Split(alpha=1 / 3), torch.float32)
    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert not torch.equal(narrow(x), wide(x))  # not bit-exact: a tolerance is needed
    assert_function_preserved(narrow, wide, x)
    with pytest.raises(AssertionError, match=r"rtol=0, atol=0"):
        assert_function_preserved(narrow, wide, x, rtol=0.0, atol=0.0)


def test_function_preserved_explicit_tolerances():
    narrow, wide, _ = _widened("split")
    with torch.no_grad():
        wide[4].bias += 1e-3  # every output off by exactly 1e-3 (up to rounding)
    x, _ = _data()
    assert_function_preserved(narrow, wide, x, rtol=0.0, atol=1.1e-3)
    with pytest.raises(AssertionError) as info:
        assert_function_preserved(narrow, wide, x, rtol=0.0, atol=0.9e-3)
    assert "mismatched elements: 32 / 32 (100.0%)" in str(info.value)
    assert "allowed 0.0009" in str(info.value)
    # rtol scales with |expected|: a huge rtol accepts it
    assert_function_preserved(narrow, wide, x, rtol=10.0, atol=0.0)


@pytest.mark.parametrize(("rtol", "atol"), [(1e-3, None), (None, 1e-3)])
def test_rtol_and_atol_must_come_together(rtol, atol):
    narrow, wide, emb = _widened("split")
    x, y = _data()
    with pytest.raises(ValueError, match="pass both rtol and atol"):
        assert_function_preserved(narrow, wide, x, rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match="pass both rtol and atol"):
        assert_gradients_mapped(narrow, wide, emb, nn.MSELoss(), x, y, rtol=rtol, atol=atol)


def test_negative_tolerance_and_bad_msg_are_refused():
    narrow, wide, _ = _widened("split")
    x, _ = _data()
    with pytest.raises(ValueError, match="atol must be a finite number >= 0"):
        assert_function_preserved(narrow, wide, x, rtol=0.0, atol=-1.0)
    with pytest.raises(TypeError, match="msg must be a str"):
        assert_function_preserved(narrow, wide, x, msg=3)  # type: ignore[arg-type]


def test_msg_string_replaces_and_callable_edits_the_message():
    narrow, wide, _ = _widened(torch_embed.RandomPad())
    x, _ = _data()
    with pytest.raises(AssertionError) as info:
        assert_function_preserved(narrow, wide, x, msg="my widening is wrong")
    assert str(info.value) == "my widening is wrong"
    seen = []

    def edit(generated: str) -> str:
        seen.append(generated)
        return "layer 2: " + generated

    with pytest.raises(AssertionError) as info:
        assert_function_preserved(narrow, wide, x, msg=edit)
    assert len(seen) == 1 and "mismatched elements" in seen[0]
    assert str(info.value) == "layer 2: " + seen[0]


def test_function_preserved_on_modules_the_bound_does_not_know_uses_dtype_defaults():
    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    narrow, wide, _ = _widened(torch_embed.RandomPad())
    with pytest.raises(AssertionError, match=r"torch\.testing defaults rtol=1e-07, atol=1e-07"):
        assert_function_preserved(Wrapped(narrow), Wrapped(wide), _data()[0])


def test_function_preserved_in_train_mode_with_dropout_asks_for_eval():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    narrow = copy.deepcopy(net)
    torch_embed.widen(net, [6], "split", generator=torch.Generator().manual_seed(0))
    x, _ = _data()
    with pytest.raises(ValueError, match=r"Call \.eval\(\) on both modules"):
        assert_function_preserved(narrow, net, x)
    assert_function_preserved(narrow.eval(), net.eval(), x)


def test_default_tolerances_follow_torch_testing():
    assert default_tolerances(torch.float32) == (1.3e-6, 1e-5)
    assert default_tolerances(torch.float16, F64) == (1e-3, 1e-5)


def test_default_dtype_restores_on_error():
    before = torch.get_default_dtype()
    with pytest.raises(RuntimeError), default_dtype(F64):
        assert torch.ones(1).dtype == F64
        raise RuntimeError("boom")
    assert torch.get_default_dtype() == before
    with pytest.raises(TypeError, match=r"floating torch\.dtype"), default_dtype(torch.int64):
        pass


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scheme", CRITICAL_SCHEMES)
def test_gradients_mapped_passes_on_critical_embeddings(scheme, dtype):
    narrow, wide, emb = _widened(scheme, dtype)
    assert emb.kind is torch_embed.EmbeddingKind.CRITICAL
    x, y = _data(dtype)
    assert_gradients_mapped(narrow, wide, emb, nn.MSELoss(), x, y)


def test_gradients_mapped_fails_on_a_mis_scaled_row_of_the_map():
    """Applied with α = 1/2, checked against the map of α = 1/4: the split rows are off."""
    select = {0: [1], 1: []}
    net = _net()
    narrow = copy.deepcopy(net)
    torch_embed.widen(net, [6, 4], torch_embed.Split(alpha=0.5, select=select))
    wrong = torch_embed.plan(narrow, [6, 4], torch_embed.Split(alpha=0.25, select=select))
    x, y = _data()
    with pytest.raises(AssertionError) as info:
        assert_gradients_mapped(narrow, net, wrong, nn.MSELoss(), x, y)
    text = str(info.value)
    # fan-in weights and biases of neuron 1 and its copy (row 5) are mis-scaled; the
    # fan-out columns are copies, so layer 2 is right
    assert "parameter '0.weight': mismatched elements: 6 / 18" in text
    assert "parameter '0.bias': mismatched elements: 2 / 6" in text
    assert "'2.weight'" not in text and "'4.weight'" not in text
    worst = re.search(r"parameter '0.weight'.*\n  worst at index \((\d+), (\d+)\)", text)
    assert worst is not None and int(worst.group(1)) in (1, 5)
    assert "embedding kind: critical" in text


def test_gradients_mapped_fails_on_function_preserving_relu_rescaling():
    """ReLU is positively homogeneous: scaling a copy's fan-in by 2 and fan-out by 1/2 keeps
    the function, so assert_function_preserved passes, but the gradients no longer map."""
    narrow, wide, emb = _widened(torch_embed.Split(alpha=0.5), act=nn.ReLU)
    with torch.no_grad():
        wide[0].weight[6] *= 2
        wide[0].bias[6] *= 2
        wide[2].weight[:, 6] /= 2
    x, y = _data()
    assert_function_preserved(narrow, wide, x)
    with pytest.raises(AssertionError, match=r"parameter '0.weight': mismatched elements"):
        assert_gradients_mapped(narrow, wide, emb, nn.MSELoss(), x, y)


def test_gradients_mapped_explains_an_output_preserving_embedding():
    narrow, wide, emb = _widened(torch_embed.Net2Net(noise=0.5))
    assert emb.kind is torch_embed.EmbeddingKind.OUTPUT_PRESERVING
    x, y = _data()
    with pytest.raises(AssertionError) as info:
        assert_gradients_mapped(narrow, wide, emb, nn.MSELoss(), x, y)
    text = str(info.value)
    assert "note: the embedding is output-preserving, not critical" in text
    assert "fan-out offsets" in text


def test_gradients_mapped_explicit_tolerance_and_msg():
    narrow, wide, emb = _widened(torch_embed.Net2Net(noise=1e-9))
    x, y = _data()
    assert_gradients_mapped(narrow, wide, emb, nn.MSELoss(), x, y, rtol=0.0, atol=1e-6)
    with pytest.raises(AssertionError, match=r"^custom$"):
        assert_gradients_mapped(
            narrow, wide, emb, nn.MSELoss(), x, y, rtol=0.0, atol=0.0, msg="custom"
        )


def test_gradients_mapped_leaves_grad_fields_alone():
    narrow, wide, emb = _widened("split")
    x, y = _data()
    assert_gradients_mapped(narrow, wide, emb, nn.MSELoss(), x, y)
    assert all(p.grad is None for p in [*narrow.parameters(), *wide.parameters()])


def test_gradients_mapped_refuses_a_non_scalar_loss():
    narrow, wide, emb = _widened("split")
    x, y = _data()
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        assert_gradients_mapped(narrow, wide, emb, nn.MSELoss(reduction="none"), x, y)


# ---------------------------------------------------------------------------- critical
def _zero_net() -> nn.Sequential:
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    return net


def test_critical_passes_at_a_closed_form_critical_point_and_after_a_split():
    """The zero network with centred targets: every gradient is 0 exactly (tanh(0) = 0,
    zero fan-outs, and the output bias gradient is the mean residual)."""
    net = _zero_net()
    x, y = _data()
    y = y - y.mean(0)
    assert_critical(net, nn.MSELoss(), x, y, gtol=1e-14)
    torch_embed.widen(net, [7, 6], "split", generator=torch.Generator().manual_seed(0))
    assert_critical(net, nn.MSELoss(), x, y, gtol=1e-14)


def test_critical_fails_away_from_a_critical_point_and_names_the_largest_entry():
    net = _zero_net()
    x, y = _data()
    y = y - y.mean(0)
    with torch.no_grad():
        net[4].bias[1] = 0.5  # output bias off: gradient 0.5 = mean residual of output 1
    with pytest.raises(AssertionError) as info:
        assert_critical(net, nn.MSELoss(), x, y)
    text = str(info.value)
    # brute force: MSELoss averages over N·2 entries, d/db_1 = 2·0.5/2 = 0.5
    assert text.startswith("not a critical point: ‖∇R‖₂ = 0.5 > gtol = 1e-08")
    assert "largest entry: parameter '4.bias' at index (1,): 0.5" in text
    assert "'0.weight' 0" in text


def test_critical_default_gtol_depends_on_dtype_and_is_validated():
    net = _zero_net().float()
    x, y = _data(torch.float32)
    y = y - y.mean(0) + 2e-5  # gradient norm ~3e-5: fine for float32 (1e-4), not float64
    assert_critical(net, nn.MSELoss(), x, y)
    with pytest.raises(AssertionError, match="gtol = 1e-08"):
        assert_critical(net.double(), nn.MSELoss(), x.double(), y.double())
    with pytest.raises(ValueError, match="gtol must be a finite number > 0"):
        assert_critical(net, nn.MSELoss(), x, y, gtol=0.0)


@pytest.fixture
def saddle():
    """A closed-form critical point with negative eigenvalues: a 1-3-1 tanh network with
    zero fan-in weights, biases β = (0.5, -1, 2), zero fan-out and the output bias at
    the mean target. Every gradient vanishes (the residuals have mean zero and multiply
    constants or zero fan-outs); the Hessian is a saddle (JML 2022's null-neuron block)."""
    x = torch.linspace(-2, 2, 12, dtype=F64)[:, None]
    y = torch.tanh(2 * x) + 0.3 * torch.sin(3 * x)
    net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        net[2].weight.zero_()
        net[2].bias.fill_(float(y.mean()))
    return net, x, y


def test_critical_point_stays_critical_under_a_critical_embedding_only(saddle):
    net, x, y = saddle
    assert_critical(net, nn.MSELoss(), x, y, gtol=1e-15)
    split = copy.deepcopy(net)
    torch_embed.widen(split, [5], torch_embed.Split(alpha=0.3), generator=torch.Generator())
    assert_critical(split, nn.MSELoss(), x, y, gtol=1e-15)
    # null neurons with a random fan-in keep the function but not criticality: their
    # fan-out gradient is the residual times a non-constant activation
    fan_in = copy.deepcopy(net)
    emb = torch_embed.widen(
        fan_in, [5], torch_embed.Null(fan_in_std=1.0), generator=torch.Generator().manual_seed(0)
    )
    assert emb.kind is torch_embed.EmbeddingKind.OUTPUT_PRESERVING
    assert_function_preserved(net, fan_in, x)
    with pytest.raises(AssertionError, match=r"largest entry: parameter '2\.weight'"):
        assert_critical(fan_in, nn.MSELoss(), x, y)


# ---------------------------------------------------------------------------- inertia
def _counts(model: nn.Module, x, y, tol: float) -> tuple[int, int, int]:
    """Brute force: dense autograd Hessian, eigvalsh, threshold."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    ev = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))
    return int((ev < -tol).sum()), int((ev.abs() <= tol).sum()), int((ev > tol).sum())


def test_embedding_nondecreasing_matches_brute_force_counts(saddle):
    net, x, y = saddle
    wide = copy.deepcopy(net)
    torch_embed.widen(wide, [5], "split", generator=torch.Generator().manual_seed(0))
    tol = 1e-8
    before, after = assert_embedding_nondecreasing(net, wide, nn.MSELoss(), x, y, tol=tol)
    assert before.as_tuple() == _counts(net, x, y, tol)
    assert after.as_tuple() == _counts(wide, x, y, tol)
    # the counts really grow (two splits of this saddle: one negative, one zero and one
    # positive eigenvalue each, from the closed-form block D of THEORY §6)
    assert before.as_tuple() == (3, 3, 4) and after.as_tuple() == (5, 5, 6)


def test_embedding_nondecreasing_fails_when_the_models_are_swapped(saddle):
    net, x, y = saddle
    wide = copy.deepcopy(net)
    torch_embed.widen(wide, [5], "split", generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError) as info:
        assert_embedding_nondecreasing(wide, net, nn.MSELoss(), x, y, tol=1e-8)
    text = str(info.value)
    first = text.splitlines()[0]
    assert (
        first
        == "Hessian inertia decreased: negative 5 -> 3 (-2), zero 5 -> 3 (-2), positive 6 -> 4 (-2)"
    )


def test_inertia_nondecreasing_message_names_the_count_and_flags_ambiguity():
    from torch_embed.inertia import Inertia

    before = Inertia(2, 1, 10, tol=1e-10, gap=1e9)
    after = Inertia(1, 3, 12, tol=1e-10, gap=20.0, ambiguous=True)
    with pytest.raises(AssertionError) as info:
        assert_inertia_nondecreasing(before, after)
    text = str(info.value)
    assert text.splitlines()[0] == "Hessian inertia decreased: negative 2 -> 1 (-1)"
    assert "after:  negative=1, zero=3, positive=12 (tol 1e-10, gap 20, AMBIGUOUS)" in text
    assert "ambiguous counts: after: gap ratio 20 at tol 1e-10" in text
    assert "before: gap" not in text
    # checking only the counts that did not decrease passes
    assert_inertia_nondecreasing(before, after, counts=("zero", "positive"))
    with pytest.raises(AssertionError, match=r"^negative fell$"):
        assert_inertia_nondecreasing(before, after, msg="negative fell")


def test_inertia_nondecreasing_argument_checks():
    from torch_embed.inertia import Inertia

    a = Inertia(0, 0, 3)
    with pytest.raises(TypeError, match=r"before must be a torch_embed\.inertia\.Inertia"):
        assert_inertia_nondecreasing((0, 0, 3), a)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counts must be a sequence"):
        assert_inertia_nondecreasing(a, a, counts=("negativ",))  # type: ignore[arg-type]


class _Const(nn.Module):
    """A "network" that outputs a fixed tensor (to place differences exactly)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.register_buffer("out", torch.tensor(values, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def _outputs_differ(expected: list[float], actual: list[float], rtol: float, atol: float) -> str:
    """The failure message of assert_function_preserved, or "" if it passes."""
    try:
        assert_function_preserved(
            _Const(expected), _Const(actual), torch.zeros(1), rtol=rtol, atol=atol
        )
    except AssertionError as err:
        return str(err)
    return ""


def test_worst_element_is_the_one_furthest_beyond_its_allowance() -> None:
    """Index 0 has the larger |difference| (2e-3) but a large allowance (rtol·100 =
    1.5e-3); index 1 differs by 1e-3 against 1.5e-6: it is the worst element."""
    text = _outputs_differ([100.0, 0.1], [100.002, 0.101], rtol=1.5e-5, atol=0.0)
    assert "mismatched elements: 2 / 2" in text
    assert "worst at index (1,): actual 0.101" in text


def test_relative_tolerance_is_relative_to_expected() -> None:
    """allowed = atol + rtol·|expected| (as documented, as torch.testing): 1.5 against
    1.0 with rtol = 0.4 is 0.1 too far; 1.0 against 1.5 is within 0.6."""
    assert "|difference| 0.5 > allowed 0.4" in _outputs_differ([1.0], [1.5], rtol=0.4, atol=0.0)
    assert _outputs_differ([1.5], [1.0], rtol=0.4, atol=0.0) == ""


@pytest.mark.parametrize("rtol", [0.0, 1e-6])
def test_non_finite_outputs_match_only_when_equal(rtol: float) -> None:
    """Equal infinities match and a NaN never does (torch.testing's rules). With
    expected = inf the allowance atol + rtol·|expected| is inf (or NaN for rtol = 0), so
    -inf or a finite output against +inf used to pass."""
    inf, nan = math.inf, math.nan
    assert _outputs_differ([inf, -inf, 1.0], [inf, -inf, 1.0], rtol=rtol, atol=1e-6) == ""
    for expected, actual in [
        (inf, -inf),
        (inf, 1.0),
        (-inf, 0.0),
        (1.0, inf),
        (nan, 1.0),
        (1.0, nan),
        (nan, nan),
    ]:
        text = _outputs_differ([2.0, expected], [2.0, actual], rtol=rtol, atol=1e-6)
        assert "mismatched elements: 1 / 2" in text and "worst at index (1,)" in text, (
            expected,
            actual,
        )
