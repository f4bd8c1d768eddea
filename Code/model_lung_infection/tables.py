"""Reproduce the paper's Tables II, III and IV: one command per table (`reproduce.py`).

Every row goes through three stages, each skipped when its output already exists:
  train     Snapshots/save_weights/tables/<budget tag>/<run>-<key>/  (checkpoint.pth resumes)
  test      Results/tables/<budget tag>/maps/<run>-<key>/              (one map per test slice)
  evaluate  Results/tables/<budget tag>/rows/<run>-<key>.json          (a finished row)
then Results/tables/table_<X>.md and .csv put our six figures beside the paper's
(paper_tables.json, a copy of the paper's Tables II-V), with Params / FLOPs at 352 x 352, the
budget the row was trained with and the number of test slices scored. <key> is the digest of what
the stage's figures depend on (table_keys.py: data contents, budget, seed, ImageNet file, recipe
version), so other inputs get other folders and never reuse, mix with or replace earlier ones. A run
interrupted anywhere picks up at the first unfinished stage of the first unfinished row;
`retrain=True` runs every stage again. Under torchrun every process trains each row (one process
group for the table) and rank 0 alone tests, evaluates and writes.

The table is four modules: table_plan.py (what runs, as data: budgets, rows, the paper's figures,
which row needs another's outputs), table_keys.py (what a row depends on), this runner (TableRunner:
one row at a time; a row never runs another, `plan` puts prerequisites first; configs are copied,
never changed), and table_report.py (the Markdown / CSV table, with EvaluationTool.report's writer).

Recipes: Inf-Net rows use train.py (multi-scale, deep supervision); the single-map baselines of
Table II the same optimiser, data and epochs at one scale with BCE; Semi-Inf-Net rows (Table IV
included) step (i) on the release's pseudo labels, then step (ii) on the doctor labels; Table III
rows multiclass/train.py, the infection-guided ones with the Semi-Inf-Net row's maps as test priors.
"""
import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist
from PIL import Image

from EvaluationTool.folder import evaluate_folder
from EvaluationTool.report import MULTICLASS, average

from . import multiclass
from .atomic import atomic_write
from .checkpoint import read_checkpoint
from .complexity import count_complexity
from .configs import one_path_component
from .engine import training_seconds
from .infer import run_test
from .models import load_model
from .runtime import Distributed, pick_device
from .table_keys import (
    RECIPE_VERSION,
    TEST_DATA,
    TRAINING_DATA,
    digest,
    file_fingerprint,
    folder_fingerprint,
    key_changes,
)
from .table_plan import (  # noqa: F401 -- the plan's names, for reproduce.py and callers of this module
    BUDGETS,
    CLASSES,
    IMAGENET_FILES,
    METRICS,
    PAPER,
    PAPER_KEYS,
    SEMI_INF_NET,
    TABLE_ROWS,
    Budget,
    DataPaths,
    Row,
    ablation,
    plan,
    prerequisites,
)
from .table_report import write_table  # noqa: F401
from .train import SCALES, TrainConfig, train

_ablation = ablation  # the name tests and older callers use


class TableRunner:
    """Runs rows stage by stage under one budget; see the module docstring for the folders.

    Under torchrun every process trains each row (DDP, one process group for the whole table); rank 0
    alone decides which stages run, tests, evaluates and writes, while the others wait at a barrier."""

    def __init__(self, budget, data_root="Dataset", snapshot_root="Snapshots", results_root="Results/tables",
                 retrain=False, device="auto", amp=None, channels_last=None, progress=True, log=print,
                 imagenet_dir=None, num_workers=None, seed=2020):
        self.budget, self.data = budget, DataPaths(data_root)
        self.imagenet_dir = Path(imagenet_dir) if imagenet_dir else None
        # runs with and without ImageNet initialisation never share a folder
        self.tag = one_path_component(budget.tag + ("-imagenet" if imagenet_dir else ""), "the budget's name")
        self.snapshot_root, self.results_root = Path(snapshot_root), Path(results_root)
        self.ddp = Distributed()  # torchrun's world (world size 1 when run plainly)
        self.retrain, self.log = retrain, log if self.ddp.is_main else _silent
        self.runtime = dict(device=device, amp=amp, channels_last=channels_last, progress=progress,
                            num_workers=num_workers, seed=seed)
        self._fresh = set()  # runs (re)done by this runner: --retrain redoes each once
        self._train_seconds = 0.0  # training time of the row being computed (see row)
        self._keys, self._fingerprints = {}, {}
        self.device = pick_device(device)  # run_table: the device torchrun gives this rank

    # ---- what a row depends on (table_keys.py) ----
    def _key(self, row, folders, **more):
        """The key of `row`'s figures as far as they depend on the DataPaths `folders` (and `more`)."""
        key = {"recipe_version": RECIPE_VERSION, "recipe": row.recipe, "model": row.model,
               "options": [list(o) for o in row.options], "budget": dataclasses.asdict(self.budget),
               "seed": self.runtime["seed"], "imagenet": self._imagenet_fingerprint(row),
               "data": {name: self._fingerprint(name) for name in folders}}
        return {**key, **more}

    def _fingerprint(self, name):
        if name not in self._fingerprints:
            self._fingerprints[name] = folder_fingerprint(getattr(self.data, name))
        return self._fingerprints[name]

    def _imagenet_fingerprint(self, row):
        path = self._imagenet_file(row)
        if path not in self._fingerprints:
            self._fingerprints[path] = file_fingerprint(path)
        return self._fingerprints[path]

    def row_key(self, row):
        """The key of the row's result: its training's, its test data's and (infection-guided multi-class
        rows) the key of the Semi-Inf-Net row whose maps it is tested on."""
        if row.run not in self._keys:
            more = {"prior": digest(self.row_key(SEMI_INF_NET))} if row.prior else {}
            self._keys[row.run] = self._key(row, TRAINING_DATA[row.recipe] + (TEST_DATA[row.recipe],), **more)
        return self._keys[row.run]

    def _run_name(self, row, run, folders):
        """The folder name of one of the row's training runs: `run`-<digest of what it trains on>."""
        return f"{one_path_component(run, 'the run name')}-{digest(self._key(row, folders))}"

    def _row_name(self, row):
        return f"{one_path_component(row.run, 'the run name')}-{digest(self.row_key(row))}"

    # ---- folders ----
    @property
    def out_dir(self):
        return self.results_root / self.tag

    def row_file(self, row):
        return self.out_dir / "rows" / f"{self._row_name(row)}.json"

    def maps_dir(self, row):
        return self.out_dir / "maps" / self._row_name(row)

    # ---- the table ----
    def run_table(self, table, rows=None):
        """Every row (or those named in `rows`) of `table`; writes and returns the table files (rank 0;
        other ranks return ())."""
        selected, order = plan(table, rows)
        self.device = self.ddp.setup(self.device)  # under torchrun: creates the one group every row trains in
        try:
            def fingerprints():  # every input read (and checked) before the first row trains
                for row in order:
                    self.row_key(row)
                return self._fingerprints
            self._fingerprints = self._from_main(fingerprints)  # rank 0's, from which every rank keys the same
            results = {}
            for i, row in enumerate(order, 1):
                users = [r.name for r in selected if row in prerequisites(r)]
                needed = "" if row in selected else f", needed by {', '.join(users)}"
                self.log(f"[table {table}] row {i}/{len(order)}: {row.name} (run {row.run}{needed})")
                results[row.name] = self.row(row)
            written = write_table(table, selected, results, self.results_root) if self.ddp.is_main else ()
            self.ddp.barrier()
            return written
        finally:
            self.ddp.cleanup()  # only if this runner created the group

    def row(self, row):
        """The row's result (None on ranks other than 0), computing what is missing. Runs this row only:
        the outputs of its `prerequisites` must exist (run_table runs them first)."""
        path = self.row_file(row)
        if self._from_main(path.exists) and not self._redo(row.run):
            self.log(f"  finished earlier: {path}")
            return json.loads(path.read_text()) if self.ddp.is_main else None
        self._say_why_new(row, path)
        self._train_seconds = 0.0  # _fit adds each run's own record, so a resumed row counts all its sessions
        trained = self._train(row)
        result = self._test_and_record(row, trained, path) if self.ddp.is_main else None
        self.ddp.barrier()  # the other ranks wait for rank 0's test and evaluation
        self._fresh.add(row.run)
        return result

    def _test_and_record(self, row, trained, path):
        testing_started = time.time()
        metrics, empty, slices = self._test_and_evaluate(row, trained)
        model = self._model_for_counting(row, trained)
        complexity = count_complexity(model, 352, row.in_channels)
        result = {"row": row.name, "run": row.run, "recipe": row.recipe, "model": row.model,
                  "options": dict(row.options), "metrics": metrics, "empty_maps": empty,
                  "test_slices": slices, "data_root": str(self.data.root),
                  "params": complexity["params"], "macs": complexity["macs"],
                  "budget": dataclasses.asdict(self.budget), "budget_text": self.budget.describe(row.recipe, row),
                  "device": str(self.device), "pretrained": self._imagenet_file(row) is not None,
                  "minutes": round((self._train_seconds + time.time() - testing_started) / 60, 1),
                  "key": self.row_key(row), "checkpoint": str(trained)}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        return result

    def _say_why_new(self, row, path):
        """One line when the row was finished earlier for other inputs (those results stay where they are)."""
        if not self.ddp.is_main:
            return
        mine = re.compile(re.escape(row.run) + r"-[0-9a-f]{10}\.json")  # not a run whose name extends this one's
        older = [p for p in path.parent.glob(f"{row.run}-*.json") if p != path and mine.fullmatch(p.name)]
        legacy = path.with_name(f"{row.run}.json")
        if older:
            last = max(older, key=lambda p: p.stat().st_mtime)
            changed = key_changes(json.loads(last.read_text()).get("key", {}), self.row_key(row))
            self.log(f"  {row.name} was finished for other inputs ({changed}) in {last.name}, kept; "
                     f"computing it for these in {path.name}")
        elif legacy.exists():
            self.log(f"  {legacy} predates rows keyed by their inputs (it does not record its data): not reused; "
                     f"computing the row in {path.name}")

    def _from_main(self, compute):
        """`compute()` on rank 0, its value on every rank: the ranks take each stage's decision together."""
        if not self.ddp.enabled:
            return compute()
        box = [compute() if self.ddp.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _imagenet_file(self, row):
        """The row's encoder weights in imagenet_dir (an error names a missing one); None without a dir."""
        if self.imagenet_dir is None or row.model not in IMAGENET_FILES:
            return None
        path = self.imagenet_dir / IMAGENET_FILES[row.model]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the ImageNet weights of {row.name}'s encoder are not there")
        return str(path)

    def _redo(self, run):
        return self.retrain and run not in self._fresh

    # ---- train ----
    def _train(self, row):
        """Train the row's network (or find it trained); returns the checkpoint.pth that describes it."""
        recipes = {"supervised": self._train_supervised, "semi": self._train_semi, "multiclass": self._fit_multiclass}
        return recipes[row.recipe](row)

    def _inf_net_fields(self, row):
        """TrainConfig fields every binary row shares: network, size, scales, Inf-Net components."""
        return dict(model=row.model, trainsize=self.budget.trainsize, scales=(1.0,) if row.single_map else SCALES,
                    **{k: v for k, v in row.options if k in TrainConfig.__dataclass_fields__})

    def _train_supervised(self, row):
        return self._fit(TrainConfig(train_path=[str(self.data.doctor)], epoch=self.budget.epochs, batchsize=24,
                                     pretrained=self._imagenet_file(row),
                                     **self._run_fields(self._run_name(row, row.run, ("doctor",)), row.run),
                                     **self._inf_net_fields(row)))

    def _train_semi(self, row):
        """Semi-Inf-Net: step (i) on the pseudo labels, then step (ii) from its weights on the doctor labels."""
        b, pseudo = self.budget, row.run.replace("semi_", "pseudo_", 1)
        step1 = self._fit(TrainConfig(train_path=[str(self.data.pseudo)], epoch=b.pseudo_epochs, batchsize=24,
                                      epoch_samples=b.pseudo_samples, pretrained=self._imagenet_file(row),
                                      **self._run_fields(self._run_name(row, pseudo, ("pseudo",)), pseudo),
                                      **self._inf_net_fields(row)))
        return self._fit(TrainConfig(train_path=[str(self.data.doctor)], epoch=b.epochs, batchsize=16,
                                     init=str(step1.with_name(final_name(step1))),
                                     **self._run_fields(self._run_name(row, row.run, ("pseudo", "doctor")), row.run),
                                     **self._inf_net_fields(row)))

    def _run_fields(self, folder, run):
        """The run's place: Snapshots/save_weights/tables/<tag>/<folder>/<run>-<epoch>.pth. Only the last
        snapshot is kept (save_every beyond any budget); checkpoint.pth resumes."""
        return dict(train_save=f"tables/{self.tag}/{folder}", snapshot_prefix=run,
                    snapshot_root=str(self.snapshot_root), save_every=10 ** 6, **self._engine_runtime())

    def _engine_runtime(self):
        return dict(self.runtime)  # RunConfig's runtime fields

    def _fit(self, cfg):
        """Train `cfg` unless its last snapshot exists; resume an interrupted run. -> its checkpoint.pth."""
        final = cfg.run_dir / f"{cfg.snapshot_prefix}-{cfg.epoch}.pth"
        run = cfg.train_save
        trained, started = self._from_main(lambda: (final.exists(), cfg.checkpoint_path.exists()))
        legacy = cfg.run_dir.with_name(cfg.snapshot_prefix)  # the unkeyed folder of earlier versions
        if not (trained or started) and legacy.is_dir():
            self.log(f"  {legacy} predates runs keyed by their inputs and is not reused; if it was trained on "
                     f"these inputs, rename it to {cfg.run_dir.name} to reuse it")
        if trained and not self._redo(run):
            self.log(f"  trained earlier: {final}")
            self._train_seconds += training_seconds(cfg.checkpoint_path)
            return cfg.checkpoint_path
        if self._redo(run):
            cfg = dataclasses.replace(cfg, overwrite=True)  # a copy: the caller's config stays as given
        elif started:
            cfg = dataclasses.replace(cfg, resume=True)
        (train if isinstance(cfg, TrainConfig) else multiclass.train)(cfg)
        self._fresh.add(run)
        self._train_seconds += training_seconds(cfg.checkpoint_path)
        return cfg.checkpoint_path

    def _fit_multiclass(self, row):
        cfg = multiclass.MultiClassConfig(train_path=str(self.data.multiclass_train), arch=row.model,
                                          prior=row.prior, trainsize=self.budget.trainsize,
                                          epoch=self.budget.multiclass_epochs_for(row),
                                          pretrained=self._imagenet_file(row),
                                          **self._run_fields(self._run_name(row, row.run, ("multiclass_train",)),
                                                             row.run))
        return self._fit(cfg)

    # ---- test and evaluate ----
    def _test_and_evaluate(self, row, checkpoint):
        """(the six figures, {class: test slices on which the row predicts nothing of it}, slices scored)."""
        maps = self.maps_dir(row)
        if maps.exists():  # this row's own maps (same key), left by an interrupted test: made again
            shutil.rmtree(maps)
        device = str(self.device)
        if row.recipe != "multiclass":
            # the row's own folder (emptied above): overwrite, so a redone attempt is never refused
            run_test(checkpoint, self.data.test, maps, testsize=self.budget.trainsize, device=device,
                     progress=self.runtime["progress"], overwrite=True)
            summary = evaluate_folder(self.data.test / "GT", maps)
            return _six(summary), {"infection": empty_maps(maps, 128)}, summary["n_images"]
        prior_path = None
        if row.prior:  # the Semi-Inf-Net row's test maps (a prerequisite: run_table ran it first)
            prior_path = self.maps_dir(SEMI_INF_NET)
            if not self.row_file(SEMI_INF_NET).exists():
                raise FileNotFoundError(f"{prior_path}: {row.name} tests on the {SEMI_INF_NET.name} row's maps; "
                                        f"run that row first (run_table does)")
        multiclass.run_test(checkpoint, self.data.multiclass_test / "Imgs", prior_path=prior_path, save_root=maps,
                            testsize=self.budget.trainsize, model_name=row.run, device=device,
                            progress=self.runtime["progress"], overwrite=True)
        per_class = {}
        for cls, gt in MULTICLASS:
            per_class[cls] = evaluate_folder(self.data.multiclass_test / gt, maps / cls / row.run)
        per_class["Average"] = average(list(per_class.values()))
        # a class map is non-zero exactly where the class wins the argmax (multiclass.class_maps)
        empty = {cls: empty_maps(maps / cls / row.run, 1) for cls, _ in MULTICLASS}
        slices = per_class[MULTICLASS[0][0]]["n_images"]
        return {cls: _six(s) for cls, s in per_class.items()}, empty, slices

    def _model_for_counting(self, row, checkpoint):
        return load_model(checkpoint)  # checkpoint.pth records the architecture


def _silent(*args, **kwargs):
    """The log of ranks other than 0 under torchrun: rank 0 speaks for the table."""


def final_name(checkpoint_path):
    """The last snapshot of a run, from the config its checkpoint.pth carries."""
    config = read_checkpoint(checkpoint_path)["config"]
    return f"{config['snapshot_prefix']}-{config['epoch']}.pth"


def empty_maps(folder, threshold):
    """{"empty": maps in `folder` with no pixel >= `threshold` (8-bit), i.e. slices on which nothing is
    predicted, "slices": maps in all}."""
    peaks = []
    for path in sorted(Path(folder).glob("*.png")):
        with Image.open(path) as im:
            peaks.append(int(np.asarray(im).max()))
    return {"empty": sum(peak < threshold for peak in peaks), "slices": len(peaks)}


def _six(summary):
    return {k: float(summary[k]) for k in METRICS}
