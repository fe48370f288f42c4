"""Orbax managers, best-by-validation, resume policy, params-only loading, workdir checks, SIGTERM."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import checkpointing
from hybrid_jax.data import synthetic
from hybrid_jax.models import encoder as encoder_lib
from hybrid_jax.models import hf_checkpoint

ENCODER = encoder_lib.EncoderConfig(
    model_type="bert", vocab_size=427, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=32, type_vocab_size=2, pad_token_id=0,
    layer_norm_eps=1e-12)


def _params(seed):
  return {"encoder": encoder_lib.init_params(ENCODER, jax.random.key(seed))}


def _opt_state(params):
  return {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.int32(3)}


def _run_dir(tmp_path):
  workdir = str(tmp_path / "run")
  import ml_collections  # pylint: disable=g-import-not-at-top
  tokenizer = synthetic.build_tokenizer(synthetic.SyntheticSpec())
  checkpointing.write_run_files(workdir, ml_collections.ConfigDict({"seed": 0}), ENCODER, tokenizer)
  return workdir


def test_keep_n_best_by_validation_and_restore(tmp_path):
  workdir = _run_dir(tmp_path)
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=2)
  for step, val in ((10, 2.0), (20, 1.0), (30, 1.5)):
    params = _params(step)
    assert not ckpt.save(step + 1, params, _opt_state(params))  # not a checkpoint step
    assert ckpt.save(step, params, _opt_state(params))
    ckpt.save_best(step, params, val)
  ckpt.wait()
  assert checkpointing.available_steps(workdir) == {"checkpoints": [20, 30], "best": [20]}
  assert ckpt.best_validation_loss() == pytest.approx(1.0)
  assert not ckpt.save_best(40, _params(40), 1.2)  # worse than the best: not saved
  params, opt_state = ckpt.restore(30, jax.eval_shape(lambda: _params(0)),
                                   jax.eval_shape(lambda: _opt_state(_params(0))))
  expected = _params(30)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(opt_state["count"]) == 3
  ckpt.discard_best_after(15)  # resuming at step 15: the best at 20 is from a lost future
  ckpt.wait()
  assert checkpointing.available_steps(workdir)["best"] == []
  ckpt.close()

  loaded = checkpointing.load_params(workdir, "last")
  assert loaded.step == 30 and loaded.config == ENCODER
  np.testing.assert_array_equal(
      loaded.params["embeddings"]["word_embeddings"]["embedding"],
      np.asarray(expected["encoder"]["embeddings"]["word_embeddings"]["embedding"]))
  assert loaded.tokenizer.vocab_size == 427
  assert checkpointing.load_params(workdir, "20").step == 20
  with pytest.warns(checkpointing.NoBestCheckpointWarning, match="LAST checkpoint, step 30"):
    loaded = checkpointing.load_params(workdir, "best")  # no best: the last, and it says so
  assert (loaded.step, loaded.source) == (30, "last")
  with pytest.raises(checkpointing.CheckpointConfigError, match="expected 'best', 'last'"):
    checkpointing.load_params(workdir, "latest")


def test_load_params_errors_name_the_problem(tmp_path):
  with pytest.raises(checkpointing.CheckpointConfigError, match="not a hybrid_jax training"):
    checkpointing.load_params(str(tmp_path))
  workdir = _run_dir(tmp_path)
  with pytest.raises(checkpointing.CheckpointConfigError, match="no checkpoints in"):
    checkpointing.load_params(workdir, "best")


def test_resume_order_workdir_then_init_from_then_random(tmp_path):
  workdir = _run_dir(tmp_path)
  assert checkpointing.resolve_init(workdir).kind == "random"
  hf_dir = str(tmp_path / "hf")
  hf_checkpoint.save_pretrained(hf_dir, ENCODER, _params(0)["encoder"])
  source = checkpointing.resolve_init(workdir, hf_dir)
  assert (source.kind, source.path) == ("init_from", hf_dir)
  with pytest.raises(checkpointing.CheckpointConfigError, match="does not exist"):
    checkpointing.resolve_init(workdir, str(tmp_path / "missing"))
  ckpt = checkpointing.Checkpointer(workdir, every_steps=5, keep=1)
  ckpt.save(5, _params(0), _opt_state(_params(0)))
  ckpt.wait()
  ckpt.close()
  source = checkpointing.resolve_init(workdir, hf_dir)  # a checkpoint beats init_from
  assert (source.kind, source.step) == ("resume", 5)


def test_workdir_must_be_shared_with_several_processes():
  checkpointing.validate_workdir("/tmp/run", process_count=1)
  checkpointing.validate_workdir("gs://bucket/run", process_count=4)
  checkpointing.validate_workdir("/nfs/run", process_count=4, shared_filesystem=True)
  with pytest.raises(checkpointing.CheckpointConfigError, match="4 processes.*gs://"):
    checkpointing.validate_workdir("/tmp/run", process_count=4)


def test_preemption_guard_turns_sigterm_into_a_request():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) == previous
