"""The optimizer the train step uses, against hand computations: the weight-decay mask, the
warmup/decay schedule, global-norm clipping and AdamW over two steps (NumPy, from the update rules),
and the learnable temperature's clip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import losses
from hybrid_jax import train_step
from hybrid_jax.models import encoder as encoder_lib
from hybrid_jax.models import presets

SETTINGS = train_step.OptimizerSettings(
    learning_rate=1e-2, warmup_steps=4, num_steps=10, weight_decay=0.1, adam_b1=0.9,
    adam_b2=0.999, adam_eps=1e-8, grad_clip_norm=1.0)


def _tiny_encoder_params():
  values = dict(presets.model_config("tiny"))
  values.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50, dtype="float32")
  config = encoder_lib.EncoderConfig.from_model_config(values)
  return jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))


def test_weight_decay_mask_is_matrices_and_embeddings_only():
  params = {"encoder": _tiny_encoder_params(), "log_scale": jnp.zeros(())}
  mask = jax.tree_util.tree_map_with_path(train_step.weight_decay_mask, params)
  decayed = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  kept = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if not m}
  assert all(name.endswith("['kernel']") or name.endswith("['embedding']") for name in decayed)
  assert any("word_embeddings" in n for n in decayed) and any("query" in n for n in decayed)
  assert all(name.endswith("['bias']") or name.endswith("['scale']") or name == "['log_scale']"
             for name in kept), kept
  assert any("LayerNorm" in n for n in kept) and "['log_scale']" in kept
  # Every rank-2 leaf is decayed, no rank-0/1 leaf is.
  for (path, leaf), (_, m) in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves_with_path(mask)):
    assert m == (leaf.ndim == 2), jax.tree_util.keystr(path)


def test_schedule_warms_up_linearly_then_decays_linearly_to_zero():
  _, schedule = train_step.make_optimizer(SETTINGS)
  lr, warmup, total = SETTINGS.learning_rate, SETTINGS.warmup_steps, SETTINGS.num_steps
  expected = [lr * t / warmup if t < warmup else lr * (total - t) / (total - warmup)
              for t in range(total + 1)]
  np.testing.assert_allclose([float(schedule(t)) for t in range(total + 1)], expected,
                             rtol=1e-6, atol=1e-12)
  assert float(schedule(0)) == 0.0 and float(schedule(total)) == 0.0


def _hand_adamw(params, grads_per_step, s: train_step.OptimizerSettings, decay_mask):
  """AdamW as optax applies it (update = -lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p), lr_t
  from the step count before the update) after global-norm clipping, in NumPy."""
  _, schedule = train_step.make_optimizer(s)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_per_step, start=1):
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
    factor = min(1.0, s.grad_clip_norm / norm)
    lr = float(schedule(t - 1))
    for k in p:
      g = np.asarray(grads[k], np.float64) * factor
      m[k] = s.adam_b1 * m[k] + (1 - s.adam_b1) * g
      v2[k] = s.adam_b2 * v2[k] + (1 - s.adam_b2) * g * g
      m_hat, v_hat = m[k] / (1 - s.adam_b1 ** t), v2[k] / (1 - s.adam_b2 ** t)
      update = m_hat / (np.sqrt(v_hat) + s.adam_eps) + (s.weight_decay * p[k] if decay_mask[k]
                                                        else 0.0)
      p[k] = p[k] - lr * update
  return p


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clipped", "no_clip"])
def test_three_steps_match_hand_adamw_with_clipping_and_decay(clip):
  settings = train_step.OptimizerSettings(**{**SETTINGS.__dict__, "grad_clip_norm": clip})
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
            "bias": rng.normal(size=(2,)).astype(np.float32),
            "log_scale": np.float32(2.0)}
  # Gradient norms 30, 0.2, 5: clipping rescales steps 1 and 3 only, which changes Adam's
  # moment ratios in steps 2 and 3 (a single step would hide it: Adam's first update is ~sign(g)).
  grads_per_step = []
  for norm in (30.0, 0.2, 5.0):
    g = {k: rng.normal(size=np.shape(v)).astype(np.float32) for k, v in params.items()}
    total = np.sqrt(sum(np.sum(np.square(x)) for x in g.values()))
    grads_per_step.append({k: (x * norm / total).astype(np.float32) for k, x in g.items()})
  tx, _ = train_step.make_optimizer(settings)
  if not clip:
    assert len(tx.init(params)) == 1  # no clipping transform in the chain
  state = tx.init(params)
  ours = params
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)
  mask = {"kernel": True, "bias": False, "log_scale": False}
  # grad_clip_norm 0 means off; the hand version expresses "off" as an infinite norm bound.
  hand_settings = train_step.OptimizerSettings(
      **{**settings.__dict__, "grad_clip_norm": clip if clip else np.inf})
  expected = _hand_adamw(params, grads_per_step, hand_settings, mask)
  for k in params:
    np.testing.assert_allclose(np.asarray(ours[k]), expected[k], rtol=1e-5, atol=1e-7, err_msg=k)
  # Decay shows: with zero gradients only the decayed leaf moves, by -lr * wd * p.
  # (After the warmup steps: step 0's learning rate is 0.)
  zero = jax.tree.map(np.zeros_like, params)
  state = tx.init(params)
  for _ in range(SETTINGS.warmup_steps):
    _, state = tx.update(zero, state, params)
  updates, _ = tx.update(zero, state, params)
  np.testing.assert_allclose(np.asarray(updates["kernel"]),
                             -SETTINGS.learning_rate * SETTINGS.weight_decay * params["kernel"],
                             rtol=1e-5)
  assert not np.any(np.asarray(updates["bias"])) and float(updates["log_scale"]) == 0.0


def test_learnable_temperature_is_clipped_at_max_scale():
  config = losses.LossConfig(learnable_temperature=True, temperature=0.05)
  start = config.initial_params()["log_scale"]
  assert float(losses.scale_of({"log_scale": start}, config)) == pytest.approx(20.0, rel=1e-6)
  for log_scale, scale, slope in ((np.log(50.0), 50.0, 50.0), (np.log(400.0), 100.0, 0.0)):
    value, grad = jax.value_and_grad(
        lambda s: losses.scale_of({"log_scale": s}, config))(jnp.float32(log_scale))
    assert float(value) == pytest.approx(scale, rel=1e-5)
    assert float(grad) == pytest.approx(slope, rel=1e-5, abs=1e-6)  # no gradient past the clip
  assert losses.MAX_SCALE == 100.0
  fixed = losses.LossConfig(temperature=0.05)
  assert fixed.initial_params() == {}
  assert float(losses.scale_of({}, fixed)) == pytest.approx(20.0)
