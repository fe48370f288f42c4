r"""The measurements of benchmarks/accelerator.sh, one per process (peak memory is per process).

    python benchmarks/accelerator.py train --model=xlmr-base --batch_size=128 --chunk=32
    python benchmarks/accelerator.py embed --model=me5-small --texts=8192
    python benchmarks/accelerator.py summarize --results=OUT/results.jsonl

train  the trainer's own jit'd step (`train_step.step_functions`: encoder on queries and passages,
       InfoNCE with the same-id mask, clipping, AdamW, dropout 0.1, donated state) of a backbone
       preset (random weights) at the config's lengths (query 64 / passage 128 tokens), bf16
       compute on accelerators; plain or GradCache (--chunk). Batches are built here from random
       token ids (no data pipeline, no TensorFlow). Reports steps/s, examples/s, TFLOP/s per
       device and MFU (XLA's cost analysis of the compiled step, peak bf16 FLOP/s of the device
       kind: hybrid_jax/train_metrics.py), peak device memory (the runtime's peak_bytes_in_use;
       XLA's memory analysis where the runtime has none, e.g. CPU) next to the memory plan's
       estimate (hybrid_jax/memory_plan.py) for the same config and devices.
embed  the evaluator's encoder (`inference.TextEmbedder`: tokenisation, length buckets, jit'd
       encode sharded over the local devices) on generated texts of XQuAD-R-like lengths (queries
       8-20 words, candidate sentences 15-60) with a word-level tokenizer over the model's
       vocabulary size: texts/s and tokens/s for queries (max 64 tokens) and candidates (128),
       timed on a second pass (the first one compiles).
Each prints one `RESULT {json}` line and appends it to --results; `summarize` turns the file into
the Markdown tables of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hybrid_jax import config_lib  # noqa: E402
from hybrid_jax import losses  # noqa: E402
from hybrid_jax import memory_plan  # noqa: E402
from hybrid_jax import sharding  # noqa: E402
from hybrid_jax import train_metrics  # noqa: E402
from hybrid_jax import train_step  # noqa: E402
from hybrid_jax.models import encoder as encoder_lib  # noqa: E402

MIB = 2**20


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _device_line() -> dict:
  device = jax.devices()[0]
  return {"device": device.device_kind, "platform": device.platform,
          "num_devices": jax.device_count(), "jax": jax.__version__,
          "date": datetime.date.today().isoformat()}


def _emit(result: dict, results_path: str | None) -> None:
  line = json.dumps(result, sort_keys=True)
  print(f"RESULT {line}", flush=True)
  if results_path:
    with open(results_path, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def _peak_device_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _experiment_config(model: str, batch_size: int, chunk: int, lengths: str = ""):
  """The hybrid config of a backbone preset at this batch size (default: a full run's lengths;
  `lengths` "Q,P" overrides them)."""
  config = config_lib.build_config(backbone=model, batch_type="hybrid")
  config.model.init_from = ""  # random weights: no checkpoint needed on the benchmark host
  config.train.batch_size = batch_size
  config.train.gradcache_chunk_size = chunk
  if lengths:
    config.data.query_max_length, config.data.passage_max_length = map(int, lengths.split(","))
  return config


def random_batch(batch_size: int, query_length: int, passage_length: int, vocab_size: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch built directly: rows 50-100% full, distinct question ids, mixed types."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, length in (("query", query_length), ("passage", passage_length)):
    real = rng.integers(max(length // 2, 2), length + 1, size=batch_size)
    mask = (np.arange(length)[None] < real[:, None]).astype(np.int32)
    batch[f"{name}_input_ids"] = (rng.integers(5, vocab_size, size=(batch_size, length))
                                  * mask).astype(np.int32)
    batch[f"{name}_attention_mask"] = mask
  batch["question_id"] = np.arange(batch_size, dtype=np.int32)
  batch["batch_type"] = (np.arange(batch_size) % 3).astype(np.int32)
  return batch


# --- train ----------------------------------------------------------------------------------------
def train(args) -> dict:
  config = _experiment_config(args.model, args.batch_size, args.chunk, args.lengths)
  plan = memory_plan.plan(config, memory_plan.local_target())
  encoder_config = plan.encoder_config  # the preset at this platform's dtype ("auto")
  # Random-token batches carry no passage ids: no false-negative mask (its cost is O(B^2) anyway).
  config.train.mask_false_negatives = False
  loss_cfg = losses.LossConfig.from_train_config(config.train)
  mesh = sharding.make_mesh(config.mesh)
  fns = train_step.step_functions(encoder_config, loss_cfg,
                                  train_step.OptimizerSettings.from_train_config(config.train),
                                  0, mesh)
  host_batch = random_batch(args.batch_size, config.data.query_max_length,
                            config.data.passage_max_length, encoder_config.vocab_size)
  batch = sharding.host_to_global({k: host_batch[k] for k in loss_cfg.required_features()},
                                  mesh, args.batch_size)
  params = fns.init_params()
  state = train_step.TrainState(step=jnp.int32(0), params=params,
                                opt_state=fns.init_opt_state(params))
  started = time.perf_counter()
  compiled = fns.train_step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - started
  xla_bytes = memory_plan.xla_peak_bytes(compiled)
  flops = train_step.compiled_flops(compiled)
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics["loss"])
  started = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics["loss"])
  seconds = time.perf_counter() - started
  steps_per_second = args.steps / seconds
  peak = train_metrics.peak_flops_per_device(jax.devices()[0])
  tflops = flops * steps_per_second / 1e12 if flops else None
  measured = _peak_device_bytes()
  result = dict(
      _device_line(), part="train", model=args.model, batch_size=args.batch_size,
      chunk=args.chunk, dtype=encoder_config.dtype,
      lengths=[config.data.query_max_length, config.data.passage_max_length],
      steps=args.steps, compile_seconds=round(compile_seconds, 1),
      steps_per_second=steps_per_second, examples_per_second=steps_per_second * args.batch_size,
      tflops_per_device=tflops, mfu=(tflops * 1e12 / peak) if tflops and peak else None,
      peak_memory_mib=(measured or xla_bytes) / MIB,
      peak_memory_source="runtime peak_bytes_in_use" if measured else "XLA memory_analysis",
      xla_memory_mib=xla_bytes / MIB, plan_memory_mib=plan.total() / MIB,
      loss=float(metrics["loss"]))
  _log(f"{args.model} batch {args.batch_size} chunk {args.chunk}: {steps_per_second:.2f} "
       f"steps/s, peak {result['peak_memory_mib']:.0f} MiB ({result['peak_memory_source']}), "
       f"plan {result['plan_memory_mib']:.0f} MiB")
  return result


# --- embed ----------------------------------------------------------------------------------------
def _word_tokenizer(vocab_size: int):
  import tokenizers  # pylint: disable=g-import-not-at-top
  from hybrid_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
  vocab.update({f"w{i}": i for i in range(4, vocab_size)})
  hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  hf.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tokenization.Tokenizer(hf, pad_token_id=0)


def _texts(count: int, words: tuple[int, int], vocab_size: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(f"w{w}" for w in rng.integers(4, vocab_size, size=rng.integers(*words)))
          for _ in range(count)]


def embed(args) -> dict:
  from hybrid_jax.models import inference  # pylint: disable=g-import-not-at-top
  model_config = dict(_experiment_config(args.model, 32, 0).model)  # dtype "auto": bf16 on GPU
  encoder_config = encoder_lib.EncoderConfig.from_model_config(model_config)
  params = encoder_lib.init_params(encoder_config, jax.random.key(0))
  vocab = min(encoder_config.vocab_size, 50_000)  # a large table without a 250k-entry tokenizer
  tokenizer = _word_tokenizer(vocab)
  result = dict(_device_line(), part="embed", model=args.model, dtype=encoder_config.dtype,
                texts=args.texts, batch_size=args.batch_size)
  for name, max_length, words in (("queries", 64, (8, 21)), ("candidates", 128, (15, 61))):
    embedder = inference.TextEmbedder(encoder_config, params, tokenizer,
                                      batch_size=args.batch_size, max_length=max_length,
                                      dtype=jnp.dtype(encoder_config.dtype))
    texts = _texts(args.texts, words, vocab, seed=len(name))
    tokens = sum(len(x) for x in tokenizer.token_ids(texts, max_length))
    started = time.perf_counter()
    embedder.embed(texts)  # compiles every length bucket it meets
    first = time.perf_counter() - started
    started = time.perf_counter()
    embedder.embed(texts)
    seconds = time.perf_counter() - started
    result[f"{name}_texts_per_second"] = args.texts / seconds
    result[f"{name}_tokens_per_second"] = tokens / seconds
    result[f"{name}_first_pass_seconds"] = round(first, 2)
    _log(f"{args.model} {name}: {args.texts / seconds:.0f} texts/s, {tokens / seconds:.0f} "
         f"tokens/s (first pass with compiles {first:.1f}s)")
  return result


# --- summarize ------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def summarize(args) -> str:
  with open(args.results, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    return "no results"
  head = rows[0]
  lines = [f"Measured {head['date']} on {head['num_devices']} x {head['device']} "
           f"({head['platform']}), jax {head['jax']}.", "",
           "| train step | batch | lengths | GradCache chunk | dtype | steps/s | examples/s | "
           "TFLOP/s/device | MFU | peak memory MiB | plan MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in (r for r in rows if r["part"] == "train"):
    lines.append(
        f"| {r['model']} | {r['batch_size']} | {'/'.join(map(str, r['lengths']))} | "
        f"{r['chunk'] or '-'} | {r['dtype']} | "
        f"{r['steps_per_second']:.2f} | {r['examples_per_second']:.0f} | "
        f"{_fmt(r['tflops_per_device'], '.3g')} | "
        f"{_fmt(r['mfu'], '.1%')} | {r['peak_memory_mib']:.0f} | "
        f"{r['plan_memory_mib']:.0f} |")
  embeds = [r for r in rows if r["part"] == "embed"]
  if embeds:
    lines += ["", "| evaluator encoding | dtype | queries texts/s | queries tokens/s | "
              "candidates texts/s | candidates tokens/s |", "|---|---|---|---|---|---|"]
    for r in embeds:
      lines.append(f"| {r['model']} | {r['dtype']} | {r['queries_texts_per_second']:.0f} | "
                   f"{r['queries_tokens_per_second']:.0f} | "
                   f"{r['candidates_texts_per_second']:.0f} | "
                   f"{r['candidates_tokens_per_second']:.0f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("part", choices=("train", "embed", "summarize"))
  parser.add_argument("--model", default="xlmr-base", help="a backbone preset (models/presets)")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--chunk", type=int, default=0, help="GradCache chunk (0: plain loss)")
  parser.add_argument("--lengths", default="", help="train: query,passage tokens (default: the "
                      "config's 64,128)")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed train steps")
  parser.add_argument("--texts", type=int, default=8192, help="texts per embedding pass")
  parser.add_argument("--results", default=None, help="JSON lines file to append to / read")
  args = parser.parse_args()
  if args.part == "summarize":
    print(summarize(args))
    return
  _emit(train(args) if args.part == "train" else embed(args), args.results)


if __name__ == "__main__":
  main()
