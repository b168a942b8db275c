"""Hugging Face configurations -> the model they describe, built on the meta device, with default inputs.

MODEL may be `hf:ORG/NAME` (only its config.json is read: from the local Hub cache, else from the
Hub unless HF_HUB_OFFLINE is set; never weights), a path to a config.json, or a directory holding
one. The class is the config's `architectures[0]` from `transformers`; the default inputs follow
the class's main input (text, image, speech). Repository Python code runs only on request.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from dataclasses import dataclass

import torch.nn as nn

from costmodel.errors import UsageError

PREFIX = "hf:"
CONFIG = "config.json"


@dataclass
class HFModel:
    """A config resolved to the class that builds it and the inputs its forward() takes by default."""

    name: str
    config: object                  # a transformers PretrainedConfig
    cls: type                       # the PreTrainedModel subclass it builds
    inputs: tuple[str, ...]         # default input specs; empty when none can be derived
    no_inputs: str = ""             # why there are no default inputs

    @property
    def default_dims(self) -> dict[str, int]:
        """Sizes for the named dimensions of the default inputs, used where the user gives none: batch 1,
        sequences of 512 tokens (or the model's context, if shorter), images of 224 x 224."""
        context = next((v for k in ("max_position_embeddings", "n_positions", "max_source_positions")
                        if isinstance(v := getattr(self.config, k, None), int) and v > 0), None)
        sizes = {"batch": 1, "seq": min(512, context or 512), "height": 224, "width": 224}
        names = {d for spec in self.inputs for d in _dim_names(spec)}
        return {d: v for d, v in sizes.items() if d in names}

    def build(self) -> nn.Module:
        """The model (call it under torch.device("meta") for no weights). Decoders get use_cache=False,
        so they return plain tensors; attention goes through SDPA where the class supports it."""
        config = copy.deepcopy(self.config)
        if hasattr(config, "use_cache"):
            config.use_cache = False
        sdpa = getattr(self.cls, "_supports_sdpa", False)
        if sdpa:
            config._attn_implementation = "sdpa"
        model = self.cls(config)
        if not sdpa and getattr(config, "num_attention_heads", None):
            import transformers
            warnings.warn(f"{self.name}: {self.cls.__name__} does not support SDPA in transformers "
                          f"{transformers.__version__}; its attention is traced as the model's own "
                          f"{model.config._attn_implementation} ops, so --attention does not apply to it",
                          stacklevel=2)
        return model


def is_hf_source(source: str) -> bool:
    """`hf:ORG/NAME`, a .json path, or a directory holding a config.json."""
    return (source.startswith(PREFIX) or source.endswith(".json")
            or os.path.isfile(os.path.join(source, CONFIG)))


def resolve(source: str, trust_remote_code: bool = False) -> HFModel:
    """`hf:ORG/NAME`, a config.json path or a directory holding one -> an HFModel (nothing built yet)."""
    if source.startswith(PREFIX):
        repo_id = source[len(PREFIX):]
        return from_file(hub_config_path(repo_id), source, trust_remote_code, code_location=repo_id)
    return from_file(local_config_path(source), source, trust_remote_code)


def from_file(path: str, name: str | None = None, trust_remote_code: bool = False,
              code_location: str | None = None) -> HFModel:
    """A config.json on disk -> an HFModel. `code_location` (a Hub id or a directory; default the
    file's directory) is where `auto_map` code is fetched from when trust_remote_code is on."""
    name = name or str(path)
    raw = read_config(path)
    location = code_location or os.path.dirname(os.path.abspath(path))
    _architectures(raw, name)       # before transformers reads the config: its own check differs by version
    config = _config(raw, name, location, trust_remote_code)
    cls = _model_class(raw, config, name, location, trust_remote_code)
    inputs, why = default_inputs(config, cls)
    return HFModel(name, config, cls, inputs, why)


# --- finding config.json ---------------------------------------------------------------------------

def local_config_path(source: str) -> str:
    """A path to a config.json, or to a directory holding one -> the file's path."""
    if os.path.isdir(source):
        path = os.path.join(source, CONFIG)
        if not os.path.isfile(path):
            files = sorted(os.listdir(source))
            raise UsageError(f"model directory {source!r} holds no {CONFIG} (it has: {', '.join(files[:12]) or 'nothing'}); "
                             "MODEL may be a zoo name, hf:ORG/NAME, a config.json or a directory holding one, "
                             "FILE.py:FUNC or package.module:FUNC")
        return path
    if not os.path.isfile(source):
        raise UsageError(f"model config {source!r} does not exist; give the path to a Hugging Face config.json "
                         f"(or to a directory holding one), or hf:ORG/NAME")
    return source


def hub_config_path(repo_id: str) -> str:
    """The local path of `repo_id`'s config.json: from the Hub cache (HF_HUB_CACHE, else HF_HOME/hub),
    else downloaded from the Hub (config.json only) unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import validate_repo_id
    source = PREFIX + repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{source}: {repo_id!r} is not a Hugging Face Hub model id; expected hf:ORG/NAME, "
                         f"e.g. hf:meta-llama/Meta-Llama-3-8B ({e})") from e
    if "/" not in repo_id:
        # Legacy ids without an organisation (gpt2) redirect on the Hub, but the cache is keyed by
        # the full id, so a short id never finds its cached copy.
        raise UsageError(f"{source}: expected hf:ORG/NAME with the organisation, e.g. hf:openai-community/gpt2")
    cached = try_to_load_from_cache(repo_id, CONFIG)
    if isinstance(cached, str):
        return cached
    cache = constants.HF_HUB_CACHE
    if cached is not None:   # huggingface_hub's _CACHED_NO_EXIST: the Hub said there is no such file
        raise UsageError(f"{source}: the Hugging Face cache ({cache}) records that the repository has no {CONFIG}; "
                         f"costmodel reads the model's {CONFIG}: give its path (costmodel analyze path/to/config.json)")
    looked = _cache_miss(cache, repo_id)
    provide = (f"Provide the file: where there is a network, `hf download {repo_id} {CONFIG}` puts it in that "
               f"cache; or save the model's {CONFIG} and run `costmodel analyze path/to/config.json`.")
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"{source}: {CONFIG} is not in the Hugging Face cache ({looked}) and HF_HUB_OFFLINE is "
                         f"set, so the Hub was not asked. {provide}")
    try:
        return hf_hub_download(repo_id, CONFIG)
    except GatedRepoError as e:
        raise UsageError(f"{source} is gated on the Hub: accept its licence on huggingface.co and log in "
                         f"(`hf auth login` or HF_TOKEN), or give the path of its {CONFIG}") from e
    except RepositoryNotFoundError as e:
        raise UsageError(f"{source}: no model repository {repo_id!r} on the Hub (or it is private: log in with "
                         f"`hf auth login` or HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise UsageError(f"{source}: the Hub repository has no branch 'main' ({_first_line(e)})") from e
    except LocalEntryNotFoundError as e:   # no connection, and nothing cached
        raise UsageError(f"{source}: {CONFIG} is not in the Hugging Face cache ({looked}) and the Hub could not "
                         f"be reached ({_first_line(e)}). {provide}") from e
    except EntryNotFoundError as e:
        raise UsageError(f"{source}: the Hub repository has no {CONFIG} (costmodel reads the model's "
                         f"{CONFIG}; give its path instead)") from e
    except HfHubHTTPError as e:
        raise UsageError(f"{source}: the Hub refused {CONFIG}: {_first_line(e)}") from e


def _cache_miss(cache: str, repo_id: str) -> str:
    """Where the Hub cache layout puts `repo_id`'s config.json, and the first step that is missing."""
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    where = f"looked for {repo_dir}/snapshots/<commit in refs/main>/{CONFIG}"
    ref = os.path.join(repo_dir, "refs", "main")
    if not os.path.isdir(repo_dir):
        return f"{where}: no folder {repo_dir}"
    if not os.path.isfile(ref):
        return f"{where}: no {ref}"
    with open(ref) as f:
        commit = f.read().strip()
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    if not os.path.isdir(snapshot):
        return f"{where}: refs/main names {commit}, but there is no {snapshot}"
    return f"{where}: no {os.path.join(snapshot, CONFIG)}"


def read_config(path: str) -> dict:
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                         "expected a Hugging Face config.json") from e
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a JSON {type(raw).__name__}; a Hugging Face config.json is an object "
                         '({"model_type": ..., "architectures": [...], ...})')
    return raw


# --- the config and the class ----------------------------------------------------------------------

def _remote_code_error(name: str, what: str, ref: str) -> UsageError:
    import transformers
    return UsageError(f"{name} needs remote code: {what} is not in transformers {transformers.__version__}, and the "
                      f"config's auto_map points to the repository's Python ({ref}). costmodel runs that code only "
                      f"with --trust-remote-code (trust_remote_code=True in the API); read it first")


def _dynamic_class(ref: str, location: str) -> type:
    from huggingface_hub import constants
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    return get_class_from_dynamic_module(ref, location, local_files_only=constants.HF_HUB_OFFLINE)


def _config(raw: dict, name: str, location: str, trust_remote_code: bool):
    """The PretrainedConfig of `raw`: transformers' class for its model_type, or with
    trust_remote_code the repository's own (auto_map's AutoConfig), as AutoConfig chooses."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    model_type = raw.get("model_type")
    ref = (raw.get("auto_map") or {}).get("AutoConfig")
    if ref and trust_remote_code:
        config_cls = _dynamic_class(ref, location)
    elif model_type in CONFIG_MAPPING:
        config_cls = CONFIG_MAPPING[model_type]
    elif ref:
        raise _remote_code_error(name, f"model_type {model_type!r}", ref)
    elif not model_type:
        raise UsageError(f"{name}: the config has no model_type; a Hugging Face config.json names it "
                         '(e.g. "model_type": "llama")')
    else:
        raise UsageError(f"{name}: model_type {model_type!r} is not known to transformers "
                         f"{transformers.__version__} (a newer transformers may have it)")
    try:
        return config_cls.from_dict(raw)
    except Exception as e:
        raise UsageError(f"{name}: {config_cls.__name__} rejected the config: {type(e).__name__}: {e}") from e


def _architectures(raw: dict, name: str) -> list[str]:
    """The config's `architectures` (a list of class names; [] when absent), checked here rather than
    left to transformers, whose check differs by version: 5.17's config classes are strict dataclasses
    that reject anything but list[str] | None with their own message ("Field 'architectures' with value
    ... doesn't match any type"), 5.24's accept any value."""
    architectures = raw.get("architectures")
    if architectures is None:
        return []
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise UsageError(f"{name}: the config's architectures is {architectures!r}; expected a list of class "
                         'names, e.g. ["LlamaForCausalLM"]')
    return architectures


def _model_class(raw: dict, config, name: str, location: str, trust_remote_code: bool) -> type:
    """The config's `architectures[0]` as a transformers class (or, with trust_remote_code, the
    repository's class that auto_map names); without `architectures`, AutoModel's base model."""
    import transformers
    auto_map = {k: v for k, v in (raw.get("auto_map") or {}).items() if isinstance(v, str)}
    architectures = _architectures(raw, name)
    if not architectures:
        ref = auto_map.get("AutoModel")
        if ref and trust_remote_code:
            cls = _dynamic_class(ref, location)
        else:
            from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
            class_name = MODEL_MAPPING_NAMES.get(getattr(config, "model_type", None))
            class_name = class_name[0] if isinstance(class_name, (list, tuple)) else class_name
            if class_name is None:
                raise UsageError(f"{name}: the config has no architectures, and transformers has no AutoModel class "
                                 f"for model_type {config.model_type!r}; add one, e.g. \"architectures\": "
                                 "[\"LlamaForCausalLM\"]")
            cls = getattr(transformers, class_name)
        warnings.warn(f"{name}: the config has no architectures; building {cls.__name__}, AutoModel's class for "
                      f"model_type {config.model_type!r} (the base model, no task head). Add \"architectures\" to "
                      "the config to choose the head", stacklevel=2)
        return cls
    arch = architectures[0]
    ref = next((v for v in auto_map.values() if v.rsplit(".", 1)[-1] == arch), None)
    if ref and trust_remote_code:
        return _dynamic_class(ref, location)
    cls = getattr(transformers, arch, None) if arch.isidentifier() else None
    if cls is None:
        if ref:
            raise _remote_code_error(name, f"architecture {arch!r}", ref)
        raise UsageError(f"{name}: architecture {arch!r} (the config's architectures[0]) is not a class of "
                         f"transformers {transformers.__version__}; a newer transformers may have it")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UsageError(f"{name}: architecture {arch!r} is not a transformers model class "
                         f"(it is {type(cls).__name__} {cls!r}); expected e.g. LlamaForCausalLM")
    return cls


# --- default inputs ---------------------------------------------------------------------------------

def default_inputs(config, cls: type) -> tuple[tuple[str, ...], str]:
    """The inputs forward() gets by default, from the class's main input and the config's sizes:
    text input_ids[batch,seq] (encoder-decoders add decoder_input_ids[batch,seq]); images
    pixel_values[batch,C,H,W] at the config's image size (symbolic height, width where it has none);
    speech the features it takes. Returns (specs, why there are none)."""
    main = getattr(cls, "main_input_name", "input_ids")
    params = inspect.signature(cls.forward).parameters
    if main == "input_ids":
        first = "input_ids:int64[batch,seq]"
    elif main == "pixel_values":
        first = _image_input(config)
    elif main == "input_features":
        first = _features_input(config)
    elif main == "input_values":
        first = _values_input(config)
    else:
        first = f"no default for {cls.__name__}'s main input {main!r}"
    if ":" not in first:
        return (), f"{first}; give it with --input NAME:DTYPE[D0,D1,...]"
    specs = [first]
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        specs.append("decoder_input_ids:int64[batch,seq]")
    return tuple(specs), ""


def _sub(config, key: str):
    """`key` from the config, else from its vision_config (CLIP-style composite configs)."""
    value = getattr(config, key, None)
    if value is None and getattr(config, "vision_config", None) is not None:
        value = getattr(config.vision_config, key, None)
    return value


def _image_input(config) -> str:
    channels = _sub(config, "num_channels")
    if not isinstance(channels, int):
        return "the config has no num_channels for pixel_values"
    size = _sub(config, "image_size")
    if size is None:   # convolutional nets (ResNet) take any size
        return f"pixel_values:float32[batch,{channels},height,width]"
    if isinstance(size, int):
        return f"pixel_values:float32[batch,{channels},{size},{size}]"
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return f"pixel_values:float32[batch,{channels},{size[0]},{size[1]}]"
    return f"the config's image_size {size!r} is not an integer or [height, width]"


def _features_input(config) -> str:
    mels, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if isinstance(mels, int) and isinstance(positions, int):
        # Whisper: log-mel frames [batch, mels, frames]; its encoder's second conv has stride 2 and
        # WhisperEncoder.forward requires frames == 2 * max_source_positions (3000 for 30 s of audio).
        return f"input_features:float32[batch,{mels},{2 * positions}]"
    per_channel, channels = getattr(config, "input_feat_per_channel", None), getattr(config, "input_channels", None)
    if isinstance(per_channel, int) and isinstance(channels, int):
        # Speech2Text: filterbank features [batch, frames, input_feat_per_channel * input_channels]
        return f"input_features:float32[batch,frames,{per_channel * channels}]"
    return "the config has neither num_mel_bins with max_source_positions (Whisper) nor input_feat_per_channel"


def _values_input(config) -> str:
    mels, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_length", None)
    if isinstance(mels, int) and isinstance(frames, int):
        # Audio Spectrogram Transformer: a spectrogram [batch, max_length, num_mel_bins]
        return f"input_values:float32[batch,{frames},{mels}]"
    return "input_values:float32[batch,samples]"   # Wav2Vec2, HuBERT, WavLM: the raw waveform


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _dim_names(spec: str) -> list[str]:
    body = spec[spec.index("[") + 1:spec.rindex("]")]
    return [d.strip() for d in body.split(",") if d.strip() and not d.strip().isdigit()]
