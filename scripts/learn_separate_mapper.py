"""Train one independent connector per encoder (the APE grid-search baseline), all batched in one step (on cached embeddings).

    accelerate launch scripts/learn_separate_mapper.py --config configs/cc595k_ie12.yaml [key=value ...]
"""
import json

from hnet.cli import config_parser, main_guard, parse_config
from hnet.run import train_run


@main_guard
def main(argv=None):
    _, cfg = parse_config(config_parser(__doc__), argv, method="separate")
    print(json.dumps(train_run(cfg)))


if __name__ == "__main__":
    main()
