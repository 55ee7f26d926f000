"""Fault injection summary (issue 10): how many cases of each fault class were tried and survived.

Two parts, both printed as markdown tables:

1. The bad-input corpus (``tests/robustness/bad_inputs/``), run directly through the real
   ``amalgam`` CLI with the same runner as ``tests/robustness/test_bad_inputs.py`` (each case
   copied to a scratch tree, own ``HOME``/``TMPDIR``/``AMALGAM_HOME``, no ``AWS_*``). A case
   *survives* when it meets the test's criteria: exit code 2, exactly one stderr line
   ``amalgam: error: ...`` matching the case's ``expect``, no traceback, nothing created, changed
   or deleted outside ``{tmp}/run``, no payload marker, every ``verify_after`` dataset still
   verifies (nothing lost), no ``absent_after`` path left behind and no ``secrets`` echoed.
   Every case's message is printed.
2. The other fault classes (worker loss, storage faults, concurrency, driver loss, security),
   run as their pytest node ids in one ``python -m pytest -q -p no:cacheprovider --junitxml=...``
   subprocess; the JUnit XML is parsed and each class gets cases tried / survived (passed) /
   failed / skipped, and the faults injected where tests count them (their ``fault_points``
   JUnit property: the kills of ``test_driver_loss.py`` that landed, its killed workers). ``--quick`` adds
   ``-m "not slow"``, which drops the Ray-heavy tests (all of worker loss and driver loss, the
   Ray storage outage, two jobs extracting into one store).

Then the total wall time. Exit status 1 if any case did not survive (skipped tests count as not tried).

    .venv/bin/python bench/faults.py            # everything (the slow Ray tests take several minutes)
    .venv/bin/python bench/faults.py --quick    # skip the slow tests
    .venv/bin/python bench/faults.py --no-corpus / --no-pytest   # one part only
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.robustness.test_bad_inputs import (  # noqa: E402  (needs ROOT on sys.path)
    CASES, ERROR_PREFIX, HARMLESS, WORKERS, Outcome, _run_case, _spec, extra_problems,
)

# Fault class -> pytest node ids (a file means every test in it).
FAULT_CLASSES: dict[str, list[str]] = {
    "worker loss": [
        # a stage worker and a DDP joint worker killed in their third epochs, in one run
        "tests/test_ray_pipeline.py::test_ray_stages_match_in_process_stages_and_survive_a_killed_worker",
        # a stage worker and a DDP worker killed in epoch 1 or 2 of each: final accuracy within 0.5 points
        "tests/robustness/test_driver_loss.py::test_killed_workers_finish_from_checkpoints_within_half_a_point",
    ],
    "storage faults": ["tests/robustness/test_storage_faults.py"],
    "concurrency": [
        "tests/robustness/test_concurrent_extraction.py",
        "tests/test_registry.py::test_concurrent_promotes_exactly_one_wins",
        "tests/test_registry.py::test_concurrent_registrations_get_distinct_versions",
        "tests/test_registry.py::test_stale_champion_cannot_be_replaced",
    ],
    "driver loss (killed extraction, local and S3 / sweep)": [
        "tests/test_extract.py::test_killed_extraction_resumes_to_the_exact_dataset",
        "tests/test_sweep.py::test_sweep_resumes_after_a_kill_stops_early_and_runs_no_teacher",
    ],
    "driver loss (extract + run killed at 10 seeded points)": [
        "tests/robustness/test_driver_loss.py::test_driver_killed_at_ten_points_resumes_to_the_uninterrupted_result",
    ],
    "security (k8s policy, secret leaks)": [
        "tests/robustness/test_k8s_policy.py",
        "tests/robustness/test_no_secret_leaks.py",
    ],
}


# --- 1. the bad-input corpus -------------------------------------------------------------------

def judge(name: str, out: Outcome) -> tuple[bool, str, list[str]]:
    """(survived, the error message or what came out instead, problems): test_bad_input's checks."""
    spec = _spec(name)
    problems: list[str] = []
    if "Traceback" in out.stderr or "Traceback" in out.stdout:
        problems.append("traceback")
    if out.rc != 2:
        problems.append(f"exit code {out.rc}")
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not any(p.search(ln) for p in HARMLESS)]
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    message = lines[0].removeprefix(ERROR_PREFIX) if lines else "(no stderr)"
    if lines and not lines[0].startswith(ERROR_PREFIX):
        problems.append("no 'amalgam: error:' prefix")
    if not re.search(out.sub(spec["expect"], escape=True), message):
        problems.append("message does not match expect")
    if out.before != out.after:
        problems.append("files outside the run dir created, changed or deleted")
    if (out.tmp / "PWNED").exists() or (out.tmp / "cwd" / "PWNED").exists():
        problems.append("a payload ran")
    problems += extra_problems(name, out)  # absent_after (no run dir left behind), secrets never echoed
    if spec.get("verify_after"):
        from amalgam.store.dataset import Dataset
        from amalgam.store.location import open_store

        loc = open_store(str(out.case / "store"))
        for key in spec["verify_after"]:
            try:
                if not Dataset.open(loc, key).verify() > 0:
                    problems.append(f"{key} verifies no rows")
            except Exception as exc:  # noqa: BLE001  (any failure here means data was lost)
                problems.append(f"{key} no longer verifies: {exc}")
    return not problems, message, problems


def run_corpus() -> tuple[int, int]:
    with tempfile.TemporaryDirectory(prefix="amalgam-faults-") as scratch, \
            ThreadPoolExecutor(max_workers=WORKERS) as pool:
        def one(name: str) -> tuple[Outcome, tuple[bool, str, list[str]]]:
            tmp = Path(scratch) / name
            tmp.mkdir()
            out = _run_case(name, tmp)
            return out, judge(name, out)

        results = dict(zip(CASES, pool.map(one, CASES)))

    print(f"## Bad inputs ({len(CASES)} cases, real CLI, {WORKERS} at a time)\n")
    print("| case | exit code | one line? | survived | message |")
    print("|---|---:|---|---|---|")
    survived = 0
    for name, (out, (ok, message, problems)) in results.items():
        xfail = _spec(name).get("xfail")
        one_line = "yes" if "stderr lines" not in " ".join(problems) else "no"
        verdict = "yes" if ok else f"**NO** ({'; '.join(problems)})"
        if xfail:
            verdict += f" (xfail: {xfail})"
        survived += ok
        msg = message.replace(str(out.case), "{case}").replace(str(out.tmp), "{tmp}").replace("|", "\\|")
        print(f"| {name} | {out.rc} | {one_line} | {verdict} | {msg} |")
    print(f"\nbad inputs: {survived}/{len(CASES)} survived with nothing lost\n")
    return len(CASES), survived


# --- 2. the other fault classes, through pytest ------------------------------------------------

def _owner(testcase: ET.Element) -> str | None:
    """The fault class a JUnit <testcase> belongs to (by file, and function where a node names one)."""
    module = testcase.get("classname", "")
    func = testcase.get("name", "").split("[")[0]
    parts = module.split(".")
    files = {"/".join(parts[:i]) + ".py" for i in range(1, len(parts) + 1)}  # also covers Test classes
    for cls, nodes in FAULT_CLASSES.items():
        for node in nodes:
            path, _, want = node.partition("::")
            if path in files and (not want or want == func):
                return cls
    return None


def run_pytest(quick: bool) -> tuple[int, int]:
    nodes = [n for ns in FAULT_CLASSES.values() for n in ns]
    # A module's nodes together (pytest runs them in the order given, and a module-scoped
    # fixture, such as test_driver_loss.py's uninterrupted reference run, would be set up again).
    files = list(dict.fromkeys(n.partition("::")[0] for n in nodes))
    nodes = sorted(nodes, key=lambda n: files.index(n.partition("::")[0]))
    with tempfile.TemporaryDirectory(prefix="amalgam-faults-junit-") as d:
        xml = Path(d) / "junit.xml"
        # xunit1: the JUnit XML keeps each test's record_property() values (fault_points).
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={xml}", *nodes]
        if quick:
            cmd += ["-m", "not slow"]
        shown = shlex.join(["python", *cmd[1:]]).replace(str(xml), "TMP")
        print(f"## Fault classes (pytest)\n\n`{shown}`\n")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if not xml.is_file():
            print(f"pytest wrote no JUnit XML (exit {proc.returncode}):\n```\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}```")
            return 0, 0
        root = ET.parse(xml).getroot()

    counts = {cls: {"tried": 0, "passed": 0, "failed": 0, "skipped": 0, "points": 0} for cls in FAULT_CLASSES}
    failures: list[str] = []
    for tc in root.iter("testcase"):
        cls = _owner(tc)
        if cls is None:
            continue
        c = counts[cls]
        c["tried"] += 1
        # Faults injected by a test that counts them (kills that landed, workers killed).
        c["points"] += sum(int(p.get("value", 0)) for p in tc.iter("property") if p.get("name") == "fault_points")
        if tc.find("failure") is not None or tc.find("error") is not None:
            c["failed"] += 1
            failures.append(f"{tc.get('classname')}::{tc.get('name')}")
        elif tc.find("skipped") is not None:
            c["skipped"] += 1
        else:
            c["passed"] += 1

    print("| fault class | cases tried | survived (passed) | failed | skipped | faults injected |")
    print("|---|---:|---:|---:|---:|---:|")
    for cls, c in counts.items():
        note = " (all slow: left out by --quick)" if quick and c["tried"] == 0 else ""
        print(f"| {cls}{note} | {c['tried']} | {c['passed']} | {c['failed']} | {c['skipped']} | {c['points'] or '-'} |")
    tried = sum(c["tried"] - c["skipped"] for c in counts.values())  # a skip is neither survived nor failed
    passed = sum(c["passed"] for c in counts.values())
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"\npytest: exit {proc.returncode}, {seconds:.1f} s; {summary}")
    for f in failures:
        print(f"- FAILED {f}")
    print()
    return tried, passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help='skip the slow Ray tests (pytest -m "not slow")')
    ap.add_argument("--no-corpus", action="store_true", help="skip the bad-input corpus")
    ap.add_argument("--no-pytest", action="store_true", help="skip the pytest fault classes")
    args = ap.parse_args()

    t0 = time.perf_counter()
    totals = [(0, 0)]
    if not args.no_corpus:
        totals.append(run_corpus())
    if not args.no_pytest:
        totals.append(run_pytest(args.quick))
    tried, survived = (sum(t[i] for t in totals) for i in (0, 1))
    print(f"total: {survived}/{tried} cases survived; wall time {time.perf_counter() - t0:.1f} s")
    sys.exit(0 if survived == tried else 1)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
