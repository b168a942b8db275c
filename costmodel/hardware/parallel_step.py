"""Step time of parallel training: each op's roofline time on the rank that runs it, the collectives
each rank makes, composed into a step by hardware.comm.step_time (overlap, bubble, tail).

Which rank runs an op, and how much of it, is read off the parallel memory analysis
(memory.parallel.ParallelMemory), which decided it from the graph:
- the stage: the block its module lies in; an op outside the blocks runs on the stage of the last
  block op before it (forward: the first stage before any; backward: the last stage, where the
  head and loss start it), as memory.parallel.step_stages places the timeline;
- its share: 1/tp for a value that tensor parallelism splits (heads, the MLP's width, forward and
  backward), every op of a block under sequence parallelism; the optimizer's update of a
  parameter 1/fsdp (or 1/dp with ZeRO) and 1/tp where the parameter is split.
A split op is timed at its share of the FLOPs and bytes (the roofline's size ramp makes a smaller
op less efficient), not at a share of its time.

The collectives per stage (hardware.comm's builders, on the graph's byte counts): DDP's gradient
all-reduce, ZeRO's reduce-scatter and all-gather, FSDP's all-gathers and reduce-scatters per unit,
tensor parallelism's two collectives per column/row region found in the graph (forward, backward,
and the forward's again under full recomputation), the pipeline's sends.
"""

from __future__ import annotations

from costmodel.hardware import comm, roofline


def op_placement(ops: list[dict], par) -> list[tuple[list[int], float]]:
    """Per op: the stages that run it and the share of it one rank runs."""
    o = par.options
    p = o.parallel
    blocks = par.blocks
    tp_split = par.tp.split
    tp_params = par.tp.params
    param_stages = par.stage_of_param() if p.pp > 1 else {}
    block_of = [blocks.index_of(op["module"]) if blocks is not None and op["module"] else None for op in ops]
    out: list[tuple[list[int], float]] = []
    current = 0
    for i, op in enumerate(ops):                 # forward and loss, in graph order
        if op["phase"] in ("forward", "loss") and block_of[i] is not None:
            current = par.stage_of_block.get(block_of[i], 0)
        out.append(([current], 1.0))
    current = p.pp - 1
    for i, op in enumerate(ops):
        phase = op["phase"]
        if phase == "backward":
            if block_of[i] is not None:
                current = par.stage_of_block.get(block_of[i], current)
            out[i] = ([current], out[i][1])
        elif phase == "optimizer":
            param = op["name"].partition(":")[2]
            share = 1.0
            if param in tp_params:
                share /= p.tp
            if p.fsdp > 1:
                share /= p.fsdp
            elif o.zero >= 1 and p.dp > 1:
                share /= p.dp
            out[i] = (param_stages.get(param, [0]) if p.pp > 1 else [0], share)
            continue
        split = op["name"] in tp_split or op["name"] in par.tp.edges   # edges: a row's matmul, contracting 1/tp
        if p.tp > 1 and (split or (o.sequence_parallel and block_of[i] is not None)):
            out[i] = (out[i][0], 1.0 / p.tp)
    return out


def stage_collectives(par, stage: int, values: dict) -> list[comm.Collective]:
    """What one rank of `stage` communicates in a step (untimed)."""
    from costmodel.symbols import dim_symbol
    o = par.options
    p = o.parallel
    m, v = o.microbatches, o.pp_interleave
    sub = {dim_symbol(d): x for d, x in values.items()}
    own = par.param_bytes.get(stage, {"params": 0, "grads": 0})
    params_b, grads_b = int(own["params"]), int(own["grads"])
    itemsize = o.dtype.itemsize
    calls: list[comm.Collective] = []
    if p.fsdp > 1:
        reduce_b = grads_b * 4 // itemsize if o.master_weights else grads_b
        calls += comm.fsdp(params_b, reduce_b, units=max(1, par.stage_units.get(stage, 1)), microbatches=m)
        if p.dp > 1:
            calls += comm.ddp(-(-reduce_b // p.fsdp))
    elif p.dp > 1:
        grad_b = grads_b * 4 // itemsize if o.master_weights else grads_b
        if o.zero:
            calls += comm.zero(o.zero, grad_b, params_b)
        else:
            calls += comm.ddp(grad_b, bucket_bytes=None if o.master_weights else comm.DDP_BUCKET_BYTES)
    if p.tp > 1 and par.tp.rows:
        regions = sum(1 for path in par.tp.rows.values() if par.blocks is not None
                      and par.stage_of_block.get(par.blocks.index_of(path)) == stage)
        if regions:
            act = int(par.block_output_bytes.xreplace(sub))
            kinds = ("all_gather", "reduce_scatter") if o.sequence_parallel else ("all_reduce",)
            backward = regions * m * (2 if o.checkpointing == "blocks" else 1)
            for kind in kinds:
                calls.append(comm.Collective(kind, "tp", act, regions * m, overlap="none"))
                calls.append(comm.Collective(kind, "tp", act, backward, overlap="none"))
    if p.pp > 1:
        calls += comm.pipeline_parallel(int(par.boundary_bytes.xreplace(sub)), microbatches=m, interleave=v)
    return calls


def parallel_step(point, par, hw, tf32: bool = False, cache: dict | None = None) -> dict:
    """The step of `point` (an api.Point of a parallel report) on `hw`: per stage compute (forward,
    backward per micro-batch, optimizer), communication, exposed communication and bubble; step
    time, tokens/s and MFU (model FLOPs: three times the forward's matmul FLOPs per sample, no
    recomputation counted). `cache`: a dict shared by the calls for one point and device (`plan`):
    the compute per stage depends on the split alone, not on the micro-batch count."""
    o = par.options
    p = o.parallel
    ops = point.ops
    pp = p.pp
    key = ("compute", id(point), id(hw), tf32, p.dp, p.fsdp, p.tp, p.pp, o.zero, o.sequence_parallel,
           o.pp_interleave)
    if cache is None or key not in cache:
        placement = op_placement(ops, par)
        fwd, bwd, opt = [0.0] * pp, [0.0] * pp, [0.0] * pp
        times = {} if cache is None else cache.setdefault(("op times", id(hw), tf32), {})
        for op, (stages, share) in zip(ops, placement):
            args = (op["flops"] * share, op["bytes"] * share, op["category"], op["dtype"])
            if args not in times:
                times[args] = roofline.op_time(*args, hw, tf32).time_s
            t = times[args]
            for s in stages:
                if op["phase"] == "optimizer":
                    opt[s] += t
                elif op["phase"] == "backward":
                    bwd[s] += t
                else:
                    fwd[s] += t
        if cache is None:
            cache = {}
        cache[key] = (fwd, bwd, opt, point, hw)     # point and hw kept: their ids stay theirs
    fwd, bwd, opt = cache[key][:3]
    net = hw.interconnect
    placements = comm.mesh_placements({"tp": p.tp, "fsdp": p.fsdp, "dp": p.dp, "pp": p.pp}, net.gpus_per_node)
    values = dict(point.dims)
    timed = [comm.timed(stage_collectives(par, s, values), net, placements) for s in range(pp)]
    stages = [comm.Stage(fwd[s], bwd[s], opt[s], tuple(timed[s])) for s in range(pp)]
    batch = next((x for d, x in values.items() if "batch" in d.lower()), 1)
    samples = batch * p.dp * p.fsdp * o.microbatches
    tokens = samples * values["seq"] if "seq" in values else samples
    forward_matmul = sum(op["matmul_flops"] for op in ops if op["phase"] in ("forward", "loss"))
    model_flops = 3 * forward_matmul * p.dp * p.fsdp * o.microbatches
    dtype = next((op["dtype"] for op in ops if op["category"] in ("matmul", "conv", "attention")), "float32")
    step = comm.step_time(stages, microbatches=o.microbatches, interleave=o.pp_interleave, tokens_per_step=tokens,
                          model_flops_per_step=model_flops, peak_flops_per_s=hw.peak_for(dtype, tf32),
                          world_size=p.world_size)
    slowest = max(range(pp), key=lambda s: step.ranks[s].compute_time_s + step.ranks[s].exposed_communication_time_s)
    return {
        "ranks": [{**r.to_dict(), "bubble_time_s": r.bubble_time_s, "forward_time_s": fwd[r.stage],
                   "backward_time_s": bwd[r.stage], "optimizer_time_s": opt[r.stage]} for r in step.ranks],
        "communication": [{**c.to_dict(), "stage": s} for s in range(pp) for c in timed[s]],
        "step_time_s": step.step_time_s, "tokens_per_s": step.tokens_per_s, "mfu": step.mfu,
        "slowest_stage": slowest,
        "model_flops_per_step": model_flops,
    }


def breakdown(extra: dict) -> dict:
    """Compute, exposed communication and bubble of the slowest stage, which with the once-per-step
    tail make up the step (seconds)."""
    r = extra["ranks"][extra["slowest_stage"]]
    return {"compute_s": r["compute_time_s"], "exposed_communication_s": r["exposed_communication_time_s"],
            "bubble_s": r["bubble_time_s"], "step_s": extra["step_time_s"]}
