"""Result files of an evaluation: JSON, Markdown, CSV, per-query arrays and plots.

An output directory holds:
  results.json      the schema in DESIGN.md ("Evaluation grid"); extra metrics inside entries
  results.md        summary, language groups, per-language table and the mAP grid
  settings.csv      one row per setting (X->Y and X->all) with every metric
  per_query.npz     per-query metrics of every setting (what `python -m hybrid_jax.compare` tests)
  grid_map.png      query language x candidate language heatmap of mAP (+ the pool column)
  rank_distance.png multilingual rank distance per query language
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import grid as grid_lib
from hybrid_jax.eval import metrics as metrics_lib

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SETTINGS_CSV = "settings.csv"
PER_QUERY = "per_query.npz"
GRID_PNG = "grid_map.png"
RANK_DISTANCE_PNG = "rank_distance.png"

_LABELS = {"map": "mAP", "recall@1": "R@1", "recall@10": "R@10", "recall@100": "R@100",
           "ndcg@10": "nDCG@10", "mrr": "MRR", "rank_distance": "rank dist."}


class ResultsNotFoundError(errors.UserError, FileNotFoundError):
  """An evaluation output directory lacks results.json or per_query.npz (a path the user gave)."""


def _json_safe(value):
  """NaN (a setting with no evaluated query) becomes null: strict JSON has no NaN."""
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value


def _fmt(value, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, int):
    return str(value)
  return f"{value:.{digits}f}"


def write_results_json(out_dir: str, results: dict, extra: dict | None = None) -> str:
  """results.json; `extra` (e.g. source, command, timings) goes to results_meta.json."""
  path = os.path.join(out_dir, RESULTS_JSON)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_json_safe(results), f, indent=1, allow_nan=False)
  if extra:
    with open(os.path.join(out_dir, "results_meta.json"), "w", encoding="utf-8") as f:
      json.dump(_json_safe(extra), f, indent=1, allow_nan=False, default=str)
  return path


def _existing_output(out_dir: str, name: str) -> str:
  """The path of `name` in an evaluation output directory; a ResultsNotFoundError if absent."""
  path = os.path.join(out_dir, name)
  if not os.path.isfile(path):
    raise ResultsNotFoundError(
        f"{path} does not exist: is {out_dir!r} an evaluation output directory? "
        f"{RESULTS_JSON} and {PER_QUERY} are written there by python -m hybrid_jax.evaluate.")
  return path


def read_results_json(out_dir: str) -> dict:
  with open(_existing_output(out_dir, RESULTS_JSON), encoding="utf-8") as f:
    return json.load(f)


def summary_table(results: dict) -> str:
  """Markdown table of the three summaries (what the README and the console show)."""
  cols = ("map", "recall@1", "recall@10", "recall@100", "ndcg@10", "mrr", "rank_distance")
  lines = ["| setting | " + " | ".join(_LABELS[c] for c in cols) +
           " | settings | queries | skipped |",
           "|---" * (len(cols) + 4) + "|"]
  names = (("monolingual", "monolingual (X->X)"), ("cross_lingual", "cross-lingual (X->Y)"),
           ("multilingual", "multilingual (X->all)"))
  for key, label in names:
    entry = results["summary"].get(key)
    if not entry:
      continue
    cells = [_fmt(entry.get(c), 1 if c == "rank_distance" else 3) for c in cols]
    cells += [str(entry["num_settings"]), str(entry["num_queries"]), str(entry["num_skipped"])]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _group_table(results: dict) -> str | None:
  summary = results["summary"]
  groups = sorted({k.split("/")[0] for entry in summary.values() if entry
                   for k in entry if "/" in k})
  if not groups:
    return None
  lines = ["| group | mono mAP | cross mAP | multi mAP | multi rank dist. |", "|---|---|---|---|---|"]
  for g in groups:
    cells = []
    for key, metric in (("monolingual", "map"), ("cross_lingual", "map"), ("multilingual", "map"),
                        ("multilingual", "rank_distance")):
      entry = summary.get(key) or {}
      cells.append(_fmt(entry.get(f"{g}/{metric}"), 1 if metric == "rank_distance" else 3))
    lines.append(f"| {g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def map_matrix(results: dict) -> tuple[list[str], list[str], np.ndarray]:
  """mAP grid [query lang, candidate lang (+ pool)] with NaN where a setting has no query."""
  langs = results["languages"]
  # Query languages of either kind of entry: a corpus-scale search scores only X->all.
  query_langs = sorted({e["query_lang"] for e in results["settings"]
                        + results["multilingual_by_lang"]}, key=langs.index)
  cand_cols = list(langs) + ([grid_lib.POOL] if results["multilingual_by_lang"] else [])
  grid = np.full((len(query_langs), len(cand_cols)), np.nan)
  for s in results["settings"]:
    if s.get("map") is not None:
      grid[query_langs.index(s["query_lang"]), cand_cols.index(s["candidate_lang"])] = s["map"]
  for e in results["multilingual_by_lang"]:
    if e.get("map") is not None:
      grid[query_langs.index(e["query_lang"]), -1] = e["map"]
  return query_langs, cand_cols, grid


def _per_language_table(results: dict) -> str:
  query_langs, cand_cols, grid = map_matrix(results)
  langs = results["languages"]
  by_lang = {e["query_lang"]: e for e in results["multilingual_by_lang"]}
  mono = {s["query_lang"]: s for s in results["settings"] if s["query_lang"] == s["candidate_lang"]}
  lines = ["| lang | X->X mAP | X->X R@1 | X->X R@10 | X->Y mAP (mean over Y) | "
           "Y->X mAP (mean over Y) | X->all mAP | X->all R@10 | rank dist. | queries |",
           "|---" * 10 + "|"]
  for i, x in enumerate(query_langs):
    j = langs.index(x)
    others = [c for c in range(len(langs)) if c != j]
    out_of_x = np.nanmean(grid[i, others]) if others and not np.all(np.isnan(grid[i, others])) \
        else math.nan
    into_rows = [r for r, q in enumerate(query_langs) if q != x]
    col = grid[into_rows, j] if into_rows else np.array([math.nan])
    into_x = np.nanmean(col) if not np.all(np.isnan(col)) else math.nan
    m, e = mono.get(x, {}), by_lang.get(x, {})
    lines.append("| " + " | ".join([
        x, _fmt(m.get("map")), _fmt(m.get("recall@1")), _fmt(m.get("recall@10")),
        _fmt(float(out_of_x)), _fmt(float(into_x)), _fmt(e.get("map")), _fmt(e.get("recall@10")),
        _fmt(e.get("rank_distance"), 1), str(m.get("num_queries", e.get("num_queries", "-")))]) + " |")
  return "\n".join(lines)


def _grid_table(results: dict) -> str:
  query_langs, cand_cols, grid = map_matrix(results)
  lines = ["| query \\ candidate | " + " | ".join(cand_cols) + " |", "|---" * (len(cand_cols) + 1) + "|"]
  for i, x in enumerate(query_langs):
    lines.append(f"| {x} | " + " | ".join(_fmt(float(v)) for v in grid[i]) + " |")
  return "\n".join(lines)


def write_markdown(out_dir: str, results: dict, header_lines: Sequence[str] = ()) -> str:
  parts = [f"# Retrieval grid: {results['dataset']}", ""]
  parts += list(header_lines) + ([""] if header_lines else [])
  parts += [f"Languages: {' '.join(results['languages'])}. Settings are macro-averaged; "
            "queries without a relevant candidate in a setting are skipped (column 'skipped').",
            "", "## Summary", "", summary_table(results), ""]
  groups = _group_table(results)
  if groups:
    parts += ["## Language groups", "",
              "mono: X->X with X in the group; cross: X->Y (X != Y) with X or Y in the group; "
              "multi: X->all with X in the group.", "", groups, ""]
  parts += ["## Per query language", "", _per_language_table(results), "",
            "## mAP grid (rows: query language, columns: candidate language)", "",
            _grid_table(results), ""]
  path = os.path.join(out_dir, RESULTS_MD)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
  return path


CSV_COLUMNS = ("query_lang", "candidate_lang", "setting", "map", "recall@1", "recall@10",
               "recall@100", "ndcg@10", "mrr", "rank_distance", "num_queries", "num_skipped")


def write_settings_csv(out_dir: str, results: dict) -> str:
  path = os.path.join(out_dir, SETTINGS_CSV)
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for s in results["settings"]:
      kind = "monolingual" if s["query_lang"] == s["candidate_lang"] else "cross_lingual"
      writer.writerow({**{k: ("" if v is None or v != v else v) for k, v in s.items()},
                       "setting": kind, "rank_distance": ""})
    for e in results["multilingual_by_lang"]:
      writer.writerow({**{k: ("" if v is None or v != v else v) for k, v in e.items()},
                       "candidate_lang": grid_lib.POOL, "setting": "multilingual"})
  return path


def write_per_query(out_dir: str, collection: collection_lib.Collection,
                    per_query: metrics_lib.PerQueryMetrics) -> str:
  """Per-query metrics [Q, S] (S = candidate languages + pool), NaN where skipped."""
  path = os.path.join(out_dir, PER_QUERY)
  arrays = {f"metric/{m}": v for m, v in per_query.values.items()}
  np.savez_compressed(
      path, query_uids=np.array(collection.query_uids), query_langs=np.array(collection.query_langs),
      setting_columns=np.array(grid_lib.setting_columns(collection)),
      num_relevant=per_query.num_relevant, rank_distance=per_query.rank_distance,
      best_rank=per_query.best_rank, **arrays)
  return path


def read_per_query(out_dir: str) -> dict:
  with np.load(_existing_output(out_dir, PER_QUERY), allow_pickle=False) as data:
    out = {k: data[k] for k in data.files}
  out["metrics"] = {k.split("/", 1)[1]: out.pop(k) for k in list(out) if k.startswith("metric/")}
  out["metrics"]["rank_distance"] = out["rank_distance"]
  return out


def plot_grid(out_dir: str, results: dict, title: str = "") -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  query_langs, cand_cols, grid = map_matrix(results)
  fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(cand_cols), 1.0 + 0.55 * len(query_langs)))
  image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0,
                    vmax=max(1e-6, float(np.nanmax(grid))) if np.isfinite(grid).any() else 1.0)
  ax.set_xticks(range(len(cand_cols)), cand_cols)
  ax.set_yticks(range(len(query_langs)), query_langs)
  ax.set_xlabel("candidate language")
  ax.set_ylabel("query language")
  if cand_cols and cand_cols[-1] == grid_lib.POOL:
    ax.axvline(len(cand_cols) - 1.5, color="white", linewidth=3)
  threshold = 0.6 * np.nanmax(grid) if np.isfinite(grid).any() else 0.0
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      if np.isfinite(grid[i, j]):
        ax.text(j, i, f"{grid[i, j]:.3f}".lstrip("0"), ha="center", va="center", fontsize=7,
                color="black" if grid[i, j] > threshold else "white")
  ax.set_title(title or f"{results['dataset']}: mAP by query x candidate language")
  fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="mAP")
  fig.tight_layout()
  path = os.path.join(out_dir, GRID_PNG)
  fig.savefig(path, dpi=130)
  plt.close(fig)
  return path


def plot_rank_distance(out_dir: str, results: dict, title: str = "") -> str | None:
  by_lang = [e for e in results["multilingual_by_lang"] if e.get("rank_distance") is not None]
  if not by_lang:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  langs = [e["query_lang"] for e in by_lang]
  values = [e["rank_distance"] for e in by_lang]
  macro = results["summary"]["multilingual"]["rank_distance"]
  fig, ax = plt.subplots(figsize=(1.5 + 0.55 * len(langs), 3.6))
  bars = ax.bar(langs, values, color="#4c72b0")
  ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7, padding=2)
  ax.axhline(macro, color="#c44e52", linestyle="--", label=f"macro average {macro:.1f}")
  ax.set_xlabel("query language")
  ax.set_ylabel("rank distance (lower is better)")
  ax.set_title(title or f"{results['dataset']}: language bias in the multilingual pool")
  ax.legend(loc="upper right", fontsize=8)
  ax.set_ylim(0, max(values + [macro]) * 1.3 + 1e-9)  # room for the bar labels and the legend
  fig.tight_layout()
  path = os.path.join(out_dir, RANK_DISTANCE_PNG)
  fig.savefig(path, dpi=130)
  plt.close(fig)
  return path


def write_all(out_dir: str, collection: collection_lib.Collection,
              per_query: metrics_lib.PerQueryMetrics, results: dict,
              header_lines: Sequence[str] = (), meta: dict | None = None) -> list[str]:
  """Every output file of one evaluation; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  written = [write_results_json(out_dir, results, meta),
             write_markdown(out_dir, results, header_lines),
             write_settings_csv(out_dir, results),
             write_per_query(out_dir, collection, per_query),
             plot_grid(out_dir, results)]
  rank_png = plot_rank_distance(out_dir, results)
  if rank_png:
    written.append(rank_png)
  return written
