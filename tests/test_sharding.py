"""Mesh, partition rules and host batches; sharded loss/gradients equal a single-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hybrid_jax import losses
from hybrid_jax import sharding
from hybrid_jax import train_step
from hybrid_jax.models import encoder as encoder_lib
import train_helpers

ENCODER = encoder_lib.EncoderConfig(
    model_type="bert", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=32, type_vocab_size=2, pad_token_id=0,
    layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(b, seed=0):
  return train_helpers.random_token_batch(seed, b, {"query": 8, "passage": 12, "negative": 12},
                                          ENCODER.vocab_size, min_length=3, num_batch_types=2)


def test_mesh_shape_resolves_and_rejects():
  assert sharding.mesh_shape([("data", -1), ("fsdp", 1)], 8) == (("data", "fsdp"), (8, 1))
  assert sharding.mesh_shape([("data", 2), ("fsdp", -1)], 8) == (("data", "fsdp"), (2, 4))
  with pytest.raises(sharding.ShardingConfigError, match="uses 6 devices but 8"):
    sharding.mesh_shape([("data", 3), ("fsdp", 2)], 8)
  with pytest.raises(sharding.ShardingConfigError, match="not divisible"):
    sharding.mesh_shape([("data", -1), ("fsdp", 3)], 8)
  with pytest.raises(sharding.ShardingConfigError, match="at most one -1"):
    sharding.mesh_shape([("data", -1), ("fsdp", -1)], 8)
  with pytest.raises(sharding.ShardingConfigError, match="axis names"):
    sharding.mesh_shape([("batch", -1)], 8)


def test_batch_sizes_derived_and_checked():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  sizes = sharding.batch_sizes(32, mesh, process_count=2)
  assert (sizes.per_host, sizes.per_device, sizes.num_shards) == (16, 4, 8)
  with pytest.raises(sharding.ShardingConfigError, match="not divisible by the 8 devices the batch is split over"):
    sharding.batch_sizes(12, mesh)
  with pytest.raises(sharding.ShardingConfigError, match="3 processes"):
    sharding.batch_sizes(16, mesh, process_count=3)


def test_partition_rules_fsdp_and_fallback_to_replicated():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  assert sharding.logical_to_mesh_spec(P("vocab", "embed"), (97, 32), mesh) == P(None, "fsdp")
  assert sharding.logical_to_mesh_spec(P("embed", "mlp"), (32, 64), mesh) == P("fsdp", None)
  # 30 is not divisible by 4: that dimension stays replicated rather than failing.
  assert sharding.logical_to_mesh_spec(P("embed",), (30,), mesh) == P(None)
  tensor_mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  assert sharding.logical_to_mesh_spec(P("embed", "qkv"), (32, 32), tensor_mesh) == P("fsdp",
                                                                                      "tensor")
  assert sharding.batch_axes(tensor_mesh) == ("data", "fsdp")
  shapes = jax.eval_shape(lambda: encoder_lib.init_params(ENCODER, jax.random.key(0)))
  shardings = sharding.param_shardings(mesh, encoder_lib.logical_axes(ENCODER), shapes)
  q = shardings["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
  assert q.spec == P("fsdp", None)


def test_host_to_global_assembles_rows_in_order():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  local = {"x": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  out = sharding.host_to_global(local, mesh)
  assert out["x"].shape == (16, 3)
  assert out["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
  shard_rows = sorted(int(s.data[0, 0]) // 3 for s in out["x"].addressable_shards)
  assert shard_rows == [0, 2, 4, 6, 8, 10, 12, 14]  # 2 rows per device


def _loss_and_grads(params, batch, cfg, mesh=None):
  encode = train_step.make_encode_fn(ENCODER)
  fn = lambda p, b: losses.value_and_grad(encode, p, b, None, cfg)
  if mesh is None:  # the reference: everything on one device
    device = jax.devices()[0]
    params, batch = jax.device_put((params, batch), device)
    (loss, aux), grads = jax.jit(fn)(params, batch)
  else:
    shapes = jax.eval_shape(lambda: params)
    enc_shardings = sharding.param_shardings(mesh, encoder_lib.logical_axes(ENCODER),
                                             shapes["encoder"])
    param_sh = {"encoder": enc_shardings,
                **{k: sharding.replicated(mesh) for k in params if k != "encoder"}}
    params = jax.device_put(params, param_sh)
    batch = sharding.host_to_global(batch, mesh)
    (loss, aux), grads = jax.jit(fn, out_shardings=((None, None), param_sh))(params, batch)
    leaf = grads["encoder"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
    assert leaf.sharding == enc_shardings["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
  return float(loss), jax.device_get(aux), jax.device_get(grads)


@pytest.fixture(scope="module")
def single_device_run():
  cfg = losses.LossConfig(hard_negatives=True, symmetric=True, learnable_temperature=True)
  params = {"encoder": encoder_lib.init_params(ENCODER, jax.random.key(1)), **cfg.initial_params()}
  batch = _batch(32)
  return cfg, params, batch, _loss_and_grads(params, batch, cfg)


@pytest.mark.parametrize("mesh_config,chunk", [
    ([("data", -1), ("fsdp", 1)], 0),
    ([("data", 2), ("fsdp", 4)], 0),
    ([("data", 2), ("fsdp", 4)], 8),
], ids=["data8", "data2xfsdp4", "data2xfsdp4-gradcache"])
def test_sharded_loss_and_grads_equal_single_device(mesh_config, chunk, single_device_run):
  cfg, params, batch, (ref_loss, ref_aux, ref_grads) = single_device_run
  mesh = sharding.make_mesh(mesh_config)
  sharded_cfg = losses.LossConfig(**{**cfg.__dict__, "chunk_size": chunk})
  loss, aux, grads = _loss_and_grads(params, batch, sharded_cfg, mesh)
  assert abs(loss - ref_loss) <= 1e-5, (loss, ref_loss)
  np.testing.assert_allclose(aux["loss_per_type_sum"], ref_aux["loss_per_type_sum"], rtol=1e-6)
  worst = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)))
  assert worst <= 1e-5, worst
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 1e-3


@pytest.fixture(scope="module")
def single_device_masked_run():
  """The false-negative-masked loss on one device (computed once for both meshes below)."""
  cfg = losses.LossConfig(hard_negatives=True, symmetric=True, mask_false_negatives=True)
  params = {"encoder": encoder_lib.init_params(ENCODER, jax.random.key(1))}
  batch = _batch(32)
  # Rows 2, 10, 18, 26 carry rows 5, 13, 21, 29's positives as hard negatives: on other devices.
  assert list(batch["negative_passage_id"][[2, 10]]) == list(batch["passage_id"][[5, 13]])
  reference = _loss_and_grads(params, batch, cfg)
  unmasked_loss, _, _ = _loss_and_grads(
      params, batch, losses.LossConfig(**{**cfg.__dict__, "mask_false_negatives": False}))
  assert abs(unmasked_loss - reference[0]) > 1e-3  # the mask is not vacuous on this batch
  return cfg, params, batch, reference


@pytest.mark.parametrize("mesh_config,chunk", [
    ([("data", -1), ("fsdp", 1)], 0),
    ([("data", 2), ("fsdp", 4)], 8),
], ids=["data8", "data2xfsdp4-gradcache"])
def test_false_negative_mask_sharded_equals_single_device(mesh_config, chunk,
                                                          single_device_masked_run):
  """train.mask_false_negatives on global arrays: the passage-id comparisons span all devices (a
  row's false negative sits on another device's rows), plain and GradCache."""
  cfg, params, batch, (ref_loss, ref_aux, ref_grads) = single_device_masked_run
  mesh = sharding.make_mesh(mesh_config)
  loss, aux, grads = _loss_and_grads(
      params, batch, losses.LossConfig(**{**cfg.__dict__, "chunk_size": chunk}), mesh)
  assert abs(loss - ref_loss) <= 1e-5, (loss, ref_loss)
  np.testing.assert_allclose(aux["loss_per_type_sum"], ref_aux["loss_per_type_sum"], rtol=1e-6)
  worst = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)))
  assert worst <= 1e-5, worst
