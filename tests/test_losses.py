"""InfoNCE against a NumPy loop reference; masks; GradCache against the plain loss and gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import config_lib
from hybrid_jax import losses

VOCAB, DIM, HIDDEN = 40, 12, 16


# --- a small stand-in encoder: bag of embeddings -> dense -> tanh -> dropout -> L2 norm ---------
def _init_encoder(seed=0, hidden=HIDDEN):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"embed": jax.random.normal(k1, (VOCAB, hidden)) * 0.5,
          "dense": jax.random.normal(k2, (hidden, DIM)) * 0.3}


def _encode(params, ids, mask, rng):
  mask = mask.astype(jnp.float32)
  tokens = params["embed"][ids] * mask[..., None]  # [N, L, H]
  pooled = tokens.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
  h = jnp.tanh(pooled @ params["dense"])
  if rng is not None:
    keep = jax.random.bernoulli(rng, 0.8, h.shape)
    h = jnp.where(keep, h / 0.8, 0.0)
  return h / jnp.linalg.norm(h, axis=-1, keepdims=True)


def _batch(b, seed=0, dup_ids=True, lengths=(5, 7)):
  rng = np.random.default_rng(seed)
  batch = {}
  for name, length in (("query", lengths[0]), ("passage", lengths[1]), ("negative", lengths[1])):
    ids = rng.integers(1, VOCAB, size=(b, length)).astype(np.int32)
    n = rng.integers(2, length + 1, size=b)
    mask = (np.arange(length)[None] < n[:, None]).astype(np.int32)
    batch[f"{name}_input_ids"] = ids * mask
    batch[f"{name}_attention_mask"] = mask
  qid = np.arange(b, dtype=np.int32) + 100
  if dup_ids:  # the same question in several languages, as in X-Y batches
    qid[1] = qid[0]
    qid[5] = qid[3]
    qid[6] = qid[3]
  batch["question_id"] = qid
  # Passage ids: one per question id, except that ids 102 and 104 share a gold passage; hard
  # negatives are other rows' positives (rows 2, 4 -> row 0's passage; row 7 -> row 2's and
  # row 4's, row 6 -> its own) or passages of their own (10_000 + row).
  pid = qid.copy()
  if b > 4:
    pid[4] = pid[2]
  npid = np.arange(b, dtype=np.int32) + 10_000
  if b > 7:
    npid[2] = npid[4] = pid[0]
    npid[7] = pid[2]
    npid[6] = pid[6]
  # Relevance is a relation: row i's record's positives in every language. Row 1's record also
  # holds row 5's passage (two questions sharing a gold sentence in one language): row 1 must not
  # take it as a negative, but row 5 may take row 1's positive.
  relevant = np.stack([pid, np.full(b, -1, np.int32)], axis=1)
  if b > 5:
    relevant[1, 1] = pid[5]
  batch["passage_id"], batch["negative_passage_id"] = pid, npid
  batch["relevant_passage_ids"] = relevant
  batch["batch_type"] = (np.arange(b) % 3 == 0).astype(np.int32)  # mono / xy rows
  return {k: jnp.asarray(v) for k, v in batch.items()}


# --- NumPy reference: one row at a time, straight from the formula ------------------------------
def _reference(q, p, n, qid, btype, scale, cfg, pid=None, npid=None, relevant=None):
  q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
  b = len(q)
  rel = [set(r[r >= 0].tolist()) for r in relevant] if relevant is not None else None

  def term(anchor, positives, others_pos, extra, false_negative):
    """false_negative(i, j): row i's candidate j (j's positive) is one of i's positives."""
    values = []
    for i in range(b):
      cands = [scale * anchor[i] @ positives[i]]
      for j in range(b):
        if j == i or not cfg.in_batch_negatives:
          continue
        if cfg.mask_same_id and qid[j] == qid[i]:
          continue
        if cfg.mask_false_negatives and false_negative(i, j):
          continue
        cands.append(scale * anchor[i] @ others_pos[j])
      if extra is not None:
        cands += [scale * anchor[i] @ extra[j] for j in range(b)
                  if not (cfg.mask_false_negatives and npid[j] in rel[i])]
      cands = np.asarray(cands)
      values.append(-(cands[0] - np.log(np.exp(cands).sum())))
    return np.asarray(values)

  rows = term(q, p, p, np.asarray(n, np.float64) if cfg.hard_negatives else None,
              lambda i, j: pid[j] in rel[i])
  if cfg.symmetric:
    # Passage i against query j: j is dropped when passage i is one of j's positives.
    rows = 0.5 * (rows + term(p, q, q, None, lambda i, j: pid[i] in rel[j]))
  per_type = np.asarray([rows[np.asarray(btype) == t].sum() for t in range(3)])
  return rows.mean(), per_type


CONFIGS = [losses.LossConfig(in_batch_negatives=ib, hard_negatives=hn, symmetric=sym,
                             mask_same_id=mask, mask_false_negatives=fn, temperature=0.07)
           for ib, hn, sym, mask, fn in itertools.product(*[[True, False]] * 5) if ib or hn]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: (
    f"ib{int(c.in_batch_negatives)}-hn{int(c.hard_negatives)}-sym{int(c.symmetric)}"
    f"-mask{int(c.mask_same_id)}-fn{int(c.mask_false_negatives)}"))
def test_embedding_loss_matches_numpy_reference(cfg):
  rng = np.random.default_rng(1)
  b = 8
  q, p, n = (rng.normal(size=(b, DIM)) for _ in range(3))
  q, p, n = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, p, n))
  batch = _batch(b)
  loss, aux = jax.jit(losses.embedding_loss, static_argnums=6)(
      jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32), jnp.asarray(n, jnp.float32),
      batch["question_id"], batch["batch_type"], jnp.float32(1 / 0.07), cfg,
      passage_id=batch["passage_id"], negative_passage_id=batch["negative_passage_id"],
      relevant_passage_ids=batch["relevant_passage_ids"])
  ref_loss, ref_per_type = _reference(q, p, n, np.asarray(batch["question_id"]),
                                      np.asarray(batch["batch_type"]), 1 / 0.07, cfg,
                                      np.asarray(batch["passage_id"]),
                                      np.asarray(batch["negative_passage_id"]),
                                      np.asarray(batch["relevant_passage_ids"]))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux["loss_per_type_sum"]), ref_per_type, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux["rows_per_type"]), [5, 3, 0])


def test_same_id_rows_are_never_negatives_but_own_positive_stays():
  cfg = losses.LossConfig(symmetric=True)
  rng = np.random.default_rng(2)
  b = 8
  q, p = (jnp.asarray(rng.normal(size=(b, DIM)) / 3, jnp.float32) for _ in range(2))
  batch = _batch(b)  # rows 0 and 1 share an id; rows 3, 5, 6 share an id

  def row_loss(p, i):
    _, aux = losses.embedding_loss(q, p, None, batch["question_id"],
                                   (jnp.arange(b) == i).astype(jnp.int32), jnp.float32(20.0), cfg)
    return aux["loss_per_type_sum"][1]  # loss of row i alone (its batch_type is 1)

  grad_row0 = jax.grad(row_loss)(p, 0)
  assert float(jnp.abs(grad_row0[1]).max()) == 0.0  # row 1's passage: same id, not a negative
  assert float(jnp.abs(grad_row0[0]).max()) > 0.0  # the own positive stays
  assert float(jnp.abs(grad_row0[2]).max()) > 0.0  # another id: a negative
  grad_row3 = jax.grad(row_loss)(p, 3)
  assert float(jnp.abs(grad_row3[5]).max()) == 0.0 and float(jnp.abs(grad_row3[6]).max()) == 0.0
  # Without the mask the same-id passage is a negative.
  cfg_nomask = losses.LossConfig(mask_same_id=False)
  _, aux_a = losses.embedding_loss(q, p, None, batch["question_id"], batch["batch_type"],
                                   jnp.float32(20.0), cfg)
  _, aux_b = losses.embedding_loss(q, p, None, batch["question_id"], batch["batch_type"],
                                   jnp.float32(20.0), cfg_nomask)
  assert not np.allclose(aux_a["loss_per_type_sum"], aux_b["loss_per_type_sum"])


def test_identical_embeddings_of_same_id_rows_give_ln1_when_only_they_compete():
  # Two rows, same id, same passage: the masked loss sees only the own positive -> loss 0.
  q = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  p = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
  loss, aux = losses.embedding_loss(q, p, None, jnp.asarray([7, 7]), jnp.asarray([1, 1]),
                                    jnp.float32(20.0), losses.LossConfig())
  assert float(loss) == pytest.approx(0.0, abs=1e-6)
  assert float(aux["accuracy"]) == 1.0


GRADCACHE_CONFIGS = [
    losses.LossConfig(chunk_size=4),
    losses.LossConfig(chunk_size=2, hard_negatives=True, symmetric=True),
    losses.LossConfig(chunk_size=8, learnable_temperature=True, hard_negatives=True),
    losses.LossConfig(chunk_size=4, in_batch_negatives=False, hard_negatives=True,
                      mask_same_id=False),
]


@pytest.mark.parametrize("cfg", GRADCACHE_CONFIGS, ids=lambda c: f"chunk{c.chunk_size}")
def test_gradcache_equals_plain_loss_and_grads(cfg):
  b = 16
  batch = _batch(b, seed=3)
  params = {"encoder": _init_encoder(), **cfg.initial_params()}
  plain_cfg = cfg.__class__(**{**cfg.__dict__, "chunk_size": 0})

  plain = jax.jit(lambda p, bt: losses.value_and_grad(_encode, p, bt, None, plain_cfg))
  cached = jax.jit(lambda p, bt: losses.value_and_grad(_encode, p, bt, None, cfg))
  (loss_a, aux_a), grads_a = plain(params, batch)
  (loss_b, aux_b), grads_b = cached(params, batch)
  assert abs(float(loss_a) - float(loss_b)) <= 1e-5
  np.testing.assert_allclose(aux_a["loss_per_type_sum"], aux_b["loss_per_type_sum"], atol=1e-5)
  assert jax.tree.structure(grads_a) == jax.tree.structure(params)
  assert jax.tree.structure(grads_b) == jax.tree.structure(params)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    assert float(jnp.abs(ga).max()) > 0
    np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-5)
  if cfg.learnable_temperature:
    assert abs(float(grads_a["log_scale"])) > 1e-4


def test_gradcache_with_dropout_reuses_each_chunks_key():
  """With dropout the re-encoding must see the same masks as the first pass: compare to a loss
  that encodes each chunk (strided rows) with the key GradCache gives it, through plain autodiff."""
  cfg = losses.LossConfig(chunk_size=4, hard_negatives=True)
  b = 8
  batch = _batch(b, seed=4)
  params = {"encoder": _init_encoder(1)}
  rng = jax.random.PRNGKey(42)

  def reference(p):
    embs = {}
    for name, tower in (("query", 0), ("passage", 1), ("negative", 2)):
      tower_rng = jax.random.fold_in(rng, tower)
      chunks = losses.to_chunks(batch[f"{name}_input_ids"], 4)
      masks = losses.to_chunks(batch[f"{name}_attention_mask"], 4)
      out = jnp.stack([_encode(p["encoder"], chunks[k], masks[k],
                               jax.random.fold_in(tower_rng, k)) for k in range(len(chunks))])
      embs[name] = losses.from_chunks(out)
    return losses.loss_on_embeddings(embs, p, batch, cfg)

  (loss_ref, _), grads_ref = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
  (loss, _), grads = jax.jit(lambda p: losses.value_and_grad(_encode, p, batch, rng, cfg))(params)
  assert abs(float(loss) - float(loss_ref)) <= 1e-5
  for ga, gb in zip(jax.tree.leaves(grads_ref), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-5)
  # Dropout is really on: a deterministic run gives a different loss.
  (loss_det, _), _ = losses.value_and_grad(_encode, params, batch, None, cfg)
  assert abs(float(loss_det) - float(loss)) > 1e-3


def test_chunks_are_strided_and_round_trip():
  x = jnp.arange(12)
  chunks = losses.to_chunks(x, 4)
  np.testing.assert_array_equal(chunks[0], [0, 3, 6, 9])
  np.testing.assert_array_equal(losses.from_chunks(chunks), x)


def test_gradcache_temp_memory_is_flat_in_batch_size():
  """Compiled temp memory: GradCache grows far slower with the batch than the plain loss.

  The stand-in encoder keeps [N, L, 256] activations per tower, as a transformer layer would."""
  params = {"encoder": _init_encoder(hidden=256)}
  temps = {}
  for chunk in (0, 4):
    cfg = losses.LossConfig(chunk_size=chunk)
    for b in (16, 64):
      batch = _batch(b, lengths=(16, 32))
      fn = jax.jit(lambda p, bt, cfg=cfg: losses.value_and_grad(_encode, p, bt, None, cfg))
      stats = fn.lower(params, batch).compile().memory_analysis()
      temps[chunk, b] = stats.temp_size_in_bytes
  plain_growth = temps[0, 64] - temps[0, 16]
  cached_growth = temps[4, 64] - temps[4, 16]
  assert temps[4, 64] < temps[0, 64] / 4, temps
  assert cached_growth < plain_growth / 8, temps


def test_missing_features_and_bad_options_fail_fast():
  batch = _batch(8)
  del batch["negative_input_ids"], batch["question_id"]
  cfg = losses.LossConfig(hard_negatives=True)
  with pytest.raises(losses.LossConfigError, match=r"negative_input_ids.*question_id|data.hard"):
    cfg.check_batch(batch)
  with pytest.raises(losses.LossConfigError, match="no negatives"):
    losses.LossConfig(in_batch_negatives=False).validate()
  with pytest.raises(losses.LossConfigError, match="does not divide"):
    losses.LossConfig(chunk_size=3).check_batch(_batch(8))
  with pytest.raises(losses.LossConfigError, match="temperature"):
    losses.LossConfig(temperature=0.0).validate()


def test_training_config_defaults_mask_false_negatives_and_record_the_definition():
  train = config_lib.train_config()
  cfg = losses.LossConfig.from_train_config(train)
  assert cfg.mask_false_negatives and cfg.mask_same_id
  assert train.false_negative_mask_definition == losses.FALSE_NEGATIVE_MASK_DEFINITION
  train.false_negative_mask_definition = "merged_questions"
  with pytest.raises(losses.LossConfigError, match="implements 'per_question' only"):
    losses.LossConfig.from_train_config(train)
