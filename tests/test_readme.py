"""The README's Python examples run as written (the ones that write into docs/results are left to the CLI tests)."""
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _blocks():
    with open(README) as f:
        text = f.read()
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "docs/results" not in b]


def test_readme_has_runnable_examples():
    blocks = _blocks()
    assert len(blocks) >= 2 and any("leaky_stack" in b for b in blocks) and any("LeakyEnsemble" in b for b in blocks)


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_example_runs(i, tmp_path):
    r = subprocess.run([sys.executable, "-c", _blocks()[i]], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
