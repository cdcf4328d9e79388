"""The README's library example runs as written and its shapes hold."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert tuple(scope["m_d"].shape) == (2, 4, 4)
    assert tuple(scope["matches"].shape) == (2, 2, 16)
    assert tuple(scope["W"].shape) == (2, 16)
    assert scope["W"].mean(dim=1).sub(1).abs().max() < 1e-5
    assert tuple(scope["loss"].shape) == (2,)


def test_readme_first_lines_hold_the_two_commands():
    head = README.read_text().splitlines()[:14]
    text = "\n".join(head)
    assert "focusdpo demo" in text and "pytest" in text
