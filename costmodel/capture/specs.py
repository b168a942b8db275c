"""Parsing of what the user types: `--input NAME:DTYPE[D0,D1,...]` and `--dim NAME=V[,V...]`."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from costmodel.errors import UsageError

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
MODEL_DTYPES = ("float32", "bfloat16", "float16")

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_INPUT_RE = re.compile(rf"^\s*({_NAME})\s*:\s*([A-Za-z0-9_]+)\s*\[(.*)\]\s*$")
_DIM_RE = re.compile(rf"^\s*({_NAME})\s*=\s*(.+)$")


@dataclass(frozen=True)
class InputSpec:
    """One model input: `input_ids:int64[batch,seq]` -> name, dtype, dims ("batch", "seq")."""

    name: str
    dtype: torch.dtype
    dims: tuple[int | str, ...]

    @property
    def dim_names(self) -> list[str]:
        return [d for d in self.dims if isinstance(d, str)]

    def __str__(self) -> str:
        dtype = next(k for k, v in DTYPES.items() if v == self.dtype)
        return f"{self.name}:{dtype}[{','.join(str(d) for d in self.dims)}]"


def parse_input(text: str) -> InputSpec:
    """parse_input("x:float32[batch,3,224,224]") -> InputSpec("x", torch.float32, ("batch", 3, 224, 224))."""
    m = _INPUT_RE.match(text)
    if not m:
        raise UsageError(f"malformed --input {text!r}; expected NAME:DTYPE[D0,D1,...] such as "
                         "'input_ids:int64[batch,seq]' or 'x:float32[batch,3,224,224]'")
    name, dtype_name, body = m.groups()
    if dtype_name.lower() not in DTYPES:
        raise UsageError(f"unknown dtype {dtype_name!r} in --input {text!r}; accepted: {', '.join(DTYPES)}")
    dims: list[int | str] = []
    for part in body.split(",") if body.strip() else []:
        part = part.strip()
        if re.fullmatch(r"\d+", part):
            if int(part) < 1:
                raise UsageError(f"dimension {part} in --input {text!r} must be a positive integer")
            dims.append(int(part))
        elif re.fullmatch(_NAME, part):
            dims.append(part)
        else:
            raise UsageError(f"dimension {part!r} in --input {text!r} is neither a positive integer "
                             "nor a name (letters, digits, _)")
    return InputSpec(name, DTYPES[dtype_name.lower()], tuple(dims))


def parse_dim(text: str) -> tuple[str, list[int]]:
    """parse_dim("seq=512,1024") -> ("seq", [512, 1024]); parse_dim("seq") -> ("seq", [])."""
    if re.fullmatch(_NAME, text.strip()):
        return text.strip(), []
    m = _DIM_RE.match(text)
    if not m:
        raise UsageError(f"malformed --dim {text!r}; expected NAME=V or NAME=V1,V2,... such as 'seq=4096' "
                         "or 'seq=512,1024,2048'")
    name, values = m.groups()
    out = []
    for v in values.split(","):
        v = v.strip()
        if not re.fullmatch(r"\d+", v) or int(v) < 1:
            raise UsageError(f"value {v!r} in --dim {text!r} is not a positive integer")
        out.append(int(v))
    return name, out


def parse_dims(texts: list[str]) -> dict[str, list[int]]:
    dims: dict[str, list[int]] = {}
    for t in texts:
        name, values = parse_dim(t)
        if name in dims:
            raise UsageError(f"--dim {name} given twice; give one list, e.g. --dim {name}=512,1024")
        dims[name] = values
    return dims


def parse_dtype(name: str) -> torch.dtype:
    if name not in MODEL_DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; accepted: {', '.join(MODEL_DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, what: str = "size") -> int:
    """parse_size("10GB") -> 10_000_000_000; "80GiB" -> 85899345920; "1e9" -> 1000000000 bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UsageError(f"{what} {text!r} is not a size; give bytes (8000000000, 8e9) or a number with a unit: "
                         f"{', '.join(u.upper().replace('I', 'i') for u in _UNITS)} (10GB = 10**9 bytes, 80GiB = 80 * 2**30)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]
    if value < 1:
        raise UsageError(f"{what} {text!r} must be at least one byte")
    return int(value)
