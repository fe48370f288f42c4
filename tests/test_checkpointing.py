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


# --- verification of what is restored -------------------------------------------------------------
def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _corrupt(step_dir, how):
  """What a node dying during a copy, a full disk or a bad sector leaves in a checkpoint."""
  if how == "truncate":  # every file cut in half
    for d, _, files in os.walk(step_dir):
      for name in files:
        path = os.path.join(d, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  elif how == "delete_file":
    os.remove(os.path.join(step_dir, "params", "_METADATA"))
  elif how == "garbage":  # a file overwritten with random bytes of its length
    path = _largest_file(os.path.join(step_dir, "params"))
    with open(path, "wb") as f:
      f.write(np.random.default_rng(0).integers(0, 256, os.path.getsize(path), np.uint8).tobytes())
  elif how == "bit_flip":  # one bit of the array data: Orbax itself restores it without a word
    path = _largest_file(os.path.join(step_dir, "params"))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x04
    open(path, "wb").write(bytes(data))
  else:
    raise ValueError(how)


def _saved_run(tmp_path, steps=(10, 20, 30)):
  workdir = _run_dir(tmp_path)
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=5)
  for step in steps:
    ckpt.save(step, _params(step), _opt_state(_params(step)))
  ckpt.save_best(20, _params(20), 1.0)
  ckpt.wait()
  ckpt.close()
  return workdir


def _abstract():
  return (jax.eval_shape(lambda: _params(0)), jax.eval_shape(lambda: _opt_state(_params(0))))


def _assert_params(params, step):
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_params(step))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("how", ["truncate", "delete_file", "garbage", "bit_flip"])
def test_corrupt_newest_checkpoint_is_moved_aside_and_the_newest_readable_used(tmp_path, capfd,
                                                                              how):
  workdir = _saved_run(tmp_path)
  _corrupt(os.path.join(workdir, "checkpoints", "30"), how)
  init = checkpointing.resolve_init(workdir)
  assert (init.kind, init.step) == ("resume", 30)
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=5)
  step, params, opt_state = ckpt.restore_verified(init, *_abstract())
  assert step == 20
  _assert_params(params, 20)
  assert int(opt_state["count"]) == 3
  warnings_ = [l for l in capfd.readouterr().err.splitlines() if l.startswith("WARNING")]
  assert len(warnings_) == 1 and "checkpoints/30 is unreadable" in warnings_[0], warnings_
  aside = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if ".corrupt-" in n]
  assert len(aside) == 1 and aside[0].startswith("30.corrupt-") and os.path.isdir(
      os.path.join(workdir, "checkpoints", aside[0]))  # kept, not deleted
  assert ckpt.latest_step() == 20  # Orbax no longer lists it: step 30 is saved anew
  assert ckpt.save(30, _params(31), _opt_state(_params(31)))
  ckpt.wait()
  ckpt.close()
  assert checkpointing.available_steps(workdir)["checkpoints"] == [10, 20, 30]


def test_no_readable_checkpoint_lists_what_was_tried(tmp_path):
  workdir = _saved_run(tmp_path, steps=(10, 20))
  for step, how in ((10, "bit_flip"), (20, "truncate")):
    _corrupt(os.path.join(workdir, "checkpoints", str(step)), how)
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=5)
  with pytest.raises(checkpointing.CheckpointConfigError,
                     match=r"no readable checkpoint in .*checkpoints; tried 2, newest first: "
                           r"step 20: .*cannot be read back.*step 10: .*differ from their saved "
                           r"checksums.*new --workdir"):
    ckpt.restore_verified(checkpointing.resolve_init(workdir), *_abstract())
  ckpt.close()
  assert sorted(n.split(".")[0] for n in os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "10", "20"]  # both moved aside, neither deleted


def test_restore_step_picks_one_and_sets_newer_ones_aside(tmp_path, capfd):
  workdir = _saved_run(tmp_path)
  with pytest.raises(checkpointing.CheckpointConfigError, match=r"restore_step=15: .*available "
                     r"steps: \[10, 20, 30\]"):
    checkpointing.resolve_init(workdir, restore_step=15)
  init = checkpointing.resolve_init(workdir, restore_step=10)
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=5)
  step, params, _ = ckpt.restore_verified(init, *_abstract())
  assert step == 10
  _assert_params(params, 10)
  assert "rewinds the run: the newer checkpoints [20, 30]" in capfd.readouterr().err
  assert ckpt.latest_step() == 10 and ckpt.best_manager.all_steps() == []  # best 20: lost future
  ckpt.close()
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert sorted(n for n in names if ".superseded-" in n)[0].startswith("20.superseded-")
  _corrupt(os.path.join(workdir, "checkpoints", "10"), "garbage")
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=5)
  with pytest.raises(checkpointing.CorruptCheckpointError, match=r"restore_step=10: .*pick another"):
    ckpt.restore_verified(checkpointing.resolve_init(workdir, restore_step=10), *_abstract())
  ckpt.close()


def test_corrupt_best_falls_back_to_last_for_evaluation_and_is_replaced_on_resume(tmp_path,
                                                                                 capfd):
  workdir = _saved_run(tmp_path)
  _corrupt(os.path.join(workdir, "best", "20"), "bit_flip")
  with pytest.warns(checkpointing.NoBestCheckpointWarning, match="best checkpoint is unreadable"):
    loaded = checkpointing.load_params(workdir, "best")  # evaluate --step=best
  assert (loaded.step, loaded.source) == (30, "last")
  np.testing.assert_array_equal(
      loaded.params["embeddings"]["word_embeddings"]["embedding"],
      np.asarray(_params(30)["encoder"]["embeddings"]["word_embeddings"]["embedding"]))
  assert "best/20 is unreadable and is moved to" in capfd.readouterr().err
  assert [n.split(".")[0] for n in os.listdir(os.path.join(workdir, "best"))] == ["20"]
  assert checkpointing.available_steps(workdir)["best"] == []
  # A step asked for by number is that step or an error, never another one.
  _corrupt(os.path.join(workdir, "checkpoints", "20"), "delete_file")
  with pytest.raises(checkpointing.CorruptCheckpointError, match=r"step=20: .*pick another"):
    checkpointing.load_params(workdir, "20")
  assert checkpointing.load_params(workdir, "last").step == 30


def test_resume_sets_a_corrupt_best_aside_and_saves_a_new_one(tmp_path, capfd):
  workdir = _saved_run(tmp_path)
  _corrupt(os.path.join(workdir, "best", "20"), "truncate")
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=5)
  step, _, _ = ckpt.restore_verified(checkpointing.resolve_init(workdir), *_abstract())
  assert step == 30
  assert "best checkpoint" in capfd.readouterr().err
  assert ckpt.best_validation_loss() is None  # the next validation saves a best
  assert ckpt.save_best(40, _params(40), 5.0)
  ckpt.wait()
  ckpt.close()
  assert checkpointing.available_steps(workdir)["best"] == [40]


def test_replicated_arrays_restore_across_orbax_replica_parallel_settings(tmp_path):
  """On CPU the Checkpointer writes each replicated array from its first replica (Orbax's
  replica-parallel default costs a compiled slice per shape there); checkpoints written either way,
  e.g. before that choice, restore to the same arrays under the other."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                          jax.sharding.PartitionSpec())
  params = jax.device_put(_params(0), replicated)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          (params, _opt_state(params)))
  workdir = _run_dir(tmp_path)
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=2, async_save=False)
  assert not ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel  # noqa: SLF001
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=True), override=True)
    ckpt.save(10, params, _opt_state(params))  # replica-parallel: each replica writes a slice
  finally:
    ckpt.close()
  ckpt = checkpointing.Checkpointer(workdir, every_steps=10, keep=2, async_save=False)
  ckpt.save(20, params, _opt_state(params))  # one replica per array
  for step in (10, 20):
    restored, _ = ckpt.restore(step, *abstract)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.close()


def test_checksums_do_not_depend_on_sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
  x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6) * 0.37
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  tree = {"x": x, "count": jnp.int32(3), "half": x.astype(jnp.bfloat16)}
  assert checkpointing.tree_checksums(tree) == checkpointing.tree_checksums(
      {**tree, "x": sharded})
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # same words, other places
  assert checkpointing.tree_checksums({"x": swapped}) != checkpointing.tree_checksums({"x": x})


def test_training_resumes_past_corrupt_checkpoints_exactly(tmp_path, capfd):
  """The issue's case in a real run: the newest checkpoints are damaged (60 cut short, 40 with
  one flipped bit that Orbax restores silently); the same command resumes from 20 with a warning
  per checkpoint and ends with the uninterrupted run's parameters, metrics and evaluation."""
  import json  # pylint: disable=g-import-not-at-top
  from hybrid_jax import trainer  # pylint: disable=g-import-not-at-top
  from hybrid_jax import train_metrics  # pylint: disable=g-import-not-at-top
  from train_helpers import runlocal_config  # pylint: disable=g-import-not-at-top

  def config():
    return runlocal_config("hybrid", **{
        "train.num_steps": 60, "train.warmup_steps": 6, "train.log_every_steps": 20,
        "train.eval_every_steps": 20, "train.checkpoint_every_steps": 20})

  def metrics(workdir):
    timing = ("steps_per_second", "examples_per_second", "tflops_per_device")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in open(os.path.join(workdir, train_metrics.METRICS_FILE))]

  workdir = str(tmp_path / "run")
  first = trainer.train_and_evaluate(config(), workdir)
  expected = (checkpointing.load_params(workdir, "last").params, metrics(workdir),
              first["evals"]["synthetic"]["summary"])
  _corrupt(os.path.join(workdir, "checkpoints", "60"), "truncate")
  _corrupt(os.path.join(workdir, "checkpoints", "40"), "bit_flip")
  capfd.readouterr()
  resumed = trainer.train_and_evaluate(config(), workdir)
  err = capfd.readouterr().err
  assert [l for l in err.splitlines() if l.startswith("WARNING: checkpoint")] == [
      l for l in err.splitlines() if "is unreadable and is moved to" in l] and err.count(
          "is unreadable and is moved to") == 2, err[-3000:]
  assert "resuming from checkpoint step 20" in err
  assert resumed["step"] == 60 and not resumed["preempted"]
  assert sorted(n.split(".")[0] for n in os.listdir(os.path.join(workdir, "checkpoints"))
                if ".corrupt-" in n) == ["40", "60"]
  params = checkpointing.load_params(workdir, "last").params
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected[0])):
    np.testing.assert_array_equal(a, b)
  assert metrics(workdir) == expected[1]
  assert resumed["evals"]["synthetic"]["summary"] == expected[2]
