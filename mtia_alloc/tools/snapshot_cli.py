"""The `summary` and `plot` commands: a snapshot file (ours or PyTorch's) printed as the
overview, fragmentation figures and memory_summary table, or drawn as an HTML page. Bad input
(and an output file that cannot be written) ends in one `mtia_alloc: error: ...` line on
stderr and exit status 2 (exit_status.USAGE), no traceback.

Owns: summary_main, plot_main. Relies on: viz (Snapshot, the HTML name rules),
tools.exit_status."""
import pickle

from ..viz.model import Snapshot
from ..viz.render import is_html_name, not_html_message
from .exit_status import OK, USAGE, error

__all__ = ["summary_main", "plot_main"]


def _open(path):
    try:
        return Snapshot(path)
    except (OSError, ValueError, TypeError, KeyError, pickle.UnpicklingError, EOFError) as e:
        error(f"cannot read snapshot {_without_path(e, path)}")
        return None


def _without_path(e, path):
    """`{path}: why` for an error whose message may already start with the path."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return text if text.startswith(f"{path}:") else f"{path}: {text}"


def summary_main(path):
    """`python -m mtia_alloc summary SNAPSHOT`: prints the overview, the fragmentation figures
    and the memory_summary table of each device. Works on PyTorch's pickles too. Returns the
    exit status."""
    snap = _open(path)
    if snap is None:
        return USAGE
    try:
        print(repr(snap))
        print()
        print(snap.fragmentation())
        print()
        print(snap.summary(notes=True), end="")
    except (KeyError, TypeError, ValueError) as e:
        error(f"malformed snapshot {_without_path(e, path)}")
        return USAGE
    return OK


def plot_main(path, out):
    """`python -m mtia_alloc plot SNAPSHOT -o FILE`: writes the HTML view. Returns the exit status."""
    if not is_html_name(out):
        error(f"-o: {not_html_message(out)}")
        return USAGE
    snap = _open(path)
    if snap is None:
        return USAGE
    try:
        snap.plot(out)
    except OSError as e:
        error(f"cannot write {out}: {e.strerror or e}")
        return USAGE
    except (KeyError, TypeError, ValueError) as e:
        error(f"malformed snapshot {_without_path(e, path)}")
        return USAGE
    print(f"wrote {out}")
    return OK
