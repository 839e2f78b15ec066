"""Retrieval, all in one place:

* search.py      BinaryIndex (packed codes, exact Hamming search, memory-mapped files) and hamming_topk
* engines.py     BinaryIndex's approximate engines (faiss's binary IVF, HNSW, multi-index hashing)
* index_file.py  index folders: codes, labels, paths, the checkpoint that built them; old files
* build.py       encoding images into an index as they come, --append, shares under torchrun
* network.py     a checkpoint's network, its transform, encoding image files
* command.py     `python -m utils.retrieve index | query | evaluate` (parser.py: its flags;
                 outputs.py: output paths checked before any work)

utils/retrieve.py and utils/search.py are the names this code had before; they stay importable
(docs/method.md section 6) and only re-export it."""
