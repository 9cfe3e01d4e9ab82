"""More Hugging Face families: Mistral, Qwen3, Gemma 1-3 and Phi-3 grow; their configs follow.

Tiny random models (hidden 16, 2 layers, 4 query heads on 2 kv heads of head_dim 4)
are built offline in float64; their FFN width, heads and residual width are grown.
References are brute force: the narrow model's logits and 10 greedy tokens (the wide
model and the one ``from_pretrained`` rebuilds from what ``save_pretrained`` wrote must
give the same), the narrow model's tensors (a refused request leaves them as they were).

- **Qwen3** normalises q and k over head_dim (``q_norm``/``k_norm``) before its rotary
  embedding: the head_dim is rigid, for the rotary embedding.
- **Phi-3** fuses q, k, v in ``qkv_proj`` and gate, up in ``gate_up_proj``; its forward
  slices ``qkv`` by sizes read from the config, so its heads do not grow.
- **Gemma 1-3** scale their RMSNorm by ``1 + weight`` and the token embedding by
  ``embed_scale = √hidden_size`` (a buffer set from the config): the residual width
  grows by uniform copies (untied) or by zero-fill, which writes the norms' stored
  weights as ``w' = √(D/D')·(1 + w) − 1``; the config cannot hold it (a rebuilt model
  would scale by √D').

Their RMSNorms compute in float32 whatever the model's dtype, so residual growth (which
changes the length of the norm's mean) is checked in float32 to 1e-5, as in
tests/test_hf.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from torch import Tensor, nn

import torch_embed
from torch_embed.embedding import EmbeddingKind
from torch_embed.graph.hf import scales_by_one_plus_weight

VOCAB, SEQ = 40, 6
_SIZES = {
    "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
    "initializer_range": 0.3, "bos_token_id": 0, "eos_token_id": 0,
}  # fmt: skip

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(head_dim=4, **_SIZES)
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=4, **_SIZES)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=4, **_SIZES)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(head_dim=4, **_SIZES)
    ),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(head_dim=4, **_SIZES)
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(pad_token_id=0, **_SIZES)),
}
FFN = {
    "mistral": "model.layers.{}.mlp.gate_proj",
    "qwen3": "model.layers.{}.mlp.gate_proj",
    "gemma": "model.layers.{}.mlp.gate_proj",
    "gemma2": "model.layers.{}.mlp.gate_proj",
    "gemma3": "model.layers.{}.mlp.gate_proj",
    "phi3": "model.layers.{}.mlp.gate_up_proj",
}
GREEDY = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False}


def _build(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    with torch.random.fork_rng():  # transformers initialises from the global RNG
        torch.manual_seed(0)
        return BUILDERS[name]().to(dtype).eval()


def _ids(seed: int = 1) -> Tensor:
    return torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(ids).logits


def _greedy(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.generate(ids, **GREEDY)  # type: ignore[no-any-return]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _reload(model: nn.Module, path: Path, dtype: torch.dtype = torch.float64) -> nn.Module:
    """What ``save_pretrained`` wrote, rebuilt by ``from_pretrained``: the same tensors."""
    model.save_pretrained(path)
    again = type(model).from_pretrained(path, dtype=dtype).eval()
    state, loaded = model.state_dict(), again.state_dict()
    assert set(state) == set(loaded)
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    return again


@pytest.mark.parametrize("name", list(BUILDERS))
def test_ffn_grows_and_the_config_rebuilds_it(name: str, tmp_path: Path) -> None:
    """Every layer's FFN 24 -> 37 (not a multiple): logits and greedy tokens kept, reloaded."""
    model, ids = _build(name), _ids()
    before, greedy = _logits(model, ids), _greedy(model, ids)
    fmt = FFN[name]
    emb = torch_embed.widen(
        model,
        {fmt.format(k): 37 for k in range(2)},
        torch_embed.Split(alpha="random"),
        example_inputs=(ids,),
        generator=torch.Generator().manual_seed(5),
    )
    assert emb.kind is EmbeddingKind.CRITICAL
    assert _rel(_logits(model, ids), before) <= 1e-10
    assert torch.equal(_greedy(model, ids), greedy)
    assert model.config.intermediate_size == 37
    again = _reload(model, tmp_path)
    assert _rel(_logits(again, ids), before) <= 1e-10
    assert torch.equal(_greedy(again, ids), greedy)


@pytest.mark.parametrize("name", ["mistral", "qwen3", "gemma", "gemma2", "gemma3"])
def test_kv_heads_grow_and_the_config_rebuilds_them(name: str, tmp_path: Path) -> None:
    """kv heads 2 -> 4 in both layers (query heads 4 -> 8 with them, GQA map kept)."""
    model, ids = _build(name), _ids()
    before, greedy = _logits(model, ids), _greedy(model, ids)
    widths = {f"model.layers.{k}.self_attn.q_proj[0]": 4 for k in range(2)}
    torch_embed.widen(
        model, widths, torch_embed.Split(alpha="random"), example_inputs=(ids,),
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert _rel(_logits(model, ids), before) <= 1e-10
    assert torch.equal(_greedy(model, ids), greedy)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 4)
    for layer in model.model.layers:  # type: ignore[union-attr]
        assert layer.self_attn.num_key_value_groups == 2
    again = _reload(model, tmp_path)
    assert _rel(_logits(again, ids), before) <= 1e-10
    assert torch.equal(_greedy(again, ids), greedy)


RESIDUAL = [
    pytest.param("mistral", 32, torch_embed.Split(alpha=0.5), 1e-6, id="mistral-copies-x2"),
    pytest.param("qwen3", 32, torch_embed.Split(alpha=0.5), 1e-6, id="qwen3-copies-x2"),
    pytest.param("phi3", 32, torch_embed.Split(alpha=0.5), 1e-5, id="phi3-copies-x2"),
    pytest.param("phi3", 24, torch_embed.Null(), 1e-5 * 16 / 24, id="phi3-zero-fill-24"),
]


@pytest.mark.parametrize(("name", "width", "scheme", "eps"), RESIDUAL)
def test_residual_width_and_config(
    name: str, width: int, scheme: torch_embed.Scheme, eps: float, tmp_path: Path
) -> None:
    """The residual stream by copies or zero-fill; hidden_size, eps (and Phi-3's head_dim)."""
    model, ids = _build(name, torch.float32), _ids()
    before, greedy = _logits(model, ids), _greedy(model, ids)
    emb = torch_embed.widen(model, {"model.norm": width}, scheme, example_inputs=(ids,))
    assert emb.sizes == {"model.embed_tokens": (16, width)}
    assert emb.kind is EmbeddingKind.CRITICAL
    assert _rel(_logits(model, ids), before) <= 1e-5
    assert torch.equal(_greedy(model, ids), greedy)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (width, 4, 2)
    assert cfg.rms_norm_eps == pytest.approx(eps, rel=1e-12)
    # Phi3Config has no head_dim: its attention reads hidden_size // heads, now 6 or 8
    assert getattr(cfg, "head_dim", None) == 4
    again = _reload(model, tmp_path, torch.float32)
    assert _rel(_logits(again, ids), before) <= 1e-5


def test_qwen3_zero_fill_leaves_the_config_for_q_norm_eps() -> None:
    """Zero-fill rescales the residual norms' eps, not q_norm's: one config field for both."""
    model, ids = _build("qwen3", torch.float32), _ids()
    before = _logits(model, ids)
    with pytest.warns(UserWarning, match=r"`rms_norm_eps` would need one value per layer"):
        torch_embed.widen(model, {"model.norm": 24}, torch_embed.Null(), example_inputs=(ids,))
    assert _rel(_logits(model, ids), before) <= 1e-5
    attn = model.model.layers[0].self_attn  # type: ignore[union-attr,index]
    assert attn.q_norm.variance_epsilon == 1e-6
    assert model.model.norm.variance_epsilon == pytest.approx(1e-6 * 16 / 24, rel=1e-12)  # type: ignore[union-attr]
    assert (model.config.hidden_size, model.config.rms_norm_eps) == (16, 1e-6)


def test_qwen3_head_dim_is_rigid_for_its_rotary_embedding() -> None:
    """q_norm/k_norm normalise over head_dim, but the rotary embedding is what pins it."""
    groups = torch_embed.width_groups(_build("qwen3"), (_ids(),))
    rigid = [
        g for g in groups if g.name.startswith("model.layers.0.self_attn.q_proj") and not g.growable
    ]
    assert rigid
    for g in rigid:
        assert (g.reason or "").startswith(
            "head_dim: rotary embedding at `model.layers.0.self_attn`"
        )
        # one group with layer 1's head_dim: the rotary cos/sin are shared by the layers
        norms = {c.module for c in g.constraints if c.kind == "rms_norm"}
        assert norms == {
            f"model.layers.{k}.self_attn.{n}" for k in (0, 1) for n in ("q_norm", "k_norm")
        }
    with pytest.raises(ValueError, match="cannot grow"):
        torch_embed.widen(_build("qwen3"), {rigid[0].name: 4}, "split", example_inputs=(_ids(),))


def test_phi3_heads_are_rigid() -> None:
    """Phi-3 slices its fused qkv by ``config.num_attention_heads * head_dim``: a constant."""
    groups = torch_embed.width_groups(_build("phi3"), (_ids(),))
    qkv = groups.find("model.layers.0.self_attn.qkv_proj")
    assert not qkv.growable and "aten.slice" in (qkv.reason or "")


def _untied(name: str) -> nn.Module:
    model = _build(name, torch.float32)
    head = model.lm_head  # type: ignore[union-attr]
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_gemma_residual_copies_keep_the_config_for_the_embedding_scale(name: str) -> None:
    """Copies of the residual keep the output; ``√hidden_size`` keeps the config as it was.

    ``embed_scale`` is set from ``config.hidden_size`` in ``__init__``: a config with
    ``hidden_size = 32`` would rebuild the model with a scale √32 instead of √16.
    """
    model, ids = _untied(name), _ids()
    before = _logits(model, ids)
    with pytest.warns(
        UserWarning,
        match=r"`model.embed_tokens.scalar_embed_scale` is 4, the config builds 5.65685",
    ):
        torch_embed.widen(
            model, {"model.norm": 32}, torch_embed.Split(alpha=0.5), example_inputs=(ids,)
        )
    assert _rel(_logits(model, ids), before) <= 1e-5
    assert model.model.embed_tokens.weight.shape == (VOCAB, 32)  # type: ignore[union-attr]
    assert model.config.hidden_size == 16


# Gemma 3 also warns for `rms_norm_eps`: q_norm/k_norm keep theirs (as Qwen3)
_GEMMA_CONFIG_WARNING = {
    "gemma": r"`model.embed_tokens.scalar_embed_scale` is 4, the config builds",
    "gemma2": r"`model.embed_tokens.scalar_embed_scale` is 4, the config builds",
    "gemma3": r"`rms_norm_eps` would need one value per layer",
}


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("width", [24, 32])
def test_gemma_residual_zero_fill(name: str, width: int) -> None:
    """γ = 1 + w: the zero-fill writes w' = √(D/D')·(1 + w) − 1 and w_new = −1.

    The logits (float32, 1e-5) and greedy tokens are kept; the config keeps
    ``hidden_size = 16`` (``embed_scale = √hidden_size`` would be rebuilt as √D'), with
    a warning, so there is no save/load round trip to check.
    """
    model, ids = _untied(name), _ids()
    before, greedy = _logits(model, ids), _greedy(model, ids)
    norms = {
        n: m.weight.detach().double().clone()
        for n, m in model.named_modules()
        if type(m).__name__.endswith("RMSNorm") and m.weight.shape == (16,)
    }
    assert len(norms) >= 5  # two layers' norms and the final one
    with pytest.warns(UserWarning, match=_GEMMA_CONFIG_WARNING[name]):
        emb = torch_embed.widen(
            model, {"model.norm": width}, torch_embed.Null(), example_inputs=(ids,)
        )
    assert emb.kind is EmbeddingKind.CRITICAL
    assert _rel(_logits(model, ids), before) <= 1e-5
    assert torch.equal(_greedy(model, ids), greedy)
    c = math.sqrt(16 / width)
    for n, w in norms.items():
        norm = model.get_submodule(n)
        want = torch.cat([c * (1 + w) - 1, torch.full((width - 16,), -1.0, dtype=torch.float64)])
        assert torch.equal(norm.weight.detach(), want.float()), n  # rounded once
        assert norm.eps == pytest.approx(1e-6 * 16 / width, rel=1e-12)
    assert model.config.hidden_size == 16
    assert model.model.embed_tokens.scalar_embed_scale == 4.0  # type: ignore[union-attr]


def test_one_plus_weight_norms_are_recognised() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    assert scales_by_one_plus_weight(GemmaRMSNorm) and scales_by_one_plus_weight(Gemma2RMSNorm)
    assert not scales_by_one_plus_weight(LlamaRMSNorm)
    assert not scales_by_one_plus_weight(Qwen3RMSNorm)
    assert not scales_by_one_plus_weight(nn.RMSNorm)


def _tied_qwen3() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = transformers.Qwen3Config(head_dim=4, tie_word_embeddings=True, **_SIZES)
        model = transformers.Qwen3ForCausalLM(cfg).float().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # type: ignore[union-attr]
    return model


def test_tied_qwen3_residual_copies_are_refused_naming_the_written_out_norm() -> None:
    """HF's RMSNorm is written out in forward: no norm op whose reader the fold can see."""
    model, ids = _tied_qwen3(), _ids()
    weight = model.model.embed_tokens.weight.clone()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"written out in their forward \(`model\.norm`.*Null\(\)"):
        torch_embed.widen(model, {"model.norm": 32}, "split", example_inputs=(ids,))
    assert torch.equal(model.model.embed_tokens.weight, weight)  # type: ignore[union-attr]


def test_tied_qwen3_residual_zero_fill_keeps_the_tie() -> None:
    """Null units need no fold: 0 as embedding columns and as head columns."""
    model, ids = _tied_qwen3(), _ids()
    before, greedy = _logits(model, ids), _greedy(model, ids)
    with pytest.warns(UserWarning, match=r"`rms_norm_eps` would need one value"):  # q_norm's
        torch_embed.widen(model, {"model.norm": 24}, torch_embed.Null(), example_inputs=(ids,))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # type: ignore[union-attr]
    assert model.lm_head.weight.shape == (VOCAB, 24)  # type: ignore[union-attr]
    assert _rel(_logits(model, ids), before) <= 1e-5
    assert torch.equal(_greedy(model, ids), greedy)


class _NormedQK(nn.Module):
    """Attention with q and k normalised over head_dim (Qwen3's q_norm), no rotary embedding."""

    def __init__(self, d: int = 8, heads: int = 2, head_dim: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.k = nn.Linear(d, heads * head_dim), nn.Linear(d, heads * head_dim)
        self.v, self.o = nn.Linear(d, heads * head_dim), nn.Linear(heads * head_dim, d)
        self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.heads, self.head_dim)
        q = self.q_norm(self.q(x).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k(x).view(shape)).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))  # type: ignore[no-any-return]


@pytest.mark.parametrize("scheme", ["split", torch_embed.Null()])
def test_head_dim_under_q_norm_is_refused_naming_the_norm(scheme: object) -> None:
    """Without a rotary embedding, q_norm alone refuses the head_dim: nothing changes."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(_NormedQK()).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # an RMSNorm's rule is uniform copies or zero-fill (mean-fill is LayerNorm's)
    match = r"RMSNorm at `0\.q_norm`.*: uniform copies or zero-fill;.*attention head_dim"
    with pytest.raises(ValueError, match=match):
        torch_embed.widen(model, {"0.q[1]": 6}, scheme, example_inputs=x)  # type: ignore[arg-type]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model[0].head_dim == 4


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_tied_gemma_residual_zero_fill_keeps_the_tie(name: str) -> None:
    """Gemma ties its head by default: null units are 0 in both, the shifted norms as above."""
    model, ids = _build(name, torch.float32), _ids()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # type: ignore[union-attr]
    before, greedy = _logits(model, ids), _greedy(model, ids)
    with pytest.warns(UserWarning, match=_GEMMA_CONFIG_WARNING[name]):
        torch_embed.widen(model, {"model.norm": 24}, torch_embed.Null(), example_inputs=(ids,))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # type: ignore[union-attr]
    assert model.lm_head.weight.shape == (VOCAB, 24)  # type: ignore[union-attr]
    assert _rel(_logits(model, ids), before) <= 1e-5
    assert torch.equal(_greedy(model, ids), greedy)


def test_tied_gemma_residual_copies_stay_refused() -> None:
    """Copies under a tied head need the fold into the final norm, which is written out."""
    model, ids = _build("gemma", torch.float32), _ids()
    weight = model.model.embed_tokens.weight.clone()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"written out in their forward \(`model\.norm`"):
        torch_embed.widen(model, {"model.norm": 32}, "split", example_inputs=(ids,))
    assert torch.equal(model.model.embed_tokens.weight, weight)  # type: ignore[union-attr]
