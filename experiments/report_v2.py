r"""Builds docs/RESULTS_v2.md and its plots from experiments/results_v2/ (protocol v2; no model).

    python experiments/report_v2.py     # also run by `python experiments/study.py` (protocol 2)

Every number comes from a results.json / per_query.npz under experiments/results_v2/<run>/
<best|last>/<evaluation>/ (written by `python -m hybrid_jax.evaluate`, command in results.md), or
from the comparisons this script computes from them with hybrid_jax.eval.significance.compare
and caches in experiments/results_v2/comparisons/. A comparison of two strategies uses every
training seed of both: the difference of the seed means, its 95% two-level bootstrap-t interval
(resampling seeds within each side and question clusters: all query languages of a question
together) and the two-sided p; Holm's adjustment runs over every p of its table. A side of one
run (zero-shot) is a fixed model. Missing runs show as "-" and are listed, so the report can be
rebuilt at any point of the study.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import report  # pylint: disable=g-import-not-at-top,wrong-import-position
import study  # pylint: disable=g-import-not-at-top,wrong-import-position
import study_config  # pylint: disable=g-import-not-at-top,wrong-import-position

OUTPUT = os.path.join(REPO, "docs", "RESULTS_v2.md")
V1_REPORT = "RESULTS.md"  # protocol v1's report, beside OUTPUT
COMPARISONS = "comparisons"
PLOTS = "plots"
RESAMPLES = 10_000
POOLS = tuple(e.name for e in study.HELDOUT_PARTS)  # ("mlqa-r-test", "xquad-r-test")
TRAINED_ON = {d: f"{study_config.TRAINING_DATASETS[d]}-test" for d in ("A", "B")}
FAMILIES = report.FAMILIES
SHORT = {"monolingual": "mono", "cross_lingual": "cross", "multilingual": "multi"}
NAMES = {"mono": "X-X-mono", "xy": "X-Y", "hybrid": "hybrid 0.5"}
# (label, strategy, alpha): direction A's alpha sweep, X-Y and X-X-mono being alpha 0 and 1.
ALPHAS = ((0.0, "xy", None), (0.25, "hybrid", 0.25), (0.5, "hybrid", None),
          (0.75, "hybrid", 0.75), (1.0, "mono", None))
DASH = report.DASH


# --- reading ------------------------------------------------------------------------------------
def all_runs(results_dir: str) -> list[study.RunV2]:
  path = os.path.join(results_dir, study.BUDGET_FILE)
  budget = None
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      budget = json.load(f)
  return study.runs_v2(budget["steps"] if budget else None)


def result_dir(results_dir: str, run: str, evaluation: str) -> str:
  return os.path.join(results_dir, run, evaluation)


def load_results(results_dir: str) -> dict:
  """{run: {evaluation name ("best/mlqa-r-test", ...): results.json}} of whatever exists."""
  out = {}
  for run in all_runs(results_dir):
    for evaluation in run.evaluations():
      path = os.path.join(result_dir(results_dir, run.name, evaluation.name), "results.json")
      if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
          out.setdefault(run.name, {})[evaluation.name] = json.load(f)
  return out


def seed_names(direction: str, strategy: str, alpha: float | None = None) -> list[str]:
  """Run names of one strategy's seeds (alpha: direction A's alpha runs, 3 seeds)."""
  if alpha is not None:
    return [f"A-hybrid-alpha{alpha}-seed{s}" for s in study.ALPHA_SEEDS_V2]
  return [f"{direction}-{strategy}-seed{s}" for s in study.SEEDS_V2]


def evaluation_name(pool: str, step: str = "best", centered: bool = False, zero_shot=False):
  """Zero-shot scores have no checkpoint ("mlqa-r-test"); trained ones "best/mlqa-r-test"."""
  name = pool if zero_shot else f"{step}/{pool}"
  return name + ("-centered" if centered else "")


def present(results: dict, runs: list[str], evaluation: str) -> list[str]:
  return [r for r in runs if evaluation in results.get(r, {})]


def values(results: dict, runs: list[str], evaluation: str, family: str, metric: str):
  return [results[r][evaluation]["summary"][family][metric] for r in present(results, runs,
                                                                             evaluation)]


def mean_sd(xs: list[float], digits: int = 3) -> str:
  """'mean ± sd (n)' over seeds (sample sd), one value as it is, '-' for none."""
  if not xs:
    return DASH
  if len(xs) == 1:
    return report.fmt(xs[0], digits)
  mean, sd = report.mean_and_sd(xs)
  return f"{mean:.{digits}f} ± {sd:.{digits}f} ({len(xs)})"


# --- comparisons --------------------------------------------------------------------------------
# Cache files this build read or wrote; the others (comparisons of fewer seeds, superseded as runs
# finish) are deleted at the end so the committed cache holds what the report shows.
_USED_CACHES: set[str] = set()


def prune_unused_comparisons(results_dir: str) -> list[str]:
  """Deletes comparisons/*.json that this build did not use; returns their names."""
  folder = os.path.join(results_dir, COMPARISONS)
  if not os.path.isdir(folder):
    return []
  stale = sorted(n for n in os.listdir(folder) if n.endswith(".json")
                 and os.path.abspath(os.path.join(folder, n)) not in _USED_CACHES)
  for name in stale:
    os.remove(os.path.join(folder, name))
  return stale


def comparison(results_dir: str, runs_a: list[str], runs_b: list[str], evaluation_a: str,
               evaluation_b: str | None = None, metric: str = "map") -> dict | None:
  """{family: row} of B - A (seed means; row["a"], row["b"] the two means), or None."""
  rows = contrast_rows(results_dir, [(runs_a, evaluation_a), (runs_b, evaluation_b or
                                                              evaluation_a)], (-1.0, 1.0), metric)
  if rows is None:
    return None
  return {name: dict(r, a=r["means"][0], b=r["means"][1]) for name, r in rows.items()}


def contrast_rows(results_dir: str, groups: list[tuple[list[str], str]],
                  coefficients: tuple[float, ...], metric: str = "map",
                  languages: dict[str, list[str]] | None = None) -> dict | None:
  """{family: row dict} of sum_j c_j (seed mean of group j) over the runs that have the group's
  evaluation (hybrid_jax.eval.significance.contrast), or None while a group has none. With
  `languages` ({name: languages}) also "<name>/<family>" rows, the grid's language groups.

  Cached under comparisons/ by the directories and coefficients; a cache older than any of its
  per_query.npz files is recomputed."""
  from hybrid_jax.eval import significance  # pylint: disable=g-import-not-at-top
  dir_groups = []
  for runs, evaluation in groups:
    dirs = [result_dir(results_dir, r, evaluation) for r in runs]
    dir_groups.append([d for d in dirs if os.path.isfile(os.path.join(d, "per_query.npz"))])
  if not all(dir_groups):
    return None
  key = json.dumps([[os.path.relpath(d, results_dir) for d in dirs] for dirs in dir_groups]
                   + [list(coefficients), metric] + ([languages] if languages else []))
  cache = os.path.join(results_dir, COMPARISONS,
                       f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")
  _USED_CACHES.add(os.path.abspath(cache))
  newest = max(os.path.getmtime(os.path.join(d, "per_query.npz"))
               for dirs in dir_groups for d in dirs)
  if os.path.isfile(cache) and os.path.getmtime(cache) >= newest:
    with open(cache, encoding="utf-8") as f:
      return json.load(f)["rows"]
  rows = significance.contrast(dir_groups, coefficients, metric, RESAMPLES, 0, groups=languages)
  out = {r.name: dict(diff=r.value, p=r.p_value, p_floor=r.p_floor, lo=r.ci_low, hi=r.ci_high,
                      means=list(r.group_means), runs=[len(d) for d in dir_groups],
                      method=r.method) for r in rows}
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  with open(cache, "w", encoding="utf-8") as f:
    json.dump({"compared": json.loads(key), "rows": out}, f, indent=1)
  return out


def holm_cells(found: list[dict | None], digits: int = 3) -> list[str]:
  """One cell per row dict: 'diff [lo, hi] p=..., Holm ...', Holm over every row given."""
  from hybrid_jax.eval import significance  # pylint: disable=g-import-not-at-top
  tested = [r for r in found if r is not None]
  at_floor = [r["p_floor"] > 0 and r["p"] <= r["p_floor"] * (1 + 1e-9) for r in tested]
  adjusted, bound = significance.holm_with_bounds([r["p"] for r in tested], at_floor)
  holm = {id(r): (h, b) for r, h, b in zip(tested, adjusted, bound)}
  cells = []
  for r in found:
    if r is None:
      cells.append(DASH)
      continue
    h, b = holm[id(r)]
    p = significance.format_p(r["p"], r["p_floor"])
    interval = ("" if r["lo"] is None or math.isnan(r["lo"])
                else f" [{r['lo']:+.{digits}f}, {r['hi']:+.{digits}f}]")
    cells.append(f"{r['diff']:+.{digits}f}{interval}, p{'' if p.startswith('<=') else '='}{p}, "
                 f"Holm {significance.format_p(h, h if b else 0.0)}")
  return cells


# --- sections -----------------------------------------------------------------------------------
HEADLINE_COLUMNS = (("mAP mono", "monolingual", "map", 3), ("mAP cross", "cross_lingual", "map", 3),
                    ("mAP multi", "multilingual", "map", 3),
                    ("rank distance", "multilingual", "rank_distance", 1))


def headline(results: dict) -> list[str]:
  """Per held-out pool: zero-shot, then each direction's strategies (in-domain first), each with
  its per-language centring twin; seed mean ± sd over the best checkpoints."""
  lines = []
  for pool in POOLS:
    rows = []
    for centered in (False, True):
      runs, evaluation = ["zeroshot"], evaluation_name(pool, centered=centered, zero_shot=True)
      rows.append(["zero-shot e5-small" + (" + centring" if centered else ""), "-"]
                  + [mean_sd(values(results, runs, evaluation, f, m), d)
                     for _, f, m, d in HEADLINE_COLUMNS])
    for direction in sorted(("A", "B"), key=lambda d: TRAINED_ON[d] != pool):
      where = "in-domain" if TRAINED_ON[direction] == pool else "shifted"
      for strategy in study_config.STRATEGIES:
        for centered in (False, True):
          evaluation = evaluation_name(pool, centered=centered)
          rows.append([f"{direction}: {NAMES[strategy]}" + (" + centring" if centered else ""),
                       where] + [mean_sd(values(results, seed_names(direction, strategy),
                                                evaluation, f, m), d)
                                 for _, f, m, d in HEADLINE_COLUMNS])
    lines += [f"**{pool}** (best checkpoints; mean ± sd over seeds (n))", ""]
    lines += report.table(["model", "pool is"] + [c[0] for c in HEADLINE_COLUMNS], rows)
  return lines


def plot_headline(results: dict, path: str) -> bool:
  """Per held-out pool: multilingual mAP and rank distance of every direction x strategy (seed
  mean, sd whiskers, dots = seeds), plain and centred, with zero-shot (plain, centred) as lines."""
  cells = [(pool, d, s) for pool in POOLS for d in ("A", "B") for s in study_config.STRATEGIES]
  if not any(values(results, seed_names(d, s), evaluation_name(pool), "multilingual", "map")
             for pool, d, s in cells):
    return False
  plt = report.pyplot()
  metrics = (("map", "multilingual mAP (X->all)"), ("rank_distance", "rank distance (lower: "
                                                                     "less language bias)"))
  fig, axes = plt.subplots(len(metrics), len(POOLS), figsize=(12, 7), squeeze=False)
  for col, pool in enumerate(POOLS):
    directions = sorted(("A", "B"), key=lambda d: TRAINED_ON[d] != pool)
    for row, (metric, label) in enumerate(metrics):
      ax = axes[row][col]
      ticks = []
      for k, (d, s) in enumerate((d, s) for d in directions for s in study_config.STRATEGIES):
        ticks.append(f"{d}: {NAMES[s]}\n({'in-domain' if TRAINED_ON[d] == pool else 'shifted'})")
        for offset, centered, style in ((-0.18, False, {}), (0.18, True, {"hatch": "//",
                                                                           "alpha": 0.5})):
          xs = values(results, seed_names(d, s), evaluation_name(pool, centered=centered),
                      "multilingual", metric)
          if not xs:
            continue
          mean = sum(xs) / len(xs)
          sd = report.mean_and_sd(xs)[1] if len(xs) > 1 else 0.0
          ax.bar(k + offset, mean, 0.34, yerr=sd, capsize=3, color=f"C{k % 3}", **style)
          ax.plot([k + offset] * len(xs), xs, "k.", ms=3)
      for centered, ls in ((False, "--"), (True, ":")):
        zero = values(results, ["zeroshot"], evaluation_name(pool, centered=centered,
                                                               zero_shot=True), "multilingual",
                      metric)
        if zero:
          ax.axhline(zero[0], color="gray", ls=ls, lw=1,
                     label="zero-shot" + (" + centring" if centered else ""))
      ax.set_xticks(range(len(ticks)))
      ax.set_xticklabels(ticks, fontsize=7)
      ax.set_ylabel(label, fontsize=8)
      ax.set_title(f"{pool}: solid = best checkpoint, hatched = + centring", fontsize=9)
      ax.grid(axis="y", alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


PAIRS = (("xy", "hybrid"), ("mono", "hybrid"), ("xy", "mono"))


def strategy_comparisons(results_dir: str, results: dict) -> list[str]:
  """B - A between strategies, per pool and training direction, mAP per family and rank
  distance; plus each strategy against zero-shot + centring (the free trick)."""
  specs = []  # (pool, direction, label, runs_a, eval_a, runs_b)
  for pool in POOLS:
    for direction in sorted(("A", "B"), key=lambda d: TRAINED_ON[d] != pool):
      best = evaluation_name(pool)
      for a, b in PAIRS:
        specs.append((pool, direction, f"{NAMES[b]} - {NAMES[a]}",
                      seed_names(direction, a), best, seed_names(direction, b), best))
      for s in study_config.STRATEGIES:
        specs.append((pool, direction, f"{NAMES[s]} - zero-shot + centring", ["zeroshot"],
                      evaluation_name(pool, centered=True, zero_shot=True),
                      seed_names(direction, s), best))
  found = []
  for _, _, _, runs_a, eval_a, runs_b, eval_b in specs:
    maps = comparison(results_dir, runs_a, runs_b, eval_a, eval_b)
    rd = comparison(results_dir, runs_a, runs_b, eval_a, eval_b, "rank_distance")
    found.append([maps.get(f) if maps else None for f in FAMILIES]
                 + [rd.get("multilingual") if rd else None])
  flat = holm_cells([r for row in found for r in row[:3]])
  rd_cells = holm_cells([row[3] for row in found], 1)
  rows = []
  for k, (pool, direction, label, *_rest) in enumerate(specs):
    where = "in-domain" if TRAINED_ON[direction] == pool else "shifted"
    rows.append([pool, f"{direction} ({where})", label] + flat[3 * k:3 * k + 3] + [rd_cells[k]])
  return report.table(["pool", "trained", "difference", "mAP mono", "mAP cross", "mAP multi",
                       "rank distance (lower is better)"], rows)


def shift_section(results_dir: str, results: dict) -> list[str]:
  """Question 2 on one pool: the in-domain model's score minus the other direction's (shifted)
  model's, per strategy and pool; the same queries and candidates on both sides."""
  specs = []
  for pool in POOLS:
    home = next(d for d in ("A", "B") if TRAINED_ON[d] == pool)
    away = next(d for d in ("A", "B") if d != home)
    for strategy in study_config.STRATEGIES:
      specs.append((pool, home, away, strategy))
  found = [comparison(results_dir, seed_names(away, s), seed_names(home, s), evaluation_name(pool))
           for pool, home, away, s in specs]
  cells = holm_cells([f.get(fam) if f else None for f in found for fam in FAMILIES])
  rows = [[pool, NAMES[s], f"{home} - {away}"] + cells[3 * k:3 * k + 3]
          for k, (pool, home, away, s) in enumerate(specs)]
  return report.table(["pool", "batches", "in-domain - shifted model", "mAP mono", "mAP cross",
                       "mAP multi"], rows)


def penalty_differences(results_dir: str) -> list[str]:
  """Question 2's test: is one strategy's shift penalty smaller than another's on the same pool?
  (S in-domain - S shifted) - (T in-domain - T shifted), four independent groups of seeds."""
  specs = []
  for pool in POOLS:
    home = next(d for d in ("A", "B") if TRAINED_ON[d] == pool)
    away = next(d for d in ("A", "B") if d != home)
    best = evaluation_name(pool)
    for a, b in PAIRS:
      groups = [(seed_names(home, b), best), (seed_names(away, b), best),
                (seed_names(home, a), best), (seed_names(away, a), best)]
      specs.append((pool, f"{NAMES[b]} vs {NAMES[a]}", contrast_rows(
          results_dir, groups, (1.0, -1.0, -1.0, 1.0))))
  cells = holm_cells([f.get(fam) if f else None for *_, f in specs for fam in FAMILIES])
  rows = [[pool, label] + cells[3 * k:3 * k + 3] for k, (pool, label, _) in enumerate(specs)]
  return report.table(["pool", "S vs T: penalty of S - penalty of T", "mAP mono", "mAP cross",
                       "mAP multi"], rows)


def language_groups(dataset: str, direction: str) -> dict[str, list[str]]:
  """The study's groups on a full grid: low-resource languages and, where the direction's
  training collection lacks some, the unseen ones (as the study passes --groups)."""
  groups = {"low_resource": list(study.LOW_RESOURCE[dataset])}
  unseen = study.unseen_languages(dataset, study_config.TRAINING_DATASETS[direction])
  if unseen:
    groups["unseen"] = list(unseen)
  return groups


def question_one(results_dir: str, results: dict) -> list[str]:
  """Low-resource and unseen query languages on each direction's shifted full grid: the
  strategies' group averages (seed mean ± sd) and the seed-aware differences between them."""
  lines = []
  for direction in ("A", "B"):
    grid = next(e for e in study.FULL_GRIDS
                if e.dataset != study_config.TRAINING_DATASETS[direction])
    groups = language_groups(grid.dataset, direction)
    evaluation = evaluation_name(grid.name)
    header = ["model"] + [f"{g} {m}" for g in groups for m in ("mAP cross", "mAP multi", "RD")]
    rows = []
    for label, runs, name in ([("zero-shot e5-small", ["zeroshot"], grid.name)]
                              + [(NAMES[s], seed_names(direction, s), evaluation)
                                 for s in study_config.STRATEGIES]):
      row = [label]
      for g in groups:
        row += [mean_sd(values(results, runs, name, "cross_lingual", f"{g}/map")),
                mean_sd(values(results, runs, name, "multilingual", f"{g}/map")),
                mean_sd(values(results, runs, name, "multilingual", f"{g}/rank_distance"), 1)]
      rows.append(row)
    lines += [f"**{direction} on {grid.name}** (best checkpoints; "
              + "; ".join(f"{g}: {', '.join(m)}" for g, m in groups.items()) + ")", ""]
    lines += report.table(header, rows)
    found, labels = [], []
    for a, b in PAIRS:
      rows_ab = contrast_rows(results_dir, [(seed_names(direction, a), evaluation),
                                            (seed_names(direction, b), evaluation)], (-1.0, 1.0),
                              languages=groups)
      labels.append(f"{NAMES[b]} - {NAMES[a]}")
      found.append([rows_ab.get(f"{g}/{f}") if rows_ab else None
                    for g in groups for f in ("cross_lingual", "multilingual")])
    cells = holm_cells([c for row in found for c in row])
    width = 2 * len(groups)
    lines += report.table(["difference"] + [f"{g} mAP {SHORT[f]}" for g in groups
                                            for f in ("cross_lingual", "multilingual")],
                          [[label] + cells[k * width:(k + 1) * width]
                           for k, label in enumerate(labels)])
  return lines


def best_vs_last(results_dir: str, results: dict) -> list[str]:
  """Last minus best checkpoint (seed means) per direction, pool and strategy: the report's
  primary numbers are the best checkpoints; this is where the choice matters."""
  specs = [(d, pool, s) for d in ("A", "B") for pool in POOLS for s in study_config.STRATEGIES]
  found = [comparison(results_dir, seed_names(d, s), seed_names(d, s), evaluation_name(pool),
                      evaluation_name(pool, "last")) for d, pool, s in specs]
  cells = holm_cells([f.get("multilingual") if f else None for f in found])
  rows = []
  for (d, pool, s), f, cell in zip(specs, found, cells):
    m = f.get("multilingual") if f else None
    rows.append([d, pool, NAMES[s], report.fmt(m["a"]) if m else DASH,
                 report.fmt(m["b"]) if m else DASH, cell])
  return report.table(["trained", "pool", "batches", "best: mAP multi", "last: mAP multi",
                       "last - best"], rows)


def disagreements(results: dict) -> list[str]:
  """Strategy orderings (by seed-mean mAP multi) that differ between best and last."""
  out, compared = [], 0
  for d in ("A", "B"):
    for pool in POOLS:
      order = {}
      for step in study.CHECKPOINTS:
        means = {}
        for s in study_config.STRATEGIES:
          xs = values(results, seed_names(d, s), evaluation_name(pool, step), "multilingual",
                      "map")
          if xs:
            means[s] = sum(xs) / len(xs)
        if len(means) == len(study_config.STRATEGIES):
          order[step] = sorted(means, key=lambda s: -means[s])
      compared += len(order) == 2
      if len(order) == 2 and order["best"] != order["last"]:
        out.append(f"- {d} on {pool}: best " + " > ".join(NAMES[s] for s in order["best"])
                   + "; last " + " > ".join(NAMES[s] for s in order["last"]))
  if not compared:
    return ["- not known yet: no direction and pool has all three strategies scored at both "
            "checkpoints", ""]
  return (out or [f"- none: the {compared} direction x pool cases with all three strategies "
                  "scored order them the same at both checkpoints"]) + [""]


def alpha_section(results: dict) -> list[str]:
  rows = []
  for pool in POOLS:
    for family in FAMILIES:
      cells = [mean_sd(values(results, seed_names("A", s, a), evaluation_name(pool), family,
                              "map")) for _, s, a in ALPHAS]
      rows.append([pool, SHORT[family]] + cells)
  return report.table(["pool", "mAP"] + [f"alpha {x}" + {0.0: " (X-Y)", 1.0: " (X-X-mono)"}.get(
      x, "") for x, _, _ in ALPHAS], rows)


def status_lines(results_dir: str, results: dict) -> list[str]:
  runs = [r for r in all_runs(results_dir) if r.family != "pilot"]
  total = sum(len(r.evaluations()) for r in runs)
  done = sum(len(results.get(r.name, {})) for r in runs)
  finished = [r.name for r in runs if len(results.get(r.name, {})) == len(r.evaluations())]
  waiting = [r.name for r in runs if r.name not in finished]
  lines = [f"Status: {done} of {total} evaluations of {len(runs)} runs done"
           + (" (B's seeds are listed once the pilots fix their step budget)."
              if not os.path.isfile(os.path.join(results_dir, study.BUDGET_FILE)) else ".")]
  if waiting:
    lines.append("Runs not finished yet (\"-\" in the tables): " + ", ".join(waiting) + ".")
  return lines + [""]


def _by_step(curve: dict) -> list[tuple[int, float]]:
  return sorted((int(s), v) for s, v in curve.items())  # JSON keys are strings


def plot_budget(budget: dict, path: str) -> None:
  """The three pilots' validation curves, their mean and the step budget chosen from it."""
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for k, (strategy, points) in enumerate(sorted(budget.get("curves", {}).items())):
    steps, losses = zip(*[(s, v) for s, v in _by_step(points) if s > 0])  # step 0: untrained
    ax.plot(steps, losses, "o-", ms=3, color=f"C{k}", label=f"pilot {NAMES.get(strategy, strategy)}")
  steps, losses = zip(*[(s, v) for s, v in _by_step(budget["mean_validation_loss"]) if s > 0])
  ax.plot(steps, losses, "k-", lw=2, label="mean of the pilots")
  ax.axvline(budget["steps"], color="gray", ls="--", lw=1, label=f"budget: {budget['steps']}")
  ax.set_xlabel("training step (direction B, XQuAD-R)", fontsize=8)
  ax.set_ylabel("validation loss", fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def budget_lines(results_dir: str) -> list[str]:
  path = os.path.join(results_dir, study.BUDGET_FILE)
  if not os.path.isfile(path):
    return ["B's step budget: not fixed yet (the three 600-step pilots are running).", ""]
  with open(path, encoding="utf-8") as f:
    budget = json.load(f)
  curve = ", ".join(f"{s}: {v:.4f}" for s, v in _by_step(budget["mean_validation_loss"]))
  lines = [f"B's step budget: **{budget['steps']} steps**, fixed before any B seed ran "
           f"({study.BUDGET_FILE}; rule: {budget['rule']}). Mean validation loss of the pilots "
           f"by step: {curve}.", ""]
  os.makedirs(os.path.join(results_dir, PLOTS), exist_ok=True)
  plot_budget(budget, os.path.join(results_dir, PLOTS, "b_budget.png"))
  return lines + [f"![B's budget](../experiments/results_v2/{PLOTS}/b_budget.png)", ""]


def build(results_dir: str = study.RESULTS_DIR_V2, output: str = OUTPUT) -> str:
  _USED_CACHES.clear()
  results = load_results(results_dir)
  intro_path = os.path.join(HERE, "RESULTS_v2_intro.md")
  reading_path = os.path.join(HERE, "RESULTS_v2_reading.md")
  lines = ["# Results, protocol v2: hybrid batching vs X-X-mono and X-Y, 5 seeds "
           "(multilingual-e5-small)", "",
           "<!-- Generated by `python experiments/report_v2.py` from experiments/results_v2/; "
           "edit experiments/RESULTS_v2_intro.md / RESULTS_v2_reading.md, not this file. -->", ""]
  lines += status_lines(results_dir, results)
  lines += report.hand_written(intro_path)
  lines += budget_lines(results_dir)
  lines += ["## Headline: every model on both held-out pools, with the centring baseline", ""]
  lines += headline(results)
  os.makedirs(os.path.join(results_dir, PLOTS), exist_ok=True)
  if plot_headline(results, os.path.join(results_dir, PLOTS, "headline.png")):
    lines += [f"![headline](../experiments/results_v2/{PLOTS}/headline.png)", ""]
  lines += ["## Strategy comparisons (seed-aware)", "",
            f"Difference of the seed means (best checkpoints), its 95% two-level bootstrap-t interval "
            f"over seeds and question clusters ({RESAMPLES:,} resamples, seed 0; "
            "`python -m hybrid_jax.compare A_seed0,...,A_seed4 B_seed0,...,B_seed4`), the "
            "two-sided p and Holm's adjustment over every mAP p-value of this table (rank "
            "distance: over its own column). \"zero-shot + centring\" is one fixed model. Pairs "
            "not in this table were not tested.", ""]
  lines += strategy_comparisons(results_dir, results)
  lines += ["## Question 1: low-resource and unseen languages (the shifted full grids)", "",
            "Group averages as the evaluator computes them (X->Y counts when X or Y is in the "
            "group, X->all when X is); differences seed-aware as above, Holm over each "
            "direction's table.", ""]
  lines += question_one(results_dir, results)
  lines += ["## Question 2: the shift penalty on one pool", "",
            "Each pool scored by the model trained on its own collection (in-domain) and by the "
            "model trained on the other one (shifted): the same queries and candidates on both "
            "sides, so the difference is the domain shift alone (seed-aware, as above).", ""]
  lines += shift_section(results_dir, results)
  lines += ["Is one strategy more robust to the shift than another? The difference of their "
            "penalties on the same pool, (S in-domain - S shifted) - (T in-domain - T shifted) for "
            "strategies S and T, over four independent groups of seeds "
            "(`hybrid_jax.eval.significance.contrast`); negative: S loses less to the shift.", ""]
  lines += penalty_differences(results_dir)
  lines += ["## Best vs last checkpoint", "",
            "Primary numbers are the best checkpoint by the shared validation loss (same fixed "
            "batches for every strategy, validation split by article). The last checkpoint of "
            "every run was scored too:", ""]
  lines += best_vs_last(results_dir, results)
  lines += ["Where the strategies' order (seed-mean mAP multi) differs between the two:", ""]
  lines += disagreements(results)
  lines += ["## Alpha sweep (direction A; alpha 0.25 and 0.75: 3 seeds, the others 5)", ""]
  lines += alpha_section(results)
  lines += ["## Protocol v1", "",
            f"The first study ([{V1_REPORT}]({V1_REPORT}), experiments/results/) trained one "
            "seed per strategy and direction (three in A), chose checkpoints on a validation "
            "split by question id (on XQuAD-R 77 of its 93 validation ids shared a gold sentence "
            "with training ids), scored only the best checkpoint, and tested single queries as "
            "independent. Its numbers are right (an independent recomputation of 658 of them "
            "found no mismatch) but its significance statements are not: they ignore "
            "translations moving together and training noise. This report replaces its "
            "conclusions.", ""]
  written = report.write(lines + report.hand_written(reading_path), output, results)
  stale = prune_unused_comparisons(results_dir)
  if stale:
    print(f"[report] removed {len(stale)} superseded comparison caches")
  return written


if __name__ == "__main__":
  build()
