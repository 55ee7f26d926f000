"""Talking to a Ray cluster's Jobs API: address, token, submission, status, logs.

A thin layer over Ray's ``JobSubmissionClient`` that turns every failure a user can cause
(wrong address, missing or wrong token, another Ray on the cluster) into one
:class:`~amalgam.errors.AmalgamError` line, and never prints the token.

How the package reaches the cluster. ``amalgam submit`` ships two things in the job's
runtime environment:

* ``working_dir``: a temporary directory holding only the job file, so the entrypoint
  names it by its bare file name and nothing else from the client's disk travels;
* ``py_modules``: this very ``amalgam`` package directory (pure Python, a few hundred KB),
  which Ray puts first on the driver's and workers' ``PYTHONPATH``.

The heavy dependencies (torch, pyarrow, Ray itself) are *not* shipped: they come with the
cluster's image (``cluster/Dockerfile``), whose ``amalgam`` install is then shadowed by the
shipped source. So a cluster image built from an older commit still runs exactly the code
that submitted the job, while a ``pip`` runtime environment (minutes of resolving and
downloading on every node, and a network the cluster may not have) is avoided. The price:
a change of dependencies needs a new image, and the client checks that the cluster runs
the same Ray as itself.

Authentication follows Ray's own rules. The token comes from ``RAY_AUTH_TOKEN``, else the
file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. It is sent when
``RAY_AUTH_MODE=token``, or, as ``ray.init`` does, when no address was given and a token
exists (a cluster found on this machine); never to an explicit address unless asked,
so a mistyped address does not receive the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam.errors import AmalgamError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""Ray's own order (``ray job submit``): the first set one is the default address."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PACKAGE_DIR = Path(__file__).resolve().parent
PY_MODULE_EXCLUDES = ["__pycache__", "*.pyc"]
# Ray's SDK narrates uploads and websocket closes at INFO on stderr; the CLI says what matters.
QUIET_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging")


# -- address and token ---------------------------------------------------------------------


def resolve_address(address: str | None) -> str | None:
    """The Jobs API address: ``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``.

    ``None`` lets Ray look for a cluster started on this machine, as ``ray job`` does.
    """
    if address:
        return address
    for var in ADDRESS_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def auth_token(explicit_address: bool) -> str | None:
    """The token to send, or ``None``; see the module docstring for the rules.

    Read here rather than by Ray's C++ loader so that an unreadable ``RAY_AUTH_TOKEN_PATH``
    is one line naming the file instead of a process abort.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode not in ("", "token", "disabled"):
        raise AmalgamError(f"RAY_AUTH_MODE={mode!r}: expected 'token' or 'disabled'")
    if mode == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise AmalgamError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
        if not token:
            raise AmalgamError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
    if not token:
        default = Path.home() / ".ray" / "auth_token"
        with contextlib.suppress(OSError):
            token = default.read_text().strip()
    if mode == "token" and not token:
        raise AmalgamError("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH "
                           "to a file holding it, or put it in ~/.ray/auth_token (`ray get-auth-token`)")
    if mode == "" and explicit_address:
        return None
    return token or None


@contextlib.contextmanager
def _address_env_cleared(active: bool) -> Iterator[None]:
    """Hide ``RAY_ADDRESS``/``RAY_API_SERVER_ADDRESS`` while Ray builds the client.

    Ray's client lets these variables override even an explicit address; ``--address`` on
    our command line must win, so they are set aside for the constructor only.
    """
    saved = {v: os.environ.pop(v) for v in ADDRESS_ENV_VARS if active and v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_refusal(where: str, message: str) -> AmalgamError:
    if message.startswith("Authentication failed"):
        return AmalgamError(f"{where} rejected the token (403): check RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / "
                            "~/.ray/auth_token holds this cluster's token")
    return AmalgamError(f"{where} requires a token (401): set RAY_AUTH_MODE=token and the cluster's token in "
                        "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def connect(address: str | None = None, check_version: bool = True) -> "JobSubmissionClient":
    """A ``JobSubmissionClient`` for the cluster, or one line saying why there is none."""
    import ray
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    resolved = resolve_address(address)
    token = auth_token(explicit_address=resolved is not None)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    where = f"Ray cluster at {resolved}" if resolved else "local Ray cluster"
    try:
        with _address_env_cleared(active=resolved is not None):
            client = JobSubmissionClient(resolved, headers=headers)
    except AuthenticationError as exc:
        raise _auth_refusal(where, str(exc)) from None
    except (ConnectionError, OSError) as exc:
        hint = "" if resolved else " (pass --address http://HOST:8265 or set RAY_ADDRESS)"
        raise AmalgamError(f"{where}: cannot connect{hint}: {_first_line(exc)}") from None
    except (RuntimeError, ValueError) as exc:
        raise AmalgamError(f"{where}: {_first_line(exc)}") from None
    server = getattr(client, "_server_ray_version", None)
    if check_version and server and server != ray.__version__:
        raise AmalgamError(f"{where} runs Ray {server}, this client Ray {ray.__version__}; amalgam pins Ray exactly "
                           "(pyproject.toml): run the cluster from the image built by cluster/Dockerfile")
    return client


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _calls(where: str) -> Iterator[None]:
    """Map errors of a Jobs API call (after connecting) to one line."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise _auth_refusal(where, str(exc)) from None
    except RuntimeError as exc:
        text = _first_line(exc)
        if "404" in text or "does not exist" in text:
            raise AmalgamError(f"{where}: no such job") from None
        raise AmalgamError(f"{where}: {text}") from None
    except (ConnectionError, OSError) as exc:
        raise AmalgamError(f"{where}: connection lost: {_first_line(exc)}") from None


# -- submission ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """What goes to the Jobs API for one ``amalgam submit``."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def build_submission(job_file: Path, work_dir: Path, *, command: str = "run", local: bool = False,
                     out: str | None = None, threads: int | None = None) -> Submission:
    """Check the job file locally, copy it into ``work_dir`` and describe the submission.

    The job is parsed here first, so a typo is a one-line error on the client, not a failed
    cluster job minutes later. A relative ``zoo`` path is refused: on the cluster it would
    resolve inside the shipped working directory, which holds only the job file.
    """
    from amalgam import __version__
    from amalgam.job import load_job

    job = load_job(job_file)
    zoo = os.path.expandvars(job.zoo.replace("$AMALGAM_HOME", "/amalgam-home"))
    if not (zoo.startswith("~") or Path(zoo).is_absolute()):
        raise AmalgamError(f"{job_file}: field zoo: relative path {job.zoo!r} cannot be found on the cluster "
                           "(only the job file is shipped); use an absolute path or $AMALGAM_HOME/...")
    (work_dir / job_file.name).write_bytes(job_file.read_bytes())
    argv = ["python", "-m", "amalgam.cli", command, job_file.name]
    if command == "run":
        if local:
            argv.append("--local")
        if out:
            argv += ["--out", out]
        if threads:
            argv += ["--threads", str(threads)]
    runtime_env = {
        "working_dir": str(work_dir),
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": PY_MODULE_EXCLUDES,
        "env_vars": {"PYTHONUNBUFFERED": "1"},  # logs stream while the job runs
    }
    metadata = {"amalgam_job": job.name, "amalgam_version": __version__, "amalgam_command": command}
    return Submission(shlex.join(argv), runtime_env, metadata)


def submit(client: "JobSubmissionClient", job_file: Path, *, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None, **kwargs: Any) -> str:
    """Submit one job file; return the Ray submission id."""
    with tempfile.TemporaryDirectory(prefix="amalgam-submit-") as tmp:
        sub = build_submission(job_file, Path(tmp), **kwargs)
        with _calls(f"submitting {job_file}"):
            return client.submit_job(
                entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, metadata=sub.metadata,
                submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_num_gpus=entrypoint_num_gpus,
            )


# -- status and logs -----------------------------------------------------------------------


def info(client: "JobSubmissionClient", job_id: str) -> "JobDetails":
    with _calls(f"job {job_id}"):
        return client.get_job_info(job_id)


def list_jobs(client: "JobSubmissionClient") -> list["JobDetails"]:
    with _calls("listing jobs"):
        jobs = client.list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def logs(client: "JobSubmissionClient", job_id: str) -> str:
    with _calls(f"job {job_id}"):
        return client.get_job_logs(job_id)


def follow(client: "JobSubmissionClient", job_id: str, out=sys.stdout) -> "JobDetails":
    """Stream a job's logs to ``out`` until it ends; return its final details."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    info(client, job_id)  # a clear "no such job" before opening the stream
    with _calls(f"job {job_id}"):
        asyncio.run(tail())
    # The stream closes when the driver exits; the status may lag it by a moment.
    deadline = time.monotonic() + 30
    details = info(client, job_id)
    while str(details.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        details = info(client, job_id)
    return details


def stop(client: "JobSubmissionClient", job_id: str) -> bool:
    with _calls(f"job {job_id}"):
        return client.stop_job(job_id)


_ERROR_LINE = re.compile(r"^(amalgam: error: .*|\w*(Error|Exception)\b.*)$")


def error_line(details: "JobDetails", log_text: str = "") -> str:
    """The one line that says why a job failed.

    Prefers amalgam's own ``amalgam: error: ...`` line, then the last exception line of a
    traceback, then the last line of the logs, then Ray's status message.
    """
    lines = [ln.strip() for ln in (log_text or details.message or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("amalgam: error: "):
            return ln
    for ln in reversed(lines):
        if _ERROR_LINE.match(ln):
            return ln
    if lines:
        return lines[-1]
    return _first_line(RuntimeError(details.message or "no message"))


def status_text(details: "JobDetails") -> str:
    return str(details.status.value if hasattr(details.status, "value") else details.status)
