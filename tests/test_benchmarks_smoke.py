"""benchmarks/accelerator.sh --smoke: every part of the accelerator benchmark, tiny, on CPU, with
TensorFlow made unimportable (the GPU benchmark host has none)."""

from __future__ import annotations

import json
import os
import subprocess

from train_helpers import REPO, xla_flags


def test_accelerator_script_smoke_runs_every_part_without_tensorflow(tmp_path):
  blocker = tmp_path / "no_tf" / "tensorflow"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text(
      'raise ImportError("TensorFlow is not installed on the accelerator benchmark host")\n')
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=str(blocker.parent),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  env["XLA_FLAGS"] = xla_flags(1)  # one CPU device, as on a one-GPU host
  result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "accelerator.sh"), "--smoke",
                           str(out)], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, (result.stderr[-3000:], (out / "failures.txt").read_text()
                                  if (out / "failures.txt").exists() else "")
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["part"] == "train"]
  assert [(r["model"], r["batch_size"], r["chunk"]) for r in train] == [("tiny", 16, 0),
                                                                       ("tiny", 16, 8)]
  for r in train:
    assert r["steps_per_second"] > 0 and r["examples_per_second"] == r["steps_per_second"] * 16
    assert r["tflops_per_device"] > 0 and r["mfu"] is None  # no peak FLOP/s for a CPU
    # On CPU the peak is XLA's memory analysis; the memory plan's estimate is within 15% of it.
    assert r["peak_memory_source"] == "XLA memory_analysis"
    assert abs(r["plan_memory_mib"] / r["peak_memory_mib"] - 1) <= 0.15, r
  assert train[1]["peak_memory_mib"] < train[0]["peak_memory_mib"]  # GradCache: less memory
  (embed,) = [r for r in rows if r["part"] == "embed"]
  assert embed["queries_texts_per_second"] > 0 and embed["candidates_tokens_per_second"] > 0
  summary = (out / "summary.md").read_text()
  assert "| tiny | 16 | 16/16 | 8 | float32 |" in summary
  assert "ratio ours/torch" in summary  # the encoder benchmark against PyTorch ran
