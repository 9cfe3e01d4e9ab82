"""One ``head_dim`` attribute sizing the query/key and the value head_dim (issue 13).

Hugging Face's LLaMA, GPT-2 and BERT view q, k and v with one ``self.head_dim``: growing
the value head_dim alone (or the query/key one alone) breaks the other view. ``widen``
refuses it up front, naming the attribute and both groups, and leaves the model as it
was; growing both to the same width in one call keeps the float64 logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from zoo_transformers import GPT, CausalSelfAttention, Llama, LlamaAttention, greedy, rotate_half

import torch_embed


class SharedAttention(CausalSelfAttention):
    """The tests' attention, with v viewed by ``self.head_dim`` as GPT-2 and LLaMA do."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.explicit:
            att = (q @ k.transpose(-2, -1)) * (1.0 / k.size(-1) ** 0.5)
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            y = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class SharedLlamaAttention(LlamaAttention):
    """The tests' LLaMA attention (RoPE, GQA by ``enable_gqa``), v viewed by ``head_dim``."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(t)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def _shared_gpt(explicit: bool) -> nn.Module:
    torch.manual_seed(0)
    model = GPT(explicit=explicit).double()
    for block in model.h:
        block.attn.__class__ = SharedAttention
    return model


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model: nn.Module, before: dict[str, Tensor]) -> bool:
    now = dict(model.named_parameters())
    return now.keys() == before.keys() and all(
        now[n].shape == t.shape and bool((now[n] == t).all()) for n, t in before.items()
    )


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("alone", ["h.0.attn.v", "h.0.attn.q[1]"])
def test_tests_gpt_one_head_dim_alone_is_refused(explicit: bool, alone: str) -> None:
    model = _shared_gpt(explicit)
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    groups = torch_embed.width_groups(model, idx)
    assert groups.attentions[0].value_dim == ("h.0.attn.v",)  # sdpa's v, or softmax(...) @ v
    row = {line.split()[0]: line for line in str(groups).splitlines()[1:]}
    assert "value head_dim of `h.0.attn`" in row["h.0.attn.v"]
    params = _params(model)
    with pytest.raises(ValueError) as err:
        torch_embed.widen(model, {alone: 6}, "split", example_inputs=idx)
    msg = str(err.value)
    assert "`h.0.attn.head_dim` (SharedAttention) sizes both" in msg
    assert "'h.0.attn.q[1]'" in msg and "'h.0.attn.v'" in msg
    assert "grow both to the same width in one call" in msg
    assert model.h[0].attn.head_dim == 4 and _unchanged(model, params)
    with pytest.raises(ValueError, match="same width in one call"):  # unequal widths
        torch_embed.widen(model, {"h.0.attn.v": 6, "h.0.attn.q[1]": 7}, "split", example_inputs=idx)
    assert _unchanged(model, params)


@pytest.mark.parametrize("explicit", [False, True])
def test_tests_gpt_both_head_dims_in_one_call_keep_logits(explicit: bool) -> None:
    model = _shared_gpt(explicit)
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    prompt = idx[:1, :3]
    with torch.no_grad():
        before = model(idx)
    tokens = greedy(model, prompt)
    widths = {f"h.{i}.attn.{g}": 7 for i in range(2) for g in ("v", "q[1]")}
    torch_embed.widen(model, widths, "split", example_inputs=idx)
    assert model.h[0].attn.head_dim == 7 and model.h[0].attn.v.weight.shape == (14, 8)
    with torch.no_grad():
        assert _rel(model(idx), before) <= 1e-10
    assert greedy(model, prompt) == tokens


def test_tests_gpt_value_viewed_by_minus_one_grows_alone() -> None:
    """The tests' GPT views v with ``-1``: the two groups stay independent."""
    torch.manual_seed(0)
    model = GPT().double()
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(idx)
    torch_embed.widen(model, {"h.0.attn.v": 6}, "split", example_inputs=idx)
    assert model.h[0].attn.head_dim == 4
    with torch.no_grad():
        assert _rel(model(idx), before) <= 1e-10


def test_tests_llama_value_head_dim_refused_under_rope() -> None:
    """v viewed by ``head_dim`` under RoPE: the query/key side is rigid, so is v's."""
    torch.manual_seed(0)
    model = Llama(layers=1).double()
    model.layers[0].self_attn.__class__ = SharedLlamaAttention
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    params = _params(model)
    with pytest.raises(ValueError) as err:
        torch_embed.widen(model, {"layers.0.self_attn.v_proj": 6}, "split", example_inputs=idx)
    msg = str(err.value)
    assert "`layers.0.self_attn.head_dim` (SharedLlamaAttention) sizes both" in msg
    assert "rotary embedding" in msg and "so neither can the value head_dim" in msg
    assert _unchanged(model, params)


def _hf_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32, n_inner=24,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_hf_gpt2_head_dims_one_call() -> None:
    model = _hf_gpt2()
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    qk, v = "transformer.h.0.attn.c_attn[1]", "transformer.h.0.attn.c_attn[2]"
    params = _params(model)
    for alone in (qk, v):
        with pytest.raises(
            ValueError, match=r"`transformer\.h\.0\.attn\.head_dim` \(GPT2Attention\)"
        ):
            torch_embed.widen(model, {alone: 10}, "split", example_inputs=(ids,))
        assert _unchanged(model, params)
    with torch.no_grad():
        before = model(ids).logits
    greedy_before = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with pytest.warns(UserWarning, match="config"):  # GPT-2's config: heads × head_dim = n_embd
        torch_embed.widen(model, {qk: 10, v: 10}, "split", example_inputs=(ids,))
    assert model.transformer.h[0].attn.head_dim == 10
    with torch.no_grad():
        assert _rel(model(ids).logits, before) <= 1e-10
    after = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(after, greedy_before)


def test_hf_llama_value_head_dim_refused() -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0,
        )
    ).double().eval()  # fmt: skip
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    params = _params(model)
    with pytest.raises(ValueError) as err:
        torch_embed.widen(
            model, {"model.layers.0.self_attn.v_proj": 6}, "split", example_inputs=(ids,)
        )
    msg = str(err.value)
    assert "`model.layers.0.self_attn.head_dim` (LlamaAttention) sizes both" in msg
    assert "'model.layers.0.self_attn.v_proj'" in msg and "rotary embedding" in msg
    assert _unchanged(model, params) and model.model.layers[0].self_attn.head_dim == 4


class OwnValueHeadDim(CausalSelfAttention):
    """v viewed by its own ``v_head_dim`` (MLA-like): the two head_dims are independent."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.v_head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_own_value_head_dim_attribute_grows_alone() -> None:
    torch.manual_seed(0)
    model = GPT(layers=1).double()
    model.h[0].attn.__class__ = OwnValueHeadDim
    model.h[0].attn.v_head_dim = 4
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(idx)
    torch_embed.widen(model, {"h.0.attn.v": 6}, "split", example_inputs=idx)
    assert model.h[0].attn.head_dim == 4 and model.h[0].attn.v_head_dim == 6
    with torch.no_grad():
        assert _rel(model(idx), before) <= 1e-10
