"""Writing a reproduced table: our figures beside the paper's (Markdown and CSV, EvaluationTool.report's writer)."""
from pathlib import Path

from EvaluationTool.report import TABLE_COLUMNS
from EvaluationTool.report import write_table as write_files

from .complexity import si_units
from .table_plan import CLASS_SHORT, CLASSES, PAPER, PAPER_KEYS, PAPER_METRICS, TITLES


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


def _never_predicted(result):
    """The classes (CLASS_SHORT names; 'infection' for a binary row) the row predicts on no test slice."""
    empty = result.get("empty_maps") or {}  # rows written before it was recorded have none
    return [CLASS_SHORT.get(cls, cls) for cls, n in empty.items() if n["slices"] and n["empty"] == n["slices"]]


def _test_slices(results):
    """The test slices the rows were scored on, as counted when each was scored, and where they were."""
    counts = sorted({r.get("test_slices") for r in results.values()} - {None})
    roots = sorted({r.get("data_root") for r in results.values()} - {None})
    if not counts:  # rows written before the count was recorded
        return "the test slices"
    text = (f"{counts[0]} test slice{'s' * (counts[0] != 1)}" if len(counts) == 1 else
            f"{' or '.join(map(str, counts))} test slices (see the csv's test_slices column)")
    return text + (f" of `{'`, `'.join(roots)}`" if roots else "")


EMPTY_NOTE = ("† after a row's name: it predicts nothing of that class (binary tables: no pixel at probability "
              "0.5) on any test slice, so those figures measure nothing: an empty map scores Dice 0 at every "
              "threshold but the lowest, where every pixel counts as positive.")


def write_table(table, rows, results, results_root="Results/tables"):
    """Results/tables/table_<X>.md and .csv from row results; returns the two paths."""
    root = Path(results_root)
    budgets = sorted({f"`{r['budget']['name']}` ({r['budget_text']}) on {r['device']}" for r in results.values()})
    inits = {r["pretrained"] for r in results.values()}
    init = ("mixed initialisation (see the csv's pretrained column)" if len(inits) > 1 else
            "ImageNet-initialised encoders (local files)" if True in inits else
            "encoders from random weights (no ImageNet file)")
    preamble = [f"# {TITLES[table]}", "",
          "Each cell: **ours** / paper. Ours: measured by `reproduce.py` with the budget in the last column, "
          f"{init}, on {_test_slices(results)} with EvaluationTool. "
          "Paper: Fan et al., IEEE TMI 2020 (ImageNet-pretrained encoders, full recipe). "
          "Params / FLOPs: ours at 352 x 352 (FLOPs = multiply-accumulates, as the paper's thop counts) "
          "/ paper.", "", "Budget(s): " + "; ".join(budgets), "", ""]
    if any(_never_predicted(r) for r in results.values()):
        preamble[-1:-1] = [EMPTY_NOTE, ""]
    first = results[rows[0].name]
    labels = [label for label, _, _ in _metric_pairs(table, {}, first)]
    header = ["Method", "Backbone", "Params", "FLOPs", *labels, "Budget"]
    md_rows, csv_rows = [], []
    for row in rows:
        r = results[row.name]
        # By the table's own row name: a shared run (Table II's Semi-Inf-Net is Table IV's No.7)
        # records the name of the table that trained it.
        paper = _paper_row(table, row.name)
        pairs = _metric_pairs(table, paper, r)
        never = _never_predicted(r)
        name = f"{row.name} †{' '.join(never)}" if never else row.name
        cells = [name, row.backbone, f"{si_units(r['params'])} / {paper.get('params', '-')}",
                 f"{si_units(r['macs'])} / {paper.get('flops', '-')}"]
        cells += [f"**{_fmt(ours)}** / {_fmt(p)}" for _, ours, p in pairs]
        cells.append(r["budget_text"])
        md_rows.append(cells)
        rec = {"table": table, "row": row.name, "run": r["run"], "backbone": row.backbone, "params": r["params"],
               "macs": r["macs"], "paper_params": paper.get("params", ""), "paper_flops": paper.get("flops", "")}
        for label, ours, p in pairs:
            key = label.lower().replace(" ", "_").replace(".", "")
            rec[f"{key}_ours"], rec[f"{key}_paper"] = round(ours, 4), "" if p is None else p
        rec.update(budget=r["budget"]["name"], budget_text=r["budget_text"], device=r["device"],
                   pretrained=r["pretrained"], minutes=r.get("minutes"), never_predicted=" ".join(never),
                   test_slices=r.get("test_slices", ""), data_root=r.get("data_root", ""))
        csv_rows.append(rec)
    md_path, csv_path = write_files(root / f"table_{table}.md", root / f"table_{table}.csv", header, md_rows,
                                    list(csv_rows[0]), [list(r.values()) for r in csv_rows], "\n".join(preamble))
    return md_path, csv_path
