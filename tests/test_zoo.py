"""The zoo: shipped config.json files, exact published parameter counts, built on the meta device
(no weights allocated)."""

import json
import tomllib
from pathlib import Path

import pytest
import torch

import costmodel
from costmodel.capture.zoo import CONFIGS, ZOO, get
from costmodel.errors import UsageError

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.filterwarnings("ignore:.*does not support SDPA")   # gemma-2-9b: eager attention, said on build
def test_parameter_counts_are_exact(name):
    with torch.device("meta"):
        model = ZOO[name].build()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == ZOO[name].params


def test_published_counts():
    assert ZOO["llama-2-7b"].params == 6_738_415_616
    assert ZOO["gpt2"].params == 124_439_808
    # Llama 3 8B: embeddings and LM head 2 * 128,256*4,096 = 1,050,673,152; per layer q, o 2 * 4,096^2,
    # k, v 2 * 4,096*1,024, MLP 3 * 4,096*14,336, 2 norms = 218,112,000; 32 layers; final norm 4,096
    assert ZOO["llama-3-8b"].params == 1_050_673_152 + 32 * 218_112_000 + 4_096 == 8_030_261_248
    # Mistral 7B: vocabulary 32,000, else the same shapes as Llama 3 8B
    assert ZOO["mistral-7b"].params == 2 * 32_000 * 4_096 + 32 * 218_112_000 + 4_096 == 7_241_732_096
    # Mixtral 8x7B: attention 41,943,040, 8 experts * 176,160,768, router 4,096*8, 2 norms per layer
    assert ZOO["mixtral-8x7b"].params == (2 * 32_000 * 4_096 + 32 * (41_943_040 + 8 * 176_160_768 + 32_768 + 8_192)
                                          + 4_096) == 46_702_792_704
    # Qwen2.5 7B: q 3,584^2 + 3,584 bias, k, v 2 * (3,584*512 + 512), o 3,584^2, MLP 3 * 3,584*18,944,
    # 2 norms = 233,057,792 per layer; 28 layers; untied 152,064-token embeddings and head
    assert ZOO["qwen2.5-7b"].params == 2 * 152_064 * 3_584 + 28 * 233_057_792 + 3_584 == 7_615_616_512
    # Gemma 2 9B: tied embeddings 256,000*3,584 counted once; per layer q, o 2 * 3,584*4,096, k, v
    # 2 * 3,584*2,048, MLP 3 * 3,584*14,336, 4 norms = 198,195,200; 42 layers
    assert ZOO["gemma-2-9b"].params == 256_000 * 3_584 + 42 * 198_195_200 + 3_584 == 9_241_705_984
    # Phi-3 mini 4K: fused qkv 3,072*9,216, o 3,072^2, fused gate/up 3,072*16,384, down 8,192*3,072,
    # 2 norms = 113,252,352 per layer; 32 layers; untied 32,064-token embeddings and head
    assert ZOO["phi-3-mini"].params == 2 * 32_064 * 3_072 + 32 * 113_252_352 + 3_072 == 3_821_079_552


def test_existing_names_keep_their_default_inputs():
    text, image224 = ("input_ids:int64[batch,seq]",), ("pixel_values:float32[batch,3,224,224]",)
    expected = {"gpt2": text, "gpt2-xl": text, "bert-base": text, "bert-large": text,
                "t5-base": ("input_ids:int64[batch,seq]", "decoder_input_ids:int64[batch,seq]"),
                "vit-base": image224, "resnet-50": ("pixel_values:float32[batch,3,height,width]",),
                "llama-2-7b": text, "llama-2-70b": text, "mistral-7b": text}
    assert {name: ZOO[name].inputs for name in expected} == expected


def test_every_entry_is_a_shipped_config_json():
    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == sorted(ZOO)
    for name in ZOO:
        config = json.loads(ZOO[name].config_path.read_text())
        assert config["model_type"] and len(config["architectures"]) == 1, name


def test_pyproject_ships_the_zoo_configs():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "costmodel.capture" in setuptools["packages"]
    assert setuptools["package-data"]["costmodel.capture"] == ["zoo_configs/*.json"]


def test_zoo_config_path_is_the_same_model_as_the_zoo_name():
    by_path = costmodel.analyze(str(ZOO["gpt2"].config_path))
    assert by_path.params == ZOO["gpt2"].params
    assert [str(i) for i in by_path.inputs] == list(ZOO["gpt2"].inputs)


def test_unknown_name_suggests_nearest():
    with pytest.raises(UsageError, match="Did you mean llama-2-7b"):
        get("llama2-7b")
    with pytest.raises(UsageError, match="Did you mean llama-3-8b"):
        get("llama3-8b")
    with pytest.raises(UsageError, match="hf:ORG/NAME, a config.json"):
        get("no-such-model")


def test_zoo_model_analyzes_with_default_inputs():
    report = costmodel.analyze("bert-base")
    assert report.params == 109_482_240
    assert report.complexity["seq"]["matmul_flops"] == 2 and report.unsupported == {}
