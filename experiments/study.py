r"""Runs the whole study of issue 10, resumably, and rebuilds its tables and plots.

    python experiments/study.py                      # run what is missing, then rebuild the report
    python experiments/study.py --only=A-hybrid      # one run (exact name, else a prefix: A-)
    python experiments/study.py --report_only        # tables and plots from committed results
    python experiments/study.py --list               # every job, done or not, with its command

Each run trains multilingual-e5-small with experiments/study_config.py (one argument set per
run, listed in RUNS) in <workroot>/<run>, then scores its best checkpoint (validation loss on the
same fixed hybrid batches for every run of the same seed) on the in-domain held-out test part and on the full grid
of the other dataset. A job whose output exists is skipped; an interrupted training resumes from
its last checkpoint (every 50 steps), since `hybrid_jax.train` restores the latest one itself.
Checkpoints and embeddings stay in the workroot; the small result files (results.json,
results.md, settings.csv, per_query.npz, PNGs) are copied to experiments/results/<run>/<eval>/,
and experiments/report.py turns them into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import study_config  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS_DIR = os.path.join(HERE, "results")
DEFAULT_WORKROOT = os.environ.get("HYBRID_JAX_STUDY_ROOT",
                                  os.path.join(os.path.dirname(REPO), "study_runs"))
# Files of an evaluation output directory that are small enough to commit (no embeddings/).
RESULT_FILES = ("results.json", "results_meta.json", "results.md", "settings.csv",
                "per_query.npz", "grid_map.png", "rank_distance.png")
LOW_RESOURCE = {"xquad-r": ("el", "hi", "th", "tr", "vi"), "mlqa-r": ("hi", "vi")}
# Planning figures for the ETA before any run has measured its own (this 2-core CPU, e5-small).
SECONDS_PER_STEP = 4.6
TEXTS_PER_SECOND = 80.0
EVAL_TEXTS = {"xquad-r": 26_104, "mlqa-r": 24_733, "xquad-r-test": 5_886, "mlqa-r-test": 5_065}


@dataclasses.dataclass(frozen=True)
class Evaluation:
  name: str  # output directory name, e.g. "xquad-r" or "mlqa-r-test"
  dataset: str
  part: str  # all | test

  def flags(self) -> list[str]:
    out = [f"--dataset={self.dataset}", f"--part={self.part}"]
    if self.part != "all":  # explicit, so that a zero-shot --model scores the same articles
      out += [f"--heldout_fraction={study_config.HELDOUT_FRACTION}", "--heldout_unit=article",
              "--heldout_seed=0"]
    return out


def direction_evals(direction: str) -> tuple[Evaluation, ...]:
  trained = study_config.TRAINING_DATASETS[direction]
  shifted = next(d for d in study_config.TRAINING_DATASETS.values() if d != trained)
  return (Evaluation(f"{trained}-test", trained, "test"), Evaluation(shifted, shifted, "all"))


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  direction: str  # A | B | "" (zero-shot: both directions' test sets)
  strategy: str = ""  # mono | xy | hybrid | "" (zero-shot)
  alpha: float = 0.5
  seed: int = 0
  family: str = "main"  # main | alpha | seed

  @property
  def zero_shot(self) -> bool:
    return not self.strategy

  @property
  def config_arg(self) -> str:
    return (f"direction={self.direction},strategy={self.strategy},alpha={self.alpha},"
            f"seed={self.seed}")

  def evaluations(self) -> tuple[Evaluation, ...]:
    if self.zero_shot:
      return direction_evals("A") + direction_evals("B")
    return direction_evals(self.direction)


def _runs() -> list[Run]:
  runs = [Run("zeroshot", "")]
  for direction in ("A", "B"):
    runs += [Run(f"{direction}-{s}", direction, s) for s in study_config.STRATEGIES]
  # Alpha sweep on A: 0 and 1 are the X-Y and mono runs (the sampler's hybrid at alpha 0 / 1
  # draws exactly their batches: tests/experiments/test_study.py), so only 0.25 and 0.75 train.
  runs += [Run(f"A-hybrid-alpha{a}", "A", "hybrid", alpha=a, family="alpha") for a in (0.25, 0.75)]
  for seed in (1, 2):
    runs += [Run(f"A-{s}-seed{seed}", "A", s, seed=seed, family="seed")
             for s in study_config.STRATEGIES]
  return runs


RUNS = _runs()


class Study:
  """Jobs of the study over one workroot: what is done, what to run, how long the rest takes."""

  def __init__(self, workroot: str, results_dir: str = RESULTS_DIR, python: str = sys.executable):
    self.workroot, self.results_dir, self.python = workroot, results_dir, python

  def workdir(self, run: Run) -> str:
    return os.path.join(self.workroot, run.name)

  def result_dir(self, run: Run, evaluation: Evaluation) -> str:
    return os.path.join(self.results_dir, run.name, evaluation.name)

  # --- state ---
  def trained_steps(self, run: Run) -> int:
    from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
    if run.zero_shot:
      return 0
    return checkpointing.latest_step(self.workdir(run)) or 0

  def training_done(self, run: Run) -> bool:
    return run.zero_shot or self.trained_steps(run) >= study_config.NUM_STEPS

  def evaluation_done(self, run: Run, evaluation: Evaluation) -> bool:
    return os.path.isfile(os.path.join(self.result_dir(run, evaluation), "results.json"))

  def done(self, run: Run) -> bool:
    """Every evaluation of the run is in results/ (its checkpoints are not needed any more: a
    fresh machine or another --workroot must not retrain a finished run)."""
    return all(self.evaluation_done(run, e) for e in run.evaluations())

  # --- commands ---
  def train_command(self, run: Run) -> list[str]:
    return [self.python, "-m", "hybrid_jax.train",
            f"--config={os.path.relpath(os.path.join(HERE, 'study_config.py'), REPO)}:"
            f"{run.config_arg}", f"--workdir={self.workdir(run)}"]

  def evaluate_command(self, run: Run, evaluation: Evaluation) -> list[str]:
    groups = f"low_resource={'+'.join(LOW_RESOURCE[evaluation.dataset])}"
    if run.zero_shot:
      from hybrid_jax.models import e5_convert  # pylint: disable=g-import-not-at-top
      source = [f"--model={e5_convert.default_dir()}", "--query_prefix=query: ",
                "--passage_prefix=passage: "]
      # The unseen group of the direction whose shifted-domain grid this is (A: el ru th tr).
      trained = next(d for d in study_config.TRAINING_DATASETS.values()
                     if d != evaluation.dataset)
      unseen = unseen_languages(evaluation.dataset, trained)
      if evaluation.part == "all" and unseen:
        groups += f";unseen={'+'.join(unseen)}"
    else:
      source = [f"--workdir={self.workdir(run)}", "--step=best"]
    out = os.path.join(self.workroot, run.name, "eval", evaluation.name)
    return [self.python, "-m", "hybrid_jax.evaluate", *source, *evaluation.flags(),
            f"--groups={groups}", f"--output_dir={out}"]

  def jobs(self, run: Run):
    """(kind, evaluation or None, command) of every job of a run, training first."""
    if not run.zero_shot:
      yield "train", None, self.train_command(run)
    for evaluation in run.evaluations():
      yield "evaluate", evaluation, self.evaluate_command(run, evaluation)

  # --- timing (for the ETA) ---
  def seconds_per_step(self) -> float:
    """Median measured train step time over the runs so far (metrics.jsonl), else the plan."""
    measured = []
    for run in RUNS:
      path = os.path.join(self.workdir(run), "metrics.jsonl")
      if run.zero_shot or not os.path.isfile(path):
        continue
      with open(path, encoding="utf-8") as f:
        for line in f:
          record = json.loads(line)
          if record.get("steps_per_second"):
            measured.append(1.0 / record["steps_per_second"])
    return sorted(measured)[len(measured) // 2] if measured else SECONDS_PER_STEP

  def remaining_seconds(self, runs) -> float:
    per_step = self.seconds_per_step()
    total = 0.0
    for run in runs:
      if self.done(run):
        continue
      if not run.zero_shot:
        left = max(0, study_config.NUM_STEPS - self.trained_steps(run))
        validations = left / 50 + (1 if left else 0)
        total += left * per_step + validations * 16 * per_step / 3 + (60 if left else 0)
      for evaluation in run.evaluations():
        if not self.evaluation_done(run, evaluation):
          total += EVAL_TEXTS[evaluation.name] / TEXTS_PER_SECOND + 30
    return total

  # --- running ---
  def collect(self, run: Run, evaluation: Evaluation) -> None:
    source = os.path.join(self.workroot, run.name, "eval", evaluation.name)
    target = self.result_dir(run, evaluation)
    os.makedirs(target, exist_ok=True)
    for name in RESULT_FILES:
      if os.path.isfile(os.path.join(source, name)):
        shutil.copy2(os.path.join(source, name), os.path.join(target, name))
    if run.zero_shot:
      return
    # The run's config (what was trained) and its training curve, once per run.
    for name in ("config.json", "metrics.jsonl", "training_languages.json"):
      path = os.path.join(self.workdir(run), name)
      if os.path.isfile(path):
        shutil.copy2(path, os.path.join(self.results_dir, run.name, name))

  def run_job(self, run: Run, kind: str, evaluation, command: list[str]) -> None:
    log_path = os.path.join(self.workroot, run.name,
                            "train.log" if kind == "train" else f"eval-{evaluation.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    printable = " ".join(shlex.quote(c) for c in command)
    print(f"[study] {run.name}: {kind} {evaluation.name if evaluation else ''}\n    {printable}\n"
          f"    log: {log_path}", flush=True)
    started = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n$ {printable}\n")
      log.flush()
      returncode = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if returncode != 0:
      raise SystemExit(f"[study] {run.name}: {kind} failed with exit status {returncode}; see "
                       f"{log_path}. Fix it and run the same command again (it resumes).")
    if kind == "train" and not self.training_done(run):
      # The trainer exits 0 after a SIGTERM checkpoint: scoring that model would commit the
      # results of a half-trained run as final.
      raise SystemExit(f"[study] {run.name}: training stopped at step {self.trained_steps(run)} "
                       f"of {study_config.NUM_STEPS} (preempted?); run the same command again "
                       "to resume.")
    if evaluation is not None:
      self.collect(run, evaluation)
    print(f"[study] {run.name}: {kind} done in {time.time() - started:.0f}s", flush=True)

  def run(self, runs) -> None:
    runs = list(runs)
    for i, run in enumerate(runs):
      if self.done(run):
        continue
      left = self.remaining_seconds(runs[i:])
      done = sum(self.done(r) for r in runs)
      print(f"[study] {done}/{len(runs)} runs done; next {run.name}; ETA for the rest "
            f"{left / 3600:.1f} h", flush=True)
      for kind, evaluation, command in self.jobs(run):
        if kind == "train" and self.training_done(run):
          continue
        if kind == "evaluate" and self.evaluation_done(run, evaluation):
          continue
        self.run_job(run, kind, evaluation, command)


def unseen_languages(evaluated: str, trained: str) -> tuple[str, ...]:
  """Languages of dataset `evaluated` that dataset `trained` has no file for.

  Read from the fetch registry, not the data folder, so planning (--list) works before the data
  is fetched; tests check that the registry and the files agree.
  """
  from hybrid_jax.data import fetch  # pylint: disable=g-import-not-at-top
  from hybrid_jax.eval import grid_evaluator  # pylint: disable=g-import-not-at-top
  return grid_evaluator.unseen_languages(fetch.DATASETS[evaluated].languages,
                                         fetch.DATASETS[trained].languages)


def select(only: str) -> list[Run]:
  if not only:
    return RUNS
  names = {r.name for r in RUNS}
  # An exact name selects that run only (A-hybrid is also the prefix of its alpha and seed runs).
  chosen = [r for r in RUNS if any(r.name == p if p in names else r.name.startswith(p)
                                   for p in only.split(","))]
  if not chosen:
    raise SystemExit(f"--only={only!r} matches no run; runs: {[r.name for r in RUNS]}")
  return chosen


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workroot", default=DEFAULT_WORKROOT,
                      help="where run workdirs (checkpoints, embeddings, logs) go")
  parser.add_argument("--only", default="", help="comma-separated run name prefixes")
  parser.add_argument("--report_only", action="store_true", help="only rebuild tables and plots")
  parser.add_argument("--list", action="store_true", help="print every job and its state")
  args = parser.parse_args(argv)
  study = Study(args.workroot)
  runs = select(args.only)
  if args.list:
    for run in runs:
      for kind, evaluation, command in study.jobs(run):
        state = ("done" if (study.training_done(run) if kind == "train"
                            else study.evaluation_done(run, evaluation)) else "to do")
        if kind == "train" and state != "done" and study.trained_steps(run):
          state = f"at step {study.trained_steps(run)}"
        print(f"{run.name:<22} {kind:<8} {evaluation.name if evaluation else '':<13} {state:<12}"
              f" {' '.join(shlex.quote(c) for c in command[1:])}")
    print(f"ETA for what is left: {study.remaining_seconds(runs) / 3600:.1f} h")
    return
  if not args.report_only:
    study.run(runs)
  import report  # pylint: disable=g-import-not-at-top
  report.build(RESULTS_DIR)


if __name__ == "__main__":
  from hybrid_jax import errors  # pylint: disable=g-import-not-at-top
  errors.exit_on_user_error(main)
