"""Retrieval with a trained checkpoint: index images, query an index, evaluate a split.

    python -m utils.retrieve index    --checkpoint runs/X/checkpoint_best.pth --out ucm.index
    python -m utils.retrieve index    --checkpoint runs/X/checkpoint_best.pth --folder my_images/ --out mine.index
    python -m utils.retrieve index    --checkpoint runs/X/checkpoint_best.pth --folder more/ --out mine.index --append
    python -m utils.retrieve index    --checkpoint runs/Y/checkpoint_best.pth --out ucm.index --overwrite
    python -m utils.retrieve query    --index ucm.index path/to/image.tif [more images] --topk 10 --grid grid.png
    python -m utils.retrieve query    --index ucm.index path/to/image.tif --exclude-self --json results.json
    python -m utils.retrieve query    --index ucm.index path/to/image.tif --engine ivf --nprobe 32
    python -m utils.retrieve evaluate --checkpoint runs/X/checkpoint_best.pth --split test
    python -m utils.retrieve serve    --index ucm.index [--compare other.index] [--host 127.0.0.1 --port 8000]
    torchrun --nproc_per_node=4 -m utils.retrieve index ...   (each process encodes a share)

index and evaluate take the dataset, the data folder and the image extension from the flags
the checkpoint was trained with unless --dataset, --data or --imgEXT say otherwise.

An index is a folder of packed codes (bits / 8 bytes each, memory-mapped when queried), labels
where known, image paths, the checkpoint's configuration and a fingerprint of its weights (a
query or an --append with a checkpoint of other weights is refused, and so is an --out that
holds an index without --append or --overwrite); see
utils/retrieval/index_file.py. Queries are exact (ascending Hamming distance, ties by database
index) unless --engine names an approximate one, whose structure the first query builds and
keeps in the index folder for the next (utils/retrieval/engine_store.py). Every output path is
checked before encoding.
"""
import argparse

from utils.retrieval.engines import ENGINES

# The flags of each approximate engine (utils/retrieval/engines.py says what they do).
ENGINE_FLAGS = {name: tuple(cls.defaults) for name, cls in ENGINES.items()}
ENGINE_HELP = {
    "nlist": "ivf: number of clusters (default sqrt(database size))",
    "niter": "ivf: k-means rounds when building (default 10)",
    "nprobe": "ivf: clusters scanned per query (default 16; more: slower, higher recall)",
    "M": "hnsw: graph links per code (default 16)",
    "efConstruction": "hnsw: candidates explored while building (default 40)",
    "efSearch": "hnsw: candidates explored per query, at least --topk (default 128)",
    "nhash": "mih: number of hash tables (default 4)",
    "b": "mih: bits per hash table (default bits / nhash)",
    "nflip": "mih: bits flipped when probing a table (default 2)",
}


class ArgumentParser(argparse.ArgumentParser):
    """Bad flags get one line and exit 2, like every other bad input (the subcommands' parsers are of
    this class too: argparse makes them of their parent's)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser():
    p = ArgumentParser(prog="python -m utils.retrieve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, checkpoint_required=True):
        if checkpoint_required:
            q.add_argument("--checkpoint", required=True, help="a checkpoint_*.pth of a run")
        else:
            q.add_argument("--checkpoint", default=None,
                           help="a checkpoint_*.pth with the weights that built the index (default: the path "
                                "the index records; pass this when that run folder has moved)")
        q.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cuda, cuda:N, mps or cpu")
        q.add_argument("-b", "--batch-size", type=int, default=128, help="images encoded per batch (default 128)")
        q.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes (default 2)")

    def engine_flags(q):
        for flags in ENGINE_FLAGS.values():
            for flag in flags:
                q.add_argument(f"--{flag}", type=int, default=None, help=ENGINE_HELP[flag])

    def dataset(q):
        q.add_argument("--data", default=None,
                       help="folder holding the datasets (default: the checkpoint's --data, else the repo's data/)")
        q.add_argument("--dataset", default=None,
                       help="dataset folder under --data (default: the dataset the checkpoint was trained on)")
        q.add_argument("--imgEXT", default=None,
                       help="image file extension (default: the checkpoint's for its own dataset, else the "
                            "dataset's own, else tif)")
        q.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out")

    q = sub.add_parser("index", help="encode a split or a folder of images into an index (a folder)")
    common(q)
    dataset(q)
    q.add_argument("--split", default="train", choices=("train", "val", "test"),
                   help="split of the dataset to index (default train, the retrieval database)")
    q.add_argument("--folder", default=None, help="index every image under this folder instead")
    q.add_argument("--out", required=True, help="index to write (a folder, e.g. digits.index)")
    q.add_argument("--append", action="store_true",
                   help="add the images to the index at --out (built with the same weights); creates it when "
                        "there is none. Images it already holds (the same path) are refused")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the index at --out (without it, an existing index is refused); the old one "
                        "stays until the new one is written whole")
    q.add_argument("--allow-duplicates", action="store_true",
                   help="with --append: add images the index already holds (the same path) again")
    q = sub.add_parser("query", help="the top-k database images of one or more image files")
    common(q, checkpoint_required=False)
    q.add_argument("--index", required=True, help="an index written by `python -m utils.retrieve index`")
    q.add_argument("images", nargs="+", help="query image files")
    q.add_argument("--topk", type=int, default=10, help="results per query (default 10)")
    q.add_argument("--exclude-self", action="store_true",
                   help="leave a query's own image (same absolute path) out of its results")
    q.add_argument("--json", default=None, metavar="PATH",
                   help="also write the ranking as JSON here (- for stdout; the table then goes to stderr)")
    q.add_argument("--grid", default=None, help="write a picture of the results here (.png)")
    q.add_argument("--engine", default="exact", choices=("exact", *ENGINES),
                   help="exact (default: every code compared) or an approximate engine for very large "
                        "indexes: ivf, hnsw or mih. The first ivf or hnsw query with given build flags "
                        "builds the structure over the index's codes and keeps it in the index folder; later "
                        "ones load it (mih builds its tables at every query, in a moment)")
    q.add_argument("--rebuild-engine", action="store_true",
                   help="build the --engine structure again instead of loading the one kept in the index "
                        "folder (e.g. for the default nlist of an index that has grown by --append)")
    engine_flags(q)
    q = sub.add_parser("serve", help="a local web page over an index: pick or upload a query, see its top K "
                                     "with their distances, classes and metrics (JSON endpoints behind it)")
    common(q, checkpoint_required=False)
    q.add_argument("--index", required=True, help="an index written by `python -m utils.retrieve index`")
    q.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                        "network, with a warning: there is no login)")
    q.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    q.add_argument("--topk", type=int, default=20, help="results per query the page starts with (default 20)")
    q.add_argument("--compare", default=None, metavar="OTHER.index",
                   help="a second index of the same images (another checkpoint): the two rankings side by side")
    q.add_argument("--cache", default=None, metavar="DIR",
                   help="folder for thumbnails (made once) and uploads in flight (default NAME.index.cache beside "
                        "the index; the index folder itself is never written)")
    q.add_argument("--max-upload-mb", type=float, default=32, help="largest upload taken, in MiB (default 32)")
    q.add_argument("--max-pixels", type=int, default=50_000_000,
                   help="largest image decoded (an upload, or an indexed image made into a thumbnail), in pixels "
                        "(default 50,000,000)")
    q.add_argument("--engine", default="exact", choices=("exact", *ENGINES),
                   help="exact (default) or an approximate engine, as for query; a structure the index folder "
                        "does not keep is built in memory at start (the server writes nothing there)")
    engine_flags(q)
    q.set_defaults(rebuild_engine=False)
    q = sub.add_parser("evaluate", help="the metric table of a checkpoint on a split")
    common(q)
    dataset(q)
    q.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split whose images are the queries (default test); the database is the train split")
    q.add_argument("--topk", type=int, default=100, help="R of mAP@R and K of P@K, besides 20 and 100 (default 100)")
    q.add_argument("--json", default=None, help="also write the metrics here")
    return p
