"""``amalgam registry list|show|promote|rollback|register``: versions of a student line and its champion.

``--store`` is a path, ``file://PATH`` or ``s3://BUCKET/PREFIX`` (default ``$AMALGAM_HOME/store``,
the feature store's default); S3 settings come from the standard AWS environment variables.
``--name`` is the student line (the job name); it may be left out when the store holds one
line, and for ``register`` it defaults to the run's job name. Promote and rollback are
compare-and-swap: if another writer moved the champion meanwhile they fail with one line.
"""

from __future__ import annotations

import argparse

from amalgam.errors import AmalgamError


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _open(args: argparse.Namespace, default_name: str | None = None):
    from amalgam.registry import Registry, registry_names
    from amalgam.store.location import open_store

    loc = open_store(args.store)
    name = args.name or default_name
    if name is None:
        names = registry_names(loc)
        if len(names) != 1:
            have = f"it holds {', '.join(names)}" if names else "it holds none"
            raise AmalgamError(f"{loc.uri_of('registry')}: pass --name (the student line); {have}")
        name = names[0]
    return Registry(loc, name)


def _version(text: str) -> int | str:
    if text == "champion":
        return text
    try:
        v = int(text.lstrip("v"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a version number (e.g. 3 or v3) or 'champion'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: versions start at 1")
    return v


def _resolve(reg, version: int | str) -> int:
    if version != "champion":
        return int(version)
    head = reg.head()
    if head is None:
        raise AmalgamError(f"{reg.uri()}: no champion yet")
    return head.version


def _list(args: argparse.Namespace) -> None:
    reg = _open(args)
    head = reg.head()
    done, pending = reg.committed_versions()
    rows = [["", "VERSION", "STATUS", "COMPREHENSIVE", "PARAMS", "CREATED", "LINEAGE"]]
    for v in done:
        r = reg.record(v)
        star = "*" if head is not None and head.version == v else ""
        rows.append([star, f"v{v}", reg.status_of(r, head), _acc(r.metrics.comprehensive), str(r.params), r.created,
                     f"v{r.lineage}" if r.lineage else "-"])
    champ = f", champion v{head.version} (epoch {head.epoch})" if head else ", no champion"
    print(f"{reg.uri()}: {len(done)} versions{champ}")
    if len(rows) > 1:
        print(_table(rows))
    if pending:
        print(f"{len(pending)} uncommitted (registration interrupted or in progress): "
              + ", ".join(f"v{v}" for v in pending))
    pointer = reg.champion_pointer()
    if head is not None and (pointer is None or pointer.epoch != head.epoch):
        print(f"note: champion.json lags the history (epoch {pointer.epoch if pointer else 0} < {head.epoch}); "
              "the next promote or rollback rewrites it")


def _show(args: argparse.Namespace) -> None:
    reg = _open(args)
    head = reg.head()
    r = reg.record(_resolve(reg, args.version))
    print(f"{reg.uri(f'versions/{r.version:06d}')}")
    print(f"  version: v{r.version}{'  (champion)' if head and head.version == r.version else ''}")
    print(f"  status: {reg.status_of(r, head)}{f' ({r.reason})' if r.reason else ''}")
    print(f"  created: {r.created}")
    print(f"  run: {r.run_dir}")
    print(f"  params: {r.params}  sha256: {r.sha256}")
    print(f"  zoo fingerprint: {r.zoo_fingerprint}")
    for t in r.teachers:
        fid = r.metrics.fidelity.get(t.name) if r.metrics.fidelity else None
        fid_s = f"  fidelity {_acc(fid)}" if r.metrics.fidelity else ""
        print(f"  teacher {t.name}: {len(t.classes)} classes, sha256 {t.sha256[:12]}..., "
              f"task-aware {_acc(r.metrics.task_aware.get(t.name))}{fid_s}")
    print(f"  comprehensive: {_acc(r.metrics.comprehensive)}")
    chain, seen, cur = [f"v{r.version}"], {r.version}, r.lineage
    while cur is not None and cur not in seen and len(chain) < 50:
        chain.append(f"v{cur}")
        seen.add(cur)
        try:
            cur = reg.record(cur).lineage
        except AmalgamError:
            break
    print(f"  lineage: {' <- '.join(chain)}")
    hist = reg.history()
    if hist:
        print("champion history:")
        for t in hist:
            prev = f"v{t.previous}" if t.previous else "none"
            print(f"  epoch {t.epoch}: {t.action} v{t.version} (was {prev}) at {t.promoted_at}: {t.reason or ''}".rstrip())


def _promote(args: argparse.Namespace) -> None:
    reg = _open(args)
    t = reg.promote(_resolve(reg, args.version), reason=args.reason)
    was = f"v{t.previous}" if t.previous else "none"
    print(f"{reg.uri()}: champion is now v{t.version} (was {was}, epoch {t.epoch})")


def _rollback(args: argparse.Namespace) -> None:
    reg = _open(args)
    t = reg.rollback(reason=args.reason)
    print(f"{reg.uri()}: rolled back; champion is now v{t.version} (epoch {t.epoch})")


def _register(args: argparse.Namespace) -> None:
    from amalgam.student_io import read_student_manifest

    job_name = read_student_manifest(args.run_dir)[0].job.get("name")
    reg = _open(args, default_name=job_name if isinstance(job_name, str) else None)
    r = reg.register(args.run_dir, zoo=args.zoo)
    print(f"{reg.uri()}: registered v{r.version} from {r.run_dir} "
          f"(comprehensive {_acc(r.metrics.comprehensive)}, {r.params} params)")
    if args.judge:
        d = reg.challenge(r.version, args.tolerance)
        print(f"{'promoted' if d.promote else 'rejected'} v{r.version}: {d.reason}")


def register(sub: argparse._SubParsersAction) -> None:
    from amalgam.paths import amalgam_home

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=str(amalgam_home() / "store"),
                        help="a path, file://PATH or s3://BUCKET/PREFIX (default $AMALGAM_HOME/store)")
    common.add_argument("--name", help="student line (job name); optional when the store holds one")
    reg = sub.add_parser("registry", help="student versions and the champion").add_subparsers(dest="action", required=True)
    ls = reg.add_parser("list", parents=[common], help="every committed version; '*' marks the champion")
    ls.set_defaults(func=_list)
    show = reg.add_parser("show", parents=[common], help="one version's record, lineage and champion history")
    show.add_argument("version", type=_version, help="e.g. 3, v3 or champion")
    show.set_defaults(func=_show)
    promote = reg.add_parser("promote", parents=[common], help="make VERSION champion (compare-and-swap)")
    promote.add_argument("version", type=_version)
    promote.add_argument("--reason", help="recorded in the history")
    promote.set_defaults(func=_promote)
    rollback = reg.add_parser("rollback", parents=[common], help="undo the last promotion")
    rollback.add_argument("--reason", help="recorded in the history")
    rollback.set_defaults(func=_rollback)
    register_ = reg.add_parser("register", parents=[common], help="copy a run's student in as the next version")
    register_.add_argument("run_dir", help="run directory (with student.json and student.safetensors)")
    register_.add_argument("--zoo", help="zoo manifest the run used (default: the run's job.zoo, if it exists here)")
    register_.add_argument("--judge", action="store_true",
                           help="then judge it against the champion: promote it or mark it rejected")
    register_.add_argument("--tolerance", type=float, default=0.01,
                           help="largest allowed drop of a sub-task's figure, with --judge (default 0.01)")
    register_.set_defaults(func=_register)
