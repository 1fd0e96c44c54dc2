"""Rank encoders by zero-shot accuracy under a hypernetwork run and a separate run; report their agreement.

    python scripts/rank_encoders.py --hypernet RUN_DIR --separate RUN_DIR [RUN_DIR ...] [--dataset cifar10] [--json]
"""
import argparse
import json

from hnet.cli import main_guard
from hnet.eval.ranking import rank_encoders
from hnet.report_ranking import ranking_markdown


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypernet", required=True)
    parser.add_argument("--separate", required=True, nargs="+", metavar="RUN_DIR",
                        help="separate runs from seeds the hypernetwork did not use (the truth; several: their mean)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = rank_encoders(args.hypernet, args.separate, args.dataset)
    print(json.dumps(result) if args.json else ranking_markdown(result))


if __name__ == "__main__":
    main()
