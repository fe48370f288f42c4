"""Helpers of the evaluator tests: real-data paths, exact tie-free embeddings, scored grids, tiny
collections (in memory and as a BEIR directory), a counting fake encoder, a tiny model."""

from __future__ import annotations

import os

import numpy as np

from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import metrics as metrics_lib


def data_dir(dataset: str) -> str:
  """The real dataset's folder (tests that call this carry the `real_data` marker)."""
  return locations.dataset_dir(dataset)


def exact_embeddings(collection: collection_lib.Collection, seed: int = 0, dim: int = 12,
                     topic_range: int = 3, noise_range: int = 2):
  """Tie-free embeddings whose dot products are exact in float32 in any summation order.

  score(q, c) = N * <g_q, g_c> + perm_c, with g small integer vectors and perm a random
  permutation of 0..N-1 (N = number of candidates): two candidates never score the same for a
  query (their scores differ mod N), and every partial sum stays an integer below 2**24, so JAX,
  NumPy and trec_eval see bit-identical scores. Queries and their relevant candidates share a
  random "topic" vector, so relevant candidates tend to rank high (R@1, nDCG@10 are not all 0).
  """
  rng = np.random.default_rng(seed)
  n = collection.num_candidates
  assert n * (dim * (topic_range + noise_range) ** 2 + 1) < 2 ** 24
  qid = [u.rsplit("_", 1)[0] for u in collection.query_uids]
  topics = {i: rng.integers(-topic_range, topic_range + 1, dim) for i in sorted(set(qid))}
  g_q = np.stack([topics[i] + rng.integers(-noise_range, noise_range + 1, dim) for i in qid])
  cand_topic = [None] * n
  for i, rel in enumerate(collection.relevant):
    for c, _ in rel:
      cand_topic[c] = qid[i]
  g_c = np.stack([(topics[t] if t is not None else rng.integers(-topic_range, topic_range + 1, dim))
                  + rng.integers(-noise_range, noise_range + 1, dim) for t in cand_topic])
  perm = rng.permutation(n)
  q = np.concatenate([g_q * n, np.ones((len(g_q), 1))], axis=1).astype(np.float32)
  c = np.concatenate([g_c, perm[:, None]], axis=1).astype(np.float32)
  return q, c


def tiny_collection(candidate_texts=None, query_texts=None) -> collection_lib.Collection:
  """Two languages, two question ids: 4 queries, 4 candidates; LAReQA relevance (same id)."""
  query_texts = query_texts or ["where is the cat", "wo ist die katze", "when was the war",
                                "wann war der krieg"]
  candidate_texts = candidate_texts or ["the cat is on the mat", "die katze ist auf der matte",
                                        "the war ended in 1945", "der krieg endete 1945"]
  langs = ["en", "de", "en", "de"]
  return collection_lib.Collection(
      name="tiny", languages=["en", "de"],
      query_uids=["1_en", "1_de", "2_en", "2_de"], query_texts=list(query_texts),
      query_langs=langs, candidate_uids=["1_en_c", "1_de_c", "2_en_c", "2_de_c"],
      candidate_texts=list(candidate_texts), candidate_langs=langs,
      relevant=[[(0, 1.0), (1, 1.0)], [(0, 1.0), (1, 1.0)], [(2, 1.0), (3, 1.0)],
                [(2, 1.0), (3, 1.0)]])


class CountingEmbedFn:
  """embed_fn(texts, prefix) of a fake encoder: a vector that is a pure function of (prefix,
  text, seed), and a record of every call as (prefix, number of texts)."""

  def __init__(self, dim: int = 8, seed: int = 0):
    self.dim, self.seed = dim, seed
    self.calls: list[tuple[str, int]] = []

  def __call__(self, texts, prefix):
    import hashlib  # pylint: disable=g-import-not-at-top
    self.calls.append((prefix, len(texts)))
    rows = []
    for text in texts:
      digest = hashlib.sha256(f"{self.seed}|{prefix}|{text}".encode("utf-8")).digest()
      rows.append(np.frombuffer(digest[:self.dim], np.uint8).astype(np.float32) - 127.5)
    return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)


def write_tiny_beir(directory: str) -> tuple[str, list[str]]:
  """A BEIR-format directory (4 documents, 3 queries, qrels/test.tsv); returns it and its texts."""
  import json  # pylint: disable=g-import-not-at-top

  docs = {"d1": "the cat sat on the mat", "d2": "a dog runs in the park",
          "d3": "rain falls on the city", "d4": "the sun shines over the sea"}
  queries = {"q1": "where did the cat sit", "q2": "what does the dog do",
             "q3": "what shines over the sea"}
  qrels = [("q1", "d1"), ("q2", "d2"), ("q3", "d4")]
  os.makedirs(os.path.join(directory, "qrels"), exist_ok=True)
  with open(os.path.join(directory, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for doc_id, text in docs.items():
      f.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
  with open(os.path.join(directory, "queries.jsonl"), "w", encoding="utf-8") as f:
    for query_id, text in queries.items():
      f.write(json.dumps({"_id": query_id, "text": text}) + "\n")
  with open(os.path.join(directory, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    f.writelines(f"{q}\t{d}\t1\n" for q, d in qrels)
  return directory, list(docs.values()) + list(queries.values())


class Scored:
  """A collection scored on the full grid with exact embeddings (shared across tests)."""

  def __init__(self, dataset: str):
    self.collection = collection_lib.from_lareqa(data_dir(dataset), name=dataset)
    self.query_emb, self.candidate_emb = exact_embeddings(self.collection)
    col = self.collection
    self.per_query = metrics_lib.score_grid(
        self.query_emb, self.candidate_emb, col.lang_index(col.candidate_langs),
        len(col.languages), col.relevance_arrays(), show_progress=False)

  def scores(self, rows: np.ndarray) -> np.ndarray:
    """Exact float64 scores [len(rows), N] of some queries (integers, so no rounding)."""
    return self.query_emb[rows].astype(np.float64) @ self.candidate_emb.T.astype(np.float64)


class OracleEmbedder:
  """embed_fn(texts, prefix) that knows the answers: analytically known grid metrics.

  A query is the one-hot of its question id; a candidate is the normalised sum of the one-hots
  of the ids it answers (a private dimension when it answers none). So in every setting each
  query's relevant candidates score > 0 and all others 0: mAP = 1 everywhere, R@1 = 1 in X->Y, and
  the pool ranks the R relevant candidates first (rank distance R - 1). Question texts repeat
  across ids, so vectors are returned by position: the texts must be the collection's, in order.
  """

  def __init__(self, collection: collection_lib.Collection, query_prefix: str = "Query: ",
               passage_prefix: str = "Passage: "):
    qid = [u.rsplit("_", 1)[0] for u in collection.query_uids]
    ids = sorted(set(qid))
    id_dim = {i: d for d, i in enumerate(ids)}
    dim = len(ids) + collection.num_candidates
    queries = np.zeros((collection.num_queries, dim), np.float32)
    queries[np.arange(len(qid)), [id_dim[i] for i in qid]] = 1.0
    candidates = np.zeros((collection.num_candidates, dim), np.float32)
    for i, rel in zip(qid, collection.relevant):
      for c, _ in rel:
        candidates[c, id_dim[i]] = 1.0
    lonely = ~candidates.any(axis=1)
    candidates[np.flatnonzero(lonely), len(ids) + np.flatnonzero(lonely)] = 1.0
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    self._by_prefix = {query_prefix: (collection.query_texts, queries),
                       passage_prefix: (collection.candidate_texts, candidates)}
    self.calls = []

  def __call__(self, texts, prefix):
    self.calls.append((len(texts), prefix))
    expected_texts, vectors = self._by_prefix[prefix]
    assert list(texts) == list(expected_texts)
    return vectors.copy()


def write_tiny_model(directory: str, texts, *, seed: int = 0, hidden_size: int = 32,
                     num_layers: int = 2, num_heads: int = 4, max_position: int = 64,
                     max_vocab: int = 4000) -> str:
  """A randomly initialised tiny BERT (transformers) + word-level tokenizer, as a HF directory.

  The vocabulary holds the most frequent words of `texts` ([UNK] for the rest). LayerNorm and
  bias parameters are perturbed so that every tensor matters. Returns `directory`.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top

  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
  split = pre_tokenizers.Whitespace()
  counts = collections.Counter(w for t in texts for w, _ in split.pre_tokenize_str(t))
  words = [w for w, _ in counts.most_common(max_vocab)]
  vocab = {w: i for i, w in enumerate(specials + words)}
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = split
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]",
               "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}, f)

  torch.manual_seed(seed)
  config = transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
      num_attention_heads=num_heads, intermediate_size=2 * hidden_size + 5,
      max_position_embeddings=max_position, type_vocab_size=2, pad_token_id=0)
  model = transformers.BertModel(config, add_pooling_layer=False).eval()
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        tensor.add_(0.1 * torch.randn_like(tensor))
  model.save_pretrained(directory)
  return directory


def torch_mean_pooled(model_dir: str, texts, prefix: str = "", max_length: int = 64,
                      batch_size: int = 16) -> np.ndarray:
  """Reference embeddings: transformers tokenizer + PyTorch model, mean pooling, L2 norm."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModel.from_pretrained(model_dir).eval()
  out = []
  for start in range(0, len(texts), batch_size):
    batch = tokenizer([prefix + t for t in texts[start:start + batch_size]], padding=True,
                      truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
      hidden = model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
  return np.concatenate(out)
