r"""Tokens a training step computes padded versus packed, on the study's real batches.

    python benchmarks/packing.py                                  # L = 128 and 256
    python benchmarks/packing.py --row_lengths=128 --batches=1000 --multiple_of=8

Workload (issue 21): configs/me5_hybrid.py's data, i.e. real MLQA-R hybrid batches of 32 from
our own sampler and tokenised by the multilingual-e5 tokenizer ("query: " / "passage: ", max
lengths 40 / 96). Per batch it counts
  real      tokens of the 2B texts (queries + positive passages), special tokens included;
  padded    what today's pipeline computes: every text padded to its side's max length,
            B * (40 + 96);
  longest   padding each side to that batch's own longest text (the per-batch alternative);
  packed    R * L: the texts packed into R rows of L tokens by hybrid_jax.data.packing (FFD).
R is chosen by `packing.choose_num_rows` from the first --sample_batches plans (margin
--margin, a multiple of --multiple_of) and then checked on --batches later plans, which it never
saw: any that would not fit are counted (the pipeline would raise PackingError for them). The
distribution of the rows FFD needs is printed too: since batch t is a pure function of
(seed, t), a run can also take R as the maximum over all of its own steps (margin 1, no
overflow possible; ~0.5 ms per batch).
Attention costs L^2 per row, not per text; "attn" compares score elements, sum over texts of
max_len^2 (padded) against R * L^2 (packed), so a long L is not free.

Host-side only (NumPy and the tokenizer): no model runs, the figures do not depend on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from hybrid_jax import config_lib  # noqa: E402
from hybrid_jax.data import packing  # noqa: E402
from hybrid_jax.data import pipeline  # noqa: E402
from hybrid_jax.data import tokenization  # noqa: E402
from hybrid_jax.models import e5_convert  # noqa: E402

BATCH_SIZE = 32
MAX_LENGTHS = (40, 96)  # query, passage (issue 21's study workload)


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def build_data() -> pipeline.TrainingData:
  """The study's training data (me5-small, hybrid, MLQA-R) at query/passage lengths 40/96."""
  config = config_lib.build_config("me5-small", "hybrid")
  config.data.query_max_length, config.data.passage_max_length = MAX_LENGTHS
  model_dir = config.model.get("init_from") or ""
  if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
    tokenizer = tokenization.Tokenizer.from_dir(model_dir)  # what a training run loads
  else:  # not converted yet: the same tokenizer.json, from the package that ships it
    tokenizer = tokenization.Tokenizer.from_file(e5_convert.source_paths()[1], pad_token="<pad>")
  _log(f"tokenizing {config.data.path} with {tokenizer.source} ...")
  start = time.perf_counter()
  data = pipeline.TrainingData.from_config(config, tokenizer=tokenizer)
  _log(f"  {data.corpus.num_examples} ids in {time.perf_counter() - start:.0f}s")
  return data


def batch_lengths(data: pipeline.TrainingData, step: int) -> tuple[np.ndarray, np.ndarray]:
  """(query lengths [B], passage lengths [B]) of training batch `step`."""
  plan = data.plan(step, BATCH_SIZE)
  return (data.queries.lengths(plan.example, plan.query_lang),
          data.positives.lengths(plan.example, plan.passage_lang))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--row_lengths", default="128,256")
  parser.add_argument("--sample_batches", type=int, default=200,
                      help="plans (steps 0..n-1) that choose R")
  parser.add_argument("--batches", type=int, default=2000,
                      help="later plans (after the sample) that are measured")
  parser.add_argument("--margin", type=float, default=1.1)
  parser.add_argument("--multiple_of", type=int, default=1,
                      help="R divisor: the number of batch shards (1 on this CPU)")
  args = parser.parse_args(argv)
  data = build_data()
  row_lengths = [int(x) for x in args.row_lengths.split(",")]
  sample = [np.concatenate(batch_lengths(data, t)) for t in range(args.sample_batches)]
  steps = range(args.sample_batches, args.sample_batches + args.batches)
  measured = [batch_lengths(data, t) for t in steps]
  real = np.array([q.sum() + p.sum() for q, p in measured], np.float64)
  padded = BATCH_SIZE * sum(MAX_LENGTHS)
  longest = np.array([BATCH_SIZE * (q.max() + p.max()) for q, p in measured], np.float64)
  padded_attention = BATCH_SIZE * sum(m * m for m in MAX_LENGTHS)
  print(f"MLQA-R hybrid batches of {BATCH_SIZE} (queries + passages, e5 tokenizer, max "
        f"{MAX_LENGTHS[0]}/{MAX_LENGTHS[1]}), steps {steps.start}..{steps.stop - 1}:")
  print(f"  real tokens/batch     {real.mean():8.1f} (min {real.min():.0f}, max {real.max():.0f})")
  print(f"  padded tokens/batch   {padded:8d}  real/padded {real.mean() / padded:.3f}")
  print(f"  per-batch longest     {longest.mean():8.1f}  padded/longest "
        f"{padded / longest.mean():.2f}x")
  print(f"{'L':>5} {'R':>4} {'FFD rows mean/max':>18} {'packed':>7} {'real/packed':>11} "
        f"{'padded/packed':>13} {'attn padded/packed':>18} {'overflow':>9} {'pack ms':>8}")
  distribution = []
  for row_length in row_lengths:
    choice = packing.choose_num_rows(sample, row_length, margin=args.margin,
                                     multiple_of=args.multiple_of)
    _log(choice.summary())
    needed, overflow = [], 0
    start = time.perf_counter()
    for q, p in measured:
      lengths = np.concatenate([q, p])
      sequences = [np.zeros(n, np.int32) for n in lengths]  # only the lengths matter to FFD
      try:
        packed = packing.pack(sequences, choice.num_rows, row_length, pad_token_id=1)
        needed.append(packed.rows_used)
      except packing.PackingError:
        overflow += 1
        needed.append(packing.rows_needed(lengths, row_length))
    pack_ms = (time.perf_counter() - start) / len(measured) * 1e3
    packed_tokens = choice.num_rows * row_length
    attention = choice.num_rows * row_length ** 2
    print(f"{row_length:>5} {choice.num_rows:>4} {np.mean(needed):>11.2f}/{max(needed):<6d} "
          f"{packed_tokens:>7d} {real.mean() / packed_tokens:>11.3f} "
          f"{padded / packed_tokens:>12.2f}x {padded_attention / attention:>17.2f}x "
          f"{overflow:>9d} {pack_ms:>8.2f}")
    percentiles = np.percentile(needed, [50, 90, 99, 99.9])
    ideal = np.ceil(real / row_length)
    distribution.append(
        f"  L={row_length}: FFD rows p50/p90/p99/p99.9/max "
        + "/".join(f"{x:g}" for x in percentiles) + f"/{max(needed)}; lower bound ceil(real/L) "
        f"mean {ideal.mean():.2f} (FFD uses {np.mean(needed - ideal):.2f} rows more on average); "
        f"at R = max, real/packed {real.mean() / (max(needed) * row_length):.3f}, padded/packed "
        f"{padded / (max(needed) * row_length):.2f}x")
  print("\n".join(distribution))


if __name__ == "__main__":
  main()
