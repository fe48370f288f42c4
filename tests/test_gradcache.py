"""GradCache as training runs it, against plain autodiff with the same dropout masks.

What is verified against what:
  `losses.value_and_grad` with `LossConfig(chunk_size=4)` (GradCache: forward every chunk, loss
  gradient with respect to the embeddings, re-encode every chunk under a VJP) is run exactly as
  the trainer's step runs it: the real Flax encoder (models/encoder.py) with hidden and attention
  dropout 0.1, the trainer's (threefry) dropout key folded with the step, a data(2) x fsdp(4) mesh with
  FSDP-sharded parameters and a `host_to_global` batch, under `jax.jit` with sharded outputs.
  The reference, written here independently of losses.py's chunking helpers, encodes each chunk
  (strided rows k, k + B/C, ...) in a plain forward pass with the key GradCache gives it,
  fold_in(fold_in(step_key, tower), chunk), scatters the embeddings back to their rows, applies
  the InfoNCE loss on embeddings and differentiates everything with `jax.grad`. The loss and every
  gradient leaf must agree to 1e-5, absolutely and relative to the leaf's size (measured: ~2e-6
  absolute, ~1e-6 relative). That only holds if GradCache's re-encoding pass draws the same
  dropout masks as its first pass; the second test shows that a reference with other masks per
  chunk (chunk index not folded in), or with other masks in the re-encoding only, is off by ~2,
  far outside the tolerance, so the comparison is not vacuous. (Checked by hand as well: a copy of
  losses.py whose re-encoding folds an extra 1 into the chunk key fails the first test by 1.6.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import losses
from hybrid_jax import sharding
from hybrid_jax import train_step
from hybrid_jax.models import encoder as encoder_lib
import train_helpers

# One layer, hidden 32, dropout on as in training (the presets' 0.1 for both rates): every chunk
# re-encodes the whole encoder with its key, so more layers would add compile time, not checks.
ENCODER = encoder_lib.EncoderConfig(
    model_type="bert", vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=32, type_vocab_size=2, pad_token_id=0,
    layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
BATCH, CHUNK, SEQ = 16, 4, 16
NUM_CHUNKS = BATCH // CHUNK
SEED, STEP = 7, 3
TOWERS = (("query", 0), ("passage", 1), ("negative", 2))  # tower index = losses' fold_in value
# All three towers and a trainable log_scale, so every kind of gradient leaf is compared; the
# false-negative mask on (host_batch has hard negatives that are other rows' positives).
LOSS = losses.LossConfig(chunk_size=CHUNK, hard_negatives=True, symmetric=True,
                         learnable_temperature=True, mask_false_negatives=True)
TOLERANCE = 1e-5


ENCODE = train_step.make_encode_fn(ENCODER)  # the trainer's own encode fn


def host_batch(seed=0):
  """Padded token ids of every tower; questions repeat in pairs so the same-id mask matters."""
  return train_helpers.random_token_batch(seed, BATCH, {name: SEQ for name, _ in TOWERS},
                                          ENCODER.vocab_size, min_length=4, num_batch_types=3)


def chunk_rows(chunk):
  """Rows of chunk `chunk`: strided, as the module docstring of losses.py specifies."""
  return np.arange(chunk, BATCH, NUM_CHUNKS)


def encode_in_chunks(params, batch, keys):
  """Embeddings [B, D] of each tower, chunk by chunk; keys[tower, chunk] is the dropout key.

  A Python loop of plain forward calls (no lax.map / scan), assembled row by row.
  """
  embeddings = {}
  for name, tower in TOWERS:
    out = jnp.zeros((BATCH, ENCODER.hidden_size), jnp.float32)
    for chunk in range(NUM_CHUNKS):
      rows = chunk_rows(chunk)
      emb = ENCODE(params["encoder"], batch[f"{name}_input_ids"][rows],
                   batch[f"{name}_attention_mask"][rows], keys[tower, chunk])
      out = out.at[rows].set(emb)
    embeddings[name] = out
  return embeddings


def encode_in_chunks_scanned(params, batch, keys):
  """The same embeddings with one lax.map per tower: a single encoder to compile per tower, for
  the (slower to compile) non-vacuity check below, which need not be independent of losses.py."""
  embeddings = {}
  for name, tower in TOWERS:
    rows = np.stack([chunk_rows(chunk) for chunk in range(NUM_CHUNKS)])  # [chunks, C]
    xs = (batch[f"{name}_input_ids"][rows], batch[f"{name}_attention_mask"][rows], keys[tower])
    emb = jax.lax.map(lambda x: ENCODE(params["encoder"], *x), xs)  # [chunks, C, D]
    embeddings[name] = jnp.zeros((BATCH, emb.shape[-1]), emb.dtype).at[rows].set(emb)
  return embeddings


def infonce(params, embeddings, batch):
  return losses.embedding_loss(embeddings["query"], embeddings["passage"], embeddings["negative"],
                               batch["question_id"], batch["batch_type"],
                               losses.scale_of(params, LOSS), LOSS,
                               passage_id=batch["passage_id"],
                               negative_passage_id=batch["negative_passage_id"],
                               relevant_passage_ids=batch["relevant_passage_ids"])[0]


def gradcache_keys(step_key):
  """[towers, chunks] keys as GradCache derives them: the tower index folded into the step key,
  then the chunk index."""
  return jnp.stack([jnp.stack([jax.random.fold_in(jax.random.fold_in(step_key, tower), chunk)
                               for chunk in range(NUM_CHUNKS)]) for _, tower in TOWERS])


def unfolded_keys(step_key):
  """A plausible bug: every chunk of a tower shares the tower key (so the same mask pattern)."""
  return jnp.stack([jnp.stack([jax.random.fold_in(step_key, tower)] * NUM_CHUNKS)
                    for _, tower in TOWERS])


def reference_loss_and_grads(params, batch, keys):
  """jax.value_and_grad of the InfoNCE loss on the chunk-by-chunk embeddings."""
  return jax.value_and_grad(lambda p: infonce(p, encode_in_chunks(p, batch, keys), batch))(params)


def mismatched_reencoding(params, batch, keys, reencoding_keys):
  """What GradCache computes if its re-encoding drew other masks than its first pass: embedding
  gradients cached at the masks of `keys`, pulled back through the masks of `reencoding_keys`."""
  embeddings = encode_in_chunks_scanned(params, batch, keys)
  loss, (embedding_grads, loss_param_grads) = jax.value_and_grad(
      lambda e, p: infonce(p, e, batch), argnums=(0, 1))(embeddings, params)
  _, pullback = jax.vjp(lambda p: encode_in_chunks_scanned(p, batch, reencoding_keys), params)
  (encoder_grads,) = pullback(embedding_grads)
  return loss, dict(loss_param_grads, encoder=encoder_grads["encoder"])


@pytest.fixture(scope="module")
def sharded_setup():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  replicated = sharding.replicated(mesh)
  params = {"encoder": encoder_lib.init_params(ENCODER, jax.random.key(1)),
            **LOSS.initial_params()}
  shapes = jax.eval_shape(lambda: params)
  param_shardings = {
      "encoder": sharding.param_shardings(mesh, encoder_lib.logical_axes(ENCODER),
                                          shapes["encoder"]),
      **{k: replicated for k in params if k != "encoder"}}
  params = jax.device_put(params, param_shardings)
  batch = sharding.host_to_global(host_batch(), mesh)
  step = jax.device_put(jnp.asarray(STEP, jnp.int32), replicated)
  # The trainer's dropout key: threefry, a closure constant of the step, folded with the step.
  dropout_key = jax.random.key(SEED, impl="threefry2x32")
  step_key = jax.jit(lambda s: jax.random.fold_in(dropout_key, s))(step)
  assert "threefry" in str(jax.random.key_impl(step_key))  # fold_in keeps the generator

  def gradcache_step(p, b, s):
    (loss, _aux), grads = losses.value_and_grad(ENCODE, p, b, jax.random.fold_in(dropout_key, s),
                                                LOSS)
    return loss, grads

  # Jitted as the trainer jits its step: sharded inputs, replicated loss, FSDP-sharded grads.
  jit = lambda fn: jax.jit(fn, out_shardings=(replicated, param_shardings))
  reference = jit(reference_loss_and_grads)  # compiled once, run with several key sets
  # GradCache is compiled by the test that uses it: pytest-xdist may run the two tests of this
  # file on two workers, each building this fixture.
  return {"params": params, "batch": batch, "param_shardings": param_shardings, "step": step,
          "jit": jit, "reference": reference, "step_key": step_key,
          "gradcache_step": jit(gradcache_step),
          "reference_result": jax.device_get(
              reference(params, batch, gradcache_keys(step_key)))}


def leaf_diffs(reference, other):
  """{leaf path: (max |reference - other|, max |reference|)} over the gradient trees."""
  assert jax.tree.structure(reference) == jax.tree.structure(other)
  return {jax.tree_util.keystr(path): (float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                       float(np.abs(np.asarray(a)).max()))
          for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                                  jax.tree.leaves(other))}


def max_leaf_diff(reference, other):
  return max(diff for diff, _ in leaf_diffs(reference, other).values())


def test_gradcache_with_dropout_equals_autodiff_of_same_chunk_masks(sharded_setup):
  s = sharded_setup
  loss, grads = s["gradcache_step"](s["params"], s["batch"], s["step"])
  # Gradients come back in the parameters' FSDP layout, as the optimizer update needs them.
  path = ("encoder", "encoder", "layer_0", "intermediate", "dense", "kernel")
  leaf, expected = grads, sharded_setup["param_shardings"]
  for key in path:
    leaf, expected = leaf[key], expected[key]
  assert leaf.sharding == expected and expected.spec == jax.sharding.PartitionSpec("fsdp", None)
  loss, grads = jax.device_get((loss, grads))
  ref_loss, ref_grads = sharded_setup["reference_result"]
  loss_diff = abs(float(loss) - float(ref_loss))
  diffs = leaf_diffs(ref_grads, grads)
  # The attention key biases get a zero gradient in exact arithmetic (softmax is shift invariant:
  # ~1e-11 here), so only the absolute bound applies to them; every other leaf must carry signal
  # and agree RELATIVELY too, as the query/key kernels' gradients are only ~1e-4 at init.
  zero_in_theory = [name for name, (_, size) in diffs.items() if size <= 1e-8]
  assert zero_in_theory and all(name.endswith("['key']['bias']") for name in zero_in_theory)
  relative = {name: diff / size for name, (diff, size) in diffs.items()
              if name not in zero_in_theory}
  grad_diff = max(diff for diff, _ in diffs.values())
  print(f"gradcache vs reference: |loss diff| {loss_diff:.2e}, max grad leaf diff {grad_diff:.2e}, "
        f"max relative leaf diff {max(relative.values()):.2e}")
  assert loss_diff <= TOLERANCE, (loss, ref_loss)
  assert grad_diff <= TOLERANCE, grad_diff
  assert max(relative.values()) <= TOLERANCE, max(relative.items(), key=lambda kv: kv[1])
  assert "['log_scale']" in relative


def test_other_dropout_masks_are_far_outside_the_tolerance(sharded_setup):
  """The comparison above would catch wrong chunk keys or a re-encoding with other masks."""
  s = sharded_setup
  params, batch, step_key = s["params"], s["batch"], s["step_key"]
  ref_loss, ref_grads = s["reference_result"]
  keys = gradcache_keys(step_key)
  unfolded = jax.device_get(s["reference"](params, batch, unfolded_keys(step_key)))
  # Re-encoding keys: the chunk index folded in a second time.
  other = jax.vmap(jax.vmap(jax.random.fold_in))(keys, jnp.broadcast_to(jnp.arange(NUM_CHUNKS),
                                                                         keys.shape))
  cached_then_reencoded = s["jit"](mismatched_reencoding)
  mismatched = jax.device_get(cached_then_reencoded(params, batch, keys, other))
  consistent = jax.device_get(cached_then_reencoded(params, batch, keys, keys))
  diffs = {"chunk index not folded": max_leaf_diff(ref_grads, unfolded[1]),
           "re-encoding with other masks": max_leaf_diff(ref_grads, mismatched[1])}
  print("max grad leaf diff to the reference:", {k: f"{v:.2e}" for k, v in diffs.items()})
  # Other masks per chunk: dropout is really on and the keys matter, for the loss too.
  assert abs(float(unfolded[0]) - float(ref_loss)) > 100 * TOLERANCE
  for what, diff in diffs.items():
    assert diff > 100 * TOLERANCE, (what, diff)
  # The same construction with the first pass's keys is the reference again: the loss is equal
  # in both cases (same first-pass masks) and only the mismatched re-encoding moves the gradients.
  assert abs(float(mismatched[0]) - float(ref_loss)) <= TOLERANCE
  assert abs(float(consistent[0]) - float(ref_loss)) <= TOLERANCE
  assert max_leaf_diff(ref_grads, consistent[1]) <= TOLERANCE
