"""Retrieval, all in one place: Hamming search (search.py: BinaryIndex and hamming_topk), index
files (index_file.py), a checkpoint's network and the encoding of images (network.py), and the
command `python -m utils.retrieve index | query | evaluate` (command.py).

utils/retrieve.py and utils/search.py are the names this code had before; they stay importable
(SPEC section 13) and only re-export it."""
