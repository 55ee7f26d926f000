"""Prometheus metrics of an amalgamation job: the ``amalgam_*`` family.

Two ways out, because jobs live two kinds of lives:

* a long-running driver (``amalgam run`` on a Ray cluster) calls :func:`serve` once and
  Prometheus scrapes it (the ``PodMonitor`` in ``k8s/base`` names the port);
* a batch job (the scheduled retraining of ``k8s/base/raycronjob.yaml``) may be gone
  before any scrape, so it wraps its work in :func:`batch_job`, which pushes everything
  to a Pushgateway at the end, on success and on failure alike.

Where each metric is meant to be updated. The engine does not call these yet; whoever wires
them in calls the helper functions below, never ``.labels()`` directly, so that every label
value goes through the cardinality guard:

================================================  ==========================================================
metric (helper)                                   where
================================================  ==========================================================
``amalgam_samples_extracted_total{teacher}``      feature extraction (``engine/capture.py`` and its Ray tasks),
(:func:`samples_extracted`)                       after one teacher's features for a batch are written
``amalgam_teacher_forwards_total{teacher}``       each teacher forward pass over a batch (statistics pass,
(:func:`teacher_forward`)                         extraction, calibration): per shard from the extraction
                                                  actors; with ``--local``, the engine's counters
                                                  (``engine/counters.py``) synced by ``amalgam run``
``amalgam_store_written_bytes_total{backend}``    the Parquet feature store, after each shard is written
``amalgam_store_read_bytes_total{backend}``       (bytes of the file) or read back; backend ``local``/``s3``
(:func:`bytes_written`, :func:`bytes_read`)
``amalgam_stage_loss{stage}``,                    end of each epoch of a layer-wise stage (``engine/stages.py``;
``amalgam_stage_epochs_total{stage}``             stage = tap name such as ``conv2``), of the joint stage
(:func:`stage_epoch`)                             (``joint``), the gate (``gate``) and the autoencoders;
                                                  ``amalgam run`` passes ``epoch_end`` to the engine, and Ray
                                                  Train's reports reach it live (``distributed/progress.py``)
``amalgam_trials_total{status}``                  Ray Tune width sweep, when a trial ends
(:func:`trial_finished`)                          (status ``completed``/``failed``/``pruned``)
``amalgam_student_accuracy{model,split}``         ``engine/evaluate.py``, once per evaluated model
(:func:`student_accuracy`)                        (model ``student``/``kd``/``supervised``; split ``val``/``test``)
``amalgam_job_phase``, ``amalgam_phase_``         ``engine/run_local.py`` and the distributed driver: one
``duration_seconds{phase}`` (:func:`phase`)       ``with phase("extract"):`` around each pipeline phase
``amalgam_job_start_time_seconds``,               :func:`batch_job` (or :func:`job_started` /
``amalgam_job_duration_seconds``,                 :func:`job_finished` in a long-running driver)
``amalgam_job_last_success_timestamp_seconds``
================================================  ==========================================================

Label cardinality stays bounded: labels name teachers, stages, phases and fixed outcomes,
never samples, paths or run ids. :func:`_label` enforces it: a value must be a short token
(no ``/``, so no paths) and each metric holds at most :data:`MAX_SERIES` label sets.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, push_to_gateway, start_http_server

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from amalgam.errors import AmalgamError

PHASES = ("pending", "extract", "amalgamate", "stages", "joint", "tune", "evaluate", "export", "succeeded", "failed")
"""States of ``amalgam_job_phase``; the pipeline phases in order, then the two outcomes."""
WORK_PHASES = PHASES[1:-2]
BACKENDS = ("local", "s3")
TRIAL_STATUSES = ("completed", "failed", "pruned")
MODELS = ("student", "kd", "supervised")
SPLITS = ("val", "test")
MAX_SERIES = 64
"""At most this many label sets per metric: a zoo of more teachers than this is not a zoo."""

_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AmalgamMetrics:
    """One set of ``amalgam_*`` metrics in its own registry.

    The process-wide set is :data:`METRICS`; tests build their own so counts start at zero.
    A dedicated registry (not prometheus-client's global one) keeps pushes and scrapes to
    exactly these metrics, with no interpreter internals riding along to the Pushgateway.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.samples_extracted_total = Counter(
            "amalgam_samples_extracted", "Samples whose features a teacher has extracted.", ["teacher"], registry=r)
        self.teacher_forwards = Counter(
            "amalgam_teacher_forwards", "Teacher forward passes (batches).", ["teacher"], registry=r)
        self.written_bytes = Counter(
            "amalgam_store_written_bytes", "Bytes written to the feature store.", ["backend"], registry=r)
        self.read_bytes = Counter("amalgam_store_read_bytes", "Bytes read from the feature store.", ["backend"], registry=r)
        self.stage_loss = Gauge("amalgam_stage_loss", "Loss at the end of the last epoch of a stage.", ["stage"], registry=r)
        self.stage_epochs = Counter("amalgam_stage_epochs", "Epochs completed per stage.", ["stage"], registry=r)
        self.trials = Counter("amalgam_trials", "Tuning trials finished, by outcome.", ["status"], registry=r)
        self.accuracy = Gauge(
            "amalgam_student_accuracy", "Top-1 accuracy over the global class space.", ["model", "split"], registry=r)
        self.job_phase = Enum("amalgam_job_phase", "Current phase of the job.", states=list(PHASES), registry=r)
        self.phase_duration = Gauge(
            "amalgam_phase_duration_seconds", "Wall time of the last run of each phase.", ["phase"], registry=r)
        self.job_start = Gauge("amalgam_job_start_time_seconds", "Unix time the job started.", registry=r)
        self.job_duration = Gauge(
            "amalgam_job_duration_seconds", "Wall time of the job so far, or in all once it ended.", registry=r)
        self.last_success = Gauge(
            "amalgam_job_last_success_timestamp_seconds", "Unix time the job last succeeded.", registry=r)
        self._series: dict[str, set[tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._t1: float | None = None
        # Live while the job runs (a scrape mid-run sees it grow), frozen once it ends.
        self.job_duration.set_function(self._duration)

    def _duration(self) -> float:
        if self._t0 is None:
            return 0.0
        return (self._t1 if self._t1 is not None else time.time()) - self._t0

    # -- cardinality guard -------------------------------------------------------------

    def _labels(self, metric: Counter | Gauge, **values: str):
        """``metric.labels(**values)`` after checking each value is a bounded token.

        Refuses values that look like paths or ids (``/``, spaces, over 64 characters) and any
        label set past :data:`MAX_SERIES` for one metric, so a mistaken call fails in tests
        instead of exploding Prometheus' series count in production.
        """
        for key, value in values.items():
            if not isinstance(value, str) or not _TOKEN.match(value):
                raise ValueError(f"metric {metric._name}: label {key}={value!r} is not a short name "
                                 "(letters, digits, _.-; no paths or ids)")
        key = tuple(values[k] for k in metric._labelnames)
        with self._lock:
            seen = self._series.setdefault(metric._name, set())
            if key not in seen:
                if len(seen) >= MAX_SERIES:
                    raise ValueError(f"metric {metric._name}: more than {MAX_SERIES} label sets; "
                                     f"refusing {dict(values)} to keep cardinality bounded")
                seen.add(key)
        return metric.labels(**values)

    @staticmethod
    def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        return value

    # -- updates -----------------------------------------------------------------------

    def samples_extracted(self, teacher: str, n: int) -> None:
        self._labels(self.samples_extracted_total, teacher=teacher).inc(n)

    def teacher_forward(self, teacher: str, batches: int = 1) -> None:
        self._labels(self.teacher_forwards, teacher=teacher).inc(batches)

    def bytes_written(self, n: int, backend: str = "local") -> None:
        self._labels(self.written_bytes, backend=self._one_of("backend", backend, BACKENDS)).inc(n)

    def bytes_read(self, n: int, backend: str = "local") -> None:
        self._labels(self.read_bytes, backend=self._one_of("backend", backend, BACKENDS)).inc(n)

    def stage_epoch(self, stage: str, loss: float) -> None:
        self._labels(self.stage_loss, stage=stage).set(loss)
        self._labels(self.stage_epochs, stage=stage).inc()

    def trial_finished(self, status: str = "completed") -> None:
        self._labels(self.trials, status=self._one_of("status", status, TRIAL_STATUSES)).inc()

    def student_accuracy(self, value: float, model: str = "student", split: str = "test") -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1]; got {value}")
        self._labels(self.accuracy, model=self._one_of("model", model, MODELS),
                     split=self._one_of("split", split, SPLITS)).set(value)

    def job_started(self) -> None:
        """Mark the job as started: phase ``pending``, start time, a live duration."""
        self._t0, self._t1 = time.time(), None
        self.job_start.set(self._t0)
        self.job_phase.state("pending")

    def job_finished(self, ok: bool) -> None:
        """Freeze the duration and set the outcome phase (and last-success time when ``ok``)."""
        self._t1 = time.time()
        self.job_phase.state("succeeded" if ok else "failed")
        if ok:
            self.last_success.set(self._t1)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._one_of("phase", name, WORK_PHASES)
        self.job_phase.state(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._labels(self.phase_duration, phase=name).set(time.perf_counter() - t0)


METRICS = AmalgamMetrics()
"""The process-wide metrics; the module-level helpers below update these."""


# -- module-level API (what the engine calls) ----------------------------------------------


def samples_extracted(teacher: str, n: int) -> None:
    METRICS.samples_extracted(teacher, n)


def teacher_forward(teacher: str, batches: int = 1) -> None:
    METRICS.teacher_forward(teacher, batches)


def bytes_written(n: int, backend: str = "local") -> None:
    METRICS.bytes_written(n, backend)


def bytes_read(n: int, backend: str = "local") -> None:
    METRICS.bytes_read(n, backend)


def stage_epoch(stage: str, loss: float) -> None:
    METRICS.stage_epoch(stage, loss)


def trial_finished(status: str = "completed") -> None:
    METRICS.trial_finished(status)


def student_accuracy(value: float, model: str = "student", split: str = "test") -> None:
    METRICS.student_accuracy(value, model, split)


def job_started() -> None:
    METRICS.job_started()


def job_finished(ok: bool) -> None:
    METRICS.job_finished(ok)


def phase(name: str, metrics: AmalgamMetrics | None = None):
    """``with phase("extract"): ...`` sets ``amalgam_job_phase`` and records the phase's wall time.

    ``name`` is one of :data:`WORK_PHASES`; the outcome phases are set by :func:`job_finished`.
    """
    return (metrics or METRICS).phase(name)


# -- getting the numbers out ---------------------------------------------------------------


class MetricsSettings(BaseModel):
    """Where a driver's metrics go, from the environment (``k8s/base`` sets these in amalgam-config).

    ``AMALGAM_METRICS_PORT``: serve ``/metrics`` on this port (unset: no endpoint);
    ``AMALGAM_METRICS_ADDR``: bind address (default loopback; pods use 0.0.0.0);
    ``AMALGAM_PUSHGATEWAY``: push to this Pushgateway at the end of a batch job (unset: no push).
    """

    model_config = ConfigDict(extra="forbid")
    port: int | None = Field(None, ge=0, le=65535)
    addr: str = "127.0.0.1"
    pushgateway: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "MetricsSettings":
        env = dict(os.environ if env is None else env)
        names = {"port": "AMALGAM_METRICS_PORT", "addr": "AMALGAM_METRICS_ADDR", "pushgateway": "AMALGAM_PUSHGATEWAY"}
        raw = {field: env[var] for field, var in names.items() if env.get(var)}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            var = names[str(err["loc"][0])]
            raise AmalgamError(f"{var}={env.get(var)!r}: {err['msg']}") from None



@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port (useful with ``port=0``)."""

    server: WSGIServer
    thread: threading.Thread
    addr: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(port: int, addr: str = "127.0.0.1", metrics: AmalgamMetrics | None = None) -> MetricsServer:
    """Expose the metrics over HTTP for scraping, from a background thread.

    Binds loopback unless told otherwise: a pod passes ``addr="0.0.0.0"`` so Prometheus can
    reach it on the pod IP (the NetworkPolicy in ``k8s/`` then decides who may).
    """
    try:
        server, thread = start_http_server(port, addr=addr, registry=(metrics or METRICS).registry)
    except OSError as exc:
        raise AmalgamError(f"metrics endpoint {addr}:{port}: cannot listen ({exc.strerror or exc})") from None
    return MetricsServer(server, thread, addr, server.server_port)


def push(gateway: str, job: str, metrics: AmalgamMetrics | None = None, timeout: float = 10.0) -> None:
    """Replace this job's group on the Pushgateway with the current values (HTTP PUT).

    ``job`` is the Pushgateway grouping key: the job spec's name, so the group count stays the
    number of scheduled jobs, not the number of runs.
    """
    if not _TOKEN.match(job):
        raise ValueError(f"Pushgateway job name {job!r} is not a short name (letters, digits, _.-)")
    try:
        push_to_gateway(gateway, job=job, registry=(metrics or METRICS).registry, timeout=timeout)
    except OSError as exc:  # URLError, connection refused, timeouts
        reason = getattr(exc, "reason", None) or exc
        raise AmalgamError(f"Pushgateway {gateway}: push of job {job} failed ({reason})") from None


@contextmanager
def batch_job(gateway: str | None, job: str, metrics: AmalgamMetrics | None = None,
              log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Iterator[AmalgamMetrics]:
    """Run a batch job's body and push its metrics at the end, whether it succeeds or fails.

    A failed push is reported on one line through ``log`` and never hides the job's own error:
    the retraining result matters more than its telemetry. ``gateway=None`` only records.
    """
    m = metrics or METRICS
    m.job_started()
    ok = False
    try:
        yield m
        ok = True
    finally:
        m.job_finished(ok)
        if gateway:
            try:
                push(gateway, job, m)
            except AmalgamError as exc:
                log(f"amalgam: warning: {exc}")
