"""Zero-shot evaluation of every encoder of a run, on data sets in the layouts CLIP evaluations use.

    python scripts/evaluate.py --run RUN_DIR [--datasets cifar10,cifar100,imagenet] [key=value ...]
    python scripts/evaluate.py --run RUN_DIR --datasets cifar10=/data/cifar10,imnet_r=/data/imagenet-r

A data set is `demo`, a name whose folder is in eval.<name> (cifar10, cifar100, imagenet), or NAME=PATH with the
layout detected from the folder: torchvision CIFAR pickles, ImageNet wnid folders (any subset), ImageNet-V2
(folders 0..999), an ImageFolder (+ classnames.txt, templates.txt), clip_benchmark's webdataset folder.
Writes RUN_DIR/eval.json, eval.md, eval.csv and eval/<dataset>.json (clip_benchmark's keys, fractions), each data
set with its long-tail view (per-class accuracy by training-caption count).

    python scripts/evaluate.py --run RUN_DIR --linear-probe eval.linear_probe=[cars=/data/cars]

--linear-probe: also a linear probe per image encoder (clip_benchmark's protocol) on each labelled folder of
eval.linear_probe (NAME=PATH, with PATH/train and PATH/test), reported beside the pairs' zero-shot on its test split.
"""
import argparse
from pathlib import Path

from hnet import runs
from hnet.cli import main_guard
from hnet.config import ConfigError, load_config, parse_dataset_spec
from hnet.eval.evaluate import evaluate_run


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="run dir written by learn_multi_mapper / learn_separate_mapper (--run-dir under torchrun, "
                             "which reads --run as its --run-path)")
    parser.add_argument("--datasets", default="", help="comma list of names or NAME=PATH; default: the run "
                        "config's eval.datasets")
    parser.add_argument("--linear-probe", action="store_true", help="also probe each image encoder linearly on "
                        "the labelled folders of eval.linear_probe (NAME=PATH with train/ and test/)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.cifar10=/data/cifar10 eval.templates=cifar")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / runs.CONFIG).is_file():
        raise ConfigError(f"--run: {run} is not a run dir (no config.yaml)")
    cfg = load_config(run / runs.CONFIG, args.overrides)
    datasets = [d for d in args.datasets.split(",") if d] or cfg.eval.datasets
    names = [parse_dataset_spec(d, "--datasets")[0] for d in datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"--datasets: a dataset name is given twice: {names}")
    if args.linear_probe and not cfg.eval.linear_probe:
        raise ConfigError("--linear-probe: set eval.linear_probe, e.g. eval.linear_probe=[cars=/data/cars] (a folder "
                          "with train/ and test/ class folders)")
    results = evaluate_run(cfg, run, datasets, linear_probe=cfg.eval.linear_probe if args.linear_probe else [])
    print((run / runs.EVAL_MD).read_text())
    return results


if __name__ == "__main__":
    main()
