"""Find the best (image encoder, text encoder) pair of a zoo at a search budget, and compare the cost with a grid
search (one separate connector per pair at the config's `train` settings). Writes RUN_DIR/search.json and search.md.

--method hypernet          ONE hypernetwork at the budget search.steps / encoders_per_step / samples_per_encoder
                           (RUN_DIR = <out_root>/<name>_search_hypernet)
--method halving           successive halving of separate connectors: search.eta, rung_samples, rung_steps,
                           val_samples (held-out search samples the rungs are decided on), captions
--method hypernet-halving  the same with one hypernetwork per rung (search.lr, search.weight_decay)
--method proxy             a training-free score (search.proxy, search.proxy_samples)
(RUN_DIR = <out_root>/<name>_search_<method> for the last three)

    python scripts/search.py --config configs/demo.yaml search.steps=100 search.encoders_per_step=4 \\
        search.samples_per_encoder=1000 [--separate RUN_DIR]
    python scripts/search.py --config configs/flickr8k_real.yaml --method halving search.rung_samples=256
    accelerate launch scripts/search.py --config configs/cc595k_ie30.yaml ...
"""
import dataclasses
import json

from hnet.cli import config_parser, main_guard, parse_config
from hnet.config import CHOICES
from hnet.experiments.budgeted_search import run_budgeted_search
from hnet.experiments.search import run_search
from hnet.report_ranking import budgeted_search_markdown, search_markdown


@main_guard
def main(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--separate", action="append", metavar="RUN_DIR",
                        help="a finished separate (APE) run over the same zoo, from seeds the search does not use (the "
                             "truth; repeat the flag for several: their mean): report the agreement")
    parser.add_argument("--method", choices=CHOICES["search.method"], default=None,
                        help="the search (default: search.method of the config, else hypernet)")
    args, cfg = parse_config(parser, argv)
    if args.method:
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, method=args.method))
    if cfg.search.method == "hypernet":
        result = run_search(cfg, args.separate)
        print(search_markdown(result))
    else:
        result = run_budgeted_search(cfg, args.separate)
        print(budgeted_search_markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
