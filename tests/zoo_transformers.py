"""Small float64 transformers for the attention and residual-width tests.

Written here (no ``transformers``/``timm`` needed): a GPT (causal self-attention through
``scaled_dot_product_attention`` or an explicit ``softmax(q @ k^T * scale) @ v``, GELU
MLP, LayerNorm, optionally a head tied to the token embedding), a LLaMA-like decoder
(RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) and language models
around ``nn.TransformerEncoderLayer``/``DecoderLayer`` (``nn.MultiheadAttention``).
Each attention keeps its head counts in attributes (``n_head``, ``n_kv_head``,
``head_dim``) as user code does; ``widen`` patches them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "Llama", "TorchDecoderLM", "TorchEncoderLM", "ViT", "greedy"]


def _random_norms(model: nn.Module) -> None:
    """Non-trivial norms (the default init is γ = 1, β = 0, under which more maps pass)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm, WrittenRMSNorm)):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.1)


class CausalSelfAttention(nn.Module):
    """Separate q/k/v projections, ``n_head`` heads of ``head_dim``."""

    def __init__(self, d: int, n_head: int, head_dim: int, explicit: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.explicit = n_head, head_dim, explicit
        self.q = nn.Linear(d, n_head * head_dim)
        self.k = nn.Linear(d, n_head * head_dim)
        self.v = nn.Linear(d, n_head * head_dim)
        self.o = nn.Linear(n_head * head_dim, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_head, -1).transpose(1, 2)
        if self.explicit:  # nanoGPT's slow path: the scale computed from the size
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class GPTBlock(nn.Module):
    def __init__(self, d: int, n_head: int, head_dim: int, ffn: int, explicit: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head, head_dim, explicit)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, ffn)
        self.proj = nn.Linear(ffn, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """A pre-LN GPT: token + position embeddings, blocks, final LayerNorm, LM head."""

    def __init__(
        self,
        vocab: int = 11,
        ctx: int = 32,
        d: int = 8,
        n_head: int = 2,
        head_dim: int = 4,
        ffn: int = 12,
        layers: int = 2,
        explicit: bool = False,
        tied: bool = False,
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(GPTBlock(d, n_head, head_dim, ffn, explicit) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight
        _random_norms(self)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, t: int) -> tuple[Tensor, Tensor]:
        freqs = torch.outer(torch.arange(t, dtype=self.inv_freq.dtype), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()  # in the buffer's dtype (the model's, after .double())


class LlamaAttention(nn.Module):
    """Grouped-query attention (``n_head`` query heads, ``n_kv_head`` kv heads) with RoPE.

    ``kv``: how kv heads reach the query heads: ``"expand"`` (Hugging Face's
    ``repeat_kv``), ``"interleave"`` (``repeat_interleave``) or ``"gqa"``
    (``scaled_dot_product_attention(..., enable_gqa=True)``).
    """

    def __init__(
        self, d: int, n_head: int, n_kv_head: int, head_dim: int, kv: str = "expand"
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.kv = n_head, n_kv_head, head_dim, kv
        self.q_proj = nn.Linear(d, n_head * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv_head * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv_head * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, d, bias=False)
        self.rotary = RotaryEmbedding(head_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, -1).transpose(1, 2)
        cos, sin = self.rotary(t)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.n_head // self.n_kv_head
        if self.kv == "expand":  # HF's repeat_kv: expand, then merge
            k = k[:, :, None].expand(b, self.n_kv_head, rep, t, self.head_dim)
            v = v[:, :, None].expand(b, self.n_kv_head, rep, t, v.shape[-1])
            k = k.reshape(b, self.n_head, t, self.head_dim)
            v = v.reshape(b, self.n_head, t, -1)
        elif self.kv == "interleave":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = self.kv == "gqa"
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class WrittenRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm: ``w * x * rsqrt(mean(x²) + variance_epsilon)``."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def _rms_norm(d: int, written: bool) -> nn.Module:
    return WrittenRMSNorm(d) if written else nn.RMSNorm(d, eps=1e-6)


class LlamaBlock(nn.Module):
    def __init__(
        self, d: int, n_head: int, n_kv_head: int, head_dim: int, ffn: int, kv: str, written: bool
    ) -> None:
        super().__init__()
        self.input_layernorm = _rms_norm(d, written)
        self.self_attn = LlamaAttention(d, n_head, n_kv_head, head_dim, kv)
        self.post_attention_layernorm = _rms_norm(d, written)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """A LLaMA-like causal LM: RMSNorm, RoPE, GQA (4 query heads on 2 kv heads), SwiGLU.

    ``written_norm``: the RMSNorms written out as Hugging Face does (no ``rms_norm`` op).
    """

    def __init__(
        self,
        vocab: int = 11,
        d: int = 8,
        n_head: int = 4,
        n_kv_head: int = 2,
        head_dim: int = 4,
        ffn: int = 12,
        layers: int = 2,
        kv: str = "expand",
        written_norm: bool = False,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            LlamaBlock(d, n_head, n_kv_head, head_dim, ffn, kv, written_norm) for _ in range(layers)
        )
        self.norm = _rms_norm(d, written_norm)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        _random_norms(self)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class TorchEncoderLM(nn.Module):
    """Token embedding, ``nn.TransformerEncoderLayer`` s, a Linear head (mean over tokens)."""

    def __init__(
        self,
        vocab: int = 11,
        d: int = 8,
        n_head: int = 2,
        ffn: int = 12,
        layers: int = 2,
        norm_first: bool = False,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, n_head, ffn, dropout=0.0, batch_first=batch_first, norm_first=norm_first
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(d, 3)
        _random_norms(self)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx if self.batch_first else idx.t())
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class TorchDecoderLM(nn.Module):
    """An ``nn.TransformerDecoderLayer`` attending to an embedded memory sequence."""

    def __init__(
        self, vocab: int = 11, d: int = 8, n_head: int = 2, ffn: int = 12, norm_first: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerDecoderLayer(
            d, n_head, ffn, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(d, vocab)
        _random_norms(self)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), diagonal=1)
        return self.head(self.layer(x, x.flip(1), tgt_mask=mask))


class ViT(nn.Module):
    """A pre-norm ViT: conv patches, a cls token, a learned position embedding."""

    def __init__(self, d: int = 8, n_head: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, n_head, 2 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)
        _random_norms(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def greedy(model: nn.Module, prompt: Tensor, steps: int = 20) -> list[int]:
    """Greedy generation of ``steps`` tokens (the argmax of the last position's logits)."""
    idx = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
    return idx[0, prompt.shape[1] :].tolist()
