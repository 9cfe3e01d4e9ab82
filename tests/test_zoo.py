"""The zoo's own bookkeeping, checked against the real modules (no tracer involved)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from zoo import ZOO, ZooCase, by_name, feature_width

CASES = [pytest.param(case, id=case.name) for case in ZOO]
BN_CASES = [pytest.param(case, id=case.name) for case in ZOO if case.batchnorm]

# Modules with parameters that write no listed group, besides the output layer: a norm
# over a concatenation of several groups is an alias of none of them.
NOT_ALIASES = {"densenet_block": {"layer2.norm", "norm5"}}


def _feature_axis(module: nn.Module, out: Tensor) -> int:
    # Linear and LayerNorm act on the last axis; convs, BatchNorm, GroupNorm and a
    # module owning a layer-scale vector (the ConvNeXt block) return channels first.
    return out.dim() - 1 if isinstance(module, nn.Linear | nn.LayerNorm) else 1


def _run_recording(case: ZooCase, model: nn.Module) -> tuple[Tensor, list[tuple[str, Tensor]]]:
    """Forward the example input; record (FQN, output) of each module call, in order."""
    calls: list[tuple[str, Tensor]] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: calls.append((name, out)))
        for name, m in model.named_modules(remove_duplicate=False)
    ]
    try:
        out = model(*case.example_inputs())
    finally:
        for h in handles:
            h.remove()
    return out, calls


def test_names_unique_and_lookup() -> None:
    names = [c.name for c in ZOO]
    assert len(names) == len(set(names))
    assert by_name("resnet_basic").name == "resnet_basic"
    with pytest.raises(KeyError, match="no zoo case 'nope'"):
        by_name("nope")
    case = by_name("resnet_basic")
    assert case.group("layer1.1.bn2").name == "conv1"
    with pytest.raises(KeyError, match="no group"):
        case.group("head.2")


@pytest.mark.parametrize("case", CASES)
def test_build_is_fresh_deterministic_float64_small(case: ZooCase) -> None:
    state = torch.random.get_rng_state()
    a, b = case.build(), case.build()
    assert torch.equal(torch.random.get_rng_state(), state)  # building leaves the RNG
    assert a is not b and a.training and b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, t in sa.items():
        assert torch.equal(t, sb[key]), key
        assert t.data_ptr() != sb[key].data_ptr()
        if t.is_floating_point():
            assert t.dtype == torch.float64, key
    assert sum(p.numel() for p in a.parameters()) < 5000
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in a.modules())
    assert has_bn == case.batchnorm


@pytest.mark.parametrize("case", CASES)
def test_forward_runs(case: ZooCase) -> None:
    model = case.build()
    (x,) = case.example_inputs()
    assert x.dtype == torch.float64
    assert torch.equal(x, case.example_inputs()[0])
    out = model(x)
    assert out.dtype == torch.float64 and out.shape == (x.shape[0], 2)
    assert torch.isfinite(out).all()
    out.sum().backward()  # gradients flow through every op (the custom op included)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("case", BN_CASES)
def test_batchnorm_cases_run_in_eval_mode(case: ZooCase) -> None:
    model = case.build()
    (x,) = case.example_inputs()
    train_out = model(x)
    eval_out = model.eval()(x)
    assert torch.isfinite(eval_out).all()
    assert not torch.allclose(train_out, eval_out)  # random running stats matter


@pytest.mark.parametrize("case", CASES)
def test_expected_groups_match_modules(case: ZooCase) -> None:
    model = case.build()
    modules = dict(model.named_modules())
    fqns = [fqn for g in case.expected for fqn in (g.name, *g.aliases)]
    assert len(fqns) == len(set(fqns)), "an FQN names at most one group"
    out, calls = _run_recording(case, model)
    order = [name for name, _ in calls]
    for g in case.expected:
        assert g.size >= 1
        assert g.growable or g.note, f"{g.name}: a pinned group says what pins it"
        producers = (g.name, *g.aliases)
        for fqn in producers:
            module = modules[fqn]
            assert list(module.parameters(recurse=False)), f"{fqn} owns no parameter"
            assert feature_width(module) == g.size, fqn
            for name, t in calls:
                if name == fqn:
                    assert t.shape[_feature_axis(module, t)] == g.size, fqn
        # name first, aliases in forward order (a module's call ends after its children)
        first_calls = [order.index(fqn) for fqn in producers]
        assert first_calls == sorted(first_calls), producers
    # every module with parameters writes a listed group, but the output layer
    covered = set(fqns) | NOT_ALIASES.get(case.name, set())
    for fqn, module in modules.items():
        if list(module.parameters(recurse=False)) and fqn not in covered:
            outputs = [t for name, t in calls if name == fqn]
            assert outputs and outputs[-1] is out, f"{fqn} writes no listed group"
