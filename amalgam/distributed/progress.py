"""Per-epoch losses of Ray Train runs, back to the driver while the run goes on.

``trainer.fit()`` blocks the driver until the run ends and returns only the final result,
but a long-running driver's metrics (``amalgam_stage_loss{stage}``,
``amalgam_stage_epochs_total{stage}``) should move as each epoch ends. Ray Train calls a
:class:`ray.train.UserCallback` on its controller (another process) after every round of
``ray.train.report``; :class:`EpochReports` turns those reports into ``(stage, epoch, loss)``
items and puts them on a small actor (:class:`_Sink`, no CPU); the driver drains it from a
thread and calls its ``epoch_end(stage, epoch, loss)``.

It reads what the worker loops report (``amalgam.distributed.train_stages``: ``epoch`` and
``loss/<stage>`` per rank; ``train_joint``: ``epoch`` and ``loss``, rank 0's being the joint
curve). Each (stage, epoch) is passed on once: an epoch repeated after a worker restart is
not counted twice. Progress is best effort and never fails training: whatever did not
arrive live (a lost sink, a driver that restarted and resumed a run) is caught up from the
final loss curves by :meth:`EpochProgress.catch_up`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

EpochEnd = Callable[[str, int, float], None]


def _sink_class():
    import ray

    @ray.remote(num_cpus=0)
    class _Sink:
        def __init__(self) -> None:
            self.items: list[tuple[str, int, float]] = []

        def put(self, items: list[tuple[str, int, float]]) -> None:
            self.items.extend(items)

        def drain(self) -> list[tuple[str, int, float]]:
            out, self.items = self.items, []
            return out

    return _Sink


def report_items(kind: str, metrics: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """``(stage, epoch, loss)`` items of one round of reports (``metrics[rank]``); epochs 0-based."""
    items = []
    if kind == "joint":
        m = metrics[0] if metrics else {}
        if "epoch" in m and "loss" in m:
            items.append(("joint", int(m["epoch"]) - 1, float(m["loss"])))
        return items
    for m in metrics:
        for key, value in m.items():
            if key.startswith("loss/") and "epoch" in m:
                items.append((key[len("loss/"):], int(m["epoch"]) - 1, float(value)))
    return items


def _callback_class():
    from ray.train import UserCallback

    class EpochReports(UserCallback):
        """Runs on the Ray Train controller: forwards each round of reports to the sink."""

        def __init__(self, kind: str, sink) -> None:
            self.kind, self.sink = kind, sink

        def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ARG002 (Ray's signature)
            try:
                items = report_items(self.kind, metrics)
                if items:
                    self.sink.put.remote(items)  # fire and forget: training never waits on metrics
            except Exception:  # noqa: BLE001 (progress is best effort)
                pass

    return EpochReports


class EpochProgress:
    """Driver side: ``with EpochProgress("stages", epoch_end) as p: fit_trainer(..., callbacks=p.callbacks)``.

    With ``epoch_end=None`` it does nothing (no actor, no thread, ``callbacks == []``).
    """

    def __init__(self, kind: str, epoch_end: EpochEnd | None, interval: float = 0.5) -> None:
        self.kind, self.epoch_end, self.interval = kind, epoch_end, interval
        self.callbacks: list = []
        self._done: dict[str, int] = {}  # stage -> epochs passed on so far
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sink = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "EpochProgress":
        if self.epoch_end is None:
            return self
        try:
            self._sink = _sink_class().remote()
            self.callbacks = [_callback_class()(self.kind, self._sink)]
        except Exception:  # noqa: BLE001 (no live progress; catch_up still records every epoch)
            self._sink, self.callbacks = None, []
            return self
        self._thread = threading.Thread(target=self._poll, name=f"amalgam-{self.kind}-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._sink is not None:
            import ray

            self._drain(timeout=10)
            try:
                ray.kill(self._sink)
            except Exception:  # noqa: BLE001
                pass
            self._sink = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain(timeout=10)

    def _drain(self, timeout: float) -> None:
        import ray

        try:
            items = ray.get(self._sink.drain.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 (a lost sink: catch_up covers it)
            return
        for stage, epoch, loss in items:
            self._emit(stage, epoch, loss)

    def _emit(self, stage: str, epoch: int, loss: float) -> None:
        with self._lock:
            if epoch != self._done.get(stage, 0):  # repeated after a restart, or out of order
                return
            self._done[stage] = epoch + 1
        self.epoch_end(stage, epoch, loss)

    def catch_up(self, curves: dict[str, list[float]]) -> None:
        """Pass on the epochs of the final ``{stage: loss curve}`` that did not arrive live."""
        if self.epoch_end is None:
            return
        for stage, curve in curves.items():
            for epoch in range(self._done.get(stage, 0), len(curve)):
                self._emit(stage, epoch, float(curve[epoch]))
