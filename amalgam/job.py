"""The job spec: one YAML file per experiment (torchdistill-style), validated by pydantic.

Unknown keys are rejected and every error is one line naming the file and the field.
Paths inside a job may use ``$AMALGAM_HOME``/``~`` and are relative to the job file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from amalgam.data.pool import PoolSpec
from amalgam.errors import AmalgamError, read_yaml_mapping, validate_as
from amalgam.paths import amalgam_home
from amalgam.store.location import CREDENTIALS_IN_URI, S3Options, credentials_in_uri

JOB_VERSION = 1
_ENV_REF = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_CREDENTIAL_VAR = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)


def _no_credential_vars(v: str) -> str:
    """Paths expand ``$VARS`` (see :meth:`Job.resolve`), but never one named like a credential:
    the expanded path would carry the secret into error lines, logs and reports."""
    for name in _ENV_REF.findall(v):
        if _CREDENTIAL_VAR.search(name):
            raise ValueError(f"refers to ${name}: variables named like credentials are never expanded in job paths")
    return v

Width = Union[int, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SGDAutoencoder(_Strict):
    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)


class Amalgamation(_Strict):
    mode: Literal["pca", "sgd"] = "pca"
    strategy: Literal["dfa", "ifa"] = "dfa"
    balance: bool = True
    widths: dict[str, Width] = Field(
        default_factory=lambda: {"default": 0.4},
        description="per tap (conv1, ...; 'default' for the rest): an int, or a ratio of the concatenated width",
    )
    max_energy: float | None = Field(
        None, gt=0, le=1, description="cap each width at the smallest one keeping this variance fraction"
    )
    sgd: SGDAutoencoder = Field(default_factory=SGDAutoencoder)
    max_width: dict[str, Width] | None = Field(
        None, description="widest width a sweep may ask for (codes are stored at it); default: widths"
    )

    @field_validator("widths")
    @classmethod
    def _positive(cls, v: dict[str, Width]) -> dict[str, Width]:
        for k, w in v.items():
            if w <= 0 or (isinstance(w, float) and w > 1):
                raise ValueError(f"width of {k} must be an int >= 1 or a ratio in (0, 1], got {w}")
        return v

    @model_validator(mode="after")
    def _ifa_needs_pca(self) -> "Amalgamation":
        if self.strategy == "ifa" and self.mode != "pca":
            raise ValueError("strategy ifa is implemented for mode pca only")
        return self

    def width_for(self, tap: str, concat_channels: int, table: dict[str, Width] | None = None) -> int:
        table = self.widths if table is None else table
        w = table.get(tap, table.get("default", 0.4))
        k = int(w) if isinstance(w, int) else max(1, round(w * concat_channels))
        return min(k, concat_channels)

    def max_width_for(self, tap: str, concat_channels: int) -> int:
        k = self.width_for(tap, concat_channels)
        return max(k, self.width_for(tap, concat_channels, self.max_width)) if self.max_width else k


class FailAt(_Strict):
    """Test-only fault injection: rank ``rank`` exits once in epoch ``epoch`` (0-based; a list:
    once in each), leaving ``marker`` (a file name, created in the run directory: never a path a
    job could aim anywhere), which records each kill so a restarted worker does not repeat it.
    A list lets one run carry several faults (a test's one run instead of one run per fault)."""

    rank: int = Field(ge=0)
    epoch: Union[int, list[int]]
    marker: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @field_validator("epoch")
    @classmethod
    def _epochs(cls, v: Union[int, list[int]]) -> Union[int, list[int]]:
        if any(e < 0 for e in ([v] if isinstance(v, int) else v)) or v == []:
            raise ValueError(f"epoch must be a 0-based epoch or a non-empty list of them, got {v}")
        return v

    def resolved(self, run_dir) -> dict:
        from pathlib import Path

        epochs = [self.epoch] if isinstance(self.epoch, int) else sorted(set(self.epoch))
        return {"rank": self.rank, "epochs": epochs, "marker": str(Path(run_dir).resolve() / self.marker)}


# GPUs per Ray Train worker (stages, joint): a number (fractions share a GPU), or ``auto``: the
# cluster's GPUs shared out, at most one a worker, none (CPU, as by default) when it has none.
def _gpu_count(v: object) -> object:
    if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")):
        return v
    raise ValueError(f"must be a number >= 0 or auto, got {v!r}")


GpuCount = Annotated[Union[float, Literal["auto"]], BeforeValidator(_gpu_count)]
GPUS_PER_WORKER = "GPUs per Ray Train worker (0: CPU only); auto: use the cluster's GPUs when it has any"


#: How stage workers share the stages: ``stages`` = each owns whole stages (no communication);
#: ``rows`` = every worker fits every stage on its share of the pool's rows, gradients
#: all-reduced each step (one global batch, split); ``auto`` = whichever the cost model says
#: finishes first (``amalgam.distributed.train_stages.plan_stages``).
StageParallel = Literal["auto", "stages", "rows"]


class Stages(_Strict):
    epochs: int = Field(3, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    closed_form_first: bool = Field(True, description="solve stage 1 by least squares (exact optimum)")
    workers: int = Field(2, ge=1, description="Ray Train workers fitting stages in parallel")
    parallel: StageParallel = Field(
        "auto", description="stages: each worker owns whole stages; rows: every worker fits every stage on its "
                            "share of the pool, gradients all-reduced; auto: the cheaper by the cost model "
                            "(distributed/train_stages.py plan_stages)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: GpuCount = Field(0.0, description=GPUS_PER_WORKER)
    max_failures: int = Field(3, ge=0, description="worker-group restarts from the last checkpoint")
    fail_at: FailAt | None = Field(None, description="test-only fault injection: {rank, epoch, marker}")


class Gate(_Strict):
    epochs: int = Field(2, ge=1)
    keep: float = Field(0.7, gt=0, le=1, description="fraction of the pool (most confident) used as pseudo-labels")


class Augment(_Strict):
    """Function matching (engine/augment.py): augmented pool images, targets recomputed on each view."""

    shift: int = Field(0, ge=0, description="random translation, up to this many pixels per axis (zero fill)")
    mixup: float = Field(0.0, ge=0, allow_inf_nan=False,
                         description="mixup alpha: blend each image with another, weight ~ Beta(alpha, alpha); 0 = off")


class Slices(_Strict):
    """Per-teacher KD inside each teacher's classes (engine/joint.py ``slice_loss``)."""

    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of the term; 0 = off")
    temperature: float = Field(4.0, gt=0, allow_inf_nan=False, description="temperature inside each teacher's block")


class Joint(_Strict):
    epochs: int = Field(5, ge=0)
    target: Literal["calibrated", "gated"] = Field(
        "calibrated", description="gated: mixture of experts with a label-free domain gate (engine/gating.py)"
    )
    gate: Gate = Field(default_factory=Gate)
    workers: int = Field(2, ge=1, description="Ray Train DDP workers (store pipeline)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: GpuCount = Field(0.0, description=GPUS_PER_WORKER)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    loss: Literal["kd", "mse"] = "kd"
    temperature: float = Field(2.0, gt=0)
    feature_weight: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="weight of the compact-feature terms (student taps vs the codes through the fold, "
                    "engine/features.py) added to the logit loss; 0 = logits only (the paper). --local only",
    )
    augment: Augment | None = Field(
        None, description="function matching: train on augmented pool images, teachers (and gate) re-run on "
                          "each view (engine/augment.py); off by default. --local only",
    )
    slices: Slices | None = Field(
        None, description="add per-teacher KD inside each teacher's classes, weighted by the target's mass on them "
                          "(engine/joint.py slice_loss); off by default",
    )
    fail_at: FailAt | None = Field(None, description="test-only fault injection: {rank, epoch, marker}")


class Baselines(_Strict):
    kd: bool = True
    supervised: bool = True
    from_scratch_epochs: int | None = Field(
        None, ge=1, description="epochs for KD/supervised students; default: stage + joint epochs (same budget)"
    )


class Evaluation(_Strict):
    test: PoolSpec = Field(
        default_factory=lambda: PoolSpec.model_validate(
            {"sources": [{"dataset": "mnist", "split": "test"}, {"dataset": "fashion", "split": "test"}]}
        )
    )
    latency: bool = True


class StoreConfig(_Strict):
    # The default follows $AMALGAM_STORE_URI when set: the KubeRay overlays point every job of a
    # cluster at its object store that way (k8s/*/kustomization.yaml), with no store: section.
    uri: str = Field(
        default_factory=lambda: os.environ.get("AMALGAM_STORE_URI") or "$AMALGAM_HOME/store",
        description="a path, file://PATH or s3://BUCKET/PREFIX; $VARS expand (default $AMALGAM_STORE_URI, else $AMALGAM_HOME/store)",
    )
    s3: S3Options = Field(default_factory=S3Options)

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        if credentials_in_uri(v):
            raise ValueError(CREDENTIALS_IN_URI)
        return _no_credential_vars(v)


class Extraction(_Strict):
    actors: int = Field(2, ge=1, description="Ray Data actor pool size (teacher replicas)")
    batch_size: int = Field(256, ge=1, description="teacher forward batch inside an actor")
    shard_size: int = Field(2048, ge=1, description="rows per Parquet shard (the unit of resume)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)


class Choice(_Strict):
    choice: list[Union[bool, int, float]] = Field(min_length=1)


class Uniform(_Strict):
    uniform: tuple[float, float]


class LogUniform(_Strict):
    loguniform: tuple[float, float]

    @field_validator("loguniform")
    @classmethod
    def _positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] <= 0 or v[1] < v[0]:
            raise ValueError(f"loguniform bounds must satisfy 0 < low <= high, got {list(v)}")
        return v


# A search dimension: a fixed value, or {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}.
Dim = Union[bool, int, float, Choice, Uniform, LogUniform]


def dim_extremes(dim: Dim) -> list:
    """The values that bound a dimension (its choices, or its interval's ends)."""
    if isinstance(dim, Choice):
        return list(dim.choice)
    if isinstance(dim, Uniform):
        return list(dim.uniform)
    if isinstance(dim, LogUniform):
        return list(dim.loguniform)
    return [dim]


class SweepScheduler(_Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha: early stopping by joint-stage epoch")
    grace_period: int = Field(1, ge=1, description="joint-stage epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class Sweep(_Strict):
    """Ray Tune over compact widths, balancing, joint-stage lr and KD temperature (``amalgam sweep``)."""

    trials: int = Field(8, ge=1)
    widths: dict[str, Dim] = Field(
        default_factory=lambda: {"default": Choice(choice=[0.2, 0.3, 0.4, 0.5])},
        description="per tap ('default' for the rest): an int or a ratio of the concatenated width, or a search",
    )
    balance: Dim | None = Field(None, description="default: amalgamation.balance")
    joint_lr: Dim | None = Field(None, description="default: joint.lr")
    temperature: Dim | None = Field(None, description="default: joint.temperature")
    scheduler: SweepScheduler = Field(default_factory=SweepScheduler)
    max_concurrent: int | None = Field(None, ge=1, description="default: the cluster's CPUs / cpus_per_trial")
    cpus_per_trial: float = Field(1.0, gt=0)
    holdout: float = Field(0.1, gt=0, lt=1, description="pool fraction held out to score fidelity to the teachers")
    validation: PoolSpec | None = Field(None, description="a labelled set: its comprehensive accuracy is the objective")
    seed: int = 0

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: dict[str, Dim]) -> dict[str, Dim]:
        for tap, dim in v.items():
            for w in dim_extremes(dim):
                if isinstance(w, bool) or w <= 0 or (isinstance(w, float) and w > 1):
                    raise ValueError(f"width of {tap} must be an int >= 1 or a ratio in (0, 1], got {w}")
        return v


class Retrain(_Strict):
    """Champion/challenger rules of ``amalgam retrain`` (scheduled retraining as the zoo grows)."""

    tolerance: float = Field(0.01, ge=0, le=1, description="largest allowed drop of an old sub-task's figure")
    holdout: float = Field(
        0.1, gt=0, lt=1, description="pool fraction never trained on; fidelity to each teacher is scored on it"
    )
    evaluation: Literal["fidelity", "labelled"] = Field(
        "fidelity",
        description="fidelity: label-free agreement with each teacher on the held-out slice; "
        "labelled: task-aware accuracy on evaluation.test",
    )
    single_pass: bool = Field(
        True,
        description="an incremental step runs each added or changed teacher once over the training pool: its "
        "statistics pass also stores its raw taps (float16, zstd, every tap position: 26 to 40 KB a sample "
        "per demo teacher, growing with its width; kept in the store under taps/, counted by the capacity "
        "plan), which the codes pass encodes with no teacher. "
        "false: no raw taps stored, the teacher runs a second time for the codes",
    )


class Job(_Strict):
    version: int = JOB_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    zoo: str
    pool: PoolSpec
    calibration: Literal["none", "standardize", "temperature"] = "standardize"
    amalgamation: Amalgamation = Field(default_factory=Amalgamation)
    stages: Stages = Field(default_factory=Stages)
    joint: Joint = Field(default_factory=Joint)
    baselines: Baselines = Field(default_factory=Baselines)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    batch_size: int = Field(256, ge=1, description="teacher forward batch")
    store: StoreConfig = Field(default_factory=StoreConfig)
    extraction: Extraction = Field(default_factory=Extraction)
    sweep: Sweep | None = Field(None, description="search space of `amalgam sweep` (ignored by `amalgam run`)")
    retrain: Retrain = Field(default_factory=Retrain, description="`amalgam retrain`: champion/challenger rules")
    seed: int = 0

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != JOB_VERSION:
            raise ValueError(f"unsupported job version {v}; this amalgam reads version {JOB_VERSION}")
        return v

    @field_validator("zoo")
    @classmethod
    def _zoo_path(cls, v: str) -> str:
        return _no_credential_vars(v)

    # Set by load_job: where relative paths resolve from, and the file (named in errors found later).
    _base_dir: Path = Path(".")
    _path: Path | None = None

    def resolve(self, path: str) -> Path:
        try:
            _no_credential_vars(path)  # also for a Job built without validation
        except ValueError as exc:
            raise AmalgamError(f"job {self.name}: path {exc}") from None
        expanded = os.path.expanduser(os.path.expandvars(path.replace("$AMALGAM_HOME", str(amalgam_home()))))
        p = Path(expanded)
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    def zoo_path(self) -> Path:
        return self.resolve(self.zoo)

    def store_uri(self) -> str:
        uri = self.store.uri
        if uri.startswith("$"):  # `uri: $AMALGAM_STORE_URI` may name an s3:// store: expand before deciding
            uri = os.path.expandvars(uri.replace("$AMALGAM_HOME", str(amalgam_home())))
            if credentials_in_uri(uri):
                where = self._path or f"job {self.name}"
                raise AmalgamError(f"{where}: field store.uri: {self.store.uri} expands to a URI with credentials; "
                                   "use the environment or store.s3 for secrets")
        return uri if uri.startswith("s3://") else str(self.resolve(uri.removeprefix("file://")))


def parse_job(raw: object, path: Path) -> Job:
    if not isinstance(raw, dict):
        raise AmalgamError(f"{path}: a job file must be a YAML mapping")
    job = validate_as(Job, raw, path)
    job._base_dir = path.parent.resolve()
    job._path = path
    # Image sources' paths, like the zoo's, are relative to the job file; made absolute here so
    # the run directory's job.yaml names the same images from anywhere.
    job.pool = job.pool.resolved(job.resolve, job.store.s3)
    job.evaluation.test = job.evaluation.test.resolved(job.resolve, job.store.s3)
    if job.sweep is not None and job.sweep.validation is not None:
        job.sweep.validation = job.sweep.validation.resolved(job.resolve, job.store.s3)
    return job


def load_job(path: Path | str) -> Job:
    path = Path(path)
    return parse_job(read_yaml_mapping(path, "job file"), path)


def dump_job(job: Job) -> str:
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
