"""Interconnect catalog and costmodel.comm: collective times against the alpha-beta formulas worked
by hand, the same formulas in PyTorch's port of NCCL's model, textbook volumes per strategy, overlap,
bubbles, the step composer, and the catalog's fields with their sources."""

import ast
import doctest
import itertools
import json
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import costmodel.hardware.comm as comm
from costmodel.cli import main
from costmodel.hardware.comm import (BASE_LATENCY_S, DEFAULT_INTERCONNECT, INTERCONNECT_FIELDS, Collective, Interconnect,
                            Placement, Stage, bubble_fraction, bytes_sent_per_rank, collective_time_s, ddp,
                            exposed_s, fsdp, mesh_placements, pipeline_parallel, place, step_time,
                            tensor_parallel, timed, volume_per_rank, zero)
from costmodel.errors import UsageError
from costmodel.hardware.catalog import list_hardware, load_hardware

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
# A DGX A100 node as the catalog has it: 230 GB/s NVLink busbw, 25 GB/s HDR per GPU, 3.4 / 14 us a step.
A100 = Interconnect(gpus_per_node=8, intra_node_bandwidth_bytes_per_s=230 * GB,
                    inter_node_bandwidth_bytes_per_s=25 * GB, intra_node_latency_s=3.4e-6,
                    inter_node_latency_s=14e-6)
NODE = Placement(ranks=8, ranks_per_node=8, nodes=1)


# --- the catalog ----------------------------------------------------------------------------------

NVLINK = {"v100-16gb": 120 * GB, "v100-32gb": 120 * GB, "a100-40gb": 230 * GB, "a100-80gb": 230 * GB,
          "h100-sxm": 370 * GB, "h200": 370 * GB, "mi300x": 358 * GB}
# PCIe as NCCL rates a link: 16 lanes * per-lane rate (x100 Mb/s) / 80: Gen3 60, Gen4 120, Gen5 240.
PCIE = {"t4": 16 * 60 / 80 * GB, "l4": 16 * 120 / 80 * GB, "a10g": 16 * 120 / 80 * GB,
        "a100-80gb-pcie": 16 * 120 / 80 * GB, "h100-pcie": 16 * 240 / 80 * GB,
        "rtx-4090": 16 * 120 / 80 * GB / 2}          # no peer-to-peer on GeForce: half, an estimate


def test_every_catalog_device_has_the_interconnect_with_sources():
    assert set(NVLINK) | set(PCIE) == {hw.name for hw in list_hardware()}
    for path in sorted((ROOT / "hardware_specs").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        for field in INTERCONNECT_FIELDS:
            assert field in data, f"{path.name}: no {field} (the default would be used)"
            source = data["sources"].get(field, "")
            assert source.strip() and not source.startswith("costmodel default"), (path.name, field)
        hw = load_hardware(data["name"])
        net = hw.interconnect
        # A GPU's own links beat its share of the network; latencies are microseconds.
        assert net.intra_node_bandwidth_bytes_per_s > net.inter_node_bandwidth_bytes_per_s, hw.name
        assert 0 < net.intra_node_latency_s < net.inter_node_latency_s < 1e-4, hw.name


@pytest.mark.parametrize("name", sorted(NVLINK))
def test_nvlink_parts(name):
    net = load_hardware(name).interconnect
    assert net.intra_node_bandwidth_bytes_per_s == NVLINK[name]
    assert net.intra_node_latency_s == 3.4e-6                 # NCCL hwLat[NVLINK][RING][SIMPLE]
    assert net.gpus_per_node == 8


@pytest.mark.parametrize("name", sorted(PCIE))
def test_pcie_parts_get_pcie_figures(name):
    net = load_hardware(name).interconnect
    assert net.intra_node_bandwidth_bytes_per_s == PCIE[name]
    assert net.intra_node_latency_s == 5.7e-6                 # NCCL hwLat[PCI][RING][SIMPLE]


def test_network_per_gpu():
    # DGX A100: 8 x 200 Gb/s HDR for 8 GPUs; DGX H100: 8 x 400 Gb/s; DGX-1: 4 x 100 Gb/s EDR for 8;
    # AWS g5/g6/g4dn: 100 Gb/s for 8 GPUs.
    assert load_hardware("a100-80gb").inter_node_bandwidth_bytes_per_s == 200e9 / 8
    assert load_hardware("h100-sxm").inter_node_bandwidth_bytes_per_s == 400e9 / 8
    assert load_hardware("v100-32gb").inter_node_bandwidth_bytes_per_s == 4 * 100e9 / 8 / 8
    for name in ("a10g", "l4", "t4"):
        assert load_hardware(name).inter_node_bandwidth_bytes_per_s == 100e9 / 8 / 8


DEVICE = """
name = "{name}"
memory_bytes = 85_899_345_920
bandwidth_bytes_per_s = 2.039e12
{interconnect}
[peak_flops_per_s]
float32 = 19.5e12
bfloat16 = 312e12
[sources]
{sources}
"""


def _device(tmp_path, name, interconnect="", sources=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(DEVICE.format(name=name, interconnect=interconnect, sources=sources))
    return load_hardware(str(path))


def test_user_files_set_the_interconnect(tmp_path):
    dgx = _device(tmp_path, "my-dgx", "gpus_per_node = 8\nintra_node_bandwidth_bytes_per_s = 230e9\n"
                  "inter_node_bandwidth_bytes_per_s = 25e9\nintra_node_latency_s = 3.4e-6\n"
                  "inter_node_latency_s = 14e-6",
                  'intra_node_bandwidth_bytes_per_s = "our nccl-tests run, 2024-05"')
    box = _device(tmp_path, "pcie-box", "gpus_per_node = 4\nintra_node_bandwidth_bytes_per_s = 20e9\n"
                  "inter_node_bandwidth_bytes_per_s = 3.125e9")
    assert dgx.interconnect == A100
    assert dgx.sources["intra_node_bandwidth_bytes_per_s"] == "our nccl-tests run, 2024-05"
    assert (box.gpus_per_node, box.intra_node_bandwidth_bytes_per_s) == (4, 20e9)
    # The same 1 GiB all-reduce over 4 GPUs: 2 * 3/4 * 2**30 bytes at 230 vs 20 GB/s.
    dgx_s = collective_time_s("all_reduce", 2**30, place(4, gpus_per_node=8), dgx.interconnect)
    box_s = collective_time_s("all_reduce", 2**30, place(4, gpus_per_node=4), box.interconnect)
    assert dgx_s == pytest.approx(BASE_LATENCY_S + 6 * 3.4e-6 + 1.5 * 2**30 / 230e9)
    assert box_s == pytest.approx(BASE_LATENCY_S + 6 * 5.7e-6 + 1.5 * 2**30 / 20e9)   # latency: default


def test_a_file_without_the_interconnect_gets_defaults_that_say_so(tmp_path):
    hw = _device(tmp_path, "bare")
    assert hw.interconnect == DEFAULT_INTERCONNECT
    for field in INTERCONNECT_FIELDS:
        assert hw.sources[field].startswith("costmodel default (the file gives none)"), field


@pytest.mark.parametrize("line, message", [
    ("gpus_per_node = 0", "'gpus_per_node' must be an integer >= 1 \\(GPUs in one node\\), got 0"),
    ("gpus_per_node = 8.5", "'gpus_per_node' must be an integer >= 1 \\(GPUs in one node\\), got 8.5"),
    ("gpus_per_node = true", "'gpus_per_node' must be an integer >= 1 \\(GPUs in one node\\), got True"),
    ("intra_node_bandwidth_bytes_per_s = -1e9",
     "'intra_node_bandwidth_bytes_per_s' must be a positive number, got -1000000000.0"),
    ('inter_node_bandwidth_bytes_per_s = "fast"', "'inter_node_bandwidth_bytes_per_s' must be a positive number, got 'fast'"),
    ("intra_node_latency_s = 3.4", "'intra_node_latency_s' must be seconds per step, >= 0 and below 1 "
                                   "\\(NCCL's are microseconds: 3.4e-6\\), got 3.4"),
    ("inter_node_latency_s = -1e-6", "'inter_node_latency_s' must be seconds per step"),
    ("intra_node_bandwith_bytes_per_s = 1e9",
     "unknown field 'intra_node_bandwith_bytes_per_s' \\(did you mean intra_node_bandwidth_bytes_per_s or "
     "inter_node_bandwidth_bytes_per_s\\?\\)"),
])
def test_bad_interconnect_values_say_what_is_wrong(tmp_path, line, message):
    with pytest.raises(UsageError, match=f"hardware file '.*bad.toml': {message}"):
        _device(tmp_path, "bad", line)


def test_hardware_show_prints_the_interconnect(capsys):
    assert main(["hardware", "show", "h100-sxm", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: shown[k] for k in INTERCONNECT_FIELDS} == {
        "gpus_per_node": 8, "intra_node_bandwidth_bytes_per_s": 370e9, "inter_node_bandwidth_bytes_per_s": 50e9,
        "intra_node_latency_s": 3.4e-6, "inter_node_latency_s": 14e-6}
    assert all(shown["sources"][k] for k in INTERCONNECT_FIELDS)
    assert main(["hardware", "show", "a100-80gb"]) == 0
    assert ("interconnect: 8 GPUs per node; bus bandwidth 230 GB/s inside a node, 25 GB/s per GPU across "
            "nodes; latency 3.4 us / 14.0 us per step") in capsys.readouterr().out
    assert main(["hardware", "list"]) == 0
    table = capsys.readouterr().out
    assert "GPUs/node" in table and "inter-node/GPU" in table


# --- one collective, by hand ----------------------------------------------------------------------

def test_ring_inside_a_node():
    S = 2**30
    # all-reduce: 2(n-1) = 14 steps of 3.4 us; each rank sends 2 * 7/8 * S at 230 GB/s
    assert collective_time_s("all_reduce", S, NODE, A100) == pytest.approx(8.4e-6 + 14 * 3.4e-6 + 2 * 7 / 8 * S / 230e9)
    # all-gather / reduce-scatter: n-1 = 7 steps, 7/8 * S (S: the gathered output / the unscattered input)
    for c in ("all_gather", "reduce_scatter"):
        assert collective_time_s(c, S, NODE, A100) == pytest.approx(8.4e-6 + 7 * 3.4e-6 + 7 / 8 * S / 230e9)
    assert collective_time_s("all_reduce", S, NODE, A100, algorithm="ring") == collective_time_s(
        "all_reduce", S, NODE, A100)                                  # inside a node the ring wins


def test_ring_across_nodes_uses_the_nics_of_the_group():
    S = 2**30
    # dp=16 on 2 nodes, 8 ranks per node: the ring's channels leave each node through 8 NICs,
    # busbw = min(230, 8 * 25) = 200 GB/s; 30 steps, 2 of them across the network.
    two = place(16, gpus_per_node=8)
    assert two == Placement(ranks=16, ranks_per_node=8, nodes=2)
    ring = 8.4e-6 + 28 * 3.4e-6 + 2 * 14e-6 + 2 * 15 / 16 * S / 200e9
    assert collective_time_s("all_reduce", S, two, A100, algorithm="ring") == pytest.approx(ring)
    # dp=4 over tp=8: one rank per node, only its own NIC: busbw 25 GB/s, every step on the network.
    rail = place(4, stride=8, gpus_per_node=8)
    assert rail == Placement(ranks=4, ranks_per_node=1, nodes=4)
    assert collective_time_s("all_gather", S, rail, A100) == pytest.approx(8.4e-6 + 3 * 14e-6 + 3 / 4 * S / 25e9)


def test_tree_all_reduce_and_when_it_wins():
    S = 2**30
    two = place(16, gpus_per_node=8)
    # Tree: chains of 8 inside the nodes, a binary tree over 2 nodes (log2 2 = 1 level).
    # Latency 8.4 + 2 * (7 * 3.4 + 1 * 14) us; pipelined: the slower of the chain (2 * S / 230e9)
    # and the network (2 * 1/2 * S over 8 NICs of 25 GB/s).
    tree = 8.4e-6 + 2 * (7 * 3.4e-6 + 14e-6) + max(2 * S / 230e9, 2 * (1 / 2) * S / (8 * 25e9))
    assert collective_time_s("all_reduce", S, two, A100, algorithm="tree") == pytest.approx(tree)
    # On 2 nodes the tree sends half the ring's bytes over the network: 2 / 230e9 < 1.875 / 200e9 per byte.
    assert collective_time_s("all_reduce", S, two, A100) == pytest.approx(tree)
    # 64 nodes, one rank each, 1 MB: the ring pays 126 network steps, the tree 2 * log2(64) = 12.
    wide = place(64, stride=8, gpus_per_node=8)
    ring = 8.4e-6 + 126 * 14e-6 + 2 * 63 / 64 * 1e6 / 25e9
    tree = 8.4e-6 + 2 * 6 * 14e-6 + 2 * 63 / 64 * 1e6 / 25e9
    assert collective_time_s("all_reduce", 1e6, wide, A100, algorithm="ring") == pytest.approx(ring)
    assert collective_time_s("all_reduce", 1e6, wide, A100) == pytest.approx(tree)


def test_send_recv_and_trivial_groups():
    # One hop: inside a node at NVLink speed, across nodes at one NIC's.
    assert collective_time_s("send_recv", 64e6, place(2, gpus_per_node=8), A100) == pytest.approx(
        8.4e-6 + 3.4e-6 + 64e6 / 230e9)
    assert collective_time_s("send_recv", 64e6, place(2, stride=8, gpus_per_node=8), A100) == pytest.approx(
        8.4e-6 + 14e-6 + 64e6 / 25e9)
    assert collective_time_s("all_reduce", 2**30, place(1, gpus_per_node=8), A100) == 0.0
    assert bytes_sent_per_rank("all_reduce", 2**30, 1) == 0.0


def test_collective_errors_name_what_is_accepted():
    with pytest.raises(UsageError, match="unknown collective 'allreduce'; accepted: all_reduce, all_gather, "
                                         "reduce_scatter, send_recv"):
        collective_time_s("allreduce", 1, NODE, A100)
    with pytest.raises(UsageError, match="unknown algorithm 'nvls'; accepted: auto, ring, tree"):
        collective_time_s("all_reduce", 1, NODE, A100, algorithm="nvls")
    with pytest.raises(UsageError, match="the tree algorithm is for all_reduce only"):
        collective_time_s("all_gather", 1, NODE, A100, algorithm="tree")
    with pytest.raises(UsageError, match="bytes must be a number >= 0, got -1"):
        collective_time_s("all_reduce", -1, NODE, A100)
    with pytest.raises(UsageError, match="unknown parallel group 'cp'; accepted: dp, fsdp, tp, pp"):
        mesh_placements({"cp": 2}, 8)
    with pytest.raises(UsageError, match="unknown overlap 'optimizer'; accepted: forward, backward, none"):
        Collective("all_reduce", "dp", 1, overlap="optimizer")
    with pytest.raises(UsageError, match="no placement for group 'tp' \\(have dp\\)"):
        timed(tensor_parallel(1, 1), A100, {"dp": NODE})
    with pytest.raises(UsageError, match="gpus_per_node must be an integer >= 1, got 0"):
        replace(A100, gpus_per_node=0)


try:
    from torch._inductor import comm_analysis as _TORCH_PORT
except ImportError:           # a torch without inductor: nothing to compare with
    _TORCH_PORT = None


@pytest.mark.skipif(not hasattr(_TORCH_PORT, "_nccl_algo_time"),
                    reason="this torch's comm_analysis models NCCL's LL protocol only (torch < 2.13)")
@pytest.mark.parametrize("n", [2, 4, 8])
def test_agrees_with_pytorchs_port_of_nccls_model(n):
    """torch/_inductor/comm_analysis.py ports NCCL's tuning model: its ring with the Simple protocol
    is our formula exactly, and NCCL's pick over protocols equals it from 16 MiB up; below, NCCL
    switches to its low-latency protocols and we overestimate (at most 3.73x, at 8 bytes on 8 GPUs:
    56 us against 15 us)."""
    import torch
    ca = _TORCH_PORT
    # Our a100 interconnect inside one node (torch takes 8 GPUs per node without a GPU, and NVLink).
    net = load_hardware("a100-80gb").interconnect
    kinds = {"all_reduce": ca.NCCL_COLL.ALL_REDUCE, "all_gather": ca.NCCL_COLL.ALL_GATHER,
             "reduce_scatter": ca.NCCL_COLL.REDUCE_SCATTER}
    with torch._inductor.config.patch(intra_node_bw=230):          # GB/s
        for (name, kind), nbytes in itertools.product(kinds.items(), [8, 2**10, 2**16, 2**20, 2**24, 2**27, 2**30]):
            ours = collective_time_s(name, nbytes, place(n, gpus_per_node=8), net)
            simple = ca._nccl_algo_time(nbytes, n, kind, ca.NCCL_ALGO.RING, ca.NCCL_PROTO.SIMPLE) * 1e-6
            best = ca.estimate_nccl_collective_runtime_impl(nbytes, n, kind) * 1e-3
            assert ours == pytest.approx(simple, rel=1e-12), (name, nbytes)
            assert best <= ours * (1 + 1e-12) and ours <= 3.75 * best, (name, nbytes, ours, best)
            if nbytes >= 2**24:
                assert ours == pytest.approx(best, rel=1e-12), (name, nbytes)


# --- placement ------------------------------------------------------------------------------------

def test_mesh_order_tp_innermost_then_fsdp_dp_pp():
    p = mesh_placements({"tp": 4, "fsdp": 4, "dp": 2, "pp": 2}, gpus_per_node=8)
    assert p["tp"] == Placement(4, 4, 1)       # ranks 0-3
    assert p["fsdp"] == Placement(4, 2, 2)     # ranks 0, 4 | 8, 12: two per node
    assert p["dp"] == Placement(2, 1, 2)       # ranks 0, 16
    assert p["pp"] == Placement(2, 1, 2)       # ranks 0, 32
    # Uneven: 3 ranks 3 apart on 8-GPU nodes are ranks 0, 3 | 6 ... : 0, 3, 6 fit one node.
    assert place(3, stride=3, gpus_per_node=8) == Placement(3, 3, 1)
    # 4 ranks 3 apart: 0, 3, 6 on node 0, 9 on node 1; the node with one rank bounds the NICs.
    assert place(4, stride=3, gpus_per_node=8) == Placement(4, 1, 2)


# --- textbook volumes per strategy ----------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_volume_per_rank_matches_the_textbook(n):
    G = 14 * 10**9          # 7B parameters' bf16 gradients
    pl = {g: place(n, gpus_per_node=8) for g in ("dp", "fsdp")}
    ddp_volume = volume_per_rank(ddp(G), pl)
    assert ddp_volume == pytest.approx(2 * (n - 1) / n * G)                # ring all-reduce
    assert volume_per_rank(ddp(G, bucket_bytes=comm.DDP_BUCKET_BYTES), pl) == pytest.approx(ddp_volume, rel=1e-6)
    # ZeRO-1/2: reduce-scatter the gradients + all-gather the parameters = DDP's volume.
    assert volume_per_rank(zero(1, G, G), pl) == pytest.approx(ddp_volume)
    assert volume_per_rank(zero(2, G, G), pl) == pytest.approx(ddp_volume)
    # ZeRO-3 / FSDP: all-gather forward + all-gather backward + reduce-scatter = 1.5x DDP.
    assert volume_per_rank(fsdp(G, G, units=32), pl) == pytest.approx(1.5 * ddp_volume)
    assert volume_per_rank(fsdp(G, G, reshard_after_forward=False), pl) == pytest.approx(ddp_volume)


def test_tensor_and_pipeline_parallel_volumes():
    t, L, m = 8, 32, 4
    A = 1 * 4096 * 4096 * 2                     # one micro-batch's [b, s, h] bf16 activation
    pl = {"tp": place(t, gpus_per_node=8), "pp": place(4, stride=8, gpus_per_node=8)}
    # Megatron: 2 all-reduces forward + 2 backward per block, each 2(t-1)/t * A per rank.
    megatron = L * m * 4 * 2 * (t - 1) / t * A
    assert volume_per_rank(tensor_parallel(A, L, microbatches=m), pl) == pytest.approx(megatron)
    # Sequence parallelism: each all-reduce becomes all-gather + reduce-scatter, (t-1)/t * A each.
    sp = tensor_parallel(A, L, microbatches=m, sequence_parallel=True)
    assert [(c.collective, c.overlap) for c in sp] == [("all_gather", "none"), ("reduce_scatter", "none")] * 2
    overlapped = tensor_parallel(A, L, microbatches=m, overlapped=True)
    assert [c.overlap for c in overlapped] == ["forward", "backward"]
    assert volume_per_rank(sp, pl) == pytest.approx(megatron)
    # Full recomputation repeats the forward's two: 6 per block.
    assert volume_per_rank(tensor_parallel(A, L, microbatches=m, recompute=True), pl) == pytest.approx(megatron * 6 / 4)
    # Pipeline: activations forward, gradients back, per micro-batch and per chunk: 2 * m * v * A.
    assert volume_per_rank(pipeline_parallel(A, microbatches=m, interleave=2), pl) == 2 * m * 2 * A


# --- overlap, bubbles, the step -------------------------------------------------------------------

def test_bubble_fraction():
    assert bubble_fraction(4, 8) == 3 / 8                   # (pp - 1) / m
    assert bubble_fraction(4, 8, interleave=2) == 3 / 16    # (pp - 1) / (v * m)
    assert bubble_fraction(1, 8) == 0.0


def _timed(calls, **degrees):
    return tuple(timed(calls, A100, mesh_placements(degrees, 8)))


def test_ddp_hides_under_the_last_backward():
    f, b, opt = 0.1, 0.2, 0.01
    G = 2 * 10**9
    comm_s = 8.4e-6 + 14 * 3.4e-6 + 2 * 7 / 8 * G / 230e9          # 15.27 ms: hidden by 200 ms
    calls = _timed(ddp(G), dp=8)
    assert calls[0].time_s == pytest.approx(comm_s)
    st = step_time([Stage(f, b, opt, calls)])
    assert st.step_time_s == pytest.approx(f + b + opt)
    assert st.ranks[0].exposed_communication_time_s == 0.0
    assert st.ranks[0].communication_time_s == pytest.approx(comm_s)
    # A backward shorter than the all-reduce leaves the rest exposed: 15.27 - 5 ms.
    st = step_time([Stage(f, 0.005, opt, calls)])
    assert st.ranks[0].exposed_communication_time_s == pytest.approx(comm_s - 0.005)
    assert st.step_time_s == pytest.approx(f + 0.005 + opt + comm_s - 0.005)
    # With 4 micro-batches (no_sync) it still hides under one backward only.
    slow = (replace(calls[0], time_s=0.5),)
    st = step_time([Stage(f, b, opt, slow)], microbatches=4)
    assert st.step_time_s == pytest.approx(4 * (f + b) + (0.5 - b) + opt)


def test_fsdp_overlaps_each_micro_batch_and_tp_is_exposed():
    f, b, m = 0.1, 0.2, 2
    calls = (Collective("all_gather", "fsdp", 1, m, overlap="forward", time_s=2 * 0.15),   # 0.15 a micro-batch
             Collective("reduce_scatter", "fsdp", 1, m, overlap="backward", time_s=2 * 0.05),
             Collective("all_reduce", "tp", 1, 8, time_s=0.04))                             # 0.02 a micro-batch
    st = step_time([Stage(f, b, 0.0, calls)], microbatches=m)
    # per micro-batch: forward all-gather 0.15 over 0.1 of forward: 0.05 exposed; reduce-scatter
    # hidden; TP 0.02 exposed. Two micro-batches.
    assert st.ranks[0].exposed_communication_time_s == pytest.approx(2 * (0.05 + 0.02))
    assert st.step_time_s == pytest.approx(2 * (f + b + 0.05 + 0.02))
    assert exposed_s(0.15, 0.1) == pytest.approx(0.05) and exposed_s(0.05, 0.2) == 0.0


def test_zero_all_gather_after_the_optimizer_is_exposed():
    calls = (Collective("reduce_scatter", "dp", 1, 1, overlap="backward", every_microbatch=False, time_s=0.01),
             Collective("all_gather", "dp", 1, 1, overlap="none", every_microbatch=False, time_s=0.01))
    st = step_time([Stage(0.1, 0.2, 0.03, calls)], microbatches=3)
    assert st.step_time_s == pytest.approx(3 * 0.3 + 0.01 + 0.03)


def test_pipeline_bubble_in_the_step():
    f, b, pp, m = 0.01, 0.02, 4, 8
    for v in (1, 2):
        st = step_time([Stage(f, b)] * pp, microbatches=m, interleave=v)
        ideal = m * (f + b)
        assert st.step_time_s == pytest.approx(ideal + (pp - 1) / v * (f + b))   # Narayanan et al. 2021
        bubble = st.ranks[0].bubble_time_s
        assert bubble / ideal == pytest.approx(bubble_fraction(pp, m, v))
    # Unequal stages, 1F1B: (m - 1) * slowest + the sum of all stages.
    st = step_time([Stage(0.01, 0.02), Stage(0.02, 0.04)], microbatches=4)
    assert st.step_time_s == pytest.approx(3 * 0.06 + (0.03 + 0.06))
    assert [r.bubble_time_s for r in st.ranks] == pytest.approx([0.27 - 4 * 0.03, 0.27 - 4 * 0.06])


def test_throughput_mfu_and_json():
    st = step_time([Stage(0.1, 0.2, 0.01)], tokens_per_step=8 * 4096,
                   model_flops_per_step=6 * 10**9 * 8 * 4096, peak_flops_per_s=312e12, world_size=8)
    assert st.tokens_per_s == pytest.approx(8 * 4096 / 0.31)
    assert st.mfu == pytest.approx(6e9 * 8 * 4096 / (0.31 * 8 * 312e12))    # 0.254
    d = json.loads(json.dumps(st.to_dict()))
    assert set(d) == {"ranks", "step_time_s", "tokens_per_s", "mfu"}
    assert set(d["ranks"][0]) == {"stage", "compute_time_s", "communication_time_s", "exposed_communication_time_s"}
    c = _timed(ddp(100), dp=2)[0].to_dict()
    assert set(c) == {"collective", "group", "bytes", "count", "time_s"} and c["bytes"] == 100


def test_step_errors():
    with pytest.raises(UsageError, match="interleave 2 needs a pipeline \\(pp > 1\\), got pp=1"):
        step_time([Stage(1, 1)], interleave=2)
    with pytest.raises(UsageError, match="multiple of pp .*got microbatches=6, pp=4"):
        step_time([Stage(1, 1)] * 4, microbatches=6, interleave=2)
    with pytest.raises(UsageError, match="all_reduce on dp has no time_s; time the collectives with comm.timed"):
        Stage(1, 1, 0, tuple(ddp(10)))
    with pytest.raises(UsageError, match="mfu needs peak_flops_per_s"):
        step_time([Stage(1, 1)], model_flops_per_step=1e12)
    with pytest.raises(UsageError, match="microbatches must be an integer >= 1, got 0"):
        step_time([Stage(1, 1)], microbatches=0)
    with pytest.raises(UsageError, match="forward_time_s must be a number >= 0, got -1"):
        Stage(-1, 1)


# --- more bandwidth never makes a step slower -----------------------------------------------------

def _step(net, tp, fsdp_degree, dp, pp, m, v, zero_stage, f, b):
    G, A, L = 4 * 10**9, 8 * 2**20, 16
    placements = mesh_placements({"tp": tp, "fsdp": fsdp_degree, "dp": dp, "pp": pp}, net.gpus_per_node)
    calls = tensor_parallel(A, L // pp, microbatches=m) + pipeline_parallel(A, microbatches=m, interleave=v)
    if fsdp_degree > 1:
        calls += fsdp(G // pp, G // pp, units=L // pp, microbatches=m)
    if dp > 1:
        calls += zero(zero_stage, G // pp, G // pp) if zero_stage else ddp(G // pp)
    stage = Stage(f, b, 0.01, tuple(timed(calls, net, placements)))
    return step_time([stage] * pp, microbatches=m, interleave=v).step_time_s


CONFIGS = [(1, 1, 8, 1), (8, 1, 4, 1), (8, 4, 1, 1), (2, 2, 2, 4), (8, 1, 2, 4), (1, 16, 2, 2)]


@settings(max_examples=60, deadline=None)
@given(config=st.sampled_from(CONFIGS), m=st.sampled_from([4, 8]), v=st.sampled_from([1, 2]),
       zero_stage=st.sampled_from([0, 1, 2]), f=st.floats(1e-4, 0.5), b=st.floats(1e-4, 1.0),
       intra=st.floats(1.0, 10.0), inter=st.floats(1.0, 10.0))
def test_more_bandwidth_never_makes_a_step_slower(config, m, v, zero_stage, f, b, intra, inter):
    tp, fsdp_degree, dp, pp = config
    v = v if pp > 1 else 1
    base = load_hardware("a100-80gb").interconnect
    faster = replace(base, intra_node_bandwidth_bytes_per_s=base.intra_node_bandwidth_bytes_per_s * intra,
                     inter_node_bandwidth_bytes_per_s=base.inter_node_bandwidth_bytes_per_s * inter)
    before = _step(base, tp, fsdp_degree, dp, pp, m, v, zero_stage, f, b)
    after = _step(faster, tp, fsdp_degree, dp, pp, m, v, zero_stage, f, b)
    assert after <= before * (1 + 1e-12), (before, after)


def test_collective_time_falls_with_bandwidth_on_a_grid():
    for collective, (ranks, stride), nbytes in itertools.product(
            ("all_reduce", "all_gather", "reduce_scatter", "send_recv"),
            [(2, 1), (8, 1), (16, 1), (4, 8), (64, 8), (32, 2)], [1, 2**20, 2**30]):
        p = place(ranks, stride=stride, gpus_per_node=8)
        times = [collective_time_s(collective, nbytes, p, replace(
            A100, intra_node_bandwidth_bytes_per_s=230e9 * k, inter_node_bandwidth_bytes_per_s=25e9 * j))
            for k, j in [(1, 1), (2, 1), (1, 2), (2, 2), (10, 10)]]
        assert times[1] <= times[0] and times[2] <= times[0] and times[3] <= min(times[1], times[2]), times
        assert times[4] <= times[3]


# --- the module itself ----------------------------------------------------------------------------

def test_docstring_examples_run():
    assert doctest.testmod(comm).failed == 0


@pytest.mark.parametrize("module", ["comm.py", "roofline.py"])
def test_pure_arithmetic_modules_do_not_import_torch(module):
    tree = ast.parse((ROOT / "costmodel" / "hardware" / module).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] == "torch"}, imported


def test_readme_example():
    h100 = load_hardware("h100-sxm")
    groups = mesh_placements({"tp": 8, "dp": 4}, h100.gpus_per_node)
    calls = timed(ddp(2 * 10**9) + tensor_parallel(32 * 2**20, layers=32, microbatches=4), h100.interconnect, groups)
    # dp: one rank on each of 4 nodes, the tree (2 * log2 4 network steps) beats the ring (6):
    # 8.4 us + 2 * 2 * 14 us + 2 * 3/4 * 2e9 / 50e9 = 0.0600644 s
    assert calls[0].to_dict()["time_s"] == pytest.approx(8.4e-6 + 4 * 14e-6 + 1.5 * 2e9 / 50e9)
    # tp: 2 * 2 * 32 * 4 = 512 all-reduces of 32 MiB in a node, all exposed; DDP hides under one backward.
    tp_s = 512 * (8.4e-6 + 14 * 3.4e-6 + 2 * 7 / 8 * 32 * 2**20 / 370e9)
    step = step_time([Stage(0.08, 0.16, 0.005, tuple(calls))], microbatches=4)
    assert step.step_time_s == pytest.approx(4 * (0.08 + 0.16) + 0.005 + tp_s)
    assert round(step.step_time_s, 3) == 1.075                              # as README.md prints it
