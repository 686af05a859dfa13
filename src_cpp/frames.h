// frames.h: a captured call stack as the core stores it (the `frames` of snapshots and
// trace entries), and the table of interned stacks by id (a trace record keeps just the
// id of an interned stack). Relies on nothing.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
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
// interned). An interned stack lives as long as the process and is registered
// (InternedStacks): a trace record (history.h) and a streamed history
// (history_stream.h) refer to it by this id.
struct Frames : std::vector<Frame> {
  Frames() = default;
  explicit Frames(std::vector<Frame> v, uint32_t stack_id = 0) : std::vector<Frame>(std::move(v)), id(stack_id) {}
  uint32_t id = 0;
};
using FramesPtr = std::shared_ptr<const Frames>;
inline const FramesPtr kNoFrames{};  // "no stack", passed by reference without refcounting

// The interned stacks by id (1, 2, ...), as the capturer registers them; a reader looks
// ids up under lock() (a leaf lock: taken under a device's lock, never the other way).
class InternedStacks {
 public:
  // f->id must be the number registered so far + 1; f lives as long as the process.
  static void add(const Frames* f) {
    std::lock_guard<std::mutex> g(mu());
    table().push_back(f);
  }
  static std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(mu()); }
  // The stack of `id` (owning nothing: it is never freed), or null; under lock().
  static FramesPtr get_locked(uint32_t id) {
    const std::vector<const Frames*>& t = table();
    return id && id <= t.size() ? FramesPtr(FramesPtr(), t[id - 1]) : FramesPtr();
  }

 private:
  static std::mutex& mu() {
    static auto* m = new std::mutex();
    return *m;
  }
  static std::vector<const Frames*>& table() {
    static auto* t = new std::vector<const Frames*>();
    return *t;
  }
};

}  // namespace mtia
