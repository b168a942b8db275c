"""Time of parallel training's communication: collectives, their overlap with compute, pipeline bubbles.

Numbers in, numbers out (no torch): buffer sizes, group sizes and a device's interconnect give
seconds; per-rank compute times and the timed collectives give a step time, tokens/s and MFU. The
graph side (which collectives a captured model needs, and their bytes) is the caller's.

The model, in short (each piece is documented where it is computed):
- a collective is alpha-beta: `BASE_LATENCY_S + steps * latency + volume / bus bandwidth`, NCCL's
  own model (src/graph/tuning.cc, ported in torch/_inductor/comm_analysis.py) with its Simple
  protocol, ring or tree, the faster one for all-reduce as NCCL picks;
- a group's placement on nodes (`Placement`) decides which links each step crosses;
- communication hides under the compute it can overlap (`exposed_s`), the pipeline adds its bubble
  ((pp - 1) / (v * m) of the work, Narayanan et al. 2021), and `step_time` adds the rest up.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from costmodel.errors import UsageError

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
GROUPS = ("dp", "fsdp", "tp", "pp")
ALGORITHMS = ("auto", "ring", "tree")
OVERLAPS = ("forward", "backward", "none")

# Rank order of the device mesh, innermost (consecutive ranks) first: torchtitan's
# ParallelDims builds its mesh as ["pp", "dp_replicate", "dp_shard", "cp", "tp"] (outermost
# first), so tp sits inside a node, then FSDP's shard group, then replicas, then stages.
MESH_ORDER = ("tp", "fsdp", "dp", "pp")

# NCCL's fixed cost of launching one collective with the Simple protocol, the protocol that reaches
# the full bus bandwidth: baseLat[ring|tree][SIMPLE] = 8.4 us in NCCL src/graph/tuning.cc
# (ncclTunerConstantsDefaults), as ported in torch/_inductor/comm_analysis.py.
BASE_LATENCY_S = 8.4e-6

# DDP's default gradient bucket: torch.nn.parallel.DistributedDataParallel(bucket_cap_mb=25).
DDP_BUCKET_BYTES = 25 * 1024**2


# --- checks ---------------------------------------------------------------------------------------

def _check_collective(collective: str) -> None:
    if collective not in COLLECTIVES:
        raise UsageError(f"unknown collective '{collective}'; accepted: {', '.join(COLLECTIVES)}")


# numbers.Integral / Real, so numpy and sympy integers from the caller's graph pass as well.
def _check_int(value, name: str, minimum: int = 1) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(value, name: str, *, positive: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise UsageError(f"{name} must be a {'positive number' if positive else 'number >= 0'}, got {value!r}")


@dataclass(frozen=True)
class Interconnect:
    """How a device's GPUs talk: within a node (NVLink or PCIe) and across nodes (the network).

    Bandwidths are bus bandwidths as nccl-tests reports them (busbw: what each GPU's links carry
    at large messages); the inter-node one is per GPU (the node's NICs over its GPUs). Latencies
    are per algorithm step (one hop of a ring), NCCL's hwLat.
    """
    gpus_per_node: int
    intra_node_bandwidth_bytes_per_s: float
    inter_node_bandwidth_bytes_per_s: float
    intra_node_latency_s: float
    inter_node_latency_s: float

    def __post_init__(self):
        _check_int(self.gpus_per_node, "gpus_per_node")
        for name in ("intra_node_bandwidth_bytes_per_s", "inter_node_bandwidth_bytes_per_s"):
            _check_number(getattr(self, name), name, positive=True)
        for name in ("intra_node_latency_s", "inter_node_latency_s"):
            _check_number(getattr(self, name), name, positive=False)


# What a device file without interconnect fields gets: PyTorch's own fallbacks in
# torch/_inductor/comm_analysis.py (a PCIe node of 8 GPUs, HDR InfiniBand per GPU) and NCCL's
# per-step latencies for PCIe and the network.
DEFAULT_INTERCONNECT = Interconnect(
    gpus_per_node=8, intra_node_bandwidth_bytes_per_s=24e9, inter_node_bandwidth_bytes_per_s=25e9,
    intra_node_latency_s=5.7e-6, inter_node_latency_s=14e-6)
DEFAULT_INTERCONNECT_SOURCES = {
    "gpus_per_node": "costmodel default (the file gives none): 8 GPUs per node, the size of DGX/HGX "
                     "servers and of torch/_inductor/comm_analysis.py's fallback when it sees no GPU",
    "intra_node_bandwidth_bytes_per_s": "costmodel default (the file gives none): 24 GB/s, PCIe Gen4 x16 "
                                        "as NCCL rates it (src/graph/topo.cc kvDictPciGen: 16 lanes x "
                                        "120 x 100 Mb/s / 8) and torch/_inductor/comm_analysis.py's "
                                        "_PCIE_INTRA_NODE_BW",
    "inter_node_bandwidth_bytes_per_s": "costmodel default (the file gives none): 25 GB/s per GPU, one "
                                        "200 Gb/s HDR InfiniBand NIC per GPU, torch/_inductor/"
                                        "comm_analysis.py's fallback (get_inter_node_bw)",
    "intra_node_latency_s": "costmodel default (the file gives none): 5.7 us per ring step over PCIe, "
                            "NCCL src/graph/tuning.cc hwLat[PCI][RING][SIMPLE]",
    "inter_node_latency_s": "costmodel default (the file gives none): 14 us per ring step over the "
                            "network, NCCL src/graph/tuning.cc hwLat[NET][RING][SIMPLE]",
}
INTERCONNECT_FIELDS = tuple(DEFAULT_INTERCONNECT_SOURCES)


# --- placement ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where one group's ranks sit: `nodes` nodes, `ranks_per_node` of the group on each (the
    fewest, where uneven: the node with the fewest NICs serving the group bounds it)."""
    ranks: int
    ranks_per_node: int
    nodes: int


def place(ranks: int, *, stride: int = 1, gpus_per_node: int) -> Placement:
    """The placement of a group of `ranks` ranks `stride` apart (the group holding global rank 0).

    >>> place(8, stride=1, gpus_per_node=8)      # tp=8 inside one node
    Placement(ranks=8, ranks_per_node=8, nodes=1)
    >>> place(4, stride=8, gpus_per_node=8)      # dp=4 over tp=8: one rank on each of 4 nodes
    Placement(ranks=4, ranks_per_node=1, nodes=4)
    """
    _check_int(ranks, "group size")
    _check_int(stride, "stride")
    _check_int(gpus_per_node, "gpus_per_node")
    per_node = Counter((i * stride) // gpus_per_node for i in range(ranks))
    return Placement(ranks=ranks, ranks_per_node=min(per_node.values()), nodes=len(per_node))


def mesh_placements(degrees: Mapping[str, int], gpus_per_node: int) -> dict[str, Placement]:
    """Each group's placement when ranks are laid out tp innermost, then fsdp, dp, pp (MESH_ORDER).

    >>> p = mesh_placements({"tp": 8, "dp": 4, "pp": 2}, gpus_per_node=8)
    >>> p["tp"], p["dp"], p["pp"]
    (Placement(ranks=8, ranks_per_node=8, nodes=1), Placement(ranks=4, ranks_per_node=1, nodes=4), Placement(ranks=2, ranks_per_node=1, nodes=2))
    """
    for key in degrees:
        if key not in GROUPS:
            raise UsageError(f"unknown parallel group '{key}'; accepted: {', '.join(GROUPS)}")
    out, stride = {}, 1
    for group in MESH_ORDER:
        size = degrees.get(group, 1)
        _check_int(size, f"degree of {group}")
        out[group] = place(size, stride=stride, gpus_per_node=gpus_per_node)
        stride *= size
    return out


# --- one collective -------------------------------------------------------------------------------

def bytes_sent_per_rank(collective: str, nbytes: float, ranks: int) -> float:
    """Bytes each rank sends in one call (ring algorithms; the textbook volume).

    `nbytes` follows nccl-tests' `size`: the buffer of an all-reduce, the gathered output of an
    all-gather, the (unscattered) input of a reduce-scatter, the message of a send/recv.
    all_reduce 2(n-1)/n * nbytes (reduce-scatter then all-gather); all_gather and reduce_scatter
    (n-1)/n * nbytes; send_recv nbytes.

    >>> bytes_sent_per_rank("all_reduce", 1e9, 8)    # 2 * 7/8 * 1e9
    1750000000.0
    """
    _check_collective(collective)
    _check_int(ranks, "group size")
    if ranks == 1:
        return 0.0
    if collective == "send_recv":
        return float(nbytes)
    return float(nbytes) * _ring_steps(collective, ranks) / ranks


def collective_time_s(collective: str, nbytes: float, placement: Placement, net: Interconnect,
                      *, algorithm: str = "auto") -> float:
    """Seconds for one call of `collective` on `nbytes` (nccl-tests' size, see bytes_sent_per_rank).

    ring: BASE_LATENCY_S + (steps - inter_steps) * intra_latency + inter_steps * inter_latency
          + bytes_sent_per_rank / busbw, steps = 2(n-1) for all-reduce, n-1 otherwise; of those,
          inter_steps = 2(k-1) (all-reduce) or k-1 cross one of the k nodes' boundaries (NCCL's
          nInterSteps). busbw = the intra-node figure inside a node; across nodes the ring's
          channels each leave a node through a different NIC, so busbw = min(intra, r * inter)
          for r ranks of the group per node (NCCL's maintainers: per-NIC bandwidth adds up,
          "up to ... the NVLink intra-node bandwidth", github.com/NVIDIA/nccl/issues/412, /652).
    tree (all-reduce only, NCCL's): a chain of the group's c ranks inside each node, a double
          binary tree across the k nodes. Latency BASE_LATENCY_S + 2 * ((c-1) * intra_latency +
          ceil(log2 k) * inter_latency) (NCCL's tree latency); pipelined, so the time is the
          slower of the chain (each byte goes up and comes down: 2 * nbytes / intra busbw) and the
          network (2(k-1)/k * nbytes per node, averaged over the two trees, over r NICs).
    auto: the faster, as NCCL chooses by the same kind of model. Inside a node the ring always
    wins; across 2 nodes the tree moves half the network bytes of a ring and can win.
    send_recv: BASE_LATENCY_S + one step's latency + nbytes / bandwidth, over the network when
    the group spans nodes (the slowest of its hops bounds a pipeline).
    Messages below ~1 MB are overestimated: NCCL then switches to its low-latency protocols.

    >>> from costmodel.hardware.catalog import load_hardware
    >>> a100 = load_hardware("a100-80gb").interconnect          # 230 GB/s NVLink, 3.4 us a step
    >>> node = place(8, gpus_per_node=8)
    >>> round(collective_time_s("all_reduce", 2**30, node, a100) * 1e3, 3)   # ms
    8.226

    (8.4e-6 + 14 * 3.4e-6 + 2 * 7/8 * 2**30 / 230e9 = 56e-6 + 8.1698e-3 s.)
    """
    _check_collective(collective)
    _check_number(nbytes, "bytes", positive=False)
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm '{algorithm}'; accepted: {', '.join(ALGORITHMS)}")
    n = placement.ranks
    if n == 1:
        return 0.0
    if collective == "send_recv":
        if algorithm == "tree":
            raise UsageError("the tree algorithm is for all_reduce only (as in NCCL); send_recv "
                             "is one hop: use algorithm 'auto' or 'ring'")
        across = placement.nodes > 1
        bandwidth = net.inter_node_bandwidth_bytes_per_s if across else net.intra_node_bandwidth_bytes_per_s
        latency = net.inter_node_latency_s if across else net.intra_node_latency_s
        return BASE_LATENCY_S + latency + nbytes / bandwidth
    times = {"ring": _ring_s(collective, nbytes, placement, net)}
    if collective == "all_reduce":
        times["tree"] = _tree_s(nbytes, placement, net)
    if algorithm == "auto":
        return min(times.values())
    if algorithm not in times:
        raise UsageError(f"the tree algorithm is for all_reduce only (as in NCCL), got {collective}; "
                         f"use algorithm 'auto' or 'ring'")
    return times[algorithm]


def _ring_steps(collective: str, ranks: int) -> int:
    return 2 * (ranks - 1) if collective == "all_reduce" else ranks - 1


def _ring_s(collective: str, nbytes: float, p: Placement, net: Interconnect) -> float:
    steps = _ring_steps(collective, p.ranks)
    inter_steps = _ring_steps(collective, p.nodes)
    latency = (BASE_LATENCY_S + (steps - inter_steps) * net.intra_node_latency_s
               + inter_steps * net.inter_node_latency_s)
    return latency + bytes_sent_per_rank(collective, nbytes, p.ranks) / _busbw(p, net)


def _busbw(p: Placement, net: Interconnect) -> float:
    if p.nodes == 1:
        return net.intra_node_bandwidth_bytes_per_s
    nics = p.ranks_per_node * net.inter_node_bandwidth_bytes_per_s
    if p.ranks_per_node == 1:       # no NVLink hop inside the node
        return nics
    return min(net.intra_node_bandwidth_bytes_per_s, nics)


def _tree_s(nbytes: float, p: Placement, net: Interconnect) -> float:
    chain = math.ceil(p.ranks / p.nodes)    # ranks of the group in the fullest node
    latency = BASE_LATENCY_S + 2 * ((chain - 1) * net.intra_node_latency_s
                                    + math.ceil(math.log2(p.nodes)) * net.inter_node_latency_s)
    intra_s = 2 * nbytes / net.intra_node_bandwidth_bytes_per_s if chain > 1 else 0.0
    inter_s = (2 * (p.nodes - 1) / p.nodes * nbytes
               / (p.ranks_per_node * net.inter_node_bandwidth_bytes_per_s))
    return latency + max(intra_s, inter_s)


# --- the collectives of each strategy -------------------------------------------------------------

@dataclass(frozen=True)
class Collective:
    """One kind of call a rank makes each step: `count` calls of `collective` on `bytes`.

    bytes: one call's buffer, in nccl-tests' size convention (see bytes_sent_per_rank).
    overlap: the compute it can hide under ("forward", "backward") or "none" (on the critical path).
    every_microbatch: True when the calls spread evenly over the step's micro-batches (TP, PP,
      FSDP); False when they happen once per step at its edge (DDP's gradient all-reduce in the
      last micro-batch's backward, ZeRO's parameter all-gather after the optimizer step).
    time_s: all `count` calls in one step (None until timed; see `timed`).
    """
    collective: str
    group: str
    bytes: int
    count: int = 1
    overlap: str = "none"
    every_microbatch: bool = True
    time_s: float | None = field(default=None, compare=False)

    def __post_init__(self):
        _check_collective(self.collective)
        if self.group not in GROUPS:
            raise UsageError(f"unknown parallel group '{self.group}'; accepted: {', '.join(GROUPS)}")
        if self.overlap not in OVERLAPS:
            raise UsageError(f"unknown overlap '{self.overlap}'; accepted: {', '.join(OVERLAPS)}")
        _check_number(self.bytes, "bytes", positive=False)
        _check_int(self.count, "count", minimum=0)
        if self.time_s is not None:
            _check_number(self.time_s, "time_s", positive=False)

    def to_dict(self) -> dict:
        """The contract's `communication` entry."""
        return {"collective": self.collective, "group": self.group, "bytes": int(self.bytes),
                "count": self.count, "time_s": self.time_s}


def timed(collectives: Sequence[Collective], net: Interconnect, placements: Mapping[str, Placement],
          *, algorithm: str = "auto") -> list[Collective]:
    """The same collectives with `time_s` = count * collective_time_s on their group's placement.

    >>> from costmodel.hardware.catalog import load_hardware
    >>> h100 = load_hardware("h100-sxm").interconnect
    >>> calls = timed(ddp(gradient_bytes=2 * 10**9), h100, mesh_placements({"dp": 16}, 8))
    >>> calls[0].to_dict()       # 2 nodes: ring at min(370e9, 8 * 50e9) busbw beats the tree
    {'collective': 'all_reduce', 'group': 'dp', 'bytes': 2000000000, 'count': 1, 'time_s': 0.010266735135135137}
    """
    out = []
    for c in collectives:
        if c.group not in placements:
            raise UsageError(f"no placement for group '{c.group}' (have {', '.join(placements) or 'none'})")
        out.append(replace(c, time_s=c.count * collective_time_s(
            c.collective, c.bytes, placements[c.group], net, algorithm=algorithm)))
    return out


def volume_per_rank(collectives: Sequence[Collective], placements: Mapping[str, Placement]) -> float:
    """Bytes one rank sends per step: sum of count * bytes_sent_per_rank over the collectives.

    >>> g, n = 10**9, 8
    >>> volume_per_rank(ddp(g), {"dp": place(n, gpus_per_node=8)})      # 2 * 7/8 * 1e9
    1750000000.0
    >>> volume_per_rank(fsdp(g, g), {"fsdp": place(n, gpus_per_node=8)})  # 3 * 7/8 * 1e9: 1.5x DDP
    2625000000.0
    """
    return sum(c.count * bytes_sent_per_rank(c.collective, c.bytes, placements[c.group].ranks)
               for c in collectives)


def ddp(gradient_bytes: int, *, bucket_bytes: int | None = None) -> list[Collective]:
    """DDP: one all-reduce of the gradients per step, hidden under the backward (of the last
    micro-batch: accumulation runs under no_sync). bucket_bytes splits it into DDP's buckets
    (DDP_BUCKET_BYTES is its default); None: one call, the textbook figure. Per rank it sends
    2(n-1)/n * gradient_bytes (Li et al. 2020, "PyTorch Distributed", VLDB, arXiv:2006.15704).

    >>> # 1e9 bytes in 25 MiB buckets: ceil(1e9 / 26,214,400) = 39 calls of ceil(1e9 / 39) bytes
    >>> [(c.collective, c.bytes, c.count) for c in ddp(10**9, bucket_bytes=DDP_BUCKET_BYTES)]
    [('all_reduce', 25641026, 39)]
    """
    count = 1 if not bucket_bytes else max(1, math.ceil(gradient_bytes / bucket_bytes))
    return [Collective("all_reduce", "dp", math.ceil(gradient_bytes / count), count,
                       overlap="backward", every_microbatch=False)]


def zero(stage: int, gradient_bytes: int, parameter_bytes: int) -> list[Collective]:
    """ZeRO-1/2 over the dp group (Rajbhandari et al. 2020, arXiv:1910.02054, section 7): the
    gradients are reduce-scattered (each rank updates its shard), the updated parameters
    all-gathered: (n-1)/n * (gradients + parameters), DDP's volume when both are one dtype.
    Stage 1 keeps whole gradients and reduces once per step; stage 2 keeps only its shard, so it
    reduces every micro-batch (DeepSpeed). The all-gather follows the optimizer step: exposed.

    >>> [(c.collective, c.overlap, c.every_microbatch) for c in zero(2, 10**9, 10**9)]
    [('reduce_scatter', 'backward', True), ('all_gather', 'none', False)]
    """
    if stage not in (1, 2):
        raise UsageError(f"ZeRO stage must be 1 or 2 (stage 3 is fsdp), got {stage!r}")
    return [Collective("reduce_scatter", "dp", gradient_bytes, 1, overlap="backward",
                       every_microbatch=stage == 2),
            Collective("all_gather", "dp", parameter_bytes, 1, overlap="none", every_microbatch=False)]


def fsdp(parameter_bytes: int, gradient_bytes: int, *, units: int = 1, microbatches: int = 1,
         reshard_after_forward: bool = True) -> list[Collective]:
    """FSDP / ZeRO-3 over the fsdp group, per micro-batch and per wrapped unit (FSDP2's
    fully_shard per block): all-gather the unit's parameters for the forward (prefetched, hidden
    under the forward), again for the backward (when resharded after the forward), and
    reduce-scatter its gradients (hidden under the backward). Per rank
    3 (n-1)/n * parameter bytes: 1.5x DDP (Rajbhandari et al. 2020, section 7.2.2).
    For HSDP (dp replicas of fsdp shards) add ddp(gradient_bytes / fsdp degree) on the dp group.

    >>> [(c.collective, c.bytes, c.count, c.overlap) for c in fsdp(32 * 10**8, 32 * 10**8, units=32, microbatches=2)]
    [('all_gather', 100000000, 64, 'forward'), ('all_gather', 100000000, 64, 'backward'), ('reduce_scatter', 100000000, 64, 'backward')]
    """
    _check_int(units, "units")
    _check_int(microbatches, "microbatches")
    calls = units * microbatches
    out = [Collective("all_gather", "fsdp", math.ceil(parameter_bytes / units), calls, overlap="forward")]
    if reshard_after_forward:
        out.append(Collective("all_gather", "fsdp", math.ceil(parameter_bytes / units), calls, overlap="backward"))
    out.append(Collective("reduce_scatter", "fsdp", math.ceil(gradient_bytes / units), calls, overlap="backward"))
    return out


def tensor_parallel(activation_bytes: int, layers: int, *, microbatches: int = 1,
                    sequence_parallel: bool = False, recompute: bool = False,
                    overlapped: bool = False) -> list[Collective]:
    """Megatron tensor parallelism over the tp group: a forward entry and a backward entry.
    Each transformer block all-reduces its [b, s, h] output twice in the forward (after
    attention, after the MLP) and twice in the backward (Shoeybi et al. 2019, arXiv:1909.08053,
    section 3); full recomputation repeats the forward's two inside the backward. With sequence
    parallelism each all-reduce is an all-gather plus a reduce-scatter of the same size
    (Korthikanti et al. 2022, arXiv:2205.05198, section 4.2.2): the same volume.
    activation_bytes: b * s * h * element size. On the critical path unless `overlapped` (kernels
    that overlap TP communication with the GEMMs, e.g. Megatron's --tp-comm-overlap): then each
    hides under its own phase.

    >>> [(c.collective, c.count, c.overlap) for c in tensor_parallel(2**24, layers=32, microbatches=2)]
    [('all_reduce', 128, 'none'), ('all_reduce', 128, 'none')]
    """
    _check_int(layers, "layers")
    _check_int(microbatches, "microbatches")
    phases = (("forward", 2), ("backward", 2 + (2 if recompute else 0)))
    kinds = ("all_gather", "reduce_scatter") if sequence_parallel else ("all_reduce",)
    return [Collective(kind, "tp", activation_bytes, per_layer * layers * microbatches,
                       overlap=phase if overlapped else "none")
            for phase, per_layer in phases for kind in kinds]


def pipeline_parallel(activation_bytes: int, *, microbatches: int = 1, interleave: int = 1) -> list[Collective]:
    """Pipeline parallelism over the pp group: each micro-batch sends its activations to the next
    stage and their gradients back, at each of a rank's v chunks' boundaries (interleaving
    multiplies the p2p communication by v: Narayanan et al. 2021, arXiv:2104.04473, section
    2.2.2). A middle stage's count: 2 * m * v sends; exposed (on the critical path).

    >>> pipeline_parallel(2**24, microbatches=8, interleave=2)[0].count     # 2 * 8 * 2
    32
    """
    _check_int(microbatches, "microbatches")
    _check_int(interleave, "interleave")
    return [Collective("send_recv", "pp", activation_bytes, 2 * microbatches * interleave)]


# --- overlap, bubbles, the step -------------------------------------------------------------------

def exposed_s(communication_s: float, overlappable_s: float) -> float:
    """Communication left on the critical path when it runs beside `overlappable_s` of compute:
    max(0, communication - compute). It assumes a perfect overlap up to the compute available
    (no slowdown of the compute sharing the GPU, no first call waiting with nothing before it).

    >>> exposed_s(0.015, 0.2), exposed_s(0.5, 0.2)
    (0.0, 0.3)
    """
    return max(0.0, communication_s - overlappable_s)


def bubble_fraction(pp: int, microbatches: int, interleave: int = 1) -> float:
    """Pipeline bubble over ideal time: (pp - 1) / m for 1F1B and (pp - 1) / (v * m) with v
    interleaved chunks per stage (Narayanan et al. 2021, arXiv:2104.04473, sections 2.2.1-2.2.2).

    >>> bubble_fraction(4, 8), bubble_fraction(4, 8, interleave=2)     # 3/8, 3/16
    (0.375, 0.1875)
    """
    _check_int(pp, "pp")
    _check_int(microbatches, "microbatches")
    _check_int(interleave, "interleave")
    return (pp - 1) / (interleave * microbatches)


@dataclass(frozen=True)
class Stage:
    """What one rank of a pipeline stage does in a step.

    forward_time_s, backward_time_s: one micro-batch on this rank (all its chunks), compute only;
    optimizer_time_s: once per step; communication: its timed collectives (see `timed`).
    """
    forward_time_s: float
    backward_time_s: float
    optimizer_time_s: float = 0.0
    communication: tuple[Collective, ...] = ()

    def __post_init__(self):
        for name in ("forward_time_s", "backward_time_s", "optimizer_time_s"):
            _check_number(getattr(self, name), name, positive=False)
        object.__setattr__(self, "communication", tuple(self.communication))
        for c in self.communication:
            if c.time_s is None:
                raise UsageError(f"{c.collective} on {c.group} has no time_s; time the collectives "
                                 f"with comm.timed(...) first")


@dataclass(frozen=True)
class RankTime:
    stage: int
    compute_time_s: float                  # m * (forward + backward) + optimizer
    communication_time_s: float            # every collective's time, hidden or not
    exposed_communication_time_s: float    # the part on the critical path
    bubble_time_s: float                   # idle while the pipeline fills and drains

    def to_dict(self) -> dict:
        """The contract's `ranks` entry, timing keys (memory is the caller's)."""
        return {"stage": self.stage, "compute_time_s": self.compute_time_s,
                "communication_time_s": self.communication_time_s,
                "exposed_communication_time_s": self.exposed_communication_time_s}


@dataclass(frozen=True)
class StepTime:
    ranks: tuple[RankTime, ...]
    step_time_s: float
    tokens_per_s: float | None
    mfu: float | None

    def to_dict(self) -> dict:
        return {"ranks": [r.to_dict() for r in self.ranks], "step_time_s": self.step_time_s,
                "tokens_per_s": self.tokens_per_s, "mfu": self.mfu}


def step_time(stages: Sequence[Stage], *, microbatches: int = 1, interleave: int = 1,
              tokens_per_step: int | None = None, model_flops_per_step: float | None = None,
              peak_flops_per_s: float | None = None, world_size: int | None = None) -> StepTime:
    """One training step from each pipeline stage's compute and communication (pp = len(stages)).

    Per stage and micro-batch, communication that spreads over the micro-batches hides under its
    phase: exposed = max(0, comm - forward) + max(0, comm - backward) + comm that cannot overlap
    (TP, PP). Once-per-step communication hides under the compute left in the first forward or
    the last backward (DDP and ZeRO gradients), or adds in full (ZeRO's parameter all-gather).
    t_s = forward + backward + exposed per micro-batch. The pipeline takes
    m * max(t) + (sum(t) - max(t)) / v: 1F1B's (m + pp - 1) * t for equal stages, the bubble
    (pp - 1) / v * t (Narayanan et al. 2021, arXiv:2104.04473). The step adds the slowest
    stage's once-per-step tail (its exposed edge communication and optimizer step).
    tokens_per_s = tokens_per_step / step; mfu = model_flops_per_step / (step * world_size *
    peak), model FLOPs without recomputation (Chowdhery et al. 2022, PaLM, appendix B).

    >>> from costmodel.hardware.catalog import load_hardware
    >>> net = load_hardware("a100-80gb").interconnect
    >>> comm = timed(ddp(2 * 10**9), net, mesh_placements({"dp": 8}, 8))    # 15.3 ms all-reduce
    >>> st = step_time([Stage(0.1, 0.2, 0.01, comm)], tokens_per_step=8 * 4096,
    ...                model_flops_per_step=6 * 10**9 * 8 * 4096, peak_flops_per_s=312e12, world_size=8)
    >>> round(st.step_time_s, 6), round(st.tokens_per_s), round(st.mfu, 3)   # 0.1 + 0.2 + 0.01: all hidden
    (0.31, 105703, 0.254)
    """
    stages = list(stages)
    if not stages:
        raise UsageError("step_time needs at least one stage")
    _check_int(microbatches, "microbatches")
    _check_int(interleave, "interleave")
    pp, m, v = len(stages), microbatches, interleave
    if v > 1 and pp == 1:
        raise UsageError(f"interleave {v} needs a pipeline (pp > 1), got pp=1")
    if v > 1 and m % pp:
        raise UsageError(f"interleaved 1F1B needs the micro-batches to be a multiple of pp "
                         f"(Megatron-LM's requirement); got microbatches={m}, pp={pp}")
    per_mb, tails, parts = [], [], []
    for s in stages:
        spread = {o: sum(c.time_s for c in s.communication if c.every_microbatch and c.overlap == o) / m
                  for o in OVERLAPS}
        once = {o: sum(c.time_s for c in s.communication if not c.every_microbatch and c.overlap == o)
                for o in OVERLAPS}
        f, b = s.forward_time_s, s.backward_time_s
        exposed_mb = exposed_s(spread["forward"], f) + exposed_s(spread["backward"], b) + spread["none"]
        first = exposed_s(once["forward"] + spread["forward"], f) - exposed_s(spread["forward"], f)
        last = exposed_s(once["backward"] + spread["backward"], b) - exposed_s(spread["backward"], b)
        edge = first + last + once["none"]
        per_mb.append(f + b + exposed_mb)
        tails.append(edge + s.optimizer_time_s)
        parts.append((m * (f + b) + s.optimizer_time_s, sum(c.time_s for c in s.communication),
                      m * exposed_mb + edge))
    pipeline = m * max(per_mb) + (sum(per_mb) - max(per_mb)) / v
    step = pipeline + max(tails)
    ranks = tuple(RankTime(stage=i, compute_time_s=compute, communication_time_s=comm,
                           exposed_communication_time_s=exposed, bubble_time_s=pipeline - m * t)
                  for i, ((compute, comm, exposed), t) in enumerate(zip(parts, per_mb)))
    tokens_per_s = tokens_per_step / step if tokens_per_step is not None and step > 0 else None
    mfu = None
    if model_flops_per_step is not None:
        if peak_flops_per_s is None or world_size is None:
            raise UsageError("mfu needs peak_flops_per_s (one GPU's) and world_size with model_flops_per_step")
        mfu = model_flops_per_step / (step * world_size * peak_flops_per_s) if step > 0 else None
    return StepTime(ranks=ranks, step_time_s=step, tokens_per_s=tokens_per_s, mfu=mfu)
