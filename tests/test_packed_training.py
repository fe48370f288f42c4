"""data.packing=True trains like the padded default: the packed step's loss and gradients equal the
padded step's (1 and 8 devices, hard negatives, false-negative masking), and a short runlocal run
logs the same loss curve. Dropout is off: the two paths draw different dropout masks."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import numpy as np
import pytest

from hybrid_jax import losses
from hybrid_jax import sharding
from hybrid_jax import train_step
from hybrid_jax import trainer
from hybrid_jax.data import defaults
from hybrid_jax.data import packing
from hybrid_jax.data import pipeline
from hybrid_jax.models import encoder as encoder_lib
from hybrid_jax.models import presets
from train_helpers import metric_curves, random_token_batch, runlocal_config, wide_random_params

TOL = 1e-5  # float32; packing only reorders a few sums
BATCH = 32
LENGTHS = {"query": 8, "passage": 12, "negative": 12}  # negative == passage: false negatives
ROW_LENGTH = 24
VOCAB = 64


def _encoder_config() -> encoder_lib.EncoderConfig:
  # pad_token_id 0: random_token_batch pads with 0 and draws real ids from 1..VOCAB-1.
  return encoder_lib.EncoderConfig(
      model_type="xlm-roberta", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
      num_attention_heads=4, intermediate_size=64, max_position_embeddings=16,
      type_vocab_size=1, pad_token_id=0, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, pooling="mean")


def _params(config) -> dict:
  return {"encoder": wide_random_params(config)}


LOSS = losses.LossConfig(hard_negatives=True, mask_same_id=True, mask_false_negatives=True,
                         symmetric=True)
PACKED_LOSS = dataclasses.replace(LOSS, packed=True)


@functools.lru_cache(maxsize=None)
def _step(loss_cfg):
  encode = train_step.make_encode_fn(_encoder_config())
  return jax.jit(lambda params, batch: losses.value_and_grad(encode, params, batch, None,
                                                             loss_cfg))


def _layout(num_shards: int, batch) -> packing.PackingLayout:
  towers = ("query", "passage", "negative")
  lengths = [batch[f"{t}_attention_mask"].sum(axis=1) for t in towers]
  choice = packing.choose_num_rows(packing.shard_lengths(lengths, num_shards), ROW_LENGTH,
                                   margin=1.0)
  return packing.PackingLayout(num_shards, choice.num_rows, ROW_LENGTH, towers, choice)


def _only(batch, loss_cfg):
  return {k: batch[k] for k in loss_cfg.required_features()}


@pytest.fixture(scope="module")
def case():
  """(params, padded batch, padded (loss, aux), grads on one device)."""
  batch = random_token_batch(0, BATCH, LENGTHS, VOCAB, min_length=2, num_batch_types=3)
  params = _params(_encoder_config())
  return params, batch, _step(LOSS)(params, _only(batch, LOSS))


def _max_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_same(reference, packed, what):
  (loss, aux), grads = reference
  (packed_loss, packed_aux), packed_grads = packed
  loss_diff, aux_diff = abs(float(loss) - float(packed_loss)), _max_diff(aux, packed_aux)
  grad_diff = _max_diff(grads, packed_grads)
  print(f"\n{what}: loss {float(loss):.6f} diff {loss_diff:.2e}, aux {aux_diff:.2e}, "
        f"grads {grad_diff:.2e}")
  assert loss_diff <= TOL and aux_diff <= TOL and grad_diff <= TOL, what
  # Not equality of constants: gradients are large next to the tolerance.
  assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads)) > 1e-2


def test_packed_step_equals_padded_step_on_one_device(case):
  params, batch, reference = case
  # The masks matter in this batch: shared question ids and a hard negative that is another
  # row's positive (random_token_batch).
  assert len(set(batch["question_id"])) < BATCH
  assert np.isin(batch["negative_passage_id"], batch["passage_id"]).any()
  layout = _layout(1, batch)
  packed = {**batch, **packing.pack_towers(batch, layout, pad_token_id=0)}
  assert layout.num_rows * 2 < 3 * BATCH  # several texts per row
  _assert_same(reference, _step(PACKED_LOSS)(params, _only(packed, PACKED_LOSS)), "1 device")


def test_packed_step_sharded_over_8_devices_equals_padded_one_device(case):
  params, batch, reference = case
  mesh = sharding.make_mesh([("data", -1)])
  shards = sharding.num_batch_shards(mesh)
  assert shards == 8
  layout = _layout(shards, batch)
  packed = packing.pack_towers(batch, layout, pad_token_id=0)
  # Every batch shard's texts lie in that shard's own rows: pooling stays on its device.
  per = BATCH // shards
  for tower in layout.towers:
    shard_of_row = packed[packing.segment_index_key(tower)][:, 0] // layout.rows_per_shard
    np.testing.assert_array_equal(shard_of_row, np.arange(BATCH) // per)
  # As the trainer lays them out: batch rows and packed rows split over the batch axes alike.
  features = _only({**batch, **packed}, PACKED_LOSS)
  rows = {k: v for k, v in features.items() if k.startswith("packed_")}
  inputs = {**sharding.host_to_global({k: v for k, v in features.items() if k not in rows}, mesh,
                                      BATCH),
            **sharding.host_to_global(rows, mesh)}
  assert inputs["packed_input_ids"].sharding.spec == jax.sharding.PartitionSpec(("data",))
  replicated = jax.device_put(params, sharding.replicated(mesh))
  _assert_same(reference, _step(PACKED_LOSS)(replicated, inputs), "8 devices")


def test_packing_configs_that_cannot_work_fail_clearly(tmp_path):
  # (GradCache with packing works: tests/test_gradcache_packing.py.)
  config = runlocal_config("hybrid", **{"data.packing": True, "data.packing_row_length": 8})
  with pytest.raises(packing.PackingError, match="raise it to >= 16"):
    trainer.validate_config(config, str(tmp_path / "run"))


# --- the pipeline -------------------------------------------------------------------------------
def _assert_texts_in_rows(batch, layout, num_shards):
  """Each tower's padded text i is segment index[i] of the packed rows, in its shard's rows."""
  per = len(batch["query_input_ids"]) // num_shards
  for tower in layout.towers:
    for i, (row, segment) in enumerate(batch[packing.segment_index_key(tower)]):
      text = batch[f"{tower}_input_ids"][i][batch[f"{tower}_attention_mask"][i] == 1]
      in_row = batch["packed_segment_ids"][row] == segment
      np.testing.assert_array_equal(batch["packed_input_ids"][row][in_row], text)
      np.testing.assert_array_equal(batch["packed_segment_positions"][row][in_row],
                                    np.arange(len(text)))
      assert row // layout.rows_per_shard == i // per


def test_pipeline_packs_every_shard_and_host_slices_join_to_the_global_packing():
  config = defaults.data_config("hybrid", prefixes=presets.PAPER_PREFIXES)
  config.synthetic.num_entities, config.synthetic.num_relations = 32, 8
  config.update({"hard_negatives": True, "tf_threads": 2, "prefetch_batches": 2,
                 "packing": True, "packing_row_length": 32, "validation_batches": 2})
  data = pipeline.TrainingData.from_config(config)
  batch_size, shards, hosts = 16, 4, 2
  layout = data.packing_layout(batch_size, shards, num_steps=20, process_count=hosts)
  assert layout == data.packing_layout(batch_size, shards, num_steps=20, process_count=hosts)
  assert layout.towers == ("query", "passage", "negative") and layout.choice.margin == 1.0
  take = lambda **kw: list(itertools.islice(
      data.train_batches(batch_size, start_step=3, packing_layout=layout, **kw), 3))
  whole = take()
  per_host = [take(process_index=i, process_count=hosts) for i in range(hosts)]
  for step, batch in enumerate(whole, start=3):
    _assert_texts_in_rows(batch, layout, shards)
    reference = data.pack_batch(data.host_batch(data.plan(step, batch_size)), layout)
    assert sorted(batch) == sorted(reference)
    for key in batch:
      np.testing.assert_array_equal(batch[key], reference[key], err_msg=key)
      # Each host packs its own shards, in global row numbers: the slices join to the whole.
      joined = np.concatenate([per_host[i][step - 3][key] for i in range(hosts)])
      np.testing.assert_array_equal(joined, batch[key], err_msg=key)
    assert batch["packed_input_ids"].shape == (layout.num_rows, 32)
  for batch in data.validation_batches(batch_size, packing_layout=layout):
    rows = len(batch["packed_input_ids"]) // shards  # the validation list's own (exact) rows
    _assert_texts_in_rows(batch, dataclasses.replace(layout, rows_per_shard=rows), shards)
  # Fewer rows than a batch needs: the packer's error, not a truncation.
  too_few = dataclasses.replace(layout, rows_per_shard=1)
  with pytest.raises(packing.PackingError, match="need .* packed rows"):
    data.pack_batch(whole[0], too_few)
  # GradCache chunks packed rows: the chosen rows round up so that the chunk size divides them.
  for chunk in (8, 12):
    chunked = data.packing_layout(batch_size, shards, num_steps=20, chunk_size=chunk)
    assert chunked.num_rows % chunk == 0 and chunked.num_rows % shards == 0
    assert layout.num_rows <= chunked.num_rows < layout.num_rows + math.lcm(chunk, shards)
  config.packing_rows = 6
  with pytest.raises(packing.PackingError, match="not a multiple of the 4 batch shards"):
    data.packing_layout(batch_size, shards, num_steps=20)
  config.packing_rows = 12
  with pytest.raises(packing.PackingError, match="gradcache_chunk_size=8 does not divide data."
                                                  "packing_rows=12.*multiple of 8"):
    data.packing_layout(batch_size, shards, num_steps=20, chunk_size=8)


# --- a short run ---------------------------------------------------------------------------------
STEPS = 8
RUN = {"train.num_steps": STEPS, "train.warmup_steps": 2, "train.log_every_steps": 2,
       "train.eval_every_steps": 4, "train.checkpoint_every_steps": STEPS,
       "model.hidden_dropout_prob": 0.0, "model.attention_probs_dropout_prob": 0.0,
       "data.hard_negatives": True, "train.mask_false_negatives": True,
       "data.validation_batches": 2}


def test_runlocal_training_with_packing_logs_the_padded_loss_curve(tmp_path, capfd):
  curves = metric_curves(
      {"padded": runlocal_config("hybrid", **RUN, **{"data.packing": False}),
       "packed": runlocal_config("hybrid", **RUN, **{"data.packing": True,
                                                     "data.packing_row_length": 32})},
      ("loss", "validation/loss", "accuracy"), tmp_path)
  assert "packing: " in capfd.readouterr().err  # the chosen rows are logged
  assert curves["padded"].keys() == curves["packed"].keys()
  assert {key for _, key in curves["padded"]} == {"loss", "validation/loss", "accuracy"}
  diff = max(abs(curves["padded"][k] - curves["packed"][k]) for k in curves["padded"])
  print(f"\nrunlocal {STEPS} steps: max |padded - packed| over {len(curves['padded'])} logged "
        f"values {diff:.2e}")
  assert diff <= TOL
  losses_logged = [v for (_, key), v in sorted(curves["padded"].items()) if key == "loss"]
  assert len(set(losses_logged)) > 1  # the parameters moved
