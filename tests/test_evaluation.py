"""EvaluationTool: toolbox definitions on hand-computed cases, a literal per-threshold
re-implementation, py_sod_metrics cross-checks, file handling and the command line."""
import csv
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from EvaluationTool import EvaluationError, evaluate_folder, evaluate_pair
from EvaluationTool.cli import main, run
from EvaluationTool.metrics import EPS, THRESHOLDS, _centroid, binarize_gt, normalize_prediction, s_measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("Dic", "Sen", "Spe", "Prec", "Em")


def save_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def toolbox_loop(pred, gt, strict=False):
    """A literal transcription of main.m's per-threshold loop (Fmeasure_calu + Enhancedmeasure)."""
    p, g = normalize_prediction(pred), binarize_gt(gt)
    n = g.size
    out = {k: [] for k in KEYS}
    for t in THRESHOLDS:
        label = p >= t
        tp = np.sum(label & g)
        num_rec, num_obj = label.sum(), g.sum()
        fn, fp = num_obj - tp, num_rec - tp
        tn = (~label).sum() - fn
        if tp == 0:
            vals = (0.0, 0.0, 0.0, 0.0)
        else:
            spe = tn / (tn + fp) if tn + fp else np.nan
            vals = (2 * tp / (num_obj + num_rec), tp / num_obj, spe, tp / num_rec)
        for k, v in zip(KEYS, vals):
            out[k].append(v)
        fm = (p > t if strict else p >= t).astype(float)
        dg = g.astype(float)
        if dg.sum() == 0:
            enhanced = 1.0 - fm
        elif (1 - dg).sum() == 0:
            enhanced = fm
        else:
            af, ag = fm - fm.mean(), dg - dg.mean()
            enhanced = ((2 * (ag * af) / (ag * ag + af * af + EPS)) + 1) ** 2 / 4
        out["Em"].append(enhanced.sum() / (n - 1 + EPS))
    return {k: np.array(v) for k, v in out.items()}


# ---------------------------------------------------------------- definitions

def test_thresholds_are_matlabs_1_to_0_by_minus_1_over_255():
    assert len(THRESHOLDS) == 256 and THRESHOLDS[0] == 1.0 and THRESHOLDS[-1] == 0.0
    assert np.all(np.diff(THRESHOLDS) < 0)
    step = -1.0 / 255
    # MATLAB's colon: first half counted up from 1, second half counted down from 0.
    assert all(THRESHOLDS[i] == 1.0 + i * step for i in range(128))
    assert all(THRESHOLDS[i] == 0.0 - (255 - i) * step for i in range(128, 256))
    np.testing.assert_allclose(THRESHOLDS, np.arange(255, -1, -1) / 255, atol=1e-15)


def test_hand_computed_curves():
    gt = np.array([[1, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1.0, 0.5, 0.5], [0.0, 0.0, 0.0]])
    c = evaluate_pair(pred, gt)["curves"]
    # t = 1 (index 0) up to t = 128/255 (index 127): only the 1.0 pixel is on (TP 1, FN 1, TN 4).
    # t = 127/255 .. 1/255: the 0.5 pixels join (TP 2, FP 1, TN 3). t = 0: everything is on.
    for i, (dic, sen, spe, prec) in {0: (2 / 3, 0.5, 1.0, 1.0), 127: (2 / 3, 0.5, 1.0, 1.0),
                                      128: (0.8, 1.0, 0.75, 2 / 3), 254: (0.8, 1.0, 0.75, 2 / 3),
                                      255: (0.5, 1.0, 0.0, 1 / 3)}.items():
        assert (c["Dic"][i], c["Sen"][i], c["Spe"][i], c["Prec"][i]) == pytest.approx((dic, sen, spe, prec))
    assert c["Dic"].mean() == pytest.approx((128 * 2 / 3 + 127 * 0.8 + 0.5) / 256)

    # E-phi at t = 1: means 1/6 (map) and 1/3 (GT); cells TP=1, FN=1, TN=4 (FP=0).
    def enh(a_map, a_gt):
        return ((2 * a_map * a_gt / (a_map ** 2 + a_gt ** 2)) + 1) ** 2 / 4
    em_t1 = (enh(5 / 6, 2 / 3) + enh(-1 / 6, 2 / 3) + 4 * enh(-1 / 6, -1 / 3)) / 5
    assert c["Em"][0] == pytest.approx(em_t1)
    # t = 0: the map is all ones, its demeaned value is 0, every alignment is 0 -> 6 * 1/4 / 5.
    assert c["Em"][255] == pytest.approx(0.3)


def test_tp_zero_sets_all_four_to_zero():
    gt = np.array([[1, 0, 0]], bool)
    pred = np.array([[0.0, 1.0, 0.5]])
    c = evaluate_pair(pred, gt)["curves"]
    # t = 1: one false positive, TN = 1 -> specificity would be 0.5, but TP = 0 zeroes everything.
    assert [c[k][0] for k in ("Dic", "Sen", "Spe", "Prec")] == [0, 0, 0, 0]
    # t = 0: TP = 1, FP = 2, TN = 0.
    assert [c[k][255] for k in ("Dic", "Sen", "Spe", "Prec")] == pytest.approx([0.5, 1, 0, 1 / 3])


def test_all_black_gt_special_cases():
    gt = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 255], [51, 102]], np.uint8)          # normalised: 0, 1, 0.2, 0.4
    r = evaluate_pair(pred, gt)
    c = r["curves"]
    for k in ("Dic", "Sen", "Spe", "Prec"):
        assert not c[k].any()                                 # TP is always 0
    # E-phi scores the predicted background only: (N - P) / (N - 1).
    assert c["Em"][0] == pytest.approx(3 / 3)                 # t = 1: one pixel on
    assert c["Em"][255] == pytest.approx(0 / 3)               # t = 0: all four on
    assert c["Em"][THRESHOLDS >= 0.3].min() == pytest.approx(2 / 3)
    assert r["Sm"] == pytest.approx(1 - 1.6 / 4)              # 1 - mean(pred)
    assert r["MAE"] == pytest.approx(1.6 / 4)


def test_all_white_gt_special_cases():
    gt = np.full((2, 2), 255, np.uint8)
    pred = np.array([[0, 255], [51, 102]], np.uint8)
    r = evaluate_pair(pred, gt)
    assert r["Sm"] == pytest.approx(1.6 / 4)                  # mean(pred)
    assert r["curves"]["Em"][0] == pytest.approx(1 / 3)       # P / (N - 1)
    # No background: specificity is 0/0 where TP > 0, NaN in the toolbox too.
    assert np.isnan(r["curves"]["Spe"][0])


def test_s_measure_hand_computed():
    gt = np.array([[1, 0], [0, 0]], bool)
    pred = np.array([[1.0, 0.5], [0.0, 0.0]])
    # Object: foreground [1] scores 1; background 1 - pred = [0.5, 1, 1] (mean 5/6, std sqrt(1/12)).
    bg = 2 * (5 / 6) / ((5 / 6) ** 2 + 1 + np.sqrt(1 / 12))
    obj = 0.25 * 1 + 0.75 * bg
    # Region: centroid (1, 1) splits into four single pixels whose ssim is 1 (alpha = beta = 0).
    assert s_measure(pred, gt) == pytest.approx(0.5 * obj + 0.5 * 1.0)
    assert s_measure(gt.astype(float), gt) == pytest.approx(1.0)


def test_centroid_rounds_half_away_from_zero():
    gt = np.zeros((4, 6), bool)
    gt[1:3, 2:4] = True                 # 1-based columns 3 and 4, rows 2 and 3: centre (3.5, 2.5)
    assert _centroid(gt) == (4, 3)      # MATLAB round(3.5) = 4, round(2.5) = 3


def test_sweep_equals_the_toolbox_loop():
    rng = np.random.default_rng(0)
    for trial in range(12):
        h, w = rng.integers(4, 30, 2)
        gt = ((rng.random((h, w)) < rng.random()) * 255).astype(np.uint8)
        gt[:] = 0 if trial == 0 else gt
        pred = (rng.integers(0, 256, (h, w)).astype(np.uint8) if trial % 3 == 0 else
                rng.integers(20, 180, (h, w)).astype(np.uint8) if trial % 3 == 1 else
                rng.random((h, w)) * 0.6 + 0.1)
        for strict in (False, True):
            got = evaluate_pair(pred, gt, em_strict=strict)["curves"]
            want = toolbox_loop(pred, gt, strict)
            for k in KEYS:
                np.testing.assert_allclose(got[k], want[k], atol=1e-12, err_msg=f"{trial} {k}")


def test_agrees_with_py_sod_metrics_away_from_ties():
    psm = pytest.importorskip("py_sod_metrics")
    rng = np.random.default_rng(1)
    for _ in range(5):
        gt = rng.random((40, 50)) < 0.3
        pred = rng.random((40, 50))
        p = normalize_prediction(pred)
        r = evaluate_pair(pred, gt)
        assert r["Sm"] == pytest.approx(psm.Smeasure().cal_sm(p, gt), abs=1e-12)
        assert r["MAE"] == pytest.approx(psm.MAE().cal_mae(p, gt), abs=1e-12)
        em = psm.Emeasure()
        em.gt_fg_numel, em.gt_size = int(gt.sum()), gt.size
        np.testing.assert_allclose(r["curves"]["Em"], em.cal_em_with_cumsumhistogram(p, gt), atol=1e-12)


def test_min_max_normalisation_makes_scale_irrelevant():
    rng = np.random.default_rng(2)
    gt = rng.random((30, 40)) < 0.4
    raw = rng.random((30, 40))
    a, b = evaluate_pair(raw, gt), evaluate_pair(0.3 * raw + 0.2, gt)
    for k in KEYS:
        np.testing.assert_allclose(a["curves"][k], b["curves"][k], atol=1e-12)
    assert (a["Sm"], a["MAE"]) == pytest.approx((b["Sm"], b["MAE"]), abs=1e-12)

    # 8-bit and 16-bit versions of the same map, and a 3-channel one (first channel counts).
    img = rng.integers(0, 256, (30, 40)).astype(np.uint8)
    r8 = evaluate_pair(img, gt)
    r16 = evaluate_pair(img.astype(np.uint16) * 257, gt)
    rgb = evaluate_pair(np.dstack([img, 255 - img, img // 2]), gt)
    for other in (r16, rgb):
        for k in KEYS:
            np.testing.assert_array_equal(r8["curves"][k], other["curves"][k])
        assert (r8["Sm"], r8["MAE"]) == (other["Sm"], other["MAE"])


def test_constant_prediction_is_not_rescaled():
    gt = np.array([[1, 0], [0, 0]], bool)
    r = evaluate_pair(np.full((2, 2), 255, np.uint8), gt)    # mapminmax leaves it at 1
    assert r["MAE"] == pytest.approx(0.75)
    assert r["curves"]["Dic"][0] == pytest.approx(2 / 5)


# ---------------------------------------------------------------- folders and files

@pytest.fixture
def toy_folders(tmp_path):
    gt = np.zeros((20, 24), np.uint8)
    gt[5:12, 6:15] = 255
    for name in ("a.png", "b.png"):
        save_png(tmp_path / "GT" / name, gt)
        save_png(tmp_path / "pred" / name, (gt // 2 + 40).astype(np.uint8))
    return tmp_path / "GT", tmp_path / "pred"


def test_resized_prediction_file_is_untouched(toy_folders):
    gt_dir, pred_dir = toy_folders
    small = np.zeros((10, 12), np.uint8)
    small[2:6, 3:8] = 200
    path = save_png(pred_dir / "b.png", small)
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    with pytest.warns(UserWarning, match="resized"):
        s = evaluate_folder(gt_dir, pred_dir)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
    row = {r["name"]: r for r in s["per_image"]}
    assert row["b.png"]["resized"] and not row["a.png"]["resized"]
    assert 0 < row["b.png"]["meanDic"] < 1


def test_missing_prediction_is_named(toy_folders):
    gt_dir, pred_dir = toy_folders
    (pred_dir / "b.png").unlink()
    with pytest.raises(EvaluationError, match=r"missing prediction.*b\.png"):
        evaluate_folder(gt_dir, pred_dir)


def test_missing_gt_is_named(toy_folders):
    gt_dir, pred_dir = toy_folders
    shutil.copy(pred_dir / "a.png", pred_dir / "c.png")
    with pytest.raises(EvaluationError, match=r"missing GT.*c\.png"):
        evaluate_folder(gt_dir, pred_dir)


def test_empty_and_absent_folders_are_named(toy_folders, tmp_path):
    gt_dir, _ = toy_folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no PNG files.*empty"):
        evaluate_folder(gt_dir, tmp_path / "empty")
    with pytest.raises(EvaluationError, match="not found.*nowhere"):
        evaluate_folder(gt_dir, tmp_path / "nowhere")


def test_unreadable_image_is_named(toy_folders):
    gt_dir, pred_dir = toy_folders
    (pred_dir / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(EvaluationError, match=r"cannot read image .*a\.png"):
        evaluate_folder(gt_dir, pred_dir)


def test_cli_reports_errors_with_exit_code(toy_folders, tmp_path):
    gt_dir, _ = toy_folders
    (tmp_path / "preds" / "M").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "EvaluationTool", "--gt_root", str(gt_dir),
                           "--pred_root", str(tmp_path / "preds"), "--models", "M",
                           "--save_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no PNG files" in proc.stderr and "M" in proc.stderr


def test_a_closed_stdout_still_writes_the_reports(toy_folders, tmp_path):
    """`python -m EvaluationTool ... | head -1`: the reader goes after one line; the run still ends whole."""
    gt_dir, pred = toy_folders
    (tmp_path / "preds").mkdir()
    pred.rename(tmp_path / "preds" / "M")
    read, write = os.pipe()
    os.close(read)  # no reader: the first line printed meets a broken pipe
    proc = subprocess.run([sys.executable, "-m", "EvaluationTool", "--gt_root", str(gt_dir), "--pred_root",
                           str(tmp_path / "preds"), "--models", "M", "--dataset", "T", "--save_dir",
                           str(tmp_path / "out")],
                          cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "T_M_per_image.csv", "T_result.csv", "T_result.md", "T_result.txt"]


# ---------------------------------------------------------------- real slices through the CLI

LINE = re.compile(r"\(Dataset:(.+); Model:(.+)\) meanDic:(\d\.\d{3});meanSen:(\d\.\d{3});"
                  r"meanSpe:(\d\.\d{3});Sm:(\d\.\d{3});meanEm:(\d\.\d{3});MAE:(\d\.\d{3})\.$")
SLICES = ("18.png", "62.png", "64.png")   # GT-2 of 62 and 64 is empty (no consolidation)


def test_cli_binary_on_real_slices(data_root, tmp_path, capsys):
    src = data_root / "TestingSet" / "LungInfection-Test" / "GT"
    gt_dir = tmp_path / "LungInfection-Test" / "GT"
    gts = {}
    for name in SLICES:
        gts[name] = np.array(Image.open(src / name)) > 128
        for folder in (gt_dir, tmp_path / "Results" / "Perfect"):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / name, folder / name)
        save_png(tmp_path / "Results" / "Blank" / name, np.zeros(gts[name].shape, np.uint8))
    out = tmp_path / "EvaluateResults"
    assert main(["--gt_root", str(gt_dir), "--pred_root", str(tmp_path / "Results"),
                 "--models", "Perfect", "Blank", "--save_dir", str(out)]) == 0

    lines = [LINE.match(line) for line in capsys.readouterr().out.splitlines() if line.startswith("(")]
    assert [(m.group(1), m.group(2)) for m in lines] == [("LungInfection-Test", "Perfect"),
                                                         ("LungInfection-Test", "Blank")]
    for name in ("LungInfection-Test_result.txt", "LungInfection-Test_result.md",
                 "LungInfection-Test_result.csv", "LungInfection-Test_Perfect_per_image.csv",
                 "LungInfection-Test_Blank_per_image.csv"):
        assert (out / name).is_file(), name
    with open(out / "LungInfection-Test_Perfect_per_image.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == sorted(SLICES)

    s = evaluate_folder(gt_dir, tmp_path / "Results" / "Perfect")
    assert s["curves"]["Dic"][0] == 1.0 and s["MAE"] == 0.0
    # Not exactly 1: in 64.png a quadrant holds a single GT pixel, where ssim's alpha and beta
    # are ~1e-13 and the toolbox's `alpha / (beta + eps)` gives 0.9966.
    assert 0.9995 < s["Sm"] < 1.0
    # Every threshold above 0 reproduces the GT; t = 0 switches everything on.
    at_zero = np.mean([2 * g.sum() / (g.sum() + g.size) for g in gts.values()])
    assert s["meanDic"] == pytest.approx((255 + at_zero) / 256)
    assert float(lines[0].group(3)) == round(s["meanDic"], 3)

    blank = evaluate_folder(gt_dir, tmp_path / "Results" / "Blank")
    assert blank["MAE"] == pytest.approx(np.mean([g.mean() for g in gts.values()]))
    assert blank["curves"]["Dic"][0] == 0.0


def test_multiclass_on_real_slices(data_root, tmp_path):
    src = data_root / "TestingSet" / "MultiClassInfection-Test"
    gt_root = tmp_path / "MultiClassInfection-Test"
    for gt_name, cls in (("GT-1", "Ground-glass opacities"), ("GT-2", "Consolidation")):
        for name in SLICES:
            (gt_root / gt_name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / gt_name / name, gt_root / gt_name / name)
            (tmp_path / "Results" / cls / "MC").mkdir(parents=True, exist_ok=True)
            shutil.copy(src / gt_name / name, tmp_path / "Results" / cls / "MC" / name)
    out = tmp_path / "EvaluateResults"
    printed = []
    results = run(gt_root, tmp_path / "Results", ["MC"], task="multiclass", save_dir=out,
                  out=printed.append)
    lines = [LINE.search(line) for line in printed if "(Dataset:" in line]
    assert [m.group(1) for m in lines] == ["MultiClassInfection-Test-1", "MultiClassInfection-Test-2",
                                           "MultiClassInfection-Test"]   # GGO, consolidation, average
    ggo, cons, avg = (results["MC"][k] for k in ("Ground-glass opacities", "Consolidation", "Average"))
    for k in ("meanDic", "Sm", "meanEm", "MAE", "meanPrec"):
        assert avg[k] == pytest.approx((ggo[k] + cons[k]) / 2)
    assert ggo["MAE"] == 0.0 and cons["MAE"] == 0.0
    # An empty consolidation GT with an all-black prediction: S-alpha = 1 - mean(pred) = 1,
    # Dice 0 at every threshold (TP = 0).
    row = {r["name"]: r for r in cons["per_image"]}
    assert row["62.png"]["Sm"] == 1.0 and row["62.png"]["meanDic"] == 0.0
    with open(out / "MultiClassInfection-Test_result.csv") as f:
        assert [r["class"] for r in csv.DictReader(f)] == ["Ground-glass opacities", "Consolidation", "Average"]
    for name in ("MultiClassInfection-Test-1_result.txt", "MultiClassInfection-Test-2_result.txt",
                 "MultiClassInfection-Test_result.md", "MultiClassInfection-Test-2_MC_per_image.csv"):
        assert (out / name).is_file(), name


# ---------------------------------------------------------------- reports, records, warnings

def test_reports_merge_rows_by_model(toy_folders, tmp_path):
    gt_dir, pred_dir = toy_folders
    for model in ("A", "B"):
        shutil.copytree(pred_dir, tmp_path / "preds" / model)
    out = tmp_path / "reports"
    run(gt_dir, tmp_path / "preds", ["A"], dataset="toy", save_dir=out, out=lambda line: None)
    save_png(tmp_path / "preds" / "B" / "a.png", np.zeros((20, 24), np.uint8))  # B differs from A
    run(gt_dir, tmp_path / "preds", ["B"], dataset="toy", save_dir=out, out=lambda line: None)
    with open(out / "toy_result.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["A", "B"]  # A's row kept
    assert rows[0]["meanDic"] != rows[1]["meanDic"]
    assert [line.split(";")[1].split(")")[0] for line in (out / "toy_result.txt").read_text().splitlines()] == \
        [" Model:A", " Model:B"]
    md = (out / "toy_result.md").read_text()
    assert "| A |" in md and "| B |" in md
    # Evaluating A again replaces A's row, keeps B's, in their order.
    run(gt_dir, tmp_path / "preds", ["A"], dataset="toy", save_dir=out, out=lambda line: None)
    with open(out / "toy_result.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["model"] for r in again] == ["A", "B"] and again == rows
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_multiclass_reports_merge_rows_by_model(data_root, tmp_path):
    src = data_root / "TestingSet" / "MultiClassInfection-Test"
    gt_root = tmp_path / "MultiClassInfection-Test"
    for gt_name, cls in (("GT-1", "Ground-glass opacities"), ("GT-2", "Consolidation")):
        for model in ("M1", "M2"):
            (tmp_path / "Results" / cls / model).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / gt_name / "18.png", tmp_path / "Results" / cls / model / "18.png")
        (gt_root / gt_name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / gt_name / "18.png", gt_root / gt_name / "18.png")
    out = tmp_path / "out"
    for model in ("M1", "M2"):
        run(gt_root, tmp_path / "Results", [model], task="multiclass", save_dir=out, out=lambda line: None)
    with open(out / "MultiClassInfection-Test_result.csv") as f:
        assert [(r["model"], r["class"]) for r in csv.DictReader(f)] == [
            (m, c) for m in ("M1", "M2") for c in ("Ground-glass opacities", "Consolidation", "Average")]
    assert (out / "MultiClassInfection-Test-1_result.txt").read_text().count("Model:") == 2


def test_per_image_csv_survives_a_full_disk(toy_folders, tmp_path, monkeypatch):
    import errno

    import EvaluationTool.folder as folder
    gt_dir, pred_dir = toy_folders
    s = evaluate_folder(gt_dir, pred_dir)
    path = folder.write_per_image_csv(s, tmp_path / "out" / "toy_per_image.csv")
    before = path.read_text()
    real = csv.writer

    class FullDisk:
        def __init__(self, f):
            self.writer, self.rows = real(f), 0

        def writerow(self, row):
            self.rows += 1
            if self.rows > 1:  # the header fits, the first row does not
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.writer.writerow(row)
    monkeypatch.setattr(folder.csv, "writer", FullDisk)
    with pytest.raises(OSError):
        folder.write_per_image_csv(s, path)
    assert path.read_text() == before  # the old report, not an empty one
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_save_dir_that_is_a_file_is_one_line(toy_folders, tmp_path, capsys):
    gt_dir, pred_dir = toy_folders
    (tmp_path / "reports").write_text("not a folder")
    assert main(["--gt_root", str(gt_dir), "--pred_root", str(pred_dir.parent), "--models", "pred",
                 "--save_dir", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--save_dir" in err and "is a file" in err


@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--workers", "-1"), ("--workers", "two"),
                                           ("--dataset", "../elsewhere"), ("--dataset", "a/b"), ("--dataset", "..")])
def test_bad_options_are_one_line_before_any_report(toy_folders, tmp_path, capsys, option, value):
    """--workers below one; a --dataset that is not one file name (it names the report files: never rewritten)."""
    gt_dir, pred_dir = toy_folders
    with pytest.raises(SystemExit) as stop:
        main(["--gt_root", str(gt_dir), "--pred_root", str(pred_dir.parent), "--models", "pred",
              "--save_dir", str(tmp_path / "reports"), option, value])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and option in err and "Traceback" not in err, err
    assert not (tmp_path / "reports").exists()


def test_gt_stored_as_0_1_warns_once_and_keeps_the_toolbox_figures(toy_folders, tmp_path, capsys):
    gt_dir, pred_dir = toy_folders
    for p in gt_dir.iterdir():
        save_png(p, (np.array(Image.open(p)) > 0).astype(np.uint8))  # 0/1 instead of 0/255
    with pytest.warns(UserWarning, match="only the values 0 and 1") as caught:
        s = evaluate_folder(gt_dir, pred_dir)
    assert len([w for w in caught if "0 and 1" in str(w.message)]) == 1
    assert str(gt_dir) in str(caught[0].message) and "255" in str(caught[0].message)
    assert s["meanDic"] == 0.0  # the toolbox's figure: GT > 128 is empty
    # the command line: the warning on one line
    assert main(["--gt_root", str(gt_dir), "--pred_root", str(pred_dir.parent), "--models", "pred",
                 "--save_dir", str(tmp_path / "out")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: ") and str(gt_dir) in err[0]


def test_dice_at_the_fixed_threshold(tmp_path, capsys):
    gt = np.zeros((10, 10), np.uint8)
    gt[:, :5] = 255                                   # 50 GT pixels
    pred = np.zeros((10, 10), np.uint8)
    pred[:, :4] = 200                                 # 40 pixels >= 128, all inside the GT
    pred[:, 4:6] = 100                                # 20 pixels below 128 (10 in the GT)
    r = evaluate_pair(pred, gt)
    assert r["fixed"]["Dic"] == pytest.approx(2 * 40 / (50 + 40))
    assert r["fixed"]["Sen"] == pytest.approx(40 / 50) and r["fixed"]["Spe"] == 1.0
    # the map as stored, not min-max stretched: a map below 128 everywhere predicts nothing at 0.5
    faint = (pred // 2).astype(np.uint8)
    assert evaluate_pair(faint, gt)["fixed"]["Dic"] == 0.0 and evaluate_pair(faint, gt)["curves"]["Dic"].max() > 0
    assert evaluate_pair(pred.astype(np.float64) / 255, gt)["fixed"] == r["fixed"]
    for name in ("a.png", "b.png"):
        save_png(tmp_path / "GT" / name, gt)
        save_png(tmp_path / "preds" / "M" / name, pred)
    assert main(["--gt_root", str(tmp_path / "GT"), "--pred_root", str(tmp_path / "preds"), "--models", "M",
                 "--save_dir", str(tmp_path / "out"), "--dataset", "toy"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "threshold 0.5" in x)
    assert f"Dice:{2 * 40 / 90:.3f};Sen:0.800;Spec:1.000" in line and "256 thresholds" in line
    with open(tmp_path / "out" / "toy_result.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["fixedDic"]) == pytest.approx(80 / 90)
    assert "Dice at 0.5" in (tmp_path / "out" / "toy_result.md").read_text()


def test_temporaries_of_a_killed_run_are_not_maps(toy_folders):
    gt_dir, pred_dir = toy_folders
    (pred_dir / ".tmp-0123456789abcdef.png").write_bytes(b"half a png")
    assert evaluate_folder(gt_dir, pred_dir)["n_images"] == 2


def test_record_refuses_mixed_or_unfinished_runs(toy_folders):
    import json

    from EvaluationTool.record import RECORD_NAME, digest
    gt_dir, pred_dir = toy_folders
    maps = {n: digest(pred_dir / n) for n in ("a.png", "b.png")}
    record = {"complete": True, "weights": {"path": "/w/A.pth"}, "maps": maps}
    (pred_dir / RECORD_NAME).write_text(json.dumps(record))
    assert evaluate_folder(gt_dir, pred_dir)["n_images"] == 2
    (pred_dir / RECORD_NAME).write_text(json.dumps({**record, "maps": {"a.png": maps["a.png"]}}))
    with pytest.raises(EvaluationError, match=r"not written by the run.*A\.pth.*b\.png"):
        evaluate_folder(gt_dir, pred_dir)
    (pred_dir / RECORD_NAME).write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(EvaluationError, match="did not finish"):
        evaluate_folder(gt_dir, pred_dir)


def test_unwritable_reports_are_one_line(toy_folders, tmp_path, capsys, monkeypatch):
    """A read-only file system (root ignores chmod, so EROFS is simulated where the report is renamed)."""
    import errno

    import EvaluationTool.folder as folder
    gt_dir, pred_dir = toy_folders

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))
    monkeypatch.setattr(folder.os, "replace", read_only)
    assert main(["--gt_root", str(gt_dir), "--pred_root", str(pred_dir.parent), "--models", "pred",
                 "--save_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Read-only file system" in err and "--save_dir" in err
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------- the toolbox's saved results (.mat)

def save_toolbox_mat(path, summary):
    """What main.m saves for one model: the mean curves over images (1 x 256) and the scalars."""
    from scipy.io import savemat
    path.parent.mkdir(parents=True, exist_ok=True)
    c = summary["curves"]
    savemat(path, {"column_Dic": c["Dic"][None], "column_Sen": c["Sen"][None], "column_Spe": c["Spe"][None],
                   "column_E": c["Em"][None], "Sm": summary["Sm"], "mae": summary["MAE"],
                   **{k: summary[k] for k in ("meanDic", "meanSen", "meanSpe", "meanEm", "maxDic", "maxSen",
                                              "maxSpe", "maxEm")}})
    return path


def test_toolbox_mat_gives_the_figures_at_the_fixed_threshold(data_root, tmp_path, capsys):
    """A published result file yields Dice, Sen, Spec at 128/255: for maps spanning 0-255 (as the release stores
    them) the same figures as evaluating the maps themselves."""
    import cv2

    from EvaluationTool.toolbox_mat import read_toolbox_mat
    src = data_root / "TestingSet" / "LungInfection-Test" / "GT"
    for name in SLICES:
        gt = np.array(Image.open(src / name))
        save_png(tmp_path / "GT" / name, gt)
        soft = cv2.GaussianBlur(gt.astype(np.float64), (41, 41), 12) + np.linspace(0, 60, gt.shape[1])[None]
        soft = np.round((soft - soft.min()) / (soft.max() - soft.min()) * 255).astype(np.uint8)  # 0 ... 255
        save_png(tmp_path / "maps" / name, soft)
    s = evaluate_folder(tmp_path / "GT", tmp_path / "maps")
    mat = save_toolbox_mat(tmp_path / "LungInfection-Test-1-mat" / "Blurred.mat", s)

    r = read_toolbox_mat(mat)
    assert (r["dataset"], r["model"]) == ("LungInfection-Test-1", "Blurred")
    for k in ("Dic", "Sen", "Spe"):
        assert r["fixed" + k] == pytest.approx(s["fixed" + k], abs=1e-12)
        assert r["mean" + k] == pytest.approx(s["mean" + k], abs=1e-12)
    # the cut is 128/255, not a neighbour: the curve's next thresholds give other figures here
    i = int(np.argmin(np.abs(THRESHOLDS - 128 / 255)))
    assert r["curves"]["Dic"][i - 1] != r["fixedDic"] != r["curves"]["Dic"][i + 1]
    assert abs(r["fixedDic"] - r["meanDic"]) > 0.01

    assert main(["--from_mat", str(mat)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("(Dataset:LungInfection-Test-1; Model:Blurred) meanDic:")
    assert f"Dice:{s['fixedDic']:.3f};Sen:{s['fixedSen']:.3f};Spec:{s['fixedSpe']:.3f}" in out[1]
    assert "128/255" in out[1] and "256 thresholds" in out[1]


def test_toolbox_mat_bad_input_is_one_line(tmp_path, capsys):
    from scipy.io import savemat
    savemat(tmp_path / "other.mat", {"x": np.ones(3)})
    (tmp_path / "notes.mat").write_text("not a mat file")
    for args, words in ((["--from_mat", str(tmp_path / "other.mat")], "no column_Dic"),
                        (["--from_mat", str(tmp_path / "notes.mat")], "not a MATLAB .mat file"),
                        (["--from_mat", str(tmp_path / "absent.mat")], "no such file"),
                        (["--from_mat", str(tmp_path / "other.mat"), "--models", "A"], "leave out --models")):
        try:
            rc = main(args)
        except SystemExit as stop:  # argparse's usage errors
            rc = stop.code
        err = capsys.readouterr().err
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
