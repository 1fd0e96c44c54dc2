"""FLOPs tables from run dirs, or the forward FLOPs of one encoder.

    python scripts/flops_report.py RUN_DIR... [--format md|csv|json|latex] [--plot out.png]
    python scripts/flops_report.py --encoder vit_small_patch16_224 [--img-size 224] --json
"""
import argparse
import json

from hnet.cli import main_guard
from hnet.config import ConfigError


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run dirs")
    parser.add_argument("--format", default="md", choices=["md", "csv", "json", "latex"])
    parser.add_argument("--plot", help="write an accuracy-vs-FLOPs plot here (png/pdf/svg)")
    parser.add_argument("--encoder", help="count one encoder's forward FLOPs instead (timm name, zoo syntax)")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="with --encoder: print one JSON object")
    parser.add_argument("--seed-table", action="store_true", help="per-step/per-epoch FLOPs of the research setting")
    args = parser.parse_args(argv)
    if args.encoder:
        from hnet.flops import encoder_flops

        out = encoder_flops(args.encoder, args.img_size)
        keys = ("encoder", "img_size", "gmacs", "gflops", "params_m")
        print(json.dumps({k: out[k] for k in keys}) if args.json else
              f"{out['encoder']} @ {out['img_size']} px: {out['gmacs']:.3f} GMACs, {out['gflops']:.3f} GFLOPs, "
              f"{out['params_m']:.2f} M params")
        return
    from hnet.report import (
        build_table,
        plot_accuracy_vs_flops,
        render,
        seed_setting_table,
    )

    if args.seed_table:
        print(render(seed_setting_table(), args.format))
        return
    if not args.runs:
        raise ConfigError("flops_report: give one or more RUN_DIRs, --encoder NAME or --seed-table")
    print(render(build_table(args.runs), args.format))
    if args.plot:
        print(f"plot: {plot_accuracy_vs_flops(args.runs, args.plot)}")


if __name__ == "__main__":
    main()
