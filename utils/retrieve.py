"""python -m utils.retrieve: the retrieval command, whose code lives in utils/retrieval/
(command.py; see that package's docstring). Kept so that the command and imports keep working."""
import sys

from utils.retrieval.command import main
from utils.retrieval.index_file import weights_fingerprint
from utils.retrieval.network import Loaded, encode_files, load_model, transform_of
from utils.retrieval.parser import build_parser

__all__ = ["Loaded", "build_parser", "encode_files", "load_model", "main", "transform_of", "weights_fingerprint"]

if __name__ == "__main__":
    sys.exit(main())
