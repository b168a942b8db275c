"""The model's repeated blocks: the unit that FSDP wraps, pipeline stages split, checkpointing
recomputes and tensor parallelism shards.

A group of repeated blocks is a set of at least two sibling modules with the same structure: the
same parameter names and shapes, the same buffers and the same module tree below them (a
transformer's layers, a ResNet stage's identical bottlenecks). Of all such groups in the model,
the one holding the most parameters is the model's blocks. The graph then has to agree: the
parallel analysis checks that the blocks' captured forward ops are the same sequence
(`same_ops`), so a block whose forward takes another path (a flag, a shape) is not mistaken for
a repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks: `paths` in model order (module paths as named_modules() names them)
    under the container `parent`; `params` per block."""

    parent: str
    paths: tuple[str, ...]
    params: int

    def __len__(self) -> int:
        return len(self.paths)

    def index_of(self, module_path: str) -> int | None:
        """The block a module path lies in (None outside every block)."""
        for i, p in enumerate(self.paths):
            if module_path == p or module_path.startswith(p + "."):
                return i
        return None


def _signature(module: nn.Module) -> tuple:
    """What makes two modules repeats of one another: their module tree (types by position),
    parameter and buffer names with shapes and dtypes."""
    tree = tuple((name, type(m).__qualname__) for name, m in module.named_modules())
    params = tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in module.named_buffers())
    return tree, params, buffers


def find_blocks(model: nn.Module) -> Blocks | None:
    """The largest group of repeated sibling modules (by parameters), or None when the model has
    no two siblings alike.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)]))
    >>> find_blocks(m)
    Blocks(parent='1', paths=('1.0', '1.1', '1.2'), params=72)
    """
    best: Blocks | None = None
    for parent_name, parent in model.named_modules():
        groups: dict[tuple, list[str]] = {}
        for name, child in parent.named_children():
            if not any(True for _ in child.parameters()):
                continue
            groups.setdefault(_signature(child), []).append(name)
        for names in groups.values():
            if len(names) < 2:
                continue
            first = parent.get_submodule(names[0])
            per_block = sum(p.numel() for p in first.parameters())
            paths = tuple(f"{parent_name}.{n}" if parent_name else n for n in names)
            candidate = Blocks(parent_name, paths, per_block)
            if best is None or per_block * len(paths) > best.params * len(best.paths):
                best = candidate
    return best
