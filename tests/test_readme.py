"""The README's Python examples run as written, in order, in one namespace (a later block uses what an
earlier one made), and the README stays short."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_is_at_most_200_lines():
    with open(README, encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 200


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 3  # quick start, the modern recipe, generation
    monkeypatch.chdir(tmp_path)  # the quick start saves pride.keras here
    namespace = {"__name__": "__readme__"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "pride.keras").is_file()
    assert "It is a truth" in capsys.readouterr().out
