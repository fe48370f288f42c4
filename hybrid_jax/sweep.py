r"""Alpha sweep: one hybrid run per alpha, then a table and a plot of the grid metrics against alpha.

    python -m hybrid_jax.sweep --config=configs/xlmr_hybrid.py:runlocal --alphas=0,0.25,0.5,0.75,1 \
        --workdir=/tmp/alpha_sweep [--config.train.num_steps=600 ...]

alpha is the probability that a batch is X-X-mono (PAPER.md, "Batch sampling"): 0 trains on X-Y
batches only, 1 on X-X-mono batches only. The paper picked alpha = 0.5 by a grid search and reports
stable results for alpha in [0.4, 0.6]; its reviewers asked for the analysis behind that sentence.

Each alpha trains in WORKDIR/alpha_<a> with everything else from the config (same seeds, so the
runs differ only in their batch types). Re-running the command resumes an interrupted run and
re-evaluates finished ones without training them again. At the end (and after every run, so a
partial sweep is readable) the sweep writes to WORKDIR:
  alpha_sweep.json   one row per alpha: validation loss, and per evaluator the summary mAP
                     (monolingual, cross-lingual, multilingual) and the multilingual rank distance
  alpha_sweep.csv    the same rows, flat
  alpha_sweep.md     the table, with the alpha of the best multilingual mAP per evaluator (the
                     paper's criterion; the validation losses, measured on the same batches for
                     every alpha, are reported next to it)
  alpha_sweep.png    mAP per setting and rank distance against alpha, one panel per evaluator
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Callable, Sequence

from hybrid_jax import errors

SETTINGS = ("monolingual", "cross_lingual", "multilingual")
SWEEP_FILES = ("alpha_sweep.json", "alpha_sweep.csv", "alpha_sweep.md", "alpha_sweep.png")


class SweepConfigError(errors.UserError):
  """The sweep's flags or config cannot give a meaningful alpha sweep."""


def parse_alphas(text: str) -> list[float]:
  """ "0,0.25,0.5" -> [0.0, 0.25, 0.5], sorted; each in [0, 1], no duplicates."""
  items = [t.strip() for t in (text or "").split(",") if t.strip()]
  if not items:
    raise SweepConfigError("--alphas is empty; expected comma-separated values in [0, 1], "
                           "e.g. --alphas=0,0.25,0.5,0.75,1")
  alphas = []
  for item in items:
    try:
      alpha = float(item)
    except ValueError:
      raise SweepConfigError(f"--alphas: {item!r} is not a number; expected values in [0, 1]"
                             ) from None
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
      raise SweepConfigError(f"--alphas: {item} is outside [0, 1] (alpha is the probability of "
                             "an X-X-mono batch)")
    alphas.append(alpha)
  if len(set(alphas)) != len(alphas):
    raise SweepConfigError(f"--alphas={text!r} repeats a value")
  return sorted(alphas)


def run_dir(workdir: str, alpha: float) -> str:
  return os.path.join(workdir, f"alpha_{alpha:g}")


def _row(alpha: float, workdir: str, result: dict) -> dict:
  metrics = result.get("metrics") or {}
  row = {"alpha": alpha, "workdir": workdir, "step": int(result["step"]),
         "validation_loss": metrics.get("validation/loss"),
         "validation_loss_at_start": metrics.get("validation/loss_at_start"), "evals": {}}
  for name, results in (result.get("evals") or {}).items():
    summary = results.get("summary") or {}
    entry = {f"{setting}_map": (summary.get(setting) or {}).get("map") for setting in SETTINGS}
    entry["rank_distance"] = (summary.get("multilingual") or {}).get("rank_distance")
    row["evals"][name] = entry
  return row


def _log(message: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def sweep(config, workdir: str, alphas: Sequence[float],
          train_fn: Callable[..., dict] | None = None) -> list[dict]:
  """Trains (or resumes, or re-evaluates) one run per alpha; returns the rows, writes the report.

  Stops early, with the rows so far written, when a run is preempted (SIGTERM): re-running the
  same command resumes it."""
  if config.data.batch_type != "hybrid":
    raise SweepConfigError(
        f"config.data.batch_type={config.data.batch_type!r}: alpha only matters for hybrid "
        "batches; use a *_hybrid.py config (alpha 0 and 1 are the X-Y and X-X-mono baselines)")
  if train_fn is None:
    from hybrid_jax import trainer  # pylint: disable=g-import-not-at-top
    train_fn = trainer.train_and_evaluate
  rows = []
  started = time.time()
  for i, alpha in enumerate(alphas):
    run_config = config.copy_and_resolve_references()
    run_config.data.alpha = float(alpha)
    directory = run_dir(workdir, alpha)
    eta = ""
    if i:
      per_run = (time.time() - started) / i
      eta = f"; ETA {per_run * (len(alphas) - i) / 60:.1f} min"
    _log(f"== alpha sweep: alpha={alpha:g} ({i + 1}/{len(alphas)}) in {directory}{eta}")
    result = train_fn(run_config, directory)
    rows.append(_row(alpha, directory, result))
    write_report(workdir, rows)
    if result.get("preempted"):
      _log(f"alpha sweep stopped at alpha={alpha:g} (preempted); re-run the same command to "
           "resume")
      break
  return rows


# --- the report ------------------------------------------------------------------------------------
def _eval_names(rows: Sequence[dict]) -> list[str]:
  names = []
  for row in rows:
    names += [n for n in row["evals"] if n not in names]
  return names


def _fmt(value, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def best_alphas(rows: Sequence[dict]) -> dict[str, float]:
  """Per evaluator, the alpha of the highest multilingual mAP (the paper's selection criterion:
  a held-out multilingual retrieval set). Validation losses (on identical batches for every
  alpha, data.validation_batch_type) are reported but do not pick the alpha."""
  best = {}
  for name in _eval_names(rows):
    scored = [r for r in rows if (r["evals"].get(name) or {}).get("multilingual_map") is not None]
    if scored:
      best[f"{name}/multilingual_map"] = max(
          scored, key=lambda r: r["evals"][name]["multilingual_map"])["alpha"]
  return best


def markdown_table(rows: Sequence[dict]) -> str:
  names = _eval_names(rows)
  header = ["alpha", "batches", "validation loss (own batch mix)"]
  for name in names:
    header += [f"{name} mAP mono", f"{name} mAP cross", f"{name} mAP multi",
               f"{name} rank dist."]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    kind = {0.0: "X-Y only", 1.0: "X-X-mono only"}.get(row["alpha"], "hybrid")
    cells = [f"{row['alpha']:g}", kind, _fmt(row["validation_loss"], 4)]
    for name in names:
      entry = row["evals"].get(name) or {}
      cells += [_fmt(entry.get(f"{s}_map")) for s in SETTINGS]
      cells.append(_fmt(entry.get("rank_distance"), 1))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_report(workdir: str, rows: Sequence[dict]) -> list[str]:
  """alpha_sweep.{json,csv,md,png} in workdir (process 0 only); returns the paths written."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0 or not rows:
    return []
  os.makedirs(workdir, exist_ok=True)
  paths = [os.path.join(workdir, name) for name in SWEEP_FILES]
  best = best_alphas(rows)
  with open(paths[0], "w", encoding="utf-8") as f:
    json.dump({"rows": list(rows), "best_alpha": best}, f, indent=1)
  names = _eval_names(rows)
  with open(paths[1], "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["alpha", "step", "validation_loss"] + [
        f"{n}/{m}" for n in names for m in [f"{s}_map" for s in SETTINGS] + ["rank_distance"]])
    for row in rows:
      values = [row["alpha"], row["step"], row["validation_loss"]]
      for n in names:
        entry = row["evals"].get(n) or {}
        values += [entry.get(f"{s}_map") for s in SETTINGS] + [entry.get("rank_distance")]
      writer.writerow(["" if v is None else v for v in values])
  best_lines = [f"- best multilingual mAP on {key.split('/')[0]}: alpha = {value:g}"
                for key, value in best.items()]
  best_lines.append("- validation losses are not comparable across alphas: each run's validation "
                    "batches follow its own mix of batch types")
  with open(paths[2], "w", encoding="utf-8") as f:
    f.write("# Alpha sweep\n\nalpha = probability of an X-X-mono batch (else X-Y). Runs: "
            + ", ".join(f"`{r['workdir']}` (step {r['step']})" for r in rows) + ".\n\n"
            + markdown_table(rows) + "\n\n" + "\n".join(best_lines) + "\n")
  _plot(paths[3], rows, names)
  return paths


def _plot(path: str, rows: Sequence[dict], names: Sequence[str]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = list(names) or ["validation loss"]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  alphas = [r["alpha"] for r in rows]
  for ax, name in zip(axes[0], panels):
    if name not in names:
      ax.plot(alphas, [r["validation_loss"] for r in rows], "o-", color="black")
      ax.set_ylabel("validation loss")
    else:
      for setting, marker in zip(SETTINGS, "os^"):
        values = [(r["evals"].get(name) or {}).get(f"{setting}_map") for r in rows]
        ax.plot(alphas, [math.nan if v is None else v for v in values], marker + "-",
                label=f"mAP {setting.replace('_', '-')}")
      ax.set_ylabel("mAP")
      distances = [(r["evals"].get(name) or {}).get("rank_distance") for r in rows]
      if any(d is not None for d in distances):
        twin = ax.twinx()
        twin.plot(alphas, [math.nan if d is None else d for d in distances], "x--", color="gray",
                  label="rank distance")
        twin.set_ylabel("rank distance (lower = less language bias)")
        twin.legend(loc="center right", fontsize=8)
      ax.legend(loc="center left", fontsize=8)
    ax.set_xlabel("alpha (share of X-X-mono batches)")
    ax.set_title(name)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- command line ----------------------------------------------------------------------------------
def main() -> None:
  # --config, --workdir and --distributed are hybrid_jax.train's flags (imported here, not at the
  # top, so that importing this module as a library defines no flags).
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from hybrid_jax import train as train_cli  # pylint: disable=g-import-not-at-top

  alphas_flag = flags.DEFINE_string("alphas", "0,0.25,0.5,0.75,1",
                                    "Comma-separated alphas in [0, 1].")

  def run(argv):
    train_cli.start_process(argv)
    rows = errors.exit_on_user_error(lambda: sweep(
        train_cli.CONFIG.value, train_cli.WORKDIR.value, parse_alphas(alphas_flag.value)))
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      print("\n== alpha sweep ==\n" + markdown_table(rows))
      for key, value in best_alphas(rows).items():
        print(f"best {key}: alpha = {value:g}")
      print(f"report: {', '.join(os.path.join(train_cli.WORKDIR.value, n) for n in SWEEP_FILES)}")

  app.run(run)


if __name__ == "__main__":
  main()
