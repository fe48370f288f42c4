"""Session fixtures of the evaluator tests: the real LAReQA collections scored on the full grid."""

from __future__ import annotations

import pytest

from eval_helpers import Scored  # tests/eval/eval_helpers.py


@pytest.fixture(scope="session")
def xquad_scored() -> Scored:
  return Scored("xquad-r")


@pytest.fixture(scope="session")
def mlqa_scored() -> Scored:
  return Scored("mlqa-r")
