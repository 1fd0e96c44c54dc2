"""Zero-shot evaluation of every encoder of a run (CIFAR-10/100, ImageNet-1k, the built-in demo set).

    python scripts/evaluate.py --run RUN_DIR [--datasets cifar10,cifar100,imagenet] [key=value ...]
"""
import argparse
from pathlib import Path

from hnet.cli import main_guard
from hnet.config import ConfigError, load_config
from hnet.evaluate import evaluate_run


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run dir written by learn_multi_mapper / learn_separate_mapper")
    parser.add_argument("--datasets", default="", help="comma list; default: the run config's eval.datasets")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.cifar10=/data/cifar10 eval.templates=cifar")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run: {run} is not a run dir (no config.yaml)")
    cfg = load_config(run / "config.yaml", args.overrides)
    datasets = [d for d in args.datasets.split(",") if d] or cfg.eval.datasets
    results = evaluate_run(cfg, run, datasets)
    print((run / "eval.md").read_text())
    return results


if __name__ == "__main__":
    main()
