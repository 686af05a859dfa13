"""The `summary` and `plot` commands: a snapshot file (ours or PyTorch's) printed as the
overview, fragmentation figures and memory_summary table, or drawn as an HTML page. Bad
input ends in one `mtia_alloc: ...` line on stderr and a non-zero status, no traceback.

Owns: summary_main, plot_main. Relies on: viz (Snapshot, the HTML name rules)."""
import pickle
import sys

from ..viz.model import Snapshot
from ..viz.render import is_html_name, not_html_message

__all__ = ["summary_main", "plot_main"]


def _open(path):
    try:
        return Snapshot(path)
    except (OSError, ValueError, TypeError, KeyError, pickle.UnpicklingError, EOFError) as e:
        print(f"mtia_alloc: cannot read snapshot {path}: {e}", file=sys.stderr)
        return None


def summary_main(path):
    """`python -m mtia_alloc summary SNAPSHOT`: prints the overview, the fragmentation figures
    and the memory_summary table of each device. Works on PyTorch's pickles too. Returns the
    exit status."""
    snap = _open(path)
    if snap is None:
        return 1
    try:
        print(repr(snap))
        print()
        print(snap.fragmentation())
        print()
        print(snap.summary(notes=True), end="")
    except (KeyError, TypeError, ValueError) as e:
        print(f"mtia_alloc: malformed snapshot {path}: {e}", file=sys.stderr)
        return 1
    return 0


def plot_main(path, out):
    """`python -m mtia_alloc plot SNAPSHOT -o FILE`: writes the HTML view. Returns the exit status."""
    if not is_html_name(out):
        print(f"mtia_alloc: {not_html_message(out)}", file=sys.stderr)
        return 2
    snap = _open(path)
    if snap is None:
        return 1
    try:
        snap.plot(out)
    except OSError as e:
        print(f"mtia_alloc: cannot write {out}: {e}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError) as e:
        print(f"mtia_alloc: malformed snapshot {path}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
