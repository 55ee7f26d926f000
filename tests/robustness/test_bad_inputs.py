"""The bad-input corpus: every case in ``bad_inputs/`` fails cleanly through the real CLI.

Each case is a directory of bad files plus a ``case.yaml`` (see ``bad_inputs/README.md``).
A case is copied to a scratch tree and the installed ``amalgam`` command runs on the copy,
in a subprocess with its own ``HOME``, ``TMPDIR``, ``AMALGAM_HOME`` and working directory
(all inside the scratch tree) and no ``AWS_*`` variables. Then:

* the exit code is 2 (an ``AmalgamError``: not a crash, not a traceback's 1, not an abort);
* stderr holds exactly one non-blank line, ``amalgam: error: ...``, matching ``expect``;
* neither stream contains a traceback;
* nothing in the scratch tree was created, changed or deleted, except under ``{tmp}/run``;
* no malicious payload ran (its marker file never appears);
* datasets listed in ``verify_after`` still verify;
* paths listed in ``absent_after`` do not exist (say, a run directory under ``{tmp}/run``:
  a refused run leaves none half-created);
* none of the ``secrets`` (credentials the case hands in, through the command, a file or
  ``env``) appears in stdout, stderr or any file under ``{tmp}/run``.

Cases run two at a time (each one is mostly the CLI importing torch) while the tests
assert, so the corpus costs about half its serial time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from shutil import copytree

import pytest
import yaml

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES = sorted(d.name for d in CORPUS.iterdir() if (d / "case.yaml").is_file())
KEYS = {"about", "command", "expect", "verify_after", "payloads", "xfail", "env", "secrets", "absent_after"}
WORKERS = max(1, min(2, os.cpu_count() or 1))
TIMEOUT_S = 120
ERROR_PREFIX = "amalgam: error: "
# stderr lines that are not the error and may be ignored. Empty on purpose: a new warning on
# a failure path is a regression to look at, not noise to filter.
HARMLESS: list[re.Pattern] = []

# What issue 10 asked the corpus to cover, and the case that covers it.
REQUIRED = {
    "malformed YAML": ["job_malformed_yaml", "zoo_malformed_yaml"],
    "unknown field": ["job_unknown_field", "zoo_unknown_field", "store_manifest_unknown_field"],
    "mistyped field": ["job_mistyped_field", "zoo_mistyped_field"],
    "missing file": ["job_missing_file", "job_missing_zoo", "zoo_missing_weights", "student_missing_run_dir",
                     "store_missing_side_file"],
    "malicious pickle offered as weights": ["zoo_pickled_checkpoint", "zoo_pickle_disguised_as_safetensors",
                                            "student_pickle_as_safetensors"],
    "truncated safetensors": ["zoo_truncated_safetensors"],
    "weights hash mismatch": ["zoo_weights_hash_mismatch", "student_weights_hash_mismatch"],
    "incompatible taps or spatial sizes": ["zoo_incompatible_topologies", "zoo_incompatible_spatial_sizes",
                                           "zoo_tap_stride_mismatch", "zoo_input_shape_disagrees_with_arch"],
    "overlapping class names": ["zoo_overlapping_class_names"],
    "corrupt Parquet shard": ["store_corrupt_parquet_shard", "store_unreadable_parquet_shard"],
    "manifest pointing outside its store": ["store_manifest_outside_store", "zoo_weights_outside_zoo_dir",
                                            "student_weights_escape_run_dir"],
    "job output path escaping the run directory": ["job_name_escapes_run_dir", "job_fail_at_marker_escapes_run_dir"],
    "S3 URI without credentials": ["store_s3_without_credentials"],
    # Refusals added after the issue's list, kept covered the same way.
    "credential-named $VAR in a job path": ["job_credential_var_in_path"],
    "credentials inside a store URI": ["job_store_uri_with_credentials", "job_s3_endpoint_with_credentials",
                                       "store_uri_with_credentials", "retrain_store_uri_var_expands_to_credentials"],
    "a run refused after parsing leaves no run directory": ["run_refused_after_parsing",
                                                            "retrain_store_uri_var_expands_to_credentials"],
}


def _spec(name: str) -> dict:
    return yaml.safe_load((CORPUS / name / "case.yaml").read_text())


def _amalgam() -> list[str]:
    """The installed console script (what users run); ``python -m amalgam.cli`` if there is none."""
    script = Path(sys.executable).parent / "amalgam"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "amalgam.cli"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every directory, file and link under ``root`` (but ``skip``), with file contents hashed."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n != skip]
        for n in dirnames:
            out[(d / n).relative_to(root).as_posix() + "/"] = "link" if (d / n).is_symlink() else "dir"
        for n in filenames:
            p = d / n
            out[p.relative_to(root).as_posix()] = f"link -> {os.readlink(p)}" if p.is_symlink() else _sha256(p)
    return out


@dataclass
class Outcome:
    tmp: Path  # the scratch tree
    case: Path  # the case's copy inside it
    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    seconds: float

    def sub(self, text: str, escape: bool = False) -> str:
        f = re.escape if escape else str
        return text.replace("{case}", f(str(self.case))).replace("{tmp}", f(str(self.tmp)))


def _env(tmp: Path, extra: dict[str, str] | None = None, case: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AMALGAM_", "XDG_"))}
    env.update(
        HOME=str(tmp / "home"), TMPDIR=str(tmp / "tmpdir"), AMALGAM_HOME=str(tmp / "amalgam-home"),
        AMALGAM_DATA=str(tmp / "no-data"), AMALGAM_TEST_PWNED=str(tmp / "PWNED"), PYTHONDONTWRITEBYTECODE="1",
    )
    for k, v in (extra or {}).items():  # the case's own variables (a store URI, a token ...)
        env[k] = v.replace("{case}", str(case or tmp / "case")).replace("{tmp}", str(tmp))
    return env


def _sub(text: str, tmp: Path, case: Path) -> str:
    return text.replace("{case}", str(case)).replace("{tmp}", str(tmp))


def extra_problems(name: str, out: "Outcome") -> list[str]:
    """The ``absent_after`` and ``secrets`` checks (shared with ``bench/faults.py``)."""
    spec, problems = _spec(name), []
    for rel in spec.get("absent_after", []):
        path = Path(_sub(rel, out.tmp, out.case))
        if path.exists() or path.is_symlink():
            problems.append(f"{rel} exists (a refused command left it behind)")
    for secret in spec.get("secrets", []):
        where = [s for s, text in (("stdout", out.stdout), ("stderr", out.stderr)) if secret in text]
        run = out.tmp / "run"
        where += [str(p.relative_to(out.tmp)) for p in sorted(run.rglob("*"))
                  if p.is_file() and secret.encode() in p.read_bytes()]
        if where:
            problems.append(f"secret {secret[:4]}... leaked into {', '.join(where)}")
    return problems


def _run_case(name: str, tmp: Path) -> Outcome:
    tmp = tmp.resolve()
    case = tmp / "case"
    copytree(CORPUS / name, case, symlinks=True)
    for d in ("home", "tmpdir", "cwd", "run"):
        (tmp / d).mkdir()
    spec = _spec(name)
    argv = [_sub(a, tmp, case) for a in spec["command"]]
    before = _snapshot(tmp, skip=tmp / "run")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(_amalgam() + argv, cwd=tmp / "cwd", env=_env(tmp, spec.get("env"), case),
                              capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = -1, exc.stdout or "", f"(timed out after {TIMEOUT_S} s)\n{exc.stderr or ''}"
    seconds = time.perf_counter() - t0
    return Outcome(tmp, case, argv, rc, stdout if isinstance(stdout, str) else stdout.decode(),
                   stderr if isinstance(stderr, str) else stderr.decode(), before, _snapshot(tmp, skip=tmp / "run"),
                   seconds)


@pytest.fixture(scope="session")
def outcomes(request, tmp_path_factory):
    """Start every selected case at once (``WORKERS`` at a time); each test waits for its own."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input" and hasattr(item, "callspec")]
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="bad-input")
    futures: dict[str, Future] = {n: pool.submit(_run_case, n, tmp_path_factory.mktemp(n)) for n in selected}
    yield futures
    pool.shutdown(cancel_futures=True)


def _param(name: str):
    reason = _spec(name).get("xfail")
    return pytest.param(name, marks=pytest.mark.xfail(reason=reason, strict=True) if reason else ())


@pytest.mark.parametrize("name", [_param(n) for n in CASES])
def test_bad_input(name: str, outcomes):
    spec = _spec(name)
    out: Outcome = outcomes[name].result()
    context = f"amalgam {' '.join(out.argv)}\n--- rc {out.rc}\n--- stdout\n{out.stdout}--- stderr\n{out.stderr}"

    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, context
    assert out.rc == 2, context
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not any(p.search(ln) for p in HARMLESS)]
    assert len(lines) == 1, context
    assert lines[0].startswith(ERROR_PREFIX), context
    message = lines[0].removeprefix(ERROR_PREFIX)
    pattern = out.sub(spec["expect"], escape=True)
    assert re.search(pattern, message), f"{message!r}\ndoes not match\n{pattern!r}"

    created = sorted(set(out.after) - set(out.before))
    deleted = sorted(set(out.before) - set(out.after))
    changed = sorted(k for k in set(out.before) & set(out.after) if out.before[k] != out.after[k])
    assert not (created or deleted or changed), f"created {created}, deleted {deleted}, changed {changed}"
    assert not (out.tmp / "PWNED").exists() and not (out.tmp / "cwd" / "PWNED").exists(), "a payload ran"
    problems = extra_problems(name, out)
    assert not problems, f"{problems}\n{context}"

    if spec.get("verify_after"):
        from amalgam.store.dataset import Dataset
        from amalgam.store.location import open_store

        loc = open_store(str(out.case / "store"))
        for key in spec["verify_after"]:
            assert Dataset.open(loc, key).verify() > 0, key


def test_corpus_is_well_formed():
    assert len(CASES) >= 20
    for name in CASES:
        spec = _spec(name)
        assert set(spec) <= KEYS and {"about", "command", "expect"} <= set(spec), name
        assert isinstance(spec["command"], list) and all(isinstance(a, str) for a in spec["command"]), name
        re.compile(spec["expect"].replace("{case}", "x").replace("{tmp}", "x"))
        # The line names its culprit: a file of the case, a teacher, or a store URI.
        assert re.search(r"\{case\}|teacher |://", spec["expect"]), name
        assert not spec.get("xfail") or spec["xfail"].startswith("needs fix in "), name
        for rel in spec.get("payloads", []):
            assert (CORPUS / name / rel).is_file(), (name, rel)
        env = spec.get("env", {})
        assert isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()), name
        assert not any(k.startswith(("AWS_", "AMALGAM_", "XDG_")) for k in env), name  # the runner owns those
        assert all(isinstance(s, str) and len(s) >= 8 for s in spec.get("secrets", [])), name
        assert all(a.startswith("{tmp}/run/") for a in spec.get("absent_after", [])), name
        # A secret must really be handed in, or "it never leaked" proves nothing.
        handed = " ".join(spec["command"]) + " ".join(env.values()) + "".join(
            p.read_text(errors="replace") for p in (CORPUS / name).rglob("*")
            if p.is_file() and p.name != "case.yaml" and p.suffix != ".safetensors")
        assert all(s in handed for s in spec.get("secrets", [])), name


def test_issue_10_categories_are_covered():
    missing = {what: [c for c in cases if c not in CASES] for what, cases in REQUIRED.items()}
    assert not {k: v for k, v in missing.items() if v}


def test_payloads_are_armed(tmp_path: Path):
    """Positive control: unpickling each payload file does create its marker.

    Without this, "the marker never appeared" could just mean a dud payload. The files are
    loaded here the unsafe way on purpose (``weights_only=False``), in a subprocess whose
    marker path points into ``tmp_path``.
    """
    payloads = [(CORPUS / name / rel) for name in CASES for rel in _spec(name).get("payloads", [])]
    assert payloads
    markers = [tmp_path / f"marker-{i}" for i in range(len(payloads))]
    script = (
        "import json, os, sys, torch\n"
        "for path, marker in json.loads(sys.argv[1]):\n"
        "    os.environ['AMALGAM_TEST_PWNED'] = marker\n"
        "    with open(path, 'rb') as f:  # a file object: torch.load hands *.safetensors paths to safetensors\n"
        "        torch.load(f, weights_only=False)\n"
    )
    pairs = json.dumps([[str(p), str(m)] for p, m in zip(payloads, markers)])
    env = {**_env(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script, pairs], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert [m.exists() for m in markers] == [True] * len(markers), [str(p) for p in payloads]
