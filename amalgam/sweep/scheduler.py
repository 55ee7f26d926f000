"""ASHA that survives ``Tuner.restore``.

Ray Tune (2.60) does not save the scheduler with the experiment: on restore it is rebuilt
from ``tuner.pkl`` as it was when the sweep started, so every score ASHA had recorded at its
rungs is lost and the resumed trials are judged against nothing (ray-project/ray#30838).
This subclass re-records, before its first decision, the per-epoch objective of every
trial that had already finished (read back from the trials' ``result.json`` in the Tune
directory), so a resumed sweep stops the same poor trials an uninterrupted one would.
Trials that were interrupted mid-run restart from epoch 1 and are recorded afresh.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.fs as pafs
from ray.tune.schedulers import ASHAScheduler

from amalgam.store.location import S3Options, StoreLocation, open_store


def finished_results(loc: StoreLocation) -> dict[str, list[dict]]:
    """trial id -> its reported results, for trials whose last result says done.

    ``loc`` is the Tune experiment directory (local or S3), each trial a subdirectory."""
    out = {}
    for info in sorted(loc.list_dir("", recursive=True), key=lambda i: i.path):
        rel = info.path[len(loc.root):].lstrip("/")
        if info.type != pafs.FileType.File or rel.count("/") != 1 or not rel.endswith("/result.json"):
            continue
        rows = [json.loads(line) for line in loc.read_bytes(rel).decode().splitlines() if line.strip()]
        if rows and rows[-1].get("done"):
            out[rows[-1]["trial_id"]] = rows
    return out


class ResumableASHA(ASHAScheduler):
    def __init__(self, tune_uri: str, s3: dict | None = None, **kwargs):
        # A URI and options, not a filesystem object: this object is pickled into the
        # experiment (tuner.pkl), and a pickled S3 filesystem would carry the credentials.
        super().__init__(**kwargs)
        self._tune_uri, self._s3 = tune_uri, s3 or {}
        self._seeded = False

    def _seed(self) -> None:
        if self._seeded:
            return
        self._seeded = True
        bracket = self._brackets[0]  # one bracket (brackets=1): every trial lands in it
        for trial_id, rows in finished_results(open_store(self._tune_uri, S3Options(**self._s3))).items():
            trial = SimpleNamespace(trial_id=trial_id)
            for r in rows:
                if self._time_attr in r and self._metric in r:
                    bracket.on_result(trial, r[self._time_attr], self._metric_op * r[self._metric])

    @property
    def recorded(self) -> list[tuple[float, dict]]:
        """(milestone, {trial id: score}) per rung: what decisions are made against."""
        return [(m, dict(rec)) for m, rec in self._brackets[0]._rungs]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._seed()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._seed()
        return super().on_trial_result(tune_controller, trial, result)
