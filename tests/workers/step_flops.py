"""One hypernetwork training step on this rank under torch's FlopCounterMode (tests/test_distributed.py runs it on
2 ranks and sums): what every rank computes, to check the ledger's formula at world 2.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/workers/step_flops.py OUT_DIR [local]
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hnet.config import HypernetConfig
from hnet.models.connectors import ConnectorShape
from hnet.models.losses import encoder_chunk, loss_and_surrogate
from hnet.models.stitch import StitchModel

N, BATCH = 3, 32


def main(out: str, local: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model on every rank, as DDP starts it
    model = StitchModel("hypernet", ConnectorShape("linear", "image_to_text", 48, 32), [48, 24, 40],
                        HypernetConfig(hidden=64, chunk_size=256))
    torch.manual_seed(1 + rank)  # each rank its own share of the global batch
    image = torch.randn(N, BATCH // world, 48)
    text = F.normalize(torch.randn(1, BATCH // world, 32), dim=-1)
    with FlopCounterMode(display=False) as counter:
        a, b, scale = model(torch.arange(N), image, text)
        _, surrogate = loss_and_surrogate(a, b, scale, encoder_chunk(BATCH), local=local)
        surrogate.backward()
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump({"rank": rank, "world": world, "flops": counter.get_total_flops()}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "local")
