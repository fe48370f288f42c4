"""Packed rows (several texts per row, data/packing.py) give each text the embedding, and the
params the gradients, of the same texts in a padded batch: BERT and XLM-R, every pooling, on real
multilingual MLQA-R texts (e5 tokenizer) and on synthetic ones, on 1 and on 8 devices."""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import sharding
from hybrid_jax.data import locations
from hybrid_jax.data import packing
from hybrid_jax.data import tokenization
from hybrid_jax.models import e5_convert
from hybrid_jax.models import encoder as encoder_lib

TOL = 1e-5  # float32: packing only changes the order of a few sums
POOLINGS = ("mean", "cls", "pooler")
MAX_LENGTHS = {"query": 40, "passage": 96}  # the study's workload (issue 21)
ROW_LENGTH = 128
E5_VOCAB = 250037  # multilingual-e5-small's table (the tokenizer emits ids below 250002)


def _config(model_type: str, vocab_size: int, longest: int) -> encoder_lib.EncoderConfig:
  """A tiny encoder with dropout off and the pooler present (so all three poolings run)."""
  roberta = model_type != "bert"
  return encoder_lib.EncoderConfig(
      model_type=model_type, vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=longest + (2 if roberta else 0), type_vocab_size=1 if roberta else 2,
      pad_token_id=1, layer_norm_eps=1e-5 if roberta else 1e-12, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, add_pooling_layer=True)


def _params(config, seed: int) -> dict:
  """Random float32 params (NumPy: no init program to compile) with 10x BERT's init std (0.2),
  LayerNorm scales 1 +- 0.1 and biases +- 0.1.

  At the default std 0.02 attention is nearly uniform and every text's CLS embedding nearly the
  same (cosine 0.99998 on the real texts), so a mask error could hide under the tolerance; here
  texts differ (cosine <= 0.91) and every tensor matters."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))

  def one(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) == 2:  # kernels and embedding tables
      return 0.2 * noise
    return (1.0 if path[-1].key == "scale" else 0.0) + 0.1 * noise

  return jax.tree_util.tree_map_with_path(one, shapes)


def _contrastive_loss(embedding):
  """In-batch InfoNCE of text i against text i + N/2 (queries against passages)."""
  half = embedding.shape[0] // 2
  scores = embedding[:half] @ embedding[half:].T / 0.05
  return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))


def _embeddings_and_grads(config, params, inputs: dict) -> dict:
  """{pooling: (embedding [N, H], d loss / d params)} for every pooling, in one compile."""
  out = {}
  for pooling in POOLINGS:
    model = encoder_lib.Encoder(config.replace(pooling=pooling))

    def loss(p, model=model):
      embedding = model.apply({"params": p}, **inputs).embedding
      return _contrastive_loss(embedding), embedding

    (_, embedding), grads = jax.value_and_grad(loss, has_aux=True)(params)
    out[pooling] = (embedding, grads)
  return out


_run = jax.jit(_embeddings_and_grads, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _padded_and_packed(config, params, padded: dict, packed: dict):
  """(padded, packed) `_embeddings_and_grads`, and the mean embeddings of the packed rows read
  as one text per row (what a missing block-diagonal mask would give). One program, because on
  this CPU compiling costs seconds and running milliseconds."""
  one_segment_per_row = {**packed, "segment_ids": (packed["segment_ids"] > 0).astype(jnp.int32)}
  merged = encoder_lib.Encoder(config.replace(pooling="mean")).apply(
      {"params": params}, **one_segment_per_row).embedding
  return (_embeddings_and_grads(config, params, padded),
          _embeddings_and_grads(config, params, packed), merged)


def _padded_inputs(sequences, pad_token_id):
  length = max(len(s) for s in sequences)
  ids = np.full((len(sequences), length), pad_token_id, np.int32)
  for i, s in enumerate(sequences):
    ids[i, :len(s)] = s
  mask = (np.arange(length)[None] < np.array([len(s) for s in sequences])[:, None])
  return {"input_ids": ids, "attention_mask": mask.astype(np.int32)}


def _packed_inputs(packed: packing.PackedBatch) -> dict:
  return {"input_ids": packed.input_ids, "segment_ids": packed.segment_ids,
          "segment_positions": packed.segment_positions, "segment_index": packed.segment_index}


def _max_diffs(reference: dict, other: dict) -> dict:
  """{pooling: (max |embedding diff|, max |gradient diff| over all params)}."""
  diffs = {}
  for pooling, (ref_emb, ref_grads) in reference.items():
    emb, grads = other[pooling]
    grad_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)))
    diffs[pooling] = (float(np.abs(np.asarray(ref_emb) - np.asarray(emb)).max()), grad_diff)
  return diffs


def _assert_equal(reference: dict, other: dict, what: str) -> None:
  diffs = _max_diffs(reference, other)
  print(f"\n{what}: " + ", ".join(f"{p} emb {e:.2e} grad {g:.2e}" for p, (e, g) in diffs.items()))
  for pooling, (emb_diff, grad_diff) in diffs.items():
    assert emb_diff <= TOL, f"{what} {pooling}: embeddings differ by {emb_diff}"
    assert grad_diff <= TOL, f"{what} {pooling}: gradients differ by {grad_diff}"
  # Non-trivial: the gradients are large compared to the tolerance and the texts' embeddings
  # differ from each other, so equality above is not equality of constants.
  for pooling, (emb, grads) in reference.items():
    assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads)) > 1e-2
    emb = np.asarray(emb)
    assert np.abs(emb[1:] - emb[:-1]).max(axis=1).min() > 1e-3, pooling


# --- synthetic texts: no data needed ------------------------------------------------------------
def test_packed_equals_padded_on_synthetic_texts():
  """XLM-R (its padding-offset positions are the harder case); BERT runs on the real texts."""
  model_type = "xlm-roberta"
  rng = np.random.default_rng(7)
  lengths = np.concatenate([rng.integers(2, 12, size=12), rng.integers(8, 30, size=12)])
  sequences = [rng.integers(3, 200, size=n).astype(np.int32) for n in lengths]
  config = _config(model_type, vocab_size=200, longest=int(lengths.max()))
  params = _params(config, seed=0)
  packed = packing.pack(sequences, num_rows=8, row_length=48, pad_token_id=config.pad_token_id)
  assert packed.rows_used < len(sequences) / 2  # several texts per row
  reference, ours, merged = _padded_and_packed(
      config, params, _padded_inputs(sequences, config.pad_token_id), _packed_inputs(packed))
  _assert_equal(reference, ours, f"synthetic {model_type} 1 device")
  # The block-diagonal mask matters: texts that see their row-mates are far off.
  assert np.abs(np.asarray(merged) - np.asarray(reference["mean"][0])).max() > 1e-2


def test_packed_position_ids_equal_the_padded_ones():
  rng = np.random.default_rng(1)
  sequences = [rng.integers(3, 50, size=n).astype(np.int32) for n in (5, 9, 3, 12, 7, 2)]
  packed = packing.pack(sequences, num_rows=3, row_length=16, pad_token_id=1)
  padded = _padded_inputs(sequences, pad_token_id=1)
  for model_type in ("bert", "xlm-roberta"):
    config = _config(model_type, vocab_size=50, longest=12)
    expected = np.asarray(encoder_lib.position_ids(config, jnp.asarray(padded["input_ids"])))
    got = np.asarray(encoder_lib.packed_position_ids(config, packed.segment_ids,
                                                     packed.segment_positions))
    for n, (r, s) in enumerate(packed.segment_index):
      np.testing.assert_array_equal(got[r][packed.segment_ids[r] == s],
                                    expected[n, :len(sequences[n])])
    if config.is_roberta:  # padding gets pad_token_id, as transformers does
      assert (got[packed.segment_ids == 0] == config.pad_token_id).all()
      assert got[packed.segment_ids > 0].min() == config.pad_token_id + 1


def test_packed_inputs_keep_the_parameter_tree_and_check_their_arguments():
  config = _config("xlm-roberta", vocab_size=50, longest=12)
  packed = packing.pack([np.arange(3, 8), np.arange(3, 6)], 2, 8, pad_token_id=1)
  model = encoder_lib.Encoder(config)
  packed_tree = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  **_packed_inputs(packed))["params"])
  padded_tree = jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(nn.meta.unbox(packed_tree)) == shapes(padded_tree)  # same names, same shapes
  inputs = _packed_inputs(packed)
  # Dropout and remat trace with packed rows too; outputs are per text, hidden states per row.
  out = jax.eval_shape(lambda p: encoder_lib.Encoder(config.replace(remat=True)).apply(
      {"params": p}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(1)}),
      padded_tree)
  assert out.embedding.shape == (2, 32) and out.last_hidden_state.shape == (2, 8, 32)
  with pytest.raises(encoder_lib.EncoderConfigError, match="missing .'segment_index'."):
    model.init(jax.random.key(0), packed.input_ids, segment_ids=packed.segment_ids,
               segment_positions=packed.segment_positions)
  with pytest.raises(encoder_lib.EncoderConfigError, match="must be None with packed rows"):
    model.init(jax.random.key(0), attention_mask=packed.segment_ids > 0, **inputs)
  with pytest.raises(encoder_lib.EncoderConfigError, match=r"must be \[N, 2\]"):
    model.init(jax.random.key(0), **{**inputs, "segment_index": packed.segment_index[:, 0]})
  with pytest.raises(encoder_lib.EncoderConfigError, match="needs attention_mask"):
    model.init(jax.random.key(0), packed.input_ids)


# --- real multilingual texts --------------------------------------------------------------------
def _mlqa_r_texts(per_language: int = 4) -> dict[str, list[str]]:
  """The first questions and answer-paragraph sentences of each MLQA-R language, plus each
  language's longest sentence (truncated at 96 tokens: a full-length passage)."""
  data_dir = locations.dataset_dir("mlqa-r")
  texts = {"query": [], "passage": []}
  for name in sorted(os.listdir(data_dir)):
    if not name.endswith(".json"):
      continue
    with open(os.path.join(data_dir, name), encoding="utf-8") as f:
      paragraphs = [p for article in json.load(f)["data"] for p in article["paragraphs"]]
    sentences = [s for p in paragraphs for s in p["sentences"]]
    texts["query"] += [qa["question"] for p in paragraphs for qa in p["qas"]][:per_language]
    texts["passage"] += sentences[:per_language - 1] + [max(sentences, key=len)]
  return texts


@pytest.fixture(scope="module")
def real_case():
  """(token sequences: queries then passages, packed batch) of real MLQA-R texts."""
  tokenizer = tokenization.Tokenizer.from_file(e5_convert.source_paths()[1], pad_token="<pad>")
  texts = _mlqa_r_texts()
  sequences = []
  for side, prefix in (("query", "query: "), ("passage", "passage: ")):
    sequences += tokenizer.token_ids(texts[side], MAX_LENGTHS[side], prefix=prefix)
  assert tokenizer.pad_token_id == 1
  lengths = [len(s) for s in sequences]
  # R from the helper (rows split evenly over 8 devices); one batch, so no margin needed.
  choice = packing.choose_num_rows([lengths], ROW_LENGTH, margin=1.0, multiple_of=8)
  packed = packing.pack(sequences, choice.num_rows, ROW_LENGTH, tokenizer.pad_token_id)
  # The real texts exercise truncation, several texts per row and a full-length passage.
  assert max(lengths) == MAX_LENGTHS["passage"] and min(lengths) < 15
  assert packed.rows_used * 3 <= len(sequences)
  return sequences, packed


_one_device_cache = {}


def _one_device(model_type, sequences, packed):
  """(config, params, padded outputs, packed outputs, one-segment-per-row mean embeddings) on
  one device, computed once per model type (the padded outputs are the 8-device reference)."""
  if model_type not in _one_device_cache:
    config = _config(model_type, E5_VOCAB, longest=max(MAX_LENGTHS.values()))
    params = _params(config, seed=3)
    device = jax.devices()[0]
    outputs = _padded_and_packed(
        config, jax.device_put(params, device),
        jax.device_put(_padded_inputs(sequences, config.pad_token_id), device),
        jax.device_put(_packed_inputs(packed), device))
    _one_device_cache[model_type] = (config, params, *outputs)
  return _one_device_cache[model_type]


@pytest.mark.real_data
@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta"])
def test_packed_equals_padded_on_real_texts_one_device(model_type, real_case):
  sequences, packed = real_case
  _, _, reference, ours, merged = _one_device(model_type, sequences, packed)
  _assert_equal(reference, ours, f"MLQA-R {model_type} 1 device")
  assert np.abs(np.asarray(merged) - np.asarray(reference["mean"][0])).max() > 1e-2


@pytest.mark.real_data
@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta"])
def test_packed_rows_sharded_over_8_devices_equal_padded_one_device(model_type, real_case):
  sequences, packed = real_case
  config, params, reference, _, _ = _one_device(model_type, sequences, packed)
  mesh = sharding.make_mesh([("data", -1)])
  assert dict(mesh.shape) == {"data": 8} and packed.num_rows % 8 == 0
  shapes = jax.eval_shape(lambda: params)
  params = jax.device_put(params, sharding.param_shardings(mesh, encoder_lib.logical_axes(config),
                                                           shapes))
  # Rows (and the per-text index) split over the batch axis, as host_to_global does for batches.
  inputs = sharding.host_to_global(_packed_inputs(packed), mesh)
  assert inputs["segment_ids"].sharding.spec == jax.sharding.PartitionSpec(("data",))
  assert len({s.device for s in inputs["input_ids"].addressable_shards}) == 8
  _assert_equal(reference, _run(config, params, inputs), f"MLQA-R {model_type} 8 devices")
