"""Auto-decode connectors for an encoder the run never saw: optimise only a new cond embedding.

    python scripts/autodecode.py --encoder vit_small_patch16_224 --run RUN_DIR [key=value ...]
    python scripts/autodecode.py --text-encoder all-MiniLM-L6-v2@layers=4 --run RUN_DIR [key=value ...]
    python scripts/autodecode.py --text-encoder all-mpnet-base-v2 --text-path DIR --run RUN_DIR  (a local folder)
    (--encoder: a new image encoder, paired with the run's text encoders; --text-encoder: a new text encoder,
    paired with the run's image encoders, for runs trained with several text encoders.
    budget: autodecode.steps / autodecode.samples / autodecode.flops; init: autodecode.init=mean|same_width|random)
"""
import argparse
import json
from pathlib import Path

from hnet import runs
from hnet.cli import main_guard
from hnet.config import ConfigError, load_config
from hnet.experiments.autodecode import autodecode
from hnet.text_folders import register_text_folder


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--encoder", help="image encoder: timm name (zoo syntax, e.g. deit_tiny_patch16_224@depth=10)")
    side.add_argument("--text-encoder", help="text encoder: sentence-transformers name (e.g. all-MiniLM-L6-v2@layers=4)"
                                             " or open_clip:ARCH/TAG")
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="a hypernetwork run dir (--run-dir under torchrun, which reads --run as its --run-path)")
    parser.add_argument("--weights", help="image encoder: pretrained | random | path to .safetensors/.pth "
                                          "(default: the run's)")
    parser.add_argument("--text-path", help="text encoder: a local sentence-transformers folder, known by the name "
                                            "--text-encoder gives it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / runs.CONFIG).is_file():
        raise ConfigError(f"--run: {run} is not a run dir (no config.yaml)")
    if args.text_encoder and args.weights:
        raise ConfigError("--weights: only for an image encoder (--encoder)")
    if args.text_path and not args.text_encoder:
        raise ConfigError("--text-path: only for a text encoder (--text-encoder NAME)")
    cfg = load_config(run / runs.CONFIG, args.overrides)
    if args.text_path:
        register_text_folder(args.text_encoder, args.text_path, "--text-path")
    text = args.text_encoder is not None
    result = autodecode(cfg, run, args.text_encoder if text else args.encoder, args.weights, text=text)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
