"""Growing transformers on the traced path (issue 13): heads, head_dim, FFN, residual.

References are brute force: the narrow model's own float64 logits and greedy tokens,
autograd on the wide model against the mapped narrow gradient, and a replay of Adam on
the mapped gradients. The models are written in tests/zoo_transformers.py.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from cases import adam_replay
from torch import Tensor, nn
from zoo_transformers import GPT, Llama, TorchDecoderLM, TorchEncoderLM, ViT, greedy

import torch_embed
from torch_embed.embedding import EmbeddingKind
from torch_embed.graph.embedding import GroupEmbedding

Factory = Callable[[], nn.Module]


def _seeded(make: Factory, seed: int = 0) -> Factory:
    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return make().double()

    return build


def _idx(t: int = 6, seed: int = 1) -> Tensor:
    return torch.randint(0, 11, (2, t), generator=torch.Generator().manual_seed(seed))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


GPT_SDPA = _seeded(GPT)
GPT_EXPLICIT = _seeded(lambda: GPT(explicit=True))
LLAMA = _seeded(Llama)
ENC_POST = _seeded(TorchEncoderLM)
ENC_PRE_SEQ_FIRST = _seeded(lambda: TorchEncoderLM(norm_first=True, batch_first=False))
DEC_POST = _seeded(TorchDecoderLM)
DEC_PRE = _seeded(lambda: TorchDecoderLM(norm_first=True))

# (id, model, {group: width}): every growable dimension, non-multiples where allowed
CASES: list[tuple[str, Factory, dict[str, int]]] = [
    ("gpt-heads", GPT_SDPA, {"h.0.attn.q[0]": 3, "h.1.attn.q[0]": 5}),
    ("gpt-head_dim", GPT_SDPA, {"h.0.attn.q[1]": 7, "h.1.attn.q[1]": 5}),
    ("gpt-v_dim", GPT_SDPA, {"h.0.attn.v": 5, "h.1.attn.v": 9}),
    ("gpt-ffn", GPT_SDPA, {"h.0.fc": 17}),
    ("gpt-residual", GPT_SDPA, {"wte": 16}),
    ("gpt-all", GPT_SDPA, {"h.0.attn.q[0]": 3, "h.0.attn.q[1]": 5, "h.0.attn.v": 7, "wte": 24}),
    ("gptx-heads", GPT_EXPLICIT, {"h.0.attn.q[0]": 3}),
    ("gptx-head_dim", GPT_EXPLICIT, {"h.0.attn.q[1]": 7, "h.1.attn.q[1]": 6}),
    ("gptx-residual", GPT_EXPLICIT, {"wte": 16, "h.1.attn.v": 5}),
    ("llama-kv_heads", LLAMA, {"layers.0.self_attn.q_proj[0]": 3}),
    ("llama-q_per_kv", LLAMA, {"layers.1.self_attn.q_proj[1]": 3}),
    ("llama-v_dim", LLAMA, {"layers.0.self_attn.v_proj": 5}),
    ("llama-swiglu", LLAMA, {"layers.0.gate_proj": 17, "layers.1.gate_proj": 13}),
    ("llama-residual", LLAMA, {"embed_tokens": 16}),
    ("enc-post-residual+heads", ENC_POST, {"embed": 16, "layers.0.self_attn[1]": 4,
                                           "layers.1.self_attn[1]": 4}),
    ("enc-post-residual+head_dim", ENC_POST, {"embed": 16, "layers.0.self_attn[2]": 8,
                                              "layers.1.self_attn[2]": 8}),
    ("enc-post-ffn", ENC_POST, {"layers.0.linear1": 19}),
    ("enc-pre-seqfirst-residual+heads", ENC_PRE_SEQ_FIRST, {
        "embed": 16, "layers.0.self_attn[1]": 4, "layers.1.self_attn[1]": 4}),
    ("dec-post-residual+heads", DEC_POST, {"embed": 16, "layer.self_attn[1]": 4,
                                           "layer.multihead_attn[1]": 8}),
    ("dec-pre-residual+heads", DEC_PRE, {"embed": 16, "layer.self_attn[2]": 8,
                                         "layer.multihead_attn[0]": 4}),
]  # fmt: skip
CAUSAL = (GPT_SDPA, GPT_EXPLICIT, LLAMA)
RESIDUALS = ("wte", "embed", "embed_tokens")
# Split everywhere; Null where no residual grows (null residual units are the fills,
# tested below; nn.MultiheadAttention's heads grow only with the residual)
EXACT = [
    pytest.param(make, widths, scheme, id=f"{name}-{label}")
    for name, make, widths in CASES
    for label, scheme in (
        ("split", torch_embed.Split(alpha="random")),
        ("null", torch_embed.Null()),
    )
    if label == "split" or not set(RESIDUALS) & set(widths)
]


@pytest.mark.parametrize(("make", "widths", "scheme"), EXACT)
def test_logits_and_generation_unchanged(
    make: Factory, widths: dict[str, int], scheme: torch_embed.Scheme
) -> None:
    """float64 logits equal to 1e-10 relative; greedy tokens identical for causal LMs."""
    model = make()
    idx = _idx()
    prompt = _idx(4, seed=5)[:1]
    with torch.no_grad():
        before = model(idx)
    tokens = greedy(model, prompt) if make in CAUSAL else []
    emb = torch_embed.widen(
        model, widths, scheme, example_inputs=(idx,), generator=torch.Generator().manual_seed(2)
    )
    assert isinstance(emb, GroupEmbedding)
    assert {n: w for n, (_, w) in emb.sizes.items()} == widths
    with torch.no_grad():
        after = model(idx)
    assert _rel(before, after) <= 1e-10
    if tokens:
        assert greedy(model, prompt) == tokens


def test_width_groups_list_heads_head_dim_and_residual() -> None:
    """Head groups (counted in heads), head_dim groups and the residual, with their rules."""
    groups = torch_embed.width_groups(GPT_SDPA(), (_idx(),))
    heads, qk, v = (groups.find(n) for n in ("h.0.attn.q[0]", "h.0.attn.q[1]", "h.0.attn.v"))
    assert (heads.size, qk.size, v.size) == (2, 4, 4)
    # heads: q, k and v rows (each 2 blocks of 4), o_proj columns
    assert {u.tensor for u in heads.producers} >= {f"h.0.attn.{p}.weight" for p in "qkv"}
    assert {u.tensor for u in heads.consumers} == {"h.0.attn.o.weight"}
    assert {u.stride for u in heads.producers if u.tensor.endswith("weight")} == {4}
    # head_dim of q and k: inside the softmax, zero-extended with the temperature kept
    assert {u.tensor for u in qk.producers} == {
        f"h.0.attn.{p}.{w}" for p in "qk" for w in ("weight", "bias")
    }
    assert not qk.consumers
    assert "attention" in {c.kind for c in qk.constraints}
    assert any("zero-extended" in str(c) and "(d'/d)^(1/4)" in str(c) for c in qk.constraints)
    # v's head_dim is an ordinary group read by o_proj
    assert {u.tensor for u in v.consumers} == {"h.0.attn.o.weight"}
    residual = groups.find("wte")
    # forward order: position embedding, ln_1's γ/β, the attention's o_proj, ...
    assert residual.aliases[:4] == ("wpe", "h.0.ln_1", "h.0.attn.o", "h.0.ln_2")
    assert {c.kind for c in residual.constraints} == {"layer_norm"}
    rule = str(residual.constraints[0])
    assert "copied the same number of times" in rule and "mean-fill" in rule
    assert [a.module for a in groups.attentions] == ["h.0.attn", "h.1.attn"]
    assert groups.attentions[0].q_heads == ("h.0.attn.q[0]",)
    assert groups.attentions[0].head_dim == ("h.0.attn.q[1]",)


def test_width_groups_llama_gqa_and_rotary() -> None:
    groups = torch_embed.width_groups(LLAMA(), (_idx(),))
    kv, rep, dim = (groups.find(f"layers.0.self_attn.q_proj[{k}]") for k in range(3))
    # rotate_half's cat(-x2, x1) couples the two halves of the head_dim: the group is a
    # half (2 of 4), placed twice in each head's rows
    assert (kv.size, rep.size, dim.size) == (2, 2, 2)
    # kv heads: q rows (outer factor), k and v rows; q heads per kv head: q rows only
    assert {u.tensor for u in kv.producers} == {
        f"layers.0.self_attn.{p}_proj.weight" for p in "qkv"
    }
    assert {u.tensor for u in rep.producers} == {"layers.0.self_attn.q_proj.weight"}
    assert {u.tensor for u in rep.consumers} == {"layers.0.self_attn.o_proj.weight"}
    assert not dim.growable
    assert dim.reason is not None
    assert dim.reason.startswith("head_dim: rotary embedding at `layers.0.self_attn")
    att = groups.attentions[0]
    assert att.q_heads == (kv.name, rep.name) and att.kv_heads == (kv.name,)
    assert att.head_dim == (dim.name,)
    gate = groups.find("layers.0.gate_proj")
    assert "layers.0.up_proj" in gate.aliases  # SwiGLU: gate and up rows move as a pair
    residual = groups.find("embed_tokens")
    assert {c.kind for c in residual.constraints} == {"rms_norm"}


@pytest.mark.parametrize("kv", ["expand", "interleave", "gqa"])
def test_grouped_query_attention_keeps_the_map(kv: str) -> None:
    """kv heads and query heads per kv head grow apart, whichever way kv is repeated."""
    make = _seeded(lambda: Llama(kv=kv))
    idx = _idx()
    groups = torch_embed.width_groups(make(), (idx,))
    att = groups.attentions[0]
    assert att.q_heads == ("layers.0.self_attn.q_proj[0]", "layers.0.self_attn.q_proj[1]")
    assert att.kv_heads == ("layers.0.self_attn.q_proj[0]",)
    for widths, heads in (
        ({"layers.0.self_attn.q_proj[0]": 3}, (6, 3)),  # kv heads 2 -> 3, 2 queries each
        ({"layers.0.self_attn.q_proj[1]": 3}, (6, 2)),  # 3 queries per kv head
    ):
        model = make()
        with torch.no_grad():
            before = model(idx)
        torch_embed.widen(model, widths, "split", example_inputs=(idx,))
        attn = model.layers[0].self_attn
        assert (attn.n_head, attn.n_kv_head) == heads
        with torch.no_grad():
            assert _rel(before, model(idx)) <= 1e-10


def test_head_attributes_are_patched() -> None:
    model = LLAMA()
    idx = _idx()
    torch_embed.widen(
        model, {"layers.0.self_attn.q_proj[0]": 3, "layers.1.self_attn.q_proj[1]": 3},
        "split", example_inputs=(idx,),
    )  # fmt: skip
    a0, a1 = model.layers[0].self_attn, model.layers[1].self_attn
    assert (a0.n_head, a0.n_kv_head, a0.head_dim) == (6, 3, 4)
    assert (a1.n_head, a1.n_kv_head, a1.head_dim) == (6, 2, 4)
    assert a0.q_proj.out_features == 24 and a0.k_proj.out_features == 12
    enc = ENC_POST()
    torch_embed.widen(
        enc, {"embed": 16, "layers.0.self_attn[1]": 4, "layers.1.self_attn[2]": 8}, "split",
        example_inputs=(idx,),
    )  # fmt: skip
    m0, m1 = enc.layers[0].self_attn, enc.layers[1].self_attn
    assert (m0.embed_dim, m0.num_heads, m0.head_dim) == (16, 4, 4)
    assert (m1.embed_dim, m1.num_heads, m1.head_dim) == (16, 2, 8)


class ScaledAttention(nn.Module):
    """An explicit scale: an attribute ``1/√d`` or a fixed constant, given to sdpa's
    ``scale=`` or multiplied onto ``q @ k^T`` (Hugging Face's eager attention)."""

    def __init__(self, scale: float | None, explicit: bool = False) -> None:
        super().__init__()
        self.explicit = explicit
        self.n_head, self.head_dim = 2, 4
        self.scaling = self.head_dim**-0.5 if scale is None else scale
        self.inp = nn.Linear(5, 6)
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.o = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = torch.tanh(self.inp(x))
        q, k, v = (
            p(h).view(b, t, self.n_head, -1).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        if self.explicit:
            y = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scaling, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "matmul"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_explicit_scale_keeps_the_temperature(scale: float | None, explicit: bool) -> None:
    """An attribute holding 1/√d is set to 1/√d' (q and k × (d'/d)^(1/4)); 0.3 stays."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ScaledAttention(scale, explicit).double()
    x = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    q_before = model.q.weight.detach().clone()
    torch_embed.widen(model, {"q[1]": 7}, "split", example_inputs=(x,))
    with torch.no_grad():
        assert _rel(before, model(x)) <= 1e-12
    gain = (7 / 4) ** 0.25 if scale is None else 1.0
    assert model.scaling == pytest.approx(7**-0.5 if scale is None else 0.3, rel=1e-15)
    wide = model.q.weight.detach().view(2, 7, 6)
    assert torch.allclose(wide[:, :4], gain * q_before.view(2, 4, 6), rtol=1e-14, atol=0)
    assert bool((wide[:, 4:] == 0).all())  # zero-extended


def _loss(model: nn.Module, idx: Tensor) -> Tensor:
    out = model(idx)
    r = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * r).sum() + 0.5 * (out**2).sum()


GRAD_CASES = [
    ("gpt", GPT_SDPA, {"h.0.attn.q[0]": 3, "h.0.attn.q[1]": 7, "h.1.attn.v": 5, "wte": 16}),
    ("gptx", GPT_EXPLICIT, {"h.1.attn.q[0]": 5, "h.1.attn.q[1]": 6, "h.0.fc": 15}),
    ("llama", LLAMA, {"layers.0.self_attn.q_proj[0]": 3, "layers.1.self_attn.q_proj[1]": 3,
                      "layers.0.self_attn.v_proj": 6, "embed_tokens": 16}),
    ("enc", ENC_POST, {"embed": 16, "layers.0.self_attn[2]": 8, "layers.1.self_attn[1]": 4}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "widths"), [c[1:] for c in GRAD_CASES], ids=[c[0] for c in GRAD_CASES]
)
def test_gradients_map(make: Factory, widths: dict[str, int]) -> None:
    """The wide model's autograd gradient equals the narrow gradient mapped (.grad too)."""
    model = make()
    idx = _idx()
    _loss(model, idx).backward()
    narrow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal shares under the norms: no approximation
        emb = torch_embed.widen(
            model, widths, torch_embed.Split(alpha=0.5), example_inputs=(idx,),
            generator=torch.Generator().manual_seed(4),
        )  # fmt: skip
    assert emb.kind is EmbeddingKind.CRITICAL
    mapped = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _loss(model, idx).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and mapped[n] is not None
        assert p.grad.shape == mapped[n].shape, n
        scale = max(float(narrow[n].abs().max()), 1e-3)
        assert float((p.grad - mapped[n]).abs().max()) <= 1e-11 * scale, n


ADAM_CASES = [
    # random α: the residual (shared RMSNorm statistics need equal shares) is left out
    ("gptx", GPT_EXPLICIT, GRAD_CASES[1][2], torch_embed.Split(alpha="random")),
    ("llama", LLAMA, {k: v for k, v in GRAD_CASES[2][2].items() if k != "embed_tokens"},
     torch_embed.Split(alpha="random")),
    # zero-fill: the norms' γ × √(D/D'), their moments by the inverse factors
    ("llama-zero-fill", LLAMA, {"embed_tokens": 11, "layers.0.gate_proj": 15},
     torch_embed.Null()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "widths", "scheme"), [c[1:] for c in ADAM_CASES], ids=[c[0] for c in ADAM_CASES]
)
def test_adam_state_equals_replay(
    make: Factory, widths: dict[str, int], scheme: torch_embed.Scheme
) -> None:
    """Adam's state after widening equals Adam replayed on the mapped narrow gradients."""
    model = make()
    idx = _idx()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grads = []
    for _ in range(3):
        optimizer.zero_grad()
        _loss(model, idx).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})  # type: ignore[union-attr]
        optimizer.step()
    emb = torch_embed.widen(
        model, widths, scheme, example_inputs=(idx,), optimizer=optimizer,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert isinstance(emb, GroupEmbedding) and emb.kind is EmbeddingKind.CRITICAL
    replay, replay_opt = adam_replay(emb, init, grads, lr=0.01)
    for n, p in model.named_parameters():
        got, want = optimizer.state[p], replay_opt.state[replay[n]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert got[key].shape == want[key].shape, (n, key)
            err = float((got[key] - want[key]).abs().max())
            assert err <= 1e-12 * max(float(want[key].abs().max()), 1e-12), (n, key, err)
        assert float(got["step"]) == float(want["step"])
    optimizer.step()  # the optimizer works on the new shapes


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize(
    ("make", "widths", "match"),
    [
        (LLAMA, {"layers.0.self_attn.q_proj[2]": 6},
         r"head_dim: rotary embedding at `layers\.0\.self_attn"),
        (GPT_SDPA, {"wte": 13}, r"LayerNorm at `h\.0\.ln_1`: uniform copies"),
        (LLAMA, {"embed_tokens": 12}, r"RMSNorm at `layers\.0\.input_layernorm`: uniform copies"),
        (ENC_POST, {"layers.0.self_attn[1]": 3}, r"embed_dim is both the width"),
    ],
    ids=["rope-head_dim", "layernorm-partial", "rmsnorm-partial", "mha-heads-alone"],
)  # fmt: skip
def test_refusals_name_the_rule(make: Factory, widths: dict[str, int], match: str) -> None:
    model = make()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        torch_embed.widen(model, widths, "split", example_inputs=(_idx(),))
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tied_model_grows_its_heads() -> None:
    """A tied embedding / LM head only pins the residual width, not the heads."""
    model = _seeded(lambda: GPT(tied=True))()
    idx = _idx()
    with torch.no_grad():
        before = model(idx)
    torch_embed.widen(model, {"h.0.attn.q[0]": 3}, "split", example_inputs=(idx,))
    assert model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        assert _rel(before, model(idx)) <= 1e-10


def test_deepcopy_unaffected() -> None:
    """Widening one copy leaves the other (shared nothing) as it was."""
    model = GPT_SDPA()
    twin = copy.deepcopy(model)
    torch_embed.widen(model, {"h.0.attn.q[0]": 3}, "split", example_inputs=(_idx(),))
    assert twin.h[0].attn.n_head == 2 and twin.h[0].attn.q.out_features == 8


# ----------------------------------------------------------------- residual: fills
LLAMA_WRITTEN = _seeded(lambda: Llama(written_norm=True))


@pytest.mark.parametrize(
    ("make", "width"), [(LLAMA, 9), (LLAMA, 13), (LLAMA_WRITTEN, 11)],
    ids=["rms_norm-9", "rms_norm-13", "written-out-11"],
)  # fmt: skip
def test_rmsnorm_zero_fill_any_width(make: Factory, width: int) -> None:
    """RMSNorm: null residual units, γ × √(D/D'), eps × D/D': exact and critical.

    Also for an RMSNorm written out as ``x * rsqrt(mean(x²) + eps)`` (Hugging Face's
    LlamaRMSNorm, eps in ``variance_epsilon``).
    """
    model = make()
    idx = _idx()
    prompt = _idx(4, seed=5)[:1]
    with torch.no_grad():
        before = model(idx)
    tokens = greedy(model, prompt)
    gammas = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    _loss(model, idx).backward()
    narrow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb = torch_embed.widen(model, {"embed_tokens": width}, "null", example_inputs=(idx,))
    assert emb.kind is EmbeddingKind.CRITICAL
    with torch.no_grad():
        assert _rel(before, model(idx)) <= 1e-12  # a missing eps rescale shows here
    assert greedy(model, prompt) == tokens
    for n, g in gammas.items():
        wide = dict(model.named_parameters())[n].detach()
        assert torch.allclose(wide[:8], g * (8 / width) ** 0.5, rtol=1e-15, atol=0)
        assert bool((wide[8:] == 0).all())
    for m in (model.norm, model.layers[1].input_layernorm):
        eps = m.variance_epsilon if make is LLAMA_WRITTEN else m.eps
        assert eps == pytest.approx(1e-6 * 8 / width, rel=1e-15)
        assert m.weight.shape == (width,)
    assert bool((model.embed_tokens.weight[:, 8:] == 0).all())
    # the wide gradient is the narrow one mapped (new units: zero)
    mapped = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _loss(model, idx).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and mapped[n] is not None
        scale = max(float(narrow[n].abs().max()), 1e-3)
        assert float((p.grad - mapped[n]).abs().max()) <= 1e-11 * scale, n


@pytest.mark.parametrize("make", [GPT_SDPA, ENC_PRE_SEQ_FIRST], ids=["gpt", "enc-pre"])
def test_layernorm_mean_fill_any_width(make: Factory) -> None:
    """Pre-LN: writers' new rows = mean of old rows; γ × √(D/D'); eps × D/D'; exact."""
    model = make()
    idx = _idx()
    with torch.no_grad():
        before = model(idx)
    emb_w = model.wte.weight if isinstance(model, GPT) else model.embed.weight
    table = emb_w.detach().clone()
    residual = "wte" if isinstance(model, GPT) else "embed"
    widths = {residual: 13}
    if not isinstance(model, GPT):  # nn.MultiheadAttention: embed_dim = heads × head_dim
        widths = {residual: 12, "layers.0.self_attn[1]": 3, "layers.1.self_attn[1]": 3}
    emb = torch_embed.widen(model, widths, "null", example_inputs=(idx,))
    wide = widths[residual]
    assert emb.kind is EmbeddingKind.OUTPUT_PRESERVING
    assert any("mean-fill" in r for r in emb.reasons)
    with torch.no_grad():
        assert _rel(before, model(idx)) <= 1e-12
    new = emb_w.detach()[:, 8:]
    assert torch.allclose(new, table.mean(1, keepdim=True).expand_as(new), rtol=1e-14, atol=0)
    norm = model.ln_f if isinstance(model, GPT) else model.layers[0].norm1
    assert norm.eps == pytest.approx(1e-5 * 8 / wide, rel=1e-15)
    assert bool((norm.weight[8:] == 0).all()) and bool((norm.bias[8:] == 0).all())


def test_post_norm_mean_fill_is_refused() -> None:
    """Post-LN writes β_new = 0 (not the mean) back into the stream: refused, untouched."""
    model = ENC_POST()
    before = _state(model)
    widths = {"embed": 12, "layers.0.self_attn[1]": 3, "layers.1.self_attn[1]": 3}
    with pytest.raises(ValueError, match="mean-fill is exact only when"):
        torch_embed.widen(model, widths, "null", example_inputs=(_idx(),))
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert model.layers[0].norm1.eps == 1e-5


@pytest.mark.parametrize(
    ("make", "factor", "scheme"),
    [
        (GPT_SDPA, 2, "split"), (GPT_EXPLICIT, 1.5, "null"), (LLAMA, 2, "net2net"),
        (LLAMA, 1.5, "null"), (ENC_PRE_SEQ_FIRST, 1.5, "null"), (DEC_POST, 2, "split"),
    ],
    ids=["gpt-2-split", "gptx-1.5-null", "llama-2-net2net", "llama-1.5-null", "enc-pre-1.5-null",
         "dec-post-2-split"],
)  # fmt: skip
def test_factor_grows_every_dimension(make: Factory, factor: float, scheme: str) -> None:
    """widen(model, f): every growable group × f (nn.MultiheadAttention: heads only)."""
    model = make()
    idx = _idx()
    with torch.no_grad():
        before = model(idx)
    emb = torch_embed.widen(model, factor, scheme, example_inputs=(idx,))
    assert isinstance(emb, GroupEmbedding)
    with torch.no_grad():
        assert _rel(before, model(idx)) <= 1e-10
    groups = torch_embed.width_groups(make(), (idx,))
    packed = {n for a in groups.attentions if a.packed for n in a.head_dim}
    expected = {
        g.name: -(-g.size * 3 // 2) if factor == 1.5 else 2 * g.size
        for g in groups
        if g.growable and g.hidden and g.name not in packed
    }
    assert {n: w for n, (_, w) in emb.sizes.items()} == expected


class HardCodedAttention(nn.Module):
    """Heads from an attribute, but the merge back written as a number (``8``)."""

    def __init__(self) -> None:
        super().__init__()
        self.n_head = 2
        self.inp = nn.Linear(5, 8)
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))
        self.o = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = torch.tanh(self.inp(x))
        q, k, v = (
            p(h).view(b, t, self.n_head, -1).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, 8))


def test_failed_check_restores_head_attributes() -> None:
    """The re-run fails on the literal 8: tensors and patched attributes are set back."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = HardCodedAttention().double()
    x = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = _state(model)
    with pytest.raises(ValueError, match="the model was left unchanged"):
        torch_embed.widen(model, {"q[0]": 3}, "split", example_inputs=(x,))
    assert model.n_head == 2
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_table_names_the_attention_roles() -> None:
    table = str(torch_embed.width_groups(LLAMA(), (_idx(),))).splitlines()
    row = {line.split()[0]: line for line in table[1:]}
    assert "kv heads of `layers.0.self_attn`" in row["layers.0.self_attn.q_proj[0]"]
    assert "query heads per kv head of `layers.1.self_attn`" in row["layers.1.self_attn.q_proj[1]"]
    assert "head_dim: rotary embedding at" in row["layers.0.self_attn.q_proj[2]"]
    table = str(torch_embed.width_groups(ENC_POST(), (_idx(),))).splitlines()
    row = {line.split()[0]: line for line in table[1:]}
    assert "heads of `layers.1.self_attn`: reshape" in row["layers.1.self_attn[1]"]
    assert "head_dim of `layers.1.self_attn`: attention" in row["layers.1.self_attn[2]"]


@pytest.mark.parametrize(
    ("widths", "scheme"),
    [
        ({"patch": 16, "blocks.0.self_attn[1]": 4, "blocks.1.self_attn[2]": 8}, "split"),
        ({"patch": 12, "blocks.0.self_attn[1]": 3, "blocks.1.self_attn[1]": 3}, "null"),
    ],
    ids=["copies", "mean-fill"],
)
def test_vit_cls_token_and_position_embedding_follow(widths: dict[str, int], scheme: str) -> None:
    """The residual of a ViT: patch conv, cls token and position embedding grow with it."""
    model = _seeded(ViT)()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cls = model.cls_token.detach().clone()
    with torch.no_grad():
        before = model(x)
    torch_embed.widen(model, widths, scheme, example_inputs=(x,))
    with torch.no_grad():
        assert _rel(before, model(x)) <= 1e-12
    assert model.cls_token.shape == (1, 1, widths["patch"])
    assert model.pos_embed.shape == (1, 5, widths["patch"])
    new = model.cls_token.detach()[..., 8:]
    want = cls.repeat(1, 1, 1) if scheme == "split" else cls.mean(-1, keepdim=True).expand_as(new)
    assert torch.allclose(new, want, rtol=1e-14, atol=0)


# --------------------------------------------------------------------- inertia change
def _critical_targets(net: nn.Module, x: Tensor, rms: float = 0.5) -> Tensor:
    """Targets that make the net's current parameters an exact critical point of the MSE:
    a random residual projected off the range of the output Jacobian (more outputs than
    parameters), so ``∇R ∝ Jᵀ r = 0`` at a point that is not a global minimum."""
    params = {n: p.detach() for n, p in net.named_parameters()}
    jac = torch.func.jacrev(lambda ps: torch.func.functional_call(net, ps, (x,)))(params)
    out = net(x).detach()
    j = torch.cat([v.reshape(out.numel(), -1) for v in jac.values()], 1)
    assert j.shape[0] > j.shape[1]
    z = torch.randn(j.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    q, _ = torch.linalg.qr(j)
    r = z - q @ (q.T @ z)
    return out - (r * rms * r.numel() ** 0.5 / r.norm()).view(out.shape)


@pytest.mark.parametrize("group", ["h.0.fc", "h.0.attn.q[0]"], ids=["ffn", "heads"])
def test_inertia_change_of_a_transformer_widening_equals_a_full_recount(group: str) -> None:
    """A tiny GPT (P = 686) at an exact critical point of the MSE on its logits: a critical
    split of the FFN or of the heads keeps |∇R| at rounding, and before + inertia_change
    (Hessian-vector products along the complement) equals the dense float64 recount.
    Measured: before (127, 222, 337); FFN 6 -> 7 adds (8, 3, 6), heads 2 -> 3 (41, 57, 42)."""
    torch.manual_seed(11)
    # the explicit softmax: batched HVPs through sdpa's CPU flash kernel fall back to a
    # loop (torch warns: no vmap batching rule for its backward)
    net = GPT(vocab=11, ctx=8, d=8, n_head=2, head_dim=4, ffn=6, layers=1, explicit=True)
    net = net.double().eval()
    x = torch.randint(0, 11, (12, 8), generator=torch.Generator().manual_seed(3))
    y = _critical_targets(net, x)
    loss = nn.MSELoss()
    before = torch_embed.hessian_inertia(net, loss, x, y)
    assert not before.ambiguous
    size = torch_embed.width_groups(net, x).find(group).size
    emb = torch_embed.widen(net, {group: size + 1}, "split", example_inputs=x)
    assert emb.kind is EmbeddingKind.CRITICAL
    grad = torch_embed.gradient(net, loss, x, y)
    assert float(grad.norm()) <= 1e-12
    change = emb.inertia_change(net, loss, x, y, tol=before.tol)
    after = torch_embed.hessian_inertia(net, loss, x, y, tol=before.tol)
    assert not change.ambiguous and not after.ambiguous
    assert (before + change).as_tuple() == after.as_tuple()
    assert change.total == sum(p.numel() for p in net.parameters()) - before.total


class FusedSwiGLU(nn.Module):
    """A residual gated MLP with one fused gate/up projection (``chunk(2)``: Phi-3 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(3, 4)
        self.gate_up = nn.Linear(4, 2 * 5)
        self.down = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.head(h + self.down(F.silu(gate) * up))


@pytest.mark.parametrize("scheme", ["split", "null", "net2net"])
def test_fused_gate_up_grows_as_a_pair_at_a_non_multiple_width(scheme: str) -> None:
    """gate and up rows move as a pair inside the fused matrix (both halves grow by the
    same units): exact outputs at 5 -> 8, and the critical schemes' wide gradient is the
    mapped narrow one (autograd on both sides)."""
    torch.manual_seed(4)
    net = FusedSwiGLU().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    before = net(x).detach()
    F.mse_loss(net(x), y).backward()
    narrow_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    emb = torch_embed.widen(net, {"gate_up": 8}, scheme, example_inputs=x)
    assert net.gate_up.weight.shape == (16, 4) and net.down.weight.shape == (4, 8)
    with torch.no_grad():
        assert float((net(x) - before).abs().max()) <= 1e-12 * float(before.abs().max())
    if emb.kind is EmbeddingKind.CRITICAL:
        F.mse_loss(net(x), y).backward()
        mapped = emb.map_gradients(narrow_grads)
        for n, p in net.named_parameters():
            assert torch.allclose(p.grad, mapped[n], rtol=1e-10, atol=1e-13), n
