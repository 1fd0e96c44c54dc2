"""FLOPs of every ie30 encoder (fvcore + hnet's handles): GMACs at the default resolution, timm's published
figure where the issue lists one, and the ops fvcore could not count (must be empty or negligible).

    python benchmarks/flops_zoo.py [--zoo configs/encoders/ie30.yaml]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnet import files  # noqa: E402
from hnet.flops import encoder_flops  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

PUBLISHED_GMACS = {"vit_small_patch16_224": 4.61, "deit_small_patch16_224": 4.61, "vit_base_patch16_224": 17.58,
                   "vit_large_patch16_224": 61.6}
RESULTS = Path(__file__).parent / "results" / "flops_zoo.json"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zoo", default="configs/encoders/ie30.yaml")
    args = parser.parse_args(argv)
    rows = []
    for name in yaml.safe_load(open(args.zoo))["encoders"]:
        out = encoder_flops(name)
        published = PUBLISHED_GMACS.get(name.split(".")[0])
        rows.append({**out, "published_gmacs": published,
                     "rel_error": None if published is None else out["gmacs"] / published - 1})
        print(f"{name:52s} {out['img_size']:4d}px {out['gmacs']:8.2f} GMACs"
              + (f"  (timm {published}, {rows[-1]['rel_error']:+.2%})" if published else "")
              + (f"  uncounted: {out['unsupported_ops']}" if out["unsupported_ops"] else ""), flush=True)
    summary = {"encoders": len(rows), "max_rel_error_vs_published": max(abs(r["rel_error"]) for r in rows
                                                                        if r["rel_error"] is not None),
               "encoders_with_uncounted_ops": sum(bool(r["unsupported_ops"]) for r in rows), "rows": rows}
    files.write_json(RESULTS, stamp(summary, vars(args)))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return summary


if __name__ == "__main__":
    main()
