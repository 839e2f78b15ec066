"""Hamming search under the names the interface keeps (docs/method.md section 6); the code is in utils/retrieval/search.py."""
from utils.retrieval.search import BinaryIndex, hamming_topk

__all__ = ["BinaryIndex", "hamming_topk"]
