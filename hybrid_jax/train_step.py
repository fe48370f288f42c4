"""The update step of training: encoder forward, contrastive loss, AdamW, all jit'd and sharded.

`step_functions(encoder_config, loss_config, optimizer, seed, mesh)` builds, once per
(model, loss, optimizer, seed, mesh), everything the trainer and the benchmarks run:

- parameters created through `jax.eval_shape` -> shardings from the logical axis names ->
  `jax.jit(init, out_shardings=...)`, so they are born sharded (FSDP never materialises a full
  copy);
- optimizer-state shardings that mirror the parameter each leaf belongs to;
- the train step, `jax.jit(..., donate_argnums=0)`, whose dropout key is `fold_in(key(seed), step)`
  (partitionable threefry, `make_dropout_key`: each device generates the bits of its own batch
  rows only, and the masks of the same global arrays are the same on any mesh): with batch t a
  pure function of (data.seed, t), a resumed run is the same run;
- the validation step (no dropout).

The loss sees the GLOBAL batch (hybrid_jax/losses.py), plain or GradCache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import optax

from hybrid_jax import losses
from hybrid_jax import sharding
from hybrid_jax.models import encoder as encoder_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps done
  params: Any  # {"encoder": ...[, "log_scale": scalar]}
  opt_state: Any


def make_encode_fn(encoder_config: encoder_lib.EncoderConfig) -> losses.EncodeFn:
  """(params, input_ids, attention_mask, dropout key or None) -> L2-normalised [N, D] float32.

  Packed rows (losses.LossConfig.packed): attention_mask None and segment_ids=,
  segment_positions=, segment_index= [N, 2] as keywords; the embeddings are per text, [N, D].
  """
  model = encoder_lib.Encoder(encoder_config)

  def encode(params, input_ids, attention_mask, rng, **packed):
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply({"params": params}, input_ids, attention_mask, deterministic=rng is None,
                       rngs=rngs, **packed).embedding
  return encode


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """The config.train fields the optimizer and schedule depend on (hashable: a cache key)."""
  learning_rate: float
  warmup_steps: int
  num_steps: int
  weight_decay: float
  adam_b1: float
  adam_b2: float
  adam_eps: float
  grad_clip_norm: float

  @classmethod
  def from_train_config(cls, train) -> "OptimizerSettings":
    return cls(**{field.name: train[field.name] for field in dataclasses.fields(cls)})


def weight_decay_mask(path, _) -> bool:
  """Weight decay on matrices and embedding tables only: not on biases, LayerNorm, log_scale.

  For `optax.adamw(mask=...)` through `jax.tree_util.tree_map_with_path`."""
  return getattr(path[-1], "key", None) in ("kernel", "embedding")


def make_optimizer(train: OptimizerSettings) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and linear decay to 0, after global-norm clipping."""
  warmup = int(train.warmup_steps)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, train.learning_rate, max(warmup, 1)),
       optax.linear_schedule(train.learning_rate, 0.0, max(train.num_steps - warmup, 1))],
      [warmup])
  adamw = optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                      weight_decay=train.weight_decay,
                      mask=lambda params: jax.tree_util.tree_map_with_path(weight_decay_mask,
                                                                           params))
  parts = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm > 0 else []
  return optax.chain(*parts, adamw), schedule


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, replicated):
  """Optimizer-state leaves get the sharding of the parameter they mirror (by key path, shape)."""
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


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled (per-device SPMD) program, from XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


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


# The dropout generator: threefry, traced with `jax_threefry_partitionable` on (JAX's default;
# the train step pins it, whatever the global flag). Its bits are a hash of (key, element index),
# so XLA's SPMD partitioner generates each batch shard's bits on the device that holds the shard,
# and for the same global arrays they are the same on any mesh (tests/test_dropout_sharding.py).
# The RBG key used before is replicated under SPMD: every device generated the bits of the GLOBAL
# batch (2.8-3.0 GiB per device for XLM-R base at batch 128 on 8 GPUs, hybrid_jax/memory_plan.py;
# 0.40 GiB now). Measured on CPU, RBG -> threefry, train step of hidden 128 / 4 layers / batch 64 /
# lengths 64: per device the largest bits array u32[128,4,64,64] -> u32[16,4,64,64] and XLA's
# temporaries 122 -> 71 MiB on 8 devices; on 1 device 519 -> 587 MiB (threefry's u32 bits of all
# masks, 68 MiB, stay alive: memory_plan counts them). Step 3.4 -> 0.92 s on 8 devices (RBG had
# every device hash the whole batch's bits), 1.31 -> 1.17 s on 1; compile 7.0 -> 8.5 s and
# 5.5 -> 7.6 s (medians of 3 runs on 2 shared, busy cores). Not measured on TPU or GPU.
DROPOUT_PRNG_IMPL = "threefry2x32"


def make_dropout_key(seed: int) -> jax.Array:
  """The dropout key of a run (seed = config.seed); the train step folds the step in, so the
  masks of step t are a pure function of (seed, t), as exact resume needs."""
  return jax.random.key(seed, impl=DROPOUT_PRNG_IMPL)


@functools.lru_cache(maxsize=4)
def step_functions(encoder_config: encoder_lib.EncoderConfig, loss_cfg: losses.LossConfig,
                   optimizer: OptimizerSettings, seed: int, mesh) -> StepFunctions:
  """Cached, so that runs in one process with the same shapes (an alpha sweep, mono vs X-Y, a
  resume) reuse the compiled step: jax caches compilations per jitted function object."""
  tx, schedule = make_optimizer(optimizer)
  replicated = sharding.replicated(mesh)
  encode_fn = make_encode_fn(encoder_config)
  base_key = jax.random.key(seed)
  dropout_key = make_dropout_key(seed)

  def init_params(key):
    return {"encoder": encoder_lib.init_params(encoder_config, key), **loss_cfg.initial_params()}

  # Shapes first, then shardings from the logical axis names; nothing is allocated yet.
  abstract_params = jax.eval_shape(init_params, base_key)
  param_shardings = {
      "encoder": sharding.param_shardings(mesh, encoder_lib.logical_axes(encoder_config),
                                          abstract_params["encoder"]),
      **{k: replicated for k in abstract_params if k != "encoder"}}
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = opt_state_shardings(abstract_opt_state, abstract_params, param_shardings,
                                       replicated)
  state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(dropout_key, state.step)
    with jax.threefry_partitionable(True):  # the masks are drawn in here (see DROPOUT_PRNG_IMPL)
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
