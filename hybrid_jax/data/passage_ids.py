"""Passage identity: which passages of a corpus are the same passage, in any row, language or slot.

The loss must never push a row away from one of its own positives. mask_same_id catches the rows
that share the question id; this module catches the rest, so that train.mask_false_negatives can
drop every candidate column (an in-batch positive or a hard negative of any row) that is one of
the row's positives. Such collisions are common: in LAReQA training pairs the neighbouring
sentence used as hard negative is often another question's gold sentence (MLQA-R 427 of 4199
rows, XQuAD-R 8697 of 13090), and two question ids often share one gold sentence in a language
(XQuAD-R 7400).

A passage id is an identity, so it must be transitive: passages are nodes of a graph joined by
  names  a positive's `positive_id`, a negative's `negative_id` (records.py; LAReQA names every
         sentence by its candidate uid); a cell without a name is identified by its text alone;
  texts  passages with the same text are one passage whatever their names say: they embed
         identically, so one of them as a negative is the other's positive.
A passage id is a connected component (names and texts both nodes, each passage an edge between
its name and its text), numbered 0, 1, ... in order of first appearance (positives row by row,
then negatives, then any `extra` passages, e.g. a mining pool), so ids are a pure function of the
inputs: every host derives the same ones.

Relevance is a relation, not an identity: the positives of a row are its record's positives in
every language (`relevant_passage_ids`, [b, K]), and candidate j is a false negative of row i when
its passage id is one of them. Two questions that share a gold sentence in one language stay
different passages in the others (naming a question's positives by the question id, and merging
such groups, would make "shares a sentence" transitive and mask legitimate negatives).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from hybrid_jax.data import records


@dataclasses.dataclass(frozen=True)
class PassageIds:
  """Integer passage ids of a corpus's positives and hard-negative slots."""

  positive: np.ndarray  # [N, K] int32; -1 where the id lacks the language
  negative: np.ndarray  # [N, C] int32 per column of corpus.negative_table(); -1 where none
  num_passages: int
  extra: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # [P]

  def of_rows(self, example: np.ndarray, passage_lang: np.ndarray,
              negative_column: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Batch features of rows: passage_id [b], relevant_passage_ids [b, K] (the row's positives
    in every language, -1 where the record lacks the language) and, given negative columns,
    negative_passage_id [b]."""
    out = {"passage_id": self.positive[example, passage_lang].astype(np.int32),
           "relevant_passage_ids": self.positive[example].astype(np.int32)}
    if negative_column is not None:
      out["negative_passage_id"] = self.negative[example, negative_column].astype(np.int32)
    return out


def resolve(corpus: records.ParallelCorpus,
            extra: Sequence[tuple[str, str | None]] = ()) -> PassageIds:
  """Passage ids of every positive and hard negative of `corpus` (see the module docstring), and
  of `extra` passages given as (text, name or None)."""
  negative_texts, negative_names = corpus.negative_table()
  names: dict[str, int] = {}
  texts: dict[str, int] = {}
  cell_text: list[int] = []  # text node of every passage cell, in numbering order
  edges: list[tuple[int, int]] = []  # (name node, text node)

  def add(text: str, name: str | None) -> None:
    text_node = texts.setdefault(text, len(texts))
    cell_text.append(text_node)
    if name is not None:
      edges.append((names.setdefault(name, len(names)), text_node))

  positive_names = corpus.positive_ids
  present = np.argwhere(np.not_equal(corpus.positives, None))  # row-major
  for n, k in present:
    add(corpus.positives[n, k], positive_names[n, k] if positive_names is not None else None)
  negative_cells = np.argwhere(np.not_equal(negative_texts, None))
  for n, c in negative_cells:
    add(negative_texts[n, c], negative_names[n, c])
  for text, name in extra:
    add(text, name)

  # Nodes: names 0 .. A-1, texts A .. A+T-1.
  num_names, num_nodes = len(names), len(names) + len(texts)
  edge_array = np.asarray(edges, np.int64).reshape(-1, 2)
  graph = coo_matrix((np.ones(len(edge_array), np.int8),
                      (edge_array[:, 0], edge_array[:, 1] + num_names)),
                     shape=(num_nodes, num_nodes))
  _, component = connected_components(graph, directed=False)
  cell_component = component[np.asarray(cell_text, np.int64) + num_names]
  # Renumber by first appearance, so the ids do not depend on scipy's labelling.
  _, first, inverse = np.unique(cell_component, return_index=True, return_inverse=True)
  rank = np.empty(len(first), np.int64)
  rank[np.argsort(first, kind="stable")] = np.arange(len(first))
  cell_id = rank[inverse.reshape(-1)].astype(np.int32)

  positive = np.full(corpus.positives.shape, -1, np.int32)
  positive[present[:, 0], present[:, 1]] = cell_id[:len(present)]
  negative = np.full(negative_texts.shape, -1, np.int32)
  negative[negative_cells[:, 0], negative_cells[:, 1]] = cell_id[len(present):][
      :len(negative_cells)]
  return PassageIds(positive, negative, int(len(first)),
                    cell_id[len(present) + len(negative_cells):])
