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
    key = SiteKey(by)
    loaded = [_diff._load(p, device) for p in paths]
    _diff.check_kinds(paths, [s for s, _, _ in loaded])
    profiles = [_diff.site_profile(s, d, key, top=top) for s, d, _ in loaded]
    reps = _diff._replays([w for _, _, w in loaded]) if replay else [None] * len(paths)
    rows = []
    for i, (p, (s, d, w), prof, r) in enumerate(zip(paths, loaded, profiles, reps)):
        ok = r is not None and "error" not in r
        rows.append({"rank": i, "input": p, "device": d,
                     "peak_allocated": r["peak_allocated"] if ok else None,
                     "peak_reserved": r["peak_reserved"] if ok else None,
                     "reserved": prof["reserved"], "segments": prof["segments"], "live_end": prof["live_end"],
                     "live_peak": prof["live_peak"], "largest": prof.get("largest", []),
                     "replay_error": r["error"] if r is not None and not ok else None})

    def weight(row):
        return row["peak_reserved"] if row["peak_reserved"] is not None else row["reserved"]

    order = sorted(range(len(rows)), key=lambda i: (weight(rows[i]), i))
    peak_rank = order[-1]
    median_rank = order[(len(order) - 1) // 2]
    if median_rank == peak_rank:
        median_rank = order[-2]
    pa, pb = profiles[median_rank], profiles[peak_rank]
    diff = _diff.diff_profiles(paths[median_rank], paths[peak_rank], by, pa, pb, reps[median_rank], reps[peak_rank],
                               {"input": paths[median_rank], "device": rows[median_rank]["device"],
                                "live_end": pa["live_end"], "live_peak": pa["live_peak"],
                                "peak_event": pa["peak_event"], "curve": pa["curve"]},
                               {"input": paths[peak_rank], "device": rows[peak_rank]["device"],
                                "live_end": pb["live_end"], "live_peak": pb["live_peak"],
                                "peak_event": pb["peak_event"], "curve": pb["curve"]})
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
