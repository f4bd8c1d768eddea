"""Run under torchrun by tests/test_train.py and tests/test_gpu_path.py: DDP training, then each rank saves
its weights.

By default the release's encoder (res2net50_v1b_26w_4s, which keeps an unused classifier) at 96 px,
multi-scale (three updates per batch at 64, 96 and 128 px: at 64 px all three scales round to 64), two
batches per rank: what `torchrun MyTrain_LungInf.py` runs. A third argument, JSON, overrides TrainConfig
fields; each rank then also writes rank<R>.json: the size of every batch its training step saw, and the
torch RNG state a resumed run restored, and whether BatchNorm was synchronised.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from Code.model_lung_infection import engine as engine_module  # noqa: E402
from Code.model_lung_infection import train as train_module  # noqa: E402
from Code.model_lung_infection.train import TrainConfig, train  # noqa: E402

if __name__ == "__main__":
    data, out = sys.argv[1], Path(sys.argv[2])
    overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    torch.set_num_threads(1)
    seen = {"batches": [], "restored_rng": None}
    real_step, real_set_rng = train_module.multi_scale_step, engine_module.set_rng_state

    def recording_step(cfg):
        step = real_step(cfg)

        def recorded(engine, batch):
            seen["batches"].append(len(batch[0]))
            return step(engine, batch)
        return recorded

    def recording_set_rng(state):
        seen["restored_rng"] = state["torch"].tolist()
        real_set_rng(state)

    train_module.multi_scale_step, engine_module.set_rng_state = recording_step, recording_set_rng
    base = dict(train_path=[data], snapshot_root=str(out), train_save="ddp", backbone="res2net50_v1b_26w_4s",
                epoch=1, batchsize=2, trainsize=96, progress=False)
    cfg = TrainConfig(**{**base, **overrides})
    model = train(cfg)
    rank = os.environ["RANK"]
    torch.save(model.state_dict(), out / f"rank{rank}.pth")
    if overrides:
        seen["sync_bn"] = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        (out / f"rank{rank}.json").write_text(json.dumps(seen))
