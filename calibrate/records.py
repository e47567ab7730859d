"""The raw data of a profiling run on disk: attributed steps (CSV) and engine facts (JSON).

A profiling directory holds `steps.csv` (one row per attributed step, `StepRow` columns),
`engine.json` (what the engine reported about itself, the device, the commands, the
attribution summary) and optionally `operators.csv` (per-step operator-family times from the
torch profiler). `asim-calibrate fit DIR` reads them back; nothing else is needed to refit.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import MISSING, fields
from pathlib import Path

from .attribution import StepRow

STEPS_CSV = "steps.csv"
ENGINE_JSON = "engine.json"
OPERATORS_CSV = "operators.csv"
EXPERIMENTS_JSON = "experiments.json"

_STEP_FIELDS = [f.name for f in fields(StepRow)]
_TYPES = {f.name: f.type for f in fields(StepRow)}
_OPTIONAL = {f.name for f in fields(StepRow) if f.default is not MISSING}


class RecordsError(ValueError):
    """A profiling directory that is missing a file or has a malformed one (user error)."""


def write_steps(path: str | os.PathLike, rows: list[StepRow]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_STEP_FIELDS)
        for r in rows:
            w.writerow([_fmt(getattr(r, k)) for k in _STEP_FIELDS])


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return repr(v)
    return v


def read_steps(path: str | os.PathLike) -> list[StepRow]:
    path = Path(path)
    if not path.exists():
        raise RecordsError(f"step records not found: {path}")
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        have = set(reader.fieldnames or [])
        missing = set(_STEP_FIELDS) - have - _OPTIONAL
        if missing:
            raise RecordsError(f"{path}: missing columns {sorted(missing)}")
        keys = [k for k in _STEP_FIELDS if k in have]
        for i, d in enumerate(reader, start=2):
            try:
                rows.append(StepRow(**{k: _parse(k, d[k]) for k in keys}))
            except (TypeError, ValueError) as e:
                raise RecordsError(f"{path}:{i}: {e}") from None
    return rows


def _parse(key: str, text: str):
    typ = _TYPES[key]
    if "None" in str(typ) and text == "":
        return None  # an optional value that was not known (written as an empty cell)
    if typ in ("str", str):
        return text
    if typ in ("bool", bool):
        return text.strip() in ("1", "True", "true")
    if typ in ("int", int):
        return int(text)
    return float(text)


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise RecordsError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordsError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RecordsError(f"{path}: expected a JSON object")
    return data


def write_table(path: str | os.PathLike, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in columns})


def read_table(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
