"""Small models for the tests: real Hugging Face architectures from tiny configs, and hand-written
modules. Factories only: costmodel calls them under the meta device."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


from costmodel.capture.zoo import hf_factory as _hf


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
# Mistral-style GQA decoder whose layers attend to a sliding window of 8 tokens (the cache keeps 7)
tiny_mistral_window = _hf("MistralForCausalLM", "MistralConfig", hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                          max_position_embeddings=512, sliding_window=8)


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


class SlicedPositions(nn.Module):
    """BERT's position handling by hand: a 256-entry buffer sliced to the sequence and expanded.
    Past 256 the real model fails (the expand), and the capture records seq <= 256 from the slice."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(100, 32)
        self.positions = nn.Embedding(256, 32)
        self.register_buffer("position_ids", torch.arange(256).expand(1, -1), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, 256, dtype=torch.long), persistent=False)
        self.types = nn.Embedding(2, 32)
        self.out = nn.Linear(32, 32)

    def forward(self, ids):
        B, S = ids.shape
        types = self.token_type_ids[:, :S].expand(B, S)
        return self.out(self.tokens(ids) + self.positions(self.position_ids[:, :S]) + self.types(types))


class AudioConv(nn.Module):
    """A 1-D conv stack over raw samples: it needs at least 104 of them."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv1d(1, 16, 80, stride=4), nn.ReLU(), nn.Conv1d(16, 32, 3, stride=2),
                                   nn.ReLU(), nn.Conv1d(32, 32, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.convs(x).mean(-1))


class Patches(nn.Module):
    """Cuts images into 16 x 16 patches with a view: height and width must be multiples of 16."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3 * 16 * 16, 64)

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.view(B, C, H // 16, 16, W // 16, 16).permute(0, 2, 4, 1, 3, 5)
        return self.embed(x.reshape(B, (H // 16) * (W // 16), C * 256))


class TokenBudget(nn.Module):
    """Refuses more than 4096 tokens in a batch: a limit on batch * seq, which no one-dimension
    bound expresses; past it the capture fails."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        if x.shape[0] * x.shape[1] > 4096:
            raise ValueError("at most 4096 tokens per batch")
        return self.lin(x)


class ConvNeXtBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        return x + self.down(F.gelu(self.up(self.norm(y)))).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A ConvNeXt-style net: patchify stem (stride 4), depthwise 7x7 blocks, a downsampling conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, stride=4)
        self.stage1 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.down = nn.Conv2d(32, 64, 2, stride=2)
        self.stage2 = ConvNeXtBlock(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))).mean((2, 3)))


tiny_distilbert_classifier = _hf("DistilBertForSequenceClassification", "DistilBertConfig", dim=64, hidden_dim=128,
                                 n_layers=2, n_heads=4, dropout=0.1, attention_dropout=0.1, vocab_size=256,
                                 max_position_embeddings=128)


_LONG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=4096)
long_llama = _hf("LlamaForCausalLM", "LlamaConfig", **_LONG)
long_mistral_window = _hf("MistralForCausalLM", "MistralConfig", sliding_window=256, **_LONG)
long_gpt2_eager = _hf("GPT2LMHeadModel", "GPT2Config", attention="eager", n_embd=64, n_layer=2, n_head=4,
                      vocab_size=128, n_positions=4096)


# --- architectures whose capture needs more than a plain trace (tests/test_coverage.py) ----------

_MOE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=256)
mixtral_eager = _hf("MixtralForCausalLM", "MixtralConfig", attention="eager", experts_implementation="eager",
                    num_local_experts=4, num_experts_per_tok=2, **_MOE)
mixtral_grouped = _hf("MixtralForCausalLM", "MixtralConfig", attention="eager", experts_implementation="grouped_mm",
                      num_local_experts=4, num_experts_per_tok=2, **_MOE)
qwen_moe_eager = _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", attention="eager", experts_implementation="eager",
                     moe_intermediate_size=16, shared_expert_intermediate_size=48, num_experts=4,
                     num_experts_per_tok=2, **_MOE)
bloom = _hf("BloomForCausalLM", "BloomConfig", attention="eager", hidden_size=32, n_layer=2, n_head=4, vocab_size=64)
swin = _hf("SwinForImageClassification", "SwinConfig", attention=None, image_size=32, patch_size=4, embed_dim=8,
           depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=5)


class GRUTagger(nn.Module):
    """A bidirectional 2-layer GRU over token embeddings, tagging each position."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.gru = nn.GRU(8, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(24, 5)

    def forward(self, ids):
        return self.out(self.gru(self.emb(ids))[0])


class UNet(nn.Module):
    """Two poolings down, two nearest upsamplings (F.interpolate, scale 2) up, skip concatenations."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.d1, self.d2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 2 * c, 3, padding=1)
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.u2, self.u1 = nn.Conv2d(4 * c, c, 3, padding=1), nn.Conv2d(2 * c, c, 3, padding=1)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        a = F.relu(self.d1(x))
        b = F.relu(self.d2(F.max_pool2d(a, 2)))
        m = F.interpolate(F.relu(self.mid(F.max_pool2d(b, 2))), scale_factor=2.0)
        u = F.interpolate(F.relu(self.u2(torch.cat([m, b], 1))), scale_factor=2.0)
        return self.out(F.relu(self.u1(torch.cat([u, a], 1))))


class CNNMLP(nn.Module):
    """A small image classifier (conv, pool, MLP head) for --loss cross-entropy with --target labels."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.mlp(F.relu(self.conv(x)).mean((2, 3)))


class MHAPadded(nn.Module):
    """nn.MultiheadAttention with a key_padding_mask input."""

    def __init__(self):
        super().__init__()
        self.m = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, pad):
        return self.m(x, x, x, key_padding_mask=pad)[0]


class CausalTCN(nn.Module):
    """WaveNet-style stack: causal dilated 1-D convolutions (F.pad on the left, then the convolution),
    gated tanh * sigmoid, residual and skip sums."""

    def __init__(self, channels: int = 8, layers: int = 3, classes: int = 16):
        super().__init__()
        self.inp = nn.Conv1d(1, channels, 1)
        self.filt = nn.ModuleList(nn.Conv1d(channels, channels, 2, dilation=2 ** i) for i in range(layers))
        self.gate = nn.ModuleList(nn.Conv1d(channels, channels, 2, dilation=2 ** i) for i in range(layers))
        self.out = nn.Conv1d(channels, classes, 1)

    def forward(self, x):
        x = self.inp(x)
        skip = 0
        for i, (f, g) in enumerate(zip(self.filt, self.gate)):
            h = F.pad(x, (2 ** i, 0))
            z = torch.tanh(f(h)) * torch.sigmoid(g(h))
            skip = skip + z
            x = x + z
        return self.out(F.relu(skip))
