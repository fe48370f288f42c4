"""Embedding files: the exchange format between any encoder and the evaluator.

A directory holds `queries.npy` ([Q, D] float) with `queries.uids.txt` (one uid per line, row
order) and `candidates.npy` ([N, D]) with `candidates.uids.txt`. Uids are the collection's
(LAReQA: `{id}_{lang}` for questions, `{lang}_{n}_{k}` for candidates; BEIR: the `_id` fields).
Extra rows are allowed (e.g. all 11 languages when scoring a subset); missing ones are an error.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from hybrid_jax import errors

KINDS = ("queries", "candidates")


class EmbeddingsError(errors.UserError):
  """Embedding files are missing, malformed or do not match the collection."""


def paths(directory: str, kind: str) -> tuple[str, str]:
  return os.path.join(directory, f"{kind}.npy"), os.path.join(directory, f"{kind}.uids.txt")


def save(directory: str, kind: str, uids: Sequence[str], embeddings: np.ndarray,
         meta: dict | None = None) -> None:
  """Writes `<kind>.npy` + `<kind>.uids.txt` (+ `<kind>.meta.json` when meta is given)."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2 or len(embeddings) != len(uids):
    raise EmbeddingsError(f"{kind}: {len(uids)} uids but embeddings of shape {embeddings.shape}")
  if any(("\n" in u) or ("\r" in u) for u in uids):
    raise EmbeddingsError(f"{kind}: uids must not contain line breaks")
  os.makedirs(directory, exist_ok=True)
  npy_path, uid_path = paths(directory, kind)
  # Write to temporary names first so that an interrupted run never leaves a half-written pair.
  np.save(npy_path + ".tmp.npy", embeddings)
  with open(uid_path + ".tmp", "w", encoding="utf-8") as f:
    f.write("".join(u + "\n" for u in uids))
  os.replace(npy_path + ".tmp.npy", npy_path)
  os.replace(uid_path + ".tmp", uid_path)
  meta_path = os.path.join(directory, f"{kind}.meta.json")
  if meta is not None:
    with open(meta_path, "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
  elif os.path.exists(meta_path):
    os.remove(meta_path)


def load(directory: str, kind: str) -> tuple[list[str], np.ndarray]:
  """Reads and validates one `<kind>.npy` + `<kind>.uids.txt` pair."""
  npy_path, uid_path = paths(directory, kind)
  for path in (npy_path, uid_path):
    if not os.path.isfile(path):
      found = sorted(os.listdir(directory)) if os.path.isdir(directory) else "directory missing"
      raise EmbeddingsError(
          f"{path} does not exist (found: {found}). An embeddings directory holds queries.npy, "
          "queries.uids.txt, candidates.npy and candidates.uids.txt (write one with "
          "--export_embeddings).")
  try:
    embeddings = np.load(npy_path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise EmbeddingsError(f"cannot read {npy_path} as a .npy array: {e}") from e
  try:
    with open(uid_path, encoding="utf-8") as f:
      uids = f.read().split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise EmbeddingsError(f"cannot read {uid_path}: {e}") from e
  if uids and uids[-1] == "":
    uids.pop()
  if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
    raise EmbeddingsError(f"{npy_path}: expected a 2-D float array [num_{kind}, dim], found "
                          f"shape {embeddings.shape} dtype {embeddings.dtype}")
  if len(uids) != len(embeddings):
    raise EmbeddingsError(
        f"{uid_path} has {len(uids)} uids but {npy_path} has {len(embeddings)} rows; the uid "
        "file must list one uid per line, in row order.")
  if len(set(uids)) != len(uids):
    seen, dup = set(), []
    for u in uids:
      if u in seen:
        dup.append(u)
      seen.add(u)
    raise EmbeddingsError(f"{uid_path}: duplicate uids, e.g. {dup[:3]}")
  embeddings = embeddings.astype(np.float32, copy=False)
  bad = ~np.isfinite(embeddings).all(axis=1)
  if bad.any():
    raise EmbeddingsError(f"{npy_path}: {int(bad.sum())} rows contain NaN or inf, e.g. uid "
                          f"{uids[int(np.flatnonzero(bad)[0])]!r}")
  return uids, embeddings


def align(uids: Sequence[str], embeddings: np.ndarray, wanted: Sequence[str], kind: str,
          source: str) -> np.ndarray:
  """Rows of `embeddings` in the order of `wanted`; every wanted uid must be present."""
  row = {u: i for i, u in enumerate(uids)}
  missing = [u for u in wanted if u not in row]
  if missing:
    raise EmbeddingsError(
        f"{source}: {len(missing)} of the collection's {len(wanted)} {kind} uids have no "
        f"embedding, e.g. {missing[:3]} (the file's first uids: {list(uids[:3])}). Were the "
        "embeddings made for the same dataset, languages and uid scheme (DESIGN.md)?")
  return embeddings[np.array([row[u] for u in wanted], np.int64)]


def load_for(directory: str, query_uids: Sequence[str],
             candidate_uids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Query and candidate embeddings of a collection, in its order, checked for equal widths."""
  q_uids, q_emb = load(directory, "queries")
  c_uids, c_emb = load(directory, "candidates")
  if q_emb.shape[1] != c_emb.shape[1]:
    raise EmbeddingsError(
        f"{directory}: query embeddings have width {q_emb.shape[1]} but candidate embeddings "
        f"have width {c_emb.shape[1]}; both must come from the same encoder.")
  return (align(q_uids, q_emb, query_uids, "query", directory),
          align(c_uids, c_emb, candidate_uids, "candidate", directory))


def normalize_rows(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (all-zero rows stay zero): cosine scoring by inner product."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
