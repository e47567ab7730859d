"""The results layout shared by simulated and measured runs (../shared/DESIGN.md).

`ResultsWriter` writes rows as they come (a live run that is interrupted keeps what it
measured) and `summary.json` at the end. `load_results` reads a directory back.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from simulator.metrics import CALL_COLUMNS, PROGRAM_COLUMNS, STEP_COLUMNS, TIMESERIES_COLUMNS


class ResultsWriter:
    def __init__(self, out_dir: str | os.PathLike, call_columns=CALL_COLUMNS,
                 program_columns=PROGRAM_COLUMNS, timeseries_columns=TIMESERIES_COLUMNS):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files = {}
        self._writers = {}
        for name, cols in (("calls", call_columns), ("programs", program_columns), ("timeseries", timeseries_columns)):
            f = open(self.dir / f"{name}.csv", "w", newline="", encoding="utf-8")
            w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
            w.writeheader()
            self._files[name] = f
            self._writers[name] = w

    def _write(self, name: str, rows, flush: bool) -> None:
        w = self._writers[name]
        for r in rows:
            w.writerow(r)
        if flush:
            self._files[name].flush()

    def calls(self, rows, flush: bool = False) -> None:
        self._write("calls", rows, flush)

    def programs(self, rows, flush: bool = False) -> None:
        self._write("programs", rows, flush)

    def timeseries(self, rows, flush: bool = False) -> None:
        self._write("timeseries", rows, flush)

    def steps(self, rows) -> None:
        """steps.csv, written whole (optional: runs that know their engine steps)."""
        write_steps(self.dir, rows)

    def summary(self, summary: dict[str, Any]) -> None:
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=False, default=_jsonable) + "\n")
        tmp.replace(self.dir / "summary.json")

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _jsonable(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)


def load_results(d: str | os.PathLike):
    """(calls, programs, timeseries DataFrames, summary dict) of a results directory."""
    import pandas as pd

    p = Path(d)
    missing = [n for n in ("calls.csv", "programs.csv", "summary.json") if not (p / n).exists()]
    if missing:
        raise FileNotFoundError(f"{p}: not a results directory (missing {', '.join(missing)})")
    calls = pd.read_csv(p / "calls.csv")
    programs = pd.read_csv(p / "programs.csv")
    ts = pd.read_csv(p / "timeseries.csv") if (p / "timeseries.csv").exists() else pd.DataFrame()
    summary = json.loads((p / "summary.json").read_text())
    return calls, programs, ts, summary


def write_steps(d: str | os.PathLike, rows) -> Path:
    path = Path(d) / "steps.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(STEP_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def load_steps(d: str | os.PathLike):
    """steps.csv of a results directory as a DataFrame, or None when the run has none."""
    import pandas as pd

    path = Path(d) / "steps.csv"
    return pd.read_csv(path) if path.exists() else None
