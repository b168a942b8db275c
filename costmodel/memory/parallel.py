"""Per-GPU memory of parallel training, derived from the single-device timeline of the captured graph.

The capture gives one training step of the whole model at the micro-batch `batch`: a timeline of
steps (one per op) and buffers (one per storage, with its size formula, category and lifetime;
see memory/timeline.py). Each strategy is an edit of that timeline, decided from the graph, so it
holds for any model (transformer, conv net, ...), not a per-architecture formula:

  tensor parallel (tp)  Megatron's column- then row-parallel pairs are recognised in the graph
      (`TensorParallel`): a linear (a matmul with a weight) whose output reaches, through an
      attention or a nonlinearity, a linear back to the first one's input width. The weights of
      the pair are split over tp (column: output features and bias; row: input features), and so
      is every tensor computed from a split one (heads, the MLP's hidden width), forward and
      backward, up to the matmuls that reduce over the split dimension (whose outputs are full,
      all-reduced). Every such storage is 1/tp. With --sequence-parallel, the block's other
      tensors (norms, residuals, dropout) are 1/tp along the sequence, and each matmul at a
      region's edge holds the full tensor it gathers (or reduces) while it runs.
  pipeline parallel (pp)  the repeated blocks are split into pp * V chunks of consecutive blocks,
      as evenly as the count allows (earlier chunks take the remainder); stage s runs chunks s,
      s + pp, ... The ops before the first block (embeddings) run on the first stage, those after
      the last (head, loss) on the last. Each stage's timeline is its own steps; a tensor it reads
      from another stage arrives in a receive buffer that torch.distributed.pipelining allocates
      once per micro-batch and keeps (as do the gradients it receives); the stage's outputs stay
      (the schedule's forward cache) until their backward is done, and the gradients of its inputs
      until that backward ends (they are sent then). torch.distributed.pipelining's traced stages
      (pipeline(), torch.export) make every floating-point tensor a stage receives require a
      gradient, whether or not it has one in the model (Llama's rotary cos/sin, made from a buffer
      and the positions): the receiving stage saves what the derivative for it needs (a product's
      other factor), computes that gradient and sends it back, and the sending stage allocates one
      gradient receive buffer per micro-batch for it (`received_gradients`). Users of the traced
      frontend hold these bytes, so the prediction counts them.
  1F1B over `microbatches` m: stage s holds the saved activations of up to
      min(pp - s - 1, m - 1) other micro-batches while it runs one (Narayanan et al. 2021;
      interleaved: Megatron-LM's warm-up count (pp - s - 1) * 2 + (V - 1) * pp chunk-micro-batches,
      each 1/V of a stage's). With m > 1 the timeline is the first micro-batch (no gradients yet)
      followed by a later one (the accumulated gradients resident, its own transient) and the
      optimizer step. The activations saved by one micro-batch are what is live at the stage's
      first backward op that its forward made. Schedule1F1B keeps the send handles of its warm-up
      forwards but the last (`send_work`) until the steady 1B1F phase ends, and a gloo or NCCL send
      handle holds its tensor: a stage with w = min(m, pp - s) >= 2 warm-up forwards holds one
      micro-batch's sent outputs past their backward when m > 2 w - 2.
  DDP (dp): full replicas; PyTorch's reducer keeps one flat bucket per 25 MiB of gradients for the
      whole run (gradient_as_bucket_view=False, the default): the gradients' size again, resident.
  ZeRO-1 (dp, --zero 1): PyTorch's ZeroRedundancyOptimizer: each parameter's optimizer state on
      one rank, assigned largest first to the rank with the least so far; DDP's buckets as above.
  ZeRO-2 (--zero 2): also the gradients sharded: each block's gradients live until its backward
      ends, then one reduce-scatter buffer of the block, and 1/dp of them stays (as FSDP's
      reduce-scatter does); optimizer state 1/dp. (PyTorch has no native ZeRO-2 with replicated
      parameters: `validate` does not run it.)
  FSDP (fsdp: FSDP2 `fully_shard` on each repeated block, then on the root): each parameter is
      split on dim 0 into ceil(rows / N)-row shards (padded), the optimizer state and the sharded
      gradients follow the local rows; each unit's parameters are all-gathered (an all-gather
      buffer of the unit, then the unsharded parameters) before its forward and again before its
      backward, freed after each (the root's stay from its forward to the end of the backward);
      in the forward a unit's all-gather buffer lives until the next unit's copy-out, in the
      backward the next unit's all-gather is issued (prefetched) when a unit's backward starts;
      after a unit's backward, its gradients are copied into one reduce-scatter buffer (kept
      until the next unit's) and 1/N of them stays. These are the lifetimes of torch 2.13's
      torch/distributed/fsdp/_fully_shard (_fsdp_param_group.py, _fsdp_collectives.py).
      --master-weights with fsdp is MixedPrecisionPolicy(param_dtype=--dtype, reduce_dtype=
      float32) on float32 parameters; without fsdp it is Megatron-LM's mixed precision: --dtype
      weights, float32 gradients (main_grad, allocated once), float32 master weights and
      optimizer state: 18 bytes per parameter with Adam.
  HSDP (dp and fsdp): FSDP over the fsdp group, replicas over dp (the all-reduce is in place).

Ranks of one stage differ only where a split is uneven (the first rank holds the largest shard);
the figures are those of each stage's first rank, and the peak that of the largest stage.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import sympy
import torch
import torch.fx as fx

from costmodel.capture.checkpointing import Blocks
from costmodel.errors import UsageError
from costmodel.memory.model import (ACTIVATIONS, CATEGORIES, GRADS, PARAMS, STATE, TEMPORARIES, Buffer, MemoryModel,
                                    MemoryPoint, Step)
from costmodel.memory.optimizer import CPU_STEP_BYTES, optimizer_temporary_bytes
from costmodel.rules import optimizer as opt

# DDP's default bucket cap: torch.nn.parallel.DistributedDataParallel(bucket_cap_mb=25)
DDP_BUCKET_BYTES = 25 * 1024 ** 2

_MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
            "aten.matmul.default"}
# ops that only re-view or copy their input: a weight seen through them is still the weight
_VIEWS = {"aten.t.default", "aten.transpose.int", "aten.permute.default", "aten.view.default",
          "aten._unsafe_view.default", "aten.reshape.default", "aten._to_copy.default", "aten.detach.default",
          "aten.alias.default", "aten.expand.default", "aten.clone.default", "aten.contiguous.default",
          "aten.unsqueeze.default", "aten.squeeze.dim"}
# ops that only move data: two linears joined by these alone are not a parallel region
_DATA_MOVES = _VIEWS | {"aten.split.Tensor", "aten.split_with_sizes.default", "aten.slice.Tensor",
                        "aten.native_dropout.default", "aten.dropout.default", "aten.bernoulli_.float",
                        "aten.mul.Tensor", "aten.div.Tensor", "<built-in function getitem>"}
_NONLINEAR = ("sdpa", "softmax", "gelu", "silu", "relu", "tanh", "sigmoid", "mish", "elu", "hardswish")


# --- the timeline, editable ----------------------------------------------------------------------

def _copy(b, **changes):
    """dataclasses.replace of a Buffer or Step without its per-call introspection (timelines copy
    every buffer)."""
    nb = object.__new__(type(b))
    nb.__dict__.update(b.__dict__)
    nb.__dict__.update(changes)
    return nb


class _Timeline:
    """Steps and buffers of one rank's timeline, as plain lists (copies: edits do not touch the
    single-device model)."""

    def __init__(self, steps: list[Step], buffers: list[Buffer], reads: list[list[int]] | None = None):
        self.steps = list(steps)
        self.buffers = [_copy(b) for b in buffers]
        self.reads = list(reads) if reads is not None else [[] for _ in steps]   # never edited in place

    @property
    def last(self) -> int:
        return len(self.steps) - 1

    def add(self, size, category: int, start: int, end: int, node: str, dtype: str = "", shape: str = "",
            param: str = "") -> Buffer:
        b = Buffer(sympy.sympify(size), category, start, end, node, dtype, shape, "", param)
        self.buffers.append(b)
        return b

    def model(self, dims: list[str], base: MemoryModel) -> MemoryModel:
        buffers = [b for b in self.buffers if not (b.size.is_Number and b.size == 0)]
        m = MemoryModel(self.steps, buffers, dims, base.device, base.kernels, base.amp)
        return m


class _Insertions:
    """Synthetic steps placed before or after original steps (an FSDP unshard, a reduce-scatter),
    applied at once: `point` returns a handle; buffers may start or end at handles."""

    def __init__(self, tl: _Timeline):
        self.tl = tl
        self.places: dict[tuple[int, int], list[Step]] = defaultdict(list)   # (index, 0 before | 1 after)
        self.handles: list[tuple[int, int, int]] = []
        self.pending: list[tuple[Buffer, object, object]] = []
        self.removed: set[int] = set()        # ids of the timeline's buffers to drop (re-added as pending)

    def point(self, index: int, label: str, after: bool, phase: str, module: str = "") -> int:
        """A new step right before (or after) original step `index`; several at one place keep the
        order they were made in. Returns a handle (a negative number) for `buffer`."""
        place = (index, 1 if after else 0)
        self.places[place].append(Step(label, label, module, phase))
        self.handles.append((index, place[1], len(self.places[place]) - 1))
        return -len(self.handles)

    def buffer(self, size, category: int, start, end, node: str, dtype: str = "", shape: str = "",
               param: str = "") -> None:
        b = Buffer(sympy.sympify(size), category, 0, 0, node, dtype, shape, "", param)
        self.pending.append((b, start, end))

    def apply(self) -> dict[int, int]:
        """Rebuild the timeline with the new steps; returns old index -> new index."""
        tl = self.tl
        if self.removed:
            tl.buffers = [b for b in tl.buffers if id(b) not in self.removed]
            self.removed.clear()
        steps, reads, new_index = [], [], {}
        placed: dict[tuple[int, int, int], int] = {}
        for i, st in enumerate(tl.steps):
            for k, s in enumerate(self.places.get((i, 0), [])):
                placed[(i, 0, k)] = len(steps)
                steps.append(s)
                reads.append([])
            new_index[i] = len(steps)
            steps.append(st)
            reads.append(tl.reads[i])
            for k, s in enumerate(self.places.get((i, 1), [])):
                placed[(i, 1, k)] = len(steps)
                steps.append(s)
                reads.append([])

        def where(x) -> int:
            return placed[self.handles[-x - 1]] if x < 0 else new_index[x]
        for b in tl.buffers:
            b.start, b.end = new_index[b.start], new_index[b.end]
        for b, start, end in self.pending:
            b.start, b.end = where(start), where(end)
            tl.buffers.append(b)
        tl.steps, tl.reads = steps, reads
        self.places.clear()
        self.handles.clear()
        self.pending.clear()
        return new_index


# --- what the graph says ------------------------------------------------------------------------

@dataclass
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    itemsize: int
    dtype: str
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_infos(captured) -> dict[str, ParamInfo]:
    out = {}
    for node in captured.graph.graph.nodes:
        if node.op != "placeholder":
            continue
        role, name = captured.roles.get(node.name, ("input", node.name))
        if role != "param":
            continue
        t = node.meta["val"]
        out[name] = ParamInfo(name, tuple(int(s) for s in t.shape), t.dtype.itemsize,
                              str(t.dtype).removeprefix("torch."), name in captured.trainable)
    return out


def block_spans(steps: list[Step], blocks: Blocks | None) -> list[int | None]:
    """The block each step runs in (None outside every block)."""
    if blocks is None:
        return [None] * len(steps)
    return [blocks.index_of(st.module) if st.module else None for st in steps]


# --- tensor parallelism -------------------------------------------------------------------------

@dataclass
class TensorParallel:
    """The column/row pairs found in the graph and what they split."""

    columns: dict[str, str] = field(default_factory=dict)   # weight param -> module path
    rows: dict[str, str] = field(default_factory=dict)
    column_biases: set[str] = field(default_factory=set)
    split: set[str] = field(default_factory=set)            # graph nodes whose values are split over tp
    heads: list[int] = field(default_factory=list)           # attention heads (q, kv) in the regions
    edges: dict[str, list[str]] = field(default_factory=dict)   # matmul node -> its full-size operands (SP)
    embeddings: dict[str, str] = field(default_factory=dict)   # vocabulary-parallel tables: param -> module
    heads_out: set[str] = field(default_factory=set)          # output layers among the columns
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> set[str]:
        return set(self.columns) | set(self.rows) | self.column_biases | set(self.embeddings)

    def plan(self) -> dict[str, str]:
        """module path -> "colwise" | "rowwise": PyTorch's parallelize_module plan for the same split
        (an embedding table is "rowwise": its rows; a weight tied between an embedding and the
        output layer is split once, with the embedding)."""
        tied = set(self.embeddings) & set(self.columns)
        return {**{m: "colwise" for w, m in self.columns.items() if w not in tied},
                **{m: "rowwise" for m in self.rows.values()}, **{m: "rowwise" for m in self.embeddings.values()}}


def _param_of(node, roles: dict, seen: int = 0) -> str | None:
    """The parameter a matmul operand is (through views and casts), else None."""
    while isinstance(node, fx.Node) and seen < 16:
        if node.op == "placeholder":
            role, name = roles.get(node.name, ("input", node.name))
            return name if role == "param" else None
        if str(node.target) not in _VIEWS or not node.args:
            return None
        node, seen = node.args[0], seen + 1
    return None


def _operands(node: fx.Node) -> list:
    """The two matrices of a matmul node."""
    t = str(node.target)
    if t in ("aten.addmm.default", "aten.baddbmm.default"):
        return list(node.args[1:3])
    return list(node.args[0:2])


def _last_dim(node) -> object:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v.shape[-1] if isinstance(v, torch.Tensor) and v.dim() else None


def find_tensor_parallel(captured, tp: int, blocks: Blocks | None) -> TensorParallel:
    """Megatron's column/row pairs in the captured graph, and every node whose value they split.

    A linear is a forward matmul with a weight operand. For each linear R, the graph is walked back
    from its activation operand, through any ops, to the linears that feed it (stopping there); if
    they all take a tensor of R's output width (the pair comes back to the hidden width), and the
    way between them is more than data movement (an attention, an activation, a gate), they are
    the columns and R the row of one region."""
    result = TensorParallel()
    if tp == 1:
        return result
    graph = captured.graph.graph
    roles = captured.roles
    forward = [n for n in graph.nodes if n.op == "call_function" and n.meta.get("costmodel_phase") == "forward"]
    linears: dict[fx.Node, tuple[str, fx.Node]] = {}
    for n in forward:
        if str(n.target) not in _MATMULS:
            continue
        ops = _operands(n)
        weights = [(i, _param_of(a, roles)) for i, a in enumerate(ops)]
        weights = [(i, w) for i, w in weights if w is not None]
        if len(weights) == 1:
            i, w = weights[0]
            linears[n] = (w, ops[1 - i])
    block_of = {n: (blocks.index_of(n.meta.get("costmodel_module", "")) if blocks else None) for n in forward}
    for row, (w_row, x_row) in linears.items():
        columns, ops_between, todo, seen = set(), set(), [x_row], set()
        while todo:
            n = todo.pop()
            if not isinstance(n, fx.Node) or n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if n in linears:
                columns.add(n)
                continue
            if block_of.get(n) != block_of.get(row):
                continue
            ops_between.add(str(n.target))
            todo.extend(n.all_input_nodes)
        if not columns:
            continue
        width = _last_dim(row)
        if any(str(_last_dim(linears[c][1])) != str(width) for c in columns):
            continue
        if not any(any(k in t for k in _NONLINEAR) for t in ops_between - _DATA_MOVES):
            continue
        if any(linears[c][0] in result.rows or linears[c][0] in result.columns for c in columns):
            continue
        for c in columns:
            w = linears[c][0]
            result.columns[w] = w.rpartition(".")[0]
            if str(c.target) == "aten.addmm.default":
                b = _param_of(c.args[0], roles)
                if b is not None:
                    result.column_biases.add(b)
        result.rows[w_row] = w_row.rpartition(".")[0]
    _vocabulary(captured, result, linears, block_of, forward)
    _propagate_split(captured, result)
    params = param_infos(captured)
    for w in result.columns:
        rows_out = params[w].shape[0] if w in params else None
        if rows_out is not None and rows_out % tp:
            result.notes.append(f"tp={tp} does not divide the {rows_out} output features of {w}: shards are uneven")
    for n in graph.nodes:
        if str(n.target) == "costmodel.sdpa.default" and n.name in result.split:
            q, k = (a.meta.get("val") for a in n.args[:2])
            for heads in (int(q.shape[1]), int(k.shape[1])):
                result.heads.append(heads)
                if heads % tp:
                    raise UsageError(f"tp={tp} must divide the attention heads; the attention at "
                                     f"{n.meta.get('costmodel_module', n.name)} has {heads} (q {int(q.shape[1])}, "
                                     f"kv {int(k.shape[1])}); accepted: a tp dividing both")
    if not result.rows:
        rest = ("only the vocabulary (embedding, output layer) is split" if result.embeddings or result.heads_out
                else "every tensor is replicated over tp")
        result.notes.append(f"tp={tp}: no column/row-parallel pair found in the graph (a linear feeding an "
                            f"attention or activation, then a linear back to the hidden width); {rest}")
    return result


def _vocabulary(captured, result: TensorParallel, linears: dict, block_of: dict, forward: list) -> None:
    """Megatron's vocabulary-parallel embedding and output layer (torchtitan: RowwiseParallel on the
    token embedding, ColwiseParallel on the output): the rows of an embedding table looked up by
    a user input (token ids; positions made from arange stay whole), and the output features of
    a linear outside the blocks whose output reaches the loss through no other linear, split over
    tp. The embedding's output is whole (all-reduced); the logits are split."""
    roles = captured.roles
    for n in forward:
        if str(n.target) != "aten.embedding.default" or block_of.get(n) is not None:
            continue
        weight, ids = n.args[0], n.args[1]
        w = _param_of(weight, roles)
        src = ids
        while isinstance(src, fx.Node) and src.op != "placeholder" and str(src.target) in _VIEWS and src.args:
            src = src.args[0]
        if w is not None and isinstance(src, fx.Node) and src.op == "placeholder" \
                and roles.get(src.name, ("input", ""))[0] == "input":
            result.embeddings[w] = w.rpartition(".")[0]
    # does a linear's output reach another linear (through call nodes)? One pass from the graph's end
    reaches: set = set()                          # nodes with a linear among their descendants
    for n in reversed(captured.graph.graph.nodes):
        if any(u.op == "call_function" and (u in linears or u in reaches) for u in n.users):
            reaches.add(n)
    feeds_linear = {lin for lin in linears if lin in reaches}
    for lin, (w, _) in linears.items():
        if lin in feeds_linear or block_of.get(lin) is not None or (w in result.params and w not in result.embeddings):
            continue
        result.columns[w] = w.rpartition(".")[0]
        result.heads_out.add(w)
        if str(lin.target) == "aten.addmm.default":
            b = _param_of(lin.args[0], roles)
            if b is not None:
                result.column_biases.add(b)


def _holds_tensors(node: fx.Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        return any(isinstance(x, torch.Tensor) for x in v)
    return isinstance(v, torch.Tensor)


def _propagate_split(captured, tp: TensorParallel) -> None:
    """Mark every node computed from a split tensor, forward and backward, except a matmul of a
    weight that contracts the split dimension (both operands split: the row's forward, the
    column's input gradient), whose output is whole."""
    roles = captured.roles
    split = tp.split
    params = tp.params
    for n in captured.graph.graph.nodes:
        if n.op == "placeholder":
            if roles.get(n.name, ("", ""))[1] in params and roles.get(n.name, ("", ""))[0] == "param":
                split.add(n.name)
            continue
        if n.op != "call_function":
            continue
        if not _holds_tensors(n):
            continue                        # sizes (sym_size) and scalars: not data
        if not any(a.name in split for a in n.all_input_nodes):
            continue
        if str(n.target) == "aten.embedding.default":
            continue                        # a vocabulary-parallel lookup: all-reduced, whole
        if str(n.target) in _MATMULS:
            ops = [a for a in _operands(n) if isinstance(a, fx.Node)]
            both = len(ops) == 2 and all(a.name in split for a in ops)
            if both and any(_param_of(a, roles) is not None for a in ops):
                # contracts the split dimension: whole (partial sums all-reduced); under sequence
                # parallelism its full output is reduce-scattered
                tp.edges[n.name] = [n.name]
                continue
            if not both:
                tp.edges[n.name] = [a.name for a in ops if a.name not in split]
        split.add(n.name)


# --- pipeline stages ------------------------------------------------------------------------------

def chunk_blocks(n_blocks: int, chunks: int) -> list[list[int]]:
    """Consecutive blocks per chunk, as even as the count allows (the first chunks take the remainder).

    >>> chunk_blocks(10, 4)
    [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    """
    if chunks > n_blocks:
        raise UsageError(f"pp * pp-interleave = {chunks} chunks of the model, but it has {n_blocks} repeated "
                         f"blocks; accepted: pp * pp-interleave <= {n_blocks}")
    base, extra = divmod(n_blocks, chunks)
    out, start = [], 0
    for c in range(chunks):
        size = base + (1 if c < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def step_stages(steps: list[Step], block_of: list[int | None], stage_of_block: dict[int, int], last: int) -> list:
    """The stage each step runs on (None for the start and the optimizer step, which every stage has).
    Ops outside blocks run on the stage of the last block op before them in time (forward: the first
    stage when none; backward: the last stage, whose head and loss the backward starts with). So the
    sum of a block input's gradients, made after that block's backward, is its stage's, which sends it."""
    out: list[int | None] = [None] * len(steps)
    current = 0
    for i, st in enumerate(steps):
        if st.phase in ("forward", "loss"):
            b = block_of[i]
            if b is not None:
                current = stage_of_block[b]
            out[i] = current
    current = last
    for i, st in enumerate(steps):
        if st.phase == "backward":
            b = block_of[i]
            if b is not None:
                current = stage_of_block[b]
            out[i] = current
    return out


# --- the analysis -----------------------------------------------------------------------------------

@dataclass
class StageMemory:
    stage: int
    model: MemoryModel
    blocks: list[int]                 # the blocks it runs
    microbatches_in_flight: sympy.Rational


class ParallelMemory:
    """Per-stage memory models of one parallel configuration; the peak is the largest stage's."""

    def __init__(self, stages: list[StageMemory], options, notes: list[str], tp: TensorParallel,
                 units: int, param_bytes: dict, boundary_bytes: sympy.Expr, layers: int,
                 blocks: Blocks | None = None, stage_of_block: dict[int, int] | None = None,
                 block_output_bytes: sympy.Expr = sympy.Integer(0), stage_units: dict[int, int] | None = None):
        self.stages, self.options, self.notes, self.tp = stages, options, notes, tp
        self.units = units                    # FSDP units (blocks + root) per stage, for the comm volumes
        self.param_bytes = param_bytes        # per stage: {"params", "grads"} bytes on one rank, whole (unsharded)
        self.boundary_bytes = boundary_bytes  # what pp sends per micro-batch (1/tp with sequence parallelism)
        self.block_output_bytes = block_output_bytes   # a block's whole [b, s, h] output (tp's collectives)
        self.layers = layers
        self.blocks = blocks
        self.stage_of_block = stage_of_block or {}
        self.stage_units = stage_units or {}  # FSDP units on each stage
        self.warnings = list(notes)

    def saved_activations(self, values: dict[str, int]) -> list[dict]:
        """Per stage, what Korthikanti et al. (2022) count as activation memory: the tensors one
        micro-batch's forward leaves for the backward (live at the stage's first backward op), split
        into those made inside the repeated blocks and the rest, and how many micro-batches' worth
        the stage holds then (1 + those in flight)."""
        from costmodel.symbols import dim_symbol
        sub = {dim_symbol(d): v for d, v in values.items()}
        out = []
        for st in self.stages:
            m = st.model
            first_backward = next((i for i, step in enumerate(m.steps) if step.phase == "backward"), None)
            blocks = other = 0
            for b in m.buffers:
                if first_backward is None or b.category != ACTIVATIONS or b.node.endswith(IN_FLIGHT) \
                        or not (b.start < first_backward <= b.end) or m.steps[b.start].phase == "start":
                    continue
                size = int(b.size.xreplace(sub))
                inside = self.blocks is not None and self.blocks.index_of(m.steps[b.start].module or "") is not None
                if inside:
                    blocks += size
                else:
                    other += size
            out.append({"stage": st.stage, "blocks_bytes": blocks, "other_bytes": other,
                        "microbatches_held": 1 + st.microbatches_in_flight})
        return out

    def model_states(self, values: dict[str, int]) -> list[dict]:
        """Per stage, the resident bytes of weights, gradients and optimizer state (master weights
        included) of the parameters inside the repeated blocks, and of the others."""
        from costmodel.symbols import dim_symbol
        sub = {dim_symbol(d): v for d, v in values.items()}
        out = []
        for st in self.stages:
            m = st.model
            last = len(m.steps) - 1
            blocks = other = 0
            for b in m.buffers:
                if b.category not in (PARAMS, GRADS, STATE) or not b.param or not (b.start == 0 and b.end >= last - 1):
                    continue
                size = int(b.size.xreplace(sub))
                if self.blocks is not None and self.blocks.index_of(b.param) is not None:
                    blocks += size
                else:
                    other += size
            out.append({"stage": st.stage, "blocks_bytes": blocks, "other_bytes": other})
        return out

    def stage_of_param(self) -> dict[str, list[int]]:
        """Parameter name -> the stages that hold it (two for tied weights on the first and last)."""
        out: dict[str, list[int]] = defaultdict(list)
        for st in self.stages:
            for b in st.model.buffers:
                if b.category == PARAMS and b.param and st.stage not in out[b.param]:
                    out[b.param].append(st.stage)
        return dict(out)

    @property
    def peak(self) -> sympy.Expr:
        exprs = [s.model.peak for s in self.stages]
        return exprs[0] if len(exprs) == 1 else sympy.Max(*exprs, evaluate=False)

    def evaluate(self, values: dict[str, int]) -> list[MemoryPoint]:
        return [s.model.evaluate(values) for s in self.stages]

    def peak_at(self, values: dict[str, int], sizes: dict | None = None) -> tuple[int, int]:
        """(stage, peak bytes) of the largest stage, as `largest` finds them, without the stages'
        reductions (MemoryModel.peak_at; `sizes` may be shared by the builds of one capture)."""
        peaks = [s.model.peak_at(values, sizes) for s in self.stages]
        k = max(range(len(peaks)), key=lambda i: peaks[i])
        return k, peaks[k]

    def largest(self, values: dict[str, int]) -> tuple[int, MemoryPoint, list[MemoryPoint]]:
        points = self.evaluate(values)
        k = max(range(len(points)), key=lambda i: points[i].peak_bytes)
        return k, points[k], points


def build(base: MemoryModel, captured, blocks: Blocks | None, options, cache: dict | None = None) -> ParallelMemory:
    """The per-stage memory of `options`' parallel configuration, from `base` (the single-device
    model of `captured`, at the micro-batch). See the module docstring. `cache`: a dict that the
    builds of one capture share (`plan` tries dozens of configurations): what depends only on the
    tensor-parallel split and the pipeline stages is made once, each configuration edits a copy."""
    par = options.parallel
    cache = {} if cache is None else cache
    notes: list[str] = []
    params = param_infos(captured)
    if blocks is None and (par.pp > 1 or par.fsdp > 1 or options.zero == 2):
        what = "pp" if par.pp > 1 else ("fsdp" if par.fsdp > 1 else "--zero 2")
        raise UsageError(f"{what} works on the model's repeated blocks (FSDP units, pipeline stages), but it has "
                         "no two sibling modules of the same structure; accepted: dp, tp")
    split = ("split", par.tp, options.sequence_parallel and par.tp > 1)
    if split not in cache:
        if ("tp", par.tp) not in cache:
            cache[("tp", par.tp)] = find_tensor_parallel(captured, par.tp, blocks)
        tp = cache[("tp", par.tp)]
        tl = _Timeline(base.steps, base.buffers, base.reads)
        local_shapes = {n: p.shape for n, p in params.items()}
        if par.tp > 1:
            _apply_tensor_parallel(tl, tp, par.tp, options.sequence_parallel, blocks, captured)
            for w in set(tp.columns) | set(tp.embeddings):
                local_shapes[w] = _split_dim(local_shapes[w], 0, par.tp)
            for b in tp.column_biases:
                local_shapes[b] = _split_dim(local_shapes[b], 0, par.tp)
            for w in tp.rows:
                local_shapes[w] = _split_dim(local_shapes[w], -1, par.tp)
        cache[split] = (tl, tp, local_shapes, block_spans(tl.steps, blocks))
    tl, tp, local_shapes, block_of = cache[split]
    notes += tp.notes
    chunks = chunk_blocks(len(blocks), par.pp * options.pp_interleave) if par.pp > 1 else \
        [list(range(len(blocks)))] if blocks is not None else [[]]
    stage_of_block = {b: c % par.pp for c, bs in enumerate(chunks) for b in bs}
    if par.pp > 1:
        notes.append(f"pp={par.pp}: blocks per stage " + ", ".join(
            f"{s}: {sum(len(chunks[c]) for c in range(s, len(chunks), par.pp))}" for s in range(par.pp))
            + " (consecutive, the first chunks take the remainder; embeddings on the first stage, head and "
              "loss on the last)")
    pipeline = (split, par.pp, options.pp_interleave)
    if par.pp > 1 and pipeline not in cache:
        cache[pipeline] = step_stages(tl.steps, block_of, stage_of_block, par.pp - 1)
    if par.pp > 1 and "flow" not in cache:
        cache["flow"] = grad_flow(captured)
    stages = []
    unit_count = 0
    param_bytes = {}
    stage_units: dict[int, int] = {}
    for s in range(par.pp):
        if par.pp > 1:
            key = (pipeline, options.microbatches, s)
            if key not in cache:
                cache[key] = _restrict(tl, cache[pipeline], s, options.microbatches, cache["flow"], blocks,
                                       captured.graph.graph)
            mine = cache[key]
            st = _Timeline(mine.steps, mine.buffers, mine.reads)
        else:
            st = _Timeline(tl.steps, tl.buffers, tl.reads)
        stage_params = {b.param for b in st.buffers if b.category == PARAMS and b.param}
        st_blocks = [b for b, k in stage_of_block.items() if k == s]
        units = _units(st, blocks, st_blocks)
        unit_count = max(unit_count, len(units))
        _data_parallel(st, options, params, local_shapes, stage_params, units, base.device)
        whole = {p: math.prod(local_shapes[p] or (1,)) * params[p].itemsize for p in stage_params}
        param_bytes[s] = {"params": sum(whole.values()),
                          "grads": sum(v for p, v in whole.items() if params[p].trainable)}
        inflight = _compose_microbatches(st, options, s, par.pp, cache)
        stages.append(StageMemory(s, st.model(base.dims, base), sorted(st_blocks), inflight))
        stage_units[s] = len([u for u in units if u.params])
    if "block output" not in cache:
        cache["block output"] = _block_output_bytes(base, blocks)
    whole = cache["block output"]
    boundary = sympy.expand(whole / par.tp) if par.tp > 1 and options.sequence_parallel else whole
    return ParallelMemory(stages, options, notes, tp, unit_count, param_bytes, boundary,
                          len(blocks) if blocks is not None else 0, blocks, stage_of_block, whole, stage_units)


def _block_output_bytes(base: MemoryModel, blocks: Blocks | None) -> sympy.Expr:
    """The size of the first block's output (the last storage its forward makes)."""
    if blocks is None:
        return sympy.Integer(0)
    block_of = block_spans(base.steps, blocks)
    last = max((i for i, st in enumerate(base.steps) if block_of[i] == 0 and st.phase == "forward"), default=None)
    if last is None:
        return sympy.Integer(0)
    made = [b for b in base.buffers if b.start == last and b.category == ACTIVATIONS]
    return made[-1].size if made else sympy.Integer(0)


def point_extra(par: "ParallelMemory", points: list[MemoryPoint], dims: dict[str, int]) -> dict:
    """The contract's `parallel`, `ranks` (memory) and `communication` (untimed) at one point; the
    times come from hardware.parallel_step with a device."""
    from costmodel.hardware.parallel_step import stage_collectives
    o = par.options
    p = o.parallel
    batch = next((v for d, v in dims.items() if "batch" in d.lower()), None)
    return {"parallel": {**p.to_dict(), "zero": o.zero, "microbatches": o.microbatches, "world_size": p.world_size,
                         "global_batch": batch * p.dp * p.fsdp * o.microbatches if batch is not None else None,
                         "sequence_parallel": o.sequence_parallel, "pp_interleave": o.pp_interleave,
                         "checkpointing": o.checkpointing, "master_weights": o.master_weights},
            "ranks": [{"stage": s.stage, "blocks": s.blocks, "peak_memory_bytes": m.peak_bytes, "memory": m.breakdown,
                       "at": m.at, "compute_time_s": None, "communication_time_s": None,
                       "exposed_communication_time_s": None} for s, m in zip(par.stages, points)],
            "communication": [{**c.to_dict(), "stage": s.stage} for s in par.stages
                              for c in stage_collectives(par, s.stage, dims)],
            "step_time_s": None, "tokens_per_s": None, "mfu": None}


def _split_dim(shape: tuple[int, ...], dim: int, n: int) -> tuple[int, ...]:
    s = list(shape)
    s[dim] = -(-s[dim] // n)
    return tuple(s)


# --- tensor parallelism on the timeline ----------------------------------------------------------

def _apply_tensor_parallel(tl: _Timeline, tp: TensorParallel, n: int, sequence_parallel: bool,
                           blocks: Blocks | None, captured) -> None:
    """Split storages 1/tp (see `find_tensor_parallel`); with sequence parallelism the blocks' other
    activations too, and each matmul at a region's edge holds the full tensor it gathers or reduces."""
    split_params = tp.params
    full_size: dict[str, sympy.Expr] = {}
    for b in tl.buffers:
        if b.source and b.source not in full_size:
            full_size[b.source] = b.size
        if (b.param and b.param in split_params) or (not b.param and b.source in tp.split):
            if b.shape != "[]":
                b.size = sympy.expand(b.size / n)
    if not sequence_parallel or blocks is None:
        return
    in_block = block_spans(tl.steps, blocks)
    step_of = {st.node: i for i, st in enumerate(tl.steps)}
    for b in tl.buffers:
        if b.param or b.category in (PARAMS, STATE, GRADS) or b.source in tp.split or not b.source:
            continue
        if in_block[b.start] is not None and b.shape != "[]":
            b.size = sympy.expand(b.size / n)
    for node, operands in tp.edges.items():
        i = step_of.get(node)
        if i is None or in_block[i] is None:
            continue
        gathered = sum((full_size.get(o, 0) for o in operands), sympy.Integer(0))
        if gathered != 0:
            tl.add(gathered, TEMPORARIES, i, i, f"{node} (sequence-parallel gather / reduce-scatter)")


# --- pipeline stages on the timeline ---------------------------------------------------------------

SENT_GRADIENT = "(gradient sent to the previous stage)"
SENT_OUTPUT = "(sent to the next stage)"
# ops whose derivative for an argument needs no tensor saved (linear in it, or moving its data)
_NOTHING_SAVED = _VIEWS | {"aten.add.Tensor", "aten.sub.Tensor", "aten.neg.default", "aten.cat.default",
                           "aten.stack.default", "aten.slice.Tensor", "aten.select.int", "aten.split.Tensor",
                           "aten.split_with_sizes.default", "aten.sum.default", "aten.sum.dim_IntList",
                           "aten.mean.dim", "aten.mean.default", "<built-in function getitem>"}


@dataclass
class GradFlow:
    """Which values of the captured graph have a gradient, and which backward ops compute gradients."""

    requires: set[str]     # nodes whose value depends on a trainable parameter (autograd tracks them)
    gradient: set[str]     # backward ops fed by the loss's gradient (not a checkpoint's recomputation)


def grad_flow(captured) -> GradFlow:
    """`GradFlow` of a captured training step. The loss's gradient starts at the loss op's
    `ones_like`-style seed (the last loss op a backward op reads when there is none); the ops that
    a checkpointed block re-runs in the backward read saved values only, never that seed."""
    graph = captured.graph.graph
    roles, trainable = captured.roles, captured.trainable
    requires: set[str] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            role, name = roles.get(n.name, ("input", n.name))
            if role == "param" and name in trainable:
                requires.add(n.name)
        elif n.op == "call_function" and any(a.name in requires for a in n.all_input_nodes):
            requires.add(n.name)
    phase = {n: n.meta.get("costmodel_phase") for n in graph.nodes}
    read_by_backward = [n for n in graph.nodes if phase[n] == "loss"
                        and any(phase[u] == "backward" for u in n.users)]
    seeds = [n for n in read_by_backward if str(n.target).split(".")[1:2] in (["ones_like"], ["full_like"],
                                                                               ["full"], ["ones"])]
    gradient = {n.name for n in (seeds or read_by_backward[-1:])}
    for n in graph.nodes:
        if phase[n] == "backward" and any(a.name in gradient for a in n.all_input_nodes):
            gradient.add(n.name)
    return GradFlow(requires, gradient)


def _floating(dtype: str) -> bool:
    t = getattr(torch, dtype, None)
    return isinstance(t, torch.dtype) and t.is_floating_point


def _saved_operands(node: fx.Node, newly: set[str]) -> list:
    """The arguments autograd saves for the derivative of `node` with respect to its arguments in
    `newly` (tensors that now require a gradient): a product's other factor, a quotient's divisor
    (and its dividend, for the divisor's derivative), a matmul's other matrix; nothing for ops
    linear in them; any other op: all its tensor arguments (the conservative case)."""
    t = str(node.target)
    if t in _NOTHING_SAVED:
        return []
    if t == "aten.mul.Tensor" or t in _MATMULS:
        ops = _operands(node) if t in _MATMULS else list(node.args[:2])
        return [a for a in ops if isinstance(a, fx.Node) and a.name not in newly]
    if t == "aten.div.Tensor":
        a, b = node.args[:2]
        out = [b] if isinstance(b, fx.Node) else []
        if isinstance(b, fx.Node) and b.name in newly and isinstance(a, fx.Node):
            out.append(a)
        return out
    return [a for a in node.all_input_nodes if _holds_tensors(a)]


def received_gradients(out: "_Timeline", graph: fx.Graph, flow: GradFlow, received: list[Buffer],
                       step_of: dict[str, int], blocks: Blocks | None, last_backward: int) -> None:
    """A stage's work for the floating-point tensors it receives that have no gradient in the model
    (`received`, its receive buffers): pipelining makes them require one (see the module docstring).
    Every op reading them (or a tensor made from them alone) now saves what its derivative for them
    needs (`_saved_operands`) until the block's last gradient op that reads them (a checkpointed
    block: its recomputation saves, its forward does not); each gradient op reading them makes a
    product of its own size beside its own (a product's derivative for the other factor), and each
    tensor's gradient, made from the first of those ops on, is sent back to the stage it came from."""
    nodes = {n.name: n for n in graph.nodes}
    newly = {b.source for b in received}
    todo = [nodes[n] for n in newly if n in nodes]
    consumers: list[fx.Node] = []
    gradient_ops: list[fx.Node] = []
    seen: set = set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen or u.op != "call_function" or u.name not in step_of:
                continue
            seen.add(u)
            if u.name in flow.gradient:
                gradient_ops.append(u)
                continue
            consumers.append(u)
            v = u.meta.get("val")
            if u.name not in flow.requires and isinstance(v, torch.Tensor) and v.is_floating_point():
                newly.add(u.name)
                todo.append(u)
    if not gradient_ops:
        return                                      # nothing differentiates through them here

    def block(n: fx.Node):
        return blocks.index_of(n.meta.get("costmodel_module", "")) if blocks is not None else None
    grad_ends: dict = {}
    for g in gradient_ops:
        b = block(g)
        grad_ends[b] = max(grad_ends.get(b, 0), step_of[g.name])
    recomputed = {block(u) for u in consumers if u.meta.get("costmodel_phase") == "backward"}
    made = {b.source: b for b in out.buffers if b.source and not b.param and not (b.start == 0 and b.end == out.last)}
    for u in consumers:
        b = block(u)
        if b not in grad_ends or (u.meta.get("costmodel_phase") != "backward" and b in recomputed):
            continue
        for a in _saved_operands(u, newly):
            while a.name not in made and str(a.target) in _VIEWS and a.args and isinstance(a.args[0], fx.Node):
                a = a.args[0]
            buf = made.get(a.name)
            if buf is not None and buf.end < grad_ends[b]:
                buf.end = grad_ends[b]
                buf.node = f"{buf.node} (saved: a received tensor needs its gradient)"
    for g in gradient_ops:
        buf = made.get(g.name)
        if str(g.target) == "aten.mul.Tensor" and buf is not None:
            out.add(buf.size, TEMPORARIES, step_of[g.name], step_of[g.name],
                    f"{g.name} (its twin: the product for a received tensor's gradient)", buf.dtype, buf.shape)
    first = min(step_of[g.name] for g in gradient_ops)
    for r in received:
        out.add(r.size, TEMPORARIES, first, max(first, last_backward),
                f"{r.source} gradient (made for pipelining) {SENT_GRADIENT}", r.dtype, r.shape)
IN_FLIGHT = "in flight (saved activations)"
KEPT_OUTPUT = "(output, kept until its backward)"


def _restrict(tl: _Timeline, stages_of: list, s: int, microbatches: int, flow: GradFlow | None = None,
              blocks: Blocks | None = None, graph: fx.Graph | None = None) -> _Timeline:
    """Stage s's own timeline (see the module docstring): its steps (and the start and optimizer
    steps every stage has); the parameters its ops read, with their gradients; the storages its ops
    make; the storages it reads from other stages, as receive buffers; with `flow` (and the graph),
    what pipelining adds for the received tensors that have no gradient in the model."""
    keep = [i for i, st in enumerate(tl.steps) if stages_of[i] in (s, None)]
    new = {i: k for k, i in enumerate(keep)}
    steps = [tl.steps[i] for i in keep]
    last = len(steps) - 1
    out = _Timeline(steps, [], [[] for _ in keep])
    readers: dict[int, set] = defaultdict(set)            # buffer -> stages reading it
    read_here: dict[int, list[int]] = defaultdict(list)   # buffer -> stage-s steps reading it
    for i, bufs in enumerate(tl.reads):
        for b in bufs:
            readers[b].add(stages_of[i])
            if stages_of[i] == s:
                read_here[b].append(i)
    mine = {b.param for j, b in enumerate(tl.buffers) if b.category == PARAMS and b.param and s in readers[j]}
    last_backward = max((k for k, st in enumerate(steps) if st.phase == "backward"), default=last)
    loss_reads = {b for i, bufs in enumerate(tl.reads) if tl.steps[i].phase == "loss" for b in bufs}
    received: list[Buffer] = []            # received forward tensors with no gradient in the model
    # step -> the shapes of the parameter gradients it makes (a tied weight's gradient sums partials)
    grad_shapes: dict[int, set] = defaultdict(set)
    for b in tl.buffers:
        if b.category == GRADS and b.param:
            grad_shapes[b.start].add(b.shape)

    def clip(start: int, end: int) -> tuple[int, int]:
        a = new[start] if start in new else min((k for j, k in new.items() if j >= start), default=last)
        z = new[end] if end in new else max((k for j, k in new.items() if j <= end), default=0)
        return a, max(a, z)

    for j, b in enumerate(tl.buffers):
        if b.param:                               # a parameter, its gradient or optimizer state
            if b.param in mine:
                nb = _copy(b)
                nb.start, nb.end = clip(b.start, b.end)
                out.buffers.append(nb)
            continue
        resident = b.start == 0 and b.end >= tl.last
        if resident:                              # model buffers and inputs: where they are read
            if s in readers[j]:
                nb = _copy(b)
                nb.start, nb.end = 0, last
                if b.category == ACTIVATIONS and microbatches > 1:
                    # the schedule takes the step's whole batch and splits it into views
                    nb.size = sympy.expand(b.size * microbatches)
                    nb.node = f"{b.node} (the whole batch: {microbatches} micro-batches)"
                out.buffers.append(nb)
            continue
        made_at = stages_of[b.start]
        if made_at == s:
            nb = _copy(b)
            nb.start, nb.end = clip(b.start, b.end)
            sent = bool(readers[j] - {s, None})
            output = j in loss_reads and steps[nb.start].phase == "forward"
            if (sent or output) and steps[nb.start].phase != "backward":
                # the schedule's forward cache keeps the stage's output until its backward is done
                nb.end = max(nb.end, last_backward)
                nb.node = f"{b.node} {SENT_OUTPUT if sent else KEPT_OUTPUT}"
                if sent and flow is not None and b.source not in flow.requires and _floating(b.dtype):
                    # no gradient in the model, but the next stage sends one back: its receive buffers
                    out.add(sympy.expand(b.size * microbatches), TEMPORARIES, 0, last,
                            f"{b.node} (received gradient, made for pipelining: {microbatches} buffer"
                            f"{'s' if microbatches > 1 else ''}, one per micro-batch)", b.dtype, b.shape)
            elif sent:
                nb.end = max(nb.end, last_backward)    # the backward cache holds it until it is sent
                nb.node = f"{b.node} {SENT_GRADIENT}"
            out.buffers.append(nb)
        elif made_at is None:                     # made by the optimizer step: the stage's own is made again
            continue
        elif read_here.get(j) and tl.steps[b.start].phase == "backward" \
                and all(b.shape in grad_shapes.get(i, ()) for i in read_here[j]):
            # a parameter used on two stages (tied embeddings): each stage keeps its own copy and
            # gradient, summed across the stages after the backward (Megatron's embedding group),
            # nothing received per micro-batch
            continue
        elif read_here.get(j):
            # from another stage: torch.distributed.pipelining keeps one receive buffer per micro-batch
            nb = _copy(b)
            nb.start, nb.end = 0, last
            nb.size = sympy.expand(b.size * microbatches)
            backward = tl.steps[read_here[j][0]].phase == "backward"
            nb.category = TEMPORARIES if backward else ACTIVATIONS
            nb.node = (f"{b.node} (received {'gradient' if backward else 'activation'}: {microbatches} buffer"
                       f"{'s' if microbatches > 1 else ''}, one per micro-batch)")
            out.buffers.append(nb)
            if flow is not None and not backward and b.source not in flow.requires and _floating(b.dtype):
                received.append(_copy(b))
    if received and graph is not None:
        step_of = {st.node: k for k, st in enumerate(steps)}
        received_gradients(out, graph, flow, received, step_of, blocks, last_backward)
    return out


# --- data parallelism ------------------------------------------------------------------------------

@dataclass
class _Unit:
    """An FSDP unit on one stage: a block (or the root, index None), its parameters and its spans."""

    index: int | None
    params: list[str]
    forward: tuple[int, int] | None         # first and last forward step
    backward: tuple[int, int] | None        # first and last backward step


def _units(tl: _Timeline, blocks: Blocks | None, stage_blocks: list[int]) -> list[_Unit]:
    """The stage's blocks in forward order, then the root (its other parameters)."""
    block_of = block_spans(tl.steps, blocks)
    spans: dict[int, dict[str, list[int]]] = defaultdict(lambda: {"forward": [], "backward": []})
    for i, st in enumerate(tl.steps):
        b = block_of[i]
        if b is None:
            continue
        phase = "backward" if st.phase == "backward" else ("forward" if st.phase in ("forward", "loss") else None)
        if phase:
            spans[b][phase].append(i)
    params = [b.param for b in tl.buffers if b.category == PARAMS and b.param]
    units = []
    owned = set()
    for b in sorted(stage_blocks, key=lambda b: min(spans[b]["forward"], default=0)):
        mine = [p for p in params if blocks.index_of(p) == b]
        owned.update(mine)
        f, bw = spans[b]["forward"], spans[b]["backward"]
        units.append(_Unit(b, mine, (min(f), max(f)) if f else None, (min(bw), max(bw)) if bw else None))
    root = [p for p in params if p not in owned]
    fwd = [i for i, st in enumerate(tl.steps) if st.phase in ("forward", "loss")]
    bwd = [i for i, st in enumerate(tl.steps) if st.phase == "backward"]
    units.append(_Unit(None, root, (min(fwd), max(fwd)) if fwd else None, (min(bwd), max(bwd)) if bwd else None))
    return units


def _storage(options, p: ParamInfo) -> tuple[int, str]:
    """(itemsize, dtype) a parameter is kept in: float32 for master weights under FSDP's mixed
    precision, else as captured."""
    if options.master_weights and options.parallel.fsdp > 1:
        return 4, "float32"
    return p.itemsize, p.dtype


def _state_bytes(options, p: ParamInfo, shape: tuple[int, ...], device: str) -> int:
    """One rank's optimizer state for a parameter's local shape (master weights included)."""
    elements = opt.state_elements(options.optimizer, shape)
    if options.master_weights:
        itemsize = 4
        if options.parallel.fsdp == 1:
            elements += math.prod(shape) if shape else 1      # the float32 master copy
    else:
        itemsize = p.itemsize
    step = CPU_STEP_BYTES if device == "cpu" and options.optimizer not in ("sgd", "sgd-momentum") else 0
    return elements * itemsize + step


def _data_parallel(tl: _Timeline, options, params: dict[str, ParamInfo], local_shapes: dict, stage_params: set,
                   units: list[_Unit], device: str) -> None:
    """Parameters, gradients, optimizer state and their collectives' buffers on one rank."""
    par = options.parallel
    opt_step = next((i for i, st in enumerate(tl.steps) if st.phase == "optimizer"), tl.last)
    # the optimizer's state and temporaries, for the local shards
    tl.buffers = [b for b in tl.buffers if b.category != STATE and
                  not (b.category == TEMPORARIES and b.start == opt_step and not b.param and not b.source)]
    trainable = [p for p in sorted(stage_params) if params[p].trainable]
    if par.fsdp > 1:
        shards = {p: _split_dim(local_shapes[p], 0, par.fsdp) if local_shapes[p] else () for p in stage_params}
        # the first rank's rows: ceil(rows / N); the optimizer state is on those rows
        owned = {p: shards[p] for p in trainable}
    elif options.zero >= 1 and par.dp > 1:
        owned = _zero_partition(trainable, local_shapes, params, par.dp, options.zero)
    else:
        owned = {p: local_shapes[p] for p in trainable}
    largest, groups = 0, {}
    for p, shape in owned.items():
        info = params[p]
        state = _state_bytes(options, info, shape, device)
        if state:
            tl.add(state, STATE, 0, tl.last, f"{p} ({options.optimizer} state)", "float32" if options.master_weights
                   else info.dtype, str(list(shape)), param=p)
        itemsize = 4 if options.master_weights else info.itemsize
        nbytes = (math.prod(shape) if shape else 1) * itemsize
        largest = max(largest, nbytes)
        groups[str(itemsize)] = groups.get(str(itemsize), 0) + nbytes
    temp = optimizer_temporary_bytes(options.optimizer, device, largest, groups)
    if temp:
        tl.add(temp, TEMPORARIES, opt_step, opt_step, f"optimizer.{options.optimizer} temporaries",
               shape="foreach: one per parameter" if device == "cuda" else "per parameter")
    if par.fsdp > 1:
        _fsdp(tl, options, params, local_shapes, units, opt_step)
    elif options.zero == 2 and par.dp > 1:
        _zero2(tl, options, params, local_shapes, units, opt_step)
    elif options.master_weights:
        # Megatron-LM's mixed precision: each weight's gradient accumulates in a float32 main_grad
        # buffer allocated with the model (the backward's weight-gradient GEMM adds into it), which
        # its DDP also all-reduces in place: 2 + 4 + 4 + 8 = 18 bytes per parameter with Adam
        # (Megatron's theoretical_memory_usage.py; Korthikanti et al. 2022, section 5)
        tl.buffers = [b for b in tl.buffers if not (b.category == GRADS and b.param in stage_params)]
        for p in trainable:
            shape = local_shapes[p]
            tl.add((math.prod(shape) if shape else 1) * 4, GRADS, 0, tl.last, f"{p} (float32 main_grad)",
                   "float32", str(list(shape)), param=p)
    elif par.dp > 1:
        grads = sum(math.prod(local_shapes[p] or (1,)) * params[p].itemsize for p in trainable)
        if grads:
            tl.add(grads, GRADS, 0, tl.last, "DDP gradient buckets (bucket_cap_mb=25, flat, whole run)",
                   shape=f"{math.ceil(grads / DDP_BUCKET_BYTES)} bucket(s)")


def _zero_partition(trainable: list[str], shapes: dict, params: dict[str, ParamInfo], dp: int,
                    stage: int) -> dict[str, tuple]:
    """The first rank's optimizer state. Stage 1: PyTorch's ZeroRedundancyOptimizer assigns whole
    parameters, largest first, to the rank with the fewest bytes so far (the first rank with the
    largest total is reported). Stage 2: 1/dp of every parameter (flat partition)."""
    if stage == 2:
        return {p: (-(-math.prod(shapes[p] or (1,)) // dp),) for p in trainable}
    load = [0] * dp
    owner: dict[str, int] = {}
    for p in sorted(trainable, key=lambda p: -math.prod(shapes[p] or (1,)) * params[p].itemsize):
        r = min(range(dp), key=lambda r: load[r])
        owner[p] = r
        load[r] += math.prod(shapes[p] or (1,)) * params[p].itemsize
    heaviest = max(range(dp), key=lambda r: load[r])
    return {p: shapes[p] for p in trainable if owner[p] == heaviest}


def _fsdp(tl: _Timeline, options, params: dict[str, ParamInfo], local_shapes: dict, units: list[_Unit],
          opt_step: int) -> None:
    """FSDP2's buffers on one rank (see the module docstring for the lifetimes)."""
    n = options.parallel.fsdp
    compute = {p: params[p].itemsize for p in params}                # the captured (compute) dtype
    padded = {p: _split_dim(local_shapes[p], 0, n) if local_shapes[p] else () for p in params}

    def shard_numel(p):
        return math.prod(padded[p]) if padded[p] else 1

    def storage_itemsize(p):
        return _storage(options, params[p])[0]

    reduce_itemsize = (lambda p: 4) if options.master_weights else (lambda p: params[p].itemsize)
    # sharded parameters, resident
    unit_params = {p for u in units for p in u.params}
    for b in tl.buffers:
        if b.category == PARAMS and b.param in unit_params:
            b.size = sympy.Integer(shard_numel(b.param) * storage_itemsize(b.param))
            b.node = f"{b.param} (sharded 1/{n})"
    ins = _Insertions(tl)
    first_forward = next(i for i, st in enumerate(tl.steps) if st.phase in ("forward", "loss"))
    last_forward = max(i for i, st in enumerate(tl.steps) if st.phase == "forward")
    bwd = [i for i, st in enumerate(tl.steps) if st.phase == "backward"]
    first_backward, last_backward = (min(bwd), max(bwd)) if bwd else (last_forward, last_forward)
    blocks = [u for u in units if u.index is not None and u.params]
    root = next(u for u in units if u.index is None)
    trainable_grads = {b.param: b for b in tl.buffers if b.category == GRADS and b.param}

    def unsharded(u) -> int:
        return sum(shard_numel(p) * n * compute[p] for p in u.params)

    def gathered_input(u) -> int:
        return sum(shard_numel(p) * compute[p] for p in u.params) if options.master_weights else 0

    # forward: the root unshards first; each unit's all-gather buffer lives until the next unit's
    # copy-out (the last one until the root's forward returns), its unsharded parameters until its
    # forward ends (the root's until the end of the backward)
    order = ([root] if root.params else []) + blocks
    gathers = []
    copy_outs = []
    for u in order:
        at = first_forward if u is root else (u.forward[0] if u.forward else first_forward)
        ag_start = ins.point(at, f"fsdp all-gather {_label(u)} (forward)", False, "forward")
        copy_out = ins.point(at, f"fsdp copy-out {_label(u)} (forward)", False, "forward")
        if gathered_input(u):
            ins.buffer(gathered_input(u), TEMPORARIES, ag_start, ag_start,
                       f"{_label(u)} all-gather input (cast to the compute dtype)")
        ins.buffer(unsharded(u), TEMPORARIES, ag_start, last_forward, f"{_label(u)} all-gather buffer (forward)")
        gathers.append(len(ins.pending) - 1)
        copy_outs.append(copy_out)
        end = last_backward if u is root else (u.forward[1] if u.forward else at)
        ins.buffer(unsharded(u), PARAMS, copy_out, end, f"{_label(u)} unsharded parameters (forward)")
    for k in range(len(gathers) - 1):
        b, start_, _ = ins.pending[gathers[k]]
        ins.pending[gathers[k]] = (b, start_, copy_outs[k + 1])
    # the last all-gather buffer: freed when the root's forward returns (end of the model's forward)
    # backward: the root's pre-backward prefetches the last block; each block's pre-backward copies
    # out and prefetches the one before it; its post-backward reshards and reduce-scatters
    if bwd:
        prefetched: dict[int, int] = {}
        rev = list(reversed(blocks))
        if rev:
            h = ins.point(first_backward, f"fsdp all-gather {_label(rev[0])} (backward prefetch)", False, "backward")
            prefetched[id(rev[0])] = h
        prev_rs = None
        for k, u in enumerate(rev):
            start, stop = u.backward if u.backward else (first_backward, first_backward)
            copy_out = ins.point(start, f"fsdp copy-out {_label(u)} (backward)", False, "backward")
            ins.buffer(unsharded(u), TEMPORARIES, prefetched[id(u)], copy_out,
                       f"{_label(u)} all-gather buffer (backward)")
            ins.buffer(unsharded(u), PARAMS, copy_out, stop, f"{_label(u)} unsharded parameters (backward)")
            if k + 1 < len(rev):
                prefetched[id(rev[k + 1])] = ins.point(start, f"fsdp all-gather {_label(rev[k + 1])} "
                                                       "(backward prefetch)", False, "backward")
            prev_rs = _reduce_scatter(ins, tl, u, stop, n, padded, reduce_itemsize, trainable_grads, prev_rs,
                                      opt_step, last_backward)
        if root.params:
            _reduce_scatter(ins, tl, root, last_backward, n, padded, reduce_itemsize, trainable_grads, prev_rs,
                            opt_step, last_backward, last=True)
    ins.apply()


def _label(u: _Unit) -> str:
    return "root" if u.index is None else f"block {u.index}"


def _reduce_scatter(ins: _Insertions, tl: _Timeline, u: _Unit, stop: int, n: int, padded: dict, reduce_itemsize,
                    grads: dict[str, Buffer], prev_rs, opt_step: int, last_backward: int, last: bool = False):
    """A unit's post-backward, after its last backward step `stop`: the previous unit's
    reduce-scatter buffer is freed, this unit's gradients are copied into a new one (then freed),
    and 1/N of them stays as the sharded gradients until the optimizer step. Returns the pending
    index of the new reduce-scatter buffer (its end is set by the next unit's post-backward)."""
    mine = [p for p in u.params if p in grads]
    if not mine:
        return prev_rs
    copy_in = ins.point(stop, f"fsdp reduce-scatter {_label(u)}", True, "backward")
    out = ins.point(stop, f"fsdp sharded gradients {_label(u)}", True, "backward")
    if prev_rs is not None:
        b, start, _ = ins.pending[prev_rs]
        ins.pending[prev_rs] = (b, start, stop)
    size = sum(math.prod(padded[p] or (1,)) * n * reduce_itemsize(p) for p in mine)
    ins.buffer(size, TEMPORARIES, copy_in, copy_in if last else last_backward, f"{_label(u)} reduce-scatter buffer")
    rs = len(ins.pending) - 1
    for p in mine:
        ins.buffer(math.prod(padded[p] or (1,)) * reduce_itemsize(p), GRADS, out, opt_step,
                   f"{p} gradient (sharded 1/{n})", param=p)
        g = grads.pop(p)                       # the unsharded gradient: freed after the copy-in
        ins.removed.add(id(g))
        g.node = f"{g.node} (unsharded gradient of {p})"
        ins.pending.append((g, g.start, copy_in))
    return None if last else rs


def _zero2(tl: _Timeline, options, params: dict[str, ParamInfo], local_shapes: dict, units: list[_Unit],
           opt_step: int) -> None:
    """ZeRO-2: FSDP's gradient handling (a block's gradients until its backward ends, a reduce-scatter
    buffer, 1/dp kept) with whole parameters."""
    n = options.parallel.dp
    padded = {p: _split_dim(local_shapes[p], 0, n) if local_shapes[p] else () for p in params}
    ins = _Insertions(tl)
    grads = {b.param: b for b in tl.buffers if b.category == GRADS and b.param}
    bwd = [i for i, st in enumerate(tl.steps) if st.phase == "backward"]
    last_backward = max(bwd) if bwd else tl.last
    prev = None
    blocks = [u for u in units if u.index is not None]
    for u in reversed(blocks):
        if u.backward:
            prev = _reduce_scatter(ins, tl, u, u.backward[1], n, padded, lambda p: params[p].itemsize, grads, prev,
                                   opt_step, last_backward)
    root = next(u for u in units if u.index is None)
    _reduce_scatter(ins, tl, root, last_backward, n, padded, lambda p: params[p].itemsize, grads, prev, opt_step,
                    last_backward, last=True)
    ins.apply()


# --- micro-batches ---------------------------------------------------------------------------------

def in_flight(pp: int, stage: int, microbatches: int, interleave: int) -> tuple[sympy.Rational, sympy.Rational]:
    """Other micro-batches whose saved activations a stage holds while it runs the first one, and
    while it runs a later one (in units of one micro-batch of the whole stage).

    1F1B: min(pp - s - 1, m - 1) and min(pp - s - 1, m - 2). Interleaved with V chunks (Megatron-
    LM's schedule): (pp - s - 1) * 2 + (V - 1) * pp warm-up chunk-micro-batches and the one whose
    backward starts, each 1/V of the stage, less the V chunks of the stage's own timeline; on the
    first stage that is pp * (1 + (pp - 1) / (pp * V)) - 1 micro-batches (Korthikanti et al. 2022,
    section 4.2.3: the first stage holds L * (1 + (pp - 1) / (pp * V)) layers' activations).

    >>> in_flight(4, 0, 8, 1), in_flight(4, 3, 8, 1)
    ((3, 3), (0, 0))
    >>> in_flight(8, 0, 64, 3)[0]          # (14 + 16 + 1 - 3) / 3 chunk-micro-batches
    28/3
    """
    m, v = microbatches, interleave
    if v == 1:
        first = max(0, min(pp - stage - 1, m - 1))
        later = max(0, min(pp - stage - 1, m - 2)) if m > 1 else 0
        return sympy.Integer(first), sympy.Integer(later)
    # chunk-micro-batches held at the first backward: the warm-up forwards and the one in flight
    # (Megatron-LM's get_num_warmup_microbatches); the stage's own timeline already holds v chunks
    held = min((pp - stage - 1) * 2 + (v - 1) * pp + 1, m * v)
    later = min(held, m * v - 1)
    return sympy.Rational(max(0, held - v), v), sympy.Rational(max(0, later - v), v)


def _compose_microbatches(tl: _Timeline, options, stage: int, pp: int, cache: dict | None = None) -> sympy.Rational:
    """One micro-batch's timeline -> the step's: other micro-batches in flight, and with m > 1 a later
    micro-batch (accumulated gradients resident) before the optimizer step. `cache`: build's."""
    m = options.microbatches
    first, later = in_flight(pp, stage, m, options.pp_interleave)
    fb = [i for i, st in enumerate(tl.steps) if st.phase in ("forward", "loss", "backward")]
    if not fb:
        return first
    f0, b1 = min(fb), max(fb)
    boundary = next((i for i in fb if tl.steps[i].phase == "backward"), b1)
    saved = sympy.expand(sympy.Add(*[b.size for b in tl.buffers if b.category in (ACTIVATIONS, TEMPORARIES)
                                     and f0 <= b.start < boundary <= b.end and not b.param]))
    if m == 1:
        if first:
            tl.add(sympy.expand(first * saved), ACTIVATIONS, f0, b1,
                   f"{first} other micro-batch(es) {IN_FLIGHT}")
        return first
    last_forward = max((i for i in fb if tl.steps[i].phase in ("forward", "loss")), default=f0)
    # [start] F+B of the first micro-batch, F+B of a later one, then the optimizer step
    warmup = min(m, pp - stage)
    held = options.pp_interleave == 1 and warmup >= 2 and m > 2 * warmup - 2
    n = len(tl.steps)
    shift = b1 - f0 + 1
    copies = {} if cache is None else cache.setdefault("later steps", {})   # id -> (step, its copy)

    def later_step(st: Step) -> Step:
        if id(st) not in copies:             # the step is kept with its copy: its id stays its own
            copies[id(st)] = (st, _copy(st, node=f"{st.node} (later micro-batch)"))
        return copies[id(st)][1]
    steps = tl.steps[:b1 + 1] + [later_step(tl.steps[i]) for i in range(f0, b1 + 1)] + tl.steps[b1 + 1:]
    out = []
    for b in tl.buffers:                          # the stage's own copies: edited in place
        if b.start == 0 and b.end >= n - 1:       # resident
            b.end = len(steps) - 1
            out.append(b)
            continue
        if b.start > b1:                          # the optimizer step's own
            b.start, b.end = b.start + shift, b.end + shift
            out.append(b)
            continue
        if b.end > b1 and b.category == GRADS:
            # the first micro-batch's gradient is what the later ones add into
            added = _copy(b, start=b.start + shift, end=b.start + shift, category=TEMPORARIES,
                          node=f"{b.node} (later micro-batch, added into the accumulated gradient)")
            b.end += shift
            out += [b, added]
            continue
        later_copy = _copy(b, start=b.start + shift, end=b.end + shift, node=f"{b.node} (later micro-batch)")
        end = b.end + shift if b.end > b1 else b.end
        if b.node.endswith(SENT_OUTPUT) and held:
            # Schedule1F1B's `send_work` keeps a warm-up forward's send handle, which holds the
            # tensor, until the 1B1F phase ends (see the module docstring)
            end = max(end, b1 + shift)
        if b.node.endswith(SENT_GRADIENT):
            # the 1F1B loop's `bwd_sends` holds it until the next micro-batch's backward makes the
            # next ones (torch.distributed.pipelining's Schedule1F1B)
            end = max(end, b1 + shift)
        b.end = end
        out.append(b)
        out.append(later_copy)
        if b.node.endswith(KEPT_OUTPUT):
            # the schedule's loop variable (`output = stage.forward_one_chunk(...)` in
            # torch.distributed.pipelining's 1F1B) holds the previous micro-batch's output until the
            # next forward returns, after its backward has dropped the cache's reference
            out.append(_copy(b, start=f0 + shift, end=last_forward + shift,
                               node=f"{b.node} (the previous micro-batch's, held until this forward returns)"))
    tl.steps, tl.buffers, tl.reads = steps, out, [[]] * len(steps)     # reads are not needed from here on
    if first:
        tl.add(sympy.expand(first * saved), ACTIVATIONS, f0, b1,
               f"{first} other micro-batch(es) {IN_FLIGHT}")
    if later:
        tl.add(sympy.expand(later * saved), ACTIVATIONS, f0 + shift, b1 + shift,
               f"{later} other micro-batch(es) {IN_FLIGHT}")
    return first


def categories_of(point: MemoryPoint) -> dict[str, int]:
    return {k: point.breakdown.get(k, 0) for k in CATEGORIES}
