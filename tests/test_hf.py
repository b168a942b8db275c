"""Hugging Face configs as MODEL: config.json paths and directories, hf:ORG/NAME from the Hub cache
(a temporary HF_HOME laid out as huggingface_hub lays it out), offline errors, remote code, and the
default inputs of each modality. Nothing touches the network: the Hub cache is built by hand."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch

import costmodel
from costmodel.capture import hf
from costmodel.capture.trace import load_model
from costmodel.cli import main
from costmodel.errors import UsageError
from tests import models

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_DIR = FIXTURES / "tiny-llama"                 # hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 256
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
b, s = sympy.symbols("batch seq", integer=True, positive=True)

# tiny-llama: per layer q 64*64 + k, v 2 * 64*32 + o 64*64 + MLP 3 * 64*128 + 2 norms * 64 = 36,992;
# 2 layers = 73,984; embeddings and LM head (untied) 2 * 256*64 = 32,768; final norm 64.
TINY_LLAMA_PARAMS = 73_984 + 32_768 + 64         # 106,816
# matmuls per token: 2 layers * 2 * 36,864 (the linear weights) + LM head 2 * 64*256 = 180,224;
# attention per layer: scores and weighted sum, 2 * 2 * heads 4 * head_dim 16 = 256 per (token, token)
TINY_LLAMA_MATMUL = 512 * b * s**2 + 180_224 * b * s
# + the rotary embedding's angles, where transformers computes them as a product: 5.17's
# LlamaRotaryEmbedding does inv_freq [1, 8, 1] @ positions [1, 1, seq], 2 * 8 * seq matmul FLOPs (the
# position ids have batch 1); 5.24's multiplies elementwise, 0. A difference of the transformers
# versions, not of the capture: the tests take the rotary module's own count, which must be one of the two.
TINY_LLAMA_ROPE_MATMUL = (sympy.Integer(0), 16 * s)


def rope_matmul(modules: list[dict], seq=s):
    """The matmul FLOPs of model.rotary_emb in `modules` (Report.by_module or the JSON's "modules"),
    checked to be what one of the two RoPE implementations does at `seq`."""
    rope = sum((m["matmul_flops"] for m in modules if m["module"] == "model.rotary_emb"), sympy.Integer(0))
    assert any(sympy.expand(rope - r.subs(s, seq)) == 0 for r in TINY_LLAMA_ROPE_MATMUL), rope
    return rope


def _reload_hub_constants():
    """huggingface_hub reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE when its constants module is
    imported; re-reading it makes this process see the environment the test set."""
    from huggingface_hub import constants
    importlib.reload(constants)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME, offline: the Hub cache is tmp/hf/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _reload_hub_constants()
    yield tmp_path / "hf"
    monkeypatch.undo()
    _reload_hub_constants()


def cache_config(hf_home: Path, repo_id: str, config: dict, commit: str = COMMIT, main: bool = True) -> Path:
    """Put `config` in the Hub cache as hf_hub_download does: the file under blobs/<sha256>, a
    symlink to it in snapshots/<commit>/, and refs/main holding the commit."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    data = json.dumps(config).encode()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(os.path.relpath(blob, snapshot))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return repo


def tiny_llama_config() -> dict:
    return json.loads((LLAMA_DIR / "config.json").read_text())


# --- config paths ------------------------------------------------------------------------------------

def test_directory_and_file_build_the_config_on_meta():
    for source in (str(LLAMA_DIR), str(LLAMA_DIR / "config.json")):
        loaded = load_model(source)
        assert type(loaded.module).__name__ == "LlamaForCausalLM"
        assert all(p.is_meta and p.dtype == torch.float32 for p in loaded.module.parameters())  # not its bfloat16
        assert sum(p.numel() for p in loaded.module.parameters()) == TINY_LLAMA_PARAMS
        assert [str(i) for i in loaded.inputs] == ["input_ids:int64[batch,seq]"]
        assert loaded.module.config.use_cache is False and loaded.module.config._attn_implementation == "sdpa"


def test_config_costs_match_the_same_model_built_by_a_factory():
    report = costmodel.analyze(str(LLAMA_DIR))
    assert report.params == TINY_LLAMA_PARAMS
    assert sympy.expand(report.symbolic.matmul_flops - TINY_LLAMA_MATMUL - rope_matmul(report.by_module(2))) == 0
    # tests/models.py builds the same configuration with hf_factory
    same = costmodel.analyze(models.tiny_llama_gqa, inputs=["input_ids:int64[batch,seq]"])
    assert sympy.expand(report.symbolic.flops - same.symbolic.flops) == 0


def test_explicit_inputs_replace_the_defaults():
    report = costmodel.analyze(str(LLAMA_DIR), inputs=["input_ids:int64[2,tokens]"])
    assert report.dims == ["tokens"]
    tokens = sympy.Symbol("tokens", integer=True, positive=True)
    assert sympy.expand(report.symbolic.matmul_flops - TINY_LLAMA_MATMUL.subs({b: 2, s: tokens})
                        - rope_matmul(report.by_module(2), tokens)) == 0


def test_seq2seq_config_gets_decoder_inputs():
    report = costmodel.analyze(str(FIXTURES / "tiny-t5.json"))
    assert [str(i) for i in report.inputs] == ["input_ids:int64[batch,seq]", "decoder_input_ids:int64[batch,seq]"]
    same = costmodel.analyze(models.tiny_t5, inputs=["input_ids:int64[batch,seq]",
                                                     "decoder_input_ids:int64[batch,seq]"])
    assert report.params == same.params
    assert sympy.expand(report.symbolic.matmul_flops - same.symbolic.matmul_flops) == 0


def test_vision_config_gets_pixel_values_at_its_image_size():
    report = costmodel.analyze(str(FIXTURES / "tiny-vit.json"))
    assert [str(i) for i in report.inputs] == ["pixel_values:float32[batch,3,32,32]"]
    # patches 3*8*8 -> 64 (16 patches) 12,352; cls token 64; positions 17*64 = 1,088; per layer:
    # qkv 3 * (64*64 + 64), out 64*64 + 64, MLP 64*128 + 128 + 128*64 + 64, 2 norms 256 = 33,472;
    # final norm 128; pooler 64*64 + 64 = 4,160
    assert report.params == 12_352 + 64 + 1_088 + 2 * 33_472 + 128 + 4_160
    # conv as matmul 2 * 16 * 192 * 64 = 393,216; per layer over 17 tokens: qkv 2*17*64*192 = 417,792,
    # attention 2 * 2 * 4 heads * 17*17 * 16 = 73,984, out 2*17*64*64 = 139,264, MLP 2 * 2*17*64*128
    # = 557,056; pooler 2*64*64 = 8,192 (the cls token only)
    per_layer = 417_792 + 73_984 + 139_264 + 557_056
    assert report.symbolic.matmul_flops == (393_216 + 2 * per_layer + 8_192) * b


def test_speech_configs_get_their_features():
    whisper = load_model(str(FIXTURES / "tiny-whisper.json"))
    # WhisperEncoder takes exactly 2 * max_source_positions (8) frames of num_mel_bins (16) mels
    assert [str(i) for i in whisper.inputs] == ["input_features:float32[batch,16,16]",
                                                "decoder_input_ids:int64[batch,seq]"]
    report = costmodel.analyze(str(FIXTURES / "tiny-whisper.json"), dims={"batch": 1, "seq": 4})
    assert report.complexity["seq"]["matmul_flops"] == 2 and report.unsupported == {}
    wav2vec2 = load_model(str(FIXTURES / "tiny-wav2vec2.json"))
    assert type(wav2vec2.module).__name__ == "Wav2Vec2ForCTC"
    assert [str(i) for i in wav2vec2.inputs] == ["input_values:float32[batch,samples]"]


def test_convnet_config_without_image_size_keeps_height_and_width_symbolic(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["ResNetForImageClassification"], "model_type": "resnet",
                                "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1],
                                "layer_type": "bottleneck", "num_labels": 10}))
    assert hf.from_file(str(path)).inputs == ("pixel_values:float32[batch,3,height,width]",)


def test_missing_architectures_falls_back_to_automodel_with_a_warning(tmp_path):
    config = tiny_llama_config()
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="no architectures; building LlamaModel, AutoModel's class"):
        loaded = load_model(str(tmp_path))
    # the base model: no LM head (256*64 = 16,384)
    assert sum(p.numel() for p in loaded.module.parameters()) == TINY_LLAMA_PARAMS - 16_384


def test_model_without_sdpa_says_attention_is_its_own(tmp_path):
    # GPT-Neo has no SDPA in transformers 5.17 nor 5.24; Gemma2, used before, has it in 5.17 (not in 5.24)
    import transformers
    assert not getattr(transformers.GPTNeoForCausalLM, "_supports_sdpa", False)
    path = tmp_path / "gpt-neo.json"
    path.write_text(json.dumps({"architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo", "hidden_size": 32,
                                "num_layers": 1, "num_heads": 2, "attention_types": [[["global"], 1]],
                                "vocab_size": 64, "max_position_embeddings": 64}))
    with pytest.warns(UserWarning, match="GPTNeoForCausalLM does not support SDPA.*eager ops"):
        loaded = load_model(str(path))
    assert loaded.module.config._attn_implementation == "eager"


@pytest.mark.parametrize("content, message", [
    ("{not json", r"is not valid JSON \(line 1"),
    ("[1, 2]", "holds a JSON list; a Hugging Face config.json is an object"),
    ('{"architectures": ["LlamaForCausalLM"]}', "the config has no model_type"),
    ('{"model_type": "no-such-model"}', "model_type 'no-such-model' is not known to transformers"),
    ('{"model_type": "llama", "architectures": ["LlamaConfig"]}', "'LlamaConfig' is not a transformers model class"),
    ('{"model_type": "llama", "architectures": "LlamaForCausalLM"}', "architectures is 'LlamaForCausalLM'; expected "
                                                                     "a list of class names"),
    ('{"model_type": "llama", "architectures": ["LlamaForTimeTravel"]}',
     "'LlamaForTimeTravel' .* is not a class of transformers"),
])
def test_bad_configs_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_model(str(path))


def test_missing_paths_say_what_is_accepted(tmp_path):
    with pytest.raises(UsageError, match=r"model config '.*nope.json' does not exist"):
        load_model(str(tmp_path / "nope.json"))
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(UsageError, match=r"holds no config.json \(it has: weights.bin\)"):
        load_model(str(tmp_path))


def test_validate_builds_real_weights_from_the_config():
    from costmodel.validate.runner import build_real
    model = build_real(str(LLAMA_DIR), "tiny-llama", "cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == TINY_LLAMA_PARAMS


# --- remote code ---------------------------------------------------------------------------------------

REMOTE = FIXTURES / "remote-code"    # model_type "tinynet" with auto_map to its own Python files


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies repository code into HF_MODULES_CACHE and imports it from there."""
    from transformers import dynamic_module_utils
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_remote_code_is_refused_without_trust():
    with pytest.raises(UsageError, match=r"needs remote code: model_type 'tinynet' is not in transformers .*"
                                         r"configuration_tinynet.TinyNetConfig.*--trust-remote-code"):
        load_model(str(REMOTE))


def test_unknown_architecture_with_auto_map_is_refused(tmp_path):
    config = tiny_llama_config() | {"architectures": ["FancyLlamaForCausalLM"],
                                    "auto_map": {"AutoModelForCausalLM": "modeling_fancy.FancyLlamaForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="needs remote code: architecture 'FancyLlamaForCausalLM' is not in "
                                         "transformers"):
        load_model(str(tmp_path))


def test_known_architecture_ignores_auto_map_without_trust(tmp_path):
    # as transformers does (Phi-3's config maps to repository code that transformers has built in)
    config = tiny_llama_config() | {"auto_map": {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert type(load_model(str(tmp_path)).module).__module__.startswith("transformers.models.llama")


def test_trusted_remote_code_builds_the_repository_model(modules_cache):
    assert type(load_model(str(REMOTE), trust_remote_code=True).module).__name__ == "TinyNetForCausalLM"
    report = costmodel.analyze(str(REMOTE), trust_remote_code=True)
    assert report.params == 2 * 64 * 16                              # embedding and LM head, 2,048
    assert report.symbolic.matmul_flops == 2 * 16 * 64 * b * s       # the LM head per token


def test_cli_trust_remote_code_flag(modules_cache, capsys):
    assert main(["analyze", str(REMOTE), "--dim", "batch=1", "--dim", "seq=8"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main(["analyze", str(REMOTE), "--dim", "batch=1", "--dim", "seq=8", "--trust-remote-code",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["matmul_flops"] == 2 * 16 * 64 * 8


# --- hf:ORG/NAME and the Hub cache --------------------------------------------------------------------

def test_hub_name_reads_config_json_from_the_cache_at_refs_main(hf_home):
    cache_config(hf_home, "tiny-org/tiny-llama", tiny_llama_config())
    report = costmodel.analyze("hf:tiny-org/tiny-llama")
    assert report.model == "hf:tiny-org/tiny-llama" and report.params == TINY_LLAMA_PARAMS
    assert sympy.expand(report.symbolic.matmul_flops - TINY_LLAMA_MATMUL - rope_matmul(report.by_module(2))) == 0


def test_refs_main_chooses_the_snapshot(hf_home):
    repo = cache_config(hf_home, "tiny-org/tiny-llama", tiny_llama_config() | {"num_hidden_layers": 1},
                        commit=OLD_COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps(tiny_llama_config()))
    assert load_model("hf:tiny-org/tiny-llama").module.config.num_hidden_layers == 1   # refs/main: OLD_COMMIT
    (repo / "refs" / "main").write_text(COMMIT)
    assert load_model("hf:tiny-org/tiny-llama").module.config.num_hidden_layers == 2


def test_offline_and_not_cached_says_where_it_looked(hf_home):
    with pytest.raises(UsageError) as e:
        load_model("hf:meta-llama/Meta-Llama-3-8B")
    message = str(e.value)
    repo = hf_home / "hub" / "models--meta-llama--Meta-Llama-3-8B"
    assert f"looked for {repo}/snapshots/<commit in refs/main>/config.json: no folder {repo}" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "hf download meta-llama/Meta-Llama-3-8B config.json" in message
    assert "costmodel analyze path/to/config.json" in message


def test_partial_cache_names_the_missing_step(hf_home):
    repo = cache_config(hf_home, "tiny-org/tiny-llama", tiny_llama_config(), main=False)
    with pytest.raises(UsageError, match=f"no {repo}/refs/main"):
        load_model("hf:tiny-org/tiny-llama")


def test_unreachable_hub_and_not_cached(hf_home, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _reload_hub_constants()
    asked = []

    def no_network(repo_id, filename, **kwargs):
        # what hf_hub_download raises, after its retries, when the Hub cannot be reached
        asked.append((repo_id, filename))
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(UsageError, match="not in the Hugging Face cache .* and the Hub could not be reached"):
        load_model("hf:tiny-org/tiny-llama")
    assert asked == [("tiny-org/tiny-llama", "config.json")]    # config.json only, never weights


@pytest.mark.parametrize("source, message", [
    ("hf:", "'' is not a Hugging Face Hub model id"),
    ("hf:a/b/c", "'a/b/c' is not a Hugging Face Hub model id"),
    ("hf:gpt2", "expected hf:ORG/NAME with the organisation"),
])
def test_bad_hub_ids(hf_home, source, message):
    with pytest.raises(UsageError, match=message):
        load_model(source)


def test_cli_hub_name_with_hf_home_in_the_environment(tmp_path):
    """The real thing: a fresh process reads HF_HOME and HF_HUB_OFFLINE as huggingface_hub does."""
    home = tmp_path / "hf"
    cache_config(home, "tiny-org/tiny-llama", tiny_llama_config())
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-m", "costmodel.cli", "analyze", "hf:tiny-org/tiny-llama",
                          "--dim", "batch=1", "--dim", "seq=16", "--format", "json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["model"] == "hf:tiny-org/tiny-llama" and data["totals"]["params"] == TINY_LLAMA_PARAMS
    assert data["totals"]["matmul_flops"] == 512 * 16**2 + 180_224 * 16 + rope_matmul(data["modules"], 16)


def test_cli_config_path(capsys):
    code = main(["analyze", str(LLAMA_DIR / "config.json"), "--dim", "batch=1", "--dim", "seq=16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "input_ids:int64[batch,seq]" in out and "106,816" in out
