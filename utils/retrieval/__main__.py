"""python -m utils.retrieval: the same command as python -m utils.retrieve."""
import sys

from utils.retrieval.command import main

if __name__ == "__main__":
    sys.exit(main())
