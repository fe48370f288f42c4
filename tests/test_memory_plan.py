"""The memory plan: its estimate against XLA's memory analysis of the compiled step, the plans of
the real configs, and the --dry_run / plan_memory command lines (which compile nothing)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from hybrid_jax import memory_plan
from hybrid_jax import sharding
from hybrid_jax import train_step
from hybrid_jax import trainer
from train_helpers import REPO, random_token_batch, runlocal_config

TOLERANCE = 0.15
SMALL_ENCODER = {"model.hidden_size": 64, "model.num_hidden_layers": 2,
                 "model.intermediate_size": 128, "model.num_attention_heads": 4,
                 "model.vocab_size": 512}


def _config_file(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("devices,batch_size,lengths,chunk", [
    (1, 32, (32, 32), 0),  # one encoder call of 64 rows
    (8, 64, (16, 32), 0),  # two calls (different lengths), 8 rows per device
    (1, 32, (32, 32), 8),  # GradCache, chunks of 8 rows
], ids=["1dev-plain", "8dev-plain", "1dev-gradcache"])
def test_estimate_agrees_with_xla_memory_analysis(devices, batch_size, lengths, chunk):
  config = runlocal_config("hybrid", **SMALL_ENCODER, **{
      "train.batch_size": batch_size, "train.gradcache_chunk_size": chunk,
      "data.query_max_length": lengths[0], "data.passage_max_length": lengths[1],
      "data.packing": False})  # the plan counts padded towers
  plan = memory_plan.plan(config, memory_plan.Target("cpu", devices, 1, 0, "cpu"))
  estimate = plan.total()

  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  loss_cfg = trainer.loss_config(config)
  fns = train_step.step_functions(plan.encoder_config, loss_cfg,
                                  train_step.OptimizerSettings.from_train_config(config.train),
                                  0, mesh)
  batch = random_token_batch(0, batch_size, {"query": lengths[0], "passage": lengths[1]},
                             512, 2, 3)
  xla = memory_plan.compiled_step_bytes(
      fns, {k: batch[k] for k in loss_cfg.required_features()}, mesh)
  print(f"{devices} device(s), batch {batch_size}, lengths {lengths}, chunk {chunk}: estimate "
        f"{estimate / 2**20:.2f} MiB, XLA {xla / 2**20:.2f} MiB ({estimate / xla - 1:+.1%})")
  assert abs(estimate / xla - 1) <= TOLERANCE, (estimate, xla)
  # The dropout bits of the rows each device encodes, on any mesh (tests/test_dropout_sharding.py),
  # and within the tolerance above: not the global batch's, 8 x as many on 8 devices.
  rows = (chunk or batch_size) // devices
  calls = {max(lengths): rows} if chunk else {n: rows * lengths.count(n) for n in set(lengths)}
  assert plan.config_variant.dropout_bits == 4 * sum(
      memory_plan.dropout_mask_elements(plan.encoder_config, r, n) for n, r in calls.items()) > 0


def test_plans_of_the_real_configs_for_8_gpus_and_a_v4_32():
  gpus, tpu = memory_plan.TARGETS["8x80gb"], memory_plan.TARGETS["v4-32"]
  base = _config_file("xlmr_hybrid.py", "batch_size=128")
  large = _config_file("xlmr_hybrid.py", "batch_size=128,backbone=xlmr-large")
  labse = _config_file("labse_hybrid.py", "batch_size=128")
  plans = {(name, target.name): memory_plan.plan(config, target)
           for name, config in (("base", base), ("large", large), ("labse", labse))
           for target in (gpus, tpu)}
  for (name, _), plan in plans.items():
    print(plan.report())
    params = {"base": 277.5e6, "large": 558.8e6, "labse": 470.9e6}[name]
    assert abs(plan.num_parameters - params) < 0.1e6
    assert plan.encoder_config.dtype == "bfloat16"
    # 4 bytes of parameters, 8 of AdamW moments, 4 of gradients per parameter (replicated).
    assert plan.parameters == pytest.approx(4 * params, rel=1e-3)
    assert plan.optimizer_state == 2 * plan.parameters
    totals = {v.name: plan.total(v) for v in plan.variants}
    assert totals["plain loss, remat"] < totals["plain loss, no remat"]
    gradcache = min(t for n, t in totals.items() if n.startswith("GradCache"))
    if name == "labse" and plan.target == tpu:
      # LaBSE on the v4-32 (8 rows per device): GradCache's gradient sum of its 471M parameters
      # (1.75 GiB) outweighs the activations it saves: 8.83 vs 8.78 GiB.
      assert totals["plain loss, no remat"] < gradcache < 1.01 * totals["plain loss, no remat"]
    else:
      assert gradcache < totals["plain loss, no remat"]
    assert max(totals.values()) < plan.target.device_memory_bytes  # all fit at batch 128
  v4 = plans[("large", tpu.name)]
  assert (v4.batch.per_host, v4.batch.per_device, v4.batch.num_hosts) == (32, 8, 4)
  gpu = plans[("large", gpus.name)]
  assert (gpu.batch.per_host, gpu.batch.per_device) == (128, 16)
  # XLM-R large, plain, v4-32: about 13.3 GiB of the 32 (41%), of which 0.52 GiB dropout bits
  # (its 8 rows' per device; 7.8 GiB when each device generated the global batch's).
  assert 12 * memory_plan.GIB < v4.total() < 14.5 * memory_plan.GIB
  assert 0.4 * memory_plan.GIB < v4.config_variant.dropout_bits < 0.6 * memory_plan.GIB
  with pytest.raises(sharding.ShardingConfigError, match="not divisible by the 16 devices"):
    memory_plan.plan(_config_file("xlmr_hybrid.py", None), tpu)  # the paper's 100


def test_dry_run_and_plan_memory_commands_compile_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "hybrid_jax.train", "--config=configs/xlmr_hybrid.py:runlocal",
       f"--workdir={workdir}", "--dry_run"], capture_output=True, text=True, cwd=REPO,
      timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "32 global = 32 per host x 1 host(s) = 4 per device x 8 batch shards" in result.stdout
  assert "* plain loss, no remat" in result.stdout
  assert not workdir.exists() and "compiled" not in result.stderr  # no train-step compile
  result = subprocess.run(
      [sys.executable, "-m", "hybrid_jax.plan_memory", "--config=configs/xlmr_hybrid.py",
       "--target=v5000"], capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert result.returncode == 2 and "--target='v5000': expected one of" in result.stderr
  assert "Traceback" not in result.stderr
