"""asim-calibrate: profile a real vLLM engine and fit the simulator's step-time model.

  asim-calibrate run --model DIR --out PROFILE.yaml [-- ENGINE_ARGS...]
      profile, then fit: the raw data goes to hardware/profiles/data/<profile name>/
  asim-calibrate profile --model DIR --out DATA_DIR [-- ENGINE_ARGS...]
      only the profiling run: DATA_DIR/steps.csv, engine.json, experiments.json, ...
  asim-calibrate fit DATA_DIR --out PROFILE.yaml
      fit (or refit) a profiling run's data into a profile

ENGINE_ARGS are passed to the server as `vllm serve` takes them (e.g. -- --max-num-seqs 8).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .fit import FitError, fit_steps
from .frontend import FRONTEND_DIR, estimate_frontend, estimate_frontend_live, runner_frontend_samples
from .operators import fit_operators
from .profile import build_profile, dump_profile, host_step_s, repo_relative
from .records import ENGINE_JSON, OPERATORS_CSV, STEPS_CSV, RecordsError, read_json, read_steps, read_table

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "hardware" / "profiles" / "data"


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asim-calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="{run,profile,fit,import}")

    def profiling_args(sp):
        sp.add_argument("--model", required=True, help="model directory with config.json (weights are dummy)")
        sp.add_argument("--python", help="Python with vLLM (default: $ASIM_VLLM_PYTHON, else .venv-vllm)")
        sp.add_argument("--kv-cache-space-gib", type=int, default=1,
                        help="VLLM_CPU_KVCACHE_SPACE for vLLM-CPU (default 1; 0 leaves it unset, as on GPU)")
        sp.add_argument("--quick", action="store_true", help="a small grid (about 2 minutes here), for CI")
        sp.add_argument("--no-operators", action="store_true",
                        help="skip the torch-profiler phase that times operator families")
        sp.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids")
        sp.add_argument("--max-other-cpu", type=float, default=0.25, metavar="CORES",
                        help="re-run (twice at most) an experiment during which other programs used more "
                             "than this many cores; the fit leaves out what stayed over (default 0.25)")

    r = sub.add_parser("run", help="profile a real engine and fit a profile")
    profiling_args(r)
    r.add_argument("--out", required=True, help="profile YAML to write (e.g. hardware/profiles/NAME.yaml)")
    r.add_argument("--data-dir", help="where the raw profiling data goes "
                                      "(default hardware/profiles/data/<profile name>)")
    r.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")

    pr = sub.add_parser("profile", help="only the profiling run (raw data for `fit`)")
    profiling_args(pr)
    pr.add_argument("--out", required=True, help="directory for the raw data")

    f = sub.add_parser("fit", help="fit a profile from a profiling run's data")
    f.add_argument("data_dir", help="a directory written by `profile` (or `run`)")
    f.add_argument("--out", required=True, help="profile YAML to write")
    f.add_argument("--name", help="profile name (default: the output file's stem)")
    f.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    f.add_argument("--reattribute", action="store_true",
                   help="first rebuild steps.csv from the saved server log with the current scheduler mirror")
    f.add_argument("--max-other-cpu", type=float, default=0.25, metavar="CORES",
                   help="leave out experiments during which other programs used more than this many cores")

    sh = sub.add_parser("show", help="describe a calibrated profile (its fit, errors, provenance)")
    sh.add_argument("profile", help="a calibrated profile YAML")
    sh.add_argument("--markdown", action="store_true", help="the Markdown section docs/calibration.md keeps")

    im = sub.add_parser("import", help="fit a per-operator profile from a public profile format",
                        description="Read a public per-operator profile and write an `operators` profile: "
                                    "`llmservingsim DIR` (a profiler/perf/<GPU>/<org>/<model>/<dtype> folder of "
                                    "LLMServingSim) or `vidur DIR` (a checkout of microsoft/vidur with "
                                    "data/profiling; pick --device and --source-model).")
    im.add_argument("format", choices=("llmservingsim", "vidur"))
    im.add_argument("dir", metavar="DIR")
    im.add_argument("--out", required=True, metavar="PROFILE.yaml")
    im.add_argument("--model", help="the served model: hardware/models name or config.json (default: from the profile)")
    im.add_argument("--name", help="profile name (default: the output file's stem)")
    im.add_argument("--device", help="vidur: device folder (a100, h100, a40); llmservingsim: our device name")
    im.add_argument("--source-model", help="vidur: the profiled model's folder (e.g. meta-llama/Llama-2-7b-hf)")
    im.add_argument("--expert-parallel", type=int, default=1, help="llmservingsim: EP degree of the MoE layer")
    return p


def cmd_import(args) -> int:
    from .importers.common import write_profile
    name = args.name or Path(args.out).stem
    if not Path(args.dir).is_dir():
        raise UsageError(f"{args.dir}: no such directory")
    try:
        if args.format == "llmservingsim":
            from .importers.llmservingsim import import_llmservingsim
            prof = import_llmservingsim(args.dir, model=args.model, name=name, device=args.device,
                                        expert_parallel=args.expert_parallel)
        else:
            from .importers.vidur import import_vidur
            if not args.device or not args.source_model:
                raise UsageError("vidur import needs --device (a100, h100, a40) and --source-model")
            prof = import_vidur(args.dir, args.device, args.source_model, served_model=args.model, name=name)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UsageError(f"cannot import {args.dir}: {e}") from None
    path = write_profile(prof, args.out)
    fit = (prof.get("latency_model") or {}).get("fit") or {}
    print(f"wrote {path}  (cross-validation: {fit.get('method', '')})")
    for tp, parts in sorted((k, v) for k, v in fit.items() if k.startswith("tp") and isinstance(v, dict)):
        for part, v in parts.items():
            if part != "operators" and isinstance(v, dict):
                cells = ", ".join(f"{k} {x:.3g}" for k, x in v.items() if isinstance(x, (int, float)))
                print(f"  {tp} {part:<20} {cells}")
    return 0


def split_engine_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our arguments and, after a bare `--`, the engine's."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, engine_args = split_engine_args(argv)
    try:
        args = build_parser().parse_args(ours)
    except SystemExit as e:  # argparse has printed its one-line usage error
        return int(e.code or 0)
    command = "asim-calibrate " + shlex.join(argv)
    try:
        if args.cmd is None:
            raise UsageError("a subcommand is needed: run, profile or fit (see --help)")
        if args.cmd == "import":
            return cmd_import(args)
        if args.cmd == "show":
            return cmd_show(args)
        if engine_args and args.cmd == "fit":
            raise UsageError("`fit` takes no engine arguments")
        if args.cmd == "fit":
            if args.reattribute:
                from .profiling import reattribute
                summary = reattribute(args.data_dir)
                print(f"re-attributed: {summary['steps_attributed']} steps, "
                      f"{summary['mirror_mismatches']} mirror mismatches, discarded {summary['lines_discarded']}")
            _fit(Path(args.data_dir), Path(args.out), args.name, args.folds, args.max_other_cpu, fit_command=command)
            return 0
        from .profiling import ProfilingError, profile_engine, stderr_log
        model = Path(args.model)
        if not (model / "config.json").exists():
            raise UsageError(f"--model {model}: no config.json there")
        if args.cmd == "profile":
            data_dir = Path(args.out)
        else:
            data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DATA_DIR / Path(args.out).stem
        try:
            profile_engine(str(model), engine_args, data_dir, python=args.python,
                           kv_cache_space_gib=args.kv_cache_space_gib or None, quick=args.quick,
                           operators=not args.no_operators, command=command, seed=args.seed,
                           max_other_cpu=args.max_other_cpu, log=stderr_log)
        except ProfilingError as e:
            raise UsageError(str(e)) from None
        if args.cmd == "run":
            _fit(data_dir, Path(args.out), None, args.folds, args.max_other_cpu, fit_command=None)
        return 0
    except (UsageError, RecordsError, FitError) as e:
        print(f"asim-calibrate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asim-calibrate: interrupted", file=sys.stderr)
        return 130


def _fit(data_dir: Path, out: Path, name: str | None, folds: int, max_other_cpu: float,
         fit_command: str | None) -> dict:
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir}: not a profiling directory")
    meta = read_json(data_dir / ENGINE_JSON)
    rows = read_steps(data_dir / STEPS_CSV)
    fit = fit_steps(rows, folds=folds, max_other_cpu=max_other_cpu)
    operators = None
    if (data_dir / OPERATORS_CSV).exists():
        operators = fit_operators(read_table(data_dir / OPERATORS_CSV), folds=folds, max_other_cpu=max_other_cpu)
    if fit_command:
        meta["fit_command"] = fit_command
    profile = build_profile(name or out.stem, meta, fit, raw_data=repo_relative(data_dir), operators=operators)
    lm = profile["latency_model"]
    fe = None
    exps = (read_json(data_dir / "experiments.json").get("experiments", [])
            if (data_dir / "experiments.json").exists() else None)
    if (data_dir / FRONTEND_DIR / "calls.csv").exists():
        fe = _frontend_from_probe(data_dir, lm["intercept"], lm["coefficients"], host_step_s(profile))
    elif exps is not None:
        fe = estimate_frontend(exps, lm["intercept"], lm["coefficients"],
                               int(meta["engine"].get("max_num_batched_tokens") or 2048), max_other_cpu)
    if fe is not None and exps is not None:
        import numpy as np

        from .runner import ExperimentRun
        runs = [ExperimentRun.from_dict(d) for d in exps]
        runs = [r for r in runs if max_other_cpu is None or r.other_cpu <= max_other_cpu]
        grid = runner_frontend_samples(runs, rows, host_step_s(profile) or 0.0)
        if grid:
            # the same measure with the profiling client, for validation's reference batches
            fe["runner_client_s"] = round(float(np.median(grid)), 6)
            fe["runner_client_samples"] = len(grid)
    if fe is not None:
        lm["frontend_s"] = round(fe["frontend_s"], 6)
        if "frontend_in_s" in fe:
            lm["frontend_in_s"] = round(fe["frontend_in_s"], 6)
        lm["fit"]["parts"]["frontend"] = fe
    header = (f"# Calibrated profile written by asim-calibrate; do not edit by hand.\n"
              f"# Re-fit: asim-calibrate fit {repo_relative(data_dir)} --out {repo_relative(out)}\n")
    dump_profile(profile, out, header)
    print("\n".join(format_fit(profile)))
    return profile


def _frontend_from_probe(data_dir: Path, intercept: float, coefficients: dict, host_s: float | None) -> dict:
    import gzip

    import pandas as pd

    from replay.vllm_server import iter_iteration_records

    probe = data_dir / FRONTEND_DIR
    calls = pd.read_csv(probe / "calls.csv")
    t0 = (read_json(probe / "summary.json").get("client") or {}).get("t0_epoch_s")
    log_gz = data_dir / "server.log.gz"
    if t0 is None or not log_gz.exists():
        return {"frontend_s": 0.0, "n_samples": 0, "why": "the probe has no t0_epoch_s or there is no server log"}
    with gzip.open(log_gz, "rt", encoding="utf-8", errors="replace") as f:
        records = list(iter_iteration_records(f))
    fe = estimate_frontend_live(calls, float(t0), records, intercept, coefficients, host_s)
    fe.pop("samples", None)
    if (probe / "contention.json").exists():
        fe["contention"] = read_json(probe / "contention.json")
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in fe.items()}


def cmd_show(args) -> int:
    import yaml

    path = Path(args.profile)
    try:
        profile = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(profile, dict) or (profile.get("latency_model") or {}).get("kind") != "linear" \
            or "fit" not in profile["latency_model"]:
        raise UsageError(f"{path}: not a profile fitted by asim-calibrate run/fit")
    if args.markdown:
        from .report import profile_markdown
        print("\n".join(profile_markdown(profile)))
    else:
        print("\n".join(format_fit(profile)))
    return 0


def format_fit(profile: dict) -> list[str]:
    lm = profile["latency_model"]
    fit = lm["fit"]
    parts = fit["parts"]
    lines = [f"profile {profile['name']}: {fit['n_samples']} steps, family {fit['family']}, "
             f"{fit['folds']}-fold CV grouped by experiment"]
    for key in ("execute", "host", "step_period"):
        p = parts.get(key)
        if p and "cv_mape" in p:
            lines.append(f"  {key:<12} CV MAPE {100 * p['cv_mape']:6.2f} %   p90 APE {100 * p['cv_p90_ape']:6.2f} %"
                         f"   total {100 * p.get('cv_total_error', float('nan')):+6.2f} %   (n={p['n_samples']})")
    h = parts.get("host", {})
    if "cv_mae_per_step_s" in h:
        lines.append(f"    host: mean {1e3 * h['mean_host_per_step_s']:.2f} ms/step, CV mean abs error "
                     f"{1e3 * h['cv_mae_per_step_s']:.2f} ms/step = {100 * h['cv_mean_abs_error_vs_period']:.1f} % "
                     f"of the period")
    for kind, e in parts["execute"].get("by_step_kind", {}).items():
        lines.append(f"    {kind:<10} CV MAPE {100 * e['cv_mape']:6.2f} %   p90 APE {100 * e['cv_p90_ape']:6.2f} %"
                     f"   total {100 * e.get('cv_total_error', float('nan')):+6.2f} %   (n={e['n']})")
    fe = parts.get("frontend")
    if fe and fe.get("n_samples"):
        split = (f" (way in {1e3 * fe['frontend_in_s']:.2f}, way out {1e3 * fe['frontend_out_s']:.2f})"
                 if "frontend_in_s" in fe else "")
        lines.append(f"  frontend     {1e3 * fe['frontend_s']:.2f} ms{split}, median of {fe['n_samples']} calls")
    ops = parts.get("operators", {})
    if ops.get("available"):
        shares = ", ".join(f"{k} {100 * v['share_of_step']:.0f}%" for k, v in ops["families"].items()
                           if v["share_of_step"] >= 0.01)
        lines.append(f"  operators    {shares}")
    else:
        lines.append(f"  operators    not available: {ops.get('why', '')}")
    lines.append(f"  intercept {lm['intercept']:.6g} s; " +
                 ", ".join(f"{k} {v:.4g}" for k, v in lm["coefficients"].items()))
    return lines


if __name__ == "__main__":
    sys.exit(main())
