"""`costmodel plan`: the ways to run one training step on N GPUs, those that fit, fastest first.

Every factorisation dp x fsdp x tp x pp = N is tried, with tp inside one node, ZeRO stage 0/1/2
for dp > 1, fsdp alone for the data-parallel degree as the alternative, a few micro-batch counts
with pp (pp, 2 pp and 4 pp micro-batches: the bubble shrinks, the activations in flight do not
grow past pp), sequence parallelism whenever tp > 1 (it only saves memory), and each
--checkpointing mode. The model is captured once per checkpointing mode; each configuration is
an edit of that capture's timeline (memory.parallel) and a step time (hardware.parallel_step).
A configuration the model cannot take (tp not dividing the heads, more stages than blocks) or
whose largest rank does not fit the device is rejected, with why.
"""

from __future__ import annotations

from costmodel.errors import CostModelError, UsageError
from costmodel.options import Parallel

CHECKPOINTING_TRIED = ("none", "selective", "blocks")


def divisors(n: int) -> list[int]:
    """
    >>> divisors(8)
    [1, 2, 4, 8]
    """
    return [d for d in range(1, n + 1) if n % d == 0]


def configurations(gpus: int, gpus_per_node: int) -> list[dict]:
    """The parallel configurations tried (before checkpointing), as Options fields.

    >>> len(configurations(8, 8)), configurations(2, 8)[0]
    (58, {'parallel': Parallel(dp=2, fsdp=1, tp=1, pp=1), 'zero': 0, 'microbatches': 1, 'sequence_parallel': False})
    """
    out = []
    for tp in divisors(gpus):
        if tp > gpus_per_node:
            continue
        for pp in divisors(gpus // tp):
            d = gpus // (tp * pp)
            shards = [(d, 1, 0), (d, 1, 1), (d, 1, 2), (1, d, 0)] if d > 1 else [(1, 1, 0)]
            for dp, fsdp, zero in shards:
                for m in ([pp, 2 * pp, 4 * pp] if pp > 1 else [1]):
                    out.append({"parallel": Parallel(dp=dp, fsdp=fsdp, tp=tp, pp=pp), "zero": zero,
                                "microbatches": m, "sequence_parallel": tp > 1})
    return out


def plan(model, *, hardware, gpus: int, dims: dict[str, int], inputs: list[str] | None = None,
         dtype: str = "bfloat16", optimizer: str = "adamw", attention: str = "auto", loss: str = "sum",
         amp: bool = False, targets: list[str] | None = None, master_weights: bool = False,
         checkpointing=CHECKPOINTING_TRIED, capacity_bytes: int | None = None,
         trust_remote_code: bool = False, tf32: bool = False, progress=None) -> dict:
    """{"plans": [...fastest first: tokens/s], "rejected": [...]}: each plan the contract's
    {"parallel", "checkpointing", "peak_memory_bytes", "step_time_s", "tokens_per_s"} plus its zero
    stage, micro-batches, sequence parallelism, MFU and the stage holding the peak."""
    from costmodel.api import analyze
    from costmodel.capture.checkpointing import find_blocks
    from costmodel.hardware.catalog import load_hardware
    from costmodel.hardware.parallel_step import breakdown, parallel_step
    from costmodel.memory import parallel
    from costmodel.memory.fit import usable_bytes

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise UsageError(f"--gpus must be a positive integer; got {gpus!r}")
    hw = load_hardware(hardware) if isinstance(hardware, str) else hardware
    capacity = capacity_bytes if capacity_bytes is not None else usable_bytes(hw)
    plans, rejected = [], []
    for ckpt in checkpointing:
        if progress:
            progress(f"capturing with --checkpointing {ckpt}")
        try:
            report = analyze(model, inputs=inputs, mode="train", dtype=dtype, optimizer=optimizer,
                             attention=attention, loss=loss, amp=amp, targets=targets, hardware=hw, tf32=tf32,
                             checkpointing=ckpt, trust_remote_code=trust_remote_code)
        except UsageError as e:
            rejected.append({"parallel": None, "checkpointing": ckpt, "reason": str(e)})
            continue
        point = report.evaluate(**dims)
        analysis = report._analysis_for(report._complete(dict(dims)))
        values = {d: point.dims[d] for d in analysis.captured.dims}
        base = report.memory_model(analysis=analysis)
        blocks = find_blocks(report._loaded.module)
        shared: dict = {}                 # what the configurations of this capture have in common
        sizes: dict = {}                  # buffer size formula -> bytes at `values`
        for cfg in configurations(gpus, hw.gpus_per_node):
            desc = {**cfg["parallel"].to_dict(), "zero": cfg["zero"], "microbatches": cfg["microbatches"],
                    "sequence_parallel": cfg["sequence_parallel"]}
            try:
                options = report.options.with_(**cfg, master_weights=master_weights)
                par = parallel.build(base, analysis.captured, blocks, options, shared)
                stage, peak_bytes = par.peak_at(values, sizes)
            except CostModelError as e:
                rejected.append({"parallel": desc, "checkpointing": ckpt, "reason": str(e)})
                continue
            if peak_bytes > capacity:
                rejected.append({"parallel": desc, "checkpointing": ckpt, "peak_memory_bytes": peak_bytes,
                                 "reason": f"peak {peak_bytes / 2**30:.1f} GiB on stage {stage} > "
                                           f"{capacity / 2**30:.1f} GiB usable on {hw.name}"})
                continue
            timing = parallel_step(point, par, hw, tf32, shared)
            plans.append({"parallel": desc, "checkpointing": ckpt, "peak_memory_bytes": peak_bytes,
                          "step_time_s": timing["step_time_s"], "tokens_per_s": timing["tokens_per_s"],
                          "mfu": timing["mfu"], "peak_stage": stage, "breakdown": breakdown(timing),
                          "headroom_bytes": capacity - peak_bytes})
    # fastest first: most tokens (samples) per second, since the configurations differ in global batch
    # (batch x dp x fsdp x micro-batches); at one global batch that is the shortest step
    plans.sort(key=lambda p: (-(p["tokens_per_s"] or 0), p["step_time_s"], p["peak_memory_bytes"]))
    return {"model": str(model), "hardware": hw.name, "gpus": gpus, "dims": dict(dims),
            "capacity_bytes": capacity, "plans": plans, "rejected": rejected}
