"""Hamming search under the name SPEC section 13 gives it; the code is in utils/retrieval/search.py."""
from .retrieval.search import hamming_topk  # noqa: F401
