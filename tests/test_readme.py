"""README.md stays true: its Python quick tour runs as written, in a fresh process, and
every value a line's comment promises (`expr  # 4096`) is asserted."""
import ast
import pathlib
import re
import textwrap

from helpers import fresh_python

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
# A statement whose comment starts with the value it evaluates to, e.g. `x.sum()  # 2097152.0`.
PROMISE = re.compile(r"^(?P<code>[^#]+?)\s+#\s*(?P<value>-?\d+(?:\.\d+)?)(?:\W|$)")


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def with_assertions(block):
    """The block with each promised value turned into an assert on that line's last statement."""
    lines, promises = [], 0
    for line in block.splitlines():
        m = PROMISE.match(line)
        if m:
            *before, last = m["code"].split(";")
            try:
                ast.parse(last.strip(), mode="eval")
            except SyntaxError:
                pass
            else:
                lines.extend(s.strip() for s in before)
                lines.append(f"assert ({last.strip()}) == {m['value']}, {last.strip()!r}")
                promises += 1
                continue
        lines.append(line)
    return "\n".join(lines), promises


def test_the_promise_parser_asserts_what_a_comment_claims():
    code, promises = with_assertions("a = 2\na + 2  # 4\nb = 1; a * 3  # 7")
    assert promises == 2
    assert "assert (a + 2) == 4" in code and "assert (a * 3) == 7" in code
    ns = {}
    try:
        exec(code, ns)
    except AssertionError as e:
        assert "a * 3" in str(e)  # the wrong promise is the one that fails
    else:
        raise AssertionError("a false promise passed")


def test_readme_quick_tour_runs_and_keeps_its_promises(tmp_path):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no python block"
    code, promises = with_assertions(textwrap.dedent(blocks[0]))
    assert promises >= 2, "the tour's promised values were not found"
    # The tour runs against the package these tests import, wherever it is installed.
    done = fresh_python("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "snap.pickle").stat().st_size > 0  # the tour's _dump_snapshot wrote it
