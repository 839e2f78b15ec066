"""Make the repository root importable (utils, data) whatever directory pytest runs from."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """A small real-image dataset: 100 sklearn digits per class as 32x32 RGB PNGs."""
    from utils.digits import make_digits

    root = tmp_path_factory.mktemp("data")
    make_digits(str(root), size=32, per_class=100)
    return str(root)


def load_script(folder):
    """Import train/main.py or train_MB/main.py under a unique module name."""
    import importlib.util

    path = os.path.join(REPO, folder, "main.py")
    spec = importlib.util.spec_from_file_location(f"cdne_script_{folder}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
