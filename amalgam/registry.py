"""A student registry: numbered versions of one student line, and a champion pointer moved by compare-and-swap.

Layout, inside a store (a path, ``file://`` or ``s3://BUCKET/PREFIX``, as for features)::

    registry/<name>/versions/000001/claim.json          created exclusively: allocates the number
    registry/<name>/versions/000001/student.safetensors  copied from the run directory, sha256 checked
    registry/<name>/versions/000001/student.json
    registry/<name>/versions/000001/record.json          StudentRecord, written last: commits the version
    registry/<name>/history/000001.json                  one per champion transition, created exclusively
    registry/<name>/champion.json                        the latest transition, for readers that want one object

Why a log of transitions and not just ``champion.json``: two retrains that both read champion
v3 and both judged themselves better must not both become champion. Each transition is the
*next epoch* of the log, ``history/<epoch+1>.json``, created with create-if-absent; only one
writer can create it, the other gets a one-line error and must re-judge against the new
champion. The log is the truth (the champion is its highest epoch); ``champion.json`` is
rewritten after each transition and converges to the log's head (see :meth:`Registry._publish`).
Keying by epoch rather than by "from version" keeps the CAS valid when a version becomes
champion twice (promote v4, roll back to v3, promote v5: each move leaves a distinct epoch).

Create-if-absent: locally a complete temporary file is hard-linked to the target (``link``
fails if the target exists, and readers never see a half-written file). On S3 it is
``PutObject`` with ``If-None-Match: *`` (boto3; pyarrow has no conditional write). Stores
that silently ignore that header would let both writers win, so the first exclusive write
of a :class:`Registry` probes for it and refuses to go on without it. A conditional PUT
retried after a lost response answers 412 although it won; the body carries a unique token
and is read back to tell "mine" from "someone else's".

Record statuses are advisory (rewritten after the transition that changes them, so a crash
or a slow writer can leave one stale); :meth:`Registry.status_of` derives the effective
status from the log. No torch at import: it is imported only to read a zoo manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, TypeVar

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from amalgam.errors import AmalgamError, parse_json_object, validate_as
from amalgam.store.location import S3Options, StoreLocation, open_store

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Status = Literal["candidate", "champion", "rejected", "retired"]
M = TypeVar("M", bound=BaseModel)
MAX_CLAIM_TRIES = 64  # concurrent registrations a version allocation steps over before giving up


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def finite_or_none(v: object) -> float | None:
    """A metric as a JSON-safe float: NaN/inf (an empty test slice) become None."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ models

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherRef(_Strict):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    classes: list[str]


class RecordMetrics(_Strict):
    comprehensive: float | None = None
    task_aware: dict[str, float | None] = Field(default_factory=dict)  # sub-task (teacher) -> accuracy
    fidelity: dict[str, float | None] | None = None  # teacher -> agreement with that teacher, if measured

    @classmethod
    def from_student(cls, m: dict) -> "RecordMetrics":
        """From ``student.json`` metrics: flat ``task_aware/<t>``, ``fidelity/<t>`` keys (or nested dicts)."""
        task = {k.split("/", 1)[1]: finite_or_none(v) for k, v in m.items() if k.startswith("task_aware/")}
        fid = {k.split("/", 1)[1]: finite_or_none(v) for k, v in m.items() if k.startswith("fidelity/")}
        for key, into in (("task_aware", task), ("fidelity", fid)):
            if isinstance(m.get(key), dict):
                into.update({k: finite_or_none(v) for k, v in m[key].items()})
        return cls(comprehensive=finite_or_none(m.get("comprehensive")), task_aware=task, fidelity=fid or None)


class StudentRecord(_Strict):
    version: int = Field(ge=1)
    name: str = Field(pattern=NAME_PATTERN)
    created: str  # ISO 8601, UTC
    zoo_fingerprint: str
    teachers: list[TeacherRef]
    job: dict = Field(default_factory=dict)
    metrics: RecordMetrics
    params: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of student.safetensors
    lineage: int | None = None  # champion when this version was registered (the one it challenges)
    status: Status = "candidate"
    reason: str | None = None
    run_dir: str

    @property
    def classes(self) -> list[str]:
        """The student's classes: the union of its teachers', in first-seen order (amalgam.classes)."""
        return list(dict.fromkeys(c for t in self.teachers for c in t.classes))


class Transition(_Strict):
    """One entry of the champion log, ``history/<epoch>.json``; ``champion.json`` holds the latest."""

    epoch: int = Field(ge=1)
    action: Literal["promote", "rollback"]
    version: int = Field(ge=1)  # champion from this epoch on
    previous: int | None  # champion before it (None: none)
    previous_epoch: int | None  # the epoch a rollback of this one returns to (an undo stack)
    promoted_at: str
    reason: str | None = None
    token: str  # unique per attempt: tells a retried winning PUT from a loser


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


# ------------------------------------------------------------------------------------ decision logic

def judge(challenger: RecordMetrics, champion: RecordMetrics | None, new_classes_covered: bool,
          tolerance: float) -> Decision:
    """Should the challenger replace the champion? Pure: no storage, unit tested with numbers.

    Promote only if the challenger covers every class required and, for each sub-task both
    have, its task-aware accuracy (and fidelity where both measured it) is at least the
    champion's minus ``tolerance``. A figure the champion has and the challenger lacks counts
    as a regression: nothing shows it is not worse. No champion yet: promote.
    """
    if not new_classes_covered:
        return Decision(False, "does not cover every class the champion or the zoo requires")
    if champion is None:
        return Decision(True, "no champion yet")
    checks: list[tuple[str, dict[str, float | None], dict[str, float | None]]] = [
        ("task-aware", challenger.task_aware, champion.task_aware)]
    if challenger.fidelity and champion.fidelity:
        checks.append(("fidelity", challenger.fidelity, champion.fidelity))
    worst: tuple[float, str] | None = None
    for label, mine, theirs in checks:
        for task in sorted(set(mine) & set(theirs)):
            ref, got = theirs[task], mine[task]
            if ref is None:
                continue
            if got is None:
                return Decision(False, f"sub-task {task}: no {label} figure, champion has {ref:.4f}")
            if got < ref - tolerance:
                return Decision(False, f"sub-task {task}: {label} {got:.4f} < champion {ref:.4f} - tolerance {tolerance:g}")
            if worst is None or got - ref < worst[0]:
                worst = (got - ref, f"{task} {label} {got:.4f} vs {ref:.4f}")
    detail = f" (closest: {worst[1]})" if worst else ""
    return Decision(True, f"every shared sub-task within tolerance {tolerance:g} of the champion{detail}")


# ------------------------------------------------------------------------------ exclusive create

def _s3_client(s3: S3Options | None):  # -> botocore S3 client
    """A boto3 client for the same endpoint and region as :func:`open_store` (credentials from the environment)."""
    import boto3
    from botocore.config import Config

    env = os.environ
    endpoint = (s3.endpoint_url if s3 else None) or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = (s3.region if s3 else None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    cfg = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=5, read_timeout=30)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


class ExclusiveWriter:
    """``create(rel, data) -> bool``: write ``data`` at ``rel`` only if nothing is there; True if this call did."""

    def __init__(self, loc: StoreLocation, s3: S3Options | None = None):
        self.loc, self.s3 = loc, s3
        self._client = None
        self._probed = False

    def create(self, rel: str, data: bytes) -> bool:
        return self._create_s3(rel, data) if self.loc.is_s3 else self._create_local(rel, data)

    def _create_local(self, rel: str, data: bytes) -> bool:
        target = Path(self.loc.path(rel))
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)  # atomic, fails if the target exists; readers see all or nothing
                return True
            except FileExistsError:
                return False
        except OSError as exc:
            raise AmalgamError(f"{self.loc.uri_of(rel)}: exclusive create failed: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.loc.path(rel).partition("/")
        return bucket, key

    def _put_if_absent(self, rel: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = _s3_client(self.s3)
        bucket, key = self._bucket_key(rel)
        delay = 0.1
        for attempt in range(6):
            try:
                self._client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code == "PreconditionFailed" or status == 412:
                    # Exists. Ours, if an earlier attempt won but its answer was lost.
                    return self.loc.read_bytes(rel) == data
                if code == "ConditionalRequestConflict" or status == 409:  # a concurrent conditional PUT
                    time.sleep(delay * (attempt + 1))
                    continue
                msg = exc.response.get("Error", {}).get("Message", "") or str(exc)
                raise AmalgamError(f"{self.loc.uri_of(rel)}: {code or status}: {msg}") from None
            except BotoCoreError as exc:
                raise AmalgamError(f"{self.loc.uri_of(rel)}: {str(exc).splitlines()[0]}") from None
        raise AmalgamError(f"{self.loc.uri_of(rel)}: conditional write kept conflicting; try again")

    def _create_s3(self, rel: str, data: bytes) -> bool:
        if not self._probed:
            self._probe(rel.split("/", 1)[0])
        return self._put_if_absent(rel, data)

    def _probe(self, top: str) -> None:
        """Refuse an S3 endpoint that ignores ``If-None-Match``: without it two champions could both win."""
        rel = f"{top}/.probe-{uuid.uuid4().hex}"
        first = self._put_if_absent(rel, b"1")
        second = self._put_if_absent(rel, b"2")
        try:
            self.loc.retry(self.loc.uri_of(rel), lambda: self.loc.fs.delete_file(self.loc.path(rel)))
        except (AmalgamError, FileNotFoundError):
            pass  # a stray probe object is harmless
        if not first or second:
            raise AmalgamError(f"{self.loc.uri}: this S3 endpoint ignores conditional writes (If-None-Match); "
                               "the registry needs them to keep one champion")
        self._probed = True


# ------------------------------------------------------------------------------------------- registry

def _safetensors_params(data: bytes, where: str) -> int:
    """Parameter count from the safetensors header (no torch needed)."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AmalgamError(f"{where}: not a valid safetensors file (bad header)") from None


def _zoo_teachers(zoo_path: Path, student_teachers: list[dict], where: str) -> tuple[str, list[TeacherRef]]:
    """Zoo fingerprint and the student's teachers with their weight hashes; the run must match the zoo."""
    from amalgam.store.fingerprint import zoo_fingerprint
    from amalgam.zoo.manifest import read_manifest

    zoo = read_manifest(zoo_path)
    by_name = {t.name: t for t in zoo.teachers}
    refs = []
    for t in student_teachers:
        entry = by_name.get(t["name"])
        if entry is None:
            raise AmalgamError(f"{where}: teacher {t['name']!r} is not in zoo {zoo_path}")
        if entry.classes != t["classes"]:
            raise AmalgamError(f"{where}: teacher {t['name']!r} classes differ from zoo {zoo_path}")
        refs.append(TeacherRef(name=entry.name, sha256=entry.sha256, classes=list(entry.classes)))
    used = [by_name[t["name"]] for t in student_teachers]
    return zoo_fingerprint(used), refs


def resolve_zoo(job: dict, zoo: Path | str | None, where: str) -> Path:
    """The zoo manifest: given explicitly, else the run's ``job.zoo`` if that path exists here."""
    if zoo is not None:
        return Path(zoo)
    raw = job.get("zoo")
    if isinstance(raw, str):
        from amalgam.paths import amalgam_home

        p = Path(os.path.expanduser(os.path.expandvars(raw.replace("$AMALGAM_HOME", str(amalgam_home())))))
        if p.is_file():
            return p
    raise AmalgamError(f"{where}: cannot find the run's zoo manifest (job.zoo = {raw!r}); pass it with --zoo")


class Registry:
    """One student line ``name`` in a store. Cheap to construct; every method reads the store afresh."""

    def __init__(self, loc: StoreLocation, name: str, s3: S3Options | None = None):
        if not re.fullmatch(NAME_PATTERN, name or ""):
            raise AmalgamError(f"registry name {name!r}: use letters, digits, '_', '.', '-' (a job name)")
        self.loc, self.name = loc, name
        self.base = f"registry/{name}"
        self.exclusive = ExclusiveWriter(loc, s3)

    @classmethod
    def open(cls, uri: str, name: str, s3: S3Options | None = None) -> "Registry":
        return cls(open_store(uri, s3), name, s3)

    def uri(self, rel: str = "") -> str:
        return self.loc.uri_of(f"{self.base}/{rel}" if rel else self.base)

    # ---- reading
    def _read_model(self, rel: str, model: type[M]) -> M:
        where = self.uri(rel)
        raw = self.loc.read_bytes(f"{self.base}/{rel}")
        return validate_as(model, parse_json_object(raw, where, "registry record"), where)

    def _write_model(self, rel: str, obj: BaseModel) -> None:
        self.loc.write_bytes(f"{self.base}/{rel}", _dump(obj))

    def _numbered(self, sub: str, suffix: str = "") -> list[int]:
        out = []
        for info in self.loc.list_dir(f"{self.base}/{sub}"):
            base = info.path.rsplit("/", 1)[-1]
            m = re.fullmatch(rf"(\d{{6}}){re.escape(suffix)}", base)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def committed_versions(self) -> tuple[list[int], list[int]]:
        """(committed, uncommitted) version numbers: a version is committed once its record.json exists."""
        claimed, done = set(self._numbered("versions")), set()
        root = self.loc.path(f"{self.base}/versions")
        for info in self.loc.list_dir(f"{self.base}/versions", recursive=True):
            parts = info.path[len(root) + 1 :].split("/")
            if info.type == pafs.FileType.File and len(parts) == 2 and parts[1] == "record.json":
                done.add(int(parts[0]))
        return sorted(done), sorted(claimed - done)

    def record(self, version: int) -> StudentRecord:
        rel = f"versions/{version:06d}/record.json"
        if not self.loc.exists(f"{self.base}/{rel}"):
            if self.loc.exists(f"{self.base}/versions/{version:06d}/claim.json"):
                raise AmalgamError(f"{self.uri(rel)}: missing; version {version} was never committed "
                                   "(registration interrupted or in progress)")
            raise AmalgamError(f"{self.uri()}: no version {version}")
        rec = self._read_model(rel, StudentRecord)
        if rec.version != version or rec.name != self.name:
            raise AmalgamError(f"{self.uri(rel)}: says {rec.name} v{rec.version}, expected {self.name} v{version}")
        return rec

    def records(self) -> list[StudentRecord]:
        return [self.record(v) for v in self.committed_versions()[0]]

    def history(self) -> list[Transition]:
        """Every champion transition, oldest first. The last one is the current champion."""
        out = []
        for epoch in self._numbered("history", ".json"):
            t = self._read_model(f"history/{epoch:06d}.json", Transition)
            if t.epoch != epoch:
                raise AmalgamError(f"{self.uri(f'history/{epoch:06d}.json')}: says epoch {t.epoch}")
            out.append(t)
        return out

    def head(self) -> Transition | None:
        """The current champion transition (None: no champion yet), from the log, not champion.json."""
        epochs = self._numbered("history", ".json")
        return self._read_model(f"history/{epochs[-1]:06d}.json", Transition) if epochs else None

    def champion_pointer(self) -> Transition | None:
        """``champion.json`` as written (may lag the log after a crash; :meth:`head` is authoritative)."""
        return self._read_model("champion.json", Transition) if self.loc.exists(f"{self.base}/champion.json") else None

    def status_of(self, rec: StudentRecord, head: Transition | None) -> Status:
        """Effective status: the log decides who is champion; a stale 'champion' record is 'retired'."""
        if head is not None and rec.version == head.version:
            return "champion"
        return "retired" if rec.status == "champion" else rec.status

    # ---- registering
    def register(self, run_dir: Path | str, zoo: Path | str | None = None) -> StudentRecord:
        """Copy a run's student into the next free version; record.json last commits it."""
        from amalgam.student_io import STUDENT_JSON, read_student_manifest

        manifest, json_path = read_student_manifest(run_dir)
        run_path = json_path.parent
        weights_path = run_path / manifest.weights
        if not weights_path.is_file():
            raise AmalgamError(f"{json_path}: weights file {weights_path} not found")
        weights = weights_path.read_bytes()
        digest = hashlib.sha256(weights).hexdigest()
        if digest != manifest.sha256:
            raise AmalgamError(f"{weights_path}: sha256 is {digest[:12]}..., {json_path.name} says {manifest.sha256[:12]}...")
        student_json = json_path.read_bytes()
        zoo_fp, teachers = _zoo_teachers(resolve_zoo(manifest.job, zoo, str(json_path)), manifest.teachers, str(json_path))
        head = self.head()
        version = self._claim(str(run_path.resolve()))
        vdir = f"versions/{version:06d}"
        for fname, data in ((manifest.weights, weights), (STUDENT_JSON, student_json)):
            self.loc.write_bytes(f"{self.base}/{vdir}/{fname}", data)
            back = hashlib.sha256(self.loc.read_bytes(f"{self.base}/{vdir}/{fname}")).hexdigest()
            if back != hashlib.sha256(data).hexdigest():
                raise AmalgamError(f"{self.uri(f'{vdir}/{fname}')}: stored bytes differ from {run_path / fname}")
        rec = StudentRecord(
            version=version, name=self.name, created=_now(), zoo_fingerprint=zoo_fp, teachers=teachers,
            job=manifest.job, metrics=RecordMetrics.from_student(manifest.metrics),
            params=_safetensors_params(weights, str(weights_path)), sha256=digest,
            lineage=head.version if head else None, run_dir=str(run_path.resolve()),
        )
        self._write_model(f"{vdir}/record.json", rec)
        return rec

    def _claim(self, run_dir: str) -> int:
        """The next version number, allocated by creating ``versions/<N>/claim.json`` exclusively."""
        existing = self._numbered("versions")
        n = (existing[-1] if existing else 0) + 1
        body = json.dumps({"token": uuid.uuid4().hex, "at": _now(), "run_dir": run_dir}).encode()
        for _ in range(MAX_CLAIM_TRIES):
            if self.exclusive.create(f"{self.base}/versions/{n:06d}/claim.json", body):
                return n
            n += 1
        raise AmalgamError(f"{self.uri('versions')}: could not claim a version number after {MAX_CLAIM_TRIES} tries")

    # ---- champion transitions
    def _transition(self, head: Transition | None, action: str, version: int, previous: int | None,
                    previous_epoch: int | None, reason: str | None) -> Transition:
        epoch = head.epoch + 1 if head else 1
        t = Transition(epoch=epoch, action=action, version=version, previous=previous, previous_epoch=previous_epoch,
                       promoted_at=_now(), reason=reason, token=uuid.uuid4().hex)
        if not self.exclusive.create(f"{self.base}/history/{epoch:06d}.json", _dump(t)):
            now = self.head()
            was = f"v{head.version}" if head else "none"
            is_ = f"v{now.version}" if now else "none"
            raise AmalgamError(
                f"{self.uri()}: champion changed during {action} to v{version} (was {was} at epoch {epoch - 1}, "
                f"now {is_} at epoch {now.epoch if now else 0}): concurrent retrains cannot both become champion; "
                "judge again against the new champion")
        self._publish()
        return t

    def _publish(self) -> None:
        """Write champion.json from the log's head until a re-read of the log agrees.

        A slow writer may overwrite a newer pointer with its own older one; it then sees the
        newer epoch on its re-read and writes again. The last write overall is followed by a
        read that saw no newer epoch, so the pointer ends at the head.
        """
        for _ in range(16):
            head = self.head()
            if head is None:
                return
            self._write_model("champion.json", head)
            again = self.head()
            if again is not None and again.epoch == head.epoch:
                return

    def _set_status(self, version: int | None, status: Status, reason: str | None) -> None:
        if version is None:
            return
        rec = self.record(version)
        self._write_model(f"versions/{version:06d}/record.json", rec.model_copy(update={"status": status, "reason": reason}))

    def reject(self, version: int, reason: str) -> None:
        """Keep ``version`` as a rejected challenger, with the reason (it never became champion)."""
        self._set_status(version, "rejected", reason)

    def promote(self, version: int, reason: str | None = None, expected_epoch: int | None = None) -> Transition:
        """Make ``version`` champion, if the champion is still the one read (``expected_epoch``, 0 = none).

        Without ``expected_epoch`` the champion read here is the one replaced: a human's
        promote still fails if another transition lands between this read and the write.
        """
        self.record(version)  # must be committed
        head = self.head()
        epoch = head.epoch if head else 0
        if expected_epoch is not None and expected_epoch != epoch:
            now = f"v{head.version} at epoch {epoch}" if head else "none"
            raise AmalgamError(f"{self.uri()}: champion changed since epoch {expected_epoch} (now {now}): "
                               f"concurrent retrains cannot both become champion; judge v{version} again")
        if head is not None and head.version == version:
            raise AmalgamError(f"{self.uri()}: v{version} is already the champion")
        t = self._transition(head, "promote", version, head.version if head else None, epoch or None,
                             reason or "promoted")
        self._set_status(version, "champion", t.reason)
        if head is not None:
            self._set_status(head.version, "retired", f"superseded by v{version} at epoch {t.epoch}")
        return t

    def rollback(self, reason: str | None = None) -> Transition:
        """Undo the last promotion: the champion before it returns (with its own previous)."""
        head = self.head()
        if head is None:
            raise AmalgamError(f"{self.uri()}: no champion to roll back")
        if head.previous_epoch is None:
            raise AmalgamError(f"{self.uri()}: v{head.version} has no earlier champion to roll back to")
        back = self._read_model(f"history/{head.previous_epoch:06d}.json", Transition)
        t = self._transition(head, "rollback", back.version, back.previous, back.previous_epoch,
                             reason or f"rolled back from v{head.version}")
        self._set_status(t.version, "champion", t.reason)
        self._set_status(head.version, "rejected", f"rolled back at epoch {t.epoch}: {t.reason}")
        return t

    def challenge(self, version: int, tolerance: float) -> Decision:
        """Judge ``version`` against the champion and act on it: promote (CAS) or mark rejected.

        Required classes: the champion's. A retrain may add teachers, never drop a class.
        """
        rec = self.record(version)
        head = self.head()
        if head is not None and head.version == version:
            return Decision(False, f"v{version} is already the champion")
        champ = self.record(head.version) if head else None
        covered = champ is None or set(champ.classes) <= set(rec.classes)
        decision = judge(rec.metrics, champ.metrics if champ else None, covered, tolerance)
        if decision.promote:
            vs = f" against v{champ.version}" if champ else ""
            self.promote(version, f"judged{vs}: {decision.reason}", expected_epoch=head.epoch if head else 0)
        else:
            self._set_status(version, "rejected", decision.reason)
        return decision


def _dump(obj: BaseModel) -> bytes:
    return (json.dumps(obj.model_dump(mode="json"), indent=2) + "\n").encode()


def registry_names(loc: StoreLocation) -> list[str]:
    """Student lines present in a store (directories under ``registry/``)."""
    return sorted(i.path.rsplit("/", 1)[-1] for i in loc.list_dir("registry") if i.type == pafs.FileType.Directory)
