"""``deepen``: inserted blocks keep the function exactly, null blocks are critical, the
inertia change matches a dense float64 recount, and refusals leave everything as before.

References are brute force: outputs before/after in float64, autograd gradients of the
loss, dense Hessians by ``torch.autograd.functional.hessian`` + ``eigvalsh``, and a
hand replay of an optimizer step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from cases import brute_gradient, brute_hessian, counts
from torch import nn

import torch_embed
from torch_embed.critical import critical_point
from torch_embed.inertia import default_tolerance

pytestmark = pytest.mark.usefixtures("single_thread_module")
F64 = torch.float64


# ------------------------------------------------------------------------------- models
class ResBlock(nn.Module):
    """``x + down(σ(up(x)))``: the residual MLP block."""

    def __init__(self, d: int, f: int, act: nn.Module | None = None) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)
        self.act = act if act is not None else nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


class ResMLP(nn.Module):
    """``tanh(inp(x))``, residual blocks, ``out(ρ(stream))``; ``ρ`` = tanh or the identity."""

    def __init__(
        self, d_in: int = 2, d: int = 3, f: int = 4, depth: int = 1, readout: str = "tanh"
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([ResBlock(d, f) for _ in range(depth)])
        self.out = nn.Linear(d, 1)
        self.readout = readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = b(h)
        return self.out(torch.tanh(h) if self.readout == "tanh" else h)


class GPTBlock(nn.Module):
    """Pre-LN GPT block: causal self-attention with fused qkv, GELU MLP."""

    def __init__(self, d: int, heads: int, f: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        mask = torch.full((t, t), -math.inf, dtype=x.dtype).triu(1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + mask, -1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token + position embeddings, pre-LN blocks, final LN, tied LM head."""

    def __init__(self, vocab: int = 7, t: int = 5, d: int = 8, heads: int = 2, depth: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(0.1 * torch.randn(t, d))
        self.blocks = nn.ModuleList([GPTBlock(d, heads, 2 * d) for _ in range(depth)])
        self.lnf = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.lnf(x) @ self.wte.weight.T


class TinyGPT(GPT):
    """A GPT with a 2-output regression head (MSE has critical points to polish to)."""

    def __init__(self) -> None:
        super().__init__(vocab=5, t=3, d=4, heads=2, depth=1)
        self.head = nn.Linear(4, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.lnf(x))


def _seeded(cls, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs).to(F64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


# ------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("mode", ["null", "zero_out"])
def test_residual_mlp_exact(mode: str, gen: torch.Generator) -> None:
    net = _seeded(ResMLP, depth=2)
    x = torch.randn(9, 2, dtype=F64, generator=gen)
    before = net(x).detach()
    emb = torch_embed.deepen(net, {"blocks": [0, 1, 1]}, mode, example_inputs=x)
    assert emb.inserted == ("blocks.1", "blocks.3", "blocks.4")
    assert len(net.blocks) == 5 and emb.kind == mode
    assert _rel(net(x).detach(), before) <= 1e-12
    zeroed = {"null": {"up.weight", "up.bias", "down.weight", "down.bias"}}
    expected = zeroed.get(mode, {"down.weight", "down.bias"})
    for name in emb.inserted:
        block = net.get_submodule(name)
        assert isinstance(block, ResBlock)
        for n, p in block.named_parameters():
            assert bool((p == 0).all()) == (n in expected), n


@pytest.mark.parametrize("mode", ["null", "zero_out"])
def test_pre_ln_gpt_exact(mode: str, gen: torch.Generator) -> None:
    net = _seeded(GPT)
    idx = torch.randint(0, 7, (3, 5), generator=gen)
    before = net(idx).detach()
    emb = torch_embed.deepen(net, {"blocks": [-1, 0]}, mode, example_inputs=idx)
    assert emb.inserted == ("blocks.1", "blocks.3")
    assert _rel(net(idx).detach(), before) <= 1e-12
    new = emb.blocks[0]
    if mode == "zero_out":  # the writers: attention output projection and fc2
        assert set(new.zeroed) == {"proj.weight", "proj.bias", "fc2.weight", "fc2.bias"}
    else:
        assert set(new.zeroed) == {
            f"{m}.{p}" for m in ("qkv", "proj", "fc", "fc2") for p in ("weight", "bias")
        }
        assert new.writer_biases == ("proj.bias", "fc2.bias")
    # the norms are copies of the template's, not zero
    assert torch.equal(net.blocks[1].ln1.weight, net.blocks[0].ln1.weight)


def test_transformer_encoder_pre_norm_exact(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(F64)
    x = torch.randn(2, 4, 8, dtype=F64, generator=gen)
    before = enc(x).detach()
    emb = torch_embed.deepen(enc, {"layers": [1]}, "null", example_inputs=x)
    assert emb.inserted == ("layers.2",) and enc.num_layers == 3 and len(enc.layers) == 3
    # the packed in_proj and out_proj of nn.MultiheadAttention, linear1 and linear2
    assert set(emb.blocks[0].zeroed) == {
        "self_attn.in_proj_weight",
        "self_attn.in_proj_bias",
        "self_attn.out_proj.weight",
        "self_attn.out_proj.bias",
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
    }
    assert _rel(enc(x).detach(), before) <= 1e-12
    enc.train()  # training mode too (dropout 0)
    assert _rel(enc(x).detach(), before) <= 1e-12


def test_transformer_decoder_cross_attention_null(gen: torch.Generator) -> None:
    # cross-attention splits the packed in_proj_weight (q | k, v): the split views must
    # still count as the parameter, or k, v stay nonzero and out_proj gets a gradient
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
    dec = nn.TransformerDecoder(layer, 2).to(F64)
    tgt = torch.randn(2, 4, 8, dtype=F64, generator=gen)
    memory = torch.randn(2, 5, 8, dtype=F64, generator=gen)
    before = dec(tgt, memory).detach()
    emb = torch_embed.deepen(dec, {"layers": [0]}, "null", example_inputs=(tgt, memory))
    assert "multihead_attn.in_proj_weight" in emb.blocks[0].zeroed
    assert emb.blocks[0].writer_biases == (
        "self_attn.out_proj.bias",
        "multihead_attn.out_proj.bias",
        "linear2.bias",
    )
    assert dec.num_layers == 3 and _rel(dec(tgt, memory).detach(), before) <= 1e-12


def test_post_norm_block_refused_and_model_untouched(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(F64)
    x = torch.randn(2, 4, 8, dtype=F64, generator=gen)
    saved = _state(enc)
    with pytest.raises(ValueError, match=r"native_layer_norm in `norm1`.*post-norm"):
        torch_embed.deepen(enc, {"layers": [0]}, "zero_out", example_inputs=x)
    assert len(enc.layers) == 2 and enc.num_layers == 2 and _same_state(enc, saved)


# ---------------------------------------------------------------- Hugging Face LLaMA
transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(F64).eval()


@pytest.mark.parametrize("mode", ["null", "zero_out"])
def test_llama_exact_generate_and_round_trip(mode: str, gen: torch.Generator, tmp_path) -> None:
    model = _llama()
    ids = torch.randint(0, 32, (2, 6), generator=gen)
    before = model(ids).logits.detach()
    greedy = model.generate(ids[:1], max_new_tokens=20, do_sample=False)
    emb = torch_embed.deepen(model, {"model.layers": [0, 1]}, mode, example_inputs=(ids,))
    assert emb.inserted == ("model.layers.1", "model.layers.3")
    assert model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    # copies share the model's config (a later edit of it reaches every layer)
    assert all(layer.self_attn.config is model.config for layer in model.model.layers)
    if mode == "zero_out":
        assert set(emb.blocks[0].zeroed) == {"self_attn.o_proj.weight", "mlp.down_proj.weight"}
    with torch.no_grad():
        assert _rel(model(ids).logits, before) <= 1e-12
    assert torch.equal(model.generate(ids[:1], max_new_tokens=20, do_sample=False), greedy)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=F64).eval()
    assert len(loaded.model.layers) == 4
    with torch.no_grad():
        assert _rel(loaded(ids).logits, before) <= 1e-12


def test_gpt2_conv1d_writers_and_bert_refused(gen: torch.Generator) -> None:
    cfg = transformers.GPT2Config(
        vocab_size=32, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(F64).eval()
    ids = torch.randint(0, 32, (2, 6), generator=gen)
    before = model(ids).logits.detach()
    emb = torch_embed.deepen(model, {"transformer.h": [1]}, "zero_out", example_inputs=(ids,))
    # Conv1D computes addmm(bias, x, weight): c_proj of attention and MLP are the writers
    assert emb.blocks[0].zeroed == (
        "attn.c_proj.weight",
        "attn.c_proj.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    )
    assert model.config.n_layer == 3
    with torch.no_grad():
        assert _rel(model(ids).logits, before) <= 1e-12
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
        )
    ).eval()
    with pytest.raises(ValueError, match=r"attention\.output\.LayerNorm.*post-norm"):
        torch_embed.deepen(bert, {"encoder.layer": [0]}, "zero_out", example_inputs=(ids,))
    assert len(bert.encoder.layer) == 2 and bert.config.num_hidden_layers == 2


def test_qwen2_layer_types_follow_the_template(gen: torch.Generator, tmp_path) -> None:
    cfg = transformers.Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,  # shorter than the 6 + 20 tokens below: the pattern matters
        max_window_layers=1,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).to(F64).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.randint(0, 32, (2, 6), generator=gen)
    before = model(ids).logits.detach()
    greedy = model.generate(ids[:1], max_new_tokens=20, do_sample=False)
    torch_embed.deepen(model, {"model.layers": [1, 0]}, "null", example_inputs=(ids,))
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, None, 4, 4]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        assert _rel(model(ids).logits, before) <= 1e-12
    assert torch.equal(model.generate(ids[:1], max_new_tokens=20, do_sample=False), greedy)
    model.save_pretrained(tmp_path)
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=F64).eval()
    assert loaded.config.layer_types == model.config.layer_types
    with torch.no_grad():
        assert _rel(loaded(ids).logits, before) <= 1e-12


# ------------------------------------------------------------------ criticality
def _critical_targets(net: nn.Module, x: torch.Tensor, rms: float = 0.5) -> torch.Tensor:
    """Targets that make the net's CURRENT parameters an exact critical point of the MSE.

    ``∇R ∝ Jᵀ r`` with residuals ``r = f(x) - y``; a random ``r`` projected off the range
    of the output Jacobian ``J`` (possible when outputs outnumber parameters) makes it
    vanish, with residuals of RMS ``rms`` (a generic critical point, not a global
    minimum). Polishing from random targets instead does not converge on these nets:
    ``critical_point`` reports a descending valley (the fit keeps improving as weights grow).
    """
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    jac = torch.func.jacrev(lambda ps: torch.func.functional_call(net, ps, (x,)))(params)
    out = net(x).detach()
    J = torch.cat([j.reshape(out.numel(), -1) for j in jac.values()], 1)
    assert J.shape[0] > J.shape[1], "need more outputs than parameters"
    z = torch.randn(J.shape[0], generator=torch.Generator().manual_seed(5), dtype=F64)
    q, _ = torch.linalg.qr(J)
    r = z - q @ (q.T @ z)
    r = r * rms * math.sqrt(r.numel()) / r.norm()
    return out - r.view(out.shape)


def _polished(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = _critical_targets(net, x)
    res = critical_point(net, nn.MSELoss(), x, y)  # confirms (and polishes) the point
    assert res.converged and res.grad_norm <= 1e-12, res.message
    return y


def _polished_res_mlp(gen: torch.Generator, readout: str = "tanh"):
    net = _seeded(ResMLP, d=3, f=4, depth=2, readout=readout, seed=3)
    x = torch.randn(128, 2, dtype=F64, generator=gen)
    return net, x, _polished(net, x)


def _new_grads(net: nn.Module, emb, x, y) -> dict[str, float]:
    loss = nn.MSELoss()(net(x), y)
    names = [f"{b}.{n}" for b in emb.inserted for n, _ in net.get_submodule(b).named_parameters()]
    params = dict(net.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {n: float(g.abs().max()) for n, g in zip(names, grads)}


@pytest.fixture(scope="module")
def gpt_problem():
    """A tiny pre-LN transformer (P = 222) at a critical point of an MSE, and its data."""
    gen = torch.Generator().manual_seed(7)
    narrow = _seeded(TinyGPT, seed=1)
    idx = torch.randint(0, 5, (128, 3), generator=gen)
    return narrow, idx, _polished(narrow, idx)


@pytest.mark.parametrize("problem", ["res_mlp", "gpt"])
def test_null_block_critical_zero_out_not(problem: str, gen, gpt_problem) -> None:
    narrow, x, y = _polished_res_mlp(gen) if problem == "res_mlp" else gpt_problem
    g0 = float(brute_gradient(narrow, nn.MSELoss(), x, y).norm())
    null, zero_out = copy.deepcopy(narrow), copy.deepcopy(narrow)
    e_null = torch_embed.deepen(null, {"blocks": [0]}, "null", example_inputs=x)
    # the deep net is critical too: every new parameter's gradient is at rounding level
    assert max(_new_grads(null, e_null, x, y).values()) <= 10 * g0 + 1e-14
    assert float(brute_gradient(null, nn.MSELoss(), x, y).norm()) <= 10 * g0 + 1e-14
    if problem == "gpt":
        # zero_out: the zeroed writers get a gradient at once (their readers are not zero)
        e_zero = torch_embed.deepen(zero_out, {"blocks": [0]}, "zero_out", example_inputs=x)
        grads = _new_grads(zero_out, e_zero, x, y)
        assert grads["blocks.1.proj.weight"] > 1e-5 and grads["blocks.1.fc2.weight"] > 1e-6


def test_null_block_choices_of_biases_and_norms(gpt_problem) -> None:
    """Which parameters a null block may keep (measured at a critical point).

    Kept nonzero, a reader bias makes the branch read a constant (``σ(b_fc)``, or
    ``b_v`` through the softmax), so its writer's gradient is ``(Σ_t δ_t)·constᵀ``:
    ``Σ_t δ_t`` is the template's last writer-bias gradient, zero at a critical point.
    So reader biases may be kept at a critical point when the template has writer
    biases; ``deepen`` zeroes them: then the new weights' gradient is zero at EVERY
    embedded point (checked below), and D stays [[0, G], [Gᵀ, 0]]. Norm γ, β feed zero
    readers only: any value keeps the gradient zero; the template's are kept.
    """
    narrow, idx, y = gpt_problem
    g0 = float(brute_gradient(narrow, nn.MSELoss(), idx, y).norm())
    deep = copy.deepcopy(narrow)
    emb = torch_embed.deepen(deep, {"blocks": [0]}, "null", example_inputs=idx)
    before = deep(idx).detach()
    new, template = deep.blocks[1], deep.blocks[0]
    with torch.no_grad():
        new.qkv.bias.copy_(template.qkv.bias)
        new.fc.bias.copy_(template.fc.bias)
        new.ln1.weight.mul_(3.0)
    assert _rel(deep(idx).detach(), before) <= 1e-12
    grads = _new_grads(deep, emb, idx, y)
    assert max(grads.values()) <= 10 * g0 + 1e-14, grads
    # away from a critical point (the template's writer bias moved along a direction the
    # final LayerNorm does not remove) Σ δ ≠ 0: the kept reader bias feeds the writer a
    # gradient (Σ δ)·gelu(b)ᵀ, while with the reader bias zeroed, as deepen does, the
    # writer's gradient stays exactly zero at every embedded point
    with torch.no_grad():
        deep.blocks[0].fc2.bias.add_(torch.tensor([0.1, -0.2, 0.0, 0.05], dtype=F64))
    assert _new_grads(deep, emb, idx, y)["blocks.1.fc2.weight"] > 1e-6
    with torch.no_grad():
        new.fc.bias.zero_()
    assert _new_grads(deep, emb, idx, y)["blocks.1.fc2.weight"] == 0.0


def _dense_counts(model, x, y, tol=None):
    h = brute_hessian(model, nn.MSELoss(), x, y)
    ev = torch.linalg.eigvalsh(h)
    if tol is None:
        tol = default_tolerance(float(ev.abs().max()), ev.numel(), F64)
    return counts(ev, tol), ev, tol


def _assert_change_matches_recount(narrow, x, y, pairs: bool = True) -> tuple[int, int, int]:
    deep = copy.deepcopy(narrow)
    emb = torch_embed.deepen(deep, {"blocks": [0]}, "null", example_inputs=x)
    after, ev, tol = _dense_counts(deep, x, y)
    # no eigenvalue near the threshold (rounding moves eigenvalues by a few eps·max|λ|,
    # tol is P·eps·max|λ|): the brute-force counts do not depend on the CPU
    near = ev.abs()[(ev.abs() > tol / 10) & (ev.abs() < tol * 10)]
    assert near.numel() == 0, near
    before, _, _ = _dense_counts(narrow, x, y, tol)
    change = emb.inertia_change(deep, nn.MSELoss(), x, y, tol=tol)
    assert tuple(b + c for b, c in zip(before, change)) == after
    added = sum(p.numel() for b in emb.inserted for p in deep.get_submodule(b).parameters())
    assert sum(change) == added
    # reader-writer cross blocks [[0, G], [Gᵀ, 0]]: as many negative as positive
    assert change.negative == change.positive and (change.positive > 0) == pairs
    return change.as_tuple()


@pytest.mark.parametrize("readout", ["tanh", "linear"])
def test_inertia_change_residual_mlp_dense_recount(readout: str, gen: torch.Generator) -> None:
    narrow, x, y = _polished_res_mlp(gen, readout)
    change = _assert_change_matches_recount(narrow, x, y, pairs=readout == "tanh")
    # closed form: tanh'(0) = 1, the up/down cross block has rank f·rank(M), M = Σ h̃ δᵀ
    # (h̃ = [stream; 1], δ = ∂R/∂stream at the new block; M's last row Σ δ is the
    # template's writer-bias gradient, 0 here). tanh readout: f = 4, rank M = 3. A
    # stream read only linearly downstream (or written only linearly upstream) has
    # M = 0 at a critical point, since inserting I + εA there is absorbed by the later
    # readers, writers and readout, so ∂R/∂A = Σ δ s̃ᵀ = 0; the null block adds zeros only.
    r = 12 if readout == "tanh" else 0
    assert change == (r, sum(change) - 2 * r, r)


def test_inertia_change_tiny_transformer_dense_recount(gpt_problem) -> None:
    narrow, idx, y = gpt_problem
    assert sum(p.numel() for p in narrow.parameters()) <= 3000
    change = _assert_change_matches_recount(narrow, idx, y)
    # closed form, r = Σ over cross blocks of (width · rank M): the GELU MLP (f = 8) and
    # each of the 2 heads (head_dim = 2, h̃ = [attended normed stream; 1]) have rank M = 3
    # (the row of 1s is the writer-bias gradient, 0; LayerNorm output has zero mean)
    r = 8 * 3 + 2 * 2 * 3
    assert change == (r, 172 - 2 * r, r)


# -------------------------------------------------------------------- optimizer
def test_new_parameters_join_template_groups_and_step(gen: torch.Generator) -> None:
    net = _seeded(ResMLP, depth=2)
    x = torch.randn(16, 2, dtype=F64, generator=gen)
    y = torch.randn(16, 1, dtype=F64, generator=gen)
    decay = [p for n, p in net.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in net.named_parameters() if n.endswith("bias")]
    opt = torch.optim.Adam(
        [{"params": decay, "lr": 1e-2}, {"params": no_decay, "lr": 3e-2}], betas=(0.0, 0.5)
    )
    nn.MSELoss()(net(x), y).backward()
    opt.step()
    old_state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    torch_embed.deepen(net, {"blocks": [1]}, "zero_out", example_inputs=x, optimizer=opt)
    new = net.blocks[2]
    assert any(p is new.down.weight for p in opt.param_groups[0]["params"])
    assert any(p is new.down.bias for p in opt.param_groups[1]["params"])
    assert all(p not in opt.state for p in new.parameters())
    for p, s in old_state.items():  # existing state untouched
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items())
    opt.zero_grad()
    nn.MSELoss()(net(x), y).backward()
    g = new.down.weight.grad.clone()
    assert float(g.abs().max()) > 0
    opt.step()
    # first Adam step from empty state: m̂ = g, v̂ = g², so -lr·g / (|g| + eps), lr of group 0
    expected = -1e-2 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(new.down.weight.detach(), expected, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------- identity
def test_identity_insertion_after_idempotent_activations(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU6(), nn.Linear(4, 2)
    ).to(F64)
    x = 4 * torch.randn(32, 3, dtype=F64, generator=gen)
    before = net(x).detach()
    saved = _state(net)
    emb = torch_embed.deepen(net, {"": [1, 3]}, "identity", example_inputs=x)
    assert emb.inserted == ("2", "3", "6", "7")
    assert [type(m).__name__ for m in net] == [
        "Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU6", "Linear", "ReLU6", "Linear"
    ]  # fmt: skip
    assert torch.equal(net[2].weight, torch.eye(5, dtype=F64))
    assert _rel(net(x).detach(), before) <= 1e-12
    # apply / restrict map state dicts between the two models
    mapped = emb.apply(saved)
    assert mapped.keys() == net.state_dict().keys()
    assert all(torch.equal(mapped[k], v) for k, v in net.state_dict().items())
    back = emb.restrict(net.state_dict())
    assert back.keys() == saved.keys() and all(torch.equal(back[k], saved[k]) for k in saved)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Tanh(), nn.LeakyReLU()])
def test_identity_after_non_idempotent_activation_refused(act, gen: torch.Generator) -> None:
    net = nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 2)).to(F64)
    saved = _state(net)
    with pytest.raises(ValueError, match="idempotent"):
        torch_embed.deepen(net, {"": [1]}, "identity", example_inputs=torch.randn(4, 3, dtype=F64))
    assert len(net) == 3 and _same_state(net, saved)


# ------------------------------------------------------------ maps and refusals
def test_apply_and_restrict_state_dicts(gen: torch.Generator) -> None:
    net = _seeded(GPT)
    idx = torch.randint(0, 7, (2, 5), generator=gen)
    saved = _state(net)
    emb = torch_embed.deepen(net, {"blocks": [0, 0]}, "null", example_inputs=idx)
    assert emb.renames == {"blocks.0": "blocks.0", "blocks.1": "blocks.3"}
    mapped = emb.apply(saved)
    now = net.state_dict()
    assert mapped.keys() == now.keys() and all(torch.equal(mapped[k], now[k]) for k in now)
    back = emb.restrict(now)
    assert back.keys() == saved.keys() and all(torch.equal(back[k], saved[k]) for k in saved)


class SingleLinearBranch(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(self.norm(x))


def test_null_block_with_a_single_affine_branch_refused_and_undone(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(SingleLinearBranch(3), SingleLinearBranch(3), nn.Linear(3, 1)).to(F64)
    x = torch.randn(8, 3, dtype=F64, generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    groups = [list(g["params"]) for g in opt.param_groups]
    children = list(net)
    saved = _state(net)
    with pytest.raises(ValueError, match=r"gets a gradient.*zero_out.*left unchanged"):
        torch_embed.deepen(net, {"": [0]}, "null", example_inputs=x, optimizer=opt)
    assert list(net) == children and _same_state(net, saved)
    assert [list(g["params"]) for g in opt.param_groups] == groups
    # zero_out is exact for it (the single Linear is the writer)
    before = net(x).detach()
    torch_embed.deepen(net, {"": [0]}, "zero_out", example_inputs=x, optimizer=opt)
    assert len(net) == 4 and _rel(net(x).detach(), before) <= 1e-12


def test_bad_requests(gen: torch.Generator) -> None:
    net = _seeded(ResMLP, depth=2)
    x = torch.randn(4, 2, dtype=F64, generator=gen)
    with pytest.raises(ValueError, match="no submodule `layers`"):
        torch_embed.deepen(net, {"layers": [0]}, example_inputs=x)
    with pytest.raises(ValueError, match="out of range"):
        torch_embed.deepen(net, {"blocks": [2]}, example_inputs=x)
    with pytest.raises(TypeError, match=r"nn\.ModuleList or nn\.Sequential"):
        torch_embed.deepen(net, {"inp": [0]}, example_inputs=x)
    with pytest.raises(TypeError, match="non-empty mapping"):
        torch_embed.deepen(net, [("blocks", 0)], example_inputs=x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of"):
        torch_embed.deepen(net, {"blocks": [0]}, "zero", example_inputs=x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ints"):
        torch_embed.deepen(net, {"blocks": [0.0]}, example_inputs=x)  # type: ignore[list-item]
    assert len(net.blocks) == 2


def test_tied_block_refused(gen: torch.Generator) -> None:
    net = _seeded(ResMLP, depth=2)
    net.blocks[1].up.weight = net.blocks[0].up.weight
    with pytest.raises(ValueError, match="shared with"):
        torch_embed.deepen(net, {"blocks": [0]}, example_inputs=torch.randn(4, 2, dtype=F64))


def test_inertia_change_only_for_null_blocks(gen: torch.Generator) -> None:
    net = _seeded(ResMLP, depth=2)
    x = torch.randn(8, 2, dtype=F64, generator=gen)
    emb = torch_embed.deepen(net, {"blocks": [0]}, "zero_out", example_inputs=x)
    with pytest.raises(ValueError, match="'zero_out' insertion is not a critical embedding"):
        emb.inertia_change(net, nn.MSELoss(), x, torch.zeros(8, 1, dtype=F64))
