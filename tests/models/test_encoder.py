"""Encoder tests: parity with PyTorch transformers, dtypes, dropout, remat, logical axes, config."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.roberta import modeling_roberta

from hybrid_jax.models import encoder as encoder_lib
from hybrid_jax.models import hf_checkpoint
from hybrid_jax.models import presets
from torch_reference import Case  # tests/models/torch_reference.py
from torch_reference import l2_normalize, padded_batch, state_dict_numpy, torch_model, torch_outputs

PARITY_TOL = 1e-4
# Odd hidden sizes with matching head counts, 1-4 layers, both families, with and without pooler.
CASES = [
    Case("bert", hidden_size=36, num_attention_heads=6, num_hidden_layers=1,
         add_pooling_layer=True),
    Case("bert", hidden_size=60, num_attention_heads=5, num_hidden_layers=4,
         add_pooling_layer=False),
    Case("xlm-roberta", hidden_size=60, num_attention_heads=4, num_hidden_layers=2,
         add_pooling_layer=True),
    Case("xlm-roberta", hidden_size=36, num_attention_heads=3, num_hidden_layers=3,
         add_pooling_layer=False),
    Case("roberta", hidden_size=36, num_attention_heads=4, num_hidden_layers=1,
         add_pooling_layer=True),
]
LENGTHS = (13, 9, 4, 1)  # a padded batch: full row, half rows, a single-token row


def _our_config(case: Case, **overrides) -> encoder_lib.EncoderConfig:
  return encoder_lib.EncoderConfig.from_hf_config(
      case.hf_config().to_dict(), add_pooling_layer=case.add_pooling_layer, **overrides)


@functools.partial(jax.jit, static_argnums=0)
def _all_poolings(config, params, ids, mask, token_type_ids=None):
  """Encoder outputs for every pooling the config supports, in one compile."""
  poolings = ["cls", "mean"] + (["pooler"] if config.add_pooling_layer else [])
  return {p: encoder_lib.Encoder(config.replace(pooling=p)).apply(
      {"params": params}, ids, mask, token_type_ids) for p in poolings}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parity_with_transformers(case):
  model = torch_model(case)
  config = _our_config(case)
  params = hf_checkpoint.params_from_state_dict(config, state_dict_numpy(model))
  ids, mask = padded_batch(case, LENGTHS)
  reference = torch_outputs(model, ids, mask)
  ours = _all_poolings(config, params, ids, mask)

  hidden_diff = np.abs(np.asarray(ours["mean"].last_hidden_state)
                       - reference["last_hidden_state"]).max()
  assert hidden_diff <= PARITY_TOL, f"last_hidden_state max abs diff {hidden_diff}"
  assert set(ours) == {"cls", "mean"} | ({"pooler"} if case.add_pooling_layer else set())
  for pooling, out in ours.items():
    pooled_diff = np.abs(np.asarray(out.pooled) - reference[pooling]).max()
    emb_diff = np.abs(np.asarray(out.embedding) - l2_normalize(reference[pooling])).max()
    assert pooled_diff <= PARITY_TOL, f"{pooling} pooled max abs diff {pooled_diff}"
    assert emb_diff <= PARITY_TOL, f"{pooling} embedding max abs diff {emb_diff}"
    assert out.pooled.dtype == jnp.float32 and out.embedding.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.embedding), axis=-1), 1.0,
                               rtol=1e-5)


def test_parity_with_token_type_ids():
  case = CASES[0]
  model = torch_model(case, seed=1)
  config = _our_config(case)
  params = hf_checkpoint.params_from_state_dict(config, state_dict_numpy(model))
  ids, mask = padded_batch(case, (11, 6), seed=1)
  token_type_ids = (np.arange(ids.shape[1])[None, :] >= 4).astype(np.int32) * mask
  reference = torch_outputs(model, ids, mask, token_type_ids)
  ours = _all_poolings(config, params, ids, mask, token_type_ids)["pooler"]
  assert np.abs(np.asarray(ours.last_hidden_state)
                - reference["last_hidden_state"]).max() <= PARITY_TOL
  # Segment ids must matter, or the test above would pass with them ignored.
  without = _all_poolings(config, params, ids, mask)["pooler"]
  assert np.abs(np.asarray(without.pooled) - np.asarray(ours.pooled)).max() > 1e-3


def test_roberta_position_ids_match_transformers():
  config = _our_config(CASES[2])
  ids, _ = padded_batch(CASES[2], (10, 7, 2), seed=3)
  expected = modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
      torch.as_tensor(ids, dtype=torch.long), padding_idx=config.pad_token_id)
  np.testing.assert_array_equal(encoder_lib.position_ids(config, jnp.asarray(ids)),
                                expected.numpy())
  bert = _our_config(CASES[0])
  np.testing.assert_array_equal(encoder_lib.position_ids(bert, jnp.asarray(ids))[1],
                                np.arange(ids.shape[1]))


def test_bfloat16_compute_is_close_to_float32_and_params_stay_float32():
  case = CASES[2]
  model = torch_model(case)
  config = _our_config(case, pooling="mean")
  params = hf_checkpoint.params_from_state_dict(config, state_dict_numpy(model))
  ids, mask = padded_batch(case, LENGTHS)
  bf16 = config.replace(dtype="bfloat16")
  fp32_out = jax.jit(encoder_lib.Encoder(config).apply)({"params": params}, ids, mask)
  bf16_out = jax.jit(encoder_lib.Encoder(bf16).apply)({"params": params}, ids, mask)
  assert bf16_out.last_hidden_state.dtype == jnp.bfloat16
  assert bf16_out.embedding.dtype == jnp.float32
  emb_diff = np.abs(np.asarray(bf16_out.embedding) - np.asarray(fp32_out.embedding)).max()
  assert emb_diff < 3e-2, emb_diff
  cosine = np.sum(np.asarray(bf16_out.embedding) * np.asarray(fp32_out.embedding), axis=-1)
  assert cosine.min() > 0.999, cosine
  # Parameters are float32 whatever the compute dtype, and so are their gradients.
  bf16_params = jax.eval_shape(lambda: encoder_lib.init_params(bf16, jax.random.key(0)))
  assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
  grads = jax.eval_shape(jax.grad(
      lambda p: encoder_lib.Encoder(bf16).apply({"params": p}, ids, mask).embedding.sum()), params)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def _tiny_config(**changes) -> encoder_lib.EncoderConfig:
  return encoder_lib.EncoderConfig.from_model_config(presets.model_config("tiny")).replace(
      **changes)


@pytest.fixture(scope="module")
def tiny_params():
  """Randomly initialised parameters of a 1-layer tiny preset, shared to compile init once."""
  return encoder_lib.init_params(_tiny_config(num_hidden_layers=1), jax.random.key(0))


def test_dropout_only_when_not_deterministic(tiny_params):
  config = _tiny_config(num_hidden_layers=1)
  no_dropout = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  ids = jnp.arange(2 * 8, dtype=jnp.int32).reshape(2, 8) + 5
  mask = jnp.ones_like(ids)

  @jax.jit
  def embeddings(params):  # one compile for all variants
    def run(cfg, deterministic, seed):
      return encoder_lib.Encoder(cfg).apply(
          {"params": params}, ids, mask, deterministic=deterministic,
          rngs={"dropout": jax.random.key(seed)}).embedding
    return (run(config, True, 0), run(config, False, 1), run(config, False, 2),
            run(no_dropout, False, 1))

  eval_out, train_a, train_b, train_no_dropout = embeddings(tiny_params)
  assert np.abs(train_a - eval_out).max() > 1e-3
  assert np.abs(train_a - train_b).max() > 1e-3
  np.testing.assert_allclose(train_no_dropout, eval_out, atol=1e-6)


def test_remat_gives_the_same_gradients(tiny_params):
  config = _tiny_config(pooling="cls", num_hidden_layers=1)
  ids = jnp.arange(3 * 6, dtype=jnp.int32).reshape(3, 6) + 7
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])

  def grads(cfg, params):
    def loss(p):
      # With dropout on: the recomputed forward pass must replay the same dropout masks.
      out = encoder_lib.Encoder(cfg).apply({"params": p}, ids, mask, deterministic=False,
                                           rngs={"dropout": jax.random.key(3)})
      return jnp.sum(out.embedding[0] * out.embedding[1:])
    return jax.grad(loss)(params)

  plain, remat = jax.jit(lambda p: (grads(config, p), grads(config.replace(remat=True), p)))(
      tiny_params)
  diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), plain, remat)
  assert max(jax.tree.leaves(diffs)) <= 1e-6
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 1e-4
  # remat is really on: the gradient's jaxpr holds a rematerialised (checkpoint) region.
  assert "remat" in str(jax.make_jaxpr(lambda p: grads(config.replace(remat=True), p))(
      tiny_params))
  assert "remat" not in str(jax.make_jaxpr(lambda p: grads(config, p))(tiny_params))


def test_logical_axes_match_params_and_use_known_names(tiny_params):
  config = _tiny_config(add_pooling_layer=True, pooling="pooler")
  params = jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))
  axes = encoder_lib.logical_axes(config)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_spec)
  for array, spec in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_spec)):
    assert len(spec) == array.ndim
    assert set(spec) <= {"vocab", "embed", "mlp", "qkv", "position", "type", None}
  assert axes["embeddings"]["word_embeddings"]["embedding"] == jax.sharding.PartitionSpec(
      "vocab", "embed")
  assert axes["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"] == (
      jax.sharding.PartitionSpec("embed", "mlp"))
  # init_params returns plain float32 arrays, not nn.Partitioned boxes, with HF's init scale.
  leaves = jax.tree.leaves(tiny_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
  kernel = tiny_params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
  assert 0.015 < float(jnp.std(kernel)) < 0.025  # normal(0.02), BERT's initializer_range


def test_config_round_trips_and_presets_build():
  for backbone in ("xlmr-base", "labse", "me5-small", "tiny"):
    config = encoder_lib.EncoderConfig.from_model_config(presets.model_config(backbone))
    assert encoder_lib.EncoderConfig.from_hf_config(config.to_hf_config()) == config
  xlmr = encoder_lib.EncoderConfig.from_model_config(presets.model_config("xlmr-base"))
  assert xlmr.is_roberta and xlmr.max_sequence_length == 512 and xlmr.head_dim == 64
  tiny = _tiny_config()
  shapes = jax.eval_shape(lambda: encoder_lib.init_params(tiny, jax.random.key(0)))
  assert shapes["embeddings"]["word_embeddings"]["embedding"].shape == (512, 64)


def test_too_long_input_is_a_clear_error():
  config = _our_config(CASES[2])  # RoBERTa: 40 positions minus pad_token_id + 1 = 38 usable
  assert config.max_sequence_length == 38
  shapes = jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))
  ids = jnp.full((1, 39), 5, jnp.int32)
  with pytest.raises(ValueError, match="input length 39 exceeds the 38 positions"):
    jax.eval_shape(encoder_lib.Encoder(config).apply, {"params": shapes}, ids, jnp.ones_like(ids))


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2'"),
    (dict(num_attention_heads=5), "not divisible by num_attention_heads"),
    (dict(pooling="pooler", add_pooling_layer=False), "needs add_pooling_layer=True"),
    (dict(pooling="max"), "pooling 'max'"),
    (dict(dtype="int8"), "dtype 'int8'"),
    (dict(hidden_act="tanh"), "hidden_act 'tanh'"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob must be in [0, 1)"),
])
def test_bad_config_is_a_clear_error(changes, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
    _tiny_config(**changes)
