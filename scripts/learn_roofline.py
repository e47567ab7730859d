"""Learn RooflineModel's efficiencies (GEMM, attention, memory) and its tile model of attention
from the measured devices' operator times, print the leave-one-device-out table, and (with
--write) write the spec-only profiles hardware/profiles/{h200,b200,mi300x,l40s}-roofline-learned.yaml and
hardware/roofline-learned.yaml (what a run given a device name, no profile, uses).

    python scripts/learn_roofline.py [--reference DIR] [--write]

Leave-one-device-out: for each measured device, the efficiencies are fitted on the other
devices and its operator times predicted from its datasheet spec alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibrate.importers.common import write_profile  # noqa: E402
from calibrate.importers.roofline import (FAMILIES, SPEC_ONLY, learn, learned_defaults, loo_table,  # noqa: E402
                                          spec_only_profile)
from simulator.hardware import HARDWARE_DIR  # noqa: E402

REFERENCE = REPO.parent / "shared" / "reference"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--write", action="store_true", help="write the spec-only profiles")
    a = ap.parse_args(argv)
    if not a.reference.is_dir():
        print(f"reference data not found: {a.reference}", file=sys.stderr)
        return 2
    learned = learn(a.reference)
    e = learned["efficiencies"]
    print(f"learned on {', '.join(learned['devices'])} ({learned['points']} operator points): "
          f"gemm {e['gemm']:.3f}, attention {e['attention']:.3f}, memory {e['memory']:.3f}; "
          f"attention kernel floor {learned['attention_fixed_us']:.1f} us")
    t = learned["attention_tiles"]
    if t:
        print(f"attention tile model: prefill blocks at {t['compute_efficiency']:.3f} of an SM's peak, decode KV at "
              f"{t['memory_efficiency']:.3f} of bandwidth, floor {t['floor_us']:.1f} us, per wave "
              f"{t['prefill_tile_us']:.1f} us (prefill) / {t['decode_tile_us']:.1f} us (decode)")
    sk = learned.get("decode_skew")
    if sk:
        al = sk["alpha"]
        print(f"decode skew (uneven decode contexts; FA2 devices): alpha pure {al['pure']:.4f}, mixed {al['mixed']:.4f} "
              "pooled; time-weighted error of the skewed batches, alpha / mean context [other devices' alpha]:")
        for dev, r in sk["devices"].items():
            cells = []
            for reg in ("pure", "mixed"):
                e, o = r["errors"][reg], (r["errors_with_others_alpha"] or {}).get(reg)
                other = f" [{o['time_weighted_ape_pct']:.1f}%]" if o else ""
                cells.append(f"{reg} {r['alpha'][reg]:.4f}: {e['time_weighted_ape_pct']:.1f}% / "
                             f"{e['time_weighted_ape_pct_mean_context']:.1f}%{other} ({e['points']} batches)")
            print(f"  {dev:13s} " + "; ".join(cells))
    print("in-sample error per family (time-weighted / plain MAPE, median signed):")
    for f in FAMILIES:
        x, y = learned["in_sample"].get(f), learned["in_sample_flat"].get(f)
        if x:
            flat = f"  [flat attention {y['time_weighted_ape_pct']:.1f}%]" if f.startswith("attn") else ""
            print(f"  {f:13s} {x['time_weighted_ape_pct']:5.1f}% / {x['mape_pct']:5.1f}%  ({x['bias_pct']:+.0f}%)  "
                  f"{x['points']} points{flat}")
    print()
    for line in loo_table(learned["leave_one_device_out"]):
        print(line)
    if a.write:
        for dev in SPEC_ONLY:
            p = write_profile(spec_only_profile(dev, learned), HARDWARE_DIR / "profiles" / f"{dev}-roofline-learned.yaml")
            print(f"wrote {p}")
        p = write_profile(learned_defaults(learned), HARDWARE_DIR / "roofline-learned.yaml")
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
