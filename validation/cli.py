"""asim-validate: compare a measured run with a simulated run of the same trace, and say
where the simulator is off.

  asim-validate compare MEASURED_DIR SIMULATED_DIR --out REPORT_DIR

writes errors.json, report.md and report.html (self-contained) into REPORT_DIR and prints a
short table, the warnings and the top findings. The directories are `asim-replay --out` results.

  asim-validate import vllm-bench RESULT.json --out MEASURED_DIR

turns a recorded real run (a `vllm bench serve --save-result --save-detailed` JSON, or an
LLMServingSim run folder) into a measured results dir and the trace to simulate
(MEASURED_DIR/trace.jsonl): asim-replay that trace, then compare.
"""

from __future__ import annotations

import argparse
import sys

from simulator.config import ConfigError

from .compare import ResultsInputError, compare_runs, load_run
from .matrix import MatrixError

PROG = "asim-validate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("compare", help="compare a measured results dir with a simulated one",
                       description="Compare MEASURED_DIR (e.g. a live replay) with SIMULATED_DIR (asim-replay "
                                   "of the same trace); errors are (simulated - measured) / measured.")
    c.add_argument("measured", metavar="MEASURED_DIR", help="results of the real engine (asim-replay --endpoint)")
    c.add_argument("simulated", metavar="SIMULATED_DIR", help="results of the simulator on the same trace")
    c.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="where to write errors.json, report.md, report.html")
    c.add_argument("--repeat", action="append", default=[], metavar="DIR",
                   help="another measurement of the same trace (repeatable): aggregates are then compared with "
                        "the median over all measured runs, and their spread is reported")
    c.add_argument("--top", type=int, default=3, help="findings to print (default 3; all are in the report)")
    c.add_argument("--quiet", action="store_true", help="print nothing but errors")
    i = sub.add_parser("import", help="a recorded real run as a measured results dir and its trace",
                       description="Write a recorded real run in the results layout (MEASURED_DIR) with the trace "
                                   "that replays it (MEASURED_DIR/trace.jsonl, or --trace): simulate that trace with "
                                   "asim-replay and compare the two dirs.")
    i.add_argument("format", choices=("vllm-bench", "llmservingsim"),
                   help="vllm-bench: the JSON of vllm bench serve --save-result --save-detailed; llmservingsim: a "
                        "run folder of LLMServingSim's bench/")
    i.add_argument("source", metavar="SOURCE", help="the result file (or a folder holding one) / the run folder")
    i.add_argument("--out", required=True, metavar="MEASURED_DIR")
    i.add_argument("--trace", default=None, metavar="TRACE.jsonl", help="where the trace goes "
                                                                           "(default MEASURED_DIR/trace.jsonl)")
    i.add_argument("--prefix-tokens", type=int, default=0, metavar="N",
                   help="vllm-bench: every prompt began with the same N tokens (--random-prefix-len, a shared "
                        "system prompt); the file does not record it")
    r = sub.add_parser("run", help="run a validation matrix (live vLLM and/or recorded runs vs the simulator)",
                       description="For each case of MATRIX.yaml: measure (live vLLM or a recorded run), simulate "
                                   "the same trace with the case's profile, compare. Writes DIR/<case>/{measured,"
                                   "simulated,report}/ and DIR/summary.md.")
    r.add_argument("matrix", metavar="MATRIX.yaml")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--case", action="append", default=None, help="run only this case (repeatable)")
    r.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="measure every live case N times (default: the matrix's `repeats`, else 1)")
    return p


def cmd_compare(args) -> int:
    from .report import findings_lines, summary_lines, warnings_lines, write_report

    meas = load_run(args.measured)
    sim = load_run(args.simulated)
    errors = compare_runs(meas, sim, [load_run(d) for d in args.repeat])
    paths = write_report(args.out, errors, meas, sim)
    if not args.quiet:
        lines = summary_lines(errors) + [""] + warnings_lines(errors)
        lines += ["", "where the simulator is off (largest first):"] + findings_lines(errors, top=args.top)
        lines += ["", f"report: {paths['markdown']}, {paths['html']}, {paths['errors']}"]
        print("\n".join(lines))
    return 0


def cmd_import(args) -> int:
    from pathlib import Path

    from replay.trace import write_trace

    from .importers import RECORDED_FORMATS
    from .importers.llmservingsim import ImportError_

    opts = {"prefix_tokens": args.prefix_tokens} if args.format == "vllm-bench" else {}
    if args.prefix_tokens and args.format != "vllm-bench":
        raise MatrixError("--prefix-tokens is for vllm-bench runs")
    try:
        run = RECORDED_FORMATS[args.format](args.source, args.out, **opts)
    except ImportError_ as e:
        raise MatrixError(str(e)) from None
    trace = Path(args.trace) if args.trace else Path(args.out) / "trace.jsonl"
    write_trace(run.programs, trace)
    settings = " ".join(f"--set engine.{k}={v}" for k, v in run.engine.items())
    print(f"measured run: {args.out}/ ({len(run.programs)} requests, model {run.model or '?'})\n"
          f"trace: {trace}\n"
          f"next: asim-replay {trace} --hardware HARDWARE --model MODEL {settings} --out SIM_DIR && "
          f"asim-validate compare {args.out} SIM_DIR --out REPORT_DIR")
    return 0


def cmd_run(args) -> int:
    from .matrix import run_matrix, summary_markdown

    if args.repeats is not None and args.repeats < 1:
        raise MatrixError("--repeats must be at least 1")
    result = run_matrix(args.matrix, args.out, only=args.case, repeats=args.repeats,
                        log=lambda m: print(m, flush=True))
    print("\n".join(summary_markdown(result)))
    failed = sum(r.get("status") != "ok" for r in result["cases"])
    if failed:
        print(f"{failed} case(s) failed; see {args.out}/<case>/error.txt", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "import":
            return cmd_import(args)
    except (ResultsInputError, MatrixError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out, a disk full: the user's to fix
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
