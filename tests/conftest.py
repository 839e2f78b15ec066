"""Make the repository root importable (utils, data) whatever directory pytest runs from."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# README's test command runs two pytest workers (pytest-xdist) on a 2-core machine: one torch thread
# each, for the tests in the workers and the runs they start, or four threads fight over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402


def digits_folder(tmp_path_factory, size, per_class):
    """A data folder holding the real sklearn digits as <data>/digits/<class>/<n>.png."""
    from utils.data.digits import make_digits

    root = tmp_path_factory.mktemp("data")
    make_digits(str(root), size=size, per_class=per_class)
    return str(root)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """100 digits per class as 32x32 RGB PNGs: enough to learn something in two epochs."""
    return digits_folder(tmp_path_factory, 32, 100)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """12 digits per class as 16x16 PNGs: for runs whose outcome is not the point."""
    return digits_folder(tmp_path_factory, 16, 12)


def load_script(folder):
    """Import train/main.py or train_MB/main.py under a unique module name."""
    import importlib.util

    path = os.path.join(REPO, folder, "main.py")
    spec = importlib.util.spec_from_file_location(f"cdne_script_{folder}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
