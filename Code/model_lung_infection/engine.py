"""The training engine every trainer shares: epochs, devices, DDP, AMP, snapshots, resume, logs.

A trainer supplies a model, a dataset, its optimizer/scheduler and a `step(batch)` function that
computes losses and calls `engine.optimize(loss)` (once, or once per scale for multi-scale steps).

Resume is exact on the CPU: the shuffle depends only on (seed, epoch) and the checkpoint written atomically
after every epoch holds the model, optimizer, scheduler, grad-scaler and every DDP rank's RNG states, and
the run's config, which `restore_config` gives back to a `--resume` that names only the run. On CUDA it is
close, not exact: some backward kernels (bilinear upsampling) add with atomics in a varying order, which
--deterministic (runtime.set_deterministic) cannot change.

Opt-in (RunConfig; off by default): `validate` (a trainer's held-out slices) scored every `val_every`
epochs, logged and written to <run>/val.csv (Dice against minutes); `time_budget` minutes of wall time
(resumed time included) after which the run ends as at its last epoch, and with `fit_budget` the run's epochs
and its schedule shrunk to end within them on a machine too slow for them (`fit_schedule`); `ema`, an
exponential moving average of the weights, used for validation and saved as <prefix>-ema-<epoch>.pth beside
the snapshots (the raw weights stay the training state; both are in checkpoint.pth).
"""
import copy
import csv
import dataclasses
import io
import json
import math
import os
import shlex
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .atomic import atomic_write
from .checkpoint import atomic_save, load_checkpoint, read_checkpoint, save_release_weights, to_cpu, unwrap
from .configs import RunConfig
from .data import fill_caches
from .errors import CheckpointError, OptionError, TrainingInterrupted, UserError
from .run_folder import (
    check_free_space,
    check_writable,
    lock_folder,
    release_folder,
    remove_stale_temporaries,
    run_files,
)
from .runtime import (
    Distributed,
    autocast,
    cpu_has_native_bf16,
    huge_pages_asked,
    keep_freed_memory,
    pick_device,
    rng_state,
    seed_everything,
    set_deterministic,
    set_rng_state,
    training_amp_dtype,
    training_precision,
)

# Options that may change between an interrupted run and its resumption: where the run is now, how
# long it goes (--epoch extends a finished run) and how this process runs (not what it computes; the
# precision too: a run started on a laptop's CPU may finish on a GPU, the resume line says what changed).
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "epoch", "progress", "num_workers", "max_steps", "device",
                               "snapshot_root", "train_save", "time_budget", "val_every", "amp", "amp_dtype",
                               "sync_bn", "deterministic", "keep_freed_memory"})
# Given for the session they hold in, never taken from the saved run: what the machine's memory allows, and the
# scripts choose the allocator from the command line before PyTorch allocates anything (cli.choose_cpu_allocator).
SESSION_OPTIONS = frozenset({"keep_freed_memory"})
# Given together: one given on resume resets the other to its default (--amp_dtype float16 means fp16 AMP).
PRECISION_OPTIONS = ("amp", "amp_dtype")
# Below this many samples per process, BatchNorm statistics of one GPU's share are noisy (without --sync_bn).
SMALL_BATCH_PER_GPU = 8


class TrainingDiverged(UserError):
    """The loss turned nan or inf: the run stops (the message says where and which checkpoint is kept)."""


VAL_COLUMNS = ("epoch", "minutes", "val_dice", "val_mae", "train_loss", "lr")


def check_run_folder(cfg, clear=True):
    """What trainers check first, before reading any data: the device exists; the run folder is this run's
    alone (locked: a second run on it stops, naming the first; a killed run's half-written files removed;
    --overwrite deletes the earlier run's files, with `clear`); never overwrite a run silently, never resume
    one that is not there. Trainers call it with clear=False first and let Engine clear: a typo in the data,
    --init or --pretrained must not cost the earlier run."""
    pick_device(cfg.device)
    main = Distributed().is_main  # torchrun's other ranks work for rank 0, which holds the lock
    if main:
        for folder in (cfg.run_dir, tensorboard_dir(cfg)):
            check_writable(folder, "--snapshot_root")
        lock_folder(cfg.run_dir)
        remove_stale_temporaries(cfg.run_dir)
    earlier = run_files(cfg.run_dir, [cfg.snapshot_prefix])
    if earlier and not (cfg.resume or cfg.overwrite):
        what = (f"{cfg.checkpoint_path} exists" if cfg.checkpoint_path.exists() else
                f"{cfg.run_dir} holds another run's files ({', '.join(p.name for p in earlier[:3])})")
        raise FileExistsError(f"{what}: pass --resume to continue that run, --overwrite to delete it and start "
                              f"again, or choose another --train_save")
    if cfg.resume and not cfg.checkpoint_path.exists():
        read_training_checkpoint(cfg.checkpoint_path)  # the error that says what to do
    if cfg.overwrite and main and clear:
        _clear_earlier_run(cfg)


def tensorboard_dir(cfg):
    return Path(cfg.snapshot_root) / "tensorboard" / cfg.train_save


def _clear_earlier_run(cfg):
    """--overwrite: delete what an earlier run wrote here (checkpoint, snapshots of its prefix and ours,
    val.csv, TensorBoard events), so that the folder holds only the new run's."""
    prefixes = {cfg.snapshot_prefix}
    try:
        prefixes.add(read_training_checkpoint(cfg.checkpoint_path, mmap=True)["config"]["snapshot_prefix"])
    except (CheckpointError, FileNotFoundError, KeyError, TypeError):
        pass  # none, or unreadable: the snapshots of our prefix go
    events = sorted(tensorboard_dir(cfg).glob("events.out.tfevents.*"))
    removed = run_files(cfg.run_dir, sorted(prefixes)) + events
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        print(f"[train] --overwrite: deleted {len(removed)} file(s) of the earlier run in {cfg.run_dir} "
              f"({', '.join(p.name for p in removed[:4])}{', ...' if len(removed) > 4 else ''})", flush=True)


def read_training_checkpoint(path, mmap=False):
    """A run's checkpoint.pth for --resume; a missing, truncated or foreign file is one error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}: start the run without --resume "
                                f"(or give the --train_save/--snapshot_root of the run to continue)")
    try:
        state = read_checkpoint(path, mmap=mmap)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; start the run again with --overwrite") from e
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "rng") if not isinstance(state, dict)
               or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (no {', '.join(missing)}; release weights "
                              f"start a run with --init); start the run again with --overwrite")
    return state


def training_seconds(path):
    """Wall seconds a run has trained, every resumed session included (its checkpoint.pth's record);
    0 for a run that left no checkpoint.pth."""
    if not Path(path).is_file():
        return 0.0
    return float(read_training_checkpoint(path, mmap=True).get("elapsed_s", 0.0))


def restore_config(config_class, path, given):
    """The config `path` (a checkpoint.pth) was trained with, for --resume.

    `given`: {field: value} of the options given explicitly on the command line. One that differs
    from the saved run is an error naming it, except RESUMABLE_CHANGES, which win. A run that --fit_budget
    fitted is compared with its plan (the command it was started with); a --epoch given is the new plan."""
    saved = _saved_config(path)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    given = json.loads(json.dumps(given, default=str))  # as the checkpoint stores them (tuples as lists)
    plan = dict(saved.get("planned_schedule") or {})
    started_with = {**saved, **plan}
    for name, value in given.items():
        if name in started_with and name not in RESUMABLE_CHANGES and started_with[name] != value:
            raise UserError(f"--{name} {_show(value)} differs from {_show(started_with[name])}, which the run in "
                            f"{path} was started with: drop --{name} to continue that run, or start a new one "
                            f"(another --train_save, or --overwrite)")
    values = {k: _as_field(fields[k], v) for k, v in saved.items() if k in fields and k not in SESSION_OPTIONS}
    if any(k in given for k in PRECISION_OPTIONS):
        values.update({k: None for k in PRECISION_OPTIONS if k in fields})
    values.update({k: v for k, v in given.items() if k in RESUMABLE_CHANGES and k in fields})
    if plan and "epoch" in given:
        values.update(planned_schedule={**plan, "epoch": given["epoch"]})
    values.update(resume=True, overwrite=False)
    return config_class(**values)


def resume_options(config_class, path, given):
    """{field: value} to build a resumed run's config from: the options the run in `path` (a checkpoint.pth) holds,
    the `given` ones over them, so that checks across options see the run's, not the defaults (restore_config
    then compares the given ones with the run's)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    saved = {k: _as_field(fields[k], v) for k, v in _saved_config(path).items()
             if k in fields and k not in SESSION_OPTIONS}
    return {**saved, **given, "resume": True}


def _saved_config(path):
    saved = read_training_checkpoint(path, mmap=True).get("config")
    if not isinstance(saved, dict) or not saved:
        raise CheckpointError(f"{path}: holds no run config to resume from: start the run again with --overwrite")
    return saved


def _show(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _as_field(field, value):
    # JSON gave lists back; fields whose default is a tuple (scales) take tuples again.
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value


def resume_command(cfg, world_size=1):
    """The command that continues `cfg`'s run (restore_config gives back every other option)."""
    launcher = ["python"]
    if world_size > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        launcher = ["torchrun", f"--nproc_per_node={per_node}"] + (
            [f"--nnodes={world_size // per_node}"] if per_node != world_size else [])
    args = [cfg.SCRIPT, "--resume", "--train_save", cfg.train_save]
    if cfg.snapshot_root != RunConfig.snapshot_root:
        args += ["--snapshot_root", cfg.snapshot_root]
    return shlex.join(launcher + args)


def check_global_batch(batchsize, world_size):
    """The global --batchsize must split evenly over the DDP processes: refused otherwise, not rounded,
    since the batch (and the lr chosen for it) is the recipe's, and unequal per-process batches would
    weigh samples unequally in DDP's gradient average."""
    if world_size > 1 and batchsize % world_size:
        fits = [n for n in range(2, batchsize + 1) if batchsize % n == 0]
        fewer, more = [n for n in fits if n < world_size][-1:], [n for n in fits if n > world_size][:1]
        lower = batchsize // world_size * world_size
        batches = " or ".join(str(b) for b in (lower, lower + world_size) if b)
        raise OptionError(f"--batchsize {batchsize} (the global batch) does not split evenly over {world_size} "
                          f"processes: give a multiple of {world_size} ({batches}), or run "
                          f"{' or '.join(map(str, fewer + more)) or 'one'} process(es)")


def use_sync_bn(sync_bn, device, world_size):
    """Whether BatchNorm is synchronised over the DDP processes (--sync_bn; None: on for CUDA DDP), so that
    each normalises over the global batch as the paper's single GPU did, not over its share of it.
    PyTorch's SyncBatchNorm runs on GPUs only: asking for it on the CPU is an error."""
    if world_size <= 1:
        return False
    if sync_bn and device.type != "cuda":
        raise OptionError(f"--sync_bn: PyTorch's SyncBatchNorm runs on GPUs only, not on {device.type}; "
                          f"drop --sync_bn (each process then normalises over its share of the batch)")
    return device.type == "cuda" if sync_bn is None else bool(sync_bn)


def precision_name(amp, dtype):
    """'fp32', 'bf16 autocast' or 'fp16 autocast + GradScaler': said in the logs and saved in checkpoint.pth."""
    if not amp:
        return "fp32"
    return "fp16 autocast + GradScaler" if dtype == torch.float16 else "bf16 autocast"


class Engine:
    def __init__(self, cfg: RunConfig, model):
        self.cfg = cfg
        # on every rank before any process group exists: an error stops them all; --overwrite clears here,
        # once the data and the model's weights (--init, --pretrained) have been read
        check_run_folder(cfg)
        self.ddp = Distributed()
        check_global_batch(cfg.batchsize, self.ddp.world_size)
        if cfg.deterministic:
            set_deterministic()
        self.device = self.ddp.setup(pick_device(cfg.device))
        self.amp, self.channels_last, self.amp_dtype = self._precision()
        self.keeps_freed_memory = self._keep_freed_memory()
        self.model = model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.sync_bn = use_sync_bn(cfg.sync_bn, self.device, self.ddp.world_size)
        if self.sync_bn:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # the same parameters
        per_process = cfg.batchsize // self.ddp.world_size
        if self.ddp.enabled and not self.sync_bn and per_process < SMALL_BATCH_PER_GPU and self.ddp.is_main:
            warnings.warn(f"each of the {self.ddp.world_size} processes normalises BatchNorm over its own "
                          f"{per_process} sample(s) of the batch of {cfg.batchsize} (one GPU: over all of them)"
                          f"{'; --sync_bn normalises over the global batch' if self.device.type == 'cuda' else ''}")
        # DDP reduces the gradients of parameters that require them; frozen ones (the release's unused
        # classifier, encoders.py) are neither reduced nor waited for.
        self.net = DistributedDataParallel(self.model) if self.ddp.enabled else self.model
        if self.ddp.enabled:
            # Every rank built the same initial weights (DDP also broadcasts rank 0's); from here on each
            # draws its own random numbers (dropout masks), reproducibly.
            seed_everything(cfg.seed + self.ddp.rank)
        self.optimizer = self.scheduler = None
        # The averaged weights (--ema): a frozen copy, updated after every optimizer update.
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema else None
        self._ema_pairs = None
        self.batch_index = 0  # the batch within the epoch (augment.batch_generator's seed)
        # fp16's narrow range needs loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)

    def _keep_freed_memory(self):
        """--keep_freed_memory: CPU training only (a GPU's activations are not malloc's), on glibc."""
        if not self.cfg.keep_freed_memory or self.device.type != "cpu":
            return False
        if not keep_freed_memory():
            warnings.warn("--keep_freed_memory: this C library is not glibc, whose malloc it tunes; ignored",
                          stacklevel=2)
            return False
        return True

    def _precision(self):
        """(amp, channels_last, autocast dtype or None): --amp_dtype implies --amp."""
        cfg = self.cfg
        if cfg.amp is False and cfg.amp_dtype:
            raise OptionError(f"--amp_dtype {cfg.amp_dtype} with --amp False: drop one of them")
        amp = True if cfg.amp is None and cfg.amp_dtype else cfg.amp
        amp, channels_last = training_precision(self.device, amp, cfg.channels_last, cfg.smallest_input())
        dtype = training_amp_dtype(self.device, cfg.amp_dtype) if amp else None
        if self.device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
            warnings.warn("--amp on a CPU without native bf16 (AVX512-BF16 or AMX): oneDNN emulates bf16, and a "
                          "training step takes many times fp32's (12x for Res2Net-50 on a 2-core AVX2 CPU, "
                          "bench/bench_infnet.py); leave --amp unset to get fp32 here", stacklevel=2)
        return amp, channels_last, dtype

    @property
    def precision(self):
        return precision_name(self.amp, self.amp_dtype)

    # ---- what a trainer's step uses ----
    def autocast(self):
        return autocast(self.device, self.amp, self.amp_dtype)

    def images(self, x):
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def to_device(self, *tensors):
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def optimize(self, loss):
        """One optimizer update from `loss`: backward (scaled under fp16), clip by value, step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.cfg.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema_model is not None:
            self._update_ema()

    @torch.no_grad()
    def _update_ema(self):
        if self._ema_pairs is None:  # state-dict tensors share storage with the modules: pair them once
            pairs = list(zip(self.ema_model.state_dict().values(), self.model.state_dict().values()))
            floats = [(a, c) for a, c in pairs if a.is_floating_point()]
            self._ema_pairs = ([a for a, _ in floats], [c for _, c in floats],
                               [(a, c) for a, c in pairs if not a.is_floating_point()])
        averaged, current, counters = self._ema_pairs
        torch._foreach_lerp_(averaged, current, 1 - self.cfg.ema)  # one fused update of every weight
        for a, c in counters:  # BatchNorm's batch counters
            a.copy_(c)

    def eval_model(self):
        """The weights validation scores: the average under --ema, else the model as trained."""
        return self.ema_model if self.ema_model is not None else self.model

    def elapsed_minutes(self):
        """Wall time of the run so far, resumed runs' earlier time included."""
        return (self.elapsed_before + self._now() - self.started) / 60

    def _now(self):
        """The clock of --time_budget and --fit_budget (seconds)."""
        return time.perf_counter()

    # ---- the loop ----
    def fit(self, dataset, optimizer, scheduler, step, describe="", validate=None, sampler=None):
        """Run epochs; `step(engine, batch)` returns {name: loss tensor} to log (the first is the total).

        `sampler` (with `set_epoch`, sharded over the DDP ranks) chooses each epoch's samples; by default
        every sample once per epoch, or cfg.epoch_samples of them (EpochSliceSampler).

        `validate(model, device, amp)` -> {"dice": ..., ...}: called every cfg.val_every epochs (and at
        the last) on the main process with `eval_model()`; its figures go to stdout, TensorBoard and val.csv."""
        cfg, ddp = self.cfg, self.ddp
        self.optimizer, self.scheduler, self.validate = optimizer, scheduler, validate
        self.started, self.elapsed_before = self._now(), 0.0
        start_epoch = self._resume() if cfg.resume else 1
        self.val_rows = self._val_rows(start_epoch) if validate is not None and ddp.is_main else []
        if sampler is None:
            sampler = (EpochSliceSampler(len(dataset), cfg.epoch_samples, ddp.world_size, ddp.rank, cfg.seed)
                       if cfg.epoch_samples else
                       DistributedSampler(dataset, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True,
                                          seed=cfg.seed))
        workers = cfg.num_workers if cfg.num_workers is not None else (4 if self.device.type == "cuda" else 0)
        if workers:
            fill_caches(dataset, workers)  # once, here: the workers fork after and share it
        loader = DataLoader(dataset, batch_sampler=NoSingleSampleBatches(sampler, cfg.batchsize // ddp.world_size),
                            num_workers=workers, pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        writer = _tensorboard(cfg) if ddp.is_main else None
        # a resumed run whose budget is used up trains nothing (checked on every rank: a broadcast)
        budget_spent = cfg.resume and start_epoch <= cfg.epoch and self._budget_spent()
        if ddp.is_main and start_epoch > cfg.epoch:
            print(f"[train] {cfg.run_dir} has finished epoch {start_epoch - 1}, and --epoch is {cfg.epoch}: "
                  f"nothing to train (give a larger --epoch to extend the run)", flush=True)
        elif budget_spent:
            if ddp.is_main:
                print(f"[train] {cfg.run_dir} has used {self.elapsed_minutes():.1f} of its --time_budget "
                      f"{cfg.time_budget:g} minutes: nothing to train (give a larger --time_budget to extend "
                      f"the run)", flush=True)
        elif ddp.is_main:
            budget = f"; {cfg.epoch_samples} samples per epoch" if cfg.epoch_samples else ""
            print(f"[train] {len(dataset)} samples{describe}{budget}; device {self.device}"
                  f"{' x' + str(ddp.world_size) if ddp.enabled else ''}{'; sync_bn' if self.sync_bn else ''}; "
                  f"{self.precision}{', channels-last' if self.channels_last else ''}"
                  f"{', malloc keeps freed memory' if self.keeps_freed_memory else ''}"
                  f"{', huge pages' if self.device.type == 'cpu' and huge_pages_asked() else ''}; "
                  f"epochs {start_epoch}..{cfg.epoch}; batch {cfg.batchsize}; saving to {cfg.run_dir}", flush=True)
        self.saved_epoch = start_epoch - 1 if cfg.resumable else None
        self.epoch, self.last_snapshot = start_epoch, None
        self._epoch_ends = []  # --fit_budget's clock: when each epoch of this session ended
        if cfg.fit_budget and cfg.planned_schedule is None:  # kept in the checkpoint: the plan, not the fit
            cfg.planned_schedule = {k: getattr(cfg, k) for k in ("epoch", *cfg.schedule_marks())}
        try:
            if not budget_spent and start_epoch <= cfg.epoch:
                if ddp.is_main:  # a full disk: said now, not after the first epoch
                    check_free_space(cfg.run_dir, self._bytes_per_save(), "a checkpoint and the snapshots of an epoch")
                self._epochs(loader, sampler, step, writer, start_epoch)
                if ddp.is_main:
                    print(self._finished_line(), flush=True)
        except KeyboardInterrupt as e:
            raise TrainingInterrupted(self._interrupted_message(self.epoch)) from e
        except RuntimeError as e:  # out of memory (CUDA's OutOfMemoryError, or the CPU allocator's): one line
            if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
                raise
            raise UserError(f"out of memory in epoch {self.epoch}, batch {self.batch_index + 1} on {self.device} "
                            f"({str(e).split('.')[0]}): lower --batchsize or --trainsize"
                            f"{' (or give --keep_freed_memory False)' if self.keeps_freed_memory else ''}") from e
        finally:
            if writer:
                writer.close()
            ddp.cleanup()
            if ddp.is_main:
                release_folder(cfg.run_dir)
        return unwrap(self.model)

    def _finished_line(self):
        """The run's last line: the epoch it ended at (and the plan, where --fit_budget or --time_budget ended it
        earlier), its minutes (a resumed run's earlier sessions included) and the weights to test."""
        cfg = self.cfg
        planned = (cfg.planned_schedule or {}).get("epoch", cfg.epoch)
        plan = f" of the {planned} planned" if self.epoch < planned else ""
        weights = f"; weights {self.last_snapshot}" if self.last_snapshot else ""
        return f"[train] finished at epoch {self.epoch}{plan} after {self.elapsed_minutes():.1f} minutes{weights}"

    def _bytes_per_save(self):
        """About what one epoch's saves write (checkpoint.pth with two optimizer states per parameter, as
        Adam keeps, and the snapshots, each with --ema's copy) plus 5 percent: the room a save needs beside
        the previous checkpoint, which stays until the new one is complete."""
        model = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        params = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        copies = 2 if self.ema_model is not None else 1
        checkpoint = model * copies + 2 * params if self.cfg.resumable else 0
        return int(1.05 * (checkpoint + model * copies))

    def _epochs(self, loader, sampler, step, writer, start_epoch):
        cfg, ddp = self.cfg, self.ddp
        steps, epoch = 0, start_epoch
        while epoch <= cfg.epoch:  # --fit_budget may lower cfg.epoch during the run
            self.epoch = epoch
            self.net.train()
            sampler.set_epoch(epoch)
            meter = _Meter()
            bar = _progress(loader, cfg.progress and ddp.is_main, f"epoch {epoch}/{cfg.epoch}")
            for self.batch_index, batch in enumerate(bar):
                # each loss read once (on CUDA every float() waits for the GPU): checked, logged, shown
                terms = {k: float(v) for k, v in step(self, batch).items()}
                self._check_finite(terms, len(loader))
                meter.update(terms, len(batch[0]))
                if bar is not loader:
                    bar.set_postfix(loss=f"{next(iter(terms.values())):.4f}")
                steps += 1
                if cfg.max_steps and steps >= cfg.max_steps:
                    break
            lr = self.optimizer.param_groups[0]["lr"]  # the lr this epoch trained with
            self._fit_to_budget(epoch)  # before the scheduler sets the next epoch's lr
            self.scheduler.step()
            ddp.sync_buffers(self.model)
            if self.ema_model is not None:
                ddp.sync_buffers(self.ema_model)
            if ddp.is_main:
                self._log_epoch(epoch, meter, writer, lr)
            budget_spent = self._budget_spent()  # this epoch is the run's last: validate it too
            if ddp.is_main and self.validate is not None and (
                    epoch % cfg.val_every == 0 or epoch == cfg.epoch or budget_spent):
                self._validate(epoch, meter, lr, writer)
            budget_spent = budget_spent or self._budget_spent()  # validation time counts
            rng = ddp.gather(rng_state()) if cfg.resumable else None  # every rank's own (all ranks take part)
            if ddp.is_main:
                self._save_epoch(epoch, last=budget_spent, rng=rng)
            if cfg.resumable:
                self.saved_epoch = epoch
            ddp.barrier()
            if budget_spent:
                if ddp.is_main and epoch < cfg.epoch:
                    print(f"[train] time budget of {cfg.time_budget:g} minutes reached after epoch {epoch} "
                          f"({self.elapsed_minutes():.2f} minutes): stopping", flush=True)
                break
            if cfg.max_steps and steps >= cfg.max_steps:
                break
            epoch += 1

    def _from_rank0(self, value):
        """Rank 0's `value` (a number) on every rank: decisions on wall time agree though the clocks differ."""
        if not self.ddp.enabled:
            return value
        import torch.distributed as dist
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.item()

    def _budget_spent(self):
        """Whether --time_budget is used up; rank 0 decides for every rank."""
        if self.cfg.time_budget is None:
            return False
        return bool(self._from_rank0(self.elapsed_minutes() >= self.cfg.time_budget))

    def _fit_to_budget(self, epoch):
        """--fit_budget: from this session's second epoch on, the epochs that fit --time_budget (epochs_that_fit:
        from the pace since the end of its first, the first's set-up left out; validation and saving counted),
        and the run's end moved there (fit_schedule), never past the planned --epoch: a schedule planned on a
        faster machine ends within the budget, both of Semi-Inf-Net's steps and the whole cosine, instead of
        being cut off. The estimate is redone after every epoch, so a slow early epoch (a busy machine) is made
        up for later, and a resumed run on a faster machine may win back, up to the plan (cfg.planned_schedule),
        the epochs that an earlier, slower session fitted away. Rank 0's clock decides for every rank."""
        cfg = self.cfg
        if not (cfg.fit_budget and cfg.time_budget):
            return
        self._epoch_ends.append(self._now())
        if len(self._epoch_ends) < 2:
            return
        durations = [b - a for a, b in zip(self._epoch_ends, self._epoch_ends[1:])]
        left = cfg.time_budget * 60 - self.elapsed_minutes() * 60
        planned = cfg.planned_schedule["epoch"]
        last = min(planned, int(self._from_rank0(epoch + epochs_that_fit(durations, left))))
        # the pace's jitter would move the end (and the marks with it) back and forth by an epoch or two: a move
        # smaller than a few epochs waits, outward always, inward until the end is that near, where a later
        # estimate would be too late to keep the run within the budget
        band = max(1, planned // 50)
        if abs(last - cfg.epoch) < band and (last >= cfg.epoch or cfg.epoch - epoch > band):
            return
        changed = fit_schedule(cfg, epoch, last, cfg.planned_schedule)
        if changed and self.ddp.is_main:
            pace = sum(durations) / len(durations)
            marks = "".join(f", {k} {a} -> {b}" for k, (a, b) in changed.items() if k != "epoch")
            print(f"[train] --fit_budget: at {pace / 60:.2f} minutes per epoch the {planned} planned epochs take "
                  f"{self.elapsed_minutes() + (planned - epoch) * pace / 60:.0f} minutes, and --time_budget is "
                  f"{cfg.time_budget:g}: the run now ends at epoch {cfg.epoch}{marks}", flush=True)

    def _validate(self, epoch, meter, lr, writer):
        scores = self.validate(self.eval_model(), self.device, self.amp)
        minutes = self.elapsed_minutes()
        loss = next(iter(meter.means().values()), float("nan"))
        print(f"[val] epoch {epoch:03d} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()) +
              f"{' (ema)' if self.ema_model is not None else ''} | {minutes:.2f} min", flush=True)
        if writer:
            for k, v in scores.items():
                writer.add_scalar(f"val_{k}", v, epoch)
            writer.add_scalar("val_minutes", minutes, epoch)
            writer.flush()
        figures = {"dice": scores["dice"], "mae": scores.get("mae", float("nan")), **scores}
        self.val_rows.append({"epoch": epoch, "minutes": f"{minutes:.4f}",
                              **{f"val_{k}": f"{v:.6f}" for k, v in figures.items()},
                              "train_loss": f"{loss:.6f}", "lr": f"{lr:.6g}"})
        write_val_csv(self.cfg.run_dir / "val.csv", self.val_rows)

    def _val_rows(self, start_epoch):
        """The rows of val.csv the run keeps: those of epochs already saved (a resumed run redoes the rest)."""
        path = self.cfg.run_dir / "val.csv"
        if not self.cfg.resume or not path.is_file():
            return []
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if int(row["epoch"]) < start_epoch]

    def _check_finite(self, terms, batches):
        """A loss that turned nan/inf stops the run before its NaN weights are saved: where, what is kept."""
        bad = ", ".join(f"{k} {v}" for k, v in terms.items() if not math.isfinite(v))
        if not bad:
            return
        cfg = self.cfg
        where = f"the loss became non-finite ({bad}) in epoch {self.epoch}, batch {self.batch_index + 1} of {batches}"
        if self.saved_epoch is None:
            kept = "this run keeps no checkpoint (resumable=False)"
        elif self.saved_epoch == 0:
            kept = "no epoch was finished, nothing is saved"
        else:
            kept = f"{cfg.checkpoint_path} keeps epoch {self.saved_epoch}, the last good one"
        raise TrainingDiverged(f"{where}: training stopped; {kept}; start again (--overwrite) with a lower --lr or "
                               f"gradient clipping (--clip), or check the data")

    def _interrupted_message(self, epoch):
        cfg = self.cfg
        stopped = f"training stopped in epoch {epoch} of {cfg.epoch}"
        if self.saved_epoch is None:
            return f"{stopped}; this run keeps no checkpoint (resumable=False): start it again"
        if self.saved_epoch == 0:
            return f"{stopped}; no epoch was finished, nothing is saved: run the same command to start again"
        return (f"{stopped}; {cfg.checkpoint_path} holds epoch {self.saved_epoch}; continue with: "
                f"{resume_command(cfg, self.ddp.world_size)}")

    def _resume(self):
        state = read_training_checkpoint(self.cfg.checkpoint_path)
        load_checkpoint(self.model, state["model"], name=self.cfg.checkpoint_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # A disabled GradScaler saves {} (fp32, bf16): an fp16 run resumed from one starts a fresh scale,
        # and an fp16 run's scale is not needed by one without fp16.
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if self.ddp.rank < len(ranks):
            set_rng_state(ranks[self.ddp.rank])  # this rank's own; a rank the run did not have keeps its seed
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if self.ema_model is not None:
            if "ema" in state:
                load_checkpoint(self.ema_model, state["ema"], name=self.cfg.checkpoint_path)
            else:
                warnings.warn(f"{self.cfg.checkpoint_path} holds no averaged weights: --ema starts from the model's")
                self.ema_model.load_state_dict(unwrap(self.model).state_dict())
        changed = {k: (v, self.cfg.as_dict()[k]) for k, v in state.get("config", {}).items()
                   if k in self.cfg.as_dict() and k not in RESUMABLE_CHANGES and self.cfg.as_dict()[k] != v}
        if changed:
            warnings.warn("resuming with options that differ from the checkpoint's: " +
                          ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if self.ddp.is_main:
            saved = state.get("precision", self.precision)
            change = f"; precision {saved} -> {self.precision}" if saved != self.precision else ""
            print(f"[train] resumed {self.cfg.checkpoint_path} after epoch {state['epoch']}{change}", flush=True)
        return state["epoch"] + 1

    def _log_epoch(self, epoch, meter, writer, lr):
        cfg = self.cfg
        losses, ips = meter.means(), meter.per_second()
        peak = (f", peak {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
                if self.device.type == "cuda" else "")
        print(f"[train] epoch {epoch:03d}/{cfg.epoch} lr {lr:.2e} " +
              " ".join(f"{k} {v:.4f}" for k, v in losses.items()) +
              f" | {ips:.2f} samples/s, {meter.seconds():.1f} s{peak}", flush=True)
        if writer:
            for k, v in losses.items():
                writer.add_scalar(f"loss/{k}", v, epoch)
            writer.add_scalar("lr", lr, epoch)
            writer.add_scalar("samples_per_second", ips, epoch)
            writer.flush()

    def _save_epoch(self, epoch, last=False, rng=None):
        """Snapshots every save_every epochs and at the last (`last`: the time budget ends the run here);
        the resumable checkpoint (`rng`: every rank's RNG states, rank 0's first). Tensors are saved from
        the CPU, so that a plain torch.load reads them on a machine without the GPU. A disk that fills up
        meanwhile is one line saying what is kept."""
        try:
            self._write_epoch(epoch, last, rng)
        except (OSError, RuntimeError) as e:  # torch.save says "unexpected pos" on a full disk
            try:
                check_free_space(self.cfg.run_dir, self._bytes_per_save(), f"epoch {epoch}'s checkpoint and snapshots")
            except UserError as full:
                kept = (f"; {self.cfg.checkpoint_path} still holds epoch {self.saved_epoch}"
                        if self.saved_epoch else "")
                raise UserError(f"epoch {epoch} could not be saved: {full}{kept}") from e
            raise

    def _write_epoch(self, epoch, last, rng):
        cfg = self.cfg
        if epoch % cfg.save_every == 0 or epoch == cfg.epoch or last:
            self.last_snapshot = cfg.run_dir / f"{cfg.snapshot_prefix}-{epoch}.pth"
            save_release_weights(self.model, self.last_snapshot)
            if self.ema_model is not None:
                save_release_weights(self.ema_model, cfg.run_dir / f"{cfg.snapshot_prefix}-ema-{epoch}.pth")
        if cfg.resumable:
            rng = rng or [rng_state()]
            state = {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "epoch": epoch, "rng": rng[0], "rng_ranks": rng, "config": cfg.as_dict(),
                     "precision": self.precision, "elapsed_s": self.elapsed_minutes() * 60}
            if self.ema_model is not None:
                state["ema"] = self.ema_model.state_dict()
            atomic_save(to_cpu(state), cfg.checkpoint_path)


def epochs_that_fit(durations, left, recent=10):
    """How many more epochs end within `left` seconds, given the `durations` (s) of the epochs so far: each at
    their mean pace but the last, which is given the time of the slowest of the `recent` ones. The run's last
    epoch validates and saves, and the pace can drift up late in a run; at the mean alone, the last epoch of an
    hour ran past it (docs/results.md, "The same kind of machine, two seeds")."""
    pace = sum(durations) / len(durations)
    last_one = max(pace, *durations[-recent:])
    return 0 if left < last_one else 1 + int((left - last_one) // pace)


def fit_schedule(cfg, done, last, start):
    """Make the run of `cfg` (IN PLACE) end at epoch `last`, kept between `done` (the epochs trained) and its
    planned end (`start`: the plan's {field: value}, `epoch` among them); each of its schedule_marks() not yet
    reached moves with it, in proportion to its planned value: Semi-Inf-Net's two steps keep their shares, the lr
    schedule spans the run. Returns {field: (before, after)} of what changed, {} when nothing did."""
    last = min(max(done, last), start["epoch"])
    if last == cfg.epoch:
        return {}
    changed = {"epoch": (cfg.epoch, last)}
    cfg.epoch = last
    for name in cfg.schedule_marks():
        value = getattr(cfg, name)
        if value > done:  # reached marks stay where the run passed them
            moved = min(start[name], max(done, round(start[name] * last / start["epoch"])))
            if moved != value:
                changed[name] = (value, moved)
                setattr(cfg, name, moved)
    return changed


def write_val_csv(path, rows):
    """val.csv (VAL_COLUMNS, then any further val_ figures a validator gives, e.g. the multi-class one's per
    class), rewritten whole and atomically: a crash leaves the previous version."""
    text = io.StringIO()
    extra = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in VAL_COLUMNS]
    columns = list(VAL_COLUMNS[:4]) + extra + list(VAL_COLUMNS[4:])
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


class NoSingleSampleBatches(torch.utils.data.Sampler):
    """Batches of `batch_size` indices from `sampler`, where a last batch of one sample left over from larger
    ones is merged into the batch before it: BatchNorm cannot normalise a single sample's 1x1 map
    (DeepLabV3+'s ASPP pooling) and a single sample's statistics are noise. Every sample is still seen;
    every DDP rank draws as many samples, so all have as many batches. (A --batchsize of one per process
    is the user's choice, kept.)"""

    def __init__(self, sampler, batch_size):
        self.sampler, self.batch_size = sampler, max(1, batch_size)

    def __iter__(self):
        indices = list(self.sampler)
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1 and self.batch_size > 1:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return iter(batches)

    def __len__(self):
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + bool(rest) - (rest == 1 and full > 0 and self.batch_size > 1)


class EpochSliceSampler(torch.utils.data.Sampler):
    """Epoch e visits samples [(e-1)n, en) of an endless sequence of seeded shuffles of the set.

    Consecutive epochs cover the set before any sample repeats, so a CPU budget of k epochs of n
    samples sees k*n distinct slices (up to the set size); the order depends only on (seed, epoch),
    so a resumed run continues where it stopped. Shards the epoch over DDP ranks.
    """

    def __init__(self, size, samples, world_size=1, rank=0, seed=0):
        self.size, self.samples, self.world_size, self.rank, self.seed = size, samples, world_size, rank, seed
        self.epoch = 1

    def set_epoch(self, epoch):
        self.epoch = epoch

    def epoch_indices(self):
        start, stop = (self.epoch - 1) * self.samples, self.epoch * self.samples
        out = []
        for sweep in range(start // self.size, (stop - 1) // self.size + 1):
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + sweep)).tolist()
            lo, hi = max(start - sweep * self.size, 0), min(stop - sweep * self.size, self.size)
            out += order[lo:hi]
        return out

    def __iter__(self):
        indices = self.epoch_indices()
        padded = (indices * (-(-len(self) * self.world_size // len(indices))))[:len(self) * self.world_size]
        return iter(padded[self.rank::self.world_size])

    def __len__(self):
        return -(-self.samples // self.world_size)  # per rank, the same on every rank


class PretrainSampler(torch.utils.data.Sampler):
    """Over ConcatDataset([train set, pretrain set]): epochs 1..cfg.pretrain_epochs visit `samples` slices of
    the pretrain set (continuing through seeded shuffles of it, as EpochSliceSampler), later epochs the
    train set. Every epoch has the same length, so epochs cost the same and the lr schedule, --time_budget
    and --resume count them as usual. `cfg.pretrain_epochs` is read at every epoch: --fit_budget may shrink it."""

    def __init__(self, train_size, pretrain_size, cfg, samples, world_size=1, rank=0, seed=0):
        self.cfg, self.offset = cfg, train_size
        self.train = EpochSliceSampler(train_size, samples, world_size, rank, seed)
        self.pretrain = EpochSliceSampler(pretrain_size, samples, world_size, rank, seed)
        self.epoch = 1

    def set_epoch(self, epoch):
        self.epoch = epoch
        if self.pretraining():
            self.pretrain.set_epoch(epoch)
        else:
            self.train.set_epoch(epoch - self.cfg.pretrain_epochs)

    def pretraining(self):
        return self.epoch <= self.cfg.pretrain_epochs

    def __iter__(self):
        if self.pretraining():
            return (self.offset + i for i in self.pretrain)
        return iter(self.train)

    def __len__(self):
        return len(self.train)


class _Meter:
    def __init__(self):
        self.sums, self.count, self.samples, self.start = {}, 0, 0, time.perf_counter()

    def update(self, terms, n):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.samples += n

    def means(self):
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def per_second(self):
        return self.samples / max(self.seconds(), 1e-9)

    def seconds(self):
        return time.perf_counter() - self.start


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, dynamic_ncols=True, leave=False, desc=desc)


def _tensorboard(cfg):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        warnings.warn("tensorboardX is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(Path(cfg.snapshot_root) / "tensorboard" / cfg.train_save))
