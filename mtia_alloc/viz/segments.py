"""The parts of a snapshot: Block, Segment (a segment and its blocks, from PyTorch's
snapshot dicts) and Fragmentation (the free memory of a set of segments, in the terms of
PyTorch's memory viewer). Split out of viz.model, which builds them.

Owns: Block, Segment, Fragmentation, _requested (a block's requested size). Relies on: viz.frames (call sites),
_format (format_bytes); plain dicts only."""
from .._format import format_bytes
from .frames import format_frame, user_frames, where

ACTIVE_STATES = ("active_allocated", "active_pending_free")
SMALL_SEGMENT_MAX = 2 << 20  # PyTorch's small-pool segment size (kSmallBuffer)


class Block:
    """One block of a segment: address, size, requested_size, state, frames, segment."""
    __slots__ = ("address", "size", "requested_size", "state", "frames", "segment")

    def __init__(self, address, size, requested_size, state, frames, segment):
        self.address = address
        self.size = size
        self.requested_size = requested_size
        self.state = state
        self.frames = frames
        self.segment = segment

    @property
    def device(self):
        return self.segment.device

    @property
    def is_active(self):
        """Allocated, or freed but still in use by another stream (pending free)."""
        return self.state in ACTIVE_STATES

    @property
    def is_allocated(self):
        return self.state == "active_allocated"

    @property
    def is_free(self):
        return self.state not in ACTIVE_STATES

    @property
    def end(self):
        return self.address + self.size

    @property
    def where(self):
        """The allocation site ('file.py:12 in fn'): the first user frame of the stack,
        unwinder, torch/c10 and mtia_alloc frames skipped (viz.frames); '' without a stack."""
        return where(self.frames)

    @property
    def user_frames(self):
        """The stack's user frames, innermost first (self.frames is the full stack)."""
        return user_frames(self.frames)

    @property
    def stack(self):
        """The full stack as 'file.py:12 in fn' lines, innermost first."""
        return [format_frame(fr) for fr in self.frames if isinstance(fr, dict)]

    def __repr__(self):
        parts = [f"{self.address:#x}", format_bytes(self.size), self.state]
        if self.is_active and self.requested_size != self.size:
            parts.append(f"requested {format_bytes(self.requested_size)}")
        parts.append(f"device {self.segment.device}")
        where = self.where
        if where:
            parts.append(f"at {where}")
        return f"Block({', '.join(parts)})"


class Segment:
    """One device allocation (a cudaMalloc-like reservation) and the blocks tiling it.
    The per-state totals are computed once from the raw block dicts; Block objects are made
    on first use of .blocks."""
    __slots__ = ("device", "address", "total_size", "stream", "segment_type", "pool_id", "is_expandable",
                 "frames", "allocated_size", "active_size", "requested_size", "pending_free_size",
                 "largest_free_block", "n_blocks", "n_allocated", "n_active", "_raw_blocks", "_blocks",
                 "allocated_requested_size")

    def __init__(self, d):
        self.device = int(d.get("device", 0))
        self.address = int(d["address"])
        self.total_size = int(d["total_size"])
        self.stream = int(d.get("stream", 0) or 0)
        seg_type = d.get("segment_type")
        self.segment_type = seg_type if seg_type in ("small", "large") else (
            "small" if self.total_size <= SMALL_SEGMENT_MAX else "large")
        pool = d.get("segment_pool_id", (0, 0))
        self.pool_id = tuple(int(x) for x in pool) if isinstance(pool, (tuple, list)) else (0, 0)
        self.is_expandable = bool(d.get("is_expandable", False))
        self.frames = d.get("frames") or []
        raw = d.get("blocks", ())
        allocated = active = requested = pending = largest = n_alloc = n_active = alloc_req = 0
        for b in raw:
            state = b.get("state")
            size = b["size"]
            if state == "active_allocated":
                allocated += size
                n_alloc += 1
                alloc_req += _requested(b)
            elif state != "active_pending_free":
                if size > largest:
                    largest = size
                continue
            else:
                pending += size
            active += size
            n_active += 1
            requested += _requested(b)
        self.allocated_size = int(allocated)
        self.active_size = int(active)
        self.requested_size = int(requested)
        self.allocated_requested_size = int(alloc_req)  # requested bytes of allocated blocks only
        self.pending_free_size = int(pending)
        self.largest_free_block = int(largest)
        self.n_blocks = len(raw)
        self.n_allocated = n_alloc
        self.n_active = n_active
        self._raw_blocks = raw
        self._blocks = None

    @property
    def blocks(self):
        """Block objects in address order (the page's rule: they tile the segment in list order)."""
        if self._blocks is None:
            out, addr = [], self.address
            for b in self._raw_blocks:
                size = int(b["size"])
                frames = b.get("frames")
                if frames is None:
                    history = b.get("history")
                    if history and isinstance(history, list) and isinstance(history[0], dict):
                        frames = history[0].get("frames")
                out.append(Block(addr, size, _requested(b), b.get("state", "inactive"), frames or [], self))
                addr += size
            self._blocks = out
        return self._blocks

    @property
    def end(self):
        return self.address + self.total_size

    @property
    def free_size(self):
        """Bytes of inactive blocks."""
        return self.total_size - self.active_size

    @property
    def is_free(self):
        """No active block: empty_cache() can give this segment back to the device."""
        return self.active_size == 0

    @property
    def is_split(self):
        return self.n_blocks > 1

    @property
    def where(self):
        return where(self.frames)

    def __repr__(self):
        parts = [f"device {self.device}", f"{self.address:#x}", f"{format_bytes(self.total_size)} {self.segment_type}",
                 f"{format_bytes(self.allocated_size)} allocated in {self.n_allocated} of {self.n_blocks} blocks"]
        if self.pending_free_size:
            parts.append(f"{format_bytes(self.pending_free_size)} pending free")
        parts.append(f"largest free {format_bytes(self.largest_free_block)}")
        if self.stream:
            parts.append(f"stream {self.stream}")
        if self.pool_id != (0, 0):
            parts.append(f"pool {self.pool_id}")
        if self.is_expandable:
            parts.append("expandable")
        return f"Segment({', '.join(parts)})"


def _requested(b):
    """requested_size of a block dict; without one, the legacy history's real_size, else size."""
    req = b.get("requested_size")
    if req is not None:
        return int(req)
    history = b.get("history")
    if history and isinstance(history, list) and isinstance(history[0], dict) and "real_size" in history[0]:
        return int(history[0]["real_size"])
    return int(b["size"])


class Fragmentation:
    """Where the reserved memory goes, in torch's viewer's terms (torch.cuda._memory_viz
    segsum: total_reserved, total_allocated, total_free with its internal share).

    reserved              bytes of all segments (torch: total_reserved)
    requested             bytes the user asked for, over allocated blocks (torch's viewer
                          calls this total_allocated; memory_stats: requested_bytes)
    allocated             block bytes of allocated blocks (memory_stats: allocated_bytes);
                          allocated - requested is the rounding
    free                  reserved - requested (torch: total_free) = internal + external
    internal              allocated - requested: free because requests are rounded up
    external              bytes of blocks that are not allocated (inactive, or pending free)
    pending_free          bytes freed by the user but still used by another stream (part of external)
    free_in_partly_used   inactive bytes in segments that also hold active blocks: neither
                          usable for a request larger than its pieces nor releasable
                          (memory_stats: inactive_split_bytes)
    partly_used_segments  how many such segments
    releasable            inactive bytes in segments without an active block (empty_cache frees them)
    largest_free_block    {"all", "small_pool", "large_pool"}: the biggest inactive block of each kind
    largest_free_block_by_pool  {segment_pool_id: bytes}; (0, 0) is the default pool
    fragmentation         free_in_partly_used / reserved: THE fragmentation figure of mtia_alloc,
                          the same as memory_stats()'s fragmentation.all (inactive_split_bytes /
                          reserved_bytes). `ratio` is the same number.
    """

    def __init__(self, segments):
        self.reserved = self.free_in_partly_used = self.releasable = self.pending_free = 0
        self.requested = self.allocated = self.inactive = 0
        self.partly_used_segments = 0
        self.largest_free_block = lf = {"all": 0, "small_pool": 0, "large_pool": 0}
        self.largest_free_block_by_pool = by_pool = {}
        for s in segments:
            self.reserved += s.total_size
            self.pending_free += s.pending_free_size
            self.allocated += s.allocated_size
            self.requested += s.allocated_requested_size
            free_here = s.total_size - s.active_size
            self.inactive += free_here
            largest = s.largest_free_block
            if largest:
                kind = "small_pool" if s.segment_type == "small" else "large_pool"
                lf[kind] = max(lf[kind], largest)
                lf["all"] = max(lf["all"], largest)
                by_pool[s.pool_id] = max(by_pool.get(s.pool_id, 0), largest)
            if s.active_size == 0:
                self.releasable += free_here
            elif free_here:
                self.free_in_partly_used += free_here
                self.partly_used_segments += 1
        self.internal = self.allocated - self.requested
        self.external = self.reserved - self.allocated
        self.free = self.internal + self.external
        self.fragmentation = self.ratio = self.free_in_partly_used / self.reserved if self.reserved else 0.0

    @property
    def internal_share(self):
        """internal / free (torch's "(X% internal)")."""
        return self.internal / self.free if self.free else 0.0

    @property
    def rows(self):
        """[as_dict()]: the figures as plain data, like the reports' rows."""
        return [self.as_dict()]

    def table(self):
        """The figures as text (str(self))."""
        return str(self)

    def as_dict(self):
        return {
            "reserved": self.reserved, "requested": self.requested, "allocated": self.allocated,
            "free": self.free, "internal": self.internal, "external": self.external,
            "free_in_partly_used": self.free_in_partly_used, "partly_used_segments": self.partly_used_segments,
            "releasable": self.releasable, "pending_free": self.pending_free,
            "largest_free_block": dict(self.largest_free_block),
            "largest_free_block_by_pool": dict(self.largest_free_block_by_pool),
            "fragmentation": self.fragmentation, "ratio": self.ratio,
        }

    def __repr__(self):
        lf = self.largest_free_block
        return (f"Fragmentation(fragmentation {self.fragmentation:.1%}: {format_bytes(self.free_in_partly_used)} of "
                f"{format_bytes(self.reserved)} reserved is free inside {self.partly_used_segments} partly used "
                f"segments; total_free {format_bytes(self.free)} ({self.internal_share:.1%} internal); largest free "
                f"block {format_bytes(lf['all'])}; releasable {format_bytes(self.releasable)})")

    def __str__(self):
        lf = self.largest_free_block
        lines = [
            f"reserved (total_reserved)        {format_bytes(self.reserved)}",
            f"requested (total_allocated)      {format_bytes(self.requested)}",
            f"allocated (block bytes)          {format_bytes(self.allocated)}",
            f"total_free                       {format_bytes(self.free)} ({self.internal_share:.1%} internal)",
            f"  internal (rounding)            {format_bytes(self.internal)}",
            f"  external (free blocks)         {format_bytes(self.external)}"
            + (f", of which {format_bytes(self.pending_free)} pending free on other streams"
               if self.pending_free else ""),
            f"    inside partly used segments  {format_bytes(self.free_in_partly_used)} in "
            f"{self.partly_used_segments} segments (not releasable)",
            f"    in unused segments           {format_bytes(self.releasable)} (empty_cache() releases it)",
            f"largest free block               {format_bytes(lf['all'])} (small pool "
            f"{format_bytes(lf['small_pool'])}, large pool {format_bytes(lf['large_pool'])})",
            f"fragmentation                    {self.fragmentation:.1%} (free inside partly used segments / reserved)",
        ]
        for pool, size in sorted(self.largest_free_block_by_pool.items()):
            if pool != (0, 0):
                lines.append(f"  largest free block in pool {pool}: {format_bytes(size)}")
        return "\n".join(lines)
