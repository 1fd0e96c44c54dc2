"""CC-595k layout (metadata.json or chat.json + images/) -> webdataset shards with a manifest."""
import argparse
import json

from hnet.cli import main_guard
from hnet.data.shards import make_shards


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metadata", required=True, help="metadata.json or chat.json")
    parser.add_argument("--images", required=True, help="folder the records' `image` paths are relative to")
    parser.add_argument("--out", required=True, help="output folder for NNNNNN.tar shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    manifest = make_shards(args.metadata, args.images, args.out, args.shard_size)
    print(json.dumps({"shards": len(manifest["shards"]), "samples": manifest["total"],
                      "skipped": len(manifest["skipped"]), "pattern": manifest["pattern"]}))


if __name__ == "__main__":
    main()
