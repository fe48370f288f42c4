"""Corpus-scale retrieval: exact top-k search, the on-disk embedding store, TREC run files.

`topk.exact_topk` is the search core used by the BEIR / MKQA evaluators and by hard-negative
mining; see each module's docstring.
"""

from hybrid_jax.search.topk import SearchInputError, SearchResult, exact_topk, search_with_ranks

__all__ = ["SearchInputError", "SearchResult", "exact_topk", "search_with_ranks"]
