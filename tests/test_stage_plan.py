"""Who fits which stage on Ray Train: the planner (whole stages per rank vs every stage
row-parallel) and the row-parallel step, which must equal one step on the whole global batch.

The row-parallel check runs two real processes joined by a real gloo process group on
loopback (what Ray Train sets up for its workers), without Ray: the step itself is under test.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amalgam.distributed.train_stages import group_step, plan_stages, reduce_lstsq, split_rows
from amalgam.engine.stages import LstsqStats, StageFitter, StageSpec, build_stages, stage_specs
from amalgam.engine.student import build_student
from amalgam.zoo.arch import CNNConfig

CFG = CNNConfig(conv_widths=[4, 6, 5], fc_widths=[8], num_classes=5)


def test_split_rows_cuts_the_pool_into_equal_shares_of_shard_segments():
    rows = [2048] * 14 + [1328]
    parts = split_rows(rows, 2)
    assert [sum(e - b for _, b, e in p) for p in parts] == [15000, 15000]
    assert parts[0] == [(i, 0, 2048) for i in range(7)] + [(7, 0, 664)]
    assert parts[1] == [(7, 664, 2048)] + [(i, 0, 2048) for i in range(8, 14)] + [(14, 0, 1328)]
    # Every row exactly once, whatever the sizes.
    rows = [5, 1, 7, 3]
    for k in (1, 2, 3, 5):
        seen = sorted((i, r) for p in split_rows(rows, k) for i, b, e in p for r in range(b, e))
        assert seen == [(i, r) for i, n in enumerate(rows) for r in range(n)]


def _reads(names):
    return {n: {f"{n}-tap@0"} for n in names}, {f"{n}-tap@0": 1.0 for n in names}


def test_planner_splits_rows_when_one_stage_dominates_and_keeps_stages_otherwise():
    reads, read_costs = _reads("abc")
    # One stage is most of the work: owning whole stages cannot do better than 80 on a rank.
    lopsided = {"a": 80.0, "b": 10.0, "c": 10.0}
    plan = plan_stages(lopsided, 2, reads, read_costs, [100, 100, 100, 100], "auto", batch_size=128)
    assert plan.mode == "rows" and plan.groups == [[0, 1]] and plan.assignment == [["a", "b", "c"]] * 2
    assert plan.rows == [[(0, 0, 100), (1, 0, 100)], [(2, 0, 100), (3, 0, 100)]]
    assert plan.batch_sizes == [64, 64]
    assert max(c + r for c, r in plan.loads) == pytest.approx((100 + 3) / 2)
    # Forced, or fewer rows than ranks: whole stages, each exactly once.
    for parallel, shards in (("stages", [100, 100]), ("auto", [1])):
        plan = plan_stages(lopsided, 2, reads, read_costs, shards, parallel)
        assert plan.mode == "stages" and sorted(s for g in plan.assignment for s in g) == ["a", "b", "c"]
        assert plan.groups == [[0], [1]] and plan.rows == [None, None]
    # Two equal stages: owning one each is as fast and needs no all-reduce (a tie keeps stages);
    # communication that outweighs any imbalance keeps stages too.
    reads, read_costs = _reads("ab")
    even = {"a": 50.0, "b": 50.0}
    assert plan_stages(even, 2, reads, read_costs, [100, 100], "auto").mode == "stages"
    assert plan_stages(lopsided | {"c": 10.0}, 2, *_reads("abc"), [100, 100], "auto", param_bytes=1e9,
                       batch_size=1).mode == "stages"
    # A shard two ranks share is decoded by both: charged to each.
    plan = plan_stages(lopsided, 2, *_reads("abc"), [300], "rows", batch_size=128)
    assert plan.rows == [[(0, 0, 150)], [(0, 150, 300)]] and plan.batch_sizes == [64, 64]
    assert [r for _, r in plan.loads] == pytest.approx([3.0, 3.0])  # 3 taps x (150 kept + 150 decoded) / 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fitters(seed: int, total_steps: int) -> dict[str, StageFitter]:
    torch.manual_seed(seed)
    student = build_student(CFG)
    nets = build_stages(student)
    return {s.name: StageFitter(s, nets[s.name], 0.7, 1e-2, total_steps) for s in stage_specs(student)[1:]}


def _batch(rows: slice, data: dict) -> dict:
    return {"image": None, "codes": {t: v[rows] for t, v in data.items()}}


def _data(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(123)  # the same data in every process
    student = build_student(CFG)
    x = torch.randn(n, 1, 28, 28, generator=g)
    codes = {}
    with torch.no_grad():
        for name in student.unit_names:
            x = student.layers[name](student.pres[name](x))
            codes[name] = x + 0.1 * torch.randn(x.shape, generator=g)
    return codes


def _rank(rank: int, port: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    data = _data(40)
    fitters = _fitters(0, 100)
    # Rank 0 holds 24 rows a step, rank 1 16 (uneven parts of a 40-row global batch), and
    # rank 1 runs out one step early: its last step contributes nothing.
    parts = [slice(0, 24), slice(24, 40)]
    for step in range(3):
        batch = _batch(parts[rank], data) if (rank == 0 or step < 2) else None
        assert group_step(list(fitters.values()), batch, None)
    assert not group_step(list(fitters.values()), None, None)  # everyone out: the epoch ends
    stats = LstsqStats()
    p = torch.randn(30, 3, generator=torch.Generator().manual_seed(rank))
    stats.update(p, p @ torch.tensor([[1.0], [2.0], [3.0]]))
    reduce_lstsq(stats, None)
    if rank == 0:
        torch.save(({n: f.net.state_dict() for n, f in fitters.items()}, {n: f._sum / f._n for n, f in fitters.items()},
                    stats.count, stats.xtx), out)
    # Both ranks are done before either tears gloo down, and neither runs the teardown: once, in
    # CI, a rank whose peer had already closed its sockets aborted inside gloo's destructor
    # ("terminate called without an active exception", exit -6) after every assertion had passed.
    dist.barrier()
    os._exit(0)


def test_a_row_parallel_step_equals_one_step_on_the_whole_global_batch(tmp_path):
    ctx = mp.get_context("spawn")
    out = str(tmp_path / "rank0.pt")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    states, mean_losses, count, xtx = torch.load(out, weights_only=True)
    # The same three steps in one process: two on all 40 rows, one on rank 0's 24 only.
    torch.set_num_threads(1)
    data = _data(40)
    ref = _fitters(0, 100)
    losses = {n: [] for n in ref}
    for rows in (slice(0, 40), slice(0, 40), slice(0, 24)):
        b = _batch(rows, data)
        for n, f in ref.items():
            losses[n].append(f.step(b["codes"][f.spec.input_tap], b["codes"][f.spec.target_tap]))
    for name, f in ref.items():
        for key, value in f.net.state_dict().items():
            torch.testing.assert_close(states[name][key], value, rtol=1e-5, atol=1e-6)
        assert mean_losses[name] == pytest.approx(sum(losses[name]) / 3, rel=1e-5)
    # The closed-form stage's normal equations: summed over the ranks exactly.
    whole = LstsqStats()
    for r in range(2):
        p = torch.randn(30, 3, generator=torch.Generator().manual_seed(r))
        whole.update(p, p @ torch.tensor([[1.0], [2.0], [3.0]]))
    assert count == 60
    torch.testing.assert_close(xtx, whole.xtx)
