"""The command line's exit statuses and the one form of its messages on stderr
(`mtia_alloc: error: ...`, `mtia_alloc: warning: ...`, `mtia_alloc: interrupted`).

Owns: the statuses (OK, FAILED, USAGE, DOES_NOT_FIT, INTERRUPTED, BROKEN_PIPE), STATUS_HELP (their
description for --help), InputError and Failure (exceptions that carry their status),
error, warning, note. Relies on nothing of mtia_alloc."""
import sys

OK = 0           # done; a replay met no out-of-memory failure it did not expect
FAILED = 1       # a replay ran out of memory where its trace did not, could not rebuild a
                 # snapshot's starting state, or failed while running (the peer harness, a benchmark)
USAGE = 2        # usage or input error: bad arguments, an unreadable or malformed input file,
                 # an output file that cannot be written
DOES_NOT_FIT = 3  # fit: the workload does not fit the device (fit --sweep: no setting fits)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports a process that SIGINT ended)
BROKEN_PIPE = 141  # stdout closed early (`... | head`): 128 + SIGPIPE, as for cat or grep

PROG = "mtia_alloc"

STATUS_HELP = f"""exit status:
  {OK:<4} done (replay: no out-of-memory failure it did not expect)
  {FAILED:<4} replay: an allocation failed with out-of-memory where the trace did not
       (more failures than the trace records: a snapshot's 'oom' entries, an RMM log's
       'allocate failure' lines; failures injected with --fail-after are expected), or a
       snapshot's starting state could not be rebuilt; --allow-oom reports them and exits 0.
       Also: the peer harness or a benchmark failed while running
  {USAGE:<4} usage or input error (one 'mtia_alloc: error: ...' line on stderr)
  {DOES_NOT_FIT:<4} fit: the workload does not fit the device (--sweep: under no setting)
  {INTERRUPTED:<4} interrupted (Ctrl-C)
  {BROKEN_PIPE:<4} stdout was closed before the output was written (e.g. '| head -1'), quietly"""


class InputError(ValueError):
    """Bad arguments or input: exit status USAGE."""
    status = USAGE


class Failure(RuntimeError):
    """The command ran and failed (its report, if any, is printed): exit status FAILED."""
    status = FAILED


def _say(text):
    try:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)
    except OSError:  # stderr closed too: nothing left to tell
        pass


def error(message):
    """One `mtia_alloc: error: ...` line on stderr."""
    _say(f"error: {message}")


def warning(message):
    _say(f"warning: {message}")


def note(message):
    """A bare `mtia_alloc: ...` line on stderr (e.g. 'interrupted')."""
    _say(message)
