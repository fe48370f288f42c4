"""GradCache on packed rows (data.packing + train.gradcache_chunk_size): chunks of C PACKED rows.

Deterministic (dropout off), the packed GradCache step's loss and gradients equal the plain packed
step's on the same packed batch (<= 1e-5 float32): on 1 device, and sharded over 8 devices with a
chunk that spans all of them, with and without hard negatives, with an all-empty chunk (dummy
segments: padding) and with chunks without any padding (dummy: row 0's first text). With dropout
on, it equals jax.grad of an independent chunk-by-chunk reference that encodes each chunk's own
texts with the key GradCache gives the chunk, fold_in(fold_in(key, 0), chunk); other keys are far
off, so the re-encoding (pass 3) must reproduce pass 1's masks. A chunk size that does not divide
the packed rows is a LossConfigError; the trainer trains with both on and logs the plain packed
loss curve."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import losses
from hybrid_jax import sharding
from hybrid_jax import train_step
from hybrid_jax import trainer
from hybrid_jax.data import packing
from hybrid_jax.models import encoder as encoder_lib
from train_helpers import metric_curves, random_token_batch, runlocal_config, wide_random_params

TOL = 1e-5  # float32
BATCH = 32
LENGTHS = {"query": 8, "passage": 12, "negative": 12}  # negative == passage: false negatives
ROW_LENGTH = 24
VOCAB = 64
SEED, STEP = 7, 3


def _encoder_config(dropout: float = 0.0) -> encoder_lib.EncoderConfig:
  # Two layers, hidden 32; pad_token_id 0 (random_token_batch pads with 0).
  return encoder_lib.EncoderConfig(
      model_type="xlm-roberta", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64, max_position_embeddings=16,
      type_vocab_size=1, pad_token_id=0, layer_norm_eps=1e-5, hidden_dropout_prob=dropout,
      attention_probs_dropout_prob=dropout, pooling="mean")


def _params(config, loss_cfg) -> dict:
  return {"encoder": wide_random_params(config), **loss_cfg.initial_params()}


def _loss(hard_negatives: bool, chunk_size: int = 0) -> losses.LossConfig:
  # Every mask and term on and a learnable temperature, so every kind of gradient leaf compares.
  return losses.LossConfig(hard_negatives=hard_negatives, mask_same_id=True,
                           mask_false_negatives=True, symmetric=True, learnable_temperature=True,
                           chunk_size=chunk_size, packed=True)


@functools.lru_cache(maxsize=None)
def _step(loss_cfg, dropout: float = 0.0):
  encode = train_step.make_encode_fn(_encoder_config(dropout))
  return jax.jit(lambda params, batch, key: losses.value_and_grad(encode, params, batch, key,
                                                                  loss_cfg))


def _towers(hard_negatives: bool) -> tuple[str, ...]:
  return ("query", "passage") + (("negative",) if hard_negatives else ())


def _packed(batch, towers, num_shards: int, rows_per_shard_of) -> tuple[dict, packing.PackingLayout]:
  """The padded batch plus its packing into num_shards shards of rows_per_shard_of(needed) rows."""
  lengths = [batch[f"{t}_attention_mask"].sum(axis=1) for t in towers]
  needed = max(packing.rows_needed(l, ROW_LENGTH)
               for l in packing.shard_lengths(lengths, num_shards))
  layout = packing.PackingLayout(num_shards, rows_per_shard_of(needed), ROW_LENGTH, towers)
  return {**batch, **packing.pack_towers(batch, layout, pad_token_id=0)}, layout


def _only(batch, loss_cfg):
  return {k: batch[k] for k in loss_cfg.required_features()}


def _max_diff(a, b, relative: bool = False) -> float:
  """Max |a - b| over the leaves; relative: divided by max(1, |a|) (aux holds per-type SUMS of
  ~11 losses, ~50, where float32 resolves ~4e-6 and summation order alone moves a few ulps:
  1.1e-5 measured)."""
  return max(float((np.abs(np.asarray(x) - np.asarray(y))
                    / (np.maximum(1, np.abs(x)) if relative else 1)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_same(reference, result, what):
  """(loss, aux), grads of both; returns the loss and gradient differences."""
  (loss, aux), grads = jax.device_get(reference)
  (other_loss, other_aux), other_grads = jax.device_get(result)
  assert jax.tree.structure(grads) == jax.tree.structure(other_grads)
  loss_diff = abs(float(loss) - float(other_loss))
  aux_diff = _max_diff(aux, other_aux, relative=True)
  grad_diff = _max_diff(grads, other_grads)
  print(f"\n{what}: loss {float(loss):.6f} diff {loss_diff:.2e}, aux {aux_diff:.2e}, "
        f"grads {grad_diff:.2e}")
  assert loss_diff <= TOL and aux_diff <= TOL and grad_diff <= TOL, what
  assert np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # Not equality of constants: gradients are large next to the tolerance.
  assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads)) > 1e-2
  assert float(np.abs(np.asarray(grads["log_scale"]))) > 1e-4
  return loss_diff, grad_diff


def _chunk_texts(packed, towers, num_rows: int, chunk_size: int) -> list[np.ndarray]:
  """The texts (in the loss's interleaved order) of each GradCache chunk: row r -> r % (R/C)."""
  index = np.stack([packed[packing.segment_index_key(t)] for t in towers], axis=1).reshape(-1, 2)
  num_chunks = num_rows // chunk_size
  return [np.flatnonzero(index[:, 0] % num_chunks == k) for k in range(num_chunks)]


@pytest.fixture(scope="module")
def batch():
  return random_token_batch(0, BATCH, LENGTHS, VOCAB, min_length=2, num_batch_types=3)


@pytest.mark.parametrize("hard_negatives", [True, False], ids=["hard_negatives", "in_batch_only"])
def test_packed_gradcache_equals_plain_packed_on_one_device(batch, hard_negatives):
  chunk = 4
  towers = _towers(hard_negatives)
  # Rows rounded up to whole chunks, with 2 empty rows or more (padding-only dummies).
  packed, layout = _packed(batch, towers, 1, lambda needed: -(-(needed + 2) // chunk) * chunk)
  assert layout.num_rows % chunk == 0 and layout.num_rows * 2 < len(towers) * BATCH
  plain, cached = _loss(hard_negatives), _loss(hard_negatives, chunk)
  params = _params(_encoder_config(), plain)
  reference = _step(plain)(params, _only(packed, plain), None)
  result = _step(cached)(params, _only(packed, cached), None)
  _assert_same(reference, result, f"1 device, {layout.num_rows} rows, chunks of {chunk}")


@pytest.mark.parametrize("hard_negatives", [True, False], ids=["hard_negatives", "in_batch_only"])
def test_packed_gradcache_sharded_over_8_devices_equals_plain_packed(batch, hard_negatives):
  mesh = sharding.make_mesh([("data", -1)])
  shards = sharding.num_batch_shards(mesh)
  assert shards == 8
  chunk = 8  # one row of every device per chunk
  towers = _towers(hard_negatives)
  # One row per shard more than any shard needs: the last chunk is all padding (dummies only).
  packed, layout = _packed(batch, towers, shards, lambda needed: needed + 1)
  texts = _chunk_texts(packed, towers, layout.num_rows, chunk)
  assert len(texts[-1]) == 0 and all(len(t) for t in texts[:-1])
  plain, cached = _loss(hard_negatives), _loss(hard_negatives, chunk)
  params = _params(_encoder_config(), plain)
  reference = _step(plain)(params, _only(packed, plain), None)  # one device
  features = _only(packed, cached)
  rows = {k: v for k, v in features.items() if k.startswith("packed_")}
  # As the trainer lays them out: batch rows and packed rows split over the batch axes alike.
  inputs = {**sharding.host_to_global({k: v for k, v in features.items() if k not in rows}, mesh,
                                      BATCH),
            **sharding.host_to_global(rows, mesh)}
  assert inputs["packed_input_ids"].sharding.spec == jax.sharding.PartitionSpec(("data",))
  replicated = jax.device_put(params, sharding.replicated(mesh))
  result = _step(cached)(replicated, inputs, None)
  _assert_same(reference, result, f"8 devices, {layout.num_rows} rows, chunks of {chunk}")


def test_packed_gradcache_with_chunks_without_padding(batch):
  """Every row exactly full (passage 14 + query 10 = 24 tokens): no chunk has a padding segment,
  so the dummies are row 0's first text."""
  full = dict(batch)
  for tower, length in (("query", 10), ("passage", 14)):
    rng = np.random.default_rng(length)
    full[f"{tower}_input_ids"] = rng.integers(1, VOCAB, size=(8, length)).astype(np.int32)
    full[f"{tower}_attention_mask"] = np.ones((8, length), np.int32)
  for key in ("question_id", "passage_id", "relevant_passage_ids", "batch_type"):
    full[key] = batch[key][:8]
  packed, layout = _packed(full, ("query", "passage"), 1, lambda needed: needed)
  assert layout.num_rows == 8 and (packed["packed_segment_ids"] > 0).all()
  plain, cached = _loss(False), _loss(False, 4)
  params = _params(_encoder_config(), plain)
  _assert_same(_step(plain)(params, _only(packed, plain), None),
               _step(cached)(params, _only(packed, cached), None), "full rows, chunks of 4")


# --- dropout: pass 3 must draw pass 1's masks ----------------------------------------------------
def _reference_with_keys(encode, params, packed, loss_cfg, num_rows, texts, keys):
  """jax.value_and_grad of the loss on embeddings encoded chunk by chunk in a Python loop: chunk
  k's rows k, k + R/C, ... with keys[k], pooling only its own texts (`texts[k]`)."""
  towers = loss_cfg.tower_names()
  index = np.stack([packed[packing.segment_index_key(t)] for t in towers], axis=1).reshape(-1, 2)
  num_chunks = len(texts)

  def loss_fn(p):
    out = jnp.zeros((len(index), _encoder_config().hidden_size), jnp.float32)
    for k, own in enumerate(texts):
      if not len(own):
        continue
      rows = np.arange(k, num_rows, num_chunks)
      local = np.stack([index[own, 0] // num_chunks, index[own, 1]], axis=1)
      emb = encode(p["encoder"], packed["packed_input_ids"][rows], None, keys[k],
                   segment_ids=packed["packed_segment_ids"][rows],
                   segment_positions=packed["packed_segment_positions"][rows],
                   segment_index=local)
      out = out.at[own].set(emb)
    per_tower = out.reshape(BATCH, len(towers), -1)
    return losses.loss_on_embeddings({t: per_tower[:, i] for i, t in enumerate(towers)}, p,
                                     packed, loss_cfg)
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def test_packed_gradcache_with_dropout_reencodes_with_the_same_masks(batch):
  dropout, chunk = 0.1, 4
  towers = _towers(True)
  packed, layout = _packed(batch, towers, 1, lambda needed: -(-needed // chunk) * chunk)
  cached = _loss(True, chunk)
  params = _params(_encoder_config(dropout), cached)
  # The trainer's step key: threefry, folded with the step.
  step_key = jax.random.fold_in(jax.random.key(SEED, impl="threefry2x32"), STEP)
  features = _only(packed, cached)
  result = _step(cached, dropout)(params, features, step_key)
  texts = _chunk_texts(packed, towers, layout.num_rows, chunk)
  encode = train_step.make_encode_fn(_encoder_config(dropout))
  reference = jax.jit(lambda p, keys: _reference_with_keys(
      encode, p, features, cached, layout.num_rows, texts, keys))
  chunk_keys = lambda key: [jax.random.fold_in(key, k) for k in range(len(texts))]
  tower_key = jax.random.fold_in(step_key, 0)  # all towers share the rows: tower 0's key
  _assert_same(reference(params, chunk_keys(tower_key)), result, "dropout 0.1, same chunk keys")
  # Other keys (the chunk index not folded in, or tower 1's) are far off: dropout is on.
  for what, keys in (("chunk not folded", [tower_key] * len(texts)),
                     ("other tower key", chunk_keys(jax.random.fold_in(step_key, 1)))):
    other = jax.device_get(reference(params, keys))
    diff = _max_diff(other[1], jax.device_get(result)[1])
    print(f"{what}: max grad diff {diff:.2e}")
    assert diff > 100 * TOL, what


# --- configuration --------------------------------------------------------------------------------
def test_chunk_size_that_does_not_divide_the_packed_rows_is_a_loss_config_error(batch, tmp_path):
  cached = _loss(True, 8)
  cached.validate()  # GradCache with packing is a valid configuration
  packed, layout = _packed(batch, _towers(True), 1, lambda needed: 28)
  assert layout.num_rows == 28
  params = _params(_encoder_config(), cached)
  encode = train_step.make_encode_fn(_encoder_config())
  with pytest.raises(losses.LossConfigError,
                     match=r"gradcache_chunk_size=8 does not divide the 28 packed rows .* "
                           r"data.packing_rows to a multiple of 8 \(e.g. 32\)"):
    jax.eval_shape(lambda p, b: losses.value_and_grad(encode, p, b, None, cached), params,
                   _only(packed, cached))
  with pytest.raises(losses.LossConfigError, match="divide the 12 packed rows"):
    cached.check_packed_chunks(12)
  cached.check_packed_chunks(16)
  # The trainer accepts the combination (it used to reject it).
  config = runlocal_config("hybrid", **{"data.packing": True, "train.gradcache_chunk_size": 8})
  trainer.validate_config(config, str(tmp_path / "run"))


# --- a short run ---------------------------------------------------------------------------------
STEPS = 4
RUN = {"train.num_steps": STEPS, "train.warmup_steps": 1, "train.log_every_steps": 1,
       "train.eval_every_steps": STEPS, "train.checkpoint_every_steps": STEPS,
       "model.hidden_dropout_prob": 0.0, "model.attention_probs_dropout_prob": 0.0,
       "data.hard_negatives": True, "data.validation_batches": 1,
       "data.packing": True, "data.packing_row_length": 32}


def test_runlocal_packed_gradcache_logs_the_plain_packed_loss_curve(tmp_path, capfd):
  # 8 devices: the chosen rows are a multiple of the 8 batch shards, so chunks of 8 divide them.
  curves = metric_curves(
      {name: runlocal_config("hybrid", **{**RUN, "train.gradcache_chunk_size": chunk})
       for name, chunk in (("plain", 0), ("gradcache", 8))},
      ("loss", "validation/loss", "grad_norm"), tmp_path)
  assert "GradCache chunks of 8" in capfd.readouterr().err
  assert curves["plain"].keys() == curves["gradcache"].keys()
  assert {key for _, key in curves["plain"]} == {"loss", "validation/loss", "grad_norm"}
  diff = max(abs(curves["plain"][k] - curves["gradcache"][k]) for k in curves["plain"])
  print(f"\nrunlocal {STEPS} steps, packed: max |plain - GradCache| over "
        f"{len(curves['plain'])} logged values {diff:.2e}")
  assert diff <= TOL
  logged = [v for (_, key), v in sorted(curves["plain"].items()) if key == "loss"]
  assert len(set(logged)) > 1  # the parameters moved
