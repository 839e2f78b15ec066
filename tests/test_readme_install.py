"""README's quick start and CI agree: CI runs README's test command as written, and the install
fallback for a machine that cannot reach PyTorch's CPU index pins the same versions."""
import os
import re

from conftest import REPO


def readme():
    with open(os.path.join(REPO, "README.md")) as fh:
        return fh.read()


def test_ci_runs_readmes_test_command_as_written():
    command = re.search(r"Run the tests:\n\n```bash\n(.+)\n```", readme()).group(1)
    assert command == ".venv/bin/python -m pytest -q -n 2 tests"
    with open(os.path.join(REPO, ".ci", "run")) as fh:
        assert command in [line.strip() for line in fh]


def test_the_cpu_install_has_a_fallback_without_pytorchs_index():
    text = readme()
    cpu_line = re.search(r"^python3 -m venv .venv && .*--index-url https://download.pytorch.org/whl/cpu.*$", text,
                         re.M).group(0)
    pins = re.findall(r"torch==\S+ torchvision==\S+", cpu_line)
    assert len(pins) == 1
    fallback = re.search(r"Where download.pytorch.org cannot be reached[^`]*`([^`]+)`", text).group(1)
    assert fallback == f"python3 -m venv .venv && .venv/bin/pip install {pins[0]} && .venv/bin/pip install -r " \
                       "requirements.txt"
    assert fallback in cpu_line.replace(" --index-url https://download.pytorch.org/whl/cpu", "")
