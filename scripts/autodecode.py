"""Auto-decode a connector for an encoder the run never saw: optimise only a new cond embedding.

    python scripts/autodecode.py --encoder vit_small_patch16_224 --run RUN_DIR [key=value ...]
    (budget: autodecode.steps / autodecode.samples / autodecode.flops; init: autodecode.init=mean|same_width|random)
"""
import argparse
import json
from pathlib import Path

from hnet.autodecode import autodecode
from hnet.cli import main_guard
from hnet.config import ConfigError, load_config


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="timm name (zoo syntax, e.g. deit_tiny_patch16_224@depth=10)")
    parser.add_argument("--run", required=True, help="a hypernetwork run dir")
    parser.add_argument("--weights", help="pretrained | random | path to .safetensors/.pth (default: the run's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run: {run} is not a run dir (no config.yaml)")
    cfg = load_config(run / "config.yaml", args.overrides)
    result = autodecode(cfg, run, args.encoder, args.weights)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
