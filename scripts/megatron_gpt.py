"""A GPT as Megatron-LM builds it, for the published-reference benchmarks (Korthikanti et al. 2022,
arXiv:2205.05198): learned positions, pre-norm blocks with one fused QKV linear, attention with
dropout on the probabilities, a 4h GeLU MLP, dropout after each sublayer and on the embeddings, a
final norm and an output layer tied to the word embeddings.

    gpt(hidden=6144, layers=48, heads=64)        # the paper's 22B
    gpt(hidden=12288, layers=96, heads=96)       # GPT-3 175B

Costmodel captures it like any model (`costmodel analyze scripts/megatron_gpt.py:gpt_22b ...`);
nothing in the analysis knows it is a GPT.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


class CoreAttention(nn.Module):
    """Megatron's core attention: scores by a batched matmul in the model's dtype, the scaled and
    masked softmax (its output kept for the backward), dropout on the probabilities, a batched
    matmul with V. The softmax, its dropout mask and the dropped probabilities are the
    5 * a * s^2 * b bytes of Korthikanti et al.'s count."""

    def __init__(self, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)

    def forward(self, q, k, v):
        S, D = q.shape[-2], q.shape[-1]
        scores = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5                 # [b, a, s, s]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
        probs = self.drop(torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1))
        return torch.matmul(probs, v)                                              # [b, a, s, d]


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.core = CoreAttention(dropout)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        B, S, H = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(self.core(q, k, v).transpose(1, 2).reshape(B, S, H))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, dropout)
        self.ln_2 = nn.LayerNorm(hidden)
        self.fc_1 = nn.Linear(hidden, 4 * hidden)
        self.fc_2 = nn.Linear(4 * hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.fc_2(F.gelu(self.fc_1(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, vocab: int = 51200, context: int = 2048,
                 dropout: float = 0.1):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(context, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(hidden, heads, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(hidden)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)      # output layer tied to the embeddings


def gpt(hidden: int, layers: int, heads: int, vocab: int = 51200, context: int = 2048) -> GPT:
    return GPT(hidden, layers, heads, vocab, context)


gpt_22b = functools.partial(gpt, hidden=6144, layers=48, heads=64)
gpt3_175b = functools.partial(gpt, hidden=12288, layers=96, heads=96)
