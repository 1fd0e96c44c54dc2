"""Embed the training data with every configured image encoder and the text encoder (one pass, resumable)."""
import json

from hnet.cli import config_parser, main_guard, parse_config
from hnet.distributed import make_accelerator
from hnet.experiments.train_run import embed_training_data


@main_guard
def main(argv=None):
    _, cfg = parse_config(config_parser(__doc__), argv)
    stats = embed_training_data(cfg, make_accelerator(cfg))
    print(json.dumps({k: v for k, v in stats.items() if k != "manifest"}))


if __name__ == "__main__":
    main()
