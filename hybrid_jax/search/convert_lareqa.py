r"""Command line of search/lareqa_corpus.py: XQuAD-R + MLQA-R as one BEIR-format corpus.

    python -m hybrid_jax.search.convert_lareqa --out=DIR [--xquad_dir=...] [--mlqa_dir=...]

Flags only; the conversion (and what the corpus holds) is hybrid_jax/search/lareqa_corpus.py.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from hybrid_jax import errors
from hybrid_jax.data import locations
from hybrid_jax.search import lareqa_corpus

_OUT = flags.DEFINE_string("out", None, "Output BEIR directory.", required=True)
_XQUAD = flags.DEFINE_string("xquad_dir", "", "XQuAD-R directory (default "
                             "$HYBRID_JAX_DATA/xquad-r).")
_MLQA = flags.DEFINE_string("mlqa_dir", "", "MLQA-R directory (default $HYBRID_JAX_DATA/mlqa-r).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  dirs = {"xquad-r": locations.dataset_dir("xquad-r", _XQUAD.value),
          "mlqa-r": locations.dataset_dir("mlqa-r", _MLQA.value)}
  counts = errors.exit_on_user_error(lambda: lareqa_corpus.convert(_OUT.value, dirs))
  print(f"wrote {counts['passages']} passages, {counts['queries']} queries and "
        f"{counts['qrels']} qrels in {len(counts['languages'])} languages "
        f"({' '.join(counts['languages'])}) to {_OUT.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
