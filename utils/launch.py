"""`python -m utils.launch ...`: torchrun with quiet exits on signals (utils/training/launch.py)."""
import sys

from utils.training.launch import main

if __name__ == "__main__":
    sys.exit(main())
