"""One table of bad inputs a user can give, each ending in one `error:` line and exit status 2.

Every row builds its bad input under tmp_path, runs what the command-line tool runs (its reader or
entry function through errors.exit_on_user_error, the way each main() calls it; the config
override through the real CLI, which stops while parsing flags), and asserts the message, the
status and that no output or workdir file was written. In process, so the table takes seconds.
"""

import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from hybrid_jax import checkpointing
from hybrid_jax import config_lib
from hybrid_jax import embed
from hybrid_jax import errors
from hybrid_jax import trainer
from hybrid_jax.data import convert
from hybrid_jax.data import synthetic
from hybrid_jax.search import beir_eval
from hybrid_jax.search import mkqa
from train_helpers import REPO, runlocal_config

_RECORD = {"id": "q1", "languages": {"en": {"query": "Who?", "positive": "Him."},
                                     "de": {"query": "Wer?", "positive": "Er."}}}
_GOOD_LINE = json.dumps(_RECORD, ensure_ascii=False).encode()
# Line 3 holds the bad byte: 2 good lines before it, so the offset is not the line's.
_BAD_BYTE_JSONL = _GOOD_LINE + b"\n" + _GOOD_LINE.replace(b"q1", b"q2") + b"\n" + (
    b'{"id": "q3", "languages": {"en": {"query": "Caf\xff", "positive": "x"}}}\n')
_BAD_OFFSET = 2 * (len(_GOOD_LINE) + 1) + _BAD_BYTE_JSONL.split(b"\n")[2].index(b"\xff")
# A file cut inside the 2-byte "é" (c3 a9): what an interrupted copy leaves.
_CUT_JSONL = _GOOD_LINE + b"\n" + '{"id": "q2", "languages": {"en": {"query": "é'.encode()[:-1]


def _write(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _tokenizer_dir(tmp) -> str:
  """The synthetic tokenizer as a model.tokenizer directory, beside (not in) the inputs."""
  directory = tmp.parent / "tokenizer"
  directory.mkdir(exist_ok=True)
  synthetic.build_tokenizer(synthetic.SyntheticSpec()).hf_tokenizer.save(
      str(directory / "tokenizer.json"))
  return str(directory)


def _train(source, path):
  """What `python -m hybrid_jax.train --config.data.source=SOURCE --config.data.path=PATH` runs."""
  def run(tmp):
    config = runlocal_config("hybrid", **{"data.source": source, "data.path": path(tmp),
                                          "model.tokenizer": _tokenizer_dir(tmp)})
    return trainer.train_and_evaluate(config, str(tmp / "workdir"))
  return run


def _train_jsonl(path):
  return _train("jsonl", path)


def _train_lareqa(path):
  return _train("lareqa", path)


def _lareqa_dir_with_bad_byte(tmp):
  directory = str(tmp / "lareqa")
  synthetic.write_lareqa_dir(directory, synthetic.SyntheticSpec(), ids="all")
  path = os.path.join(directory, sorted(os.listdir(directory))[0])
  data = open(path, "rb").read()
  position = data.index(b'"')  # an ASCII byte: the bad one is not part of a character
  _write(path, data[:position] + b"\xfe" + data[position + 1:])
  return directory


def _embed(input_path):
  """What `python -m hybrid_jax.embed --model=DIR --input=PATH --output=OUT` runs."""
  def run(tmp):
    os.makedirs(tmp / "model", exist_ok=True)
    return embed.embed_file(str(tmp / "model"), input_path(tmp), str(tmp / "out" / "emb.npy"))
  return run


def _mmarco(queries=b"1\tWho?\n", collection=b"7\tHim.\n8\tHer.\n", triples=b"1\t7\t8\n",
            triples_path=None):
  """What `python -m hybrid_jax.data.convert --from=mmarco ...` reads before writing --output."""
  def run(tmp):
    _write(tmp / "q" / "en.tsv", queries)
    _write(tmp / "c" / "en.tsv", collection)
    triples_file = triples_path or _write(tmp / "triples.tsv", triples)
    return convert.mmarco_examples(["en"], str(tmp / "q" / "{lang}.tsv"),
                                   str(tmp / "c" / "{lang}.tsv"), triples_file)
  return run


def _mkqa(data: bytes, name="mkqa.jsonl"):
  """What `python -m hybrid_jax.evaluate --dataset=mkqa --mkqa_file=...` reads first."""
  def run(tmp):
    path = _write(tmp / name, gzip.compress(data) if name.endswith(".gz") else data)
    _write(tmp / "corpus" / "corpus.jsonl", b'{"_id": "d1", "text": "x"}\n')
    return mkqa.MkqaEvaluator(path, str(tmp / "corpus"), show_progress=False).collection
  return run


_MKQA_LINE = json.dumps({"example_id": 1, "query": "Who?", "queries": {"en": "Who?"},
                         "answers": {"en": [{"type": "entity", "text": "Him"}]}}).encode()


def _beir(corpus=b'{"_id": "d1", "text": "x"}\n', queries=b'{"_id": "q1", "text": "y"}\n',
          qrels=b"query-id\tcorpus-id\tscore\nq1\td1\t1\n"):
  """What `python -m hybrid_jax.evaluate --dataset=beir --data_dir=DIR` reads first."""
  def run(tmp):
    _write(tmp / "beir" / "corpus.jsonl", corpus)
    _write(tmp / "beir" / "queries.jsonl", queries)
    _write(tmp / "beir" / "qrels" / "test.tsv", qrels)
    return beir_eval.BeirEvaluator(str(tmp / "beir"), show_progress=False).collection
  return run


def _override(*fields):
  def run(tmp):
    del tmp
    config_lib.check_overrides(runlocal_config("hybrid"), list(fields))
  return run


def _evaluate_workdir_with_corrupt_run_file(tmp):
  """`python -m hybrid_jax.evaluate --workdir=DIR`: a run file cut by a crash."""
  workdir = str(tmp / "run")
  import ml_collections  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  checkpointing.write_run_files(
      workdir, ml_collections.ConfigDict({"seed": 0}),
      encoder_lib.EncoderConfig(
          model_type="bert", vocab_size=427, hidden_size=16, num_hidden_layers=1,
          num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
          type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12),
      synthetic.build_tokenizer(synthetic.SyntheticSpec()))
  path = os.path.join(workdir, checkpointing.ENCODER_CONFIG_FILE)
  _write(path, open(path, "rb").read()[:40])
  return checkpointing.load_params(workdir, "best")


CASES = [
    # --- training data: parallel-examples JSONL (data/records.py) ------------------------------
    ("jsonl_invalid_byte", _train_jsonl(lambda t: _write(t / "d.jsonl", _BAD_BYTE_JSONL)),
     rf"d\.jsonl:3: is not UTF-8 text at byte offset {_BAD_OFFSET} in the file .*ff: invalid "
     r"start byte.*iconv"),
    ("jsonl_cut_in_a_character", _train_jsonl(lambda t: _write(t / "d.jsonl", _CUT_JSONL)),
     r"d\.jsonl:2: .*middle of a multi-byte character \(bytes c3\).*cut short"),
    ("jsonl_dev_null", _train_jsonl(lambda t: "/dev/null"),
     r"'/dev/null' is a character device \(such as /dev/null\), not a regular file"),
    ("jsonl_directory", _train_jsonl(lambda t: str(t)),
     r"Parallel-examples file .* is a directory, not a file \(data\.path\)"),
    ("jsonl_empty", _train_jsonl(lambda t: _write(t / "d.jsonl", b"")),
     r"d\.jsonl' is empty \(0 bytes\): no records"),
    ("jsonl_blank_lines_only", _train_jsonl(lambda t: _write(t / "d.jsonl", b"\n\n")),
     r"d\.jsonl: no records \(the file is empty\)"),
    # --- training data: LAReQA (data/lareqa.py) -------------------------------------------------
    ("lareqa_invalid_byte", _train_lareqa(_lareqa_dir_with_bad_byte),
     r"\.json: cannot read as JSON: .*\.json:1: is not UTF-8 text at byte offset 1 .*fe: invalid "
     r"start byte"),
    ("lareqa_dev_null", _train_lareqa(lambda t: "/dev/null"),
     r"LAReQA directory '/dev/null' is not a directory \(it is a device"),
    # --- embed text files (embed.py) ------------------------------------------------------------
    ("embed_invalid_byte", _embed(lambda t: _write(t / "t.txt", b"one\ntwo\nthr\xe9e\n")),
     r"t\.txt:3: is not UTF-8 text at byte offset 11 in the file \(column 4 of the line\)"),
    ("embed_cut_in_a_character", _embed(lambda t: _write(t / "t.txt", "one\nzwö".encode()[:-1])),
     r"t\.txt:2: .*middle of a multi-byte character"),
    ("embed_dev_null", _embed(lambda t: "/dev/null"), r"--input '/dev/null' is a character device"),
    ("embed_directory", _embed(lambda t: str(t)), r"--input .* is a directory, not a file"),
    ("embed_empty", _embed(lambda t: _write(t / "t.txt", b"")), r"t\.txt' is empty"),
    # --- mMARCO TSV (data/convert.py) -----------------------------------------------------------
    ("mmarco_queries_invalid_byte", _mmarco(queries=b"1\tWho?\n2\tW\x80o?\n"),
     r"q/en\.tsv:2: is not UTF-8 text at byte offset 10 in the file"),
    ("mmarco_collection_cut", _mmarco(collection="7\tHim.\n8\tHé".encode()[:-1]),
     r"c/en\.tsv:2: .*middle of a multi-byte character"),
    ("mmarco_triples_dev_null", _mmarco(triples_path="/dev/null"),
     r"triples file '/dev/null' is a character device"),
    # --- MKQA (search/mkqa.py) ------------------------------------------------------------------
    ("mkqa_invalid_byte", _mkqa(_MKQA_LINE + b"\n" + _MKQA_LINE.replace(b"Who", b"Wh\xc0")),
     rf"mkqa\.jsonl:2: is not UTF-8 text at byte offset "
     rf"{len(_MKQA_LINE) + 1 + _MKQA_LINE.index(b'Who') + 2} in the file"),
    ("mkqa_gz_invalid_byte", _mkqa(b"\xff" + _MKQA_LINE, name="mkqa.jsonl.gz"),
     r"mkqa\.jsonl\.gz:1: is not UTF-8 text at byte offset 0 of the decompressed data"),
    ("mkqa_empty", _mkqa(b"", name="mkqa.jsonl"), r"MKQA file .*mkqa\.jsonl is empty \(0 bytes\)"),
    # --- BEIR (search/beir_eval.py) -------------------------------------------------------------
    ("beir_corpus_invalid_byte", _beir(corpus=b'{"_id": "d1", "text": "\xed\xa0\x80"}\n'),
     r"corpus\.jsonl:1: is not UTF-8 text at byte offset 23 .*invalid continuation byte"),
    ("beir_qrels_invalid_byte", _beir(qrels=b"query-id\tcorpus-id\tscore\nq1\td\xf51\t1\n"),
     r"qrels/test\.tsv:2: is not UTF-8 text at byte offset 29"),
    # --- config overrides (config_lib.py) -------------------------------------------------------
    ("config_unknown_field", _override("train.nonexistent"),
     r"--config\.train\.nonexistent: config\.train has no field 'nonexistent'\. The fields of "
     r"config\.train are: adam_b1, .*weight_decay\."),
    ("config_misspelt_field", _override("train.learning_rat"),
     r"has no field 'learning_rat'\. Did you mean --config\.train\.learning_rate\b"),
    ("config_misspelt_section", _override("trian.num_steps"),
     r"config has no field 'trian'\. Did you mean --config\.train\? The fields of config are: "
     r"data, evals, mesh, model, seed, train\."),
    # --- run files of a workdir (checkpointing.py) ----------------------------------------------
    ("evaluate_corrupt_run_file", _evaluate_workdir_with_corrupt_run_file,
     r"encoder_config\.json is unreadable \(JSONDecodeError"),
]


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                for f in fs)


@pytest.mark.parametrize("name,run,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_with_status_2_and_writes_nothing(tmp_path, capfd, name,
                                                                      run, message):
  (tmp_path / "inputs").mkdir()
  inputs = tmp_path / "inputs"
  # Inputs are made inside the run (some are written by it); outputs must not appear.
  with pytest.raises(SystemExit) as exit_info:
    errors.exit_on_user_error(lambda: run(inputs))
  assert exit_info.value.code == errors.EXIT_USER_ERROR, name
  err = capfd.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  assert re.search(message, lines[0]), (name, lines[0])
  for written in ("workdir", "out", "output"):
    assert not (inputs / written).exists(), (name, _files(inputs / written))
  if name == "evaluate_corrupt_run_file":  # nothing written besides the run files made above
    assert "eval" not in os.listdir(inputs / "run")


def test_unknown_config_field_on_the_real_command_line(tmp_path):
  """The train CLI stops while parsing flags (before jax is imported): one line, status 2."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "hybrid_jax.train",
       f"--config={os.path.join(REPO, 'configs', 'xlmr_hybrid.py')}:runlocal",
       "--config.train.nonexistent=3", f"--workdir={workdir}"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      result.stderr.strip().splitlines()[0]] and "Traceback" not in result.stderr
  assert "config.train has no field 'nonexistent'" in result.stderr
  assert not workdir.exists()
