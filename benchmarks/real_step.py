r"""Train steps/s on the study's real workload: hybrid_jax padded, hybrid_jax packed, sentence-transformers.

    python benchmarks/real_step.py --threads=2 --rounds=5
    python benchmarks/real_step.py --threads=1 --rounds=3 --steps_per_round=2

Workload (issue 21; the study's runs): multilingual-e5-small (the converted model configs/
me5_hybrid.py's `model.init_from` points at; 12 layers, hidden 384, 250k vocabulary), real MLQA-R
hybrid batches of 32 from our own sampler, query / passage max lengths 40 / 96 ("query: " /
"passage: " prefixes), float32, dropout 0.1, AdamW (lr 3e-5, weight decay 0.01 on matrices and
embeddings), global-norm clipping 1.0, scale 20, in-batch negatives.
  padded  hybrid_jax's jit'd, donated train step (train_step.step_functions), every text padded to
          its side's max length: [32, 40] + [32, 96] tokens per step (data.packing=False).
  packed  the same step on the same batches with data.packing=True: the batch's texts packed into
          R rows of data.packing_row_length=128 (R chosen from the run's batches, as a run does).
  st      sentence-transformers: SentenceTransformer(model dir) (BertModel + mean pooling),
          its MultipleNegativesRankingLoss, torch.optim.AdamW (no decay on bias / LayerNorm),
          clip_grad_norm_, a plain loop; each side of a batch padded to that batch's longest text
          (sentence-transformers' dynamic padding), with exactly our token ids.
Ours also applies the study's same-id and false-negative masks (O(B^2), no measurable cost).
All three start from the same weights and run the same batches (steps 0..--num_batches-1 of the
plan, cycled). Rounds interleave the three sides, so that outside load hits all alike; each side
gets --threads CPU threads (XLA's intra-op pool and torch's). Batches are prepared before timing
for all three (our pipeline does that in the background during training; tokenisation is not
timed on either side). Prints per round and at the end: steps/s, real tokens/s (the tokens of the
texts, special tokens included), the ratios and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_threads  # noqa: E402  pylint: disable=wrong-import-position

THREADS = cpu_threads.pin_from_argv(default=2)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hybrid_jax import config_lib  # noqa: E402
from hybrid_jax import losses  # noqa: E402
from hybrid_jax import sharding  # noqa: E402
from hybrid_jax import train_step  # noqa: E402
from hybrid_jax.data import pipeline  # noqa: E402
from hybrid_jax.models import hf_checkpoint  # noqa: E402

BATCH_SIZE = 32
MAX_LENGTHS = (40, 96)  # query, passage
SIDES = ("padded", "packed", "st")


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def study_config(model_dir: str):
  config = config_lib.build_config("me5-small", "hybrid")
  config.model.init_from = model_dir
  config.data.query_max_length, config.data.passage_max_length = MAX_LENGTHS
  config.data.packing = True
  config.train.batch_size = BATCH_SIZE
  config.train.update(learning_rate=3e-5, weight_decay=0.01, grad_clip_norm=1.0,
                      temperature=0.05, mask_same_id=True, mask_false_negatives=True)
  return config


def host_batches(config, num_batches: int):
  """(padded batches, packed batches, real tokens per batch, the packing layout)."""
  data = pipeline.TrainingData.from_config(config)
  layout = data.packing_layout(BATCH_SIZE, num_shards=1, num_steps=config.train.num_steps)
  padded, packed, tokens = [], [], []
  for step in range(num_batches):
    batch = data.host_batch(data.plan(step, BATCH_SIZE))
    padded.append(batch)
    packed.append(data.pack_batch(batch, layout))
    tokens.append(int(batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum()))
  return padded, packed, np.array(tokens), layout


class OurSide:
  """hybrid_jax's train step (padded or packed) from the pretrained weights."""

  def __init__(self, config, pretrained, mesh, packed: bool, batches):
    loss_cfg = losses.LossConfig.from_train_config(config.train, packed=packed)
    self.fns = train_step.step_functions(
        pretrained.config, loss_cfg, train_step.OptimizerSettings.from_train_config(config.train),
        0, mesh)
    params = {"encoder": jax.device_put(pretrained.params, self.fns.param_shardings["encoder"]),
              **{k: jax.numpy.asarray(v) for k, v in loss_cfg.initial_params().items()}}
    self.state = train_step.TrainState(step=jax.numpy.int32(0), params=params,
                                       opt_state=self.fns.init_opt_state(params))
    self.batches = [sharding.host_to_global(b, mesh) for b in batches]
    start = time.perf_counter()
    self.compiled = self.fns.train_step.lower(self.state, self.batches[0]).compile()
    self.compile_seconds = time.perf_counter() - start
    self.initial_loss = float(self.fns.eval_step(params, self.batches[0])["loss"])

  def run(self, steps) -> float:
    start = time.perf_counter()
    for t in steps:
      self.state, metrics = self.compiled(self.state, self.batches[t % len(self.batches)])
    jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start


class SentenceTransformersSide:
  """sentence-transformers' model and MNRL loss in a plain training loop."""

  def __init__(self, model_dir: str, batches, threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
    from sentence_transformers.sentence_transformer import losses as st_losses  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    self.torch = torch
    self.model = SentenceTransformer(model_dir, device="cpu")
    self.model.train()
    self.loss = st_losses.MultipleNegativesRankingLoss(self.model, scale=20.0)
    no_decay = ("bias", "LayerNorm.weight")
    named = list(self.model.named_parameters())
    self.optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if not any(x in n for x in no_decay)],
          "weight_decay": 0.01},
         {"params": [p for n, p in named if any(x in n for x in no_decay)], "weight_decay": 0.0}],
        lr=3e-5, betas=(0.9, 0.999), eps=1e-8)
    self.features = [[self._trimmed(b, "query"), self._trimmed(b, "passage")] for b in batches]
    with torch.no_grad():
      self.model.eval()
      self.initial_loss = float(self.loss(self.features[0], None))
      self.model.train()

  def _trimmed(self, batch, side):
    """Our padded ids cut to the batch's longest text: sentence-transformers' dynamic padding."""
    mask = batch[f"{side}_attention_mask"]
    longest = int(mask.sum(1).max())
    return {"input_ids": self.torch.as_tensor(batch[f"{side}_input_ids"][:, :longest],
                                              dtype=self.torch.long),
            "attention_mask": self.torch.as_tensor(mask[:, :longest], dtype=self.torch.long)}

  def run(self, steps) -> float:
    start = time.perf_counter()
    for t in steps:
      self.optimizer.zero_grad(set_to_none=True)
      loss = self.loss(self.features[t % len(self.features)], None)
      loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.optimizer.step()
    return time.perf_counter() - start


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps_per_round", type=int, default=3)
  parser.add_argument("--warmup_steps", type=int, default=1)
  parser.add_argument("--num_batches", type=int, default=12, help="distinct real batches, cycled")
  parser.add_argument("--model_dir", default="",
                      help="converted multilingual-e5-small (default: configs' init_from)")
  args = parser.parse_args(argv)
  if args.threads != THREADS:
    parser.error("--threads must be given as --threads=N on the command line")

  model_dir = args.model_dir or config_lib.build_config("me5-small", "hybrid").model.init_from
  config = study_config(model_dir)
  _log(f"model {model_dir}; {args.threads} threads; jax {jax.__version__}")
  padded, packed, tokens, layout = host_batches(config, args.num_batches)
  _log(f"{args.num_batches} real batches of {BATCH_SIZE}: {tokens.mean():.0f} real tokens each on "
       f"average; padded computes {BATCH_SIZE * sum(MAX_LENGTHS)}, packed "
       f"{layout.rows_per_shard * layout.row_length} ({layout.rows_per_shard} rows x "
       f"{layout.row_length})")

  pretrained = hf_checkpoint.load_pretrained(model_dir)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
  sides = {"padded": OurSide(config, pretrained, mesh, False, padded),
           "packed": OurSide(config, pretrained, mesh, True, packed),
           "st": SentenceTransformersSide(model_dir, padded, args.threads)}
  _log("compile: " + ", ".join(f"{k} {s.compile_seconds:.0f}s" for k, s in sides.items()
                               if hasattr(s, "compile_seconds")))
  _log("dropout-free loss of batch 0 at the shared start: " +
       ", ".join(f"{k} {s.initial_loss:.6f}" for k, s in sides.items()))

  for side in sides.values():
    side.run(range(args.warmup_steps))
  seconds = {k: 0.0 for k in SIDES}
  next_step = args.warmup_steps
  round_tokens = 0
  for r in range(args.rounds):
    steps = range(next_step, next_step + args.steps_per_round)
    next_step += args.steps_per_round
    round_tokens += int(sum(tokens[t % len(tokens)] for t in steps))
    times = {k: sides[k].run(steps) for k in SIDES}
    for k in SIDES:
      seconds[k] += times[k]
    left = (args.rounds - r - 1) * sum(times.values())
    _log(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{k} {args.steps_per_round / times[k]:.3f} steps/s" for k in SIDES) +
         f"; load {os.getloadavg()[0]:.2f}; ETA {left:.0f}s")

  total = args.rounds * args.steps_per_round
  rate = {k: total / seconds[k] for k in SIDES}
  print(f"study workload: me5-small, batch {BATCH_SIZE}, q/p {MAX_LENGTHS[0]}/{MAX_LENGTHS[1]}, "
        f"{args.threads} threads, {total} timed steps per side in {args.rounds} interleaved rounds")
  for k, label in (("padded", "hybrid_jax padded"), ("packed", "hybrid_jax packed"),
                   ("st", "sentence-transformers")):
    print(f"  {label:22s} {rate[k]:7.3f} steps/s  {rate[k] * round_tokens / total:8.0f} real "
          f"tokens/s")
  print(f"  packed / padded        {rate['packed'] / rate['padded']:.2f}x (goal >= 1.6x)")
  print(f"  packed / st            {rate['packed'] / rate['st']:.2f}x (goal >= 1.3x)")
  print(f"  padded / st            {rate['padded'] / rate['st']:.2f}x")
  print(f"  load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
