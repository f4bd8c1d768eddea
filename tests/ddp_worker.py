"""Run under torchrun by tests/test_train.py: DDP training, then each rank saves its weights.

The release's encoder (res2net50_v1b_26w_4s, which keeps an unused classifier) at 96 px, multi-scale
(three updates per batch at 64, 96 and 128 px: at 64 px all three scales round to 64), two batches per rank:
what `torchrun MyTrain_LungInf.py` runs.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from Code.model_lung_infection.train import TrainConfig, train  # noqa: E402

if __name__ == "__main__":
    data, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    cfg = TrainConfig(train_path=[data], snapshot_root=str(out), train_save="ddp", backbone="res2net50_v1b_26w_4s",
                      epoch=1, batchsize=2, trainsize=96, progress=False)
    model = train(cfg)
    torch.save(model.state_dict(), out / f"rank{os.environ['RANK']}.pth")
