"""The main job on the built-in data (what `make demo` runs), end to end on a CPU in minutes."""
import json

from hnet.cli import config_parser, main_guard, parse_config
from hnet.experiments.pipeline import run_pipeline


@main_guard
def main(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--no-control", action="store_true", help="skip the shuffled-caption control run")
    args, cfg = parse_config(parser, argv)
    print(json.dumps(run_pipeline(cfg, control=not args.no_control)))


if __name__ == "__main__":
    main()
