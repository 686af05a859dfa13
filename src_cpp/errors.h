// errors.h: the only exceptions the core throws. The binding translates each to
// one Python type: OutOfMemory -> OutOfMemoryError, InvalidArgument -> ValueError,
// InvalidState -> RuntimeError; Interrupted -> the exception the binding's interrupt
// hook left pending (KeyboardInterrupt for Ctrl-C).
// Relies on: nothing.
#pragma once
#include <stdexcept>
#include <string>

namespace mtia {

struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct InvalidState : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A wait abandoned because BlockingHooks::interrupted said so (blocking.h). Thrown only
// where the allocator's state is consistent (its waits run with the device lock dropped).
struct Interrupted : std::runtime_error {
  Interrupted() : std::runtime_error("interrupted while waiting for a stream") {}
};

// Out of device memory. Carries what an OOM observer is told.
struct OutOfMemory : std::runtime_error {
  int device = -1;
  size_t alloc_size = 0;        // the segment size that was tried
  size_t total_or_allowed = 0;  // allowed maximum if a fraction is set, else device total
  size_t device_free = 0;
  bool notify_observers = false;  // false for the 1 EB guard (no allocator involved)
  OutOfMemory(const std::string& msg) : std::runtime_error(msg) {}
};

}  // namespace mtia
