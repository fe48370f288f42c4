r"""Runs the whole study, resumably: protocol v2 (issue 22, the default) or v1 (issue 10).

    python experiments/study.py                      # protocol v2: run what is missing
    python experiments/study.py --only=A-hybrid-seed0  # one run (exact name, else a prefix: A-)
    python experiments/study.py --list               # every job, done or not, with its command
    python experiments/study.py --protocol=1 --report_only   # v1's tables from committed results

Several runners (the same command started N times, e.g. one per core with --single_thread) share
the runs out: each claims a run before its jobs (Study.claim_dir) and skips one that another live
runner holds, so no runner idles while another has a queue.

Protocol v2 (StudyV2, results in experiments/results_v2/, workdirs in <workroot>/protocol2, which
committed commands call $STUDY_ROOT): validation ids by article (no validation gold sentence is
trained on), packed training, the false-negative mask definition in every config.json; three B
pilots (600 steps) fix B's step budget (B_budget.json: the argmin of their mean validation loss)
before any B seed runs; then 5 seeds x {mono, xy, hybrid} x {A, B}, alpha 0.25 / 0.75 x 3 seeds
in A, and zero-shot. Every trained run is scored at its best (shared validation) AND last
checkpoint on both held-out parts (mlqa-r-test, xquad-r-test) and the other collection's full
grid: results_v2/<run>/{best,last}/<evaluation>/ and checkpoints.json (the two steps; when they
are equal the last scores are a copy). experiments/report_v2.py turns them into
docs/RESULTS_v2.md.

Protocol v1 (below, RUNS):

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
CLAIMS_DIR = ".claims"  # under the workroot: which runner has which run (Study.claim_dir)
DEFAULT_WORKROOT = os.environ.get("HYBRID_JAX_STUDY_ROOT",
                                  os.path.join(os.path.dirname(REPO), "study_runs"))
# Files of an evaluation output directory that are small enough to commit (no embeddings/).
RESULT_FILES = ("results.json", "results_meta.json", "results.md", "settings.csv",
                "per_query.npz", "grid_map.png", "rank_distance.png")
LOW_RESOURCE = {"xquad-r": ("el", "hi", "th", "tr", "vi"), "mlqa-r": ("hi", "vi")}
# Planning figures for the ETA before any run has measured its own (this 2-core CPU, e5-small).
SECONDS_PER_STEP = 4.6  # v1 (padded, 2 threads); v2 measures its own from metrics.jsonl
TEXTS_PER_SECOND = 80.0
EVAL_TEXTS = {"xquad-r": 26_104, "mlqa-r": 24_733, "xquad-r-test": 5_886, "mlqa-r-test": 5_065}


@dataclasses.dataclass(frozen=True)
class Evaluation:
  name: str  # output directory name, e.g. "xquad-r", "mlqa-r-test" (v2: "best/xquad-r")
  dataset: str
  part: str  # all | test
  step: str = "best"  # the checkpoint scored: best | last
  centered: bool = False  # v2: the same embeddings scored with --center_languages

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
  family: str = "main"  # main | alpha | seed (v1); main | alpha | pilot (v2)
  steps: int = study_config.NUM_STEPS
  protocol: int = 1

  @property
  def zero_shot(self) -> bool:
    return not self.strategy

  @property
  def config_arg(self) -> str:
    arg = (f"direction={self.direction},strategy={self.strategy},alpha={self.alpha},"
           f"seed={self.seed}")
    if self.protocol == 1:
      return arg + ",protocol=1"
    return arg + f",steps={self.steps}"

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
    self.env = None  # the jobs' environment (None: this process's)

  def single_threaded(self) -> None:
    """Jobs run XLA (and TensorFlow's input pipeline) on one thread: on this 2-core VM XLA:CPU
    trains faster on 1 thread than on 2 (benchmarks/README.md, real_step.py). Two runners with
    disjoint --only selections then share the machine (each at about half speed: no more total
    throughput, but both directions advance)."""
    xla = os.environ.get("XLA_FLAGS", "")
    self.env = dict(os.environ, XLA_FLAGS=(xla + " --xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1").strip(),
                    OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")

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
    if run.zero_shot or self.trained_steps(run) >= run.steps:
      return True
    # A finished run's checkpoints are deleted (StudyV2.finished): its results say it trained.
    if run.evaluations():
      return self.done(run)
    return os.path.isfile(os.path.join(self.results_dir, run.name, "metrics.jsonl"))  # a pilot

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
      source = [f"--workdir={self.workdir(run)}", f"--step={evaluation.step}"]
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
        left = max(0, run.steps - self.trained_steps(run))
        validations = left / 50 + (1 if left else 0)
        total += left * per_step + validations * 16 * per_step / 3 + (60 if left else 0)
      for evaluation in run.evaluations():
        if not self.evaluation_done(run, evaluation):
          if evaluation.centered or self.reuses_embeddings(run, evaluation):
            total += 30  # re-scores exported embeddings: seconds
            continue
          total += EVAL_TEXTS[evaluation.name.split("/")[-1]] / TEXTS_PER_SECOND + 30
    return total

  def reuses_embeddings(self, run: Run, evaluation: Evaluation) -> bool:
    """Whether the evaluation re-scores another one's exported embeddings (v2) instead of
    encoding."""
    del run, evaluation
    return False

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

  def run_job(self, run: Run, kind: str, evaluation, command: list[str],
              collect: bool = True) -> None:
    """Runs one job; an evaluation's result files are then copied to results/ (unless not
    `collect`: a re-run for its side effects only)."""
    log_path = os.path.join(self.workroot, run.name, "train.log" if kind == "train"
                            else f"eval-{evaluation.name.replace('/', '-')}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    printable = " ".join(shlex.quote(c) for c in command)
    print(f"[study] {run.name}: {kind} {evaluation.name if evaluation else ''}\n    {printable}\n"
          f"    log: {log_path}", flush=True)
    started = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n$ {printable}\n")
      log.flush()
      returncode = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env)
    if returncode != 0:
      raise SystemExit(f"[study] {run.name}: {kind} failed with exit status {returncode}; see "
                       f"{log_path}. Fix it and run the same command again (it resumes).")
    if kind == "train" and not self.training_done(run):
      # The trainer exits 0 after a SIGTERM checkpoint: scoring that model would commit the
      # results of a half-trained run as final.
      raise SystemExit(f"[study] {run.name}: training stopped at step {self.trained_steps(run)} "
                       f"of {run.steps} (preempted?); run the same command again to resume.")
    if evaluation is not None and collect:
      self.collect(run, evaluation)
    print(f"[study] {run.name}: {kind} done in {time.time() - started:.0f}s", flush=True)

  def claim_dir(self, run: Run) -> str:
    """Where a runner locks the run it works on: <workroot>/.claims/<run> (not the run's workdir,
    which its trainer locks). Several runners given the same runs share them out: each skips a run
    another live runner holds; a killed runner's claim is free again."""
    return os.path.join(self.workroot, CLAIMS_DIR, run.name)

  def run(self, runs) -> None:
    from hybrid_jax import workdir_lock  # pylint: disable=g-import-not-at-top
    runs = list(runs)
    elsewhere = []
    for i, run in enumerate(runs):
      if self.done(run):
        continue
      try:
        claim = workdir_lock.WorkdirLock(self.claim_dir(run)).acquire()
      except workdir_lock.WorkdirLockedError:
        print(f"[study] {run.name}: another runner has it "
              f"({workdir_lock.live_holder(self.claim_dir(run))}); next", flush=True)
        elsewhere.append(run.name)
        continue
      try:
        if self.done(run):  # finished by another runner between the check and the claim
          continue
        left = self.remaining_seconds(runs[i:])
        done = sum(self.done(r) for r in runs)
        print(f"[study] {done}/{len(runs)} runs done; next {run.name}; ETA for the rest "
              f"{left / 3600:.1f} h", flush=True)
        for kind, evaluation, command in self.jobs(run):
          if kind == "train" and self.training_done(run):
            continue
          if kind in ("evaluate", "copy") and self.evaluation_done(run, evaluation):
            continue
          self.run_job(run, kind, evaluation, command)
        self.finished(run)
      finally:
        claim.release()
    if elsewhere:
      print(f"[study] left to the other runners: {', '.join(elsewhere)}", flush=True)

  def finished(self, run: Run) -> None:
    """Called once all of a run's jobs are done."""


def unseen_languages(evaluated: str, trained: str) -> tuple[str, ...]:
  """Languages of dataset `evaluated` that dataset `trained` has no file for.

  Read from the fetch registry, not the data folder, so planning (--list) works before the data
  is fetched; tests check that the registry and the files agree.
  """
  from hybrid_jax.data import fetch  # pylint: disable=g-import-not-at-top
  from hybrid_jax.eval import grid_evaluator  # pylint: disable=g-import-not-at-top
  return grid_evaluator.unseen_languages(fetch.DATASETS[evaluated].languages,
                                         fetch.DATASETS[trained].languages)


def select(only: str, runs: list[Run] | None = None) -> list[Run]:
  runs = RUNS if runs is None else runs
  if not only:
    return runs
  names = {r.name for r in runs}
  # An exact name selects that run only (A-hybrid is also the prefix of its alpha and seed runs).
  chosen = [r for r in runs if any(r.name == p if p in names else r.name.startswith(p)
                                   for p in only.split(","))]
  if not chosen:
    raise SystemExit(f"--only={only!r} matches no run; runs: {[r.name for r in runs]}")
  return chosen


# --- protocol v2 (issue 22) -----------------------------------------------------------------------
# Leak-free validation (by article), packed training, 5 seeds per strategy and direction, every
# run scored at its best AND last checkpoint on both held-out parts and the other collection's
# full grid, so that in-domain and shifted scores of every strategy share one pool. B's step
# budget comes from one 600-step pilot per strategy and is fixed (B_budget.json) before its seeds.
RESULTS_DIR_V2 = os.path.join(HERE, "results_v2")
SEEDS_V2 = (0, 1, 2, 3, 4)
ALPHA_SEEDS_V2 = (0, 1, 2)
PILOT_STEPS = 600
BUDGET_FILE = "B_budget.json"
CHECKPOINTS = ("best", "last")
HELDOUT_PARTS = tuple(Evaluation(f"{d}-test", d, "test") for d in ("mlqa-r", "xquad-r"))
FULL_GRIDS = tuple(Evaluation(d, d, "all") for d in ("mlqa-r", "xquad-r"))
ROOT_VARIABLE = "$STUDY_ROOT"  # what committed commands say instead of a machine's workroot


def centered(evaluations) -> tuple[Evaluation, ...]:
  """The training-free language-bias baseline of each evaluation: its embeddings re-scored with
  per-language mean centring (evaluate --center_languages; names "...-centered")."""
  return tuple(dataclasses.replace(e, name=f"{e.name}-centered", centered=True)
               for e in evaluations)


def evaluations_v2(direction: str) -> tuple[Evaluation, ...]:
  """A trained run's scores: both held-out parts and the other collection's full grid, at the
  best and at the last checkpoint (names "best/mlqa-r-test", ...), then the best checkpoint's
  centred scores."""
  trained = study_config.TRAINING_DATASETS[direction]
  # The full grid first: the held-out part of its collection is scored from its embeddings.
  chosen = tuple(e for e in FULL_GRIDS if e.dataset != trained) + HELDOUT_PARTS
  plain = tuple(dataclasses.replace(e, name=f"{step}/{e.name}", step=step)
                for step in CHECKPOINTS for e in chosen)
  return plain + centered(e for e in plain if e.step == "best")


@dataclasses.dataclass(frozen=True)
class RunV2(Run):
  protocol: int = 2

  def evaluations(self) -> tuple[Evaluation, ...]:
    if self.zero_shot:  # v1's zero-shot row (numbers unchanged), then its centred scores
      return HELDOUT_PARTS + FULL_GRIDS + centered(HELDOUT_PARTS + FULL_GRIDS)
    if self.family == "pilot":  # only its validation curve (metrics.jsonl) is used
      return ()
    return evaluations_v2(self.direction)


def runs_v2(b_steps: int | None) -> list[RunV2]:
  """Every v2 job in the order they run: B pilots, A's seed 0, zero-shot (the headline's
  baseline and centring rows, early), A's other seeds, B seeds (once b_steps is fixed), the alpha
  runs. Seeds outermost, so a partial study has balanced strategies."""
  strategies = study_config.STRATEGIES
  runs = [RunV2(f"B-pilot-{s}", "B", s, family="pilot", steps=PILOT_STEPS) for s in strategies]
  a_seeds = [RunV2(f"A-{s}-seed{seed}", "A", s, seed=seed) for seed in SEEDS_V2
             for s in strategies]
  runs += a_seeds[:len(strategies)] + [RunV2("zeroshot", "")] + a_seeds[len(strategies):]
  if b_steps:
    runs += [RunV2(f"B-{s}-seed{seed}", "B", s, seed=seed, steps=b_steps)
             for seed in SEEDS_V2 for s in strategies]
  return runs + [RunV2(f"A-hybrid-alpha{a}-seed{seed}", "A", "hybrid", alpha=a, seed=seed,
                       family="alpha") for seed in ALPHA_SEEDS_V2 for a in (0.25, 0.75)]


def decide_budget(curves: dict[str, dict[int, float]]) -> dict:
  """B's step budget from the pilots' validation curves ({strategy: {step: loss}}): the step
  with the lowest validation loss averaged over the strategies (the earliest on a tie), among
  the steps every pilot was validated at. One rule for all strategies, fixed before any seed."""
  steps = sorted(set.intersection(*(set(c) for c in curves.values())) - {0})
  if not steps:
    raise SystemExit(f"[study] the B pilots share no validation step: {curves}")
  mean = {t: sum(c[t] for c in curves.values()) / len(curves) for t in steps}
  best = min(steps, key=lambda t: (mean[t], t))
  return {"steps": best, "rule": decide_budget.__doc__.split("(")[0].strip() + ": " +
          "argmin over steps of the mean validation loss of the three pilots",
          "mean_validation_loss": {str(t): round(mean[t], 6) for t in steps},
          "curves": {k: {str(t): v for t, v in sorted(c.items())} for k, c in curves.items()}}


def validation_curve(metrics_path: str) -> dict[int, float]:
  curve = {}
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "validation/loss" in record:
        curve[int(record["step"])] = float(record["validation/loss"])
  return curve


class StudyV2(Study):
  """Protocol v2's jobs over its own workroot (<workroot>/protocol2) and results_v2/."""

  def __init__(self, workroot: str, results_dir: str = RESULTS_DIR_V2,
               python: str = sys.executable):
    super().__init__(os.path.join(workroot, "protocol2"), results_dir, python)

  # --- the B budget ---
  def budget(self) -> dict | None:
    path = os.path.join(self.results_dir, BUDGET_FILE)
    if not os.path.isfile(path):
      return None
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  def runs(self) -> list[RunV2]:
    budget = self.budget()
    return runs_v2(budget["steps"] if budget else None)

  def fix_budget(self) -> dict:
    """Writes B_budget.json from the finished pilots (never rewritten once it exists)."""
    budget = self.budget()
    if budget:
      return budget
    pilots = [r for r in self.runs() if r.family == "pilot"]
    curves = {r.strategy: validation_curve(os.path.join(self.results_dir, r.name,
                                                        "metrics.jsonl")) for r in pilots}
    budget = decide_budget(curves)
    os.makedirs(self.results_dir, exist_ok=True)
    with open(os.path.join(self.results_dir, BUDGET_FILE), "w", encoding="utf-8") as f:
      json.dump(budget, f, indent=1, sort_keys=True)
    print(f"[study] B's step budget fixed at {budget['steps']} from the pilots' validation "
          f"curves ({BUDGET_FILE})", flush=True)
    return budget

  # --- state ---
  def done(self, run: Run) -> bool:
    if run.family == "pilot":  # its validation curve to the last step is in results_v2/
      path = os.path.join(self.results_dir, run.name, "metrics.jsonl")
      return os.path.isfile(path) and run.steps in validation_curve(path)
    return super().done(run)

  def checkpoint_steps(self, run: Run) -> dict[str, int | None]:
    from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
    steps = checkpointing.available_steps(self.workdir(run))
    return {"best": max(steps["best"], default=None),
            "last": max(steps["checkpoints"], default=None)}

  def evaluate_command(self, run: Run, evaluation: Evaluation) -> list[str]:
    """As v1, except: a trained run's full grid exports its embeddings, and its held-out part of
    the same collection is scored from them (every text of the part is in the grid: no second
    encoding, the same numbers); a plain score with a centred twin also exports its embeddings;
    a centred score re-reads the embeddings its plain twin was scored from (scoring only)."""
    out = os.path.join(self.workroot, run.name, "eval", evaluation.name)
    if not evaluation.centered:
      grid = self.grid_source(run, evaluation)
      if grid is not None:
        return [self.python, "-m", "hybrid_jax.evaluate",
                f"--embeddings={self._exported(run, grid)}", *evaluation.flags(),
                f"--groups={self._groups(run, evaluation, with_unseen=True)}",
                f"--output_dir={out}"]
      command = super().evaluate_command(run, evaluation)
      if (any(e.centered and e.name == f"{evaluation.name}-centered" for e in run.evaluations())
          or (evaluation.part == "all" and not run.zero_shot)):
        command.append(f"--export_embeddings={self._exported(run, evaluation)}")
      return command
    source = self.embeddings_source(run, evaluation)
    return [self.python, "-m", "hybrid_jax.evaluate",
            f"--embeddings={self._exported(run, source)}", "--center_languages",
            *evaluation.flags(),
            f"--groups={self._groups(run, evaluation, with_unseen=evaluation.part == 'all')}",
            f"--output_dir={out}"]

  def reuses_embeddings(self, run: Run, evaluation: Evaluation) -> bool:
    return self.grid_source(run, evaluation) is not None

  def embeddings_source(self, run: Run, centred: Evaluation) -> Evaluation:
    """The plain evaluation whose exported embeddings a centred one re-scores."""
    plain = dataclasses.replace(centred, name=centred.name[:-len("-centered")], centered=False)
    return self.grid_source(run, plain) or plain

  def grid_source(self, run: Run, evaluation: Evaluation) -> Evaluation | None:
    """A trained run's full-grid score of the same collection and checkpoint as this held-out
    part (its exported embeddings hold every text of the part), or None."""
    if run.zero_shot or evaluation.part == "all":
      return None
    grid = next((e for e in run.evaluations() if not e.centered and e.part == "all"
                 and e.dataset == evaluation.dataset and e.step == evaluation.step), None)
    # A grid scored without its embeddings kept (before this rule, or freed): encode instead.
    if grid is not None and self.evaluation_done(run, grid) and not os.path.isdir(
        self._exported(run, grid)):
      return None
    return grid

  @staticmethod
  def _groups(run: Run, evaluation: Evaluation, with_unseen: bool) -> str:
    """--groups as a --workdir source gives them: low-resource, and the languages the run's
    training collection lacks (zero-shot: the other collection's)."""
    groups = f"low_resource={'+'.join(LOW_RESOURCE[evaluation.dataset])}"
    trained = (study_config.TRAINING_DATASETS[run.direction] if run.direction else
               next(d for d in study_config.TRAINING_DATASETS.values() if d != evaluation.dataset))
    unseen = unseen_languages(evaluation.dataset, trained)
    if with_unseen and unseen:
      groups += f";unseen={'+'.join(unseen)}"
    return groups

  def _exported(self, run: Run, evaluation: Evaluation) -> str:
    return os.path.join(self.workroot, run.name, "eval", evaluation.name, "exported")

  def jobs(self, run: Run):
    """As v1, plus: a last-checkpoint score whose checkpoint IS the best one is copied, not
    recomputed (kind "copy"). A generator: the steps are read after the training job ran."""
    for kind, evaluation, command in super().jobs(run):
      if kind == "evaluate" and evaluation.step == "last":
        steps = self.checkpoint_steps(run)
        if steps["best"] is not None and steps["best"] == steps["last"]:
          yield "copy", evaluation, []
          continue
      yield kind, evaluation, command

  def run_job(self, run: Run, kind: str, evaluation, command: list[str],
              collect: bool = True) -> None:
    if kind == "evaluate" and evaluation.centered:
      source = self.embeddings_source(run, evaluation)
      if not os.path.isdir(self._exported(run, source)):
        # Its plain twin was scored in a work root that is gone (another machine, a lost disk):
        # encode again only to export the embeddings; its committed scores stay as they are.
        print(f"[study] {run.name}: {source.name}'s embeddings are not in the work root; "
              "encoding again to export them", flush=True)
        super().run_job(run, "evaluate", source, self.evaluate_command(run, source),
                        collect=False)
    if kind != "copy":
      return super().run_job(run, kind, evaluation, command, collect)
    best = dataclasses.replace(evaluation, name=evaluation.name.replace("last/", "best/", 1),
                               step="best")
    if not self.evaluation_done(run, best):
      self.run_job(run, "evaluate", best, self.evaluate_command(run, best))
    shutil.copytree(self.result_dir(run, best), self.result_dir(run, evaluation),
                    dirs_exist_ok=True)
    print(f"[study] {run.name}: {evaluation.name} = {best.name} (the last checkpoint is the "
          "best one)", flush=True)

  def finished(self, run: Run) -> None:
    """Frees the disk: a finished run's checkpoints (~2 GB for e5-small with Adam state) and
    embeddings go; config, metrics and logs stay in the workdir, results in results_v2/."""
    workdir = self.workdir(run)
    if run.family == "pilot" and self.training_done(run):
      os.makedirs(os.path.join(self.results_dir, run.name), exist_ok=True)
      for name in ("config.json", "metrics.jsonl"):
        shutil.copy2(os.path.join(workdir, name), os.path.join(self.results_dir, run.name, name))
    if run.zero_shot or not self.done(run):
      return
    doomed = [os.path.join(workdir, d) for d in ("checkpoints", "best")]
    for root, dirs, _ in os.walk(os.path.join(workdir, "eval")):
      doomed += [os.path.join(root, d) for d in dirs if d in ("embeddings", "exported")]
    for path in doomed:
      shutil.rmtree(path, ignore_errors=True)

  def collect(self, run: Run, evaluation: Evaluation) -> None:
    super().collect(run, evaluation)
    target = self.result_dir(run, evaluation)
    for name in ("results_meta.json", "results.md"):  # commands and sources name the work root
      path = os.path.join(target, name)                # as a variable, not this machine's path
      if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
          text = f.read()
        text = text.replace(self.workroot, ROOT_VARIABLE).replace(self.python, "python")
        with open(path, "w", encoding="utf-8") as f:
          f.write(text)
    if not run.zero_shot:
      with open(os.path.join(self.results_dir, run.name, "checkpoints.json"), "w",
                encoding="utf-8") as f:
        json.dump(self.checkpoint_steps(run), f, sort_keys=True)

  def remaining_seconds(self, runs) -> float:
    total = super().remaining_seconds(runs)
    if self.budget() is None and any(r.family == "pilot" for r in runs):
      # B's seeds are not listed yet: plan them at A's 300 steps.
      total += super().remaining_seconds([r for r in runs_v2(study_config.NUM_STEPS)
                                          if r.direction == "B" and r.family == "main"])
    return total

  def run(self, runs) -> None:
    runs = list(runs)
    pilots = [r for r in runs if r.family == "pilot"]
    super().run(pilots)
    if pilots and all(self.done(r) for r in pilots):
      self.fix_budget()
      chosen = {r.name for r in runs}
      # The B seeds join the selection once the budget exists (a selection by prefix, e.g.
      # --only=B-, meant them too).
      runs = [r for r in self.runs() if r.name in chosen or (
          r.direction == "B" and r.family == "main" and any(c.startswith("B-") for c in chosen))]
    super().run([r for r in runs if r.family != "pilot"])


def print_jobs(study: Study, runs) -> None:
  for run in runs:
    for kind, evaluation, command in study.jobs(run):
      state = ("done" if (study.training_done(run) if kind == "train"
                          else study.evaluation_done(run, evaluation)) else "to do")
      if kind == "train" and state != "done" and study.trained_steps(run):
        state = f"at step {study.trained_steps(run)}"
      print(f"{run.name:<26} {kind:<8} {evaluation.name if evaluation else '':<18} {state:<12}"
            f" {' '.join(shlex.quote(c) for c in command[1:])}")
  print(f"ETA for what is left: {study.remaining_seconds(runs) / 3600:.1f} h")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workroot", default=DEFAULT_WORKROOT,
                      help="where run workdirs (checkpoints, embeddings, logs) go")
  parser.add_argument("--protocol", type=int, choices=(1, 2), default=2,
                      help="2: the leak-free 5-seed study (results_v2/); 1: the first study")
  parser.add_argument("--only", default="", help="comma-separated run name prefixes")
  parser.add_argument("--report_only", action="store_true", help="only rebuild tables and plots")
  parser.add_argument("--list", action="store_true", help="print every job and its state")
  parser.add_argument("--single_thread", action="store_true",
                      help="jobs use one CPU thread (faster than two for XLA:CPU on a 2-core "
                      "VM); start the same command twice and the two runners share the runs out")
  args = parser.parse_args(argv)
  if args.protocol == 2:
    study = StudyV2(args.workroot)
    runs = select(args.only, study.runs())
  else:
    study = Study(args.workroot)
    runs = select(args.only)
  if args.single_thread:
    study.single_threaded()
  if args.list:
    print_jobs(study, runs)
    if args.protocol == 2 and study.budget() is None:
      print("B's seed runs are listed once the B pilots have fixed the step budget.")
    return
  if not args.report_only:
    study.run(runs)
  if args.protocol == 1:
    import report  # pylint: disable=g-import-not-at-top
    report.build(RESULTS_DIR)
  else:
    import report_v2  # pylint: disable=g-import-not-at-top
    report_v2.build(study.results_dir)


if __name__ == "__main__":
  from hybrid_jax import errors  # pylint: disable=g-import-not-at-top
  errors.exit_on_user_error(main)
