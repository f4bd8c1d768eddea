"""Markdown / CSV / text reports of folder summaries (see folder.evaluate_folder), and the one Markdown +
CSV table writer (`write_table`) that reproduce.py's tables use too."""
import csv
import io
import math
from pathlib import Path

from .folder import FIXED_SUMMARY_KEYS, SUMMARY_KEYS, EvaluationError, release_line, safe_name, write_atomically

# Columns of the paper's tables (Table II / III) and their summary keys.
TABLE_COLUMNS = (("Dice", "meanDic"), ("Sen.", "meanSen"), ("Spec.", "meanSpe"),
                 ("S-alpha", "Sm"), ("E-phi mean", "meanEm"), ("MAE", "MAE"))
FIXED_COLUMNS = ("Dice", "Sen.", "Spec.")  # at the fixed threshold 0.5 (FIXED_SUMMARY_KEYS)
SHORT = {"Ground-glass opacities": "GGO", "Consolidation": "Cons.", "Average": "Avg."}
# main.m's multi-class layout: prediction sub-folder -> GT folder inside MultiClassInfection-Test.
MULTICLASS = (("Ground-glass opacities", "GT-1"), ("Consolidation", "GT-2"))


def average(summaries):
    """Scalar-wise mean of several summaries (Table III's "Average" of GGO and consolidation)."""
    return {k: sum(s[k] for s in summaries) / len(summaries) for k in SUMMARY_KEYS}


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"




def write_table(md_path, csv_path, header, rows, csv_header=None, csv_rows=None, preamble=""):
    """`md_path`: `preamble` then a Markdown table (header, rows of strings); `csv_path`: `csv_header` and
    `csv_rows` (default: the Markdown's; e.g. unrounded figures). Both written atomically; returns the paths."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header if csv_header is None else csv_header)
    writer.writerows(rows if csv_rows is None else csv_rows)
    return [write_atomically(md_path, preamble + markdown_table(header, rows)),
            write_atomically(csv_path, buf.getvalue())]


def write_text(lines, path):
    return write_atomically(path, "".join(line + "\n" for line in lines))


def _number(text):
    return float(text) if text not in ("", None) else math.nan


def earlier_rows(csv_path, key_columns):
    """{model: {key: {summary key: value}}} of a report CSV written earlier (key: the row's class for the
    multi-class report, None for the binary one), so that evaluating another model adds its row instead of
    dropping theirs. A CSV of another layout is refused rather than replaced."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return {}
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = rows and list(rows[0])
    if rows and not set(key_columns) <= set(header):
        raise EvaluationError(f"{csv_path}: a report of another layout (columns {', '.join(header[:4])}...) is in "
                              f"the way; move it, or give another --save_dir")
    merged = {}
    for row in rows:
        group = row.get("class")
        values = {k: _number(row.get(k)) for k in SUMMARY_KEYS}
        values["n_images"] = row.get("n_images")
        merged.setdefault(row["model"], {})[group] = values
    return merged


def _merged_binary(results, csv_path):
    """Earlier rows (by model) with this run's replacing those of the same model, earlier order first."""
    merged = {m: groups[None] for m, groups in earlier_rows(csv_path, ("dataset", "model", "n_images")).items()}
    merged.update(results)
    return merged


def write_binary_reports(results, dataset, save_dir):
    """results: {model: summary}. Writes <dataset>_result.{txt,md,csv} (merged by model with the rows of the
    models evaluated there earlier); returns their paths."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    results = _merged_binary(results, save_dir / f"{safe_name(dataset)}_result.csv")
    txt = write_text([release_line(s, dataset, m) for m, s in results.items()],
                     save_dir / f"{safe_name(dataset)}_result.txt")

    header = (["Model"] + [c for c, _ in TABLE_COLUMNS] + ["Prec.", "max Dice", "max E-phi"]
              + [f"{c} at 0.5" for c in FIXED_COLUMNS])
    rows = [[m] + [f"{s[k]:.3f}" for _, k in TABLE_COLUMNS]
            + [f"{s['meanPrec']:.3f}", f"{s['maxDic']:.3f}", f"{s['maxEm']:.3f}"]
            + [f"{s[k]:.3f}" for k in FIXED_SUMMARY_KEYS]
            for m, s in results.items()]
    csv_rows = [[dataset, m, s["n_images"]] + [repr(float(s[k])) for k in SUMMARY_KEYS] for m, s in results.items()]
    return [txt, *_write_table_and_csv(save_dir, dataset, header, rows, ("dataset", "model", "n_images"), csv_rows)]


def write_multiclass_reports(results, dataset, classes, save_dir):
    """results: {model: {class_name: summary, ..., 'Average': averaged scalars}}, classes in
    GT-1, GT-2 order. Writes one release-format txt per class (as the toolbox names them),
    a Table III-style Markdown table and a CSV."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    earlier = earlier_rows(save_dir / f"{safe_name(dataset)}_result.csv", ("dataset", "model", "class"))
    results = {**earlier, **results}  # merged by model: this run's rows replace the same model's
    paths = []
    for c, cls in enumerate(classes, start=1):
        lines = [release_line(per_class[cls], f"{dataset}-{c}", m) for m, per_class in results.items()]
        paths.append(write_text(lines, save_dir / f"{safe_name(dataset)}-{c}_result.txt"))

    groups = list(classes) + ["Average"]
    header = ["Model"] + [f"{SHORT.get(g, g)} {c}" for g in groups for c, _ in TABLE_COLUMNS]
    rows = [[m] + [f"{per_class[g][k]:.3f}" for g in groups for _, k in TABLE_COLUMNS]
            for m, per_class in results.items()]
    csv_rows = [[dataset, m, g] + [repr(float(per_class[g][k])) for k in SUMMARY_KEYS]
                for m, per_class in results.items() for g in groups]
    return paths + _write_table_and_csv(save_dir, dataset, header, rows, ("dataset", "model", "class"), csv_rows)


def _write_table_and_csv(save_dir, dataset, header, rows, csv_key_columns, csv_rows):
    """`<dataset>_result.md` (rounded table) and `<dataset>_result.csv` (all scalars, full precision)."""
    return write_table(save_dir / f"{safe_name(dataset)}_result.md", save_dir / f"{safe_name(dataset)}_result.csv",
                       header, rows, tuple(csv_key_columns) + tuple(SUMMARY_KEYS), csv_rows, f"# {dataset}\n\n")
