"""One exception type for every user-facing failure.

The CLI prints ``AmalgamError`` as a single line (no traceback) and exits non-zero, so
every message must name the file, field or teacher at fault on its own.
"""

from __future__ import annotations

from typing import TypeVar

M = TypeVar("M")


class AmalgamError(Exception):
    """A failure caused by input or environment, reported to the user as one line."""


def validation_line(path: object, exc: "ValidationError") -> str:  # noqa: F821
    """A pydantic error as one line naming the file and the first failing field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{path}: field {loc}: {err['msg'].removeprefix('Value error, ')}"


def read_yaml_mapping(path: object, what: str) -> dict:
    """Parse a YAML file that must hold a mapping; one-line errors for absence and bad syntax."""
    from pathlib import Path

    import yaml

    p = Path(path)  # type: ignore[arg-type]
    if not p.is_file():
        raise AmalgamError(f"{p}: {what} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise AmalgamError(f"{p}:{where} malformed YAML") from None
    if not isinstance(raw, dict):
        raise AmalgamError(f"{p}: a {what} must be a YAML mapping")
    return raw


def parse_json_object(data: str | bytes, where: object, what: str = "JSON document") -> dict:
    """Parse JSON that must hold an object; one-line errors (with the line) for bad syntax or bytes."""
    import json

    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f" line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise AmalgamError(f"{where}:{line} malformed JSON") from None
    if not isinstance(raw, dict):
        raise AmalgamError(f"{where}: a {what} must be a JSON object")
    return raw


def validate_as(model: type[M], raw: object, where: object) -> M:
    """``model.model_validate(raw)``, a failure reported as :func:`validation_line` naming ``where``."""
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise AmalgamError(validation_line(where, exc)) from None
