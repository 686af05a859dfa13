"""Issue 20, item 2: honest summary and fragmentation. With a trace, the "Peak Usage" column
comes from replaying the trace from the rebuilt starting state; a figure that cannot be
known prints n/a; the title names the snapshot's device kind; the fragmentation figures
use torch's viewer's names (requested vs allocated vs reserved, free = internal + external)
and one definition of fragmentation."""
import json
import pickle

import pytest

from helpers import fresh_python
from memdebug_snapshots import snapshots_dir
from mtia_alloc.memory import Snapshot
from mtia_alloc.tools.workload import trace_from_snapshot
from mtia_alloc.viz.model import Fragmentation

MiB = 1 << 20


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    return snapshots_dir(tmp_path_factory)


def row(table, label):
    line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [c.strip() for c in line.split("|")[2:6]]


def test_peak_column_is_the_replayed_peak_not_the_current_value(snaps):
    snap = Snapshot(f"{snaps}/base.pickle")
    with open(f"{snaps}/base.pickle", "rb") as f:
        info = trace_from_snapshot(pickle.load(f)).info
    table = snap.summary(0)
    cur, peak, tot_alloc, tot_freed = row(table, "Requested memory")
    assert peak == f"{info['recorded_peak_requested'] // 1024} KiB"  # the trace's own peak
    assert peak != cur and (tot_alloc, tot_freed) == ("n/a", "n/a")
    stats = snap.stats(0, replay=True)
    assert stats["requested_bytes.all.peak"] == info["recorded_peak_requested"]
    assert stats["reserved_bytes.all.peak"] == info["recorded_peak_reserved"]
    assert stats["requested_bytes.all.current"] == snap.requested
    assert stats["num_alloc_retries"] is None and stats["allocated_bytes.all.allocated"] is None
    assert "PyTorch CUDA memory summary" in table and "CUDA OOMs: 0" in table
    assert "device alloc retries: n/a" in table
    noted = snap.summary(0, notes=True)
    assert "Peak Usage: replay of" in noted and "Tot Alloc/Freed n/a" in noted


def test_without_a_trace_peaks_are_na(snaps):
    snap = Snapshot(f"{snaps}/segments.pickle")
    table = snap.summary(0)
    for label in ("Allocated memory", "Device reserved memory", "Allocations"):
        cur, peak, tot_alloc, tot_freed = row(table, label)
        assert cur != "n/a" and (peak, tot_alloc, tot_freed) == ("n/a", "n/a", "n/a")
    assert snap.stats(0)["reserved_bytes.all.peak"] is None


def test_summary_command_prints_the_figures_with_notes(snaps):
    proc = fresh_python("-m", "mtia_alloc", "summary", f"{snaps}/base.pickle")
    assert proc.returncode == 0, proc.stderr
    assert "Peak Usage: replay of" in proc.stdout and "total_free" in proc.stdout
    assert "PyTorch MTIA memory summary" not in proc.stdout


def hand_built():
    A = 0x7F0000000000
    return {"segments": [
        {"device": 0, "address": A, "total_size": 20 * MiB, "stream": 0, "segment_type": "large",
         "blocks": [{"size": 4 * MiB, "requested_size": 3 * MiB, "state": "active_allocated"},
                    {"size": 2 * MiB, "requested_size": 0, "state": "inactive"},
                    {"size": 4 * MiB, "requested_size": 4 * MiB, "state": "active_pending_free"},
                    {"size": 10 * MiB, "requested_size": 10 * MiB - 512, "state": "active_allocated"}]},
        {"device": 0, "address": A + 64 * MiB, "total_size": 2 * MiB, "stream": 0, "segment_type": "small",
         "blocks": [{"size": 2 * MiB, "requested_size": 0, "state": "inactive"}]}],
        "device_traces": [[]]}


def test_fragmentation_uses_torchs_names_and_one_definition():
    snap = Snapshot(hand_built())
    f = snap.fragmentation()
    assert isinstance(f, Fragmentation)
    assert f.reserved == 22 * MiB
    assert f.requested == 13 * MiB - 512          # torch's total_allocated: requested bytes
    assert f.allocated == 14 * MiB                # block bytes (memory_stats' allocated_bytes)
    assert f.internal == MiB + 512                # rounding
    assert f.external == 8 * MiB                  # not allocated: 2 MiB free + 4 MiB pending + 2 MiB unused segment
    assert f.free == f.internal + f.external == f.reserved - f.requested
    assert f.internal_share == pytest.approx(f.internal / f.free)
    assert f"({f.internal_share:.1%} internal)" in str(f) and "total_free" in str(f)
    # the one fragmentation figure: free bytes inside partly used segments / reserved
    assert f.free_in_partly_used == 2 * MiB and f.fragmentation == pytest.approx(2 / 22)
    assert f.fragmentation == f.ratio == snap.stats()["fragmentation.all"]
    text = str(f) + repr(f) + repr(snap)
    assert text.count("fragmentation") == 3 and "external fragmentation" not in text
    assert f"{f.fragmentation:.1%}" in repr(f) and f"fragmentation={f.fragmentation:.1%}" in repr(snap)
    # the repr names allocated (block bytes) and requested (torch's total_allocated) apart
    assert "allocated=14.00 MiB (requested 13.00 MiB)" in repr(snap)


def test_live_snapshot_is_mtia_and_round_trips(tmp_path):
    proc = fresh_python("-c", "import mtia_alloc as m\nm.init(); p = m.caching_allocator_alloc(1 << 20)\n"
                              "from mtia_alloc.memory import Snapshot\n"
                              f"s = Snapshot(); s.dump({str(tmp_path / 's.pickle')!r})\n"
                              "print(s.device_kind, Snapshot(" + repr(str(tmp_path / "s.pickle")) + ").device_kind)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["MTIA", "MTIA"]
    assert json.dumps(pickle.loads((tmp_path / "s.pickle").read_bytes())["device_kind"]) == '"MTIA"'


def test_peaks_replay_under_the_recorded_settings(snaps):
    with open(f"{snaps}/base.pickle", "rb") as f:
        data = pickle.load(f)
    data["allocator_settings"]["PYTORCH_CUDA_ALLOC_CONF"] = "pinned_num_register_threads:4,expandable_segments:True"
    figures = Snapshot(data).replay_figures(0)
    assert figures["conf"] == "expandable_segments:True" and "note" not in figures
    data["allocator_settings"]["PYTORCH_CUDA_ALLOC_CONF"] = "no_such_option:1"
    snap = Snapshot(data)
    assert snap.replay_figures(0)["conf"] == "" and "was refused" in snap.replay_figures(0)["note"]
    assert "replayed with the default settings" in snap.summary(0, notes=True)


def test_peaks_of_a_run_that_ended_in_an_oom_are_what_it_did(snaps):
    with open(f"{snaps}/oom.pickle", "rb") as f:
        info = trace_from_snapshot(pickle.load(f)).info
    stats = Snapshot(f"{snaps}/oom.pickle").stats(0, replay=True)
    assert stats["reserved_bytes.all.peak"] == info["recorded_peak_reserved"]  # the failed request left out
    assert stats["num_ooms"] == 1
