"""Built-in models: real architectures that Hugging Face `transformers` builds from a config
(no download), with their default inputs. Parameter counts match the published checkpoints."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .errors import UsageError


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: tuple[str, ...]
    description: str
    params: int  # the published parameter count, checked by the tests


def hf_factory(model_cls: str, config_cls: str, attention: str | None = "sdpa", **config) -> Callable[[], nn.Module]:
    """A factory that builds a Hugging Face `transformers` model from a config (no download):
    hf_factory("GPT2LMHeadModel", "GPT2Config", n_layer=2). Decoders get use_cache=False, so
    they return plain tensors; attention goes through SDPA unless `attention` says otherwise."""
    def build() -> nn.Module:
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        if attention:
            cfg._attn_implementation = attention
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
        return getattr(transformers, model_cls)(cfg)
    build.__name__ = model_cls
    return build


_hf = hf_factory


_TEXT = ("input_ids:int64[batch,seq]",)
_IMAGE_224 = ("pixel_values:float32[batch,3,224,224]",)
_IMAGE = ("pixel_values:float32[batch,3,height,width]",)

_LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)

ZOO: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("gpt2", _hf("GPT2LMHeadModel", "GPT2Config"), _TEXT, "GPT-2 small, 12 layers, d=768", 124_439_808),
    ZooModel("gpt2-xl", _hf("GPT2LMHeadModel", "GPT2Config", n_embd=1600, n_layer=48, n_head=25), _TEXT,
             "GPT-2 XL, 48 layers, d=1600", 1_557_611_200),
    ZooModel("bert-base", _hf("BertModel", "BertConfig"), _TEXT, "BERT base uncased encoder, 12 layers",
             109_482_240),
    ZooModel("bert-large", _hf("BertModel", "BertConfig", hidden_size=1024, num_hidden_layers=24,
                               num_attention_heads=16, intermediate_size=4096), _TEXT,
             "BERT large uncased encoder, 24 layers", 335_141_888),
    ZooModel("t5-base", _hf("T5ForConditionalGeneration", "T5Config", d_model=768, d_ff=3072, num_layers=12,
                            num_heads=12, d_kv=64, vocab_size=32128),
             ("input_ids:int64[batch,seq]", "decoder_input_ids:int64[batch,seq]"),
             "T5 base encoder-decoder, 12+12 layers", 222_903_552),
    ZooModel("vit-base", _hf("ViTModel", "ViTConfig"), _IMAGE_224, "ViT-B/16 at 224x224", 86_389_248),
    ZooModel("resnet-50", _hf("ResNetForImageClassification", "ResNetConfig", attention=None, num_labels=1000), _IMAGE,
             "ResNet-50 image classifier, 1000 classes", 25_557_032),
    ZooModel("llama-2-7b", _hf("LlamaForCausalLM", "LlamaConfig", **_LLAMA_7B), _TEXT,
             "Llama 2 7B decoder, 32 layers, MHA", 6_738_415_616),
    ZooModel("llama-2-70b", _hf("LlamaForCausalLM", "LlamaConfig", **(_LLAMA_7B | dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8))), _TEXT, "Llama 2 70B decoder, 80 layers, GQA (8 KV heads)", 68_976_648_192),
    ZooModel("mistral-7b", _hf("MistralForCausalLM", "MistralConfig", hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               vocab_size=32000, max_position_embeddings=32768, sliding_window=4096), _TEXT,
             "Mistral 7B decoder, 32 layers, GQA, sliding window 4096", 7_241_732_096),
]}


def get(name: str) -> ZooModel:
    if name in ZOO:
        return ZOO[name]
    near = difflib.get_close_matches(name, list(ZOO), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise UsageError(f"unknown model {name!r}: not a zoo name, and not FILE.py:FUNC or package.module:FUNC."
                     f"{hint} Zoo models: {', '.join(ZOO)}.")
