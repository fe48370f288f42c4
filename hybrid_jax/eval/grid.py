"""The retrieval grid: per-setting means, macro averages and language-group averages.

Settings (DESIGN.md, PAPER.md "Evaluation protocol"): X->Y for every query language X and
candidate language Y (X->X monolingual, X != Y cross-lingual), and X->all, the multilingual pool.
A setting's score is the mean over its queries that have a relevant candidate there; the others
are skipped and counted (`num_skipped`). Summaries are macro averages over settings:
  monolingual   = mean over the X->X settings,
  cross_lingual = mean over the X->Y settings with X != Y,
  multilingual  = mean over query languages X of the X->all scores (rank distance included);
the pooled mean over all queries of the pool is kept as `map_micro` (LAReQA's own averaging).
Language groups (e.g. {"unseen": ["el", "vi"]}) add `<group>/<metric>` keys to each summary:
X->X with X in the group; X->Y (X != Y) with X or Y in the group; X->all with X in the group.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import metrics as metrics_lib

POOL = "all"  # candidate_lang of the multilingual pool setting
METRICS = metrics_lib.METRICS


def _mean(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(np.mean(values, dtype=np.float64)) if len(values) else math.nan


def _setting_entry(values: Mapping[str, np.ndarray], rows: np.ndarray, column: int,
                   rank_distance: np.ndarray | None = None,
                   metrics: Sequence[str] = METRICS) -> dict:
  """Means over the rows (queries) of one setting column; skipped = rows with NaN."""
  evaluated = rows[~np.isnan(values[metrics[0]][rows, column])]
  entry = {m: _mean(values[m][evaluated, column]) for m in metrics}
  if rank_distance is not None:
    entry["rank_distance"] = _mean(rank_distance[evaluated])
  entry["num_queries"] = int(len(evaluated))
  entry["num_skipped"] = int(len(rows) - len(evaluated))
  return entry


def _macro(entries: Sequence[dict], keys: Sequence[str]) -> dict:
  used = [e for e in entries if e["num_queries"] > 0]
  out = {k: _mean(np.array([e[k] for e in used], np.float64)) for k in keys}
  out["num_settings"] = len(used)
  out["num_queries"] = sum(e["num_queries"] for e in entries)
  out["num_skipped"] = sum(e["num_skipped"] for e in entries)
  return out


def summarize(collection: collection_lib.Collection, per_query: metrics_lib.PerQueryMetrics,
              groups: Mapping[str, Sequence[str]] | None = None, *, pool_only: bool = False,
              metrics: Sequence[str] = METRICS, rank_distance: bool = True) -> dict:
  """The results dict (results.json schema in DESIGN.md) of one scored collection.

  pool_only: only the X->all settings were scored (a corpus-scale search of one multilingual
  corpus, search/corpus_eval.py): `settings` stays empty and only the multilingual summary is
  filled, even with one query language. `metrics`: the per-query metrics to average (the first
  one decides which queries were evaluated); `rank_distance`: whether to average it too.
  """
  langs = collection.languages
  query_lang = np.array(collection.query_langs)
  rows_of = {x: np.flatnonzero(query_lang == x) for x in langs}
  query_langs = [x for x in langs if len(rows_of[x])]
  values = per_query.values

  settings = []
  for x in query_langs if not pool_only else ():
    for y_index, y in enumerate(langs):
      if x != y and not collection.cross_lingual:
        continue
      entry = {"query_lang": x, "candidate_lang": y}
      entry.update(_setting_entry(values, rows_of[x], y_index, metrics=metrics))
      settings.append(entry)

  multilingual = pool_only or (collection.cross_lingual and len(langs) > 1)
  pool_metrics = tuple(metrics) + (("rank_distance",) if rank_distance else ())
  by_lang = []
  if multilingual:
    for x in query_langs:
      entry = {"query_lang": x}
      entry.update(_setting_entry(values, rows_of[x], len(langs),
                                  per_query.rank_distance if rank_distance else None, metrics))
      by_lang.append(entry)

  groups = {name: [x for x in members if x in langs] for name, members in (groups or {}).items()}
  groups = {name: members for name, members in groups.items() if members}
  mono = [s for s in settings if s["query_lang"] == s["candidate_lang"]]
  cross = [s for s in settings if s["query_lang"] != s["candidate_lang"]]
  summary = {"monolingual": _macro(mono, metrics) if not pool_only else None}
  for name, members in groups.items() if not pool_only else ():
    _add_group(summary["monolingual"], name, [s for s in mono if s["query_lang"] in members],
               metrics)
  if cross:
    summary["cross_lingual"] = _macro(cross, metrics)
    for name, members in groups.items():
      _add_group(summary["cross_lingual"], name,
                 [s for s in cross if s["query_lang"] in members or s["candidate_lang"] in members],
                 metrics)
  else:
    summary["cross_lingual"] = None
  if multilingual:
    summary["multilingual"] = _macro(by_lang, pool_metrics)
    if "map" in metrics:
      summary["multilingual"]["map_micro"] = _mean(values["map"][:, len(langs)])
    for name, members in groups.items():
      _add_group(summary["multilingual"], name, [e for e in by_lang if e["query_lang"] in members],
                 pool_metrics)
  else:
    summary["multilingual"] = None

  return {"dataset": collection.name, "languages": list(langs), "summary": summary,
          "settings": settings, "multilingual_by_lang": by_lang}


def _add_group(target: dict, name: str, entries: Sequence[dict],
               keys: Sequence[str] = METRICS) -> None:
  macro = _macro(entries, keys)
  for k in keys:
    target[f"{name}/{k}"] = macro[k]
  target[f"{name}/num_settings"] = macro["num_settings"]


def setting_columns(collection: collection_lib.Collection) -> list[str]:
  """Names of the per-query setting axis: candidate languages, then the pool."""
  return list(collection.languages) + [POOL]
