"""Layer-wise stages in parallel on Ray Train.

The engine's stages are independent (each maps the teachers' frozen code of one tap to the
next tap's code), so one TorchTrainer runs them side by side, planned by :func:`plan_stages`
(``stages.parallel``): either every worker owns a subset of whole stages (balanced by cost),
reads only the taps its stages need and needs no gradient synchronisation, or every worker
fits every stage on its share of the pool's rows and the gradients are all-reduced once a
step (:func:`group_step`, exactly the global batch's gradient). Either way the stepping is the
engine's own :class:`~amalgam.engine.stages.StageFitter`.

Fault tolerance: after every epoch each rank writes its stages' full training state
(weights, optimiser, schedule, loss curve) into a rank-named file and all ranks report the
same checkpoint. With ``FailureConfig(max_failures=...)`` a dead worker makes Ray Train
restart the group, and every rank resumes its stages from the last checkpoint instead of
starting over. Every rank reports once per epoch, as Ray Train V2 expects. Ranks fitting the
same stages row-parallel hold identical states: the group's first rank writes them, the
others only their epoch and timings, and they restore from the first rank's file.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amalgam.engine.evaluate import count_macs
from amalgam.engine.stages import (
    LstsqStats,
    StageFitter,
    StageNet,
    StageSpec,
    build_stages,
    closed_form_stage,
    stage1_apply,
    stage1_update,
    stage_input,
)
from amalgam.engine.student import build_student
from amalgam.job import StageParallel
from amalgam.distributed.runs import TrainStorage, fit_trainer, inject_fault, use_worker_cpus
from amalgam.zoo.arch import config_from_dict
from amalgam.zoo.manifest import InputSpec, Normalize


# The cost model of one stage-fitting worker, per sample, in "MACs": the time of one
# multiply-accumulate inside an SGD step (forward, backward and Adam together: 0.024 ns at
# 1 thread here). Fitted 2026-11-26 to the demo job's stages (30 000-image pool, 1 thread,
# batch 128), SGD step per sample: conv2 200 us (1.53 M MACs, 47.6 k activation elements),
# conv3 259 us (4.01 M, 47.9 k), fc1 95 us (1.00 M, 20.4 k), head 8 us (0.06 M, 1.2 k).
# MACs alone put conv3 at 2.6x conv2, measured 1.3x: the elementwise work (ReLU, pooling,
# the 1x1 FAM, their backward) on 28x28 maps is memory-bound and as costly as the convs.
#: An activation element (input or any module's output, per sample) costs this many MACs a step.
ELEMENT_MACS = 145.0
#: One stored byte per sample read from the store and decoded (column-projected Parquet read,
#: float16 BYTE_STREAM_SPLIT + zstd, batch gather, float32 cast), in MACs: measured 2.8 ns/B
#: (conv2), 3.1 (conv3), 5.2 (conv1) vs 0.024 ns a MAC, so ~150. A 28x28 13-channel code
#: (20 KB a sample) thus costs as much to read as ~3 M MACs: reads decide the balance of small
#: stages, and a tap two stages on a rank share is read once.
MACS_PER_READ_BYTE = 150.0
#: The least-squares first stage's normal equations per sample, relative to its MACs (it runs
#: in epoch 0 only): measured 87 us a sample for the demo's conv1 (0.09 M MACs), ~40 x MACs.
CLOSED_FORM_MACS_FACTOR = 40.0
#: Up to this many candidate splits, :func:`assign_stages` tries them all (5 stages on 2
#: workers are 16); beyond it, a greedy longest-first assignment by marginal cost.
EXHAUSTIVE_LIMIT = 50_000
IMAGE = "image"  # the read item of a stage whose input is the image
#: One parameter byte all-reduced (gloo, loopback, 2 ranks) in MACs: 1.4 MB took 0.73 ms here
#: (0.52 ns/B; two bare processes all-reducing 300 times, the other rank idle), vs 0.024 ns a
#: MAC. Paid once per global step by ranks fitting stages data-parallel; on the demo 0.3 % of
#: the work.
ALLREDUCE_MACS_PER_BYTE = 22.0


def activation_elements(net: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Elements per sample of the input and of every leaf module's output (one forward)."""
    total = 1
    for d in input_shape:
        total *= d

    def hook(_m, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() // out.shape[0]

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return total


def stage_costs(nets: dict[str, StageNet], specs: list[StageSpec], input_shapes: dict[str, tuple[int, ...]],
                closed_form_first: bool, epochs: int = 1) -> dict[str, float]:
    """Compute of each stage over the whole fit, per sample, in MACs (see ``ELEMENT_MACS``):
    an SGD epoch costs its MACs plus its activation elements' memory-bound work; the
    closed-form first stage runs once (epoch 0)."""
    costs = {}
    first = closed_form_stage(specs, nets, closed_form_first)
    for s in specs:
        macs = float(count_macs(nets[s.name], input_shapes[s.name]))
        if s is first:
            costs[s.name] = macs * CLOSED_FORM_MACS_FACTOR
        else:
            costs[s.name] = (macs + ELEMENT_MACS * activation_elements(nets[s.name], input_shapes[s.name])) * epochs
    return costs


def stage_reads(specs: list[StageSpec], first: StageSpec | None, bytes_per_sample: dict[str, float],
                epochs: int) -> tuple[dict[str, set[str]], dict[str, float]]:
    """What each stage makes its worker read from the store, as items charged once per worker.

    A worker reads the union of its stages' taps (input and target; ``IMAGE`` for the image),
    so a tap shared by two of its stages costs once: the items are sets, a rank's read cost
    is the sum over their union. The closed-form stage reads only in epoch 0, so a tap is two
    items: ``tap@0`` (the first epoch) and ``tap@rest`` (the other ``epochs - 1``), each costing
    ``MACS_PER_READ_BYTE`` x its stored bytes per sample (``bytes_per_sample``: full stored
    width, as decoded; the head's targets are in memory and cost nothing).
    """
    reads: dict[str, set[str]] = {}
    costs: dict[str, float] = {}
    for s in specs:
        taps = {t for t in (s.input_tap or IMAGE, s.target_tap) if t != "head"}
        reads[s.name] = {f"{t}@0" for t in taps} | (set() if s is first else {f"{t}@rest" for t in taps})
        for t in taps:
            costs[f"{t}@0"] = MACS_PER_READ_BYTE * bytes_per_sample[t]
            costs[f"{t}@rest"] = MACS_PER_READ_BYTE * bytes_per_sample[t] * (epochs - 1)
    return reads, costs


def rank_loads(groups: list[list[str]], costs: dict[str, float], reads: dict[str, set[str]] | None = None,
               read_costs: dict[str, float] | None = None) -> list[tuple[float, float]]:
    """(compute, read) cost of each rank: its stages' compute, and its union of read items."""
    out = []
    for g in groups:
        items = set().union(*(reads.get(s, set()) for s in g)) if reads else set()
        out.append((sum(costs[s] for s in g), sum(read_costs[i] for i in items) if read_costs else 0.0))
    return out


def assign_stages(costs: dict[str, float], workers: int, reads: dict[str, set[str]] | None = None,
                  read_costs: dict[str, float] | None = None) -> list[list[str]]:
    """Stages to ranks, every stage exactly once, minimising the most loaded rank.

    A rank's load is its stages' compute (``costs``) plus, when ``reads`` is given, the cost of
    the union of their read items (:func:`stage_reads`): not additive, so with few stages every
    split is tried (optimal; ties go to the split reading less in all); with many, stages go
    longest first, each to the rank least loaded after taking it (classic LPT when reads are absent).
    """
    names = sorted(costs, key=lambda n: -costs[n])
    workers = max(1, workers)

    def loads(groups: list[list[str]]) -> list[float]:
        return [c + r for c, r in rank_loads(groups, costs, reads, read_costs)]

    if names and workers ** (len(names) - 1) <= EXHAUSTIVE_LIMIT:
        best, best_key = None, None
        for rest in itertools.product(range(workers), repeat=len(names) - 1):  # the first stage on rank 0: symmetry
            groups: list[list[str]] = [[] for _ in range(workers)]
            for name, w in zip(names, (0, *rest)):
                groups[w].append(name)
            ls = loads(groups)
            key = (max(ls), sum(ls))
            if best_key is None or key < best_key:
                best, best_key = groups, key
        return best
    out: list[list[str]] = [[] for _ in range(workers)]
    for name in names:
        def grown(w: int) -> tuple[float, float]:
            before = loads([out[w]])[0]
            after = loads([out[w] + [name]])[0]
            return after, after - before
        out[min(range(workers), key=grown)].append(name)
    return out


Segment = tuple[int, int, int]  # (shard index, first row, end row) of the pool's stored codes


def split_rows(rows: list[int], parts: int) -> list[list[Segment]]:
    """The pool's rows in ``parts`` equal shares (to a row), each a list of shard segments:
    the shards laid end to end and cut, so at most ``parts - 1`` shards are shared (each rank
    decodes such a shard and keeps its own rows). Equal shares mean equal steps per epoch,
    and equal 2048-row segments mean ranks read their next shard on the same step."""
    total = sum(rows)
    cuts = [round(total * r / parts) for r in range(parts + 1)]
    out: list[list[Segment]] = [[] for _ in range(parts)]
    offset = 0
    for i, n in enumerate(rows):
        for r in range(parts):
            lo, hi = max(cuts[r], offset), min(cuts[r + 1], offset + n)
            if hi > lo:
                out[r].append((i, lo - offset, hi - offset))
        offset += n
    return out


@dataclass
class StagePlan:
    """Who fits what. ``assignment[rank]``: the stages that rank steps; ``groups``: ranks that
    fit the same stages data-parallel (one global batch split over them, gradients
    all-reduced; a group of one fits its stages alone); ``rows[rank]``: that rank's share of
    the pool (shard segments) when its group is larger than one (``None``: all of it)."""

    mode: str
    assignment: list[list[str]]
    groups: list[list[int]]
    loads: list[tuple[float, float]]  # estimated (compute, read) per rank, MACs a pool sample
    rows: list[list[Segment] | None] = field(default_factory=list)
    batch_sizes: list[int] | None = None  # per rank, row-parallel: its part of each global batch

    @property
    def workers(self) -> int:
        return len(self.assignment)


def plan_stages(costs: dict[str, float], workers: int, reads: dict[str, set[str]], read_costs: dict[str, float],
                shard_rows: list[int], parallel: StageParallel = "auto", param_bytes: float = 0.0,
                batch_size: int = 128, epochs: int = 1) -> StagePlan:
    """The cheaper of owning whole stages per rank and fitting them all data-parallel.

    Owning stages needs no communication, but a rank's load is whole stages: on the demo one
    stage (conv3) is a third of the work, so 2 ranks cannot do better than ~61/50, and ranks
    sharing a tap each read it. Row-parallel splits the compute and the reads evenly by rows
    (:func:`split_rows`) and pays one all-reduce of all stage parameters per step, plus one
    more decode of each shard two ranks share.
    """
    owned_workers = max(1, min(workers, len(costs)))
    owned = assign_stages(costs, owned_workers, reads, read_costs)
    stages_plan = StagePlan("stages", owned, [[r] for r in range(owned_workers)],
                            rank_loads(owned, costs, reads, read_costs), [None] * owned_workers)
    total = sum(shard_rows)
    if parallel == "stages" or workers < 2 or total < workers:
        return stages_plan
    k = workers
    split = split_rows(shard_rows, k)
    everything = sorted(costs, key=lambda n: -costs[n])
    (compute, read), = rank_loads([everything], costs, reads, read_costs)
    sync = ALLREDUCE_MACS_PER_BYTE * param_bytes * epochs / max(1, batch_size)  # per pool sample
    shared = [sum(shard_rows[i] - (end - start) for i, start, end in part) for part in split]  # rows decoded, not kept
    loads = [(compute / k + sync, read * (total / k + extra) / total) for extra in shared]
    rows_plan = StagePlan("rows", [list(everything) for _ in range(k)], [list(range(k))], loads, split,
                          [max(1, math.ceil(batch_size / k))] * k)
    if parallel == "rows":
        return rows_plan
    return min((stages_plan, rows_plan), key=lambda p: max(c + r for c, r in p.loads))


@dataclass
class StageJob:
    """Everything a worker needs (picklable, small)."""

    student_config: dict
    input_spec: dict
    specs: list[StageSpec]
    widths: dict[str, int]
    target_var: dict[str, float]
    head_targets: torch.Tensor
    store_uri: str
    s3: dict
    codes_key: str
    epochs: int
    steps_per_epoch: int
    lr: float
    batch_size: int
    seed: int
    closed_form_first: bool
    assignment: list[list[str]]
    groups: list[list[int]] | None = None  # data-parallel rank groups (StagePlan); None: every rank alone
    rows: list[list[Segment] | None] | None = None  # each rank's shard segments when its group is larger than one
    batch_sizes: list[int] | None = None  # each rank's part of the global batch (row-parallel)
    rank_costs: list[tuple[float, float]] | None = None  # the planner's (compute, read) estimate per rank, for the log
    initial: dict[str, dict] | None = None  # the driver's initial stage weights: same start wherever a stage runs
    threads: int = 1
    fail_at: dict | None = None  # fault injection for tests: {"rank", "epoch", "marker"}


def _ckpt_file(rank: int) -> str:
    return f"stages-rank{rank}.pt"


def stage_worker(config: dict) -> None:
    """Ray Train loop: fit this rank's stages, checkpointing and reporting every epoch."""
    import ray.train
    import ray.train.torch

    from amalgam.distributed.store_source import store_epoch_batches
    from amalgam.store.dataset import Dataset
    from amalgam.store.location import S3Options, open_store

    job: StageJob = config["job"]
    rank = ray.train.get_context().get_world_rank()
    use_worker_cpus(job.threads)
    groups = job.groups or [[r] for r in range(len(job.assignment))]
    group = next((g for g in groups if rank in g), [rank])
    pg = _process_group(groups, rank)
    # Row-parallel: this rank's shards, and its part of the global batch (same steps, same schedule).
    my_rows = job.rows[rank] if job.rows and len(group) > 1 else None
    batch_size = job.batch_sizes[rank] if job.batch_sizes and len(group) > 1 else job.batch_size
    torch.manual_seed(job.seed)
    mine = set(job.assignment[rank]) if rank < len(job.assignment) else set()
    skeleton = build_student(config_from_dict(job.student_config))
    nets = build_stages(skeleton)
    for name, state in (job.initial or {}).items():
        nets[name].load_state_dict(state)
    specs = [s for s in job.specs if s.name in mine]
    first = closed_form_stage(specs, nets, job.closed_form_first)
    # SGD stages on this worker's device (a GPU when the run asked for one); the closed-form
    # stage stays on the CPU: its float64 normal equations are accumulated there.
    device = ray.train.torch.get_device()
    for s in specs:
        if s is not first:
            nets[s.name].to(device)
    fitters = {
        s.name: StageFitter(s, nets[s.name], job.target_var[s.target_tap], job.lr, job.epochs * job.steps_per_epoch)
        for s in specs if s is not first
    }
    start_epoch = resumed = 0
    times = {"loop": 0.0, "read": 0.0, "compute": 0.0, "sync": 0.0}  # this rank's seconds in its epochs, for the log
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            own = torch.load(Path(d) / _ckpt_file(rank), weights_only=True, map_location="cpu")
            # A row-parallel group's stages are identical on all its ranks: its first rank saved them.
            state = own if rank == group[0] else torch.load(Path(d) / _ckpt_file(group[0]), weights_only=True,
                                                            map_location="cpu")
        for name, st in state["fitters"].items():
            fitters[name].load_state_dict(st)
        if first is not None and "first" in state:
            nets[first.name].load_state_dict(state["first"])
        start_epoch = resumed = own["epoch"] + 1
        times = own.get("times", times)
        print(f"[stages] rank {rank}: restored {sorted(mine)} from checkpoint after epoch {start_epoch}")
    # Read only what each epoch uses: the closed-form stage's image and target in epoch 0 only,
    # the SGD stages' taps every epoch (a rank left with only the closed form reads nothing after).
    loc = open_store(job.store_uri, S3Options(**job.s3))
    spec_in = InputSpec(**job.input_spec)
    codes = Dataset.open(loc, job.codes_key)
    verified: set[int] = set()  # shards whose checksum this worker checked: later epochs read only their columns

    def batches_for(stages: list[StageSpec]):
        taps = sorted({t for s in stages for t in (s.input_tap, s.target_tap) if t and t != "head"})
        return store_epoch_batches(
            codes, {t: job.widths[t] for t in taps}, job.head_targets, Normalize(spec_in.mean, spec_in.std),
            batch_size, job.seed, taps=taps, with_image=any(s.input_tap is None for s in stages),
            verified=verified, segments=my_rows,
        )

    sgd = [s for s in specs if s is not first]
    batches_first, batches_rest = batches_for(specs), batches_for(sgd)
    for epoch in range(start_epoch, job.epochs):
        lstsq = LstsqStats()
        t0 = time.perf_counter()
        closed_now = first is not None and epoch == 0
        source = batches_first(epoch) if closed_now else batches_rest(epoch) if sgd else ()
        read_s = step_s = 0.0
        sync = [0.0]  # seconds in the gradient all-reduce (waiting for the group's slowest rank included)
        t_read = time.perf_counter()
        step = -1
        batches = iter(source)
        while True:
            batch = next(batches, None)
            t_step = time.perf_counter()
            read_s += t_step - t_read
            if batch is None and len(group) == 1:
                break
            step += 1
            inject_fault(job.fail_at, rank, epoch, step, "stages")
            if closed_now and batch is not None:
                stage1_update(lstsq, nets[first.name], batch["image"], batch["codes"][first.target_tap])
            on_device = _to_device(batch, device) if fitters and batch is not None else batch
            if len(group) > 1:
                # Until the last rank of the group runs out of rows (its segments may end a batch later).
                if not fitters or not group_step(list(fitters.values()), on_device, pg, sync):
                    if batch is None:
                        break
            else:
                for f in fitters.values():
                    f.step(stage_input(on_device, f.spec), on_device["codes"][f.spec.target_tap])
            t_read = time.perf_counter()
            step_s += t_read - t_step
        if step < 0 and specs:  # an epoch with nothing to read (closed form done) still honours a test's fault
            inject_fault(job.fail_at, rank, epoch, 3, "stages")
        if closed_now:
            if len(group) > 1:
                reduce_lstsq(lstsq, pg)
            stage1_apply(lstsq, nets[first.name])
        losses = {name: f.end_epoch() for name, f in fitters.items()}
        times = {"loop": times["loop"] + time.perf_counter() - t0, "read": times["read"] + read_s,
                 "compute": times["compute"] + step_s, "sync": times.get("sync", 0.0) + sync[0]}
        if specs:
            print(f"[stages] rank {rank} epoch {epoch + 1}/{job.epochs} ({time.perf_counter() - t0:.1f}s: "
                  f"read {read_s:.1f}s, compute {step_s:.1f}s" + (f" incl. sync {sync[0]:.1f}s" if len(group) > 1 else "")
                  + "): "
                  + (", ".join(f"{k} {v:.4f}" for k, v in losses.items()) or f"{first.name} closed form"))
        state = {"epoch": epoch, "times": times}
        if rank == group[0]:  # the others of a row-parallel group hold the very same stages: saved once
            state["fitters"] = {n: f.state_dict() for n, f in fitters.items()}
            if first is not None:
                state["first"] = nets[first.name].state_dict()
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / _ckpt_file(rank))
            # A row-parallel group's ranks hold the same losses: its first rank reports them.
            ray.train.report({"epoch": epoch + 1, "resumed_after_epoch": resumed,
                              **{f"loss/{k}": v for k, v in losses.items() if rank == group[0]}},
                             checkpoint=ray.train.Checkpoint.from_directory(d))


def _process_group(groups: list[list[int]], rank: int):
    """This rank's torch.distributed group for its row-parallel stages (``None``: the default
    group, when it spans every rank). Every rank creates every multi-rank subgroup, in order,
    as ``new_group`` requires."""
    import torch.distributed as dist

    world = sum(len(g) for g in groups)
    mine = None
    for g in groups:
        if len(g) > 1 and len(g) < world:
            handle = dist.new_group(g)
            if rank in g:
                mine = handle
    return mine


def group_step(fitters: list[StageFitter], batch: dict | None, group, sync_s: list[float] | None = None) -> bool:
    """One global step of row-parallel stages: each rank's gradients weighted by its rows,
    summed over the group and divided by all rows (exactly the global batch's gradient), then
    the same optimiser step everywhere, so every rank keeps identical stages. A rank out of
    rows (``batch`` None) contributes nothing; returns False once every rank is out. ``sync_s[0]``
    accumulates the seconds spent in the all-reduce (waiting for the slowest rank included)."""
    import torch.distributed as dist

    n = 0 if batch is None else int(batch["codes"]["head"].shape[0])
    losses = [f.backward(stage_input(batch, f.spec), batch["codes"][f.spec.target_tap], scale=float(n))
              if batch is not None else 0.0 for f in fitters]
    params = [p for f in fitters for p in f.net.parameters()]
    device = params[0].device
    flat = torch.cat([p.grad.reshape(-1) if batch is not None and p.grad is not None
                      else torch.zeros(p.numel(), device=device) for p in params]
                     + [torch.tensor([float(n), *(loss * n for loss in losses)], device=device)])
    t0 = time.perf_counter()
    dist.all_reduce(flat, group=group)
    if sync_s is not None:
        sync_s[0] += time.perf_counter() - t0
    tail = flat[-(len(fitters) + 1):].tolist()
    if tail[0] == 0:
        return False
    flat.div_(tail[0])
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    for f, loss in zip(fitters, tail[1:]):
        f.apply(loss / tail[0])
    return True


def reduce_lstsq(stats: LstsqStats, group) -> None:
    """Sum the closed-form stage's normal equations over a row-parallel group (exact: they are sums)."""
    import torch.distributed as dist

    dist.all_reduce(stats.xtx, group=group)
    dist.all_reduce(stats.xty, group=group)
    count = torch.tensor([float(stats.count)], dtype=torch.float64)
    dist.all_reduce(count, group=group)
    stats.count = int(count.item())


def _to_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``; on the CPU the very same tensors (``Tensor.to`` is then a no-op)."""
    image = batch["image"]
    return {"image": image.to(device) if image is not None else None,
            "codes": {t: c.to(device) for t, c in batch["codes"].items()}}


def fit_stages_on_ray(job: StageJob, storage: TrainStorage, workers: int, cpus_per_worker: float, max_failures: int,
                      log=print, gpus_per_worker: float = 0.0,
                      callbacks: list | None = None) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """Run the stage trainer; return each stage's trained net state and loss curve."""
    gpus = f", {gpus_per_worker:g} GPU each" if gpus_per_worker else ""
    row_groups = [g for g in (job.groups or []) if len(g) > 1]
    how = (f"every stage row-parallel on ranks {row_groups} (rows {[sum(e - b for _, b, e in r) for r in job.rows or []]}, gradients all-reduced)" if row_groups
           else f"assignment {job.assignment}")
    log(f"[stages] Ray Train: {workers} workers{gpus}, {how}; checkpoints under {storage.uri}")
    if job.rank_costs:
        log("[stages] estimated cost per sample in M MACs (compute + store reads; see ELEMENT_MACS): " + "; ".join(
            f"rank {r} {'+'.join(g) or '-'}: {(c + rd) / 1e6:.0f} = {c / 1e6:.0f} + {rd / 1e6:.0f}"
            for r, (g, (c, rd)) in enumerate(zip(job.assignment, job.rank_costs))))
    result = fit_trainer(stage_worker, job, "stages", storage, workers, cpus_per_worker, max_failures,
                         gpus_per_worker=gpus_per_worker, callbacks=callbacks)
    resumed = int(result.metrics.get("resumed_after_epoch", 0))
    if resumed:
        log(f"[stages] a worker was lost; the group restarted and restored from the checkpoint after epoch {resumed}")
    states: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    timing = []
    with result.checkpoint.as_directory() as d:
        for rank in range(workers):
            f = Path(d) / _ckpt_file(rank)
            if not f.exists():
                continue
            state = torch.load(f, weights_only=True, map_location="cpu")
            if "times" in state:
                t = state["times"]
                sync = f" incl. sync {t['sync']:.1f}s" if t.get("sync") else ""
                timing.append(f"rank {rank} {t['loop']:.1f}s (read {t['read']:.1f}s, compute {t['compute']:.1f}s{sync})")
            for name, st in state.get("fitters", {}).items():
                states[name] = st["net"]
                curves[name] = st["curve"]
            if "first" in state:
                first = next(s.name for s in job.specs if s.input_tap is None)
                states[first] = state["first"]
    if timing:
        log("[stages] time in the epochs per rank, Ray Train start-up excluded: " + "; ".join(timing))
    missing = [s.name for s in job.specs if s.name not in states]
    if missing:
        raise RuntimeError(f"stage {missing[0]} has no trained state in the final checkpoint")
    return states, curves
