"""Rank every encoder of a zoo with ONE hypernetwork trained at a search budget, and compare the cost with a grid
search (one separate connector per encoder at the config's `train` settings). Writes RUN_DIR/search.json and
search.md (RUN_DIR = <out_root>/<name>_search_hypernet).

    python scripts/search.py --config configs/demo.yaml search.steps=100 search.encoders_per_step=4 \\
        search.samples_per_encoder=1000 [--separate RUN_DIR]
    accelerate launch scripts/search.py --config configs/cc595k_ie30.yaml ...
"""
import json

from hnet.cli import config_parser, main_guard, parse_config
from hnet.experiments.search import run_search
from hnet.report import search_markdown


@main_guard
def main(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--separate", action="append", metavar="RUN_DIR",
                        help="a finished separate (APE) run over the same zoo, from seeds the search does not use (the "
                             "truth; repeat the flag for several: their mean): report the agreement")
    args, cfg = parse_config(parser, argv)
    result = run_search(cfg, args.separate)
    print(search_markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
