"""Real parallel training steps: one process per rank under torch.distributed (gloo on the CPU),
each rank's peak of live tensor bytes measured as `costmodel validate --parallel` compares it.

Every rank builds the real model (seeded alike), applies `--checkpointing` to its repeated blocks,
then the strategy, as PyTorch implements it:

  tp    parallelize_module with ColwiseParallel / RowwiseParallel on the linears that the analysis
        recognised as column / row pairs (memory.parallel.find_tensor_parallel: the same split);
  fsdp  fully_shard on each repeated block, then on the root, over the fsdp mesh dimension (HSDP
        over (dp, fsdp) when both are given); --master-weights: MixedPrecisionPolicy(param_dtype=
        --dtype, reduce_dtype=float32) on float32 weights;
  dp    DistributedDataParallel (defaults: 25 MiB buckets, gradient_as_bucket_view=False); --zero 1
        adds torch.distributed.optim.ZeroRedundancyOptimizer;
  pp    torch.distributed.pipelining: the model split by torch.export at the first block of each
        stage (`pipeline` with SplitPoint.BEGINNING), Schedule1F1B over --microbatches, the loss on
        the last stage (return_outputs=False: no output kept for the caller).

A warm-up step allocates the optimizer state; the measured step is the next one. The meter
(validate/meters.LiveStorageMeter) runs from before the strategy is applied, so buffers the
strategy allocates once (DDP's buckets, FSDP's shards, pipelining's receive buffers) are counted.

`fake_fsdp_peak` runs FSDP2 for W ranks in one process under the fake process group, on fake
tensors, measured by PyTorch's own FSDPMemTracker (torch.distributed._tools.fsdp2_mem_tracker):
the way to check W = 8 or 64 on one machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import traceback
from dataclasses import asdict, dataclass, field

import torch

from costmodel.errors import AnalysisError, UsageError

GROUP_ORDER = ("pp", "dp", "fsdp", "tp")        # mesh dimensions, outermost first (tp innermost)


@dataclass
class RankResult:
    rank: int
    coords: dict[str, int]                # index in each group: {"pp": 0, "dp": 1, ...}
    peak_bytes: int
    op: str = ""
    largest: list = field(default_factory=list)
    resident_bytes: int = 0               # live when the measured step starts

    @property
    def stage(self) -> int:
        return self.coords.get("pp", 0)


@dataclass
class Job:
    """What every rank runs (picklable: the model is a source string or a module-level factory)."""

    model: object
    inputs: list[str]
    targets: list[str]
    dims: dict[str, int]
    options: object                       # costmodel.options.Options
    tp_plan: dict[str, str]               # module path -> "colwise" | "rowwise"
    split_points: list[str]               # pp: the first block path of each stage after the first
    blocks: list[str]                     # the repeated blocks' module paths
    out_dir: str = ""
    init_file: str = ""
    threads: int = 1
    keep_largest: int = 8                 # storages listed at each rank's peak


def supported(options) -> None:
    """Raise UsageError for a configuration validate cannot run for real."""
    p = options.parallel
    if options.zero == 2:
        raise UsageError("validate runs PyTorch's own implementations; PyTorch has no ZeRO-2 with replicated "
                         "parameters (its nearest, FSDP with reshard_after_forward=False, shards them): "
                         "accepted: --zero 0 or 1")
    if options.zero == 1 and (p.tp > 1 or p.pp > 1 or p.fsdp > 1):
        raise UsageError("validate runs --zero 1 with dp alone (DDP and ZeroRedundancyOptimizer)")
    if p.pp > 1 and (p.dp > 1 or p.fsdp > 1 or p.tp > 1):
        raise UsageError("validate runs pp alone (torch.distributed.pipelining on the CPU); accepted: "
                         "--parallel pp=N without dp, fsdp or tp")
    if p.pp > 1 and options.pp_interleave > 1:
        raise UsageError("validate runs the 1F1B schedule (--pp-interleave 1)")
    if p.tp > 1 and p.dp > 1 and p.fsdp == 1:
        raise UsageError("validate runs tp with fsdp (2-D), not with DDP; accepted: --parallel fsdp=N,tp=M")
    if p.tp > 1 and options.sequence_parallel:
        raise UsageError("validate runs tp without --sequence-parallel (the prediction models it; the "
                         "PyTorch plan for it is model-specific)")
    if options.master_weights and p.fsdp == 1:
        raise UsageError("validate runs --master-weights as FSDP's MixedPrecisionPolicy; it takes fsdp=N")
    if options.amp:
        raise UsageError("validate --parallel runs without --amp")


def run(job: Job, timeout_s: float = 600) -> list[RankResult]:
    """Every rank's measured peak: one Python process per rank (this module run as a script, so
    nothing of the caller's main module is imported again), gloo over a file store."""
    import pickle
    import subprocess
    import sys
    import time
    supported(job.options)
    world = job.options.parallel.world_size
    with tempfile.TemporaryDirectory(prefix="costmodel-dist-") as tmp:
        job.out_dir, job.init_file = tmp, os.path.join(tmp, "store")
        path = os.path.join(tmp, "job.pkl")
        with open(path, "wb") as f:
            pickle.dump(job, f)
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([package_root, os.getcwd(), env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", str(job.threads))
        procs = [subprocess.Popen([sys.executable, "-m", "costmodel.validate.distributed", path, str(r)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        deadline = time.monotonic() + timeout_s
        errors = {}
        for r, proc in enumerate(procs):
            try:
                _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise AnalysisError(f"the {job.options.parallel} run did not finish in {timeout_s:.0f} s")
            if proc.returncode:
                errors[r] = (err or "").strip().splitlines()[-1:] 
        results = []
        for r in range(world):
            out = os.path.join(tmp, f"rank{r}.json")
            if not os.path.exists(out):
                raise AnalysisError(f"rank {r} of the {job.options.parallel} run wrote no result: {errors.get(r)}")
            with open(out) as f:
                data = json.load(f)
            if "error" in data:
                raise AnalysisError(f"rank {r} of the {job.options.parallel} run failed: {data['error']}")
            results.append(RankResult(**data))
    return results


def coords_of(rank: int, degrees: dict[str, int]) -> dict[str, int]:
    """The rank's index in each group, tp innermost (consecutive ranks), then fsdp, dp, pp.

    >>> coords_of(5, {"pp": 2, "dp": 1, "fsdp": 2, "tp": 2})
    {'pp': 1, 'dp': 0, 'fsdp': 0, 'tp': 1}
    """
    out = {}
    for g in reversed(GROUP_ORDER):
        out[g] = rank % degrees[g]
        rank //= degrees[g]
    return {g: out[g] for g in GROUP_ORDER}


def _worker(rank: int, job: Job) -> None:
    out = os.path.join(job.out_dir, f"rank{rank}.json")
    try:
        result = _rank(rank, job)
        data = asdict(result)
    except Exception as e:          # noqa: BLE001 (reported to the parent with its traceback's end)
        where = traceback.format_exc() if os.environ.get("COSTMODEL_DEBUG") else \
            traceback.format_exc().strip().splitlines()[-3].strip()
        data = {"error": f"{type(e).__name__}: {e} [{where}]"}
    with open(out, "w") as f:
        json.dump(data, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _rank(rank: int, job: Job) -> RankResult:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from costmodel.capture.checkpointing import checkpointed
    from costmodel.capture.specs import parse_input
    from costmodel.validate.meters import LiveStorageMeter
    from costmodel.validate.runner import build_real, make_inputs, make_optimizer

    torch.set_num_threads(job.threads)
    o = job.options
    p = o.parallel
    degrees = {g: getattr(p, g) for g in GROUP_ORDER}
    dist.init_process_group("gloo", init_method=f"file://{job.init_file}", rank=rank, world_size=p.world_size)
    mesh = init_device_mesh("cpu", tuple(degrees[g] for g in GROUP_ORDER), mesh_dim_names=GROUP_ORDER)
    coords = coords_of(rank, degrees)
    torch.manual_seed(0)
    name = job.model if isinstance(job.model, str) else getattr(job.model, "__name__", "model")
    model = build_real(job.model, name, "cpu")
    if o.dtype != torch.float32 and not o.master_weights:
        model = model.to(o.dtype)
    model.train()
    specs = [parse_input(s) for s in job.inputs]
    targets = [parse_input(s) for s in job.targets]
    config = getattr(model, "config", None)
    high = int(getattr(config, "vocab_size", None) or 2)
    m = o.microbatches
    torch.manual_seed(1 + coords["dp"] * p.fsdp + coords["fsdp"])
    batches = [make_inputs(specs, job.dims, "cpu", dtype=None if o.master_weights else o.dtype, high=high)
               + make_inputs(targets, job.dims, "cpu") for _ in range(m)]
    stack = contextlib.ExitStack()
    meter = LiveStorageMeter("cpu", keep_largest=job.keep_largest)
    if p.pp > 1:
        module, step = _pipeline(model, job, specs, targets, batches, mesh, coords, stack, meter)
    else:
        stack.enter_context(checkpointed(model, o.checkpointing) if o.checkpointing != "none"
                            else contextlib.nullcontext())
        stack.enter_context(meter)
        meter.add([*model.parameters(), *model.buffers(), *[t for b in batches for t in b]])
        module, optimizer = _apply(model, job, mesh)
        step = _plain_step(module, optimizer, job, specs, targets, batches)
    step()                                        # warm-up: the optimizer state
    meter.peak = meter.current
    resident = meter.current
    step()
    stack.close()
    return RankResult(rank, coords, int(meter.peak), meter.peak_op,
                      [list(e) for e in meter.peak_largest], int(resident))


def _apply(model, job: Job, mesh):
    """TP, then FSDP or DDP, then the optimizer."""
    o = job.options
    p = o.parallel
    if p.tp > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        from torch.distributed.tensor import Replicate
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        # an embedding table split by rows takes whole token ids (torchtitan's tok_embeddings plan)
        plan = {path: RowwiseParallel(input_layouts=Replicate())
                if kind == "rowwise" and isinstance(model.get_submodule(path), torch.nn.Embedding) else styles[kind]()
                for path, kind in job.tp_plan.items()}
        for path in plan:
            if not isinstance(model.get_submodule(path), (torch.nn.Linear, torch.nn.Embedding)):
                raise UsageError(f"PyTorch's tensor parallelism shards nn.Linear and nn.Embedding; {path} is a "
                                 f"{type(model.get_submodule(path)).__name__}")
        parallelize_module(model, mesh["tp"], plan)
    if p.fsdp > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        shard_mesh = mesh["dp", "fsdp"] if p.dp > 1 else mesh["fsdp"]
        kwargs = {"mesh": shard_mesh}
        if o.master_weights:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=o.dtype, reduce_dtype=torch.float32)
        for path in job.blocks:
            fully_shard(model.get_submodule(path), **kwargs)
        fully_shard(model, **kwargs)
        module = model
    elif p.dp > 1:
        from torch.nn.parallel import DistributedDataParallel
        module = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    else:
        module = model
    params = [q for q in module.parameters() if q.requires_grad]
    if o.zero == 1 and p.dp > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from costmodel.validate.runner import make_optimizer
        probe = make_optimizer(o.optimizer, [torch.nn.Parameter(torch.zeros(1))])
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=type(probe), process_group=mesh["dp"].get_group(),
                                            **probe.defaults)
    else:
        from costmodel.validate.runner import make_optimizer
        optimizer = make_optimizer(o.optimizer, params)
    return module, optimizer


def _plain_step(module, optimizer, job: Job, specs, targets, batches):
    from costmodel.capture.loss import compute_loss
    from costmodel.capture.trace import call_plan
    o = job.options
    call = call_plan(getattr(module, "module", module), specs)
    sync_off = _no_sync(module)

    def step():
        for j, values in enumerate(batches):
            inputs, tgts = values[:len(specs)], values[len(specs):]
            args, kwargs = call(inputs)
            with sync_off(j < len(batches) - 1):
                loss = compute_loss(module(*args, **kwargs), o.loss, inputs, specs, tgts, targets)
                loss.backward()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _no_sync(module):
    """DDP's no_sync for all but the last micro-batch (FSDP reduce-scatters every micro-batch)."""
    def context(skip: bool):
        if skip and hasattr(module, "no_sync") and not hasattr(module, "reshard"):
            return module.no_sync()
        return contextlib.nullcontext()
    return context


def _pipeline(model, job: Job, specs, targets, batches, mesh, coords, stack, meter):
    """Stage `coords["pp"]` of the model split by torch.export, run by Schedule1F1B."""
    from torch.distributed.pipelining import Schedule1F1B, SplitPoint, pipeline

    from costmodel.capture.checkpointing import checkpointed
    from costmodel.capture.loss import compute_loss
    from costmodel.capture.trace import call_plan
    from costmodel.validate.runner import make_optimizer
    o = job.options
    s, pp = coords["pp"], o.parallel.pp
    if o.loss != "sum" or targets:
        raise UsageError("validate runs pp with --loss sum (the schedule computes the loss on the last stage)")
    call = call_plan(model, specs)
    args, kwargs = call(batches[0][:len(specs)])
    if kwargs.keys() - {s_.name for s_ in specs}:
        kwargs = {k: v for k, v in kwargs.items() if k in {s_.name for s_ in specs}}
    # torch.export traces the model: positions the model makes itself are one sequence per row, as
    # eager finds them (transformers would otherwise build the [b, 1, s, s] masks eager skips)
    from costmodel.capture.eager_paths import eager_masks_under_export
    positions = contextlib.nullcontext() if any(s_.name in ("position_ids", "attention_mask") for s_ in specs) \
        else eager_masks_under_export()
    with positions:
        pipe = pipeline(model, mb_args=tuple(args), mb_kwargs=kwargs or None,
                        split_spec={path: SplitPoint.BEGINNING for path in job.split_points})
    module = pipe.get_stage_module(s)
    stage = pipe.build_stage(s, torch.device("cpu"), group=mesh["pp"].get_group())
    del pipe
    mine = [path for path in job.blocks if _has(module, path)]
    if o.checkpointing != "none":
        from costmodel.capture.checkpointing import Blocks
        stack.enter_context(checkpointed(module, o.checkpointing, Blocks("", tuple(mine), 0)))
    # the whole batch, handed to the first stage's schedule (which splits it into views); the
    # other stages hold no inputs
    whole_args = [torch.cat([b[i] for b in batches]) for i in range(len(specs))] if s == 0 else []
    batches.clear()
    stack.enter_context(meter)
    meter.add([*module.parameters(), *module.buffers(), *whole_args])
    optimizer = make_optimizer(o.optimizer, [q for q in module.parameters() if q.requires_grad])

    def loss_fn(output, target):
        return compute_loss(output, "sum", [], [], [], [])
    schedule = Schedule1F1B(stage, o.microbatches, loss_fn=loss_fn)
    names = [s_.name for s_ in specs]

    def step():
        if s == 0:
            a, kw = call(whole_args)
            kw = {k: v for k, v in kw.items() if k in names}
            schedule.step(*a, **kw, return_outputs=False)
        elif s == pp - 1:
            schedule.step(target=torch.zeros(o.microbatches), losses=[], return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return module, step


def _has(module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


# --- FSDP2 for W ranks in one process ---------------------------------------------------------------

def fake_fsdp_peak(job: Job, world_size: int) -> dict:
    """FSDPMemTracker's peak (bytes, and its categories) of FSDP2 at `world_size` ranks, one process
    under the fake process group, fake tensors (run in a subprocess: the process group is global)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="costmodel-fake-") as tmp:
        job.out_dir = tmp
        proc = ctx.Process(target=_fake_worker, args=(job, world_size))
        proc.start()
        proc.join()
        with open(os.path.join(tmp, "fake.json")) as f:
            data = json.load(f)
    if "error" in data:
        raise AnalysisError(f"the fake-process-group FSDP run at W={world_size} failed: {data['error']}")
    return data


def _fake_worker(job: Job, world_size: int) -> None:
    try:
        data = _fake(job, world_size)
    except Exception as e:          # noqa: BLE001
        data = {"error": f"{type(e).__name__}: {e} [{traceback.format_exc().strip().splitlines()[-3].strip()}]"}
    with open(os.path.join(job.out_dir, "fake.json"), "w") as f:
        json.dump(data, f)


def _fake(job: Job, world_size: int) -> dict:
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from costmodel.capture.checkpointing import checkpointed
    from costmodel.capture.eager_paths import own_positions
    from costmodel.capture.loss import compute_loss
    from costmodel.capture.specs import parse_input
    from costmodel.capture.trace import call_plan
    from costmodel.validate.runner import build_real, make_inputs, make_optimizer

    o = job.options
    torch.set_num_threads(job.threads)
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    mesh = init_device_mesh("cpu", (world_size,))
    specs = [parse_input(s) for s in job.inputs]
    with FakeTensorMode():
        name = job.model if isinstance(job.model, str) else "model"
        model = build_real(job.model, name, "cpu")
        if o.dtype != torch.float32 and not o.master_weights:
            model = model.to(o.dtype)
        model.train()
        kwargs = {"mesh": mesh}
        if o.master_weights:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=o.dtype, reduce_dtype=torch.float32)
        for path in job.blocks:
            fully_shard(model.get_submodule(path), **kwargs)
        fully_shard(model, **kwargs)
        optimizer = make_optimizer(o.optimizer, [q for q in model.parameters() if q.requires_grad])
        config = getattr(model, "config", None)
        values = make_inputs(specs, job.dims, "cpu", dtype=None if o.master_weights else o.dtype,
                             high=int(getattr(config, "vocab_size", None) or 2))
        call = call_plan(model, specs)
        args, kw = call(values)

        def step():
            loss = compute_loss(model(*args, **kw), o.loss, values, specs, [], [])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        positions = contextlib.nullcontext() if any(s.name == "position_ids" for s in specs) else own_positions()
        with positions, checkpointed(model, o.checkpointing) if o.checkpointing != "none" else contextlib.nullcontext():
            step()
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs(tuple(values))
            with tracker:
                step()
        snap = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    dist.destroy_process_group()
    return {"peak_bytes": int(snap["Total"]), "categories": {str(k).rpartition(".")[2] if not isinstance(k, str)
                                                                else k: int(v) for k, v in snap.items()}}


# --- prediction beside measurement ------------------------------------------------------------------

def job_for(report, dims: dict[str, int], model=None) -> Job:
    """The real run that checks `report`'s parallel prediction at `dims`: the same blocks, tensor-parallel
    plan and pipeline split as the analysis found."""
    from costmodel.capture.checkpointing import find_blocks
    par = report.parallel_memory()
    blocks = find_blocks(report._loaded.module)
    paths = list(blocks.paths) if blocks is not None else []
    splits = [paths[min(s.blocks)] for s in par.stages[1:] if s.blocks]
    source = model if model is not None else report.model
    return Job(source, [str(s) for s in report.inputs], [str(t) for t in report.options.targets], dict(dims),
               report.options, par.tp.plan(), splits, paths)


@dataclass
class RankComparison:
    rank: int
    stage: int
    coords: dict[str, int]
    measured_bytes: int
    predicted_bytes: int

    @property
    def error_pct(self) -> float:
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes * 100

    def to_dict(self) -> dict:
        return {"rank": self.rank, "stage": self.stage, "coords": self.coords,
                "measured": {"peak_memory_bytes": self.measured_bytes},
                "predicted": {"peak_memory_bytes": self.predicted_bytes}, "error_pct": round(self.error_pct, 3)}


def compare(report, dims: dict[str, int], model=None, timeout_s: float = 600) -> list[RankComparison]:
    """Run the real step of `report`'s configuration at `dims` and set each rank's measured peak
    beside its stage's predicted one."""
    predicted = report.ranks_at(dims, device="cpu")
    results = run(job_for(report, dims, model), timeout_s)
    return [RankComparison(r.rank, r.stage, r.coords, r.peak_bytes, predicted[r.stage].peak_bytes)
            for r in results]


if __name__ == "__main__":          # one rank of `run`: python -m costmodel.validate.distributed JOB RANK
    import pickle
    import sys
    with open(sys.argv[1], "rb") as f:
        _job = pickle.load(f)
    _worker(int(sys.argv[2]), _job)
