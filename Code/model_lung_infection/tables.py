"""Reproduce the paper's Tables II, III and IV: one command per table (`reproduce.py`).

Every row goes through three stages, each skipped when its output already exists:
  train     Snapshots/save_weights/tables/<budget tag>/<run>/      (checkpoint.pth resumes)
  test      Results/tables/<budget tag>/maps/<run>/                  (one map per test slice)
  evaluate  Results/tables/<budget tag>/rows/<run>.json              (a finished row)
then Results/tables/table_<X>.md and .csv put our six figures beside the paper's
(paper_tables.json, a copy of the paper's Tables II-V), with Params / FLOPs at 352 x 352 and the
budget the row was trained with. A run interrupted anywhere picks up at the first unfinished stage
of the first unfinished row; `retrain=True` runs every stage again.

The table is three modules: table_plan.py (what runs, as data: budgets, rows, the paper's figures,
which row needs another's outputs), this runner (TableRunner: one row at a time; a row never runs
another, `plan` puts prerequisites first; configs are copied, never changed), and table_report.py
(the Markdown / CSV table, with EvaluationTool.report's writer).

Recipes: Inf-Net rows use train.py (multi-scale, deep supervision); the single-map baselines of
Table II the same optimiser, data and epochs at one scale with BCE; Semi-Inf-Net rows (Table IV
included) step (i) on the release's pseudo labels, then step (ii) on the doctor labels; Table III
rows multiclass/train.py, the infection-guided ones with the Semi-Inf-Net row's maps as test priors.
"""
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from EvaluationTool.folder import evaluate_folder
from EvaluationTool.report import MULTICLASS, average

from . import multiclass
from .atomic import atomic_write
from .checkpoint import read_checkpoint
from .complexity import count_complexity
from .engine import training_seconds
from .infer import run_test
from .models import load_model
from .runtime import pick_device
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
    """Runs rows stage by stage under one budget; see the module docstring for the folders."""

    def __init__(self, budget, data_root="Dataset", snapshot_root="Snapshots", results_root="Results/tables",
                 retrain=False, device="auto", amp=None, channels_last=None, progress=True, log=print,
                 imagenet_dir=None, num_workers=None, seed=2020):
        self.budget, self.data = budget, DataPaths(data_root)
        self.imagenet_dir = Path(imagenet_dir) if imagenet_dir else None
        # runs with and without ImageNet initialisation never share a folder
        self.tag = budget.tag + ("-imagenet" if imagenet_dir else "")
        self.snapshot_root, self.results_root = Path(snapshot_root), Path(results_root)
        self.retrain, self.log = retrain, log
        self.runtime = dict(device=device, amp=amp, channels_last=channels_last, progress=progress,
                            num_workers=num_workers, seed=seed)
        self._fresh = set()  # runs (re)done by this runner: --retrain redoes each once
        self._train_seconds = 0.0  # training time of the row being computed (see row)

    # ---- folders ----
    @property
    def out_dir(self):
        return self.results_root / self.tag

    def row_file(self, run):
        return self.out_dir / "rows" / f"{run}.json"

    def maps_dir(self, run):
        return self.out_dir / "maps" / run

    # ---- the table ----
    def run_table(self, table, rows=None):
        """Every row (or those named in `rows`) of `table`; writes and returns the table files."""
        selected, order = plan(table, rows)
        results = {}
        for i, row in enumerate(order, 1):
            users = [r.name for r in selected if row in prerequisites(r)]
            needed = "" if row in selected else f", needed by {', '.join(users)}"
            self.log(f"[table {table}] row {i}/{len(order)}: {row.name} (run {row.run}{needed})")
            results[row.name] = self.row(row)
        return write_table(table, selected, results, self.results_root)

    def row(self, row):
        """The row's result, computing what is missing. Runs this row only: the outputs of its
        `prerequisites` must exist (run_table runs them first)."""
        path = self.row_file(row.run)
        if path.exists() and not self._redo(row.run):
            self.log(f"  finished earlier: {path}")
            return json.loads(path.read_text())
        self._train_seconds = 0.0  # _fit adds each run's own record, so a resumed row counts all its sessions
        trained = self._train(row)
        testing_started = time.time()
        metrics, empty = self._test_and_evaluate(row, trained)
        model = self._model_for_counting(row, trained)
        complexity = count_complexity(model, 352, row.in_channels)
        result = {"row": row.name, "run": row.run, "recipe": row.recipe, "model": row.model,
                  "options": dict(row.options), "metrics": metrics, "empty_maps": empty,
                  "params": complexity["params"], "macs": complexity["macs"],
                  "budget": dataclasses.asdict(self.budget), "budget_text": self.budget.describe(row.recipe, row),
                  "device": str(self._device()), "pretrained": self._imagenet_file(row) is not None,
                  "minutes": round((self._train_seconds + time.time() - testing_started) / 60, 1)}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        self._fresh.add(row.run)
        return result

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

    def _device(self):
        return pick_device(self.runtime["device"])

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
                                     pretrained=self._imagenet_file(row), **self._run_fields(row.run),
                                     **self._inf_net_fields(row)))

    def _train_semi(self, row):
        """Semi-Inf-Net: step (i) on the pseudo labels, then step (ii) from its weights on the doctor labels."""
        b = self.budget
        step1 = self._fit(TrainConfig(train_path=[str(self.data.pseudo)], epoch=b.pseudo_epochs, batchsize=24,
                                      epoch_samples=b.pseudo_samples, pretrained=self._imagenet_file(row),
                                      **self._run_fields(row.run.replace("semi_", "pseudo_", 1)),
                                      **self._inf_net_fields(row)))
        return self._fit(TrainConfig(train_path=[str(self.data.doctor)], epoch=b.epochs, batchsize=16,
                                     init=str(step1.with_name(final_name(step1))), **self._run_fields(row.run),
                                     **self._inf_net_fields(row)))

    def _run_fields(self, run):
        # Only the last snapshot is kept (save_every beyond any budget); checkpoint.pth resumes.
        return dict(train_save=f"tables/{self.tag}/{run}", snapshot_prefix=run,
                    snapshot_root=str(self.snapshot_root), save_every=10 ** 6, **self._engine_runtime())

    def _engine_runtime(self):
        return dict(self.runtime)  # RunConfig's runtime fields

    def _fit(self, cfg):
        """Train `cfg` unless its last snapshot exists; resume an interrupted run. -> its checkpoint.pth."""
        final = cfg.run_dir / f"{cfg.snapshot_prefix}-{cfg.epoch}.pth"
        run = cfg.train_save
        if final.exists() and not self._redo(run):
            self.log(f"  trained earlier: {final}")
            self._train_seconds += training_seconds(cfg.checkpoint_path)
            return cfg.checkpoint_path
        if self._redo(run):
            cfg = dataclasses.replace(cfg, overwrite=True)  # a copy: the caller's config stays as given
        elif cfg.checkpoint_path.exists():
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
                                          **self._run_fields(row.run))
        return self._fit(cfg)

    # ---- test and evaluate ----
    def _test_and_evaluate(self, row, checkpoint):
        """(the six figures, {class: test slices on which the row predicts nothing of it})."""
        maps = self.maps_dir(row.run)
        if row.recipe != "multiclass":
            # the row's own folder: maps of an interrupted or redone attempt are replaced (overwrite)
            run_test(checkpoint, self.data.test, maps, testsize=self.budget.trainsize,
                     device=self.runtime["device"], progress=self.runtime["progress"], overwrite=True)
            return _six(evaluate_folder(self.data.test / "GT", maps)), {"infection": empty_maps(maps, 128)}
        prior_path = None
        if row.prior:  # the Semi-Inf-Net row's test maps (a prerequisite: run_table ran it first)
            prior_path = self.maps_dir(SEMI_INF_NET.run)
            if not self.row_file(SEMI_INF_NET.run).exists():
                raise FileNotFoundError(f"{prior_path}: {row.name} tests on the {SEMI_INF_NET.name} row's maps; "
                                        f"run that row first (run_table does)")
        multiclass.run_test(checkpoint, self.data.multiclass_test / "Imgs", prior_path=prior_path, save_root=maps,
                            testsize=self.budget.trainsize, model_name=row.run, device=self.runtime["device"],
                            progress=self.runtime["progress"], overwrite=True)
        per_class = {}
        for cls, gt in MULTICLASS:
            per_class[cls] = evaluate_folder(self.data.multiclass_test / gt, maps / cls / row.run)
        per_class["Average"] = average(list(per_class.values()))
        # a class map is non-zero exactly where the class wins the argmax (multiclass.class_maps)
        empty = {cls: empty_maps(maps / cls / row.run, 1) for cls, _ in MULTICLASS}
        return {cls: _six(s) for cls, s in per_class.items()}, empty

    def _model_for_counting(self, row, checkpoint):
        return load_model(checkpoint)  # checkpoint.pth records the architecture


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
