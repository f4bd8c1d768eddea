"""The six test-set figures against training minutes, for finished runs (issue 16's deliverable).

For each run folder, scores its release-format snapshots (<prefix>-<epoch>.pth; EMA copies are left
out) on the test slices as MyTest_LungInf.py + EvaluationTool do, and reads each snapshot's wall-time
minutes from the run's val.csv (a run trained with --val_split; the row of the snapshot's epoch). Prints a
Markdown table, and writes it with --out. Only for final recipes and baselines: choices are made on
validation (val.csv, bench/cpu_hour_sweep.py), never on this table.

    python bench/test_curve.py Snapshots/save_weights/hour-paper-s1 Snapshots/save_weights/hour-cpu-s1 \
        --data_path ../shared/COVID-SemiSeg/TestingSet/LungInfection-Test --epochs 20 40 60 last
"""
import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_hour_sweep import read_val_csv  # noqa: E402 -- val.csv is read one way

FIGURES = (("meanDic", "Dice"), ("meanSen", "Sen."), ("meanSpe", "Spec."), ("Sm", "S-alpha"),
           ("meanEm", "E-phi mean"), ("MAE", "MAE"))


def snapshots(run_dir):
    """{epoch: path} of a run's release-format snapshots (not the -ema- copies, not checkpoint.pth)."""
    found = {}
    for path in Path(run_dir).glob("*.pth"):
        match = re.fullmatch(r"(.+)-(\d+)\.pth", path.name)
        if match and not match.group(1).endswith("-ema"):
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


def table(rows):
    head = "| run | epoch | minutes | " + " | ".join(label for _, label in FIGURES) + " |"
    lines = [head, "|" + "---|" * (3 + len(FIGURES))]
    for run, epoch, minutes, scores in rows:
        m = f"{minutes:.1f}" if minutes is not None else "-"
        lines.append(f"| {run} | {epoch} | {m} | " + " | ".join(f"{scores[k]:.4f}" for k, _ in FIGURES) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (<snapshot_root>/save_weights/<train_save>)")
    p.add_argument("--data_path", default="Dataset/TestingSet/LungInfection-Test", help="holds Imgs/ and GT/")
    p.add_argument("--epochs", nargs="+", default=None, help="snapshot epochs to score, or 'last' (default: all)")
    p.add_argument("--testsize", type=int, default=352)
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    a = p.parse_args(argv)

    from Code.model_lung_infection.infer import default_amp, load_inf_net, predict_folder
    from EvaluationTool import evaluate_folder
    data = Path(a.data_path)
    rows = []
    for run in map(Path, a.runs):
        snaps, minutes = snapshots(run), minutes_by_epoch(run)
        if not snaps:
            raise SystemExit(f"error: no <prefix>-<epoch>.pth snapshot in {run}: pass run folders of "
                             f"MyTrain_LungInf.py")
        for epoch in chosen(snaps, a.epochs):
            with tempfile.TemporaryDirectory() as out:
                predict_folder(load_inf_net(snaps[epoch], device="cpu"), data, Path(out), a.testsize, progress=False,
                               amp=default_amp("cpu"))  # MyTest_LungInf.py's default precision
                scores = evaluate_folder(data / "GT", Path(out), dataset=data.name, model=run.name)
            rows.append((run.name, epoch, minutes.get(epoch), scores))
            print(f"{run.name} epoch {epoch}: " + " ".join(f"{label} {scores[k]:.4f}" for k, label in FIGURES),
                  flush=True)
    text = table(rows)
    print("\n" + text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
