# _C_history.pxi, part of _C.pyx (included; one extension module): the snapshot, the
# memory-history trace and its settings, the per-thread trace metadata. Conversion of the
# core's SegmentInfo / TraceEntry (and captured stacks) to PyTorch's dict shapes.

cdef dict _code_names = {}  # code object -> (filename, name)


cdef object _frames_list(const FramesPtr& f, dict cache):
    """Snapshot form of a captured stack; identical stacks share one list."""
    cdef const Frames* fs
    cdef size_t i
    if f.get() == NULL:
        return []
    key = frames_key(f)
    out = cache.get(key)
    if out is not None:
        return out
    fs = f.get()
    out = []
    for i in range(fs.size()):
        code = <object>frame_code(fs[0][i])
        names = _code_names.get(code)
        if names is None:
            names = _code_names[code] = (code.co_filename, code.co_name)
        out.append({"filename": names[0], "line": frame_line(fs[0][i]), "name": names[1]})
    cache[key] = out
    return out


def snapshot_segments(pool=None):
    """Segment dicts of every device (one pool's if `pool` is given), address-sorted per device."""
    cdef vector[SegmentInfo] segs
    cdef MempoolId pid = make_pool_id(0, 0)
    cdef cbool all_pools = pool is None
    cdef dict cache = {}
    out = []
    if _alloc == NULL:
        return out
    if pool is not None:
        pid = make_pool_id(pool[0], pool[1])
    for d in range(_ndev):
        segs = _alloc.device(d).snapshot(pid, all_pools)
        for s in segs:
            blocks = [{"address": b.address, "size": b.size, "requested_size": b.requested_size,
                       "state": b.state.decode(), "frames": _frames_list(b.frames, cache)} for b in s.blocks]
            out.append({
                "device": s.device, "address": s.address, "total_size": s.total_size,
                "allocated_size": s.allocated_size, "active_size": s.active_size,
                "requested_size": s.requested_size, "stream": s.stream,
                "segment_type": "small" if s.is_small else "large",
                "segment_pool_id": (s.pool.first, s.pool.second), "is_expandable": s.is_expandable,
                "frames": _frames_list(s.frames, cache), "blocks": blocks,
            })
    return out


def device_trace(int device):
    cdef vector[TraceEntry] entries = _allocator().device(device).trace()
    cdef dict cache = {}
    out = []
    for e in entries:
        action = trace_action_name(e.action).decode()
        entry = {"action": action}
        entry["device_free" if action == "oom" else "addr"] = e.addr
        entry["size"] = e.size
        entry["stream"] = e.stream
        entry["time_us"] = e.time_us
        entry["compile_context"] = "N/A"
        entry["user_metadata"] = e.user_metadata.decode()
        entry["pool_id"] = (e.pool.first, e.pool.second)
        if e.frames.get() != NULL:
            entry["frames"] = _frames_list(e.frames, cache)
        out.append(entry)
    return out


def set_history(cbool enabled, int context, size_t max_entries, cbool clear, uint32_t skip_mask=0):
    """context: 0 never, 1 state, 2 alloc, 3 all (stacks kept). skip_mask: bit (1 << action
    index, TRACE_ACTIONS order of the core) set = not recorded. The level it leaves
    (record_level()) is the core's (Allocator::record_level); before init, a no-op."""
    if _alloc != NULL:
        _alloc.set_history(enabled, <RecordContext>context, max_entries, clear, skip_mask)


def history_stream_start(str path, str header_json):
    """Streams every recorded trace event to `path` (history_stream.h), with the stack
    table so far; raises OSError("cannot write PATH: reason") if it cannot be written."""
    _ensure_init()
    install_history_error_hook()
    err = _alloc.start_history_stream(path.encode(), header_json.encode())
    if err.size():
        raise OSError(err.decode(errors="replace"))
    stream_stack_table_now()


def history_stream_stop():
    """Stops the stream and closes its file; returns the error that stopped it, or ""."""
    cdef string err
    if _alloc == NULL:
        return ""
    with nogil:
        err = _alloc.stop_history_stream()
    return err.decode(errors="replace")


def set_memory_metadata(str text):
    """This thread's string for the user_metadata of the trace entries it records."""
    set_user_metadata(text.encode())


def get_memory_metadata():
    return user_metadata().decode()


def record_level():
    return _record_level() if _alloc != NULL else 0
