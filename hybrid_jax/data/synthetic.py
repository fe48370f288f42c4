"""Built-in synthetic parallel QA data: several made-up languages over one shared set of facts.

A fact is (entity, relation, value); every (entity, relation) pair is one question id. Each language
renders the same facts with its own words, written in its own script (Latin, Greek, Cyrillic,
Armenian, Georgian letters), and its own word order:

    query    "Query: <what> <relation> <of> <entity>"     (slots permuted per language)
    passage  "Passage: <entity> <relation> <is> <value>"  (slots permuted per language, +filler)

Within a language a query shares its entity and relation words with its passage, so monolingual
retrieval is a lexical match. Across languages no token is shared (disjoint scripts), so
cross-lingual retrieval must be learned from cross-lingual pairs: X-X-mono training alone leaves it
at chance, X-Y and hybrid training learn it. Hard negatives are the same entity with another
relation. Language 0 has every id; the others each have an id with probability `coverage`, like
MLQA-R where an id exists in only some languages.

Everything is a pure function of `SyntheticSpec` (seed included): the same spec gives the same
texts and the same tokenizer (word-level, whitespace split, "[CLS] ... [SEP]", [PAD] = 0). With the
defaults the vocabulary has 427 ids, inside the "tiny" model preset's 512.

A `test_fraction` of the ids is held out of the training corpus entirely and can be written as a
LAReQA-format directory (`write_lareqa_dir`) that the evaluator reads like XQuAD-R.

    python -m hybrid_jax.data.synthetic --output_dir=/tmp/synthetic [--seed=0]
writes examples.jsonl (training corpus), tokenizer/ and lareqa/<lang>.json (held-out test ids).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from hybrid_jax.data import records
from hybrid_jax.data import tokenization

# Language code -> (consonants, vowels) of its script. Codes are three letters so they can never be
# mistaken for real ISO 639-1 codes in a results table.
SCRIPTS = {
    "lat": ("bcdfghjklmnprstvz", "aeiou"),
    "grk": ("βγδζθκλμνξπρστφχψ", "αεηιουω"),
    "cyr": ("бвгджзклмнпрстфхцчш", "аеиоуыэюя"),
    "arm": ("բգդզթժլխծկհձղճմյնշչպջռսվտրցփքֆ", "աեէըիո"),
    "geo": ("ბგდვზთკლმნპჟრსტფქღყშჩცძწჭხჯჰ", "აეიოუ"),
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PREFIX_WORDS = ("Query:", "Passage:")  # the E5 prefixes, so "Query: ..." never hits [UNK]
_QUERY_SLOTS = ("what", "relation", "of", "entity")
_PASSAGE_SLOTS = ("entity", "relation", "is", "value")
_FUNCTION_WORDS = ("what", "of", "is", "filler0", "filler1")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  num_languages: int = 4  # 1..5 (one script each)
  num_entities: int = 64
  num_relations: int = 12  # ids = entities x relations
  num_values: int = 24
  coverage: float = 0.8  # probability that a non-first language has a given id
  test_fraction: float = 0.2  # ids held out of training, for evaluation (write_lareqa_dir)
  seed: int = 0

  @classmethod
  def from_config(cls, config) -> "SyntheticSpec":
    """From the `config.data.synthetic` ConfigDict (or any mapping with these fields)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: config[k] for k in fields if k in config}
    unknown = sorted(set(config.keys()) - fields)
    if unknown:
      raise records.DataError(f"data.synthetic has unknown field(s) {unknown}; known: {sorted(fields)}")
    return cls(**values)

  def validate(self) -> None:
    if not 1 <= self.num_languages <= len(SCRIPTS):
      raise records.DataError(
          f"data.synthetic.num_languages must be in [1, {len(SCRIPTS)}], found {self.num_languages}")
    for name in ("num_entities", "num_relations", "num_values"):
      if getattr(self, name) < 2:
        raise records.DataError(f"data.synthetic.{name} must be >= 2, found {getattr(self, name)}")
    if not 0.0 <= self.coverage <= 1.0:
      raise records.DataError(f"data.synthetic.coverage must be in [0, 1], found {self.coverage}")
    if not 0.0 <= self.test_fraction < 1.0:
      raise records.DataError(
          f"data.synthetic.test_fraction must be in [0, 1), found {self.test_fraction}")

  @property
  def languages(self) -> tuple[str, ...]:
    return tuple(SCRIPTS)[:self.num_languages]

  @property
  def vocab_size(self) -> int:
    per_language = self.num_entities + self.num_relations + self.num_values + len(_FUNCTION_WORDS)
    return len(SPECIAL_TOKENS) + len(PREFIX_WORDS) + self.num_languages * per_language


@dataclasses.dataclass(frozen=True)
class Lexicon:
  entities: list[str]
  relations: list[str]
  values: list[str]
  function: dict[str, str]  # "what" | "of" | "is" | "filler0" | "filler1" -> word
  query_order: tuple[str, ...]  # permutation of _QUERY_SLOTS
  passage_order: tuple[str, ...]  # permutation of _PASSAGE_SLOTS

  @property
  def words(self) -> list[str]:
    return self.entities + self.relations + self.values + [self.function[w] for w in _FUNCTION_WORDS]


def _make_words(rng: np.random.Generator, script: tuple[str, str], count: int,
                taken: set[str]) -> list[str]:
  consonants, vowels = script
  words = []
  while len(words) < count:
    syllables = int(rng.integers(2, 4))
    word = "".join(consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))]
                   for _ in range(syllables))
    if word not in taken:
      taken.add(word)
      words.append(word)
  return words


def lexicon(spec: SyntheticSpec, k: int) -> Lexicon:
  """The words and word orders of language k of `spec` (a pure function of spec.seed and k)."""
  lang = spec.languages[k]
  rng = np.random.default_rng([spec.seed, 1, k])
  taken: set[str] = set()
  words = _make_words(rng, SCRIPTS[lang], spec.num_entities + spec.num_relations + spec.num_values
                      + len(_FUNCTION_WORDS), taken)
  e, r, v = spec.num_entities, spec.num_relations, spec.num_values
  function = dict(zip(_FUNCTION_WORDS, words[e + r + v:]))
  # Language 0 keeps the canonical order; the others get their own word order.
  query_order = _QUERY_SLOTS if k == 0 else tuple(np.asarray(_QUERY_SLOTS)[rng.permutation(4)])
  passage_order = _PASSAGE_SLOTS if k == 0 else tuple(np.asarray(_PASSAGE_SLOTS)[rng.permutation(4)])
  return Lexicon(words[:e], words[e:e + r], words[e + r:e + r + v], function,
                  tuple(query_order), tuple(passage_order))


def _facts(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
  """values [E, R] int (the value of each fact) and presence [E, R, K] bool."""
  rng = np.random.default_rng([spec.seed, 0])
  values = rng.integers(spec.num_values, size=(spec.num_entities, spec.num_relations))
  presence = rng.random((spec.num_entities, spec.num_relations, spec.num_languages)) < spec.coverage
  presence[:, :, 0] = True
  return values, presence


def question_id(entity: int, relation: int) -> str:
  return f"syn-e{entity:03d}-r{relation:02d}"


class _Renderer:
  """Renders queries and passages of one spec in every language."""

  def __init__(self, spec: SyntheticSpec):
    spec.validate()
    self.spec = spec
    self.lexicons = [lexicon(spec, k) for k in range(spec.num_languages)]
    self.values, self.presence = _facts(spec)
    rng = np.random.default_rng([spec.seed, 2])
    # Per (entity, relation, language): whether the passage carries a filler word, and which.
    self.filler = rng.integers(0, 3, size=self.presence.shape)  # 0 none, 1 filler0, 2 filler1
    # Hard negative relation: another relation of the same entity.
    offsets = rng.integers(1, spec.num_relations, size=self.values.shape)
    self.negative_relation = (np.arange(spec.num_relations)[None, :] + offsets) % spec.num_relations

  def query(self, e: int, r: int, k: int) -> str:
    lex = self.lexicons[k]
    slot = {"what": lex.function["what"], "of": lex.function["of"], "relation": lex.relations[r],
            "entity": lex.entities[e]}
    return " ".join(slot[s] for s in lex.query_order)

  def passage(self, e: int, r: int, k: int) -> str:
    lex = self.lexicons[k]
    slot = {"entity": lex.entities[e], "relation": lex.relations[r], "is": lex.function["is"],
            "value": lex.values[self.values[e, r]]}
    words = [slot[s] for s in lex.passage_order]
    filler = self.filler[e, r, k]
    if filler:
      words.append(lex.function[f"filler{filler - 1}"])
    return " ".join(words)

  def value_word(self, e: int, r: int, k: int) -> str:
    return self.lexicons[k].values[self.values[e, r]]

  def example(self, e: int, r: int) -> records.ParallelExample:
    langs = {}
    for k, lang in enumerate(self.spec.languages):
      if self.presence[e, r, k]:
        langs[lang] = records.LanguageTexts(self.query(e, r, k), self.passage(e, r, k),
                                            self.passage(e, int(self.negative_relation[e, r]), k))
    return records.ParallelExample(question_id(e, r), langs)


def _test_mask(spec: SyntheticSpec, ids: Sequence[str]) -> np.ndarray:
  # Salted so that the test ids and the validation ids (records.validation_ids_mask) are unrelated.
  return records.validation_ids_mask([f"synthetic-test/{i}" for i in ids], spec.test_fraction)


def all_examples(spec: SyntheticSpec) -> list[records.ParallelExample]:
  """Every question id (training and test), in (entity, relation) order."""
  renderer = _Renderer(spec)
  return [renderer.example(e, r)
          for e in range(spec.num_entities) for r in range(spec.num_relations)]


def training_examples(spec: SyntheticSpec) -> list[records.ParallelExample]:
  """The ids not held out for testing (the validation split is taken from these later)."""
  examples = all_examples(spec)
  test = _test_mask(spec, [x.id for x in examples])
  return [x for x, is_test in zip(examples, test) if not is_test]


def test_ids(spec: SyntheticSpec) -> list[str]:
  ids = [question_id(e, r) for e in range(spec.num_entities) for r in range(spec.num_relations)]
  return [i for i, is_test in zip(ids, _test_mask(spec, ids)) if is_test]


def build_tokenizer(spec: SyntheticSpec) -> tokenization.Tokenizer:
  """Word-level tokenizer over the spec's vocabulary; ids are assigned in a fixed order."""
  spec.validate()
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + PREFIX_WORDS)}
  for k in range(spec.num_languages):
    for word in lexicon(spec, k).words:
      vocab[word] = len(vocab)
  assert len(vocab) == spec.vocab_size, (len(vocab), spec.vocab_size)
  hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  return tokenization.Tokenizer(hf, pad_token_id=vocab["[PAD]"], source=f"synthetic tokenizer (seed {spec.seed}, {spec.num_languages} languages)")


def write_lareqa_dir(out_dir: str, spec: SyntheticSpec, ids: str = "test") -> list[str]:
  """Writes `<lang>.json` files in the LAReQA (XQuAD-R) format; returns the paths.

  One article and one paragraph per entity; the paragraph's sentences are that entity's passages
  (relation order) in the language; each question's answer is the value word of its sentence.
  `ids`: "test" (held out of training; the default), or "all".
  """
  renderer = _Renderer(spec)
  if ids == "test":
    keep = set(test_ids(spec))
  elif ids == "all":
    keep = None
  else:
    raise ValueError(f"ids must be 'test' or 'all', found {ids!r}")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for k, lang in enumerate(spec.languages):
    articles = []
    for e in range(spec.num_entities):
      relations = [r for r in range(spec.num_relations) if renderer.presence[e, r, k]
                   and (keep is None or question_id(e, r) in keep)]
      if not relations:
        continue
      sentences = [renderer.passage(e, r, k) for r in relations]
      context = " ".join(sentences)
      breaks, qas, start = [], [], 0
      for r, sentence in zip(relations, sentences):
        breaks.append([start, start + len(sentence)])
        value = renderer.value_word(e, r, k)
        qas.append({"id": question_id(e, r), "question": renderer.query(e, r, k),
                    "answers": [{"text": value, "answer_start": start + sentence.index(value)}]})
        start += len(sentence) + 1
      articles.append({"title": f"entity-{e:03d}", "paragraphs": [
          {"context": context, "qas": qas, "sentences": sentences, "sentence_breaks": breaks}]})
    path = os.path.join(out_dir, f"{lang}.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"version": "synthetic-1", "data": articles}, f, ensure_ascii=False)
    paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output_dir", required=True)
  for field in dataclasses.fields(SyntheticSpec):
    parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
  args = parser.parse_args(argv)
  spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)})
  spec.validate()
  n = records.write_jsonl(os.path.join(args.output_dir, "examples.jsonl"), training_examples(spec))
  build_tokenizer(spec).save(os.path.join(args.output_dir, "tokenizer"))
  paths = write_lareqa_dir(os.path.join(args.output_dir, "lareqa"), spec)
  print(f"wrote {n} training ids ({', '.join(spec.languages)}) to "
        f"{os.path.join(args.output_dir, 'examples.jsonl')}, a {spec.vocab_size}-token tokenizer to "
        f"{os.path.join(args.output_dir, 'tokenizer')}, and {len(test_ids(spec))} held-out test ids "
        f"as LAReQA files: {', '.join(paths)}", file=sys.stderr)


if __name__ == "__main__":
  main()
