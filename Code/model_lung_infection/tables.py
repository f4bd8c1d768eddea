"""Reproduce the paper's Tables II, III and IV: one command per table (`reproduce.py`).

Every row goes through three stages, each skipped when its output already exists:
  train     Snapshots/save_weights/tables/<budget tag>/<run>/      (checkpoint.pth resumes)
  test      Results/tables/<budget tag>/maps/<run>/                  (one map per test slice)
  evaluate  Results/tables/<budget tag>/rows/<run>.json              (a finished row)
then Results/tables/table_<X>.md and .csv put our six figures beside the paper's
(paper_tables.json, a copy of the paper's Tables II-V), with Params / FLOPs at 352 x 352 and the
budget the row was trained with. A run interrupted anywhere picks up at the first unfinished stage
of the first unfinished row; `retrain=True` runs every stage again.

Budgets (BUDGETS; `--epochs` / `--trainsize` override): `paper` is the released recipe (100 epochs at
352, Semi-Inf-Net step (i) on all 1600 pseudo-labelled slices, 200 multi-class epochs); `cpu` is a
scaled-down recipe for a 2-core machine, and every table says which was used. Rows that share a
configuration share a run: Table II's Semi-Inf-Net is Table IV's No.7.

Recipes: Inf-Net rows use train.py (multi-scale, deep supervision); the single-map baselines of
Table II the same optimiser, data and epochs at one scale with BCE; Semi-Inf-Net rows (Table IV
included) step (i) on the release's pseudo labels, then step (ii) on the doctor labels; Table III
rows multiclass.py, the infection-guided ones with the Semi-Inf-Net row's maps as test priors.
"""
import csv
import dataclasses
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from EvaluationTool.cli import MULTICLASS
from EvaluationTool.folder import evaluate_folder
from EvaluationTool.report import TABLE_COLUMNS, average

from . import multiclass
from .atomic import atomic_write
from .checkpoint import read_checkpoint
from .complexity import count_complexity, si_units
from .infer import load_inf_net, run_test
from .runtime import pick_device
from .train import SCALES, TrainConfig, train

PAPER = json.loads(Path(__file__).with_name("paper_tables.json").read_text())
PAPER_KEYS = {"II": "table_II_infection", "III": "table_III_multiclass", "IV": "table_IV_ablation"}
TITLES = {"II": "Table II: lung infection segmentation, 48 test slices",
          "III": "Table III: multi-class infection labelling (GGO, consolidation), 48 test slices",
          "IV": "Table IV: ablations of Inf-Net, trained with the Semi-Inf-Net recipe"}
METRICS = [key for _, key in TABLE_COLUMNS]          # meanDic, meanSen, meanSpe, Sm, meanEm, MAE
CLASSES = tuple(cls for cls, _ in MULTICLASS) + ("Average",)
CLASS_SHORT = {"Ground-glass opacities": "ggo", "Consolidation": "cons", "Average": "avg"}
PAPER_METRICS = ("dice", "sen", "spec", "s_alpha", "e_phi_mean", "mae")  # paper_tables.json's names


# ---------------------------------------------------------------------------------------------
# What is run
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    name: str
    trainsize: int = 352
    epochs: int = 100                     # doctor-label training: Inf-Net, baselines, Semi-Inf-Net step (ii)
    pseudo_epochs: int = 100              # Semi-Inf-Net step (i)
    pseudo_samples: Optional[int] = None  # slices per step-(i) epoch; None: all of them
    multiclass_epochs: int = 200

    @property
    def tag(self):
        """Folder name: runs of different budgets never mix."""
        pseudo = f"p{self.pseudo_epochs}x{self.pseudo_samples or 'all'}"
        return f"{self.name}-{self.trainsize}px-{self.epochs}ep-{pseudo}-mc{self.multiclass_epochs}"

    def describe(self, recipe):
        base = f"{self.epochs} ep"
        if recipe == "semi":
            step1 = f"{self.pseudo_samples} slices" if self.pseudo_samples else "all slices"
            base = f"pseudo {self.pseudo_epochs} ep x {step1} + {self.epochs} ep"
        elif recipe == "multiclass":
            base = f"{self.multiclass_epochs} ep"
        return f"{base}, {self.trainsize} px"


BUDGETS = {
    "paper": Budget("paper"),
    # About 1.5 h for Table IV on 2 CPU cores (bf16); far below the paper's recipe.
    "cpu": Budget("cpu", trainsize=192, epochs=8, pseudo_epochs=2, pseudo_samples=100, multiclass_epochs=8),
}


@dataclass(frozen=True)
class Row:
    name: str                 # the paper's row name (its key in paper_tables.json)
    recipe: str               # "supervised" | "semi" | "multiclass"
    model: str = "inf_net"    # MODELS name; multiclass rows: a multiclass.ARCHS key
    backbone: str = "Res2Net"  # as the table prints it
    options: tuple = ()       # (config field, value) pairs, e.g. Inf-Net components or the prior switch

    @property
    def run(self):
        """Run name, the same for rows of the same configuration (in any table)."""
        off = "".join(f"-no_{k}" for k, v in self.options if v is False and k != "prior")
        if self.recipe == "multiclass":
            return f"mc_{self.model}_{'prior' if dict(self.options).get('prior', True) else 'image'}"
        return f"{'semi_' if self.recipe == 'semi' else ''}{self.model}{off}"


def _ablation(*on):
    return tuple((k, k in on) for k in ("edge_attention", "partial_decoder", "reverse_attention"))


# ImageNet weights each network's encoder loads from `--imagenet_dir` (the files torchvision and
# the Res2Net authors publish); networks not listed have no ImageNet encoder.
IMAGENET_FILES = {"inf_net": "res2net50_v1b_26w_4s-3cf99910.pth", "unet": "vgg16-397923af.pth",
                  "unetplusplus": "vgg16-397923af.pth", "attention_unet": "vgg16-397923af.pth",
                  "fcn8s": "vgg16-397923af.pth", "dense_unet": "densenet161-8d451a50.pth",
                  "deeplabv3plus_os8": "resnet50-0676ba61.pth", "deeplabv3plus_os16": "resnet50-0676ba61.pth"}

SEMI_INF_NET = Row("Semi-Inf-Net", "semi")
TABLE_ROWS = {
    "II": [Row("U-Net", "supervised", "unet", "VGG16"),
           Row("Attention-UNet", "supervised", "attention_unet", "VGG16"),
           Row("Gated-UNet", "supervised", "gated_unet", "-"),
           Row("Dense-UNet", "supervised", "dense_unet", "DenseNet161"),
           Row("U-Net++", "supervised", "unetplusplus", "VGG16"),
           Row("Inf-Net", "supervised"),
           SEMI_INF_NET],
    "III": [Row("DeepLabV3+ (stride=8)", "multiclass", "deeplabv3plus_os8", "ResNet-50", (("prior", False),)),
            Row("DeepLabV3+ (stride=16)", "multiclass", "deeplabv3plus_os16", "ResNet-50", (("prior", False),)),
            Row("FCN8s", "multiclass", "fcn8s", "VGG16", (("prior", False),)),
            Row("Multi-class U-Net", "multiclass", "unet", "-", (("prior", False),)),
            Row("Semi-Inf-Net & FCN8s", "multiclass", "fcn8s", "VGG16", (("prior", True),)),
            Row("Semi-Inf-Net & MC", "multiclass", "unet", "-", (("prior", True),))],
    "IV": [Row("No.1 Backbone", "semi", options=_ablation()),
           Row("No.2 Backbone+EA", "semi", options=_ablation("edge_attention")),
           Row("No.3 Backbone+PPD", "semi", options=_ablation("partial_decoder")),
           Row("No.4 Backbone+RA", "semi", options=_ablation("reverse_attention")),
           Row("No.5 Backbone+RA+EA", "semi", options=_ablation("reverse_attention", "edge_attention")),
           Row("No.6 Backbone+PPD+RA", "semi", options=_ablation("partial_decoder", "reverse_attention")),
           Row("No.7 Backbone+PPD+RA+EA", "semi", options=_ablation(*dict(_ablation()).keys()))],
}


@dataclass
class DataPaths:
    """The COVID-SemiSeg folders a table needs, under one root laid out like Dataset/."""
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)
        train, test = self.root / "TrainingSet", self.root / "TestingSet"
        self.doctor = train / "LungInfection-Train" / "Doctor-label"
        self.pseudo = train / "LungInfection-Train" / "Pseudo-label"
        self.multiclass_train = train / "MultiClassInfection-Train"
        self.test = test / "LungInfection-Test"
        self.multiclass_test = test / "MultiClassInfection-Test"


# ---------------------------------------------------------------------------------------------
# Running rows
# ---------------------------------------------------------------------------------------------

class TableRunner:
    """Runs rows stage by stage under one budget; see the module docstring for the folders."""

    def __init__(self, budget, data_root="Dataset", snapshot_root="Snapshots", results_root="Results/tables",
                 retrain=False, device="auto", amp=None, channels_last=False, progress=True, log=print,
                 imagenet_dir=None):
        self.budget, self.data = budget, DataPaths(data_root)
        self.imagenet_dir = Path(imagenet_dir) if imagenet_dir else None
        # runs with and without ImageNet initialisation never share a folder
        self.tag = budget.tag + ("-imagenet" if imagenet_dir else "")
        self.snapshot_root, self.results_root = Path(snapshot_root), Path(results_root)
        self.retrain, self.log = retrain, log
        self.runtime = dict(device=device, amp=amp, channels_last=channels_last, progress=progress)
        self._fresh = set()  # runs (re)done by this runner: --retrain redoes each once

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
        selected = [r for r in TABLE_ROWS[table] if not rows or r.name in rows]
        unknown = set(rows or ()) - {r.name for r in TABLE_ROWS[table]}
        if unknown:
            raise ValueError(f"Table {table} has no row(s) {sorted(unknown)}; rows: "
                             f"{', '.join(r.name for r in TABLE_ROWS[table])}")
        results = {}
        for i, row in enumerate(selected, 1):
            self.log(f"[table {table}] row {i}/{len(selected)}: {row.name} (run {row.run})")
            results[row.name] = self.row(row)
        return write_table(table, selected, results, self.results_root)

    def row(self, row):
        """The row's result, computing what is missing."""
        path = self.row_file(row.run)
        if path.exists() and not self._redo(row.run):
            self.log(f"  finished earlier: {path}")
            return json.loads(path.read_text())
        started = time.time()
        trained = self._train(row)
        metrics = self._test_and_evaluate(row, trained)
        model = self._model_for_counting(row, trained)
        in_channels = 6 if row.recipe == "multiclass" and dict(row.options).get("prior", True) else 3
        complexity = count_complexity(model, 352, in_channels)
        result = {"row": row.name, "run": row.run, "recipe": row.recipe, "model": row.model,
                  "options": dict(row.options), "metrics": metrics,
                  "params": complexity["params"], "macs": complexity["macs"],
                  "budget": dataclasses.asdict(self.budget), "budget_text": self.budget.describe(row.recipe),
                  "device": str(self._device()), "pretrained": self._imagenet_file(row) is not None,
                  "minutes": round((time.time() - started) / 60, 1)}
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
        if row.recipe == "multiclass":
            return self._fit_multiclass(row)
        b, opts = self.budget, dict(row.options)
        single_map = row.model != "inf_net"
        common = dict(model=row.model, trainsize=b.trainsize, scales=(1.0,) if single_map else SCALES,
                      **{k: v for k, v in opts.items() if k in TrainConfig.__dataclass_fields__})
        if row.recipe == "supervised":
            return self._fit(TrainConfig(train_path=[str(self.data.doctor)], epoch=b.epochs, batchsize=24,
                                         pretrained=self._imagenet_file(row), **self._run_fields(row.run), **common))
        step1 = self._fit(TrainConfig(train_path=[str(self.data.pseudo)], epoch=b.pseudo_epochs, batchsize=24,
                                      epoch_samples=b.pseudo_samples, pretrained=self._imagenet_file(row),
                                      **self._run_fields(row.run.replace("semi_", "pseudo_", 1)), **common))
        return self._fit(TrainConfig(train_path=[str(self.data.doctor)], epoch=b.epochs, batchsize=16,
                                     init=str(step1.with_name(final_name(step1))), **self._run_fields(row.run),
                                     **common))

    def _run_fields(self, run):
        # Only the last snapshot is kept (save_every beyond any budget); checkpoint.pth resumes.
        return dict(train_save=f"tables/{self.tag}/{run}", snapshot_prefix=run,
                    snapshot_root=str(self.snapshot_root), save_every=10 ** 6, **self._engine_runtime())

    def _engine_runtime(self):
        rt = self.runtime
        return dict(device=rt["device"], amp=rt["amp"], channels_last=rt["channels_last"], progress=rt["progress"])

    def _fit(self, cfg):
        """Train `cfg` unless its last snapshot exists; resume an interrupted run. -> its checkpoint.pth."""
        final = cfg.run_dir / f"{cfg.snapshot_prefix}-{cfg.epoch}.pth"
        run = cfg.train_save
        if final.exists() and not self._redo(run):
            self.log(f"  trained earlier: {final}")
            return cfg.checkpoint_path
        if self._redo(run):
            cfg.overwrite = True
        elif cfg.checkpoint_path.exists():
            cfg.resume = True
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")  # the table says "from scratch"
            (train if isinstance(cfg, TrainConfig) else multiclass.train)(cfg)
        self._fresh.add(run)
        return cfg.checkpoint_path

    def _fit_multiclass(self, row):
        opts = dict(row.options)
        cfg = multiclass.MultiClassConfig(train_path=str(self.data.multiclass_train), arch=row.model,
                                          prior=opts.get("prior", True), trainsize=self.budget.trainsize,
                                          epoch=self.budget.multiclass_epochs, pretrained=self._imagenet_file(row),
                                          **self._run_fields(row.run))
        return self._fit(cfg)

    # ---- test and evaluate ----
    def _test_and_evaluate(self, row, checkpoint):
        maps = self.maps_dir(row.run)
        if row.recipe != "multiclass":
            run_test(checkpoint, self.data.test, maps, testsize=self.budget.trainsize,
                     device=self.runtime["device"], progress=self.runtime["progress"])
            return _six(evaluate_folder(self.data.test / "GT", maps))
        prior_path = None
        if dict(row.options).get("prior", True):
            self.row(SEMI_INF_NET)  # its test maps are this row's priors
            prior_path = self.maps_dir(SEMI_INF_NET.run)
        multiclass.run_test(checkpoint, self.data.multiclass_test / "Imgs", prior_path=prior_path, save_root=maps,
                            testsize=self.budget.trainsize, model_name=row.run, device=self.runtime["device"],
                            progress=self.runtime["progress"])
        per_class = {}
        for cls, gt in MULTICLASS:
            per_class[cls] = evaluate_folder(self.data.multiclass_test / gt, maps / cls / row.run)
        per_class["Average"] = average(list(per_class.values()))
        return {cls: _six(s) for cls, s in per_class.items()}

    def _model_for_counting(self, row, checkpoint):
        if row.recipe == "multiclass":
            return multiclass.load_multiclass(checkpoint)[0]
        return load_inf_net(checkpoint)


def final_name(checkpoint_path):
    """The last snapshot of a run, from the config its checkpoint.pth carries."""
    config = read_checkpoint(checkpoint_path)["config"]
    return f"{config['snapshot_prefix']}-{config['epoch']}.pth"


def _six(summary):
    return {k: float(summary[k]) for k in METRICS}


# ---------------------------------------------------------------------------------------------
# Writing the table
# ---------------------------------------------------------------------------------------------

def _paper_row(table, name):
    t = PAPER[PAPER_KEYS[table]]
    values = t["rows"].get(name)
    return dict(zip(t["columns"], values)) if values else {}


def _metric_pairs(table, paper, result):
    """[(column label, ours, paper)] for one row; `paper` is that row's `_paper_row`."""
    if table != "III":
        return [(label, result["metrics"][key], paper.get(p))
                for (label, key), p in zip(TABLE_COLUMNS, PAPER_METRICS)]
    pairs = []
    for cls in CLASSES:
        short = CLASS_SHORT[cls]
        pairs += [(f"{short} {label}", result["metrics"][cls][key], paper.get(f"{short}_{p}"))
                  for (label, key), p in zip(TABLE_COLUMNS, PAPER_METRICS)]
    return pairs


def _fmt(x):
    return "-" if x is None else f"{x:.3f}"


def write_table(table, rows, results, results_root="Results/tables"):
    """Results/tables/table_<X>.md and .csv from row results; returns the two paths."""
    root = Path(results_root)
    budgets = sorted({f"`{r['budget']['name']}` ({r['budget_text']}) on {r['device']}" for r in results.values()})
    inits = {r["pretrained"] for r in results.values()}
    init = ("mixed initialisation (see the csv's pretrained column)" if len(inits) > 1 else
            "ImageNet-initialised encoders (local files)" if True in inits else
            "encoders from random weights (no ImageNet file)")
    md = [f"# {TITLES[table]}", "",
          "Each cell: **ours** / paper. Ours: measured by `reproduce.py` with the budget in the last column, "
          f"{init}, on the 48 test slices with EvaluationTool. "
          "Paper: Fan et al., IEEE TMI 2020 (ImageNet-pretrained encoders, full recipe). "
          "Params / FLOPs: ours at 352 x 352 (FLOPs = multiply-accumulates, as the paper's thop counts) "
          "/ paper.", "", "Budget(s): " + "; ".join(budgets), ""]
    first = results[rows[0].name]
    labels = [label for label, _, _ in _metric_pairs(table, {}, first)]
    md.append("| Method | Backbone | Params | FLOPs | " + " | ".join(labels) + " | Budget |")
    md.append("|" + "---|" * (len(labels) + 5))
    csv_rows = []
    for row in rows:
        r = results[row.name]
        # By the table's own row name: a shared run (Table II's Semi-Inf-Net is Table IV's No.7)
        # records the name of the table that trained it.
        paper = _paper_row(table, row.name)
        pairs = _metric_pairs(table, paper, r)
        cells = [row.name, row.backbone, f"{si_units(r['params'])} / {paper.get('params', '-')}",
                 f"{si_units(r['macs'])} / {paper.get('flops', '-')}"]
        cells += [f"**{_fmt(ours)}** / {_fmt(p)}" for _, ours, p in pairs]
        cells.append(r["budget_text"])
        md.append("| " + " | ".join(cells) + " |")
        rec = {"table": table, "row": row.name, "run": r["run"], "backbone": row.backbone, "params": r["params"],
               "macs": r["macs"], "paper_params": paper.get("params", ""), "paper_flops": paper.get("flops", "")}
        for label, ours, p in pairs:
            key = label.lower().replace(" ", "_").replace(".", "")
            rec[f"{key}_ours"], rec[f"{key}_paper"] = round(ours, 4), "" if p is None else p
        rec.update(budget=r["budget"]["name"], budget_text=r["budget_text"], device=r["device"],
                   pretrained=r["pretrained"], minutes=r.get("minutes"))
        csv_rows.append(rec)
    md_path = root / f"table_{table}.md"
    atomic_write(md_path, lambda tmp: Path(tmp).write_text("\n".join(md) + "\n"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(csv_rows[0]))
    writer.writeheader()
    writer.writerows(csv_rows)
    csv_path = root / f"table_{table}.csv"
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return md_path, csv_path
