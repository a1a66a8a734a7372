"""A small model with gemma_pytorch's layout and interfaces, for the tests (gemma_pytorch is not on PyPI).

What the integration depends on is reproduced: an ``Embedding`` with ``weight`` (int8 plus a per-row
``weight_scaler`` when ``quant``), decoder layers with an ``attn_type`` whose forward takes
``(hidden_states, freqs_cis, kv_write_indices, kv_cache, mask, local_mask)`` and writes the kv cache in
place, ``model.norm``, rotary tables ``freqs_cis`` (or ``local_freqs_cis``/``global_freqs_cis`` for
Gemma 3), a ``@torch.no_grad`` causal-LM forward that needs kv caches and masks and returns
``(next_tokens, logits)`` at ``output_positions``, and a sampler that multiplies by ``embedder.weight``.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
import torch.nn.functional as F
from torch import nn


class AttentionType(enum.Enum):
    GLOBAL = 1
    LOCAL_SLIDING = 2


@dataclasses.dataclass
class Config:
    vocab_size: int = 1024
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 16
    max_position_embeddings: int = 64
    rms_norm_eps: float = 1e-6
    quant: bool = False
    architecture: str = "gemma2"  # gemma1 | gemma2 | gemma3
    sliding_window_size: int | None = 8
    final_logit_softcapping: float | None = 30.0
    attn_types: tuple = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)


def _quantisable(shape, quant: bool):
    if quant:
        weight = nn.Parameter(torch.randint(-127, 128, shape, dtype=torch.int8), requires_grad=False)
        return weight, nn.Parameter(torch.rand(shape[0]) * 0.02 + 0.005)
    return nn.Parameter(torch.randn(shape) * 0.5, requires_grad=False), None


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, quant: bool):
        super().__init__()
        self.weight, scaler = _quantisable((num_embeddings, embedding_dim), quant)
        if quant:
            self.weight_scaler = scaler
        self.quant = quant

    def forward(self, x):
        weight = self.weight * self.weight_scaler.unsqueeze(-1) if self.quant else self.weight
        return F.embedding(x, weight)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, quant: bool):
        super().__init__()
        self.weight, scaler = _quantisable((out_features, in_features), quant)
        if quant:
            self.weight_scaler = scaler
        self.quant = quant

    def forward(self, x):
        weight = self.weight * self.weight_scaler.unsqueeze(-1) if self.quant else self.weight
        return F.linear(x, weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1 + self.weight.float())).type_as(x)


def rotary_table(head_dim: int, length: int, theta: float = 10_000.0) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), inv)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, Dh); the halves of the head dim are the real and imaginary parts."""
    halves = torch.stack(torch.chunk(x.float(), 2, dim=-1), dim=-1)
    rotated = torch.view_as_real(torch.view_as_complex(halves.contiguous()) * table[None, :, None, :])
    return torch.cat(torch.unbind(rotated, dim=-1), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv_proj = Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, config.quant)
        self.o_proj = Linear(self.heads * self.head_dim, config.hidden_size, config.quant)

    def forward(self, hidden_states, freqs_cis, kv_write_indices, kv_cache, mask):
        batch, length, _ = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = rotate(q.view(batch, length, self.heads, self.head_dim), freqs_cis)
        k = rotate(k.view(batch, length, self.kv_heads, self.head_dim), freqs_cis)
        v = v.view(batch, length, self.kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(1, kv_write_indices, k)
        v_cache.index_copy_(1, kv_write_indices, v)
        repeat = self.heads // self.kv_heads
        keys = k_cache.repeat_interleave(repeat, dim=2).transpose(1, 2)
        values = v_cache.repeat_interleave(repeat, dim=2).transpose(1, 2)
        scores = (q.transpose(1, 2) * self.head_dim ** -0.5) @ keys.transpose(2, 3) + mask
        out = F.softmax(scores.float(), dim=-1).type_as(q) @ values
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, attn_type: AttentionType):
        super().__init__()
        self.attn_type = attn_type
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, config.quant)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config.quant)

    def forward(self, hidden_states, freqs_cis, kv_write_indices, kv_cache, mask, local_mask):
        if self.attn_type == AttentionType.LOCAL_SLIDING and local_mask is not None:
            mask = local_mask
        attended = self.self_attn(self.input_layernorm(hidden_states), freqs_cis, kv_write_indices, kv_cache, mask)
        hidden_states = hidden_states + attended
        mlp = self.down_proj(F.gelu(self.gate_proj(self.post_attention_layernorm(hidden_states)), approximate="tanh"))
        return hidden_states + mlp


class Model(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        types = [AttentionType.GLOBAL] if config.architecture == "gemma1" else list(config.attn_types)
        self.layers = nn.ModuleList(DecoderLayer(config, types[i % len(types)])
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, freqs_cis, kv_write_indices, kv_caches, mask, local_mask):
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            hidden_states = layer(hidden_states, freqs_cis[layer.attn_type], kv_write_indices, cache, mask, local_mask)
        return self.norm(hidden_states)


class Sampler(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    @torch.no_grad()
    def forward(self, embedding, hidden_states, output_positions, temperatures, top_ps, top_ks):
        hidden_states = hidden_states.index_select(1, output_positions).squeeze(dim=1)
        logits = hidden_states @ embedding.t()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.argmax(dim=-1), logits  # greedy: the tests pass temperatures=None


class CausalLM(nn.Module):
    """gemma_pytorch's ``GemmaForCausalLM`` layout; ``multimodal=True`` names the table as Gemma 3's multimodal model
    does."""

    def __init__(self, config: Config, *, multimodal: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.embedder_name = "text_token_embedder" if multimodal else "embedder"
        setattr(self, self.embedder_name, Embedding(config.vocab_size, config.hidden_size, config.quant))
        self.model = Model(config)
        self.sampler = Sampler(config)
        table = rotary_table(config.head_dim, config.max_position_embeddings * 2)
        if config.architecture == "gemma3":
            self.register_buffer("local_freqs_cis", table)
            self.register_buffer("global_freqs_cis", rotary_table(config.head_dim, config.max_position_embeddings * 2,
                                                                  theta=1_000_000.0))
        else:
            self.register_buffer("freqs_cis", table)

    @torch.no_grad()
    def forward(self, input_token_ids, input_positions, kv_write_indices, kv_caches, mask, output_positions,
                temperatures, top_ps, top_ks, local_mask=None):
        if self.config.architecture == "gemma3":
            local, glob = self.local_freqs_cis, self.global_freqs_cis
        else:
            local = glob = self.freqs_cis
        freqs = {AttentionType.LOCAL_SLIDING: local.index_select(0, input_positions),
                 AttentionType.GLOBAL: glob.index_select(0, input_positions)}
        embedder = getattr(self, self.embedder_name)
        hidden = embedder(input_token_ids)
        hidden = hidden * torch.tensor(self.config.hidden_size ** 0.5, dtype=hidden.dtype)
        hidden = self.model(hidden, freqs, input_positions if kv_write_indices is None else kv_write_indices,
                            kv_caches, mask, local_mask)
        weight = embedder.weight
        if self.config.quant:
            weight = weight * embedder.weight_scaler.unsqueeze(-1)
        return self.sampler(weight, hidden, output_positions, temperatures, top_ps, top_ks)


def prefill_logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The model's own (no-grad) forward over a whole prompt: logits at its last position, as generate() gets them."""
    batch, length = ids.shape
    config = model.config
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    mask = torch.triu(torch.full((1, 1, length, length), -2.3819763e38), diagonal=1)
    local = None
    if config.sliding_window_size:
        local = mask + torch.tril(torch.full((1, 1, length, length), -2.3819763e38),
                                  diagonal=-config.sliding_window_size)
    positions = torch.arange(length)
    _, logits = model(ids, positions, None, caches, mask, torch.tensor([length - 1]), None, None, None, local)
    return logits
