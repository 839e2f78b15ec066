"""Hamming search under the names SPEC section 13 gives it; the code is in utils/retrieval/search.py."""
from .retrieval.search import BinaryIndex, hamming_topk

__all__ = ["BinaryIndex", "hamming_topk"]
