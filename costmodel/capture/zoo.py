"""Built-in models: Hugging Face configs shipped in costmodel/zoo_configs/ (one config.json each,
from the published checkpoint), built by `transformers` on the meta device like any `hf:` model
or config path, with the default inputs that config implies. Parameter counts are the published ones."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch.nn as nn

from costmodel.errors import UsageError

CONFIGS = Path(__file__).parent / "zoo_configs"


@dataclass(frozen=True)
class ZooModel:
    name: str                   # also the config's file name: zoo_configs/NAME.json
    description: str
    params: int                 # the published parameter count, checked by the tests
    source: str                 # the Hub repository whose config.json this is

    @property
    def config_path(self) -> Path:
        return CONFIGS / f"{self.name}.json"

    @cached_property
    def hf(self):
        """The config resolved to its transformers class and default inputs (imports transformers)."""
        from costmodel.capture.hf import from_file
        return from_file(str(self.config_path), self.name)

    @property
    def build(self) -> Callable[[], nn.Module]:
        return self.hf.build

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.hf.inputs

    @property
    def default_dims(self) -> dict[str, int]:
        """Sizes used for dimensions the user gives no value (see hf.HFModel.default_dims)."""
        return self.hf.default_dims


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


# Each config is the repository's config.json, but for: bert-base/-large build the encoder
# (BertModel; the checkpoints name BertForMaskedLM); resnet-50 gives num_labels for its 1000-entry
# id2label; phi-3-mini drops the auto_map to remote code that transformers has built in (Phi3).
ZOO: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("gpt2", "GPT-2 small, 12 layers, d=768", 124_439_808, "openai-community/gpt2"),
    ZooModel("gpt2-xl", "GPT-2 XL, 48 layers, d=1600", 1_557_611_200, "openai-community/gpt2-xl"),
    ZooModel("bert-base", "BERT base uncased encoder, 12 layers", 109_482_240, "google-bert/bert-base-uncased"),
    ZooModel("bert-large", "BERT large uncased encoder, 24 layers", 335_141_888, "google-bert/bert-large-uncased"),
    ZooModel("t5-base", "T5 base encoder-decoder, 12+12 layers", 222_903_552, "google-t5/t5-base"),
    ZooModel("vit-base", "ViT-B/16 at 224x224", 86_389_248, "google/vit-base-patch16-224-in21k"),
    ZooModel("resnet-50", "ResNet-50 image classifier, 1000 classes", 25_557_032, "microsoft/resnet-50"),
    ZooModel("llama-2-7b", "Llama 2 7B decoder, 32 layers, MHA", 6_738_415_616, "meta-llama/Llama-2-7b-hf"),
    ZooModel("llama-2-70b", "Llama 2 70B decoder, 80 layers, GQA (8 KV heads)", 68_976_648_192,
             "meta-llama/Llama-2-70b-hf"),
    ZooModel("mistral-7b", "Mistral 7B decoder, 32 layers, GQA, sliding window 4096", 7_241_732_096,
             "mistralai/Mistral-7B-v0.1"),
    ZooModel("llama-3-8b", "Llama 3 8B decoder, 32 layers, GQA (8 KV heads), 128K vocabulary", 8_030_261_248,
             "meta-llama/Meta-Llama-3-8B"),
    ZooModel("mixtral-8x7b", "Mixtral 8x7B mixture of experts, 32 layers, 8 experts, top-2", 46_702_792_704,
             "mistralai/Mixtral-8x7B-v0.1"),
    ZooModel("qwen2.5-7b", "Qwen2.5 7B decoder, 28 layers, GQA (4 KV heads), QKV biases", 7_615_616_512,
             "Qwen/Qwen2.5-7B"),
    ZooModel("gemma-2-9b", "Gemma 2 9B decoder, 42 layers, GQA, tied embeddings, eager attention (softcapping)",
             9_241_705_984, "google/gemma-2-9b"),
    ZooModel("phi-3-mini", "Phi-3 mini 4K decoder, 32 layers, fused QKV and gate/up", 3_821_079_552,
             "microsoft/Phi-3-mini-4k-instruct"),
]}


def get(name: str) -> ZooModel:
    if name in ZOO:
        return ZOO[name]
    near = difflib.get_close_matches(name, list(ZOO), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise UsageError(f"unknown model {name!r}: not a zoo name, hf:ORG/NAME, a config.json (or a directory "
                     f"holding one), FILE.py:FUNC or package.module:FUNC."
                     f"{hint} Zoo models: {', '.join(ZOO)}.")
