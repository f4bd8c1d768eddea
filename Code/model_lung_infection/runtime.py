"""Device, precision, seeding and distributed set-up shared by every stage."""
import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device, enabled):
    """Mixed precision: float16 on CUDA, bfloat16 on CPU; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """RNG states in plain types, so checkpoints load with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU visible at save time; restore those that exist now (a run may resume
        # with fewer or more GPUs visible: the others keep their seeded state).
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


class Distributed:
    """What torchrun tells this process (world size 1 when run plainly)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def setup(self, device):
        """The device this process trains on: under torchrun, GPU LOCAL_RANK (torchrun decides the GPU
        of each process; restrict them with CUDA_VISIBLE_DEVICES); otherwise the one asked for,
        `cuda:N` included, made the current CUDA device."""
        if device.type == "cuda":
            index = self.local_rank if self.enabled else device.index
            if index is None:
                index = torch.cuda.current_device()
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def sync_buffers(self, model):
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP keeps parameters identical but each rank updates its BN statistics on its own data
        shard; syncing at epoch ends makes every rank hold the model rank 0 saves.
        """
        if self.enabled:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def cleanup(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
