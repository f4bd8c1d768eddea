"""reproduce.py / tables.py: every registered model builds, rows run stage by stage, tables are written,
and a second run reuses finished rows."""
import json

import pytest
import torch

from Code.model_lung_infection import create_model, list_models, tables
from Code.model_lung_infection.tables import TABLE_ROWS, Budget, Row, TableRunner

TINY = Budget("tiny", trainsize=64, epochs=1, pseudo_epochs=1, pseudo_samples=2, multiclass_epochs=1)
MULTICLASS_INPUTS = {"unet_multiclass": 6, "fcn8s": 6, "deeplabv3plus_os8": 3, "deeplabv3plus_os16": 3}


def keyed(folder, run, suffix=""):
    """The one path `<run>-<key digest><suffix>` in `folder` (runs, rows and maps are named by their key)."""
    import re
    found = [p for p in folder.iterdir() if re.fullmatch(re.escape(run) + r"-[0-9a-f]{10}" + re.escape(suffix), p.name)]
    assert len(found) == 1, (run, sorted(p.name for p in folder.iterdir()))
    return found[0]


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_at_64(name):
    torch.manual_seed(0)
    channels = MULTICLASS_INPUTS.get(name, 3)
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 64, 64))
    maps = [out] if isinstance(out, torch.Tensor) else [o for o in out if o is not None]
    n_classes = 3 if name in MULTICLASS_INPUTS else 1
    assert maps and all(tuple(m.shape) == (2, n_classes, 64, 64) for m in maps)
    assert all(torch.isfinite(m).all() for m in maps)


def test_rows_name_the_paper_rows():
    for table, rows in TABLE_ROWS.items():
        paper = tables.PAPER[tables.PAPER_KEYS[table]]["rows"]
        assert [r.name for r in rows] == list(paper)
    # rows of the same configuration share one run: Table II's Semi-Inf-Net is Table IV's No.7
    assert TABLE_ROWS["II"][-1].run == TABLE_ROWS["IV"][-1].run == "semi_inf_net"
    assert len({r.run for r in TABLE_ROWS["IV"]}) == 7


def test_table_rows_run_then_resume_skips_them(mini_dataset, tmp_path, monkeypatch):
    data = mini_dataset(n_train=3, n_test=2)
    kw = dict(snapshot_root=tmp_path / "snap", results_root=tmp_path / "tables", progress=False, log=lambda *a: None)
    rows = ["Gated-UNet", "Semi-Inf-Net"]
    md, csv_path = TableRunner(TINY, data, **kw).run_table("II", rows)

    text = md.read_text()
    assert "Gated-UNet" in text and "Semi-Inf-Net" in text and "0.739" in text  # the paper's Semi-Inf-Net Dice
    assert "33.122M / 33.122M" in text  # our Inf-Net's parameter count beside the paper's
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 3 and "dice_ours" in lines[0] and "dice_paper" in lines[0]
    rows_dir = tmp_path / "tables" / TINY.tag / "rows"
    row = json.loads(keyed(rows_dir, "semi_inf_net", ".json").read_text())
    assert set(row["metrics"]) == set(tables.METRICS) and all(0 <= v <= 1 for v in row["metrics"].values())
    assert row["budget"]["epochs"] == 1 and "pseudo 1 ep x 2 slices" in row["budget_text"]
    run_dir = tmp_path / "snap" / "save_weights" / "tables" / TINY.tag
    assert (keyed(run_dir, "pseudo_inf_net") / "pseudo_inf_net-1.pth").exists()
    assert (keyed(run_dir, "semi_inf_net") / "semi_inf_net-1.pth").exists()

    # A second run reuses both rows: nothing is trained or tested again.
    def forbidden(*a, **k):
        raise AssertionError("a finished row was run again")
    monkeypatch.setattr(tables, "train", forbidden)
    monkeypatch.setattr(tables, "run_test", forbidden)
    md2, _ = TableRunner(TINY, data, **kw).run_table("II", rows)
    assert md2.read_text() == text

    # A row whose result was lost but whose training finished is tested again, not retrained, into its
    # own maps folder made afresh (what an interrupted test left there is not scored).
    keyed(rows_dir, "gated_unet", ".json").unlink()
    maps = keyed(tmp_path / "tables" / TINY.tag / "maps", "gated_unet")
    (maps / "left-by-a-killed-test.png").write_bytes(b"")
    monkeypatch.undo()
    monkeypatch.setattr(tables, "train", forbidden)
    TableRunner(TINY, data, **kw).run_table("II", ["Gated-UNet"])
    assert keyed(rows_dir, "gated_unet", ".json").exists()
    assert sorted(p.name for p in maps.glob("*.png")) == sorted(p.name for p in (data / TEST_GT).iterdir())
    assert (maps / "test_run.json").is_file()  # the test stage's record: the evaluation checks the maps against it


TEST_GT = "TestingSet/LungInfection-Test/GT"


def test_a_row_of_other_data_is_computed_again_beside_the_old_one(mini_dataset, tmp_path, monkeypatch):
    # Finished rows were reused for any --data_root: "finished earlier" and a byte-identical table.
    import shutil
    data = mini_dataset(n_train=3, n_test=2)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    dropped = sorted(p.stem for p in (other / TEST_GT).iterdir())[0]
    for path in sorted((other / "TestingSet/LungInfection-Test").rglob(f"{dropped}.*")):
        path.unlink()  # one test slice fewer: its image, GT and edge
    log = []
    kw = dict(snapshot_root=tmp_path / "snap", results_root=tmp_path / "tables", progress=False, log=log.append)
    # what earlier versions left, unkeyed: not reused (nothing says which data it was made from), and said
    legacy_row = tmp_path / "tables" / TINY.tag / "rows" / "gated_unet.json"
    legacy_row.parent.mkdir(parents=True)
    legacy_row.write_text("{}")
    (tmp_path / "snap" / "save_weights" / "tables" / TINY.tag / "gated_unet").mkdir(parents=True)
    md, _ = TableRunner(TINY, data, **kw).run_table("II", ["Gated-UNet"])
    first = md.read_text()
    assert "2 test slices of" in first and str(data) in first
    assert sum("predates" in line for line in log) == 2 and legacy_row.read_text() == "{}"
    legacy_row.unlink()

    def forbidden(*a, **k):
        raise AssertionError("trained again though its training data did not change")
    monkeypatch.setattr(tables, "train", forbidden)  # the training data are the same: the run is reused
    log.clear()
    md, _ = TableRunner(TINY, other, **kw).run_table("II", ["Gated-UNet"])
    second = md.read_text()
    assert not any("finished earlier" in line for line in log), log
    assert any("finished for other inputs (data (test))" in line for line in log), log
    assert "1 test slice of" in second and str(other) in second and second != first
    rows = sorted((tmp_path / "tables" / TINY.tag / "rows").iterdir())
    assert len(rows) == 2  # the first data's row is kept
    assert sorted(json.loads(p.read_text())["test_slices"] for p in rows) == [1, 2]

    # Back on the first data (or an identical copy elsewhere): its row again, nothing recomputed.
    monkeypatch.setattr(tables, "run_test", forbidden)
    shutil.copytree(data, tmp_path / "copy")
    log.clear()
    md, _ = TableRunner(TINY, tmp_path / "copy", **kw).run_table("II", ["Gated-UNet"])
    assert any("finished earlier" in line for line in log) and md.read_text() == first


def test_every_input_of_a_row_changes_its_key(mini_dataset, tmp_path, monkeypatch):
    from Code.model_lung_infection import table_keys
    data = mini_dataset(n_train=2, n_test=1)
    semi, mc = TABLE_ROWS["II"][-1], TABLE_ROWS["III"][-1]

    def names(budget=TINY, **kw):
        runner = TableRunner(budget, data, **kw)
        return {"row": runner._row_name(semi), "mc row": runner._row_name(mc),
                "step1": runner._run_name(semi, "pseudo_inf_net", ("pseudo",)),
                "step2": runner._run_name(semi, "semi_inf_net", ("pseudo", "doctor"))}
    base = names()
    assert len(set(base.values())) == 4 and base["row"].startswith("semi_inf_net-")
    assert names() == base  # the same inputs: the same folders
    assert all(names(seed=1)[k] != base[k] for k in base)
    import dataclasses
    assert all(names(dataclasses.replace(TINY, epochs=2))[k] != base[k] for k in base)
    monkeypatch.setattr(table_keys, "RECIPE_VERSION", table_keys.RECIPE_VERSION + 1)
    monkeypatch.setattr(tables, "RECIPE_VERSION", table_keys.RECIPE_VERSION)
    assert all(names()[k] != base[k] for k in base)
    monkeypatch.undo()
    # a doctor-label slice changed: step (ii) and the rows change, step (i) (pseudo labels only) is reused
    gt = sorted((data / "TrainingSet/LungInfection-Train/Doctor-label/GT").iterdir())[0]
    gt.write_bytes(gt.read_bytes() + b"\0")
    changed = names()
    assert changed["step1"] == base["step1"]
    assert all(changed[k] != base[k] for k in ("step2", "row", "mc row"))  # the multi-class row's prior too


def test_missing_data_is_named_before_any_row_trains(mini_dataset, tmp_path, monkeypatch):
    import shutil

    from Code.model_lung_infection.errors import DataError
    data = mini_dataset(n_train=2, n_test=1)
    shutil.rmtree(data / "TestingSet")

    def forbidden(*a, **k):
        raise AssertionError("trained before the missing test data was noticed")
    monkeypatch.setattr(tables, "train", forbidden)
    with pytest.raises(DataError, match="LungInfection-Test: folder not found"):
        TableRunner(TINY, data, snapshot_root=tmp_path / "s", results_root=tmp_path / "t").run_table("II", ["U-Net"])


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "a\\b"])
def test_a_budget_name_that_is_not_one_folder_name_is_refused(tmp_path, name):
    from Code.model_lung_infection.errors import OptionError
    with pytest.raises(OptionError, match="cannot name a folder"):
        TableRunner(Budget(name, trainsize=64, epochs=1), tmp_path)


def test_reproduce_refuses_a_row_name_of_another_table_in_one_line(capsys):
    import reproduce
    with pytest.raises(SystemExit) as e:
        reproduce.parse_args(["--table", "II", "--rows", "../../etc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no row(s)" in err and len(err.strip().splitlines()) == 1


def test_reproduce_says_why_table_v_cannot_run_in_one_line(capsys):
    import reproduce
    with pytest.raises(SystemExit) as e:
        reproduce.parse_args(["--table", "V"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "9 CT volumes" in err and "choose II, III or IV" in err and len(err.splitlines()) == 1


def test_unknown_row_is_named(tmp_path):
    with pytest.raises(ValueError, match="no row"):
        TableRunner(TINY, tmp_path).run_table("II", ["V-Net"])


def test_table_writer_on_fake_results(tmp_path):
    rows = TABLE_ROWS["III"][:1]
    metrics = {cls: dict.fromkeys(tables.METRICS, 0.5) for cls in tables.CLASSES}
    fake = {rows[0].name: {"row": rows[0].name, "run": rows[0].run, "metrics": metrics, "params": 1234567,
                           "macs": 2 * 10 ** 9, "budget": {"name": "fake"}, "budget_text": "1 ep, 64 px",
                           "device": "cpu", "pretrained": False}}
    md, csv_path = tables.write_table("III", rows, fake, tmp_path)
    text = md.read_text()
    assert "| DeepLabV3+ (stride=8) | ResNet-50 | 1.235M / - | 2.000G / - |" in text
    assert "**0.500** / 0.375" in text  # GGO Dice: ours / the paper's
    assert text.count("**0.500**") == 18
    header = csv_path.read_text().splitlines()[0]
    assert "ggo_dice_ours" in header and "avg_mae_paper" in header
    assert "†" not in text  # rows written before empty maps were recorded get no mark


def test_a_row_that_predicts_nothing_is_marked(tmp_path):
    rows = TABLE_ROWS["III"][:2]
    metrics = {cls: dict.fromkeys(tables.METRICS, 0.5) for cls in tables.CLASSES}
    base = {"metrics": metrics, "params": 1, "macs": 1, "budget": {"name": "fake"}, "budget_text": "1 ep, 64 px",
            "device": "cpu", "pretrained": False}
    empty = {"Ground-glass opacities": {"empty": 48, "slices": 48}, "Consolidation": {"empty": 48, "slices": 48}}
    some = {"Ground-glass opacities": {"empty": 47, "slices": 48}, "Consolidation": {"empty": 48, "slices": 48}}
    fake = {rows[0].name: {**base, "row": rows[0].name, "run": rows[0].run, "empty_maps": empty},
            rows[1].name: {**base, "row": rows[1].name, "run": rows[1].run, "empty_maps": some}}
    md, csv_path = tables.write_table("III", rows, fake, tmp_path)
    text = md.read_text()
    assert "| DeepLabV3+ (stride=8) †ggo cons | ResNet-50 |" in text
    assert "| DeepLabV3+ (stride=16) †cons | ResNet-50 |" in text  # GGO predicted on one slice: not marked
    from Code.model_lung_infection.table_report import EMPTY_NOTE
    assert EMPTY_NOTE in text
    import csv
    with open(csv_path, newline="") as f:
        assert next(csv.DictReader(f))["never_predicted"] == "ggo cons"


def test_shared_run_gets_the_paper_figures_of_each_table_it_appears_in(tmp_path):
    # Table IV's run of No.7 records its Table IV name; Table II reads the same run as "Semi-Inf-Net".
    semi = next(r for r in TABLE_ROWS["II"] if r.name == "Semi-Inf-Net")
    no7 = next(r for r in TABLE_ROWS["IV"] if r.run == semi.run)
    assert no7.name != semi.name
    fake = {semi.name: {"row": no7.name, "run": semi.run, "metrics": dict.fromkeys(tables.METRICS, 0.5),
                        "params": 1, "macs": 1, "budget": {"name": "fake"}, "budget_text": "1 ep, 64 px",
                        "device": "cpu", "pretrained": False}}
    md, _ = tables.write_table("II", [semi], fake, tmp_path)
    assert "**0.500** / 0.739 | **0.500** / 0.725 |" in md.read_text()  # Semi-Inf-Net's Dice, Sen in Table II


def test_ablation_row_trains_inf_net_without_its_components(mini_dataset, tmp_path):
    data = mini_dataset(n_train=2, n_test=1)
    row = Row("No.1 Backbone", "semi", options=tables._ablation())
    runner = TableRunner(TINY, data, snapshot_root=tmp_path / "snap", results_root=tmp_path / "tables",
                         progress=False, log=lambda *a: None)
    result = runner.row(row)
    state = torch.load(keyed(tmp_path / "snap" / "save_weights" / "tables" / TINY.tag, row.run) / f"{row.run}-1.pth",
                       weights_only=True)
    assert not any(k.startswith(("ParDec", "ra4_conv", "edge_conv")) for k in state)
    assert any(k.startswith("backbone_head") for k in state)
    assert result["run"] == "semi_inf_net-no_edge_attention-no_partial_decoder-no_reverse_attention"


def test_infection_guided_multiclass_row_uses_semi_inf_net_maps(mini_dataset, tmp_path):
    data = mini_dataset(n_train=2, n_test=2)
    runner = TableRunner(TINY, data, snapshot_root=tmp_path / "snap", results_root=tmp_path / "tables",
                         progress=False, log=lambda *a: None)
    md, _ = runner.run_table("III", ["Semi-Inf-Net & MC"])
    out = tmp_path / "tables" / TINY.tag
    assert keyed(out / "rows", "semi_inf_net", ".json").exists()  # the priors' row ran first
    assert len(list(keyed(out / "maps", "semi_inf_net").glob("*.png"))) == 2
    row = json.loads(keyed(out / "rows", "mc_unet_prior", ".json").read_text())
    assert row["test_slices"] == 2
    assert set(row["metrics"]) == set(tables.CLASSES)
    assert "**" in md.read_text() and "0.541" in md.read_text()  # the paper's average Dice for this row


def test_interrupted_row_resumes_its_training(mini_dataset, tmp_path, monkeypatch, capsys):
    import dataclasses
    data = mini_dataset(n_train=3, n_test=1)
    budget = dataclasses.replace(TINY, epochs=2)
    kw = dict(snapshot_root=tmp_path / "snap", results_root=tmp_path / "tables", progress=False, log=lambda *a: None)
    real_train = tables.train

    def killed_after_one_epoch(cfg):
        cfg.max_steps = 1  # one batch = one epoch of 3 slices
        real_train(cfg)
        raise KeyboardInterrupt
    monkeypatch.setattr(tables, "train", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        TableRunner(budget, data, **kw).run_table("II", ["Gated-UNet"])
    run = keyed(tmp_path / "snap" / "save_weights" / "tables" / budget.tag, "gated_unet")
    assert (run / "checkpoint.pth").exists() and not (run / "gated_unet-2.pth").exists()
    assert not (tmp_path / "tables" / budget.tag / "rows").exists()

    # The first session "took" 10 minutes: the row's minutes must count it, not only the resumed part.
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    torch.save({**state, "elapsed_s": 600.0}, run / "checkpoint.pth")

    monkeypatch.setattr(tables, "train", real_train)
    capsys.readouterr()
    TableRunner(budget, data, **kw).run_table("II", ["Gated-UNet"])
    out = capsys.readouterr().out
    assert "resumed" in out and "after epoch 1" in out
    assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 2
    assert (run / "gated_unet-2.pth").exists()
    row = json.loads(keyed(tmp_path / "tables" / budget.tag / "rows", "gated_unet", ".json").read_text())
    assert 10.0 <= row["minutes"] < 11


def test_imagenet_dir_initialises_the_encoders(tmp_path):
    import torchvision

    from Code.model_lung_infection.train import TrainConfig, build_model
    vgg = torchvision.models.vgg16().state_dict()
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    runner = TableRunner(TINY, tmp_path, imagenet_dir=tmp_path)
    assert runner.tag == TINY.tag + "-imagenet"  # never mixed with randomly initialised runs
    by_name = {r.name: r for r in TABLE_ROWS["II"]}
    unet, gated, dense = by_name["U-Net"], by_name["Gated-UNet"], by_name["Dense-UNet"]
    model = build_model(TrainConfig(model="unet", pretrained=runner._imagenet_file(unet)))
    for key in ("features.0.weight", "features.28.bias"):
        torch.testing.assert_close(model.encoder.state_dict()[key], vgg[key], rtol=0, atol=0)
    assert runner._imagenet_file(gated) is None  # no ImageNet encoder
    with pytest.raises(FileNotFoundError, match="densenet161-8d451a50.pth"):
        runner._imagenet_file(dense)


def test_torchvision_densenet_file_loads_with_its_old_key_names(tmp_path):
    import re

    import torchvision

    from Code.model_lung_infection.smp_models import load_encoder_weights, smp_encoder
    sd = torchvision.models.densenet161().state_dict()
    # the published densenet161-8d451a50.pth: "norm.1" key names and no BN step counters
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)", r"\1.\2", k): v for k, v in sd.items()
           if "num_batches" not in k}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet161-8d451a50.pth")
    encoder = load_encoder_weights(smp_encoder("densenet161"), tmp_path / "densenet161-8d451a50.pth")
    key = "features.denseblock4.denselayer24.conv2.weight"
    torch.testing.assert_close(encoder.state_dict()[key], sd[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="densenet161-8d451a50.pth does not fit"):
        load_encoder_weights(smp_encoder("vgg16"), tmp_path / "densenet161-8d451a50.pth")


def test_a_multiclass_row_gets_its_own_budget(mini_dataset, tmp_path):
    # --budget cpu gives the rows whose recipe learns nothing in multiclass_epochs more (issue 16)
    budget = Budget("tiny", trainsize=64, epochs=1, pseudo_epochs=1, pseudo_samples=2, multiclass_epochs=1,
                    multiclass_row_epochs=(("mc_deeplabv3plus_os16_image", 2),))
    assert budget.tag != TINY.tag  # runs of the two budgets never mix
    os16, os8 = TABLE_ROWS["III"][1], TABLE_ROWS["III"][0]
    assert (budget.multiclass_epochs_for(os16), budget.multiclass_epochs_for(os8)) == (2, 1)
    data = mini_dataset(n_train=2, n_test=2)
    runner = TableRunner(budget, data, snapshot_root=tmp_path / "snap", results_root=tmp_path / "tables",
                         progress=False, log=lambda *a: None)
    result = runner.row(os16)
    assert result["budget_text"] == "2 ep, 64 px"
    # how many test slices get no pixel of each class, for the table's mark of rows that predict nothing
    assert {cls: n["slices"] for cls, n in result["empty_maps"].items()} == \
        {"Ground-glass opacities": 2, "Consolidation": 2}
    run = keyed(tmp_path / "snap" / "save_weights" / "tables" / budget.tag, os16.run)
    assert (run / f"{os16.run}-2.pth").is_file()
    assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 2


def test_every_per_row_budget_names_a_table_III_row():
    # a misspelt run name would silently leave that row at the budget's default epochs
    from Code.model_lung_infection.table_plan import BUDGETS
    runs = {row.run for row in TABLE_ROWS["III"]}
    for budget in BUDGETS.values():
        assert {run for run, _ in budget.multiclass_row_epochs} <= runs
        assert all(epochs > budget.multiclass_epochs for _, epochs in budget.multiclass_row_epochs)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reproduce_under_torchrun_trains_every_row_in_one_group_and_rank_0_writes(mini_dataset, tmp_path):
    # Three rows, each trained by 2 gloo processes: a process group re-created per row failed at the third
    # (connectFullMesh), and every rank tested and wrote the table.
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    data = mini_dataset(n_train=3, n_test=2)
    rows = ["Gated-UNet", "U-Net", "Attention-UNet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(root / "reproduce.py"), "--table", "II", "--budget", "cpu", "--epochs", "1", "--trainsize", "64",
           "--rows", *rows, "--data_root", str(data), "--snapshot_root", str(tmp_path / "snap"),
           "--results_root", str(tmp_path / "tables"), "--device", "cpu", "--no-progress"]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.count("[reproduce] wrote") == 2, out  # table_II.md and .csv, by rank 0 only
    assert out.count("[test] wrote 2 maps") == 3, out  # each row tested once
    assert out.count("[table II] row") == 3
    budget = tables.BUDGETS["cpu"]
    import dataclasses
    tag = dataclasses.replace(budget, epochs=1, trainsize=64).tag
    finished = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "tables" / tag / "rows").glob("*.json"))
    assert finished == ["attention_unet", "gated_unet", "unet"]
    text = (tmp_path / "tables" / "table_II.md").read_text()
    assert all(f"\n| {name} " in text for name in rows) and "2 test slices" in text

    # Again: every rank agrees that all three rows are finished; nothing is trained or tested.
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished earlier") == 3 and "[train]" not in r.stdout and "[test]" not in r.stdout
    assert (tmp_path / "tables" / "table_II.md").read_text() == text
