"""Run under torchrun by tests/test_train.py: a few DDP steps, then each rank saves its weights."""
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from Code.model_lung_infection.train import TrainConfig, train  # noqa: E402

if __name__ == "__main__":
    data, out = sys.argv[1], Path(sys.argv[2])
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    cfg = TrainConfig(train_path=[data], snapshot_root=str(out), train_save="ddp", backbone="timm:resnet18",
                      epoch=1, batchsize=4, trainsize=64, max_steps=2, progress=False)
    model = train(cfg)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ["RANK"])
    torch.save(model.state_dict(), out / f"rank{rank}.pth")
