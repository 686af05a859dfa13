// frames.h: a captured call stack as the core stores it (the `frames` of snapshots and
// trace entries). Owns nothing but the types; relies on nothing.
#pragma once
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
using Frames = std::vector<Frame>;
using FramesPtr = std::shared_ptr<const Frames>;
inline const FramesPtr kNoFrames{};  // "no stack", passed by reference without refcounting

}  // namespace mtia
