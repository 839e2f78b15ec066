"""python -m utils.retrieve: the retrieval command, whose code lives in utils/retrieval/
(command.py; see that package's docstring). Kept so that the command and imports keep working."""
import sys

from .retrieval.command import *  # noqa: F401,F403
from .retrieval.command import build_parser, main  # noqa: F401
from .retrieval.index_file import weights_fingerprint  # noqa: F401
from .retrieval.network import Loaded, encode_files, load_model, transform_of  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
