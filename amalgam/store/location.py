"""Where a store lives: a local directory or an S3 prefix, behind one ``pyarrow.fs`` interface.

``open_store("/data/store")``, ``open_store("file:///data/store")`` and
``open_store("s3://bucket/prefix")`` return a :class:`StoreLocation`. S3 settings come from
the standard AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``), which
a job's ``store.s3`` section may override (never the credentials: those stay in the
environment or a Kubernetes Secret, so they never land in a job file or a report).

Every operation goes through :meth:`StoreLocation.retry`: transient errors (a refused
or reset connection, a timeout, a throttled or failing server) are retried with
exponential backoff, then reported as one line naming the object. Errors that a retry
cannot fix (no such bucket, access denied, bad credentials) fail at once, so a typo in a
bucket name costs one request, not a backoff schedule.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, field_validator

from amalgam.errors import AmalgamError

T = TypeVar("T")

# AWS SDK error names (as pyarrow reports them: "AWS Error ACCESS_DENIED ...") that no retry fixes.
# A bad or expired session token (AWS_SESSION_TOKEN) comes back as an unmapped "InvalidToken" / "ExpiredToken".
PERMANENT_S3_ERRORS = ("NO_SUCH_BUCKET", "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                       "INVALID_BUCKET_NAME", "EXPIRED_TOKEN", "InvalidToken", "ExpiredToken")


def _first_line(exc: BaseException) -> str:
    """The error's first line without the per-request id (noise in a one-line message)."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"\s*\(Request ID: [^)]*\)", "", msg)


def credentials_in_uri(uri: str) -> bool:
    """Whether a URI carries credentials (``s3://KEY:SECRET@bucket``, ``http://user:pass@host``).

    Such a URI would put a key into job files, reports and logs; none is ever valid here, so it
    is refused without being echoed. An S3 bucket name holds neither ``@`` nor ``:``; an
    endpoint URL has no business with ``@`` anywhere (a secret may contain ``/``, which would
    end the authority early).
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme == "file":  # a local path may hold any character
        return False
    if scheme == "s3":
        authority = rest.split("/", 1)[0]
        return "@" in authority or ":" in authority
    return "@" in rest


def redacted_uri(uri: str) -> str:
    """``uri`` with whatever precedes the host (or the bucket) replaced by ``...``."""
    scheme = uri.partition("://")[0]
    return f"{scheme}://...@{uri.rsplit('@', 1)[1]}" if "@" in uri else f"{scheme}://..."


CREDENTIALS_IN_URI = ("credentials in a URI are refused (they would end up in job files, reports and logs); "
                      "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment or the Kubernetes Secret")


class S3Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    endpoint_url: str | None = None
    region: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v and credentials_in_uri(v):
            raise ValueError(CREDENTIALS_IN_URI)
        return v


@dataclass
class StoreLocation:
    uri: str  # as the user wrote it, normalised (no trailing slash)
    fs: pafs.FileSystem
    root: str  # path of the store's root inside ``fs``
    retries: int = 4
    backoff_s: float = 0.2
    _is_s3: bool = field(default=False)

    @property
    def is_s3(self) -> bool:
        return self._is_s3

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with bounded retries on I/O errors; one-line error naming ``what`` at the end."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except OSError as exc:  # pyarrow raises OSError for network and S3 errors
                msg = _first_line(exc)
                if any(name in msg for name in PERMANENT_S3_ERRORS):
                    raise AmalgamError(f"{what}: {msg}") from None
                if attempt == self.retries:
                    raise AmalgamError(f"{what}: failed after {self.retries + 1} attempts: {msg}") from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # Small, whole-object operations. Large shards are written with pyarrow.parquet directly.
    def exists(self, rel: str) -> bool:
        info = self.retry(self.uri_of(rel), lambda: self.fs.get_file_info(self.path(rel)))
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        try:
            data = self.retry(self.uri_of(rel), read)
        except FileNotFoundError:
            raise AmalgamError(f"{self.uri_of(rel)}: not found") from None
        from amalgam import metrics  # this process's amalgam_store_read_bytes_total (a driver's or a worker's)

        metrics.bytes_read(len(data), "s3" if self._is_s3 else "local")
        return data

    def read_buffer(self, rel: str) -> pa.Buffer:
        """Like :meth:`read_bytes`, but into memory Arrow owns (for Parquet, see below).

        A Parquet read hands the input buffer to Arrow's thread pool. If the buffer wraps a
        Python ``bytes``, the pool thread that drops the last reference must take the GIL; when
        that happens while the interpreter exits, CPython ends the thread with a forced
        unwind through C++ frames and the process aborts ("terminate called without an active
        exception", exit 134), a few percent of the time on a loaded machine. An Arrow-owned
        buffer needs no GIL to free.
        """
        data = self.read_bytes(rel)  # a stream's read_buffer() would wrap Python bytes too
        buf = pa.allocate_buffer(len(data))
        if data:
            memoryview(buf).cast("B")[:] = data
        return buf

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one, never a part.

        Locally the bytes go to a unique temporary name and are renamed into place; on S3 a
        PUT is already all-or-nothing.
        """
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]

        def write() -> None:
            if not self.is_s3:
                self.fs.create_dir(parent, recursive=True)
                tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, target)
            else:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)

        self.retry(self.uri_of(rel), write)

    def create_bytes(self, rel: str, data: bytes) -> bool:
        """Like :meth:`write_bytes`, but never replaces an object: True if this call stored it.

        For objects that must not change once written (a dataset's shards, its manifest)
        while another job may write the same name at the same time. Locally the temporary
        file is hard-linked to the name, which fails if the name exists: of two writers
        exactly one wins, and readers still never see a part. (A filesystem without hard
        links falls back to a check then a rename.) On S3 it is a check then a PUT: pyarrow
        cannot send a conditional PUT, so two writers within the same instant may both
        store (the last one wins); callers compare what they read back.
        """
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]

        def create() -> bool:
            if self.is_s3:
                if self.fs.get_file_info(target).type != pafs.FileType.NotFound:
                    return False
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
                return True
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            try:
                os.link(tmp, target)  # atomic, and never replaces
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links on this filesystem
                if os.path.exists(target):
                    return False
                os.replace(tmp, target)
                return True
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

        return self.retry(self.uri_of(rel), create)

    def list_dir(self, rel: str, recursive: bool = False) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=recursive)
        return self.retry(self.uri_of(rel), lambda: self.fs.get_file_info(sel))

    def delete_dir(self, rel: str) -> None:
        self.retry(self.uri_of(rel), lambda: self.fs.delete_dir(self.path(rel)))

    def free_bytes(self) -> int | None:
        """Free space at a local store (None for S3: no meaningful bound)."""
        if self.is_s3:
            return None
        p = Path(self.root)
        while not p.exists():  # the store may not exist yet: its nearest existing ancestor's disk
            p = p.parent
        return shutil.disk_usage(p).free


def _s3_filesystem(uri: str, options: S3Options | None) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**s3_filesystem_kwargs(uri, options))


def s3_filesystem_kwargs(uri: str, options: S3Options | None) -> dict:
    """``pyarrow.fs.S3FileSystem`` arguments for ``uri``: credentials from this process's
    environment, endpoint and region from ``options`` (a job's ``store.s3``), else the environment."""
    env = os.environ
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise AmalgamError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    endpoint = (options.endpoint_url if options else None) or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = (options.region if options else None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict = {
        "access_key": key,
        "secret_key": secret,
        "session_token": env.get("AWS_SESSION_TOKEN"),
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        "connect_timeout": 5,
        "request_timeout": 30,
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    return kwargs


def open_store(uri: str, s3: S3Options | None = None) -> StoreLocation:
    uri = uri.rstrip("/")
    if credentials_in_uri(uri):
        raise AmalgamError(f"{redacted_uri(uri)}: {CREDENTIALS_IN_URI}")
    if uri.startswith("s3://"):
        bucket_prefix = uri[len("s3://") :]
        if not bucket_prefix or bucket_prefix.startswith("/"):
            raise AmalgamError(f"{uri}: an S3 store URI is s3://BUCKET[/PREFIX]")
        return StoreLocation(uri, _s3_filesystem(uri, s3), bucket_prefix, _is_s3=True)
    if "://" in uri and not uri.startswith("file://"):
        raise AmalgamError(f"{uri}: unsupported store URI scheme (use a path, file:// or s3://)")
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    return StoreLocation(str(path), pafs.LocalFileSystem(), str(path))
