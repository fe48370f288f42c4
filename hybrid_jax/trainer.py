"""The training loop: `train_and_evaluate(config, workdir)` trains a dual encoder on hybrid batches.

The loop (`train_and_evaluate`, at the end) reads top to bottom in banner sections; its pieces are
named functions above it:

- `validate_config`: every user-caused problem (batch size vs devices, unknown batch type, missing
  init_from, local workdir with several processes, ...) raises a `UserError` before anything
  compiles.
- `prepare_model`: where the weights come from (checkpointing.resolve_init: resume, init_from or
  random), the tokenizer, the input data and the encoder architecture, and the length check.
- `create_or_restore_state`: parameters born sharded (train_step.step_functions) or restored from
  the workdir's checkpoint, with their optimizer state.
- `ValidationLoss`: the loss on the held-out ids every train.eval_every_steps; the best parameters
  by it are kept (the paper's early stopping).
- `train_metrics.ThroughputReporter`: every train.log_every_steps, the interval's means (loss
  overall and per batch type, accuracy, learning rate, norms), examples/s, TFLOP/s per device and
  MFU, to TensorBoard (clu) and <workdir>/metrics.jsonl, and a console line with ETA on stderr.
- `eval.periodic.PeriodicEvaluation`: config.evals at their every_steps (and at step 0 when > 0)
  and always at the end.

A NaN/inf loss stops training with the step range where it appeared; SIGTERM saves the current step
and returns (checkpointing.PreemptionGuard). The final tables are printed by hybrid_jax.train.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import checkpointing
from hybrid_jax import errors
from hybrid_jax import losses
from hybrid_jax import native_log
from hybrid_jax import sharding
from hybrid_jax import train_metrics
from hybrid_jax import train_step as train_step_lib
from hybrid_jax import workdir_lock
from hybrid_jax.eval import evaluators as evaluators_lib
from hybrid_jax.eval import periodic
from hybrid_jax.models import encoder as encoder_lib
from hybrid_jax.data import tf_runtime

class TrainConfigError(errors.UserError):
  """The experiment config cannot be trained as given; the message says what to change."""


TrainingDivergedError = errors.TrainingDivergedError


# --- config checks -------------------------------------------------------------------------------
def loss_config(config) -> losses.LossConfig:
  return losses.LossConfig.from_train_config(config.train,
                                             hard_negatives=config.data.hard_negatives,
                                             packed=bool(config.data.get("packing", False)))


def validate_config(config, workdir: str, *, num_devices: int | None = None,
                    process_count: int | None = None) -> None:
  """Every check that needs no data and no compile; raises ValueError subclasses."""
  from hybrid_jax.data import packing  # pylint: disable=g-import-not-at-top
  from hybrid_jax.data import sampler as sampler_lib  # pylint: disable=g-import-not-at-top

  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  train = config.train
  checkpointing.validate_workdir(workdir, process_count, bool(train.get("shared_filesystem")))
  if config.data.batch_type not in sampler_lib.BATCH_TYPES:
    raise TrainConfigError(f"config.data.batch_type={config.data.batch_type!r} is not a batch "
                           f"type; expected one of {sampler_lib.BATCH_TYPES} (hybrid = the paper's "
                           "method).")
  checkpointing.check_policy(train.checkpoint_every_steps, train.keep_checkpoints)
  for field in ("num_steps", "batch_size", "log_every_steps"):
    if int(train[field]) <= 0:
      raise TrainConfigError(f"config.train.{field} must be positive, found {train[field]}")
  if not 0 <= train.warmup_steps <= train.num_steps:
    raise TrainConfigError(f"config.train.warmup_steps={train.warmup_steps} must be in "
                           f"[0, num_steps={train.num_steps}]")
  if not train.learning_rate > 0:
    raise TrainConfigError(f"config.train.learning_rate must be > 0, found {train.learning_rate}")
  if train.eval_every_steps < 0:
    raise TrainConfigError(f"config.train.eval_every_steps must be >= 0 (0 = only at the end), "
                           f"found {train.eval_every_steps}")
  dtype = config.model.get("dtype", "auto")
  if dtype != "auto" and dtype not in encoder_lib.DTYPES:
    raise TrainConfigError(f"config.model.dtype={dtype!r}; expected 'auto' or one of "
                           f"{list(encoder_lib.DTYPES)}")
  # The mesh must use every device, the batch must split over it and the hosts.
  names, sizes = sharding.mesh_shape(config.mesh, num_devices)
  shards = sharding.batch_sizes(train.batch_size, dict(zip(names, sizes)), process_count).num_shards
  loss_cfg = loss_config(config)
  loss_cfg.validate()
  packing.check_config(config.data)
  # With packing, chunks are packed rows: the layout rounds chosen rows to the chunk size.
  rows = int(config.data.get("packing_rows", 0))
  if loss_cfg.chunk_size and loss_cfg.packed and rows % loss_cfg.chunk_size:
    raise TrainConfigError(
        f"config.train.gradcache_chunk_size={loss_cfg.chunk_size} does not divide "
        f"data.packing_rows={rows} (with data.packing, GradCache chunks packed rows); use a "
        f"multiple of {loss_cfg.chunk_size}, or data.packing_rows=0 to have it chosen.")
  if (loss_cfg.chunk_size and not loss_cfg.packed
      and train.batch_size % loss_cfg.chunk_size):
    raise TrainConfigError(
        f"config.train.gradcache_chunk_size={loss_cfg.chunk_size} does not divide "
        f"train.batch_size={train.batch_size}; choose a divisor (ideally a multiple of the "
        f"{shards} "
        "batch shards) or 0 for the plain loss.")
  checkpointing.check_init_from(config.model.get("init_from", ""),
                                config.model.get("backbone", ""))
  for name, spec in dict(config.get("evals") or {}).items():
    if spec.get("type") not in evaluators_lib.EVALUATOR_TYPES:
      raise TrainConfigError(f"config.evals.{name}.type={spec.get('type')!r}; expected one of "
                             f"{evaluators_lib.EVALUATOR_TYPES}")
    if int(spec.get("every_steps", 0)) < -1:
      raise TrainConfigError(f"config.evals.{name}.every_steps must be >= 0 (0 = at the end) or "
                             "-1 (switched off)")


# --- model pieces ---------------------------------------------------------------------------------
def encoder_config_from(config, pretrained_config: encoder_lib.EncoderConfig | None = None
                        ) -> encoder_lib.EncoderConfig:
  """The architecture from the preset, or from the checkpoint (then only pooling/dtype/dropout)."""
  model = config.model
  dtype = encoder_lib.resolve_dtype(model.get("dtype", "auto"))
  if pretrained_config is not None:
    return pretrained_config.replace(
        pooling=model.pooling, dtype=dtype, hidden_dropout_prob=model.hidden_dropout_prob,
        attention_probs_dropout_prob=model.attention_probs_dropout_prob,
        remat=bool(model.get("remat", False)))
  values = dict(model)
  values["dtype"] = dtype
  return encoder_lib.EncoderConfig.from_model_config(values)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=4)
def _replicate_fn(mesh):
  return jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))


def _host_params(params, mesh) -> Any:
  """A full float32 NumPy copy of (possibly sharded, possibly multi-host) parameters."""
  full = _replicate_fn(mesh)(params)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0), np.float32), full)


# --- model, data and state ------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """What the loop needs before it builds the step: the weights source and the data it feeds."""
  init: checkpointing.InitSource
  pretrained: Any  # hf_checkpoint.LoadedModel or None
  data: Any  # data.pipeline.TrainingData (its .tokenizer is the run's)
  encoder_config: encoder_lib.EncoderConfig


def prepare_model(config, workdir: str) -> Prepared:
  """The weights source (resume > init_from > random), tokenizer, input data and architecture;
  checks that the lengths fit the encoder and writes the run files (config, encoder, tokenizer)."""
  from hybrid_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF lazily)
  init = checkpointing.resolve_init(workdir, config.model.get("init_from", ""),
                                    config.model.get("backbone", ""),
                                    config.train.get("restore_step", -1))
  pretrained = None
  if init.kind == "init_from":
    from hybrid_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
    pretrained = hf_checkpoint.load_pretrained(init.path)
  tokenizer = None
  if pretrained is not None and not config.model.get("tokenizer") and (
      config.data.source != "synthetic"):
    tokenizer = pretrained.tokenizer
  elif init.kind == "resume":
    tokenizer = checkpointing.read_tokenizer(workdir)
  data = pipeline.TrainingData.from_config(config, tokenizer=tokenizer)
  if init.kind == "resume":
    encoder_config = encoder_config_from(config, checkpointing.read_encoder_config(workdir))
  else:
    encoder_config = encoder_config_from(config, pretrained.config if pretrained else None)
  data.tokenizer.check_fits_embeddings(encoder_config.vocab_size,
                                       f"the {encoder_config.model_type} encoder")
  longest = max(config.data.query_max_length, config.data.passage_max_length)
  if longest > encoder_config.max_sequence_length:
    raise TrainConfigError(
        f"data.query_max_length/passage_max_length ({longest}) exceed the encoder's "
        f"{encoder_config.max_sequence_length} positions; lower them.")
  checkpointing.write_run_files(workdir, config, encoder_config, data.tokenizer,
                                training_languages=data.languages)
  return Prepared(init, pretrained, data, encoder_config)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def create_or_restore_state(prepared: Prepared, fns: train_step_lib.StepFunctions,
                            checkpointer: checkpointing.Checkpointer, loss_cfg: losses.LossConfig,
                            mesh) -> train_step_lib.TrainState:
  """The train state at the start of this process: restored from the workdir's checkpoint, or
  new (pretrained weights placed with the parameter shardings, or born-sharded random init)."""
  replicated = sharding.replicated(mesh)
  init = prepared.init
  if init.kind == "resume":
    # Verified; an unreadable newest checkpoint is moved aside and an older one used.
    step, params, opt_state = checkpointer.restore_verified(
        init, _with_shardings(fns.abstract_params, fns.param_shardings),
        _with_shardings(fns.abstract_opt_state, fns.opt_shardings))
    prepared.init = dataclasses.replace(init, step=step)
  else:
    if prepared.pretrained is not None:
      params = jax.device_put({"encoder": prepared.pretrained.params, **loss_cfg.initial_params()},
                              fns.param_shardings)
    else:
      params = fns.init_params()
    opt_state = fns.init_opt_state(params)
    step = 0
  return train_step_lib.TrainState(step=jax.device_put(jnp.int32(step), replicated),
                                   params=params, opt_state=opt_state)


class ValidationLoss:
  """The loss on the held-out ids (no dropout), logged; raises on a NaN/inf loss."""

  def __init__(self, eval_step, global_batches: list, writer):
    self.eval_step = eval_step
    self.batches = global_batches
    self.writer = writer

  def __call__(self, params, step: int) -> dict[str, float] | None:
    if not self.batches:
      return None
    history = jax.device_get([self.eval_step(params, b) for b in self.batches])
    out = {"validation/loss": float(np.mean([h["loss"] for h in history])),
           "validation/accuracy": float(np.mean([h["accuracy"] for h in history]))}
    out.update(train_metrics.per_type_losses(history, "validation/loss/"))
    if not math.isfinite(out["validation/loss"]):
      raise TrainingDivergedError(f"validation loss is {out['validation/loss']} at step {step}")
    self.writer.write_scalars(step, out)
    return out


def _diverged(first_step: int, step: int, last_saved) -> TrainingDivergedError:
  return TrainingDivergedError(
      f"the training loss became NaN or inf between steps {first_step} and {step} (last "
      f"checkpoint: step {last_saved}). Lower train.learning_rate, raise train.warmup_steps, or "
      "check the inputs of those steps with "
      f"`python -m hybrid_jax.data.plan --start={first_step - 1} --steps={step - first_step + 1}`.")


def _metric_writer(config, workdir: str, start_step: int):
  # clu's TensorBoard writer starts TensorFlow's runtime: the input pipeline's TF limits (no
  # accelerators, data.tf_threads inter-op threads) must be set before, or they never apply.
  tf_runtime.import_tensorflow(config.data.tf_threads)
  with native_log.quiet_native_banners():
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  writer = metric_writers.MultiWriter(
      [metric_writers.SummaryWriter(workdir),
       train_metrics.JsonlWriter(workdir, resume_step=start_step)]
      if jax.process_index() == 0 else [])
  writer.write_hparams(train_metrics.hparams_of(config))
  return writer


# --- pieces of the loop ---------------------------------------------------------------------------
def _setup_line(mesh, sizes: sharding.BatchSizes, encoder_config, loss_cfg) -> str:
  return (f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices "
          f"({jax.process_count()} processes); batch {sizes.global_size} global, "
          f"{sizes.per_host} per host, {sizes.per_device} per device; compute "
          f"{encoder_config.dtype}; " + (f"GradCache chunks of {loss_cfg.chunk_size}"
                                         if loss_cfg.chunk_size else "plain loss"))


def compile_train_step(train_step, state, batch, train, start_step: int):
  """The compiled step for these shapes, and the throughput reporter fed with XLA's FLOPs per
  call (per device)."""
  started = time.time()
  compiled = train_step.lower(state, batch).compile()
  flops = train_step_lib.compiled_flops(compiled)
  _log(f"compiled the train step in {time.time() - started:.1f}s"
       + (f"; {flops / 1e9:.2f} GFLOP per step per device (XLA cost analysis)" if flops else ""))
  return compiled, train_metrics.ThroughputReporter(start_step, train.num_steps,
                                                    train.batch_size, flops)


def _log_interval(history: list[dict], step: int, throughput, writer, checkpointer) -> dict:
  """Means over the interval, throughput, to the writers and the console; raises on NaN/inf."""
  summary = train_metrics.reduce_metrics(history)
  if not summary.pop("finite"):
    writer.flush()
    raise _diverged(step - len(history) + 1, step, checkpointer.latest_step())
  line = throughput.report(step, summary)
  writer.write_scalars(step, summary)
  _log(line)
  return summary


def _validate_and_keep_best(validation: ValidationLoss, checkpointer, state, step: int) -> dict:
  result = validation(state.params, step)
  if not result:
    return {}
  if step == 0:
    result["validation/loss_at_start"] = result["validation/loss"]
    improved = False  # the starting point is not kept as a best checkpoint
  else:
    improved = checkpointer.save_best(step, state.params, result["validation/loss"])
  _log(f"validation loss at step {step}: {result['validation/loss']:.4f}"
       + (" (best so far: saved)" if improved else ""))
  return result


def _global_batch_fn(loss_cfg: losses.LossConfig, mesh, global_batch_size: int):
  """host batch -> the global batch of the features the loss reads, laid out on the mesh."""
  features = loss_cfg.required_features()
  # Packed rows (data.packing) are not batch rows: R / P per host, assembled to R.
  rows = [k for k in features if k.startswith("packed_")]

  def to_global(host_batch):
    loss_cfg.check_batch(host_batch)  # a clear error, not a KeyError, if a feature is missing
    out = sharding.host_to_global({k: host_batch[k] for k in features if k not in rows}, mesh,
                                  global_batch_size)
    if rows:
      out.update(sharding.host_to_global({k: host_batch[k] for k in rows}, mesh))
    return out
  return to_global


def _close(checkpointer, writer) -> None:
  checkpointer.wait()  # the last asynchronous save must finish before the process may exit
  checkpointer.close()
  writer.flush()
  writer.close()


# --- the run --------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns final metrics and evaluation results."""
  validate_config(config, workdir)
  # One writer per workdir, from before the first file is written (workdir_lock.py).
  with workdir_lock.hold(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  started = time.time()
  train = config.train
  loss_cfg = loss_config(config)

  # --- mesh, weights, data ------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  prepared = prepare_model(config, workdir)
  data, encoder_config = prepared.data, prepared.encoder_config
  _log(data.summary(train.batch_size))
  _log(_setup_line(mesh, sharding.batch_sizes(train.batch_size, mesh), encoder_config, loss_cfg))
  packing_layout = data.packing_layout(train.batch_size, sharding.num_batch_shards(mesh),
                                       train.num_steps, jax.process_count(),
                                       chunk_size=loss_cfg.chunk_size)  # None: padded
  if packing_layout is not None:
    _log(packing_layout.summary())
  to_global = _global_batch_fn(loss_cfg, mesh, train.batch_size)

  # --- step functions, state, writers, validation, evaluators -------------------------------------
  fns = train_step_lib.step_functions(
      encoder_config, loss_cfg, train_step_lib.OptimizerSettings.from_train_config(train),
      int(config.seed), mesh)
  checkpointer = checkpointing.Checkpointer(workdir, train.checkpoint_every_steps,
                                            train.keep_checkpoints)
  state = create_or_restore_state(prepared, fns, checkpointer, loss_cfg, mesh)
  step = start_step = prepared.init.step if prepared.init.kind == "resume" else 0
  _log(f"{prepared.init.describe()}; training steps {start_step} -> {train.num_steps}")
  # A fresh start (-1) drops every line an earlier, killed attempt logged before its first save.
  writer = _metric_writer(config, workdir,
                          start_step if prepared.init.kind == "resume" else -1)
  evaluation = periodic.PeriodicEvaluation(config, workdir, encoder_config, data.tokenizer,
                                           log=_log, training_languages=data.languages)
  validation = ValidationLoss(fns.eval_step, [to_global(b) for b in data.validation_batches(
      train.batch_size, jax.process_index(), jax.process_count(), packing_layout)], writer)
  # A resumed (or finished) run reports what its earlier part logged until it validates anew.
  last = {"validation/loss": None,
          **(train_metrics.logged_validation(workdir) if start_step else {})}

  def host_params():  # the current encoder parameters, as float32 NumPy, for the evaluators
    return _host_params(state.params["encoder"], mesh)

  # --- compile ------------------------------------------------------------------------------------
  if step < train.num_steps:
    batches = (to_global(b) for b in data.train_batches(
        train.batch_size, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), packing_layout=packing_layout))
    batch = next(batches)
    compiled_step, throughput = compile_train_step(fns.train_step, state, batch, train, start_step)

  # --- loop (SIGTERM: after the current step, save and return) -----------------------------------
  preempted = False
  with checkpointing.PreemptionGuard(checkpointer) as guard:
    if step == 0:
      busy_started = time.time()
      last.update(_validate_and_keep_best(validation, checkpointer, state, 0))
      if due := evaluation.due(0, train.num_steps, start_step):
        evaluation.run(due, 0, host_params(), writer)
      throughput.exclude(time.time() - busy_started)  # not part of the first interval's steps/s
    history = []
    while step < train.num_steps:
      state, metrics = compiled_step(state, batch)
      history.append(metrics)
      step += 1
      if step < train.num_steps:
        batch = next(batches)  # prepared while the device runs the step
      if step % train.log_every_steps == 0 or step == train.num_steps:
        last.update(_log_interval(history, step, throughput, writer, checkpointer))
        history = []

      busy_started = time.time()
      if (train.eval_every_steps and step % train.eval_every_steps == 0) or (
          step == train.num_steps):
        last.update(_validate_and_keep_best(validation, checkpointer, state, step))
      checkpointer.save(step, state.params, state.opt_state, force=(step == train.num_steps))
      if due := evaluation.due(step, train.num_steps, start_step):
        evaluation.run(due, step, host_params(), writer)
      throughput.exclude(time.time() - busy_started)

      if step < train.num_steps and guard.should_stop(step):
        checkpointer.save(step, state.params, state.opt_state, force=True)
        preempted = True
        _log(f"stopping at step {step} on SIGTERM; checkpoint saved, resume with the same command")
        break

  # --- end ----------------------------------------------------------------------------------------
  if start_step >= train.num_steps and evaluation.evaluators:
    _log(f"{workdir} is already trained to step {start_step}; running the evaluators on it")
    evaluation.run(list(evaluation.evaluators), start_step, host_params(), writer)
  _close(checkpointer, writer)
  wall = time.time() - started
  if not preempted:
    _log(f"done at step {step} (wall time {train_metrics.format_seconds(wall)}); checkpoints in "
         f"{os.path.join(workdir, checkpointing.CHECKPOINT_DIR)}")
  return {"step": step, "preempted": preempted, "metrics": last, "evals": evaluation.results,
          "wall_seconds": wall}
