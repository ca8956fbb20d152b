"""Not a test: one rank of a torchrun job that tests/test_distributed.py starts,
`torchrun --nproc-per-node N tests/ddp_worker.py CONFIG.json`. Trains per the TrainConfig
fields in CONFIG.json (a tiny model the CLI cannot describe) through maskrt's own `train`."""
import json
import sys

import torch

from maskrt.train.trainer import TrainConfig, train

if __name__ == "__main__":
    torch.set_num_threads(1)
    fields = json.loads(open(sys.argv[1]).read())
    stop = fields.pop("stop_after_steps", None)
    summary = train(TrainConfig(**fields), stop_after_steps=stop)
    print(json.dumps({"rank_summary": {k: summary[k] for k in ("step", "epoch", "world_size")}}))
