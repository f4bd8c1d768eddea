"""Device, precision, seeding and distributed set-up shared by every stage."""
import contextlib
import ctypes
import os
import platform
import random

import numpy as np
import torch
import torch.distributed as dist

from .errors import OptionError


def pick_device(name="auto"):
    """The torch.device `--device` names (auto: CUDA if present); a name that is no device, or a device
    this machine lacks, is an OptionError saying what there is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise OptionError(f"--device {name}: this machine has no usable CUDA GPU; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise OptionError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    return device


def cpu_has_native_bf16():
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is fast;
    elsewhere oneDNN emulates bf16 and it is slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Below this input side CPU bf16 training is not trusted: at 32 px, where Inf-Net's deepest maps are 1x1,
# bf16 autocast gave garbage weight gradients (1e36) in a reverse-attention convolution with PyTorch 2.14
# (fp32 was exact; 64 px and above matched run to run).
MIN_BF16_CPU_SIDE = 64


def training_precision(device, amp=None, channels_last=None, smallest_input=None):
    """(amp, channels_last) of a training run; None takes the default of `device`:
    CUDA: autocast, NCHW. A CPU with native bf16 (cpu_has_native_bf16): bf16 autocast, 3.3x faster
    than fp32 per epoch of the paper recipe there (with channels-last), and within the seed-to-seed
    spread of fp32's validation Dice at equal epochs and seed (docs/results.md), unless the run trains
    at a side below MIN_BF16_CPU_SIDE (`smallest_input`): fp32 then. Other CPUs: fp32 (their bf16 is
    emulated, slower than fp32). Every CPU: channels-last, which oneDNN's convolutions run faster in
    fp32 as well (a multi-scale step 1.30x for MobileNetV2, 1.08x for Res2Net-50 on a 2-core AVX2 CPU,
    bench/bench_infnet.py), with gradients as close to float64's as NCHW's."""
    large_enough = smallest_input is None or smallest_input >= MIN_BF16_CPU_SIDE
    fast_bf16 = device.type == "cpu" and cpu_has_native_bf16() and large_enough
    amp = (device.type == "cuda" or fast_bf16) if amp is None else bool(amp)
    channels_last = device.type == "cpu" if channels_last is None else bool(channels_last)
    return amp, channels_last


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def training_amp_dtype(device, name=None):
    """The autocast dtype of training (--amp_dtype; None: the device's): bfloat16 where the device computes
    it natively, since fp16 overflows in a forward pass (Inf-Net's partial decoder multiplies three feature
    maps) are beyond a GradScaler's reach; float16 (with the GradScaler) on GPUs without native bf16."""
    if name is not None:
        return AMP_DTYPES[name]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def inference_amp_dtype(device):
    """The test stage's autocast dtype: float16 on CUDA, bfloat16 on CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(device, enabled, dtype=None):
    """Mixed precision in `dtype`; None: `inference_amp_dtype`; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype or inference_amp_dtype(device))


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for the process to reuse; True where it did (glibc only).

    By default glibc maps every block above 32 MB (most activations of a training batch) from the kernel
    and unmaps it on free, so each step faults in fresh zeroed pages for the same tensors again (huge pages,
    cli.py, make those faults 512x fewer). Taking every block from the heap and never trimming it leaves no
    faults at all: a MobileNetV2 Inf-Net step (batch 24, three scales, fp32) on a 2-core CPU took
    18.3-18.9 s against 21.8-23.7 s with huge pages and 26.6-28.1 s with neither. But the heap fragments:
    over an hour of that training the process's peak reached 19.4 GB, against 11.8 GB for glibc's default
    (docs/results.md, "Memory the steps keep"). Opt-in (--keep_freed_memory); process-wide, and it lasts.
    The scripts turn huge pages off with it (cli.choose_cpu_allocator): their 2 MB alignment fragments it more."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def huge_pages_asked():
    """Whether PyTorch was told to back large CPU blocks with huge pages (the scripts' default, cli.py); it reads
    THP_MEM_ALLOC_ENABLE at its first tensor, which the scripts set before."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


def set_deterministic():
    """Deterministic kernels where PyTorch has them (--deterministic): cuDNN's, cuBLAS with a fixed
    workspace. The backward of bilinear interpolation and adaptive pooling has no deterministic CUDA
    kernel (it adds with atomics): those warn and stay as they are, so a CUDA run is reproducible only
    up to their rounding; on the CPU training is deterministic anyway."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


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
        self.owns_group = False  # whether setup created the process group (only then does cleanup end it)

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def setup(self, device):
        """The device this process trains on: under torchrun, GPU LOCAL_RANK (torchrun decides the GPU
        of each process; restrict them with CUDA_VISIBLE_DEVICES); otherwise the one asked for,
        `cuda:N` included, made the current CUDA device. More processes than GPUs share them round-robin,
        which only the gloo backend allows (INFNET_DDP_BACKEND=gloo; nccl, the CUDA default, refuses two
        processes on one GPU)."""
        if device.type == "cuda":
            index = self.local_rank % max(1, torch.cuda.device_count()) if self.enabled else device.index
            if index is None:
                index = torch.cuda.current_device()
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
        if self.enabled and not dist.is_initialized():
            default = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(os.environ.get("INFNET_DDP_BACKEND", default))
            self.owns_group = True
        return device

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others; [obj] without DDP."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

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
        """End the process group if this object created it: a group created by a caller (reproduce.py's one
        group for a whole table) outlives every training that reuses it (gloo cannot re-create it reliably)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
