"""`python -m mtia_alloc ranks A.pickle B.pickle ... [--by ...] [--json]`: one snapshot per
rank of a distributed run, side by side. Per rank: peak allocated and peak reserved
(replayed from each rebuilt starting state, all ranks at once, each on a fresh allocator),
segments, and the largest live allocations with their sites. The rank that peaks highest
(peak reserved; without a trace, reserved at the end) is flagged, and its difference from
the median rank is attributed to call sites (the diff command's figures).

Owns: ranks, ranks_main. Relies on: tools.diff (profiles, replays), viz (frames, reports)."""
import json

from ..viz.frames import SiteKey
from ..viz.reports import RanksReport
from . import diff as _diff

__all__ = ["ranks", "ranks_main"]


def ranks(paths, by="site", device=None, top=3, replay=True):
    """The RanksReport data of the snapshots at `paths` (rank = position)."""
    if len(paths) < 2:
        raise ValueError("ranks needs at least two snapshots (one per rank)")
    results = _diff.analyse(paths, by, device, top=top, replay=replay)
    profiles = [r["profile"] for r in results]
    reps = [r["replay"] for r in results]
    rows = []
    for i, (p, r) in enumerate(zip(paths, results)):
        prof, rep = r["profile"], r["replay"]
        ok = rep is not None and "error" not in rep
        rows.append({"rank": i, "input": p, "device": r["device"],
                     "peak_allocated": rep["peak_allocated"] if ok else None,
                     "peak_reserved": rep["peak_reserved"] if ok else None,
                     "reserved": prof["reserved"], "segments": prof["segments"], "live_end": prof["live_end"],
                     "live_peak": prof["live_peak"], "largest": prof.get("largest", []),
                     "replay_error": rep["error"] if rep is not None and not ok else None})

    def weight(row):
        return row["peak_reserved"] if row["peak_reserved"] is not None else row["reserved"]

    order = sorted(range(len(rows)), key=lambda i: (weight(rows[i]), i))
    peak_rank = order[-1]
    median_rank = order[(len(order) - 1) // 2]
    if median_rank == peak_rank:
        median_rank = order[-2]
    pa, pb = profiles[median_rank], profiles[peak_rank]
    diff = _diff.diff_profiles(paths[median_rank], paths[peak_rank], by, pa, pb, reps[median_rank],
                               reps[peak_rank], _diff._meta(paths[median_rank], results[median_rank]),
                               _diff._meta(paths[peak_rank], results[peak_rank]))
    return {"command": "ranks", "by": by, "rows": rows, "peak_rank": peak_rank, "median_rank": median_rank,
            "diff": diff}


def ranks_main(args):
    if args.top < 0:
        raise ValueError(f"--top must be at least 0, got {args.top}")
    SiteKey(args.by)
    report = RanksReport(ranks(args.snapshots, args.by, args.device, args.top))
    if args.json:
        print(json.dumps(report.data))
    else:
        print(report.table())
    return 0
