"""Small models for the tests: real Hugging Face architectures from tiny configs, and hand-written
modules. Factories only: costmodel calls them under the meta device."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


from costmodel.zoo import hf_factory as _hf


tiny_llama_gqa = _hf("LlamaForCausalLM", "LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
tiny_bert = _hf("BertModel", "BertConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=256, max_position_embeddings=512)
tiny_t5 = _hf("T5ForConditionalGeneration", "T5Config", d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
              vocab_size=256)
tiny_vit = _hf("ViTModel", "ViTConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, image_size=32, patch_size=8)
tiny_resnet = _hf("ResNetForImageClassification", "ResNetConfig", attention=None, embedding_size=16,
                  hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=10)
tiny_gpt2 = _hf("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=512)


class SDPABlock(nn.Module):
    """A hand-written pre-norm transformer block over float features, calling SDPA directly."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm(x)).split(D, dim=-1)
        q, k, v = (t.reshape(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(x)


def sdpa_block():
    return SDPABlock()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv2(F.relu(self.bn(self.conv1(x))))))
        return self.head(x.mean(dim=(2, 3)))


def conv_net():
    return ConvNet()


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.m(x, x, x)[0]


class LSTM(nn.Module):
    """Unrolls over the sequence in Python: the capture pins seq, and each point is captured."""

    def __init__(self):
        super().__init__()
        self.m = nn.LSTM(16, 32, num_layers=2, batch_first=True)

    def forward(self, x):
        return self.m(x)[0]


class EinsumHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        return torch.einsum("bsd,de->bse", x, self.w).softmax(-1)


class ConvTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1, output_padding=1)
        self.mix = nn.Conv1d(8, 8, 5, groups=4)

    def forward(self, x):
        return self.mix(self.up(x).flatten(2))


def torch_encoder():
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
