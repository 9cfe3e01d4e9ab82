"""Growing the residual width under a tied embedding / LM head (issue 13, GROWTH.md §2).

The tied matrix ``E`` embeds the tokens and reads the final norm's output. Uniform
copies of the stream copy ``E`` (both uses see copies) and fold the head's split into
the final norm's ``γ`` and ``β`` (copy ``j`` of unit ``i`` gets ``α_j γ_i``, ``α_j β_i``):
the head's read of the copies sums to the narrow logits. Checked against the narrow
model's float64 logits, greedy generation, autograd gradients and an Adam replay.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from cases import adam_replay
from torch import Tensor, nn
from zoo_transformers import GPT, Llama, greedy

import torch_embed
from torch_embed.embedding import EmbeddingKind
from torch_embed.graph.embedding import GroupEmbedding


def _gpt(**kwargs: object) -> GPT:
    torch.manual_seed(0)
    return GPT(tied=True, **kwargs).double()  # type: ignore[arg-type]


def _idx() -> Tensor:
    return torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _loss(model: nn.Module, idx: Tensor) -> Tensor:
    out = model(idx)
    r = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * r).sum() + 0.5 * (out**2).sum()


@pytest.mark.parametrize(
    ("scheme", "width", "kind"),
    [
        (torch_embed.Split(alpha=0.5), 16, EmbeddingKind.CRITICAL),
        (torch_embed.Net2Net(), 24, EmbeddingKind.CRITICAL),
        (torch_embed.Split(alpha="random"), 16, EmbeddingKind.OUTPUT_PRESERVING),
        (torch_embed.Null(), 13, EmbeddingKind.OUTPUT_PRESERVING),  # mean-fill: no fold
    ],
    ids=["split-x2", "net2net-x3", "split-random-x2", "null-mean-fill-13"],
)
def test_tied_gpt_residual_grows_exactly(
    scheme: torch_embed.Scheme, width: int, kind: EmbeddingKind
) -> None:
    model = _gpt()
    idx = _idx()
    gamma, beta = model.ln_f.weight.detach().clone(), model.ln_f.bias.detach().clone()
    with torch.no_grad():
        before = model(idx)
    tokens = greedy(model, idx[:1, :3])
    emb = torch_embed.widen(
        model, {"wte": width}, scheme, example_inputs=idx,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert model.lm_head.weight is model.wte.weight  # still tied
    assert model.wte.weight.shape == (11, width)
    with torch.no_grad():
        assert _rel(model(idx), before) <= 1e-10
    assert greedy(model, idx[:1, :3]) == tokens
    assert emb.kind is kind
    if width % 8 == 0:  # copies: γ and β of the copies of unit i sum to γ_i, β_i
        k = width // 8
        g, b = model.ln_f.weight.detach(), model.ln_f.bias.detach()
        e = model.wte.weight.detach()
        for i in range(8):  # copy j of unit i: E column equal to column i, γ_j = α_j γ_i
            copies = [j for j in range(width) if torch.equal(e[:, j], e[:, i])]
            assert len(copies) == k
            assert torch.allclose(g[copies].sum(), gamma[i], rtol=1e-13, atol=0)
            assert torch.allclose(b[copies].sum(), beta[i], rtol=1e-13, atol=1e-15)


def test_tied_gpt_gradients_and_adam_map() -> None:
    """Split(α=0.5) ×2: autograd gradients and Adam's state equal the mapped/replayed ones."""
    model = _gpt()
    idx = _idx()
    # the embedding maps the tied matrix under the name the trace gives it
    name = {"wte.weight": "lm_head.weight"}
    init = {name.get(n, n): p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grads = []
    for _ in range(3):
        optimizer.zero_grad()
        _loss(model, idx).backward()
        grads.append({name.get(n, n): p.grad.clone() for n, p in model.named_parameters()})  # type: ignore[union-attr]
        optimizer.step()
    optimizer.zero_grad()
    _loss(model, idx).backward()
    narrow = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb = torch_embed.widen(
            model, {"wte": 16}, torch_embed.Split(alpha=0.5), example_inputs=idx,
            optimizer=optimizer, generator=torch.Generator().manual_seed(4),
        )  # fmt: skip
    assert isinstance(emb, GroupEmbedding) and emb.kind is EmbeddingKind.CRITICAL
    mapped = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _loss(model, idx).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and mapped[n] is not None, n
        scale = max(float(narrow[n].abs().max()), 1e-3)
        assert float((p.grad - mapped[n]).abs().max()) <= 1e-11 * scale, n
    replay, replay_opt = adam_replay(emb, init, grads, lr=0.01)
    for n, p in model.named_parameters():
        got, want = optimizer.state[p], replay_opt.state[replay[name.get(n, n)]]
        for key in ("exp_avg", "exp_avg_sq"):
            err = float((got[key] - want[key]).abs().max())
            assert err <= 1e-12 * max(float(want[key].abs().max()), 1e-12), (n, key, err)


def _tied_llama(written: bool) -> Llama:
    torch.manual_seed(0)
    model = Llama(written_norm=written).double()
    model.lm_head.weight = model.embed_tokens.weight
    return model


@pytest.mark.parametrize(
    ("written", "scheme", "width"),
    [(False, "split", 16), (False, "null", 11), (True, "null", 11)],
    ids=["rmsnorm-split-x2", "rmsnorm-zero-fill-11", "written-rmsnorm-zero-fill-11"],
)
def test_tied_llama_residual_grows_exactly(written: bool, scheme: str, width: int) -> None:
    """RMSNorm: copies fold into γ (no β); zero-filled units need no fold at all."""
    model = _tied_llama(written)
    idx = _idx()
    with torch.no_grad():
        before = model(idx)
    tokens = greedy(model, idx[:1, :3])
    emb = torch_embed.widen(model, {"embed_tokens": width}, scheme, example_inputs=idx)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.shape == (11, width)
    with torch.no_grad():
        assert _rel(model(idx), before) <= 1e-10
    assert greedy(model, idx[:1, :3]) == tokens
    assert emb.kind is EmbeddingKind.CRITICAL


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


class _NoAffineFinal(GPT):
    def __init__(self) -> None:
        super().__init__(tied=True)
        self.ln_f = nn.LayerNorm(8, elementwise_affine=False)


class _HeadOnStream(GPT):
    """The tied head reads the stream itself (no final norm to fold into)."""

    def __init__(self) -> None:
        super().__init__(tied=True)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(x)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_NoAffineFinal, r"`ln_f`, which has no affine γ to fold the head's split into"),
        (_HeadOnStream, r"the split can be folded into a LayerNorm/RMSNorm's γ and β only"),
    ],
    ids=["no-affine", "no-final-norm"],
)
def test_tied_copies_refused_without_a_norm_to_fold_into(make: type[GPT], match: str) -> None:
    torch.manual_seed(0)
    model = make().double()
    before = _state(model)
    with pytest.raises(ValueError, match=match) as err:
        torch_embed.widen(model, {"wte": 16}, "split", example_inputs=_idx())
    assert "untie it" in str(err.value)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tied_copies_refused_under_a_written_rmsnorm() -> None:
    """An RMSNorm written out (HF's form in user code) is not a foldable norm op."""
    model = _tied_llama(written=True)
    before = _state(model)
    with pytest.raises(ValueError, match="the split can be folded into") as err:
        torch_embed.widen(model, {"embed_tokens": 16}, "split", example_inputs=_idx())
    assert "untie it" in str(err.value)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_hf_gpt2_tied_residual_grows_exactly() -> None:
    config = transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, n_inner=24,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):  # non-trivial γ, β: the fold must show
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    widths = {
        "transformer.wte": 32,  # GPT-2 builds heads × head_dim = n_embd: heads ×2 with it
        "transformer.h.0.attn.c_attn[0]": 4,
        "transformer.h.1.attn.c_attn[0]": 4,
    }
    emb = torch_embed.widen(model, widths, torch_embed.Split(alpha=0.5), example_inputs=(ids,))
    assert emb.kind is EmbeddingKind.CRITICAL
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.n_embd == 32 and model.transformer.ln_f.weight.shape == (32,)
    with torch.no_grad():
        assert _rel(model(ids).logits, before) <= 1e-10
    after = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(after, tokens)


def test_hf_bert_tied_decoder_folds_into_the_transform_norm() -> None:
    """BERT's tied decoder reads `cls.predictions.transform.LayerNorm` (post-LN model)."""
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).double().eval()
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(UserWarning, match="cannot describe"):  # heads × head_dim = hidden_size
        emb = torch_embed.widen(
            model, {"bert.embeddings.word_embeddings": 32}, torch_embed.Split(alpha=0.5),
            example_inputs=(ids,),
        )  # fmt: skip
    assert emb.kind is EmbeddingKind.CRITICAL
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert _rel(model(ids).logits, before) <= 1e-10
