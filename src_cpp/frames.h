// frames.h: a captured call stack as the core stores it (the `frames` of snapshots and
// trace entries). Owns nothing but the types; relies on nothing.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace mtia {

// One frame of a captured stack (what the snapshot calls `frames`). The core treats it
// as opaque: `code` is a handle the capturer keeps alive (the binding: a Python code
// object) and `lasti`/`line` locate the frame; the binding turns it into
// filename/line/name only when a snapshot is taken.
struct Frame {
  const void* code = nullptr;
  int lasti = -1;  // instruction offset, or -1 when `line` is already known
  int line = 0;
};
// A stack, innermost frame first. `id` is its id in the capturer's stack table (the
// binding interns every stack it captures, so equal stacks are one object; 0: not
// interned). A streamed history (history_stream.h) refers to stacks by this id.
struct Frames : std::vector<Frame> {
  Frames() = default;
  explicit Frames(std::vector<Frame> v, uint32_t stack_id = 0) : std::vector<Frame>(std::move(v)), id(stack_id) {}
  uint32_t id = 0;
};
using FramesPtr = std::shared_ptr<const Frames>;
inline const FramesPtr kNoFrames{};  // "no stack", passed by reference without refcounting

}  // namespace mtia
