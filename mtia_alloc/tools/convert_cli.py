"""The `convert` command: a streamed memory history (.mtrace, record_memory_history(path=...))
or a window of it (--from/--to: event indices, or times from the start such as 2.5s, 300ms)
written as a snapshot pickle in PyTorch's schema (segments + device_traces), which the
memory_viz page, `summary`, `plot`, `replay`, `fit` and `diff` read. Bad input (not a
.mtrace, a header cut short, a window outside the recording, an output that cannot be
written) ends in one `mtia_alloc: error: ...` line and exit status 2; a file cut short
after its header (a crash while recording) converts up to its last complete event, with
one warning line.

Owns: add_command, convert_main. Relies on: mtrace (the reader), tools.exit_status."""
import os
import pickle

from .. import mtrace
from .exit_status import OK, USAGE, error, warning

__all__ = ["add_command", "convert_main", "read_recording"]


def read_recording(path, warn=True):
    """mtrace.read with the CLI's messages: ValueError naming the problem; a partial last
    record is one warning line."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a .mtrace recording")
    try:
        rec = mtrace.read(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    if rec.partial_bytes and warn:
        warning(f"{path}: the recording was cut short (its last {rec.partial_bytes} bytes are a partial "
                f"record); read the {len(rec.events)} complete events before it")
    return rec


def convert_main(args):
    try:
        rec = read_recording(args.input)
        snap = rec.to_snapshot(args.start, args.stop)
    except ValueError as e:
        error(f"convert: {e}")
        return USAGE
    try:
        with open(args.output, "wb") as f:
            pickle.dump(snap, f, protocol=4)  # the memory_viz page refuses protocol 5
    except OSError as e:
        error(f"convert: cannot write {args.output}: {e.strerror or e}")
        try:
            if os.path.isfile(args.output) and os.path.getsize(args.output) == 0:
                os.unlink(args.output)
        except OSError:
            pass
        return USAGE
    n = sum(len(t) for t in snap["device_traces"])
    print(f"wrote {args.output}: {n} events of {len(rec.events)}, {len(snap['segments'])} segments")
    return OK


def add_command(sub):
    c = sub.add_parser("convert", help="turn a streamed history (.mtrace) into a snapshot pickle")
    c.add_argument("input", help="a .mtrace file written by record_memory_history(path=...)")
    c.add_argument("-o", "--output", required=True, help="the snapshot pickle to write")
    c.add_argument("--from", dest="start", metavar="WHEN",
                   help="first event of the window: an index (0 = the first) or a time from the start (2.5s, 300ms)")
    c.add_argument("--to", dest="stop", metavar="WHEN", help="end of the window (exclusive), same forms")
    c.set_defaults(func=convert_main)
