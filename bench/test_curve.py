"""The six test-set figures against training minutes, for finished runs (issue 16's deliverable).

For each run folder, scores its release-format snapshots (<prefix>-<epoch>.pth; with --ema the
averaged copies <prefix>-ema-<epoch>.pth instead, the weights a --ema run validated) on the test
slices as MyTest_LungInf.py + EvaluationTool do, and reads each snapshot's wall-time
minutes from the run's val.csv (a run trained with --val_split; the row of the snapshot's epoch). Prints a
Markdown table, and writes it with --out. Only for final recipes and baselines: choices are made on
validation (val.csv, bench/cpu_hour_sweep.py), never on this table.

    python bench/test_curve.py Snapshots/save_weights/hour-paper-s1 Snapshots/save_weights/hour-cpu-s1 \
        --data_path ../shared/COVID-SemiSeg/TestingSet/LungInfection-Test --epochs 20 40 60 last \
        --normal_scan ../shared/realct/chest-normal-dicom

--normal_scan adds what each snapshot calls infected in a scan with no infection (the volume stage's
infection_percent and mL, lungs from HU): every doctor-labelled slice is infected, so a model may learn to
find infection everywhere; at equal Dice, prefer the one that calls less of a normal lung infected.

--tta none hflip scores each snapshot as MyTest_LungInf.py does with each --tta. --held_out scores each run on
its own held-out validation slices (the --val_split slices recorded in its checkpoint.pth) instead of
--data_path: choices such as --tta are made there, then reported on the test slices.

    python bench/test_curve.py Snapshots/save_weights/A Snapshots/save_weights/B --epochs last \
        --tta none hflip flips --held_out
"""
import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_hour_sweep import read_val_csv  # noqa: E402 -- val.csv is read one way

from Code.model_lung_infection.maps import TTA_VIEWS  # noqa: E402 -- light: no torch

# The toolbox's six (Dice: the mean over 256 thresholds, as the paper reports), then Dice at the fixed
# threshold 0.5, as most later papers report it.
FIGURES = (("meanDic", "Dice"), ("meanSen", "Sen."), ("meanSpe", "Spec."), ("Sm", "S-alpha"),
           ("meanEm", "E-phi mean"), ("MAE", "MAE"), ("fixedDic", "Dice@0.5"))


def snapshots(run_dir, ema=False):
    """{epoch: path} of a run's release-format snapshots (not checkpoint.pth): the trained weights, or with
    `ema` the averaged copies (-ema-)."""
    found = {}
    for path in Path(run_dir).glob("*.pth"):
        match = re.fullmatch(r"(.+)-(\d+)\.pth", path.name)
        if match and match.group(1).endswith("-ema") == ema:
            found[int(match.group(2))] = path
    return dict(sorted(found.items()))


def minutes_by_epoch(run_dir):
    """{epoch: wall-time minutes} from the run's val.csv ({} without one)."""
    return {epoch: minutes for epoch, minutes, _ in read_val_csv(Path(run_dir) / "val.csv")}


def chosen(epochs, wanted):
    """The snapshot epochs to score: all, or those listed ('last': the highest)."""
    if not wanted:
        return list(epochs)
    picks = {max(epochs) if w == "last" else int(w) for w in wanted}
    missing = sorted(picks - set(epochs))
    if missing:
        raise SystemExit(f"error: no snapshot of epoch(s) {missing}; the run has {list(epochs)}")
    return sorted(picks)


def table(rows, normal=False):
    extra = ["normal scan infected"] if normal else []
    head = "| run | epoch | minutes | " + " | ".join([label for _, label in FIGURES] + extra) + " |"
    lines = [head, "|" + "---|" * (3 + len(FIGURES) + len(extra))]
    for run, epoch, minutes, scores, false_inf in rows:
        m = f"{minutes:.1f}" if minutes is not None else "-"
        cells = [f"{scores[k]:.4f}" for k, _ in FIGURES]
        if normal:
            cells.append(f"{false_inf[0]:.2f}% ({false_inf[1]:.0f} mL)")
        lines.append(f"| {run} | {epoch} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def false_infection(weights, scan, tta="none"):
    """(infection_percent, infection_ml) the volume stage reports for `scan` with these weights."""
    from Code.model_lung_infection.volume.predict import run_volumes
    with tempfile.TemporaryDirectory() as out:
        done = run_volumes(dict(data_path=str(scan), pth_path=str(weights), save_path=str(Path(out) / "v"), tta=tta))
    (summary,) = done.summaries.values()
    return summary["infection_percent"], summary["infection_ml"]


def held_out_folder(run, into):
    """`into`/Imgs and GT/ holding the run's held-out validation slices (checkpoint.pth: val_stems of train_path)."""
    import shutil

    import torch
    checkpoint = Path(run) / "checkpoint.pth"
    if not checkpoint.is_file():
        raise SystemExit(f"error: no {checkpoint}: --held_out needs run folders of MyTrain_LungInf.py")
    config = torch.load(checkpoint, map_location="cpu", weights_only=False)["config"]
    if not config.get("val_stems"):
        raise SystemExit(f"error: {run} was trained without --val_split: it holds no slices out")
    roots = config["train_path"] if isinstance(config["train_path"], (list, tuple)) else [config["train_path"]]
    for kind in ("Imgs", "GT"):
        (Path(into) / kind).mkdir(parents=True)
        for stem in config["val_stems"]:
            found = [f for root in roots for f in (Path(root) / kind).glob(f"{stem}.*")]
            if len(found) != 1:
                raise SystemExit(f"error: held-out slice {stem}: {len(found)} files in {kind}/ of "
                                 f"{', '.join(map(str, roots))} (expected one)")
            shutil.copy(found[0], Path(into) / kind / found[0].name)
    return Path(into)


def score_run(run, data, a, amp):
    """Rows of `table` for each chosen snapshot of `run` and each --tta, scored on the slices of `data`."""
    from Code.model_lung_infection.infer import load_for_test, predict_folder
    from Code.model_lung_infection.tta import with_tta
    from EvaluationTool import evaluate_folder
    rows = []
    snaps, minutes = snapshots(run, a.ema), minutes_by_epoch(run)
    if not snaps:
        kind = "<prefix>-ema-<epoch>.pth" if a.ema else "<prefix>-<epoch>.pth"
        raise SystemExit(f"error: no {kind} snapshot in {run}: pass run folders of MyTrain_LungInf.py"
                         + (" trained with --ema" if a.ema else ""))
    for epoch in chosen(snaps, a.epochs):
        model = load_for_test(snaps[epoch], device="cpu", amp=amp)  # loaded once, wrapped for each --tta
        for tta in a.tta:
            name = run.name + (f" --tta {tta}" if tta != "none" else "")
            with tempfile.TemporaryDirectory() as out:
                predict_folder(with_tta(model, tta), data, Path(out), a.testsize, progress=False, amp=amp,
                               prepare=False)
                scores = evaluate_folder(data / "GT", Path(out), dataset=data.name, model=run.name)
            false_inf = false_infection(snaps[epoch], a.normal_scan, tta) if a.normal_scan else None
            rows.append((name, epoch, minutes.get(epoch), scores, false_inf))
            print(f"{name} epoch {epoch}: " + " ".join(f"{label} {scores[k]:.4f}" for k, label in FIGURES)
                  + (f" normal-scan infected {false_inf[0]:.2f}% ({false_inf[1]:.0f} mL)" if false_inf else ""),
                  flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (<snapshot_root>/save_weights/<train_save>)")
    p.add_argument("--data_path", default="Dataset/TestingSet/LungInfection-Test", help="holds Imgs/ and GT/")
    p.add_argument("--epochs", nargs="+", default=None, help="snapshot epochs to score, or 'last' (default: all)")
    p.add_argument("--testsize", type=int, default=352)
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--normal_scan", default=None,
                   help="a CT scan without infection (NIfTI or DICOM folder): add each snapshot's false infection")
    p.add_argument("--ema", action="store_true", help="score the averaged snapshots of runs trained with --ema")
    p.add_argument("--tta", nargs="+", default=["none"], choices=list(TTA_VIEWS),
                   help="score each snapshot with each --tta of the test stage")
    p.add_argument("--held_out", action="store_true",
                   help="score each run on its held-out validation slices instead of --data_path")
    a = p.parse_args(argv)

    from Code.model_lung_infection.infer import default_amp
    amp = default_amp("cpu")  # MyTest_LungInf.py's default precision
    rows = []
    for run in map(Path, a.runs):
        with tempfile.TemporaryDirectory() as tmp:  # the held-out slices' copy, removed on any exit
            data = held_out_folder(run, Path(tmp) / "held-out") if a.held_out else Path(a.data_path)
            rows += score_run(run, data, a, amp)
    text = table(rows, normal=bool(a.normal_scan))
    print("\n" + text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
