"""Per-host / per-device batch sizes and a per-device memory estimate of the train step.

    python -m hybrid_jax.plan_memory --config=configs/xlmr_hybrid.py --target=8x80gb
    python -m hybrid_jax.train --config=... --workdir=... --dry_run   # the local devices

Nothing is compiled or allocated: parameter shapes come from `jax.eval_shape`, and the activation
memory from tracing (`jax.make_jaxpr`, no XLA) the encoder's forward pass under `jax.vjp` for the
rows one device holds: the arrays autodiff keeps for the backward pass ("residuals") are exactly
the activations that stay alive between the forward and the backward pass. Per device:

  parameters       float32, divided over the `fsdp` (and `tensor`) axes the partition rules use
  optimizer state  AdamW's two moments: 2 x parameters, sharded alike
  gradients        1 x parameters (GradCache: + 1 x parameters, its running sum)
  batch            the device's rows of token ids and masks
  activations      the residuals of the device's rows (GradCache: of one chunk's rows); with
                   remat only each layer's inputs stay, plus one layer recomputed at a time
  backward work    2 x the largest residual array (its gradient and the array itself, live
                   together while a layer is differentiated)
  dropout bits     the uint32 random bits of every dropout mask of the device's OWN rows, all of
                   them (XLA's CPU schedule keeps them alive together): the train step draws them
                   with partitionable threefry (hybrid_jax/train_step.py), which XLA shards with
                   the batch (the RBG key used before had every device generate the GLOBAL
                   batch's bits)
  loss             the gathered [B, D] embeddings and the [B/shards, k B] logits (small)

Checked against XLA's own `compiled.memory_analysis()` of the compiled step on CPU
(tests/test_memory_plan.py; README "Memory plan"): within 15% for the plain and the GradCache
step on 1 and 8 devices (estimate 2-3% above XLA's in the tests; -2.9% / +2.5% at hidden 128,
4 layers, batch 64 on 1 / 8 devices). Not checked: remat, because XLA's CPU scheduler does not
realise its saving (it keeps the recomputed activations alive), and a `tensor` mesh axis, whose
split of the activations over attention heads the estimate ignores (it counts them whole: an
upper bound there).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from hybrid_jax import errors
from hybrid_jax import losses
from hybrid_jax import sharding
from hybrid_jax.models import encoder as encoder_lib

GIB = 2**30
_ADAM_MOMENTS = 2


class MemoryPlanError(errors.UserError):
  """The plan's target or config cannot be planned as given."""


@dataclasses.dataclass(frozen=True)
class Target:
  """The machines a plan is for: devices, hosts (processes), memory per device, platform."""
  name: str
  num_devices: int
  num_hosts: int
  device_memory_bytes: int
  platform: str  # "gpu" | "tpu" | "cpu": decides what dtype "auto" means

  @property
  def compute_dtype(self) -> str:
    return "bfloat16" if self.platform in ("gpu", "tpu") else "float32"


# Named targets. A v4-32 slice is 16 chips (32 TensorCores; JAX sees one device per chip), 4
# hosts of 4 chips, 32 GiB HBM per chip.
TARGETS = {
    "8x80gb": Target("8 x 80 GB GPU (one host)", 8, 1, 80 * 10**9, "gpu"),
    "v4-32": Target("TPU v4-32 slice (16 chips, 4 hosts, 32 GiB HBM each)", 16, 4, 32 * GIB,
                    "tpu"),
    "v4-8": Target("TPU v4-8 (4 chips, 1 host, 32 GiB HBM each)", 4, 1, 32 * GIB, "tpu"),
}


def local_target() -> Target:
  """The devices this process sees (what `train --dry_run` plans for)."""
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  limit = int((stats or {}).get("bytes_limit", 0))
  return Target(f"{jax.device_count()} x {device.device_kind} ({jax.process_count()} process)",
                jax.device_count(), jax.process_count(), limit, device.platform)


def target_from(name: str, *, num_devices: int | None = None, num_hosts: int | None = None,
                device_memory_gb: float | None = None, platform: str | None = None) -> Target:
  """A named target (or "local"), with any of its fields replaced."""
  if name == "local":
    target = local_target()
  elif name in TARGETS:
    target = TARGETS[name]
  else:
    raise MemoryPlanError(f"--target={name!r}: expected one of {sorted(TARGETS) + ['local']}, "
                          "or give --num_devices, --num_hosts, --device_memory_gb, --platform")
  changes = {k: v for k, v in (("num_devices", num_devices), ("num_hosts", num_hosts),
                               ("platform", platform)) if v is not None}
  if device_memory_gb is not None:
    changes["device_memory_bytes"] = int(device_memory_gb * 10**9)
  if changes:
    target = dataclasses.replace(target, name=f"{target.name}, with {changes}", **changes)
  if target.num_devices < 1 or target.num_hosts < 1 or target.num_devices % target.num_hosts:
    raise MemoryPlanError(f"{target.num_devices} devices over {target.num_hosts} hosts: expected "
                          "positive counts, the devices divisible by the hosts")
  return target


# --- activations, by tracing ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Residuals:
  """What the backward pass keeps from one encoder forward pass (bytes)."""
  total: int  # every residual array that is not a parameter or an input
  largest: int  # the largest single residual array


def _array_bytes(aval) -> int:
  if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
    return 0  # a dropout key: a few bytes
  return int(np.prod(aval.shape, dtype=np.int64)) * jnp.dtype(aval.dtype).itemsize


def _traced_residuals(config: encoder_lib.EncoderConfig, rows: int, length: int,
                      dropout: bool) -> Residuals:
  from hybrid_jax import train_step  # pylint: disable=g-import-not-at-top
  model = encoder_lib.Encoder(config)
  abstract_params = jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))

  def forward(params):
    ids = jnp.zeros((rows, length), jnp.int32)  # values do not change which arrays are kept
    rngs = {"dropout": train_step.make_dropout_key(0)} if dropout else {}
    return model.apply({"params": params}, ids, jnp.ones_like(ids), deterministic=not dropout,
                       rngs=rngs).embedding

  jaxpr = jax.make_jaxpr(lambda p: jax.vjp(forward, p)[1])(abstract_params).jaxpr
  inputs = {id(v) for v in jaxpr.invars}
  seen: set[int] = set()
  sizes = []
  for var in jaxpr.outvars:
    # Literals (constants) and parameters passed through are no extra memory; count each once.
    if isinstance(var, jax_core.Literal) or id(var) in inputs or id(var) in seen:
      continue
    seen.add(id(var))
    sizes.append(_array_bytes(var.aval))
  return Residuals(sum(sizes), max(sizes, default=0))


@functools.lru_cache(maxsize=64)
def encoder_residuals(config: encoder_lib.EncoderConfig, rows: int, length: int,
                      dropout: bool = True) -> Residuals:
  """Residual bytes of `Encoder(config)` on [rows, length] inputs (traced, never compiled).

  Every layer keeps the same arrays, so the encoders of 1 and 2 layers are traced and the
  per-layer difference extrapolated: exact, and fast for 24-layer models too."""
  if rows < 1:
    return Residuals(0, 0)
  one = _traced_residuals(config.replace(num_hidden_layers=1), rows, length, dropout)
  if config.num_hidden_layers == 1:
    return one
  two = _traced_residuals(config.replace(num_hidden_layers=2), rows, length, dropout)
  return Residuals(one.total + (config.num_hidden_layers - 1) * (two.total - one.total),
                   two.largest)


def dropout_mask_elements(config: encoder_lib.EncoderConfig, rows: int, length: int) -> int:
  """Elements of all dropout masks of one forward pass on [rows, length] (encoder.py's sites:
  embeddings, and per layer the attention probabilities and the two sublayer outputs)."""
  hidden = rows * length * config.hidden_size if config.hidden_dropout_prob > 0 else 0
  attention = (rows * config.num_attention_heads * length * length
               if config.attention_probs_dropout_prob > 0 else 0)
  return hidden + config.num_hidden_layers * (attention + 2 * hidden)


# --- the plan -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
  """One way to run the step: plain or GradCache (chunk rows), remat or not; bytes per device."""
  chunk_size: int  # 0 = plain loss
  remat: bool
  activations: int
  backward_work: int
  dropout_bits: int
  gradcache_accumulator: int

  @property
  def name(self) -> str:
    loss = f"GradCache chunk {self.chunk_size}" if self.chunk_size else "plain loss"
    return f"{loss}, {'remat' if self.remat else 'no remat'}"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  target: Target
  encoder_config: encoder_lib.EncoderConfig
  batch: sharding.BatchSizes
  mesh_shape: dict
  lengths: tuple[int, ...]  # padded length of each tower (query, passage[, negative])
  num_parameters: int
  parameters: int  # bytes per device, and below
  optimizer_state: int
  gradients: int
  batch_arrays: int
  loss: int
  variants: tuple[Variant, ...]  # the config's own first
  config_variant: Variant

  def static_bytes(self) -> int:
    return (self.parameters + self.optimizer_state + self.gradients + self.batch_arrays
            + self.loss)

  def total(self, variant: Variant | None = None) -> int:
    variant = variant or self.config_variant
    return (self.static_bytes() + variant.activations + variant.backward_work
            + variant.dropout_bits + variant.gradcache_accumulator)

  def report(self) -> str:
    cfg, b = self.encoder_config, self.batch
    memory = self.target.device_memory_bytes
    # One unit for the whole table: GiB for real models, MiB for toy ones.
    unit, name = (GIB, "GiB") if max(map(self.total, self.variants)) >= GIB else (2**20, "MiB")
    lines = [
        f"memory plan: {self.target.name}; mesh {self.mesh_shape}",
        f"  model: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}: {self.num_parameters / 1e6:.1f}M parameters; compute "
        f"{cfg.dtype}",
        f"  batch: {b.global_size} global = {b.per_host} per host x {b.num_hosts} host(s) = "
        f"{b.per_device} per device x {b.num_shards} batch shards; towers of "
        f"{'/'.join(map(str, self.lengths))} tokens",
        f"  per device, {name}: parameters {self.parameters / unit:.3f}, optimizer state "
        f"{self.optimizer_state / unit:.3f}, gradients {self.gradients / unit:.3f}, batch + loss "
        f"{(self.batch_arrays + self.loss) / unit:.3f}",
        f"    {name + ' per device':<36}{'activations':>12}{'backward':>10}{'dropout':>9}"
        f"{'GradCache':>10}{'total':>9}" + (f"  of {memory / GIB:.1f} GiB" if memory else ""),
    ]
    for variant in self.variants:
      total = self.total(variant)
      mark = "*" if variant is self.config_variant else " "
      row = (f"  {mark} {variant.name:<34}{variant.activations / unit:>12.3f}"
             f"{variant.backward_work / unit:>10.3f}{variant.dropout_bits / unit:>9.3f}"
             f"{variant.gradcache_accumulator / unit:>10.3f}{total / unit:>9.3f}")
      if memory:
        row += f"  {100 * total / memory:5.1f}%" + ("  DOES NOT FIT" if total > memory else "")
      lines.append(row)
    lines += ["  * = this config. Estimated from traced shapes, nothing compiled "
              "(hybrid_jax/memory_plan.py); dropout =",
              "  the dropout bits of the device's own rows, GradCache = its "
              "gradient sum."]
    return "\n".join(lines)


def _encoder_config(config, platform_dtype: str) -> encoder_lib.EncoderConfig:
  """The run's architecture: init_from's config.json when it exists here, else the preset."""
  from hybrid_jax import trainer  # pylint: disable=g-import-not-at-top
  init_from = config.model.get("init_from", "")
  pretrained = None
  config_json = os.path.join(init_from, "config.json") if init_from else ""
  if config_json and os.path.isfile(config_json):
    with open(config_json, encoding="utf-8") as f:
      pretrained = encoder_lib.EncoderConfig.from_hf_config(json.load(f))
  encoder_config = trainer.encoder_config_from(config, pretrained)
  dtype = config.model.get("dtype", "auto")
  return encoder_config.replace(dtype=platform_dtype if dtype == "auto" else dtype)


@functools.lru_cache(maxsize=8)
def _parameter_shapes(config: encoder_lib.EncoderConfig):
  """(abstract parameters, their logical PartitionSpecs); cached: plans for several targets of
  one model trace the (large) initialiser once."""
  abstract = jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))
  return abstract, encoder_lib.logical_axes(config)


def _bytes_per_device(abstract_tree, logical_specs, mesh) -> int:
  """Bytes of a float32 tree per device under the partition rules (replicated where they say)."""
  specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  total = 0
  for leaf, spec in zip(jax.tree.leaves(abstract_tree), specs):
    mesh_spec = sharding.logical_to_mesh_spec(spec, leaf.shape, mesh)
    shards = math.prod(mesh.shape[a] for part in mesh_spec if part is not None
                       for a in ((part,) if isinstance(part, str) else part))
    total += _array_bytes(leaf) // shards
  return total


def _gradcache_chunk(config_chunk: int, global_batch: int, shards: int) -> int:
  """The chunk planned for the GradCache rows: the config's, else 8 rows per batch shard."""
  if config_chunk:
    return config_chunk
  chunk = 8 * shards
  return chunk if global_batch % chunk == 0 and chunk < global_batch else shards


def plan(config, target: Target) -> MemoryPlan:
  """The memory plan of `config` (an experiment config) on `target`; compiles nothing."""
  names, sizes = sharding.mesh_shape(config.mesh, target.num_devices)
  mesh_shape = dict(zip(names, sizes))
  mesh = jax.sharding.AbstractMesh(sizes, names)
  batch = sharding.batch_sizes(int(config.train.batch_size), mesh_shape, target.num_hosts)
  encoder_config = _encoder_config(config, target.compute_dtype)
  loss_cfg = losses.LossConfig.from_train_config(config.train,
                                                 hard_negatives=config.data.hard_negatives)
  loss_cfg.validate()
  if loss_cfg.chunk_size and batch.global_size % loss_cfg.chunk_size:
    raise MemoryPlanError(f"train.gradcache_chunk_size={loss_cfg.chunk_size} does not divide "
                          f"train.batch_size={batch.global_size}; choose a divisor")
  lengths = [int(config.data.query_max_length), int(config.data.passage_max_length)]
  if loss_cfg.hard_negatives:
    lengths.append(int(config.data.passage_max_length))

  abstract, logical = _parameter_shapes(encoder_config)
  num_parameters = sum(x.size for x in jax.tree.leaves(abstract))
  parameters = _bytes_per_device(abstract, logical, mesh)
  # Token ids and mask (int32) per tower, plus the per-row ids.
  batch_arrays = batch.per_device * (sum(lengths) * 2 * 4 + 4 * 4)
  towers = len(lengths)
  dim = encoder_config.hidden_size
  # Gathered embeddings (and their gradients) of every tower, logits + softmax + gradient.
  loss_bytes = 4 * (2 * towers * batch.global_size * dim
                    + 3 * batch.per_device * (towers - 1) * batch.global_size)

  def variant(chunk_size: int, remat: bool) -> Variant:
    global_rows = chunk_size or batch.global_size  # rows encoded at once over all devices
    device_rows = max(global_rows // batch.num_shards, 1)
    cfg = encoder_config.replace(remat=remat)
    # Plain: towers of the same length are encoded in one call (losses.batch_loss) and all
    # residuals live until the backward pass. GradCache: one tower's chunk at a time.
    calls: dict[int, int] = {}  # padded length -> rows per encoder call
    if chunk_size:
      calls[max(lengths)] = device_rows  # the longest tower's chunk is the largest
    else:
      for length in lengths:
        calls[length] = calls.get(length, 0) + device_rows
    activations = largest = masks = 0
    for length, rows in calls.items():
      kept = encoder_residuals(cfg, rows, length)
      largest = max(largest, kept.largest)
      if remat:  # + one layer's residuals, recomputed while that layer is differentiated
        full = encoder_residuals(encoder_config.replace(remat=False), rows, length)
        kept = Residuals(kept.total + full.total // cfg.num_hidden_layers, full.largest)
        largest = max(largest, full.largest)
      activations += kept.total
      masks += dropout_mask_elements(cfg, rows, length)
    # uint32 bits of the device's OWN rows, on any number of batch shards (`masks` counts the rows
    # one device encodes): partitionable threefry (train_step) generates each shard's bits on its
    # own device. Measured on CPU (compiled step, hidden 128, 4 layers, batch 64; these bits are
    # 68 MiB on 1 device, 8.5 MiB on each of 8): XLA's temporaries are 68 MiB above the old RBG
    # key's on 1 device, and 51 MiB (6 x 8.5) below them on 8 devices, where the RBG bits were
    # the GLOBAL batch's on every device (the old estimate, 7 x 8.5 MiB, matched XLA there).
    dropout_bits = 4 * masks
    return Variant(chunk_size, remat, activations, 2 * largest, dropout_bits,
                   parameters if chunk_size else 0)

  chunk = _gradcache_chunk(loss_cfg.chunk_size, batch.global_size, batch.num_shards)
  own = variant(loss_cfg.chunk_size, encoder_config.remat)
  others = [variant(c, r) for c in (0, chunk) for r in (False, True)
            if (c, r) != (loss_cfg.chunk_size, encoder_config.remat)]
  return MemoryPlan(
      target=target, encoder_config=encoder_config, batch=batch, mesh_shape=mesh_shape,
      lengths=tuple(lengths), num_parameters=num_parameters, parameters=parameters,
      optimizer_state=_ADAM_MOMENTS * parameters, gradients=parameters,
      batch_arrays=batch_arrays, loss=loss_bytes, variants=(own, *others), config_variant=own)


# --- verification against XLA (compiles: for tests and the README numbers) ------------------------
def compiled_step_bytes(step_fns, batch_specs: dict[str, Any], mesh) -> int:
  """XLA's peak bytes per device of the train step compiled for these batch shapes."""
  from hybrid_jax import train_step  # pylint: disable=g-import-not-at-top

  def with_sharding(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  state = train_step.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
      params=with_sharding(step_fns.abstract_params, step_fns.param_shardings),
      opt_state=with_sharding(step_fns.abstract_opt_state, step_fns.opt_shardings))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
           for k, v in batch_specs.items()}
  return xla_peak_bytes(step_fns.train_step.lower(state, batch).compile())


def xla_peak_bytes(compiled) -> int:
  """Peak bytes per device XLA reserves for a compiled program: arguments + outputs - donated
  (aliased) buffers + temporaries."""
  stats = compiled.memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
