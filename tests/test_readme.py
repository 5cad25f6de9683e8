"""The README's Python snippets run as written, and what they print is what they say."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
    snippet = SNIPPETS[index]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, f"README snippet {index}", "exec"), {})
    lines = printed.getvalue().splitlines()
    # Where a print line carries a "# value" comment, the printed line must start with that value.
    expected = [m.group(1).split(":")[0].split(" and ")[0].strip()
                for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", snippet, flags=re.M)]
    assert len(lines) >= len(expected)
    for line, claim in zip(lines, expected):
        assert line.startswith(claim), (line, claim)
