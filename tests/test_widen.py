"""``widen`` in place: identities, attributes, dtypes, ``.grad``, hooks, atomicity."""

from __future__ import annotations

import copy
import importlib
import weakref

import pytest
import torch
from cases import Arch, build_mlp, random_inputs
from torch import nn

from torch_embed.embedding import Embedding, EmbeddingKind
from torch_embed.schemes import DEFAULT_SCHEME, Net2Net, Null, RandomPad, Split, plan
from torch_embed.testing import assert_function_preserved
from torch_embed.widen import embed_, widen

pytestmark = pytest.mark.usefixtures("single_thread")

# the module, not the function torch_embed.widen that the package exports under that name
widen_module = importlib.import_module("torch_embed.widen")

ARCH = Arch(3, (4, 5), 2, batchnorm=(True, True), dropout=(True, False))


def _net(dtype=torch.float64) -> nn.Sequential:
    net = build_mlp(ARCH, seed=0, dtype=dtype)
    net[4].requires_grad_(False)  # a frozen hidden Linear (layer 4, after BN+Tanh+Dropout)
    return net


def test_returns_the_embedding_and_changes_in_place(gen) -> None:
    net = _net()
    modules = list(net.modules())
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    x = random_inputs(ARCH, 8)
    with torch.no_grad():
        before = net(x)
    emb = widen(net, [7, 9], Split(alpha=0.3), generator=gen)
    assert isinstance(emb, Embedding)
    assert emb.wide_widths == (3, 7, 9, 2)
    assert list(net.modules()) == modules and all(a is b for a, b in zip(net.modules(), modules))
    for name, p in net.named_parameters():
        assert p is params[name], name
        assert isinstance(p, nn.Parameter)
    for name, b in net.named_buffers():
        assert b is buffers[name], name
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-14)


def test_features_and_shapes_updated(gen) -> None:
    net = _net()
    widen(net, [7, 9], generator=gen)
    assert (net[0].in_features, net[0].out_features) == (3, 7)
    assert net[1].num_features == 7
    assert (net[4].in_features, net[4].out_features) == (7, 9)
    assert net[5].num_features == 9
    assert (net[7].in_features, net[7].out_features) == (9, 2)
    assert net[0].weight.shape == (7, 3) and net[4].weight.shape == (9, 7)
    assert net[1].running_mean.shape == (7,) and net[5].weight.shape == (9,)
    assert "in_features=7, out_features=9" in repr(net[4])
    assert "BatchNorm1d(9," in repr(net[5])


def test_requires_grad_kept(gen) -> None:
    net = _net()
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    assert not flags["4.weight"] and flags["0.weight"]
    widen(net, [7, 9], generator=gen)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str
)
def test_dtype_and_device_kept(dtype, gen) -> None:
    net = _net(dtype)
    widen(net, {0: 6}, generator=gen)
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        expected = torch.int64 if name.endswith("num_batches_tracked") else dtype
        assert t.dtype == expected, name
        assert t.device.type == "cpu"


def test_batchnorm_statistics_follow_the_copies(gen) -> None:
    net = _net()
    old = {k: v.clone() for k, v in net.state_dict().items()}
    emb = widen(net, [7, 9], Null(bias=0.2), generator=gen)
    emb2 = plan(_net(), [7, 9], Split(select=[[0, 3, 3], [4, 4, 1, 0]]))
    net2 = _net()
    embed_(net2, emb2)
    src = emb2.layers[0].source
    for key in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(net2.state_dict()[f"1.{key}"], old[f"1.{key}"][src]), key
    assert int(net2[1].num_batches_tracked) == int(old["1.num_batches_tracked"])
    # null neurons: mean 0, var 1, weight 1, bias β
    assert net[1].running_mean[4:].tolist() == [0.0] * 3
    assert net[1].running_var[4:].tolist() == [1.0] * 3
    assert emb.layers[0].null_mask.tolist() == [False] * 4 + [True] * 3


def test_existing_grad_is_mapped_like_a_gradient(gen) -> None:
    net = _net()
    x = random_inputs(ARCH, 8)
    y = torch.randn(8, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.nn.functional.mse_loss(net(x), y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert "4.weight" not in grads  # frozen: no grad
    net[0].bias.grad = None  # and one trainable parameter without a grad
    del grads["0.bias"]
    emb = plan(net, [7, 9], Split(alpha=-0.3), generator=gen)
    expected = emb.map_gradients(grads)
    embed_(net, emb)
    for name, p in net.named_parameters():
        if name in grads:
            assert p.grad is not None and p.grad.shape == p.shape, name
            assert torch.equal(p.grad, expected[name]), name
        else:
            assert p.grad is None, name


def test_column_major_weight_stays_column_major(gen) -> None:
    net = _net()
    with torch.no_grad():
        net[4].weight.data = net[4].weight.data.t().contiguous().t()
    assert not net[4].weight.is_contiguous()
    x = random_inputs(ARCH, 8)
    with torch.no_grad():
        before = net(x)
    widen(net, [7, 9], generator=gen)
    w = net[4].weight
    assert w.shape == (9, 7) and w.t().is_contiguous() and not w.is_contiguous()
    assert net[0].weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-14)


def test_hooks_attributes_and_references_survive(gen) -> None:
    net = _net()
    p = net[0].weight
    seen: list[tuple[int, ...]] = []
    post: list[tuple[int, ...]] = []
    handle = p.register_hook(lambda g: seen.append(tuple(g.shape)))
    p.register_post_accumulate_grad_hook(lambda t: post.append(tuple(t.grad.shape)))
    p.my_tag = "decay"  # e.g. a user marking parameters for param groups
    calls: list[int] = []
    net[4].register_forward_hook(lambda m, i, o: calls.append(o.shape[-1]))
    ema = dict(net.named_parameters())  # e.g. an EMA helper holding the parameters
    widen(net, [7, 9], generator=gen)
    x = random_inputs(ARCH, 8)
    net(x).sum().backward()
    assert seen == [(7, 3)] and post == [(7, 3)] and calls == [9]
    assert p.my_tag == "decay"
    assert all(ema[n] is q and ema[n].shape == q.shape for n, q in net.named_parameters())
    handle.remove()  # the user's handle still controls the hook
    net(x).sum().backward()
    assert seen == [(7, 3)] and post == [(7, 3)] * 2


def test_weakly_referenced_parameter_keeps_identity(gen) -> None:
    """swap_tensors refuses tensors with weak references; widen falls back to .data."""
    net = _net()
    p = net[0].weight
    ref = weakref.ref(p)
    widen(net, [7, 9], generator=gen)
    assert net[0].weight is p and ref() is p and p.shape == (7, 3)


def test_mapping_form_and_unchanged_widths(gen) -> None:
    net = _net()
    state = copy.deepcopy(net.state_dict())
    emb = widen(net, {1: 7}, generator=gen)
    assert emb.wide_widths == (3, 4, 7, 2)
    assert torch.equal(net[0].weight, state["0.weight"])
    same = {k: v.clone() for k, v in net.state_dict().items()}
    emb = widen(net, [4, 7], generator=gen)  # nothing to add
    assert emb.num_new_neurons == 0 and emb.steps() == []
    for k, v in net.state_dict().items():
        assert torch.equal(v, same[k]), k


def test_training_continues_after_widening(gen) -> None:
    net = _net()
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = random_inputs(ARCH, 8)
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    widen(net, [6, 6], optimizer=opt, generator=gen)
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    assert net[1].running_mean.shape == (6,)
    assert int(net[1].num_batches_tracked) == 4


def test_state_dict_round_trip(gen) -> None:
    net = _net()
    widen(net, [7, 9], generator=gen)
    fresh = build_mlp(Arch(3, (7, 9), 2, batchnorm=(True, True), dropout=(True, False)))
    fresh.load_state_dict(net.state_dict())
    x = random_inputs(ARCH, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
    clone = copy.deepcopy(net)
    assert clone[4].weight.shape == (9, 7)


def test_dead_unit_warning_under_relu() -> None:
    net = build_mlp(Arch(3, (4,), 2, activation=("ReLU",)))
    with pytest.warns(UserWarning, match=r"hidden layer 0: null neurons .* never learn"):
        widen(net, [6], Null(bias=0.0))
    # no warning when the units are alive: bias > 0, a random fan-in, or not ReLU
    widen(net, [7], Null(bias=0.5))
    widen(net, [8], Null(fan_in_std=0.1), generator=torch.Generator().manual_seed(0))
    widen(build_mlp(Arch(3, (4,), 2)), [6], Null(bias=0.0))


# ----------------------------------------------------------------------------- atomicity
def _snapshot(net, opt):
    params = {
        n: (
            p,
            p.detach().clone(),
            p.requires_grad,
            None if p.grad is None else p.grad.clone(),
            p.grad,
        )
        for n, p in net.named_parameters()
    }
    buffers = {n: (b, b.clone()) for n, b in net.named_buffers()}
    feats = [
        (m, dict(vars(m))) for m in net.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))
    ]
    feats = [(m, {k: v for k, v in d.items() if k.endswith("features")}) for m, d in feats]
    state = {
        id(p): {k: (v, v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
        for p in net.parameters()
        if p in opt.state
    }
    return params, buffers, feats, state


def _assert_same(net, opt, snap) -> None:
    params, buffers, feats, state = snap
    for n, p in net.named_parameters():
        obj, value, rg, grad, grad_obj = params[n]
        assert p is obj and p.requires_grad == rg, n
        assert p.shape == value.shape and torch.equal(p.detach(), value), n
        if grad is None:
            assert p.grad is None, n
        else:
            assert p.grad is grad_obj and torch.equal(p.grad, grad), n
    for n, b in net.named_buffers():
        assert b is buffers[n][0] and torch.equal(b, buffers[n][1]), n
    for m, d in feats:
        assert {k: getattr(m, k) for k in d} == d
    assert {id(p) for p in opt.state} == set(state)
    for p in net.parameters():
        if id(p) in state:
            for k, (obj, value) in state[id(p)].items():
                assert opt.state[p][k] is obj
                if torch.is_tensor(value):
                    assert torch.equal(obj, value)


def _trained():
    net = _net()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.01)
    x = random_inputs(ARCH, 8)
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    return net, opt, x


class Boom(Exception):
    pass


def _fail_on_call(n: int, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"injected failure on call {n}")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("n", [1, 3, 7])
def test_failure_in_swap_rolls_back(monkeypatch, n, gen) -> None:
    net, opt, x = _trained()
    snap = _snapshot(net, opt)
    with torch.no_grad():
        before = net(x)
    monkeypatch.setattr(widen_module, "_swap", _fail_on_call(n, widen_module._swap))
    with pytest.raises(Boom):
        widen(net, [7, 9], Split(alpha=0.3), optimizer=opt, generator=gen)
    _assert_same(net, opt, snap)
    with torch.no_grad():
        assert torch.equal(net(x), before)
    monkeypatch.undo()
    widen(net, [7, 9], optimizer=opt, generator=gen)  # and it still works afterwards
    assert net[4].weight.shape == (9, 7)


class TaggedParameter(nn.Parameter):
    """A Parameter subclass (widened by .data assignment like any Parameter)."""


class SwapOnlyParameter(nn.Parameter):
    """A subclass whose ``.data`` cannot be replaced: widen must use swap_tensors."""

    @property
    def data(self):
        return nn.Parameter.data.__get__(self)

    @data.setter
    def data(self, value):
        raise RuntimeError("this tensor type does not support .data assignment")


def _with_subclass_parameters(net: nn.Module, cls: type) -> None:
    for lin in (net[0], net[7]):
        lin.weight = cls(lin.weight.detach().clone())
        lin.weight.my_tag = "tagged"


@pytest.mark.parametrize("cls", [TaggedParameter, SwapOnlyParameter])
def test_parameter_subclass_keeps_identity_type_and_attributes(cls, gen) -> None:
    net = _net()
    _with_subclass_parameters(net, cls)
    p = net[0].weight
    x = random_inputs(ARCH, 8)
    with torch.no_grad():
        before = net(x)
    widen(net, [7, 9], generator=gen)
    assert net[0].weight is p and type(p) is cls and p.shape == (7, 3)
    assert p.my_tag == "tagged" and p.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-14)


def test_failure_inside_swap_tensors_rolls_back(monkeypatch, gen) -> None:
    net = _net()
    _with_subclass_parameters(net, SwapOnlyParameter)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
    net(random_inputs(ARCH, 8)).sum().backward()
    opt.step()
    snap = _snapshot(net, opt)
    # the second subclass parameter (layer 7) is the failing swap, after layer 0's
    monkeypatch.setattr(torch.utils, "swap_tensors", _fail_on_call(2, torch.utils.swap_tensors))
    with pytest.raises(Boom):
        widen(net, [7, 9], optimizer=opt, generator=gen)
    _assert_same(net, opt, snap)
    assert type(net[0].weight) is SwapOnlyParameter and net[0].weight.my_tag == "tagged"


def test_failure_after_all_swaps_rolls_back(monkeypatch, gen) -> None:
    """A failure while updating the feature counts (after every tensor was swapped)."""
    net, opt, _ = _trained()
    snap = _snapshot(net, opt)

    def broken(self):
        raise Boom("wide_layout")

    monkeypatch.setattr(Embedding, "wide_layout", property(broken))
    with pytest.raises(Boom):
        widen(net, [7, 9], optimizer=opt, generator=gen)
    _assert_same(net, opt, snap)


def test_failure_with_weakref_fallback_rolls_back(monkeypatch, gen) -> None:
    net, opt, _ = _trained()
    keep = weakref.ref(net[0].weight)  # forces the .data path for this parameter
    snap = _snapshot(net, opt)
    monkeypatch.setattr(widen_module, "_swap", _fail_on_call(5, widen_module._swap))
    with pytest.raises(Boom):
        widen(net, [7, 9], optimizer=opt, generator=gen)
    _assert_same(net, opt, snap)
    assert keep() is net[0].weight


def test_failure_in_optimizer_mapping_changes_nothing(monkeypatch, gen) -> None:
    net, opt, _ = _trained()
    snap = _snapshot(net, opt)
    monkeypatch.setattr(
        widen_module, "map_optimizer_state", _fail_on_call(1, widen_module.map_optimizer_state)
    )
    with pytest.raises(Boom):
        widen(net, [7, 9], optimizer=opt, generator=gen)
    _assert_same(net, opt, snap)


@pytest.mark.parametrize("n", [2, 5])
def test_failure_after_feature_counts_changed_restores_them(monkeypatch, n, gen) -> None:
    """A failure after some ``in_features`` / ``out_features`` / ``num_features`` were
    already set (call 2: the second Linear; call 5: the second BatchNorm1d) restores
    them too, not only the tensors."""
    net, opt, x = _trained()
    emb = plan(net, [7, 9], Split(alpha=0.3), generator=gen)
    snap = _snapshot(net, opt)
    with torch.no_grad():
        before = net(x)
    monkeypatch.setattr(net, "get_submodule", _fail_on_call(n, net.get_submodule))
    with pytest.raises(Boom):
        embed_(net, emb, optimizer=opt)
    monkeypatch.undo()
    _assert_same(net, opt, snap)
    assert (net[0].out_features, net[4].in_features, net[1].num_features) == (4, 4, 4)
    with torch.no_grad():
        assert torch.equal(net(x), before)


# ----------------------------------------------------------------------------- meta device
META_SCHEMES = {
    "split_third": Split(alpha=1 / 3),
    "null_bias": Null(bias=0.5),
    "null_fan_in": Null(bias=0.5, fan_in_std=0.1),
    "net2net": Net2Net(),
    "random_pad": RandomPad(),
}


@pytest.mark.parametrize("name", list(META_SCHEMES))
def test_widen_on_meta_device_plans_like_real_tensors(name: str) -> None:
    """A module built on "meta" (deferred initialisation) is widened without data: same
    Parameters, meta tensors of the wide shapes, and the same plan as for real tensors."""

    def make() -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(3, 4),
            nn.BatchNorm1d(4),
            nn.Tanh(),
            nn.Linear(4, 5),
            nn.ReLU(),
            nn.Linear(5, 2),
        )

    with torch.device("meta"):
        meta = make()
    real = make()
    params = list(meta.parameters())
    opt = torch.optim.Adam(meta.parameters())
    emb = widen(
        meta, [6, 7], META_SCHEMES[name], optimizer=opt, generator=torch.Generator().manual_seed(0)
    )
    ref = widen(real, [6, 7], META_SCHEMES[name], generator=torch.Generator().manual_seed(0))
    assert list(meta.parameters()) == params
    assert all(a is b for a, b in zip(meta.parameters(), params))
    for (k, v), (_, r) in zip(meta.state_dict().items(), real.state_dict().items()):
        assert v.is_meta and v.shape == r.shape and v.dtype == r.dtype, k
    assert emb.kind == ref.kind
    for a, b in zip(emb.layers, ref.layers):
        assert torch.equal(a.source, b.source) and torch.equal(a.coef, b.coef)
        assert torch.equal(a.null_value, b.null_value)


def test_schemes_that_read_weights_refuse_meta_tensors() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    match = r"select='norm' reads the values .* 'meta' device"
    with pytest.raises(ValueError, match=match):
        widen(net, [6], Split(select="norm"), generator=torch.Generator().manual_seed(0))
    assert net[0].weight.shape == (4, 3)


def test_net2net_noise_widens_meta_tensors() -> None:
    # the noise is drawn when the embedding is applied, from a seed, proportional to the
    # columns it perturbs: planning reads no weight, so "meta" models widen with it too
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    emb = widen(net, [6], Net2Net(noise=0.1), generator=torch.Generator().manual_seed(0))
    assert emb.noise == 0.1 and net[2].weight.shape == (2, 6) and net[2].weight.is_meta


def test_widen_inside_autocast_after_a_forward_names_the_cause() -> None:
    # the autocast cache holds a bfloat16 copy of each weight (keyed on the parameter,
    # which keeps its identity): widening would leave it stale, so widen refuses, and
    # says why instead of blaming a live autograd graph that does not exist
    net = build_mlp(Arch(3, (4,), 2), seed=0, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        net(x)
        with pytest.raises(
            RuntimeError, match=r"0.weight: widen was called inside a torch.autocast"
        ):
            widen(net, [6])
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    widen(net, [6])  # outside the region it works
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert net(x).shape == (5, 2)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed with gloo",
)
def test_widen_under_a_live_ddp_wrapper_says_how_to_rewrap(tmp_path) -> None:
    # used to say only "a computation graph ... del the tensor"
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        net = build_mlp(Arch(3, (4,), 2))
        x = random_inputs(Arch(3, (4,), 2), 5, seed=1)
        ddp = DistributedDataParallel(net)
        with pytest.raises(
            RuntimeError,
            match=r"0.weight: a torch.distributed process group is initialized: if this module is "
            r"wrapped by DistributedDataParallel, the DDP object holds its parameters .* "
            r"`module = ddp.module; del ddp; widen\(module, ...\); ddp = "
            r"DistributedDataParallel\(module, ...\)`",
        ):
            widen(ddp.module, [6])
        assert net[0].out_features == 4 and net[0].weight.shape == (4, 3)
        module = ddp.module  # what the message says
        del ddp
        gc.collect()
        widen(module, [6], Split(alpha=0.25), generator=torch.Generator().manual_seed(0))
        ddp = DistributedDataParallel(module)
        ddp(x).sum().backward()
        assert module[0].weight.grad.shape == (6, 3)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ the default scheme
def _copy_gaps(net: nn.Sequential, emb: Embedding) -> torch.Tensor:
    """For each new neuron of hidden layer 0: the distance between its fan-in row and
    bias and those of the narrow neuron it copies (0: it is still the same unit)."""
    rows = torch.cat([net[0].weight.detach(), net[0].bias.detach()[:, None]], dim=1)
    src = emb.layers[0].source
    m = int(emb.layout.hidden_widths[0])
    return (rows[m:] - rows[src[m:]]).norm(dim=1)


def _train_widened(scheme, opt_name: str, out: int, steps: int = 100) -> torch.Tensor:
    """Train a 3-4-``out`` tanh MLP 20 steps, widen it to 8 with ``scheme`` mapping the
    optimizer's state, train ``steps`` more (full batch, MSE); return the copy gaps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.randn(64, out, generator=g, dtype=torch.float64)
    if opt_name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()

    run(20)
    emb = widen(net, [8], scheme, optimizer=opt, generator=torch.Generator().manual_seed(2))
    assert bool((emb.layers[0].source[4:] >= 0).all())  # every new neuron is a copy
    run(steps)
    return _copy_gaps(net, emb)


@pytest.mark.parametrize("out", [1, 2])
@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_default_widening_copies_become_different_units(opt_name: str, out: int) -> None:
    """Issue 11 §3: after the default widening and 100 steps (the optimizer's state
    mapped), every copy differs from its original, while the symmetric critical split's
    copies are still equal (so the measurement can tell the two apart). With one output
    the noise makes each pair an unequal split; with two, unequal in each output."""
    default = _train_widened(DEFAULT_SCHEME, opt_name, out)
    assert float(default.min()) > 1e-2, default
    split = _train_widened("split", opt_name, out)
    assert float(split.max()) < 1e-9, split


def test_widen_without_a_scheme_uses_the_default_scheme() -> None:
    a, b = build_mlp(ARCH, seed=0), build_mlp(ARCH, seed=0)
    emb = widen(a, [7, 9], generator=torch.Generator().manual_seed(0))
    ref = widen(b, [7, 9], DEFAULT_SCHEME, generator=torch.Generator().manual_seed(0))
    assert Net2Net(noise=4.0) == DEFAULT_SCHEME
    assert emb.kind is EmbeddingKind.OUTPUT_PRESERVING  # not critical: it says so
    for la, lb in zip(emb.layers, ref.layers):
        assert torch.equal(la.source, lb.source) and torch.equal(la.coef, lb.coef)
    assert emb.noise == ref.noise == 4.0 and emb.seed == ref.seed
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # the symmetric split stays one argument away, and critical
    split = widen(build_mlp(ARCH), [7, 9], "split", generator=torch.Generator().manual_seed(0))
    assert split.kind is EmbeddingKind.CRITICAL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_default_widening_preserves_the_function(dtype: torch.dtype) -> None:
    """Exactness of the default: the wide network's output equals the narrow one's
    within the rigorous rounding bound (and to 1e-12 relative in float64), with
    BatchNorm, dropout (eval) and two widened layers."""
    net = build_mlp(ARCH, seed=3, dtype=dtype)
    narrow = copy.deepcopy(net)
    x = random_inputs(ARCH, 32, dtype=dtype)
    emb = widen(net, [9, 11], generator=torch.Generator().manual_seed(4))
    assert emb.noise == 4.0 and emb.kind is EmbeddingKind.OUTPUT_PRESERVING  # the noise is there
    assert_function_preserved(narrow, net, x)
    if dtype == torch.float64:
        with torch.no_grad():
            ref, out = narrow(x), net(x)
        assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_widening_preserves_the_function_in_half_precision(dtype: torch.dtype) -> None:
    # the noise offsets are rounded to the dtype with the shares; the rigorous bound of
    # the wide network (which sees the larger |W|) still covers the difference
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    net = net.to(dtype)
    narrow = copy.deepcopy(net)
    x = random_inputs(8, 64, dtype=dtype)
    emb = widen(net, [40, 25], generator=torch.Generator().manual_seed(1))
    assert emb.noise == 4.0
    assert_function_preserved(narrow, net, x)
