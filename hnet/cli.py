"""Shared command-line plumbing: `--config CFG key=value ...`, and one clear line + exit code 2 on bad input."""
from __future__ import annotations

import argparse
import functools
import logging
import sys
import warnings

from hnet.config import Config, ConfigError, load_config
from hnet.data.cache import CacheError
from hnet.data.shards import DataError

USER_ERRORS = (ConfigError, DataError, CacheError)


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 train.max_steps=100")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv=None, **fixed) -> tuple[argparse.Namespace, Config]:
    args = parser.parse_args(argv)
    return args, load_config(args.config, args.overrides, **fixed)


# Libraries that report every checkpoint file and model load at INFO: a run's output keeps hnet's own lines,
# one progress bar per phase, and these libraries' warnings.
QUIET_LOGGERS = ("accelerate", "sentence_transformers", "transformers")


def quiet_libraries() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars, one per model load
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated")  # raised inside fvcore's tracer


def main_guard(fn):
    """Run a script's main: user errors print one line naming the field/file and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@main_guard
def train_script(method: str, description: str, argv=None) -> dict:
    """learn_multi_mapper.py / learn_separate_mapper.py: embed if needed, train, print the result as JSON."""
    import json

    from hnet.experiments.train_run import train_run

    _, cfg = parse_config(config_parser(description), argv, method=method)
    result = train_run(cfg)
    print(json.dumps(result))
    return result
