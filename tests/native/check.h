// check.h: CHECK(cond, fmt, ...) for the native test drivers. A failed check prints its
// place and message (the first 20 of them; later ones are only counted) and adds to
// `failures`, which the driver turns into its exit code. Thread-safe.
#pragma once
#include <atomic>
#include <cstdio>

inline std::atomic<int> failures{0};

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond) && failures.fetch_add(1) < 20) {                  \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                          \
      std::fprintf(stderr, "\n");                                 \
    }                                                             \
  } while (0)
