"""`python -m hybrid_jax.mine` end to end: a tiny encoder mines a LAReQA-format directory, the
mined JSONL trains a runlocal run with data.hard_negatives and the false-negative mask; bad flags
end with one `error:` line and status 2."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hybrid_jax import trainer
from hybrid_jax.data import records
from hybrid_jax.data import synthetic
from hybrid_jax.models import encoder as encoder_lib
from hybrid_jax.models import hf_checkpoint
from hybrid_jax.models import presets
import train_helpers

SPEC = synthetic.SyntheticSpec(num_entities=24, num_relations=6, seed=1)


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
  root = tmp_path_factory.mktemp("mine")
  data_dir = train_helpers.write_lareqa_with_unasked_sentences(str(root / "lareqa"), SPEC)
  # A random-init 1-layer encoder over the synthetic tokenizer, as a Hugging Face directory.
  tokenizer = synthetic.build_tokenizer(SPEC)
  values = dict(presets.model_config("tiny"))
  values.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=tokenizer.vocab_size, dtype="float32")
  config = encoder_lib.EncoderConfig.from_model_config(values)
  model_dir = str(root / "model")
  hf_checkpoint.save_pretrained(model_dir, config,
                                encoder_lib.init_params(config, jax.random.key(0)), tokenizer)
  out = str(root / "mined.jsonl")
  command = [sys.executable, "-m", "hybrid_jax.mine", f"--model={model_dir}", f"--data={data_dir}",
             f"--out={out}", "--negative_language=query:0.5,positive:0.5", "--skip_top=1",
             "--query_prefix=Query: ", "--passage_prefix=Passage: ", "--query_max_length=16",
             "--passage_max_length=16", "--seed=3", "--heldout_fraction=0"]
  done = subprocess.run(command, cwd=train_helpers.REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return model_dir, data_dir, out, done.stderr


def test_cli_writes_mined_jsonl_and_summary(mined):
  _, _, out, stderr = mined
  summary = json.load(open(f"{out}.summary.json"))
  examples = records.read_jsonl(out)
  assert summary["records"] == len(examples) == 96  # 24 entities x 4 asked relations
  slots = sum(len(e.languages) ** 2 for e in examples)
  assert summary["slots"] == slots
  # Exact shares of the slots: half query-language, half positive-language negatives.
  assert summary["slots_per_policy"] == {"query": slots - slots // 2, "positive": slots // 2} or (
      summary["slots_per_policy"] == {"query": slots // 2, "positive": slots - slots // 2})
  assert summary["negatives"] + summary["slots_without_negative"] == slots
  assert summary["slots_without_negative"] == 0
  assert summary["query_prefix"] == "Query: " and summary["config"]["skip_top"] == 1
  assert "embedding queries" in stderr and "wrote 96 records" in stderr
  meta = [json.loads(line)["meta"]["mined"] for line in open(out, encoding="utf-8")]
  ranks = [slot["rank"] for record in meta for cell in record.values() for slot in cell.values()]
  assert len(ranks) == slots and min(ranks) >= 2  # --skip_top=1: rank 1 is never taken


def test_mined_negatives_train_a_runlocal_run(mined, tmp_path):
  model_dir, _, out, _ = mined
  config = train_helpers.runlocal_config("hybrid", **{
      "data.source": "jsonl", "data.path": out, "data.hard_negatives": True,
      "train.mask_false_negatives": True, "model.tokenizer": model_dir, "train.num_steps": 60,
      "train.warmup_steps": 6, "train.eval_every_steps": 60, "train.checkpoint_every_steps": 60})
  config.evals = {}  # the synthetic grid's held-out ids are not this run's
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  metrics = result["metrics"]
  assert result["step"] == 60
  assert np.isfinite(metrics["validation/loss"])
  assert metrics["validation/loss"] < 0.7 * metrics["validation/loss_at_start"], metrics


def test_bad_flags_end_with_one_error_line(mined, tmp_path):
  model_dir, data_dir, _, _ = mined
  for flags, message in (
      (["--negative_language=query:0.7,any:0.2"], "shares must sum to 1, found 0.9"),
      (["--skip_top=-2"], "--skip_top must be an integer >= 0, found -2"),
      ([f"--workdir={tmp_path}"], "exactly one of --model=HF_DIR"),
  ):
    done = subprocess.run(
        [sys.executable, "-m", "hybrid_jax.mine", f"--model={model_dir}", f"--data={data_dir}",
         f"--out={tmp_path / 'x.jsonl'}", "--query_prefix=", "--passage_prefix=", *flags],
        cwd=train_helpers.REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (flags, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], (flags, lines[-3:])
    assert "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "x.jsonl")
