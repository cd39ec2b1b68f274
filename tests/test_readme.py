"""The README's Python example runs as written."""
import re
from pathlib import Path

import pytest


@pytest.mark.slow
def test_readme_engine_example_runs(capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block.replace("max_tokens=64", "max_tokens=8"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
