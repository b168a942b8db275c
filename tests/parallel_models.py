"""Tiny models for the parallel-memory checks (module-level factories: the ranks of a real
torch.distributed run import them by path, e.g. "tests/parallel_models.py:gpt2_style")."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GPT2Block(nn.Module):
    """GPT-2's block with separate q, k, v linears (PyTorch's ColwiseParallel shards nn.Linear)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        B, S, D = x.shape
        h = self.ln_1(x)
        q, k, v = (lin(h).view(B, S, -1, D // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, -1))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class GPT2Style(nn.Module):
    """Learned positions, pre-norm blocks, a final norm and an untied head."""

    def __init__(self, d: int = 64, layers: int = 4, heads: int = 4, vocab: int = 512, context: int = 1024):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.h = nn.ModuleList([GPT2Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2_style():
    return GPT2Style()


def llama_style():
    """Hugging Face's Llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention), 4 layers."""
    import transformers
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=1024, use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


class ConvBlock(nn.Module):
    """A residual block: 3x3 conv, batch norm, ReLU, 3x3 conv, batch norm, then the skip."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ConvNet(nn.Module):
    """A stem, four identical residual blocks, pooling and a linear classifier."""

    def __init__(self, c: int = 32, blocks: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList([ConvBlock(c) for _ in range(blocks)])
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def conv_net():
    return ConvNet()
