"""The training scripts' flags under the name the interface keeps; the code is in utils/training/flags.py."""
from utils.training.flags import ArgumentParser, build_parser, check_args

__all__ = ["ArgumentParser", "build_parser", "check_args"]
