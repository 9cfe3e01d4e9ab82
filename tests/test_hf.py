"""Hugging Face ``transformers`` models on the traced path (issue 13).

Tiny random BERT (post-LN), GPT-2 (``Conv1D``, tied head), LLaMA (RMSNorm, RoPE, GQA,
SwiGLU) and Qwen2 (q/k/v biases) are built offline in float64; their FFN width, heads,
head_dim and residual width are grown, and their module attributes and config fields
must follow. ``transformers`` is imported plainly: a missing install fails here, it
never skips.

References are brute force: the narrow model's logits and greedy generations (the wide
model must give the same), autograd on the wide model at the embedded points of a
narrow Adam run (the mapped Adam state must equal Adam fed those gradients), and a
model rebuilt by ``from_pretrained`` from what ``save_pretrained`` wrote.

LLaMA's and Qwen2's RMSNorm compute in float32 even in a float64 model
(``hidden_states.to(torch.float32)``): their outputs are float64-exact only where the
norm's input does not change; their gradients are float32-rounded, so the Adam replay
runs on GPT-2.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import torch_embed
from torch_embed.embedding import EmbeddingKind
from torch_embed.graph.handlers import Resize, attribute_updates

VOCAB, SEQ = 40, 6


def _bert(tie: bool = True) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, initializer_range=0.3,
        tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg)


def _gpt2(tie: bool = True) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, n_inner=24,
        initializer_range=0.3, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        initializer_range=0.3, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _qwen2() -> nn.Module:
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        initializer_range=0.3, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "llama": _llama,
    "qwen2": _qwen2,
}
UNTIED: dict[str, Callable[[], nn.Module]] = {
    "bert-untied": lambda: _bert(tie=False),
    "gpt2-untied": lambda: _gpt2(tie=False),
}
#: Each layer's FFN group: its name, the aliases that must be in it, its reader.
FFN = {
    "bert": ("bert.encoder.layer.{}.intermediate.dense", (), "bert.encoder.layer.{}.output.dense"),
    "gpt2": ("transformer.h.{}.mlp.c_fc", (), "transformer.h.{}.mlp.c_proj"),
    "llama": ("model.layers.{}.mlp.gate_proj", ("up_proj",), "model.layers.{}.mlp.down_proj"),
    "qwen2": ("model.layers.{}.mlp.gate_proj", ("up_proj",), "model.layers.{}.mlp.down_proj"),
}
CAUSAL = ["gpt2", "llama", "qwen2"]


def _build(name: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():  # transformers initialises from the global RNG
        torch.manual_seed(seed)
        model = {**BUILDERS, **UNTIED}[name]().double().eval()
    return model


def _ids(seed: int = 1) -> Tensor:
    return torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(ids).logits


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_width_groups_list_the_ffn_groups(name: str) -> None:
    model = _build(name)
    use_cache = getattr(model.config, "use_cache", None)
    groups = torch_embed.width_groups(model, (_ids(),))  # a causal LM returns a cache too
    assert model.config.use_cache == use_cache  # put back after the trace
    assert not any("forward" in vars(m) for m in model.modules())  # RMSNorm's too
    assert groups.tracer == "torch.export"
    fmt, aliases, reader = FFN[name]
    for layer in range(2):
        g = groups.find(fmt.format(layer))
        assert (g.size, g.growable, g.hidden, g.constraints) == (24, True, True, ())
        assert all(any(a.endswith(s) for a in g.aliases) for s in aliases), g.aliases
        assert {u.tensor.rsplit(".", 1)[0] for u in g.consumers} == {reader.format(layer)}
    # every group that cannot grow says why, naming the op and its module
    for g in groups:
        if not g.growable:
            assert g.reason, g
    logits = [g for g in groups if not g.hidden and g.size == VOCAB]
    assert logits and all(g.reason and "model output" in g.reason for g in logits)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_ffn_width_is_exact_and_config_follows(name: str, tmp_path: Path) -> None:
    """Every layer's FFN 24 -> 37 (not a multiple): logits kept, config and save/load."""
    model, ids = _build(name), _ids()
    before = _logits(model, ids)
    fmt = FFN[name][0]
    emb = torch_embed.widen(
        model,
        {fmt.format(k): 37 for k in range(2)},
        torch_embed.Split(alpha="random"),
        example_inputs=(ids,),
        generator=torch.Generator().manual_seed(5),
    )
    assert emb.kind is EmbeddingKind.CRITICAL
    assert emb.sizes == {fmt.format(k): (24, 37) for k in range(2)}
    assert _rel(_logits(model, ids), before) <= 1e-10
    cfg = model.config
    assert (cfg.n_inner if name == "gpt2" else cfg.intermediate_size) == 37
    # what save_pretrained wrote rebuilds the wide model
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    state, loaded = model.state_dict(), again.state_dict()
    assert set(state) == set(loaded)
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    assert _rel(_logits(again, ids), before) <= 1e-10


def test_conv1d_module_attributes_follow() -> None:
    model = _build("gpt2")
    widths = {"transformer.h.0.mlp.c_fc": 29, "transformer.h.1.mlp.c_fc": 29}
    torch_embed.widen(model, widths, "split", example_inputs=(_ids(),))
    for block in model.transformer.h:  # type: ignore[union-attr]
        mlp = block.mlp
        assert (mlp.c_fc.nx, mlp.c_fc.nf, mlp.c_proj.nx, mlp.c_proj.nf) == (16, 29, 29, 16)
        assert mlp.c_fc.weight.shape == (16, 29) and mlp.c_proj.weight.shape == (29, 16)
    assert model.config.n_inner == 29


def test_conv1d_handler() -> None:
    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    assert attribute_updates(conv, Resize({"weight": (4, 9), "bias": (9,)})) == {"nx": 4, "nf": 9}
    with pytest.raises(ValueError, match=r"Conv1D\).*'bias' has shape \(6,\)"):
        attribute_updates(conv, Resize({"weight": (4, 9)}), name="c_fc")


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_per_layer_widths_leave_the_config_with_a_warning(name: str) -> None:
    """One config number cannot hold two layers' widths: said, and the config kept."""
    model, ids = _build(name), _ids()
    before = _logits(model, ids)
    fmt = FFN[name][0]
    with pytest.warns(UserWarning, match=r"`intermediate_size` would need one value per layer"):
        torch_embed.widen(model, {fmt.format(0): 31}, "split", example_inputs=(ids,))
    assert model.config.intermediate_size == 24
    assert _rel(_logits(model, ids), before) <= 1e-10


RESIDUAL = [
    pytest.param("llama", 32, torch_embed.Split(alpha=0.5), id="llama-copies-x2"),
    pytest.param("llama", 24, torch_embed.Null(), id="llama-zero-fill-24"),
    pytest.param("qwen2", 21, torch_embed.Null(), id="qwen2-zero-fill-21"),
]


@pytest.mark.parametrize(("name", "width", "scheme"), RESIDUAL)
def test_residual_width_under_rmsnorm_and_config(
    name: str, width: int, scheme: torch_embed.Scheme, tmp_path: Path
) -> None:
    """The residual stream by uniform copies or zero-fill (RMSNorm's rules), in float32.

    The HF RMSNorm writes its norm out (``pow``, ``mean``, ``rsqrt``): read as an
    RMSNorm by the op rules, so zero-fill applies, with ``variance_epsilon`` and the config's
    ``rms_norm_eps`` × D/D'. It computes in float32 whatever the model's dtype, and its
    mean over D' features rounds differently from the mean over D: float32-exact, not
    float64. Qwen2Config has no ``head_dim`` field (Qwen2Attention reads it with a
    default of hidden_size // heads), so it is added: the config must rebuild 4 heads
    of 4.
    """
    model, ids = _build(name).float(), _ids()
    before = _logits(model, ids)
    emb = torch_embed.widen(model, {"model.norm": width}, scheme, example_inputs=(ids,))
    assert emb.sizes == {"model.embed_tokens": (16, width)}  # the norm is an alias
    assert emb.kind is EmbeddingKind.CRITICAL
    assert _rel(_logits(model, ids), before) <= 1e-5
    eps = 1e-6 if isinstance(scheme, torch_embed.Split) else 1e-6 * 16 / width
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 5
    for norm in norms:
        assert norm.weight.shape == (width,)
        assert norm.variance_epsilon == pytest.approx(eps, rel=1e-12)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (width, 4, 2)
    assert cfg.head_dim == 4 and cfg.rms_norm_eps == pytest.approx(eps, rel=1e-12)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert _rel(_logits(again, ids), before) <= 1e-5


#: GPT-2 and BERT build their attention as heads x head_dim = hidden_size: the config
#: holds a wider residual when the heads grow with it (BERT's MLM transform too).
RESIDUAL_AND_HEADS = [
    pytest.param(
        "gpt2-untied",
        {"transformer.ln_f": 32, **{f"transformer.h.{k}.attn.c_attn[0]": 4 for k in range(2)}},
        id="gpt2",
    ),
    pytest.param(
        "bert-untied",
        {
            "bert.embeddings.LayerNorm": 32,
            "cls.predictions.transform.dense": 32,
            **{f"bert.encoder.layer.{k}.attention.self.query[0]": 4 for k in range(2)},
        },
        id="bert",
    ),
]


@pytest.mark.parametrize(("name", "widths"), RESIDUAL_AND_HEADS)
def test_residual_and_heads_under_layernorm(
    name: str, widths: dict[str, int], tmp_path: Path
) -> None:
    """Residual x2 by uniform copies under LayerNorm (pre-LN GPT-2, post-LN BERT), heads x2."""
    model, ids = _build(name), _ids()
    before = _logits(model, ids)
    emb = torch_embed.widen(model, widths, torch_embed.Split(alpha=0.5), example_inputs=(ids,))
    assert emb.kind is EmbeddingKind.CRITICAL
    assert _rel(_logits(model, ids), before) <= 1e-10
    assert (model.config.hidden_size, model.config.num_attention_heads) == (32, 4)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert _rel(_logits(again, ids), before) <= 1e-10


def test_tied_gpt2_residual_folds_into_the_final_norm() -> None:
    """The tied head's split goes into `ln_f`'s γ, β (tests/test_tied_head.py: the rest)."""
    model, ids = _build("gpt2"), _ids()
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(UserWarning, match="cannot describe"):  # heads × head_dim = n_embd
        torch_embed.widen(model, {"transformer.ln_f": 32}, "split", example_inputs=(ids,))
    assert model.lm_head.weight is model.transformer.wte.weight  # type: ignore[union-attr]
    assert model.transformer.wte.weight.shape == (VOCAB, 32)  # type: ignore[union-attr]
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-10


class _Logits(nn.Module):
    """A user's own module around an HF causal LM, returning the logits only."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(ids, use_cache=False).logits  # type: ignore[no-any-return]


def test_an_hf_model_inside_a_users_module() -> None:
    """The RMSNorm trace and the inner model's config work under a wrapper too."""
    wrapped, ids = _Logits(_build("qwen2").float()), _ids()
    with torch.no_grad():
        before = wrapped(ids)
    widths = {"lm.model.norm": 21, "lm.model.layers.1.mlp.gate_proj": 30}
    with pytest.warns(UserWarning, match="`intermediate_size` would need one value per layer"):
        torch_embed.widen(wrapped, widths, torch_embed.Null(), example_inputs=(ids,))
    with torch.no_grad():
        assert _rel(wrapped(ids), before) <= 1e-5
    assert wrapped.lm.config.hidden_size == 16  # left as it was: one layer's FFN grew
    torch_embed.widen(
        wrapped, {"lm.model.layers.0.mlp.gate_proj": 30}, "split", example_inputs=(ids,)
    )
    cfg = wrapped.lm.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (21, 30, 4)
    assert cfg.rms_norm_eps == pytest.approx(1e-6 * 16 / 21, rel=1e-12)  # caught up


def test_a_model_type_without_known_fields_is_widened_and_said() -> None:
    """OPT: traced and widened like any model; its config fields are not known: warned."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=24,
            num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
            bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )  # fmt: skip
        model = transformers.OPTForCausalLM(cfg).double().eval()
    ids = _ids()
    before = _logits(model, ids)
    with pytest.warns(UserWarning, match="knows no size fields of model_type 'opt'.*fc1"):
        torch_embed.widen(model, {"model.decoder.layers.0.fc1": 30}, "split", example_inputs=(ids,))
    assert _rel(_logits(model, ids), before) <= 1e-10
    assert model.config.ffn_dim == 24


def test_llama_config_refuses_a_residual_width_its_heads_do_not_divide() -> None:
    """LlamaConfig validates hidden_size % num_attention_heads even with a head_dim."""
    model, ids = _build("llama").float(), _ids()
    before = _logits(model, ids)
    with pytest.warns(UserWarning, match=r"hidden size \(21\) is not a multiple"):
        torch_embed.widen(model, {"model.norm": 21}, torch_embed.Null(), example_inputs=(ids,))
    assert model.config.hidden_size == 16 and model.config.rms_norm_eps == 1e-6
    assert _rel(_logits(model, ids), before) <= 1e-5


def test_config_is_put_back_when_the_output_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = _build("qwen2"), _ids()
    cfg = model.config
    before = (cfg.to_dict(), hasattr(cfg, "head_dim"))
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("output 0 changed (forced)")

    monkeypatch.setattr("torch_embed.graph.apply._compare", fail)
    with pytest.raises(ValueError, match="forced"):
        torch_embed.widen(model, {"model.norm": 32}, "split", example_inputs=(ids,))
    assert (cfg.to_dict(), hasattr(cfg, "head_dim")) == before == (before[0], False)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes


#: Head growth: (model, {group: width}, config fields after, or None where the config
#: cannot describe the result: GPT-2 and BERT tie heads · head_dim to the hidden size).
HEADS = [
    pytest.param(
        "bert", {"bert.encoder.layer.0.attention.self.query[0]": 3}, None, id="bert-heads"
    ),
    pytest.param(
        "bert",
        {
            "bert.encoder.layer.1.attention.self.query[1]": 11,  # q·k head_dim
            "bert.encoder.layer.1.attention.self.value": 11,  # v head_dim: one view size
        },
        None,
        id="bert-head_dim",
    ),
    pytest.param("gpt2", {"transformer.h.1.attn.c_attn[0]": 3}, None, id="gpt2-heads"),
    pytest.param(
        "llama",
        {f"model.layers.{k}.self_attn.q_proj[0]": 4 for k in range(2)},  # kv heads 2 -> 4
        {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 4},
        id="llama-kv_heads",
    ),
    pytest.param(
        "qwen2",
        {f"model.layers.{k}.self_attn.q_proj[1]": 4 for k in range(2)},  # q per kv 2 -> 4
        {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 4},
        id="qwen2-q_per_kv",
    ),
]


@pytest.mark.parametrize(("name", "widths", "fields"), HEADS)
def test_heads_and_head_dim(
    name: str, widths: dict[str, int], fields: dict[str, int] | None, tmp_path: Path
) -> None:
    """Heads copied (o_proj columns split), GQA kept, head_dim with the temperature fix."""
    model, ids = _build(name), _ids()
    before = _logits(model, ids)
    scheme = torch_embed.Split(alpha="random")
    gen = torch.Generator().manual_seed(3)
    if fields is None:
        with pytest.warns(UserWarning, match="cannot describe the widened"):
            torch_embed.widen(model, widths, scheme, example_inputs=(ids,), generator=gen)
        assert _rel(_logits(model, ids), before) <= 1e-10
        return
    model.set_attn_implementation("eager")  # computes its softmax in float32: own reference
    before_eager = _logits(model, ids)
    model.set_attn_implementation("sdpa")
    torch_embed.widen(model, widths, scheme, example_inputs=(ids,), generator=gen)
    assert _rel(_logits(model, ids), before) <= 1e-10
    assert {k: getattr(model.config, k) for k in fields} == fields
    for layer in model.model.layers:  # type: ignore[union-attr]
        attn = layer.self_attn
        assert attn.head_dim == 4
        assert (
            attn.num_key_value_groups
            == fields["num_attention_heads"] // fields["num_key_value_heads"]
        )
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert _rel(_logits(again, ids), before) <= 1e-10
    model.set_attn_implementation("eager")  # reads num_key_value_groups and scaling
    assert _rel(_logits(model, ids), before_eager) <= 1e-10
    kwargs = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(again.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_gpt2_split_size_follows_the_heads() -> None:
    """GPT-2 splits c_attn's output by ``split_size``: it must follow heads x head_dim."""
    model = _build("gpt2")
    widths = {f"transformer.h.{k}.attn.c_attn[0]": 3 for k in range(2)}
    with pytest.warns(UserWarning, match="cannot describe"):  # n_embd = heads * head_dim
        torch_embed.widen(model, widths, "split", example_inputs=(_ids(),))
    for block in model.transformer.h:  # type: ignore[union-attr]
        assert (block.attn.num_heads, block.attn.head_dim, block.attn.split_size) == (3, 8, 24)
        assert block.attn.c_attn.weight.shape == (16, 72)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_head_dim_under_rope_is_rigid(name: str) -> None:
    groups = torch_embed.width_groups(_build(name), (_ids(),))
    q = [g for g in groups if g.name.startswith("model.layers.0.self_attn.q_proj")]
    rigid = [g for g in q if not g.growable]
    assert rigid
    for g in rigid:
        assert (g.reason or "").startswith(
            "head_dim: rotary embedding at `model.layers.0.self_attn`"
        )
    with pytest.raises(ValueError, match="cannot grow"):
        torch_embed.widen(_build(name), {rigid[0].name: 4}, "split", example_inputs=(_ids(),))


@pytest.mark.parametrize("name", CAUSAL)
def test_greedy_generation_is_identical(name: str) -> None:
    model, ids = _build(name), _ids(2)
    kwargs = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
    with torch.no_grad():
        narrow = model.generate(ids, **kwargs)
    fmt = FFN[name][0]
    torch_embed.widen(
        model, {fmt.format(0): 40, fmt.format(1): 40}, torch_embed.Split(alpha=0.3),
        example_inputs=(ids,),
    )  # fmt: skip
    with torch.no_grad():
        wide = model.generate(ids, **kwargs)
    assert wide.shape == (2, SEQ + 20)
    assert torch.equal(wide, narrow)


def _loss(model: nn.Module, ids: Tensor) -> Tensor:
    logits = model(ids).logits
    r = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)
    return (logits * r).sum() + 0.5 * (logits**2).sum()


def test_gradient_and_adam_state_equal_a_replay_gpt2() -> None:
    """GPT-2's Conv1D FFN (weight (in, out)): ``.grad`` and Adam state after widening.

    References: the wide model's own autograd gradient at the embedded point, and a
    fresh Adam over the wide parameters fed the wide model's autograd gradients at the
    embedded points of the narrow run.
    """
    model, ids = _build("gpt2"), _ids()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    points: list[dict[str, Tensor]] = []
    for _ in range(3):
        points.append({n: p.detach().clone() for n, p in model.named_parameters()})
        optimizer.zero_grad()
        _loss(model, ids).backward()
        optimizer.step()
    last = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    _loss(model, ids).backward()
    with pytest.warns(UserWarning, match="`n_inner` would need one value per layer"):
        emb = torch_embed.widen(
            model,
            {"transformer.h.0.mlp.c_fc": 37, "transformer.h.1.mlp.c_fc": 30},
            torch_embed.Split(alpha="random"),
            example_inputs=(ids,),
            optimizer=optimizer,
            generator=torch.Generator().manual_seed(11),
        )
    assert emb.kind is EmbeddingKind.CRITICAL
    params = dict(model.named_parameters())
    mapped = {n: p.grad.clone() for n, p in params.items()}  # type: ignore[union-attr]

    def wide_grads(point: dict[str, Tensor]) -> dict[str, Tensor]:
        wide = emb.apply(point)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(wide[n])
        model.zero_grad()
        _loss(model, ids).backward()
        return {n: p.grad.clone() for n, p in params.items()}  # type: ignore[union-attr]

    for n, g in wide_grads(last).items():
        assert mapped[n].shape == g.shape
        assert float((mapped[n] - g).abs().max()) <= 1e-11 * float(g.abs().max()), n
    replay = {n: nn.Parameter(torch.zeros_like(p)) for n, p in params.items()}
    replay_opt = torch.optim.Adam(replay.values(), lr=0.01)
    for point in points:
        for n, g in wide_grads(point).items():
            replay[n].grad = g
        replay_opt.step()
    for n, p in params.items():
        got, want = optimizer.state[p], replay_opt.state[replay[n]]
        assert float(got["step"]) == float(want["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            scale = float(want[key].abs().max())
            assert float((got[key] - want[key]).abs().max()) <= 1e-10 * scale, (n, key)


def test_import_does_not_import_transformers() -> None:
    code = (
        "import sys, torch, torch_embed\n"
        "from torch import nn\n"
        "net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))\n"
        "torch_embed.widen(net, {'0': 5}, 'split', example_inputs=torch.randn(4, 2))\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
