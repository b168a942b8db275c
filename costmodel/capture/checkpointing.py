"""`--checkpointing`: activation checkpointing applied to the model's repeated blocks before capture.

The traced backward then holds the recomputation, as it does for checkpointing written in the
model itself (torch.utils.checkpoint, non-reentrant), so costs and memory follow from the graph:

  blocks     each block's forward runs under `checkpoint`: only its inputs are saved, the whole
             block is recomputed in the backward (full recomputation);
  selective  Megatron-LM's selective recomputation (Korthikanti et al. 2022, arXiv:2205.05198,
             section 5): only the attention core (scores, softmax, dropout, attention over V) is
             recomputed, everything else in the block is saved. As Megatron does it, the core
             alone runs under `checkpoint` (its inputs q, k, v are saved, its internals
             recomputed): each scaled_dot_product_attention call inside a block, and each
             parameter-free submodule of a block whose forward multiplies two activations and
             takes a softmax (Megatron's CoreAttention; found by running its first call once,
             untraced, and looking at the ops). Attention written out inline in a module with
             weights has no such boundary; the capture then reports that nothing was recomputed
             (`recomputed_attention`);
  ops        torchtitan's op-level policy: the outputs of matrix products and attention are
             saved, every other op is recomputed (torchtitan saves every other mm; this saves all);
  none       no change.

Selective checkpointing policies (torch.utils.checkpoint.create_selective_checkpoint_contexts)
keep every op output the policy saves until the recomputation reads it, including outputs that
autograd itself would have freed; that is what PyTorch runs for `ops`, and what the capture traces.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from costmodel import _torch
from costmodel.capture.blocks import candidates, static_signature
from costmodel.errors import UsageError

CHECKPOINTING = ("none", "blocks", "selective", "ops")

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
_ATTENTION = {"costmodel.sdpa.default", "aten._scaled_dot_product_flash_attention.default",
              "aten._scaled_dot_product_flash_attention_for_cpu.default",
              "aten._scaled_dot_product_efficient_attention.default",
              "aten._scaled_dot_product_cudnn_attention.default",
              "aten._scaled_dot_product_attention_math.default"}


@dataclass(frozen=True)
class Blocks:
    """The model's repeated blocks, the unit that checkpointing recomputes, FSDP wraps, pipeline
    stages split and tensor parallelism shards: `paths` in model order (as named_modules() names
    them) under the container `parent`; `params` per block. The parallel analysis checks the
    graph agrees (the blocks' captured forward ops are the same sequence)."""

    parent: str
    paths: tuple[str, ...]
    params: int

    def __len__(self) -> int:
        return len(self.paths)

    def index_of(self, module_path: str) -> int | None:
        """The block a module path lies in (None outside every block)."""
        return _block_index(self.paths, module_path)


@functools.lru_cache(maxsize=1 << 16)
def _block_index(paths: tuple[str, ...], module_path: str) -> int | None:
    # memoized: the parallel analyses ask it of every step of the timeline, many times over
    for i, p in enumerate(paths):
        if module_path == p or module_path.startswith(p + "."):
            return i
    return None


def find_blocks(model: nn.Module) -> Blocks | None:
    """Of the groups of alike siblings in a ModuleList/Sequential (capture.blocks.candidates: same
    class tree and parameter shapes), the one holding the most parameters; None when there is none.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)]))
    >>> find_blocks(m)
    Blocks(parent='1', paths=('1.0', '1.1', '1.2'), params=72)
    """
    groups: dict[tuple, list[tuple[str, nn.Module]]] = collections.defaultdict(list)
    for module, path in candidates(model).items():
        parent = path.rpartition(".")[0]
        groups[(parent, static_signature(module))].append((path, module))
    best: Blocks | None = None
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for (parent, _), members in groups.items():
        per_block = sum(p.numel() for p in members[0][1].parameters())
        if per_block == 0:
            continue
        paths = tuple(sorted((p for p, _ in members), key=order.__getitem__))
        if best is None or per_block * len(paths) > best.params * len(best.paths):
            best = Blocks(parent, paths, per_block)
    return best


def check(mode: str) -> str:
    if mode not in CHECKPOINTING:
        raise UsageError(f"unknown --checkpointing {mode!r}; accepted: {', '.join(CHECKPOINTING)}")
    return mode


def _ops_policy(ctx, func, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    if func in _MATMULS or str(func) in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def checkpointed(model: nn.Module, mode: str, blocks: Blocks | None = None):
    """Within the context, `model`'s repeated blocks run with activation checkpointing as `mode`
    says (see the module docstring). Yields a `Checkpointing` (None for mode "none"). Raises
    UsageError when the model has no repeated blocks to checkpoint."""
    check(mode)
    if mode == "none":
        yield None
        return
    blocks = blocks or find_blocks(model)
    if blocks is None:
        raise UsageError(f"--checkpointing {mode} checkpoints the model's repeated blocks, but "
                         f"{type(model).__name__} has no two sibling modules of the same structure; "
                         "accepted for this model: --checkpointing none")
    state = Checkpointing(mode, blocks)
    if mode == "selective":
        with _in_blocks(model, blocks, state), _checkpointed_attention(state), _checkpointed_cores(model, blocks, state):
            yield state
        return
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _ops_policy)} \
        if mode == "ops" else {}
    with _patched_forwards(model, blocks, lambda original: lambda *args, **kwargs: checkpoint(
            original, *args, use_reentrant=False, **extra, **kwargs)), _torch.eager_selective_checkpointing():
        yield state


class Checkpointing:
    """What `checkpointed` did: the mode, the blocks, and (selective) how many attention calls it
    recomputed."""

    def __init__(self, mode: str, blocks: Blocks):
        self.mode, self.blocks = mode, blocks
        self.depth = 0                       # > 0 while a block's forward runs
        self.in_core = 0                     # > 0 while a checkpointed attention core runs
        self.recomputed_attention = 0
        self.cores: dict[int, bool] = {}     # id(submodule) -> whether it is an attention core


@contextlib.contextmanager
def _patched_forwards(model: nn.Module, blocks: Blocks, wrap):
    """Each block's `forward` replaced by wrap(original forward) for the duration."""
    patched = []            # (module, its own `forward` attribute before, if it had one)
    for path in blocks.paths:
        module = model.get_submodule(path)
        own = module.__dict__.get("forward")
        module.forward = wrap(module.forward)
        patched.append((module, own))
    try:
        yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own


def _in_blocks(model: nn.Module, blocks: Blocks, state: Checkpointing):
    def wrap(original):
        def forward(*args, **kwargs):
            state.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                state.depth -= 1
        return forward
    return _patched_forwards(model, blocks, wrap)


@contextlib.contextmanager
def _checkpointed_attention(state: Checkpointing):
    """F.scaled_dot_product_attention, called inside a block, runs under checkpoint. The function
    in place when the context is entered is wrapped (the capture's costmodel::sdpa routing, or
    PyTorch's own in a real run)."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint
    inner = F.scaled_dot_product_attention

    def attention(*args, **kwargs):
        if state.depth == 0 or state.in_core or not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        state.recomputed_attention += 1
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = inner


_aten_ops = torch.ops.aten
_PRODUCTS = {_aten_ops.mm.default, _aten_ops.bmm.default, _aten_ops.baddbmm.default, _aten_ops.addmm.default}
_SOFTMAX = {_aten_ops._softmax.default, _aten_ops._safe_softmax.default, _aten_ops._log_softmax.default}


def _core_submodules(model: nn.Module, blocks: Blocks) -> list[nn.Module]:
    """Submodules of the blocks (not a block itself) that hold no parameters or buffers: where an
    attention core can be, as a function boundary to checkpoint."""
    out = []
    for path in blocks.paths:
        for name, m in model.get_submodule(path).named_modules():
            if name and not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()):
                out.append(m)
    return out


def _is_core(original, args, kwargs) -> bool:
    """Run a parameter-free module's forward once without recording it (untraced, no grad) and say
    whether it multiplies tensors and takes a softmax: the attention core."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen: set = set()

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func)
            return func(*args, **(kwargs or {}))

    context = _torch.disable_proxy_tracing() if _torch.in_trace() else contextlib.nullcontext()
    with context, torch.no_grad(), _Ops():
        original(*args, **kwargs)
    names = {str(f) for f in seen}
    attention = any(n in _ATTENTION for n in names)
    return attention or (bool(seen & _PRODUCTS) and bool(seen & _SOFTMAX))


@contextlib.contextmanager
def _checkpointed_cores(model: nn.Module, blocks: Blocks, state: Checkpointing):
    """Each attention core submodule of a block (see `_is_core`) runs under checkpoint."""
    from torch.utils.checkpoint import checkpoint

    def wrap_module(m):
        def wrap(original):
            def forward(*args, **kwargs):
                if state.depth == 0 or state.in_core or not torch.is_grad_enabled():
                    return original(*args, **kwargs)
                if id(m) not in state.cores:
                    state.cores[id(m)] = _is_core(original, args, kwargs)
                if not state.cores[id(m)]:
                    return original(*args, **kwargs)
                state.recomputed_attention += 1

                def core(*a, **k):
                    state.in_core += 1
                    try:
                        return original(*a, **k)
                    finally:
                        state.in_core -= 1
                return checkpoint(core, *args, use_reentrant=False, **kwargs)
            return forward
        return wrap

    with contextlib.ExitStack() as stack:
        for m in _core_submodules(model, blocks):
            stack.enter_context(_patched_module(m, wrap_module(m)))
        yield


@contextlib.contextmanager
def _patched_module(module: nn.Module, wrap):
    own = module.__dict__.get("forward")
    module.forward = wrap(module.forward)
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
