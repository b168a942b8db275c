"""Random small models for the property test: stacks of linear, conv, norm, attention, activation
and residual blocks, described by plain data (so a failing example prints as a spec to paste)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = (t.reshape(B, S, self.heads, D // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(D, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(a.transpose(1, 2).reshape(B, S, D))


class Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


def _token_block(kind: str, d: int, arg: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d, d)
    if kind == "norm":
        return nn.LayerNorm(d)
    if kind == "attention":
        return Attention(d, heads=arg, causal=bool(d % 2))
    if kind == "mlp":
        return Residual(nn.Sequential(nn.Linear(d, arg * d), nn.GELU(), nn.Linear(arg * d, d)))
    if kind == "residual-attention":
        return Residual(nn.Sequential(nn.LayerNorm(d), Attention(d, heads=arg, causal=True)))
    return ACTIVATIONS[kind]()


def _image_block(kind: str, c: int, arg: int) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(c, c, 2 * arg + 1, padding=arg)
    if kind == "depthwise":
        return nn.Conv2d(c, c, 3, padding=1, groups=c)
    if kind == "norm":
        return nn.BatchNorm2d(c) if arg % 2 else nn.GroupNorm(2, c)
    if kind == "residual-conv":
        return Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1)))
    if kind == "pool":
        return nn.MaxPool2d(2) if arg % 2 else nn.AvgPool2d(2)
    return ACTIVATIONS[kind]()


class RandomNet(nn.Module):
    """spec = {"family": "tokens" | "images", "width": d or channels, "blocks": [[kind, arg], ...]}.
    Tokens: x [batch, seq, width] -> blocks -> a linear head. Images: x [batch, 3, size, size] ->
    a stem conv to `width` channels -> blocks -> mean over space -> a linear head."""

    def __init__(self, spec: dict):
        super().__init__()
        self.family, d = spec["family"], spec["width"]
        make = _token_block if self.family == "tokens" else _image_block
        self.stem = nn.Identity() if self.family == "tokens" else nn.Conv2d(3, d, 3, padding=1)
        self.blocks = nn.Sequential(*[make(kind, d, arg) for kind, arg in spec["blocks"]])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.blocks(self.stem(x))
        if self.family == "images":
            h = h.mean((2, 3))
        return self.head(h)


TOKEN_KINDS = ["linear", "norm", "attention", "mlp", "residual-attention", *ACTIVATIONS]
IMAGE_KINDS = ["conv", "depthwise", "norm", "residual-conv", "pool", *ACTIVATIONS]


def inputs_of(spec: dict) -> list[str]:
    if spec["family"] == "tokens":
        return [f"x:float32[batch,seq,{spec['width']}]"]
    return ["x:float32[batch,3,size,size]"]


def module_source(spec: dict) -> str:
    """A FILE.py body whose `build()` makes this net (the CLI takes models as FILE.py:FUNC)."""
    return f"from tests.random_nets import RandomNet\n\n\ndef build():\n    return RandomNet({spec!r})\n"

