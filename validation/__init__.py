"""validation: how far the simulator is from a real engine, and where.

`compare(measured_dir, simulated_dir)` returns the content of errors.json: aggregate and
per-call errors, ranked findings that name the part of the model that is off, and warnings
when the comparison is not meaningful. `write_report` writes errors.json, report.md and a
self-contained report.html. The CLI is `asim-validate` (validation.cli).
"""

from .compare import Run, ResultsInputError, compare, compare_runs, load_run
from .report import write_report

__all__ = ["Run", "ResultsInputError", "compare", "compare_runs", "load_run", "write_report"]
