r"""Builds docs/RESULTS.md and the study's plots from experiments/results/ (no model, no data).

    python experiments/report.py          # also run by experiments/study.py after its jobs

Every number printed comes from a results.json under experiments/results/<run>/<eval>/ (written
by `python -m hybrid_jax.evaluate`, whose command is in that directory's results.md), or from
the significance files this script writes beside them (experiments/results/significance/, from
the per-query metrics in per_query.npz via hybrid_jax.eval.significance). Missing runs are shown
as "-" and listed, so the report can be rebuilt at any point of the study.
"""

from __future__ import annotations

import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import study  # pylint: disable=g-import-not-at-top,wrong-import-position
import study_config  # pylint: disable=g-import-not-at-top,wrong-import-position

OUTPUT = os.path.join(REPO, "docs", "RESULTS.md")
PLOTS = "plots"  # under the results directory
SIGNIFICANCE = "significance"
STRATEGY_NAMES = {"": "zero-shot e5-small", "mono": "X-X-mono", "xy": "X-Y",
                  "hybrid": "hybrid (alpha 0.5)"}
FAMILIES = ("monolingual", "cross_lingual", "multilingual")
# ../shared/PAPER.md, "The paper's headline results": mAP mono / cross / multi, rank distance.
PAPER = {
    ("XLM-R", "mono"): {"xquad-r": (.792, .674, .547, 410.2), "mlqa-r": (.648, .584, .473, 287.5)},
    ("XLM-R", "xy"): {"xquad-r": (.755, .700, .593, 295.4), "mlqa-r": (.626, .620, .508, 226.7)},
    ("XLM-R", "hybrid"): {"xquad-r": (.798, .705, .593, 286.6),
                          "mlqa-r": (.648, .623, .512, 227.1)},
    ("LaBSE", "mono"): {"xquad-r": (.808, .752, .652, 261.5), "mlqa-r": (.681, .656, .550, 225.3)},
    ("LaBSE", "xy"): {"xquad-r": (.801, .762, .679, 225.2), "mlqa-r": (.671, .677, .576, 198.3)},
    ("LaBSE", "hybrid"): {"xquad-r": (.817, .767, .682, 221.1),
                          "mlqa-r": (.686, .681, .579, 195.0)},
}
DASH = "-"


# --- reading ------------------------------------------------------------------------------------
def load_results(results_dir: str) -> dict:
  """{run name: {evaluation name: results.json dict}} of whatever exists."""
  out = {}
  for run in study.RUNS:
    for evaluation in run.evaluations():
      path = os.path.join(results_dir, run.name, evaluation.name, "results.json")
      if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
          out.setdefault(run.name, {})[evaluation.name] = json.load(f)
  return out


def run_by_name(name: str) -> study.Run:
  return next(r for r in study.RUNS if r.name == name)


def value(results: dict, run: str, evaluation: str, family: str, metric: str):
  entry = results.get(run, {}).get(evaluation)
  if entry is None:
    return None
  return entry["summary"].get(family, {}).get(metric)


def fmt(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return DASH
  return f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines + [""]


# --- significance -------------------------------------------------------------------------------
def significance_rows(results_dir: str, base: str, other: str, evaluation: str,
                      metric: str = "map") -> list[dict] | None:
  """Summary rows of hybrid_jax.eval.significance.compare(base, other), cached as JSON.

  The test flips whole question ids (every query language of a question together); p_floor is
  the Monte-Carlo floor (a p there is only a bound). A cache without p_floor predates that test
  (it flipped single queries) and is recomputed when the per-query files are here."""
  cache = os.path.join(results_dir, SIGNIFICANCE, f"{evaluation}--{other}--vs--{base}--{metric}.json")
  dirs = [os.path.join(results_dir, name, evaluation) for name in (base, other)]
  have = all(os.path.isfile(os.path.join(d, "per_query.npz")) for d in dirs)
  if os.path.isfile(cache) and (not have or os.path.getmtime(cache) >= max(
      os.path.getmtime(os.path.join(d, "per_query.npz")) for d in dirs)):
    with open(cache, encoding="utf-8") as f:
      cached = json.load(f)
    if not have or all("p_floor" in r for r in cached):
      return cached
  if not have:
    return None
  from hybrid_jax.eval import significance  # pylint: disable=g-import-not-at-top
  rows = [dict(name=r.name, a=r.a, b=r.b, diff=r.diff, p=r.p_value, p_floor=r.p_floor,
               n=r.num_queries, method=r.method)
          for r in significance.compare(dirs[0], dirs[1], metric, 10_000, 0, cluster="question",
                                        summary_only=True)]
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  with open(cache, "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  return rows


# --- plots --------------------------------------------------------------------------------------
def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def alpha_points(results: dict, evaluation: str, family: str, metric: str = "map"):
  """[(alpha, value)] of direction A: X-Y is alpha 0, X-X-mono alpha 1 (hybrid's endpoints)."""
  names = {0.0: "A-xy", 0.25: "A-hybrid-alpha0.25", 0.5: "A-hybrid", 0.75: "A-hybrid-alpha0.75",
           1.0: "A-mono"}
  points = []
  for alpha, name in names.items():
    v = value(results, name, evaluation, family, metric)
    if v is not None:
      points.append((alpha, v))
  return points


def plot_alpha(results: dict, path: str) -> bool:
  evals = [e.name for e in study.direction_evals("A")]
  if not any(len(alpha_points(results, e, "multilingual")) >= 2 for e in evals):
    return False
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, evaluation in zip(axes, evals):
    for family in FAMILIES:
      points = alpha_points(results, evaluation, family)
      if points:
        line, = ax.plot(*zip(*points), marker="o", label=family.replace("_", "-"))
        zero = value(results, "zeroshot", evaluation, family, "map")
        if zero is not None:  # the family's zero-shot level, in its colour
          ax.axhline(zero, ls=":", lw=0.9, color=line.get_color())
    ax.set_title(f"{evaluation} (train MLQA-R; dotted: zero-shot)")
    ax.set_xlabel("alpha = P(batch is X-X-mono)   (0 = X-Y, 1 = X-X-mono)")
    ax.set_ylabel("mAP")
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_strategies(results: dict, path: str) -> bool:
  """Per direction: multilingual mAP in domain and under shift, per strategy (bars)."""
  rows = [(d, e.name) for d in ("A", "B") for e in study.direction_evals(d)]
  if not any(value(results, f"{d}-hybrid", e, "multilingual", "map") is not None for d, e in rows):
    return False
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(10, 3.8))
  strategies = ("", "mono", "xy", "hybrid")
  width = 0.2
  for k, strategy in enumerate(strategies):
    positions, heights = [], []
    for i, (direction, evaluation) in enumerate(rows):
      name = "zeroshot" if not strategy else f"{direction}-{strategy}"
      height = value(results, name, evaluation, "multilingual", "map")
      if height is None:  # not run yet: no bar (a 0 bar would read as mAP 0)
        ax.text(i + (k - 1.5) * width, 0.01, "n/a", ha="center", fontsize=7, rotation=90)
      else:
        positions.append(i + (k - 1.5) * width)
        heights.append(height)
    ax.bar(positions, heights, width, label=STRATEGY_NAMES[strategy])
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([f"{d}: {e}" + (" (in-domain)" if e.endswith("-test") else " (shifted)")
                      for d, e in rows])
  ax.set_ylabel("multilingual mAP (X->all)")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def seed_runs(strategy: str) -> list[str]:
  """Direction A's runs of one strategy over seeds 0, 1, 2 (seed 0 is the main run)."""
  return [f"A-{strategy}"] + [f"A-{strategy}-seed{s}" for s in (1, 2)]


def mean_and_sd(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1) of at least two values."""
  mean = sum(values) / len(values)
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def plot_seeds(results: dict, path: str) -> bool:
  """Per evaluation and family: each seed's mAP (dots) and the mean ± sd (bar) per strategy, so
  seed spread and the gaps between strategies sit on one axis."""
  evals = [e.name for e in study.direction_evals("A")]
  strategies = study_config.STRATEGIES
  if not any(sum(value(results, n, e, "multilingual", "map") is not None
                 for n in seed_runs(s)) >= 2 for e in evals for s in strategies):
    return False
  plt = pyplot()
  fig, axes = plt.subplots(len(evals), len(FAMILIES), figsize=(11, 3.2 * len(evals)),
                           squeeze=False)
  for row, evaluation in enumerate(evals):
    for col, family in enumerate(FAMILIES):
      ax = axes[row][col]
      for k, strategy in enumerate(strategies):
        values = [v for v in (value(results, n, evaluation, family, "map")
                              for n in seed_runs(strategy)) if v is not None]
        if not values:
          continue
        ax.plot([k] * len(values), values, "o", alpha=0.6)
        if len(values) >= 2:
          mean, sd = mean_and_sd(values)
          ax.errorbar([k + 0.15], [mean], yerr=[sd], fmt="_", color="black", capsize=4)
      ax.set_xticks(range(len(strategies)))
      ax.set_xticklabels([STRATEGY_NAMES[s].split(" (")[0] for s in strategies])
      ax.set_title(f"{evaluation}: {family.replace('_', '-')} mAP", fontsize=9)
      ax.grid(axis="y", alpha=0.3)
  fig.suptitle("Direction A, seeds 0-2: dots = seeds, black = mean ± sd", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# --- sections -----------------------------------------------------------------------------------
def strategy_rows(direction: str) -> list[tuple[str, str]]:
  return [("zeroshot", "")] + [(f"{direction}-{s}", s) for s in study_config.STRATEGIES]


def paper_shaped(results: dict, direction: str) -> list[str]:
  lines = []
  for evaluation in study.direction_evals(direction):
    where = "in-domain held-out test" if evaluation.part == "test" else "shifted domain, full grid"
    lines += [f"**{evaluation.name}** ({where})", ""]
    rows = []
    for name, strategy in strategy_rows(direction):
      rows.append([STRATEGY_NAMES[strategy]]
                  + [fmt(value(results, name, evaluation.name, f, "map")) for f in FAMILIES]
                  + [fmt(value(results, name, evaluation.name, f, m))
                     for f in FAMILIES for m in ("recall@1", "recall@10")]
                  + [fmt(value(results, name, evaluation.name, "multilingual", "rank_distance"),
                         1)])
    lines += table(["batches", "mAP mono", "mAP cross", "mAP multi", "R@1 mono", "R@10 mono",
                    "R@1 cross", "R@10 cross", "R@1 multi", "R@10 multi", "rank distance"], rows)
  return lines


def per_language(results: dict, direction: str) -> list[str]:
  lines = []
  for evaluation in study.direction_evals(direction):
    langs = None
    table_rows = []
    for name, strategy in strategy_rows(direction):
      entry = results.get(name, {}).get(evaluation.name)
      if entry is None:
        continue
      langs = langs or [e["query_lang"] for e in entry["multilingual_by_lang"]]
      by_lang = {e["query_lang"]: e for e in entry["multilingual_by_lang"]}
      table_rows.append([STRATEGY_NAMES[strategy]] + [
          f"{by_lang[l]['map']:.3f} / {by_lang[l]['rank_distance']:.0f}" for l in langs])
    if langs:
      lines += [f"**{evaluation.name}**: multilingual mAP / rank distance by query language", ""]
      lines += table(["batches"] + langs, table_rows)
  return lines


def group_table(results: dict, direction: str) -> list[str]:
  """Question 1: unseen and low-resource averages (mAP cross / multi, rank distance)."""
  lines = []
  for evaluation in study.direction_evals(direction):
    groups = []
    for name, _ in strategy_rows(direction):
      entry = results.get(name, {}).get(evaluation.name)
      if entry:
        groups += [k.split("/")[0] for k in entry["summary"]["multilingual"]
                   if k.endswith("/map") and k.split("/")[0] not in groups]
    if not groups:
      continue
    members = {}
    for name, _ in strategy_rows(direction):
      entry = results.get(name, {}).get(evaluation.name)
      for g in groups:
        if entry and f"{g}/num_settings" in entry["summary"]["multilingual"]:
          members.setdefault(g, entry["summary"]["multilingual"][f"{g}/num_settings"])
    rows = []
    for name, strategy in strategy_rows(direction):
      row = [STRATEGY_NAMES[strategy]]
      for g in groups:
        row += [fmt(value(results, name, evaluation.name, "cross_lingual", f"{g}/map")),
                fmt(value(results, name, evaluation.name, "multilingual", f"{g}/map")),
                fmt(value(results, name, evaluation.name, "multilingual", f"{g}/rank_distance"),
                    1)]
      rows.append(row)
    header = ["batches"] + [f"{g} {m}" for g in groups for m in ("mAP cross", "mAP multi", "RD")]
    lines += [f"**{evaluation.name}**: groups " + ", ".join(
        f"{g} ({members.get(g, '?')} query languages)" for g in groups), ""]
    lines += table(header, rows)
  return lines


def domain_shift(results: dict) -> list[str]:
  """Question 2: in-domain vs shifted multilingual mAP, the drop, and the gain over zero-shot."""
  rows = []
  for direction in ("A", "B"):
    test, shifted = (e.name for e in study.direction_evals(direction))
    for name, strategy in strategy_rows(direction):
      a = value(results, name, test, "multilingual", "map")
      b = value(results, name, shifted, "multilingual", "map")
      za = value(results, "zeroshot", test, "multilingual", "map")
      zb = value(results, "zeroshot", shifted, "multilingual", "map")
      gain = lambda x, z: None if x is None or z is None else x - z
      rows.append([direction, STRATEGY_NAMES[strategy], fmt(a), fmt(b),
                   fmt(None if a is None or b is None else a - b),
                   fmt(gain(a, za)) if strategy else DASH, fmt(gain(b, zb)) if strategy else DASH])
  # "in-domain - shifted" compares two different test sets (pool sizes differ too), so it is not
  # a pure shift effect; the gains over zero-shot on each set are the comparable columns.
  return table(["direction", "batches", "in-domain mAP multi", "shifted mAP multi",
                "in-domain - shifted (different sets)", "gain over zero-shot in-domain",
                "gain over zero-shot shifted"], rows)


def alpha_section(results: dict, plotted: bool) -> list[str]:
  lines = []
  rows = []
  for evaluation in (e.name for e in study.direction_evals("A")):
    for family in FAMILIES:
      points = dict(alpha_points(results, evaluation, family))
      rows.append([evaluation, family] + [fmt(points.get(a)) for a in (0.0, 0.25, 0.5, 0.75, 1.0)])
  lines += table(["evaluation", "mAP", "alpha 0 (= X-Y)", "0.25", "0.5", "0.75",
                  "1 (= X-X-mono)"], rows)
  if plotted:
    lines += [f"![alpha curve](../experiments/results/{PLOTS}/alpha_curve.png)", ""]
  return lines


def significance_section(results_dir: str) -> list[str]:
  """The hybrid-vs-baseline table: raw p (a bound at the floor) and Holm over every p shown."""
  from hybrid_jax.eval import significance  # pylint: disable=g-import-not-at-top
  found = []  # (direction, evaluation, base, {family: row})
  for direction in ("A", "B"):
    for evaluation in (e.name for e in study.direction_evals(direction)):
      for base in (f"{direction}-mono", f"{direction}-xy", "zeroshot"):
        sig = significance_rows(results_dir, base, f"{direction}-hybrid", evaluation)
        if sig is not None:
          found.append((direction, evaluation, base, {r["name"]: r for r in sig}))
  tested = [r for *_, by_name in found for r in (by_name.get(f) for f in FAMILIES) if r]
  floors = [r.get("p_floor", 0.0) for r in tested]
  at_floor = [f > 0 and r["p"] <= f * (1 + 1e-9) for r, f in zip(tested, floors)]
  adjusted, bound = significance.holm_with_bounds([r["p"] for r in tested], at_floor)
  holm = {id(r): (h, b) for r, h, b in zip(tested, adjusted, bound)}
  rows = []
  for direction, evaluation, base, by_name in found:
    cells = []
    for family in FAMILIES:
      r = by_name.get(family)
      if r is None:
        cells.append(DASH)
        continue
      h, b = holm[id(r)]
      p_text = significance.format_p(r["p"], r.get("p_floor", 0.0))
      cells.append(f"{r['diff']:+.3f} ({100 * r['diff'] / r['a']:+.0f}%), "
                   f"p{'' if p_text.startswith('<=') else '='}{p_text}, "
                   f"Holm {significance.format_p(h, h if b else 0.0)}")
    rows.append([direction, evaluation, STRATEGY_NAMES[run_by_name(base).strategy]] + cells)
  lines = []
  if rows:
    lines += table(["direction", "evaluation", "hybrid vs", "mono: mAP diff (rel.), p",
                    "cross: mAP diff (rel.), p", "multi: mAP diff (rel.), p"], rows)
  return lines


def mean_sd(values: list[float], digits: int = 3) -> str:
  """'mean ± sd (n=k)' over the seeds that have a result (sample sd), or the one value."""
  if len(values) < 2:
    return fmt(values[0], digits) + " (1 seed)" if values else DASH
  mean, sd = mean_and_sd(values)
  return f"{mean:.{digits}f} ± {sd:.{digits}f} (n={len(values)})"


# Seed columns: the three families' mAP, the language-bias measure and question 1's group.
SEED_COLUMNS = (("mAP mono (mean ± sd)", "monolingual", "map", 3),
                ("mAP cross", "cross_lingual", "map", 3),
                ("mAP multi", "multilingual", "map", 3),
                ("rank distance", "multilingual", "rank_distance", 1),
                ("unseen languages: mAP multi", "multilingual", "unseen/map", 3))


def seed_section(results: dict, plotted: bool) -> list[str]:
  rows = []
  for evaluation in (e.name for e in study.direction_evals("A")):
    for strategy in study_config.STRATEGIES:
      cells = []
      for _, family, metric, digits in SEED_COLUMNS:
        values = [value(results, n, evaluation, family, metric) for n in seed_runs(strategy)]
        cells.append(mean_sd([v for v in values if v is not None], digits))
      rows.append([evaluation, STRATEGY_NAMES[strategy]] + cells)
  lines = table(["evaluation", "batches"] + [c[0] for c in SEED_COLUMNS], rows)
  if plotted:
    lines += [f"![seeds](../experiments/results/{PLOTS}/seeds.png)", ""]
  return lines


def paper_section() -> list[str]:
  rows = []
  for (model, strategy), by_dataset in PAPER.items():
    rows.append([model, STRATEGY_NAMES[strategy].split(" (")[0]] + [
        " / ".join(f"{x:.3f}" for x in by_dataset[d][:3]) + f", RD {by_dataset[d][3]:.1f}"
        for d in ("xquad-r", "mlqa-r")])
  return table(["model", "batches", "XQuAD-R mAP mono / cross / multi", "MLQA-R"], rows)


def status_lines(results: dict) -> list[str]:
  missing = [f"{r.name} ({e.name})" for r in study.RUNS for e in r.evaluations()
             if e.name not in results.get(r.name, {})]
  done = sum(1 for r in study.RUNS for e in r.evaluations()) - len(missing)
  total = sum(1 for r in study.RUNS for e in r.evaluations())
  lines = [f"Status: {done} of {total} evaluations done."]
  if missing:
    lines.append("Not yet run (shown as \"-\"): " + ", ".join(missing) + ".")
  return lines + [""]


def build(results_dir: str = study.RESULTS_DIR, output: str = OUTPUT) -> str:
  results = load_results(results_dir)
  os.makedirs(os.path.join(results_dir, PLOTS), exist_ok=True)
  plotted_alpha = plot_alpha(results, os.path.join(results_dir, PLOTS, "alpha_curve.png"))
  plotted_bars = plot_strategies(results, os.path.join(results_dir, PLOTS, "strategies.png"))
  plotted_seeds = plot_seeds(results, os.path.join(results_dir, PLOTS, "seeds.png"))
  intro_path = os.path.join(HERE, "RESULTS_intro.md")
  reading_path = os.path.join(HERE, "RESULTS_reading.md")
  lines = ["# Results: hybrid batching vs X-X-mono and X-Y on real data (multilingual-e5-small)",
           "", "<!-- Generated by `python experiments/report.py` from experiments/results/; edit "
           "experiments/RESULTS_intro.md / RESULTS_reading.md, not this file. -->", ""]
  lines += status_lines(results)
  if os.path.isfile(intro_path):
    with open(intro_path, encoding="utf-8") as f:
      lines += [f.read().rstrip(), ""]
  lines += ["## Headline: multilingual pool (X->all) and language bias", ""]
  lines += domain_shift(results)
  if plotted_bars:
    lines += [f"![strategies](../experiments/results/{PLOTS}/strategies.png)", ""]
  for direction, title in (("A", "Direction A: train MLQA-R, test held-out MLQA-R and XQuAD-R"),
                           ("B", "Direction B: train XQuAD-R, test held-out XQuAD-R and MLQA-R")):
    lines += [f"## {title}", ""]
    lines += paper_shaped(results, direction)
    lines += ["### Question 1: unseen and low-resource languages", ""]
    lines += group_table(results, direction)
    lines += ["### Per language", ""]
    lines += per_language(results, direction)
    lines += ["Heatmaps (query language x candidate language mAP): " + ", ".join(
        f"[{name} {e.name}](../experiments/results/{name}/{e.name}/grid_map.png)"
        for name, _ in strategy_rows(direction) for e in study.direction_evals(direction)
        if e.name in results.get(name, {})), ""]
  lines += ["## Significance: hybrid vs each baseline (paired permutation test over questions)",
            "", "Difference in macro-averaged mAP (hybrid minus the baseline; relative in "
            "brackets), two-sided p-value of a paired sign-flip test that flips each question id "
            "with all its query languages together (10,000 flips, seed 0; "
            "`python -m hybrid_jax.compare BASE HYBRID`; \"<=0.0001\" is the Monte-Carlo floor), "
            "and Holm's adjustment over every p-value in this table. These compare single "
            "checkpoints (seed 0): training noise is not inside them.", ""]
  lines += significance_section(results_dir)
  lines += ["## Alpha sweep (direction A)", ""]
  lines += alpha_section(results, plotted_alpha)
  lines += ["## Seeds (direction A: seeds 0, 1, 2)", ""]
  lines += seed_section(results, plotted_seeds)
  lines += ["## The paper's numbers, for context (XLM-R / LaBSE fine-tuned on mMARCO, batch 100)",
            ""]
  lines += paper_section()
  return write(lines + hand_written(reading_path), output, results)


def hand_written(path: str) -> list[str]:
  """The lines of an edited part of the report (intro, reading), or none if it is missing."""
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [f.read().rstrip(), ""]


def write(lines: list[str], output: str, results: dict) -> str:
  os.makedirs(os.path.dirname(output), exist_ok=True)
  with open(output, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  print(f"[report] wrote {output} ({sum(len(v) for v in results.values())} evaluations)")
  return output


if __name__ == "__main__":
  build()
