"""An approximate engine's structure kept in the index folder, so that only the first query with
given build flags pays for the build (IVF's k-means over 10^7 codes takes minutes to an hour on
a CPU); later queries load it, and codes appended since are added to it, not rebuilt.

    NAME.index/engine-ivf.faiss   the faiss binary index (faiss.serialize_index_binary)
    NAME.index/engine-ivf.json    what it was built from: bits, the weights' fingerprint, the
                                  build flags asked (None: the default) and used, and the number
                                  of the folder's codes it holds

It is valid for the folder because an index folder only grows: `--append` adds rows after the
last, and a rebuilt index replaces the whole folder (and so its engine files). One structure is
kept per engine; a query with other build flags builds and keeps its own in its place.
Search-time flags (nprobe, efSearch, nflip) never need a rebuild.
"""
import json
import os
import sys
import time

import numpy as np

from utils.errors import UserError
from utils.retrieval.engines import ENGINES
from utils.training.checkpoint import write_atomically, write_json_atomic

# The flags that shape each kept structure (multi-index hashing is not kept: see attach).
BUILD_FLAGS = {name: ENGINES[name].build_flags() for name in ("ivf", "hnsw")}


def files_of(folder, engine):
    return os.path.join(folder, f"engine-{engine}.faiss"), os.path.join(folder, f"engine-{engine}.json")


def read_record(file):
    try:
        with open(file) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def attach(search, folder, header, asked, rebuild=False, say=None, keep_built=True):
    """Give BinaryIndex `search` (an approximate engine over the folder's codes) its structure:
    loaded from the folder when one was kept for these build flags, else built and kept there.
    `asked`: the engine flags given on the command line (None where left to the default).
    keep_built=False (`retrieve serve`, which never writes into the index folder): built or grown
    in memory only."""
    say = say or (lambda text: print(text, file=sys.stderr))
    engine = search.engine
    if engine not in BUILD_FLAGS:  # multi-index hashing: its tables are rebuilt in a moment
        return
    structure, record_file = files_of(folder, engine)
    want = {"bits": search.bits, "weights_sha256": header.get("weights_sha256"),
            "asked": {flag: asked.get(flag) for flag in BUILD_FLAGS[engine]}}
    record = None if rebuild else read_record(record_file)
    kept = (record is not None and {key: record.get(key) for key in want} == want
            and 0 < record.get("count", 0) <= len(search) and os.path.isfile(structure)
            and os.path.getsize(structure) == record.get("bytes"))
    started = time.perf_counter()
    if kept:
        try:
            search.approx.deserialize(np.memmap(structure, np.uint8, "r"), record["count"])
            kept = search.approx.index.ntotal == record["count"]
        except RuntimeError:  # faiss could not read it: damaged, or from an incompatible faiss
            kept = False
        if not kept:
            say(f"the {engine} structure kept in {structure} does not hold the {record['count']} codes its record "
                f"says; building it again")
            search.approx.index, search.approx.built = None, 0
    if kept:
        search.approx.params.update(record["used"])
        grown = len(search) - record["count"]
        search.approx.sync(search.codes)
        say(f"loaded the {engine} structure kept in {structure} ({record['count']} codes"
            + (f"; added the {grown} appended since" if grown else "") + f", {time.perf_counter() - started:.1f} s)")
        if not grown:
            return
    else:
        search.approx.sync(search.codes)
        say(f"built the {engine} structure over {len(search)} codes ({engine_params(search)}) in "
            f"{time.perf_counter() - started:.1f} s")
    if not keep_built:
        say(f"not kept in {folder}: this command does not write into the index folder (a `retrieve query "
            f"--engine {engine}` with the same build flags keeps it)")
        return
    keep(search, structure, record_file, want, say)


def keep(search, structure, record_file, want, say):
    data = search.approx.serialize(search.codes)
    used = {flag: search.approx.params[flag] for flag in BUILD_FLAGS[search.engine]}
    try:
        if os.path.exists(record_file):  # no moment where an old record describes the new structure
            os.remove(record_file)
        write_atomically(structure, lambda fh: fh.write(data), suffix=".faiss")
        write_json_atomic(record_file, {**want, "used": used, "count": len(search), "bytes": len(data)})
    except (UserError, OSError) as err:  # a read-only index folder: the query goes on, the next one builds again
        say(f"warning: the {search.engine} structure could not be kept in the index folder, so the next query "
            f"builds it again: {err}")
        return
    say(f"kept it in {structure} ({len(data) / 2**20:.1f} MB): later queries with these build flags load it")


def engine_params(search):
    return ", ".join(f"{key} {value}" for key, value in search.params.items())
