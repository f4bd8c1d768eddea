"""What reproduce.py runs for the paper's Tables II-IV, as data: budgets, rows, the paper's figures.

Budgets (BUDGETS; `--epochs` / `--trainsize` override): `paper` is the released recipe (100 epochs at
352, Semi-Inf-Net step (i) on all 1600 pseudo-labelled slices, 200 multi-class epochs); `cpu` is a
scaled-down recipe for a 2-core machine, and every table says which was used. Rows that share a
configuration share a run: Table II's Semi-Inf-Net is Table IV's No.7. A row may read another's
outputs (`prerequisites`): `plan` puts those first, so no row runs another implicitly.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from EvaluationTool.report import MULTICLASS, TABLE_COLUMNS

PAPER = json.loads(Path(__file__).with_name("paper_tables.json").read_text())
PAPER_KEYS = {"II": "table_II_infection", "III": "table_III_multiclass", "IV": "table_IV_ablation"}
TITLES = {"II": "Table II: lung infection segmentation",
          "III": "Table III: multi-class infection labelling (GGO, consolidation)",
          "IV": "Table IV: ablations of Inf-Net, trained with the Semi-Inf-Net recipe"}
METRICS = [key for _, key in TABLE_COLUMNS]          # meanDic, meanSen, meanSpe, Sm, meanEm, MAE
CLASSES = tuple(cls for cls, _ in MULTICLASS) + ("Average",)
CLASS_SHORT = {"Ground-glass opacities": "ggo", "Consolidation": "cons", "Average": "avg"}
PAPER_METRICS = ("dice", "sen", "spec", "s_alpha", "e_phi_mean", "mae")  # paper_tables.json's names


@dataclass(frozen=True)
class Budget:
    name: str
    trainsize: int = 352
    epochs: int = 100                     # doctor-label training: Inf-Net, baselines, Semi-Inf-Net step (ii)
    pseudo_epochs: int = 100              # Semi-Inf-Net step (i)
    pseudo_samples: Optional[int] = None  # slices per step-(i) epoch; None: all of them
    multiclass_epochs: int = 200
    # ((Row.run, epochs), ...): multi-class rows that get more than multiclass_epochs, because their recipe
    # learns nothing in fewer (the smallest such budget is found on validation: bench/multiclass_budget.py)
    multiclass_row_epochs: tuple = ()

    @property
    def tag(self):
        """Folder name: runs of different budgets never mix."""
        pseudo = f"p{self.pseudo_epochs}x{self.pseudo_samples or 'all'}"
        rows = "".join(f"-{run}{epochs}" for run, epochs in self.multiclass_row_epochs)
        return f"{self.name}-{self.trainsize}px-{self.epochs}ep-{pseudo}-mc{self.multiclass_epochs}{rows}"

    def multiclass_epochs_for(self, row):
        """The epochs multi-class row `row` trains for at this budget."""
        return dict(self.multiclass_row_epochs).get(row.run, self.multiclass_epochs)

    def describe(self, recipe, row=None):
        """The budget of a row of `recipe` in words (a multi-class `row`: its own epochs)."""
        base = f"{self.epochs} ep"
        if recipe == "semi":
            step1 = f"{self.pseudo_samples} slices" if self.pseudo_samples else "all slices"
            base = f"pseudo {self.pseudo_epochs} ep x {step1} + {self.epochs} ep"
        elif recipe == "multiclass":
            base = f"{self.multiclass_epochs if row is None else self.multiclass_epochs_for(row)} ep"
        return f"{base}, {self.trainsize} px"


BUDGETS = {
    "paper": Budget("paper"),
    # About 1.5 h for Table IV on 2 CPU cores (bf16); far below the paper's recipe. In 8 epochs (32 updates)
    # DeepLabV3+ and FCN8s learn nothing: they get the first epoch at which they predicted both classes on
    # held-out slices (bench/multiclass_budget.py, docs/tables.md), or GGO alone where consolidation never
    # came within 128 epochs (Semi-Inf-Net & FCN8s); FCN8s on the slice alone learned nothing within 128.
    "cpu": Budget("cpu", trainsize=192, epochs=8, pseudo_epochs=2, pseudo_samples=100, multiclass_epochs=8,
                  multiclass_row_epochs=(("mc_deeplabv3plus_os8_image", 96), ("mc_deeplabv3plus_os16_image", 120),
                                         ("mc_fcn8s_prior", 88))),
}


@dataclass(frozen=True)
class Row:
    name: str                 # the paper's row name (its key in paper_tables.json)
    recipe: str               # "supervised" | "semi" | "multiclass"
    model: str = "inf_net"    # MODELS name; multiclass rows: a multiclass.ARCHS key
    backbone: str = "Res2Net"  # as the table prints it
    options: tuple = ()       # (config field, value) pairs, e.g. Inf-Net components or the prior switch

    @property
    def prior(self):
        """A multi-class row fed the infection maps (6 channels) rather than the slice alone."""
        return self.recipe == "multiclass" and dict(self.options).get("prior", True)

    @property
    def in_channels(self):
        return 6 if self.prior else 3

    @property
    def single_map(self):
        """A Table II baseline: one output, trained at one scale (Inf-Net's recipe is multi-scale)."""
        return self.model != "inf_net"

    @property
    def run(self):
        """Run name, the same for rows of the same configuration (in any table)."""
        off = "".join(f"-no_{k}" for k, v in self.options if v is False and k != "prior")
        if self.recipe == "multiclass":
            return f"mc_{self.model}_{'prior' if dict(self.options).get('prior', True) else 'image'}"
        return f"{'semi_' if self.recipe == 'semi' else ''}{self.model}{off}"


def ablation(*on):
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
    "IV": [Row("No.1 Backbone", "semi", options=ablation()),
           Row("No.2 Backbone+EA", "semi", options=ablation("edge_attention")),
           Row("No.3 Backbone+PPD", "semi", options=ablation("partial_decoder")),
           Row("No.4 Backbone+RA", "semi", options=ablation("reverse_attention")),
           Row("No.5 Backbone+RA+EA", "semi", options=ablation("reverse_attention", "edge_attention")),
           Row("No.6 Backbone+PPD+RA", "semi", options=ablation("partial_decoder", "reverse_attention")),
           Row("No.7 Backbone+PPD+RA+EA", "semi", options=ablation(*dict(ablation()).keys()))],
}


def prerequisites(row):
    """Rows whose outputs `row` reads: an infection-guided multi-class row tests on Semi-Inf-Net's maps."""
    return [SEMI_INF_NET] if row.prior else []


def plan(table, names=None):
    """(the table's rows, or those named, in table order; every row to run, prerequisites first)."""
    rows = TABLE_ROWS[table]
    unknown = set(names or ()) - {r.name for r in rows}
    if unknown:
        raise ValueError(f"Table {table} has no row(s) {sorted(unknown)}; rows: {', '.join(r.name for r in rows)}")
    selected = [r for r in rows if not names or r.name in names]
    order = []
    for row in selected:
        order += [r for r in prerequisites(row) + [row] if r not in order]
    return selected, order


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
