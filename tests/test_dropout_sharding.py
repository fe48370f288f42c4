"""Each device generates the dropout bits of its OWN batch rows only (issue 21, "dropout bits").

The train step's dropout key is partitionable threefry (hybrid_jax/train_step.py): XLA shards the
bit generation with the arrays the masks multiply, so the compiled step's uint32 bit arrays have
the LOCAL rows as their leading dimension, padded or packed (data.packing, the default). With the
RBG key used before, every device generated the bits of the global batch (u32[global rows, ...]
in each device's program beside the local slices; 2.8-3.0 GiB per device for XLM-R base at batch
128 on 8 GPUs). The bits do not depend on the mesh: a padded step on 1 device and on 8 devices
computes the same loss (packed rows do depend on the number of batch shards: their layout does).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import sharding
from hybrid_jax import train_step
from hybrid_jax import trainer
from hybrid_jax.data import packing
from train_helpers import random_token_batch, runlocal_config

HIDDEN, HEADS, VOCAB = 32, 4, 512
LENGTHS = {"query": 8, "passage": 16}  # padded: one encoder call per tower (different lengths)
ROW_LENGTH = 16  # packed rows


def _config(batch_size: int, packed: bool):
  return runlocal_config("hybrid", **{
      "model.hidden_size": HIDDEN, "model.intermediate_size": 2 * HIDDEN,
      "model.num_hidden_layers": 1, "model.num_attention_heads": HEADS,
      "model.vocab_size": VOCAB, "model.hidden_dropout_prob": 0.1,
      "model.attention_probs_dropout_prob": 0.1, "train.batch_size": batch_size,
      "data.query_max_length": LENGTHS["query"], "data.passage_max_length": LENGTHS["passage"],
      "data.packing": packed, "data.packing_row_length": ROW_LENGTH})


def _step_and_inputs(batch_size: int, num_devices: int, packed: bool, step: int = 0):
  """(jitted train step, a fresh TrainState at `step`, the global batch, rows per device of each
  encoder call) on the first `num_devices` devices."""
  config = _config(batch_size, packed)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:num_devices])
  loss_cfg = trainer.loss_config(config)
  assert loss_cfg.packed == packed
  fns = train_step.step_functions(
      trainer.encoder_config_from(config, None), loss_cfg,
      train_step.OptimizerSettings.from_train_config(config.train), 0, mesh)
  host = random_token_batch(0, batch_size, LENGTHS, VOCAB, 2, 3)
  local = batch_size // num_devices
  rows = {length: local for length in LENGTHS.values()}
  if packed:  # 2 rows per batch row and shard: room for both texts whatever their lengths
    layout = packing.PackingLayout(num_devices, 2 * local, ROW_LENGTH, tuple(LENGTHS))
    host = {**host, **packing.pack_towers(host, layout, pad_token_id=0)}
    rows = {ROW_LENGTH: 2 * local}
  batch = sharding.host_to_global({k: host[k] for k in loss_cfg.required_features()}, mesh)
  params = fns.init_params()
  state = train_step.TrainState(
      step=jax.device_put(jnp.asarray(step, jnp.int32), sharding.replicated(mesh)),
      params=params, opt_state=fns.init_opt_state(params))
  return fns.train_step, state, batch, rows


def _u32_bit_arrays(hlo_text: str) -> set[tuple[int, ...]]:
  """Shapes of the rank >= 3 uint32 arrays of a compiled (per-device) program: the dropout bits,
  [rows, length, hidden] and [rows, heads, length, length] (nothing else in the step is u32)."""
  return {tuple(int(d) for d in m.group(1).split(","))
          for m in re.finditer(r"\bu32\[(\d+(?:,\d+){2,})\]", hlo_text)}


@pytest.mark.parametrize("batch_size,num_devices,packed,partitionable_flag", [
    (16, 8, False, True),  # 2 rows per device
    (32, 8, False, True),  # 4 rows per device: twice the bits of the line above, not 8 x
    (32, 4, False, True),  # 8 rows per device on 4 of the 8 devices
    (32, 8, True, True),  # packed: 8 packed rows per device
    (16, 8, True, False),  # the step pins partitionable threefry whatever jax's global flag says
], ids=["8dev-batch16", "8dev-batch32", "4dev-batch32", "8dev-batch32-packed",
        "8dev-batch16-packed-flag-off"])
def test_each_device_generates_only_its_own_rows_dropout_bits(batch_size, num_devices, packed,
                                                              partitionable_flag):
  step, state, batch, rows = _step_and_inputs(batch_size, num_devices, packed)
  with jax.threefry_partitionable(partitionable_flag):
    compiled = step.lower(state, batch).compile()
  shapes = _u32_bit_arrays(compiled.as_text())
  # With the RBG key the global rows' arrays were there too: u32[num_devices x r, ...].
  expected = {(r, length, HIDDEN) for length, r in rows.items()} | {
      (r, HEADS, length, length) for length, r in rows.items()}
  assert shapes == expected, sorted(shapes)


def test_dropout_masks_are_the_same_on_1_and_8_devices_and_change_with_the_step():
  losses = {}
  for num_devices in (1, 8):
    for step_number in (0, 7):
      step, state, batch, _ = _step_and_inputs(16, num_devices, False, step_number)
      _, metrics = step(state, batch)  # the loss is computed before the update
      losses[num_devices, step_number] = float(metrics["loss"])
  print("losses (devices, step):", losses)
  for step_number in (0, 7):
    assert losses[1, step_number] == pytest.approx(losses[8, step_number], rel=1e-5, abs=1e-6)
  # Dropout is really on: the step folded into the key gives other masks and another loss.
  assert abs(losses[1, 0] - losses[1, 7]) > 1e-3
