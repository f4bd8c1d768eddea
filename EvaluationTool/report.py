"""Markdown / CSV / text reports of folder summaries (see folder.evaluate_folder), and the one Markdown +
CSV table writer (`write_table`) that reproduce.py's tables use too."""
import csv
import io
import os
import tempfile
from pathlib import Path

from .folder import SUMMARY_KEYS, release_line, safe_name

# Columns of the paper's tables (Table II / III) and their summary keys.
TABLE_COLUMNS = (("Dice", "meanDic"), ("Sen.", "meanSen"), ("Spec.", "meanSpe"),
                 ("S-alpha", "Sm"), ("E-phi mean", "meanEm"), ("MAE", "MAE"))
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


def _write_atomically(path, text):
    """Write a text file through a temporary file and a rename: never half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_table(md_path, csv_path, header, rows, csv_header=None, csv_rows=None, preamble=""):
    """`md_path`: `preamble` then a Markdown table (header, rows of strings); `csv_path`: `csv_header` and
    `csv_rows` (default: the Markdown's; e.g. unrounded figures). Both written atomically; returns the paths."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header if csv_header is None else csv_header)
    writer.writerows(rows if csv_rows is None else csv_rows)
    return [_write_atomically(md_path, preamble + markdown_table(header, rows)),
            _write_atomically(csv_path, buf.getvalue())]


def write_text(lines, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_binary_reports(results, dataset, save_dir):
    """results: {model: summary}. Writes <dataset>_result.{txt,md,csv}; returns their paths."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    txt = write_text([release_line(s, dataset, m) for m, s in results.items()],
                     save_dir / f"{safe_name(dataset)}_result.txt")

    header = ["Model"] + [c for c, _ in TABLE_COLUMNS] + ["Prec.", "max Dice", "max E-phi"]
    rows = [[m] + [f"{s[k]:.3f}" for _, k in TABLE_COLUMNS]
            + [f"{s['meanPrec']:.3f}", f"{s['maxDic']:.3f}", f"{s['maxEm']:.3f}"]
            for m, s in results.items()]
    csv_rows = [[dataset, m, s["n_images"]] + [repr(float(s[k])) for k in SUMMARY_KEYS] for m, s in results.items()]
    return [txt, *_write_table_and_csv(save_dir, dataset, header, rows, ("dataset", "model", "n_images"), csv_rows)]


def write_multiclass_reports(results, dataset, classes, save_dir):
    """results: {model: {class_name: summary, ..., 'Average': averaged scalars}}, classes in
    GT-1, GT-2 order. Writes one release-format txt per class (as the toolbox names them),
    a Table III-style Markdown table and a CSV."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
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
