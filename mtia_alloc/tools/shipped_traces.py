"""The allocation traces shipped with mtia_alloc (package data in tools/traces/): three
recorded from PyTorch models (gpt2_generate, gpt2_train, resnet50_train) and two synthetic
ones shaped like RMM's random_allocations benchmark (rmm_random_100k_4MiB,
rmm_random_100k_1MiB_2streams). Each is `<name>.csv.gz` (lines `op,id,size_bytes,stream`)
with `<name>.meta.json` (how it was recorded, its statistics and phase boundaries).
`bench` replays them when no shared traces folder is found, and `replay NAME` takes one
by name.

Owns: SHIPPED_DIR, shipped_traces, resolve_trace. Relies on nothing of mtia_alloc."""
import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "traces"
SUFFIX = ".csv.gz"


def shipped_traces(folder=SHIPPED_DIR):
    """{name: path of its .csv.gz} of the shipped traces, sorted by name."""
    return {p.name[:-len(SUFFIX)]: p for p in sorted(Path(folder).glob("*" + SUFFIX))}


def resolve_trace(arg, folder=SHIPPED_DIR):
    """`arg` itself when it names an existing file (or is not a shipped trace's name), else
    the path of the shipped trace of that name (with or without .csv.gz)."""
    if os.path.exists(arg) or os.sep in arg:
        return arg
    name = arg[:-len(SUFFIX)] if arg.endswith(SUFFIX) else arg
    path = shipped_traces(folder).get(name)
    return str(path) if path else arg
