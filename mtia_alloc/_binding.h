// _binding.h: the C++ half of the Python binding (everything that needs Python.h, so
// the core in src_cpp/ never does): exception translation, the GIL hooks, thread-local
// current device/stream, Python kernels as stream tasks, Python/C raw allocators, Python
// OOM observers (in the core's registry, oom_observers.h) and stack capture. Declared
// for Cython in _binding.pxd.
#pragma once
#include <Python.h>

#include <algorithm>
#include <cstddef>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000 && !defined(MTIA_NO_FAST_FRAMES)
// The interpreter's frame chain (capture_frames reads it directly on 3.11 and 3.12).
#define Py_BUILD_CORE 1
#include <internal/pycore_frame.h>
#undef Py_BUILD_CORE
#define MTIA_FAST_FRAMES 1
#else
#define MTIA_FAST_FRAMES 0
#endif

#include "allocator.h"
#include "history_stream.h"
#include "blocking.h"
#include "errors.h"
#include "oom_observers.h"

namespace mtia_binding {

// Set by the module at import: mtia_alloc's OutOfMemoryError class.
inline PyObject*& oom_error_type() {
  static PyObject* type = nullptr;
  return type;
}

// An exception raised by a Python raw allocator, kept to chain it to the OOM it caused.
inline thread_local PyObject* raw_allocator_error = nullptr;

// Translates the exception being handled into a Python exception (Cython `except +`).
inline void raise_py_error() {
  try {
    throw;
  } catch (const mtia::Interrupted&) {
    // The interrupt hook (check_signals) left the signal handler's exception set: keep it.
    // (Cython's own `except +` translation keeps a pending exception too.)
    if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
  } catch (const mtia::OutOfMemory& e) {
    PyObject* args = Py_BuildValue("(s)", e.what());
    PyObject* exc = args ? PyObject_Call(oom_error_type(), args, nullptr) : nullptr;
    Py_XDECREF(args);
    if (!exc) return;
    PyObject* info = Py_BuildValue("(iKKKO)", e.device, (unsigned long long)e.alloc_size,
                                   (unsigned long long)e.total_or_allowed, (unsigned long long)e.device_free,
                                   e.notify_observers ? Py_True : Py_False);
    if (info) PyObject_SetAttrString(exc, "_oom_info", info);
    Py_XDECREF(info);
    if (raw_allocator_error) {
      PyException_SetCause(exc, raw_allocator_error);  // steals the reference
      raw_allocator_error = nullptr;
    }
    PyErr_SetObject(oom_error_type(), exc);
    Py_DECREF(exc);
  } catch (const mtia::InvalidArgument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_SetString(PyExc_MemoryError, "host memory exhausted");
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception in mtia_alloc");
  }
}

inline bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// GIL hooks for mtia::BlockingScope: release the GIL only if this thread holds it.
inline void* release_gil() {
  if (!Py_IsInitialized() || !PyGILState_Check()) return nullptr;
  return PyEval_SaveThread();
}
// Once the interpreter is finalizing, CPython (3.9-3.13) ends any thread but the main one
// that takes the GIL back by unwinding it with pthread_exit, and that unwind through the
// core's noexcept frames (or the binding's catch-all exception translation) aborts the
// process. A daemon thread still in the allocator at exit must therefore not be waiting
// for the GIL when finalization begins. So at exit, once the stream workers have stopped,
// the binding raises `exiting` and lets every thread already on its way back to the GIL
// get it. A thread that wants the GIL back after that waits, without it, for up to a
// second: if finalization begins meanwhile it parks for good (as CPython 3.14 does
// itself); if not, a later atexit handler may be waiting for it, and it goes on. The core
// holds no lock there: lock_contended takes the device lock only after the GIL is back.
inline unsigned long main_thread_ident = 0;  // threading.main_thread().ident, set at import
inline std::atomic<bool> exiting{false};
inline std::atomic<int> restoring_gil{0};    // non-main threads inside restore_gil
[[noreturn]] inline void park_forever() {
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}
inline void restore_gil(void* token) {
  if (!token) return;
  if (PyThread_get_thread_ident() == main_thread_ident) {
    PyEval_RestoreThread(static_cast<PyThreadState*>(token));
    return;
  }
  restoring_gil.fetch_add(1);  // seq_cst, paired with park_other_threads_at_exit
  if (exiting.load()) {
    restoring_gil.fetch_sub(1);
    for (int ms = 0; ms < 1000 && !interpreter_finalizing(); ++ms)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (interpreter_finalizing()) park_forever();
    restoring_gil.fetch_add(1);
  }
  PyEval_RestoreThread(static_cast<PyThreadState*>(token));
  restoring_gil.fetch_sub(1);
}
// At exit (an atexit handler, with the GIL), after the stream workers have stopped.
inline void park_other_threads_at_exit() {
  exiting.store(true);
  if (!restoring_gil.load()) return;
  PyThreadState* self = PyEval_SaveThread();  // they need the GIL to get out of restore_gil
  for (int ms = 0; ms < 2000 && restoring_gil.load(); ++ms) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  PyEval_RestoreThread(self);
}
// The interrupt hook of the core's waits for streams and events (blocking.h), polled
// every few tens of milliseconds with no core lock held: on the main thread it runs the
// Python signal handlers, as the interpreter does between bytecodes. If one raised
// (Ctrl-C: KeyboardInterrupt), the exception stays set in this thread's state, the core
// abandons the wait by throwing mtia::Interrupted, and the binding's translation of that
// (raise_py_error, or Cython's own, which keeps a pending exception) raises it. Other
// threads never handle signals: they keep waiting without taking the GIL.
inline bool check_signals() {
  if (PyThread_get_thread_ident() != main_thread_ident || exiting.load(std::memory_order_relaxed) ||
      !Py_IsInitialized() || interpreter_finalizing())
    return false;
  PyGILState_STATE st = PyGILState_Ensure();
  const bool raised = PyErr_CheckSignals() != 0;
  PyGILState_Release(st);
  return raised;
}
inline void install_gil_hooks(unsigned long main_ident) {
  main_thread_ident = main_ident;
  mtia::blocking_hooks().enter = release_gil;
  mtia::blocking_hooks().leave = restore_gil;
  mtia::blocking_hooks().interrupted = check_signals;
}
// In a forked child (at-fork handler, GIL held): the forking thread is the main thread
// now, and the parent's other threads, counted in restoring_gil, do not exist.
inline void reset_gil_hooks_after_fork() {
  main_thread_ident = PyThread_get_thread_ident();
  exiting.store(false);
  restoring_gil.store(0);
}

// Thread-local current device and per-device current stream (torch.mtia semantics).
struct ThreadState {
  int device = 0;
  std::vector<int64_t> streams;  // per device; 0 = default stream
};
inline thread_local ThreadState tls;
inline int current_device() { return tls.device; }
inline void set_current_device(int d) { tls.device = d; }
inline int64_t current_stream(int device) {
  return size_t(device) < tls.streams.size() ? tls.streams[size_t(device)] : 0;
}
inline void set_current_stream(int device, int64_t stream) {
  if (tls.streams.size() <= size_t(device)) tls.streams.resize(size_t(device) + 1, 0);
  tls.streams[size_t(device)] = stream;
}

// A Python callable as a stream task. The callable handles its own exceptions (the
// façade wraps kernels so errors surface at synchronize()).
inline bool interpreter_alive() { return Py_IsInitialized() && !interpreter_finalizing(); }
inline void run_py_task(void* arg) {
  if (!interpreter_alive()) return;
  PyGILState_STATE st = PyGILState_Ensure();
  PyObject* r = PyObject_CallNoArgs(static_cast<PyObject*>(arg));
  if (!r) PyErr_WriteUnraisable(static_cast<PyObject*>(arg));
  Py_XDECREF(r);
  PyGILState_Release(st);
}
inline void release_py_task(void* arg) {
  if (!interpreter_alive()) return;  // at exit the object is leaked on purpose
  PyGILState_STATE st = PyGILState_Ensure();
  Py_DECREF(static_cast<PyObject*>(arg));
  PyGILState_Release(st);
}
inline mtia::Task make_py_task(PyObject* fn) {
  Py_INCREF(fn);
  return mtia::Task{run_py_task, fn, release_py_task};
}

// Native kernels.
struct CopyArg {
  void* dst;
  const void* src;
  size_t n;
};
inline void run_copy(void* a) {
  auto* c = static_cast<CopyArg*>(a);
  memmove(c->dst, c->src, c->n);
}
inline void release_copy(void* a) { delete static_cast<CopyArg*>(a); }
inline mtia::Task make_copy_task(uintptr_t dst, uintptr_t src, size_t n) {
  return mtia::Task{run_copy, new CopyArg{reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n},
                    release_copy};
}
struct FillArg {
  char* dst;
  size_t n;
  std::vector<char> pattern;  // one element's bytes
};
inline void run_fill(void* a) {
  auto* f = static_cast<FillArg*>(a);
  size_t k = f->pattern.size();
  if (k == 1) {
    memset(f->dst, f->pattern[0], f->n);
    return;
  }
  // One element, then double the filled prefix: O(log n) memcpy calls.
  if (f->n < k) return;
  memcpy(f->dst, f->pattern.data(), k);
  size_t done = k, whole = f->n - f->n % k;
  while (done < whole) {
    size_t step = done < whole - done ? done : whole - done;
    memcpy(f->dst + done, f->dst, step);
    done += step;
  }
}
inline void release_fill(void* a) { delete static_cast<FillArg*>(a); }
inline mtia::Task make_fill_task(uintptr_t dst, size_t n, const char* pattern, size_t k) {
  return mtia::Task{run_fill, new FillArg{reinterpret_cast<char*>(dst), n, std::vector<char>(pattern, pattern + k)},
                    release_fill};
}
inline void run_sleep(void* a) {
  // Sleeps in slices of at most 10 ms, so a stream shutting down (interpreter exit) does
  // not wait out a long sleep.
  int64_t until = mtia::now_ns() + *static_cast<int64_t*>(a);
  while (mtia::now_ns() < until && !mtia::worker_stopping()) {
    int64_t left = until - mtia::now_ns();
    if (left > 200000) std::this_thread::sleep_for(std::chrono::nanoseconds(std::min<int64_t>(left - 100000, 10000000)));
  }
}
inline void release_sleep(void* a) { delete static_cast<int64_t*>(a); }
inline mtia::Task make_sleep_task(int64_t ns) { return mtia::Task{run_sleep, new int64_t(ns), release_sleep}; }

// A raw allocator made of two Python callables (PythonAllocator): alloc_fn(size, device,
// stream) -> int, free_fn(ptr, size, device, stream). Raising or returning 0 means OOM.
class PyRawAllocator : public mtia::RawAllocator {
 public:
  PyRawAllocator(PyObject* alloc_fn, PyObject* free_fn) : alloc_(alloc_fn), free_(free_fn) {
    Py_INCREF(alloc_);
    Py_INCREF(free_);
  }
  ~PyRawAllocator() override {
    if (!interpreter_alive()) return;
    PyGILState_STATE st = PyGILState_Ensure();
    Py_DECREF(alloc_);
    Py_DECREF(free_);
    PyGILState_Release(st);
  }
  void* alloc(size_t size, mtia::DeviceIndex device, mtia::StreamId stream) override {
    if (!interpreter_alive()) return nullptr;
    PyGILState_STATE st = PyGILState_Ensure();
    void* out = nullptr;
    PyObject* r = PyObject_CallFunction(alloc_, "nil", (Py_ssize_t)size, (int)device, (long)stream);
    if (r) {
      unsigned long long v = PyLong_AsUnsignedLongLong(r);
      if (!PyErr_Occurred()) out = reinterpret_cast<void*>(uintptr_t(v));
      Py_DECREF(r);
    }
    if (PyErr_Occurred()) {
      PyObject *type, *value, *tb;
      PyErr_Fetch(&type, &value, &tb);
      PyErr_NormalizeException(&type, &value, &tb);
      if (tb) PyException_SetTraceback(value, tb);
      Py_XDECREF(raw_allocator_error);
      raw_allocator_error = value;  // chained to the OOM it causes
      Py_XDECREF(type);
      Py_XDECREF(tb);
      out = nullptr;
    }
    PyGILState_Release(st);
    return out;
  }
  void free(void* ptr, size_t size, mtia::DeviceIndex device, mtia::StreamId stream) override {
    if (!interpreter_alive()) return;
    PyGILState_STATE st = PyGILState_Ensure();
    PyObject* r = PyObject_CallFunction(free_, "Knil", (unsigned long long)reinterpret_cast<uintptr_t>(ptr),
                                        (Py_ssize_t)size, (int)device, (long)stream);
    if (!r) PyErr_WriteUnraisable(free_);  // the memory is gone from the cache either way
    Py_XDECREF(r);
    PyGILState_Release(st);
  }

 private:
  PyObject* alloc_;
  PyObject* free_;
};

// A raw allocator of two C functions with CUDAPluggableAllocator's signatures.
class CFuncRawAllocator : public mtia::RawAllocator {
 public:
  using AllocFn = void* (*)(ssize_t, int, void*);
  using FreeFn = void (*)(void*, ssize_t, int, void*);
  CFuncRawAllocator(uintptr_t alloc_fn, uintptr_t free_fn)
      : alloc_(reinterpret_cast<AllocFn>(alloc_fn)), free_(reinterpret_cast<FreeFn>(free_fn)) {}
  void* alloc(size_t size, mtia::DeviceIndex device, mtia::StreamId stream) override {
    return alloc_(ssize_t(size), device, reinterpret_cast<void*>(stream));
  }
  void free(void* ptr, size_t size, mtia::DeviceIndex device, mtia::StreamId stream) override {
    free_(ptr, ssize_t(size), device, reinterpret_cast<void*>(stream));
  }

 private:
  AllocFn alloc_;
  FreeFn free_;
};

inline std::shared_ptr<mtia::RawAllocator> make_py_raw_allocator(PyObject* a, PyObject* f) {
  return std::make_shared<PyRawAllocator>(a, f);
}
inline std::shared_ptr<mtia::RawAllocator> make_c_raw_allocator(uintptr_t a, uintptr_t f) {
  return std::make_shared<CFuncRawAllocator>(a, f);
}

}  // namespace mtia_binding

namespace mtia_binding {
inline void set_oom_error_type(PyObject* t) {
  Py_XINCREF(t);
  oom_error_type() = t;
}
inline uintptr_t frames_key(const std::shared_ptr<const mtia::Frames>& f) { return reinterpret_cast<uintptr_t>(f.get()); }
inline mtia::AllocationFilter make_filter(int kind, uint64_t capture_id) {
  mtia::AllocationFilter f;
  f.kind = static_cast<mtia::AllocationFilter::Kind>(kind);
  f.thread = std::this_thread::get_id();
  f.capture_id = capture_id;
  return f;
}
inline mtia::MempoolId make_pool_id(uint64_t a, uint64_t b) { return mtia::MempoolId{a, b}; }

// Allocator::malloc with the frames moved in (Cython passes them by value).
inline uintptr_t allocator_malloc(mtia::Allocator* a, int d, size_t n, int64_t s, mtia::FramesPtr f,
                                  bool array_owned) {
  return a->malloc(d, n, s, std::move(f), array_owned);
}

// A Python callable as an OOM observer of the core's registry, which keeps it (one
// reference) for the life of the process. Called with the GIL held, from the binding.
inline bool call_py_oom_observer(void* fn, const mtia::OomReport& oom) {
  PyObject* r = PyObject_CallFunction(static_cast<PyObject*>(fn), "iKKK", oom.device,
                                      (unsigned long long)oom.alloc_size, (unsigned long long)oom.total_or_allowed,
                                      (unsigned long long)oom.device_free);
  Py_XDECREF(r);
  return r != nullptr;  // else the observer's exception is set and propagates
}
inline void add_oom_observer(PyObject* fn) {
  Py_INCREF(fn);
  mtia::oom_observers().add(mtia::OomObserver{fn, call_py_oom_observer});
}
// 0, or -1 with the failing observer's exception set.
inline int notify_oom_observers(int device, size_t alloc_size, size_t total_or_allowed, size_t device_free) {
  return mtia::oom_observers().notify(mtia::OomReport{device, alloc_size, total_or_allowed, device_free}) ? 0 : -1;
}
}  // namespace mtia_binding

namespace mtia_binding {
// A native kernel that keeps Python objects (the arrays it touches) alive until it has run.
struct KeepAliveTask {
  mtia::Task inner;
  PyObject* keep;
};
inline void run_keepalive(void* a) {
  auto* k = static_cast<KeepAliveTask*>(a);
  if (k->inner.run) k->inner.run(k->inner.arg);
}
inline void release_keepalive(void* a) {
  auto* k = static_cast<KeepAliveTask*>(a);
  if (k->inner.release) k->inner.release(k->inner.arg);
  if (interpreter_alive()) {
    PyGILState_STATE st = PyGILState_Ensure();
    Py_DECREF(k->keep);
    PyGILState_Release(st);
  }
  delete k;
}
inline mtia::Task keep_alive(mtia::Task inner, PyObject* keep) {
  Py_INCREF(keep);
  return mtia::Task{run_keepalive, new KeepAliveTask{inner, keep}, release_keepalive};
}
}  // namespace mtia_binding

namespace mtia_binding {
// Stack capture in C: walks the Python frames and stores (code object, instruction
// offset) pairs; names and lines are looked up only when a snapshot is built (or, for a
// streamed history, once per distinct frame). Every code object seen is kept alive by
// this registry (one reference each, for the life of the process), so captured stacks
// can be dropped anywhere, even without the GIL.
inline std::unordered_map<PyObject*, bool>& code_registry() {  // code -> is mtia_alloc's own
  static auto* registry = new std::unordered_map<PyObject*, bool>();
  return *registry;
}
inline std::string& package_prefix() {
  static std::string prefix;
  return prefix;
}
inline void set_package_prefix(const std::string& p) { package_prefix() = p; }

inline bool code_is_internal(PyObject* code) {
  PyObject* fn = PyObject_GetAttrString(code, "co_filename");
  bool internal = false;
  if (fn) {
    const char* s = PyUnicode_AsUTF8(fn);
    internal = s && !package_prefix().empty() && strncmp(s, package_prefix().c_str(), package_prefix().size()) == 0;
    Py_DECREF(fn);
  }
  PyErr_Clear();
  return internal;
}
inline bool code_internal_registered(PyObject* code) {  // registers (and keeps) code
  auto& registry = code_registry();
  auto it = registry.find(code);
  if (it != registry.end()) return it->second;
  bool internal = code_is_internal(code);
  Py_INCREF(code);  // the registry's reference
  registry.emplace(code, internal);
  return internal;
}

// The stack table (issue 21): every captured stack is interned, so a stack seen before
// costs a walk, a hash and one comparison, and each distinct stack is stored once (its
// Frames object, shared by every block and trace entry that has it). Frames get ids by
// (code object, instruction offset), stacks by the hash of their frames; a streamed
// history writes each frame and stack definition once. GIL held throughout.
struct FrameKey {
  PyObject* code;
  int lasti, line;
  bool operator==(const FrameKey& o) const { return code == o.code && lasti == o.lasti && line == o.line; }
};
struct FrameKeyHash {
  size_t operator()(const FrameKey& k) const {
    return std::hash<uintptr_t>()(reinterpret_cast<uintptr_t>(k.code)) * 31u + size_t(k.lasti) * 7u + size_t(k.line);
  }
};
struct StackTable {
  std::unordered_map<FrameKey, uint32_t, FrameKeyHash> frame_ids;  // -> id (1-based)
  std::vector<FrameKey> frames;                                  // frames[id - 1]
  std::unordered_map<uint64_t, std::vector<mtia::FramesPtr>> by_hash;
  std::vector<std::vector<uint32_t>> stack_frames;  // stack id - 1 -> its frame ids
  std::vector<mtia::Frame> scratch;
};
inline StackTable& stack_table() {
  static auto* t = new StackTable();
  return *t;
}

inline void stream_frame(mtia::HistoryStream* s, uint32_t id, const FrameKey& k) {
  std::string file, name;
  PyObject* fn = PyObject_GetAttrString(k.code, "co_filename");
  if (fn && PyUnicode_Check(fn)) file = PyUnicode_AsUTF8(fn) ? PyUnicode_AsUTF8(fn) : "";
  Py_XDECREF(fn);
  PyObject* nm = PyObject_GetAttrString(k.code, "co_name");  // as snapshots name frames
  if (nm && PyUnicode_Check(nm)) name = PyUnicode_AsUTF8(nm) ? PyUnicode_AsUTF8(nm) : "";
  Py_XDECREF(nm);
  PyErr_Clear();
  int line = k.line;
#if PY_VERSION_HEX >= 0x030B0000
  if (k.lasti >= 0) line = PyCode_Addr2Line(reinterpret_cast<PyCodeObject*>(k.code), k.lasti);
#endif
  s->define_frame(id, file, line, name);
}

// Writes every frame and stack interned so far into the newly opened stream `s`.
inline void stream_stack_table(mtia::HistoryStream* s) {
  StackTable& t = stack_table();
  for (size_t i = 0; i < t.frames.size(); ++i) stream_frame(s, uint32_t(i + 1), t.frames[i]);
  for (size_t i = 0; i < t.stack_frames.size(); ++i)
    s->define_stack(uint32_t(i + 1), t.stack_frames[i].data(), t.stack_frames[i].size());
}

// An interned stack lives as long as the process (the table owns it), so the pointers
// handed out own nothing: a FramesPtr made with the aliasing constructor and no owner
// has no control block, and copying or dropping it (blocks, trace entries) touches no
// reference count.
inline mtia::FramesPtr unowned(const mtia::FramesPtr& f) { return mtia::FramesPtr(mtia::FramesPtr(), f.get()); }

inline mtia::FramesPtr intern_stack(StackTable& t, uint64_t h, size_t n) {
  auto found = t.by_hash.find(h);
  if (found != t.by_hash.end())
    for (const mtia::FramesPtr& f : found->second)
      if (f->size() == n && std::memcmp(f->data(), t.scratch.data(), n * sizeof(mtia::Frame)) == 0)
        return unowned(f);
  auto& bucket = t.by_hash[h];
  const std::vector<mtia::Frame> frames(t.scratch.begin(), t.scratch.begin() + std::ptrdiff_t(n));
  // A new stack: keep its code objects, give its frames and itself ids, stream them.
  mtia::HistoryStream* s = mtia::HistoryStream::active();
  std::vector<uint32_t> ids;
  ids.reserve(n);
  for (const mtia::Frame& fr : frames) {
    PyObject* code = static_cast<PyObject*>(const_cast<void*>(fr.code));
    code_internal_registered(code);
    FrameKey k{code, fr.lasti, fr.line};
    auto it = t.frame_ids.find(k);
    if (it == t.frame_ids.end()) {
      t.frames.push_back(k);
      it = t.frame_ids.emplace(k, uint32_t(t.frames.size())).first;
      if (s) stream_frame(s, it->second, k);
    }
    ids.push_back(it->second);
  }
  const uint32_t id = uint32_t(t.stack_frames.size() + 1);
  if (s) s->define_stack(id, ids.data(), ids.size());
  t.stack_frames.push_back(std::move(ids));
  auto f = std::make_shared<const mtia::Frames>(frames, id);
  mtia::InternedStacks::add(f.get());  // trace records keep its id
  bucket.push_back(f);
  return unowned(f);
}

// Whether `code` is mtia_alloc's own (its frames are left off the top of stacks): a
// one-entry cache in front of the registry, as the top frame is mostly the same one.
inline bool top_code_internal(PyObject* code) {
  static PyObject* last = nullptr;
  static bool last_internal = false;
  if (code != last) {
    last_internal = code_internal_registered(code);
    last = code;  // kept alive by the registry
  }
  return last_internal;
}

// The walk's output: frames land in a buffer that only grows (no per-frame bookkeeping
// in memory), and the stack's hash is folded in as they come.
struct FrameSink {
  StackTable& t;
  mtia::Frame* out;
  size_t n = 0, cap;
  uint64_t h = 0xcbf29ce484222325ull;
  explicit FrameSink(StackTable& table) : t(table) {
    if (t.scratch.size() < 64) t.scratch.resize(64);
    out = t.scratch.data();
    cap = t.scratch.size();
  }
  inline void add(PyObject* code, int lasti, int line) {
    if (__builtin_expect(n == cap, 0)) {
      t.scratch.resize(cap * 2);
      out = t.scratch.data();
      cap = t.scratch.size();
    }
    mtia::Frame& fr = out[n++];
    fr.code = code;
    fr.lasti = lasti;
    fr.line = line;
    h = (h ^ (reinterpret_cast<uintptr_t>(code) + (uint64_t(uint32_t(lasti)) << 40) + uint32_t(line))) *
        0x100000001b3ull;
  }
};

#if MTIA_FAST_FRAMES
// The chains of interpreter frames the last few captures of a thread read, each with the
// stack it gave. A capture first checks the live chain against them: when every frame is
// the cached one (same address, code, instruction, owner and `previous` link) the stack
// is the cached one, with no hashing or interning. A cached address is read only once the
// frame before it has been seen to link to it, so the check never touches a frame that
// is gone; its loads come from the cache, not from the chain, so they run in parallel
// (about half the walk's cost). Keyed by thread state (a reused one only costs a miss).
//
// An anchor lets the check stop early. A frame at the same address, code and instruction
// may be a new invocation reached from elsewhere, so frames further out must be compared
// too, unless the frame is known to be the same invocation: then its callers are the
// same invocations, suspended in the same calls, and cannot have changed. A frame
// object tells invocations apart: a new invocation starts without one, and the one the
// interpreter makes dies with its frame (we hold no reference, so no local outlives its
// function). Its address may be reused, so the capture marks the object it anchors to:
// f_trace_lines = kAnchorMark (a flag whose true is 1: 2 reads as true, and only this
// code stores it; CPython sets 1 in every new frame object) and a serial, never reused,
// in the object's _f_frame_data (unused while the object does not own its frame). A
// cached chain with an anchor at frame a is the live one when frames 0..a compare equal
// and frame a's frame object carries the anchor's mark and serial. Anchors are set after
// a full compare succeeded (the chain was the cached one then), on a thread's own frame,
// first the innermost. When an anchor's invocation has ended, the next one goes further
// out (0, 1, 3, 7, ...: frame a's next is 2a + 1, a + 1 more frames to compare each
// check), unless the anchor served enough captures that a new frame object on the same
// frame costs less than those compares would have (hits * (a + 1) >= kAnchorKeep: a
// frame object made and freed, ~35-50 ns here, is 50-80 frames compared): anchors settle on
// frames that live for many captures (a loop's, called again), and a chain whose frames
// are all short-lived stops paying for them.
//
// One frame of a cached chain, laid out as the interpreter frame's f_code, frame_obj,
// previous, prev_instr are on 3.11 (so one 32-byte compare checks a frame there), with
// the owner in frame_obj's place (frame_obj may come and go: not compared).
struct alignas(32) ChainFrame {
  const void* code;
  uintptr_t owner;
  const _PyInterpreterFrame* next;  // `previous`: the next frame out, null for the last
  const void* instr;
};
constexpr char kAnchorMark = 2;
constexpr uint32_t kNoAnchor = ~uint32_t(0);
constexpr uint32_t kAnchorKeep = 128;
struct ChainCache {
  static constexpr int kEntries = 4;
  struct Entry {
    const _PyInterpreterFrame* top = nullptr;  // the innermost frame's address
    const void* top_instr = nullptr;
    std::vector<ChainFrame> chain;  // innermost first, every frame (skipped ones too)
    mtia::FramesPtr stack;
    uint32_t anchor = kNoAnchor;    // the anchored frame's index in chain
    uint32_t next_anchor = 0;       // where the next anchor goes (>= chain.size(): none)
    uint32_t anchor_hits = 0;       // captures the anchor served
    const PyFrameObject* anchor_obj = nullptr;
    uint64_t anchor_serial = 0;
  };
  Entry entries[kEntries];
  // Most recently used first, and checked in that order: a chain that differs from the
  // live one only far out (the same call made from another place up the stack) is compared
  // almost whole before it fails, so the entry likeliest to match goes first.
  Entry* order[kEntries] = {&entries[0], &entries[1], &entries[2], &entries[3]};
  void use(int k) {  // order[k] becomes the most recent
    Entry* e = order[k];
    for (; k > 0; --k) order[k] = order[k - 1];
    order[0] = e;
  }
  std::vector<ChainFrame> walked;  // the chain of the capture under way (a miss)
};
inline ChainCache& chain_cache(PyThreadState* ts) {
  static PyThreadState* last_ts = nullptr;
  static ChainCache* last = nullptr;
  if (ts != last_ts) {
    static auto* by_thread = new std::unordered_map<PyThreadState*, ChainCache>();
    last = &(*by_thread)[ts];
    last_ts = ts;
  }
  return *last;
}
inline bool frame_matches(const ChainFrame& c, const _PyInterpreterFrame* f) {
  return !((f->previous != c.next) | (f->f_code != c.code) | (f->prev_instr != c.instr) |
           (uintptr_t(uint8_t(f->owner)) != c.owner));
}
inline bool chain_matches_scalar(const ChainFrame* c, const _PyInterpreterFrame* f) {
  for (;; ++c) {  // f is live: the previous frame links to it
    if (!frame_matches(*c, f)) return false;
    if (!(f = c->next)) return true;
  }
}
#if defined(__x86_64__) && PY_VERSION_HEX < 0x030C0000
// 3.11's layout: f_code, frame_obj, previous, prev_instr are 32 contiguous bytes.
static_assert(offsetof(_PyInterpreterFrame, frame_obj) == offsetof(_PyInterpreterFrame, f_code) + 8 &&
                  offsetof(_PyInterpreterFrame, previous) == offsetof(_PyInterpreterFrame, f_code) + 16 &&
                  offsetof(_PyInterpreterFrame, prev_instr) == offsetof(_PyInterpreterFrame, f_code) + 24,
              "ChainFrame mirrors 3.11's _PyInterpreterFrame");
#define MTIA_CHAIN_AVX2 1
__attribute__((target("avx2"))) inline bool chain_matches_avx2(const ChainFrame* c, const _PyInterpreterFrame* f) {
  for (;; ++c) {
    const __m256i live = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(reinterpret_cast<const char*>(f) + offsetof(_PyInterpreterFrame, f_code)));
    const __m256i want = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
    const unsigned eq = unsigned(_mm256_movemask_epi8(_mm256_cmpeq_epi64(live, want)));
    if (((eq | 0xFF00u) != 0xFFFFFFFFu) | (uintptr_t(uint8_t(f->owner)) != c->owner)) return false;
    if (!(f = c->next)) return true;
  }
}
#else
#define MTIA_CHAIN_AVX2 0
#endif
// Whether the live chain from `top` is the cached one.
inline bool chain_matches(const ChainFrame* c, const _PyInterpreterFrame* top) {
#if MTIA_CHAIN_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return chain_matches_avx2(c, top);
#endif
  return chain_matches_scalar(c, top);
}

// The serial of an anchor's frame object, in the first word of its _f_frame_data.
inline uint64_t anchor_serial_of(const PyFrameObject* o) {
  uint64_t s;
  memcpy(&s, &o->_f_frame_data[0], sizeof s);
  return s;
}
// Whether the live chain from `top` (its innermost frame at the cached address and
// instruction) is entry e's: 0 no, 1 yes by its anchor, 2 yes by comparing every frame.
inline int chain_check(const ChainCache::Entry& e, const _PyInterpreterFrame* top) {
  const ChainFrame* const c = e.chain.data();
  const uint32_t a = e.anchor;
  if (a != kNoAnchor) {
    const _PyInterpreterFrame* f = top;
    for (uint32_t i = 0;; f = c[i++].next) {  // frames 0..a, each proven linked
      if (!frame_matches(c[i], f)) return 0;
      if (i == a) break;
    }
    const PyFrameObject* o = f->frame_obj;  // alive while its frame holds it
    if (o == e.anchor_obj && o->f_trace_lines == kAnchorMark && anchor_serial_of(o) == e.anchor_serial) return 1;
    if (!c[a].next) return 2;
    return chain_matches(c + a + 1, c[a].next) ? 2 : 0;
  }
  return chain_matches(c, top) ? 2 : 0;
}

// A frame object for f, made as CPython makes one (_PyFrame_MakeAndSetFrameObject, not
// exported): not tracked by the collector, owned by f, freed with it. The collector is
// off meanwhile, so no finalizer (no Python code) runs inside a capture. Null on failure
// (the pending exception, if any, kept).
inline PyFrameObject* make_frame_object(_PyInterpreterFrame* f) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  const int gc_was_on = PyGC_Disable();
  PyCodeObject* code = f->f_code;
  PyFrameObject* o = PyObject_GC_NewVar(PyFrameObject, &PyFrame_Type, code->co_nlocalsplus + code->co_stacksize);
  if (gc_was_on) PyGC_Enable();
  PyErr_Clear();
  PyErr_Restore(type, value, tb);
  if (!o) return nullptr;
  o->f_back = nullptr;
  o->f_trace = nullptr;
  o->f_trace_lines = 1;
  o->f_trace_opcodes = 0;
  o->f_fast_as_locals = 0;
  o->f_lineno = 0;
  o->f_frame = f;
  f->frame_obj = o;
  return o;
}

// After a full compare of e succeeded: anchors e at its frame next_anchor or the first
// frame out from it that is the thread's own and complete (a generator's frame changes
// callers as it is resumed from elsewhere), making or marking its frame object.
inline void set_anchor(ChainCache::Entry& e, _PyInterpreterFrame* top) {
  static uint64_t serials = 0;
  const uint32_t n = uint32_t(e.chain.size());
  if (e.anchor != kNoAnchor && uint64_t(e.anchor_hits) * (e.anchor + 1) >= kAnchorKeep) e.next_anchor = e.anchor;
  e.anchor = kNoAnchor;
  _PyInterpreterFrame* f = top;
  uint32_t i = 0;
  for (; i < n && f; f = const_cast<_PyInterpreterFrame*>(e.chain[i++].next))  // the chain is the live one
    if (i >= e.next_anchor && f->owner == FRAME_OWNED_BY_THREAD && !_PyFrame_IsIncomplete(f)) break;
  if (i >= n || !f) {
    e.next_anchor = n;  // no frame left to anchor to
    return;
  }
  e.next_anchor = 2 * i + 1;
  e.anchor_hits = 0;
  PyFrameObject* o = f->frame_obj;
  if (!o) {
    if (!(o = make_frame_object(f))) return;
  } else if (o->f_frame != f || (o->f_trace_lines != 1 && o->f_trace_lines != kAnchorMark)) {
    return;  // line events turned off on it: not ours to mark
  }
  if (o->f_trace_lines != kAnchorMark) {
    const uint64_t s = ++serials;
    memcpy(&o->_f_frame_data[0], &s, sizeof s);
    o->f_trace_lines = kAnchorMark;
  }
  e.anchor = i;
  e.anchor_obj = o;
  e.anchor_serial = anchor_serial_of(o);
}
#endif

// The caller's stack, innermost first, without mtia_alloc's own frames on top, interned
// (equal stacks are one object). GIL held. On CPython 3.11 and 3.12 the interpreter's
// frame chain is read directly (no frame objects are made, no reference counts touched:
// a few nanoseconds a frame), and first checked against the thread's recent chains
// (ChainCache); other versions walk frame objects through the public API.
inline std::shared_ptr<const mtia::Frames> capture_frames() {
#if MTIA_FAST_FRAMES
  PyThreadState* ts = PyThreadState_Get();
  _PyInterpreterFrame* const top = ts->cframe->current_frame;
  ChainCache& cache = chain_cache(ts);
  for (int k = 0; k < ChainCache::kEntries; ++k) {
    ChainCache::Entry& e = *cache.order[k];
    if (top && e.top == top && e.top_instr == top->prev_instr) {
      const int how = chain_check(e, top);
      if (!how) continue;
      if (k) cache.use(k);
      if (how == 1) ++e.anchor_hits;
      else if (e.next_anchor < e.chain.size() || e.anchor != kNoAnchor) set_anchor(e, top);
      return e.stack;
    }
  }
  FrameSink sink(stack_table());
  bool skipping = true;
  ChainCache::Entry* const victim = cache.order[ChainCache::kEntries - 1];  // the least recent
  std::vector<ChainFrame>& walked = cache.walked;
  walked.clear();
  for (_PyInterpreterFrame* f = top; f; f = f->previous) {
    walked.push_back(ChainFrame{f->f_code, uintptr_t(uint8_t(f->owner)), f->previous, f->prev_instr});
    if (_PyFrame_IsIncomplete(f)) {
      // Kept alive (as every code of a cached chain is), so a cached code address is never
      // another code object's.
      code_internal_registered(reinterpret_cast<PyObject*>(f->f_code));
      continue;
    }
    PyObject* code = reinterpret_cast<PyObject*>(f->f_code);
    if (skipping && (skipping = top_code_internal(code))) continue;
    sink.add(code, int(_PyInterpreterFrame_LASTI(f) * sizeof(_Py_CODEUNIT)), 0);
  }
  mtia::FramesPtr stack = intern_stack(sink.t, sink.h, sink.n);
  victim->top = walked.empty() ? nullptr : top;  // an empty chain is never matched
  victim->top_instr = top ? top->prev_instr : nullptr;
  victim->chain.swap(walked);
  victim->stack = stack;
  victim->anchor = kNoAnchor;
  victim->next_anchor = 0;
  victim->anchor_hits = 0;
  cache.use(ChainCache::kEntries - 1);
  return stack;
#else
  FrameSink sink(stack_table());
  bool skipping = true;
  PyFrameObject* f = PyEval_GetFrame();  // borrowed
  Py_XINCREF(f);
  while (f) {
    PyCodeObject* code = PyFrame_GetCode(f);  // new reference
    if (skipping) skipping = top_code_internal(reinterpret_cast<PyObject*>(code));
    if (!skipping) {
#if PY_VERSION_HEX >= 0x030B0000
      int lasti = PyFrame_GetLasti(f);
      sink.add(reinterpret_cast<PyObject*>(code), lasti, lasti < 0 ? PyFrame_GetLineNumber(f) : 0);
#else
      sink.add(reinterpret_cast<PyObject*>(code), -1, PyFrame_GetLineNumber(f));
#endif
    }
    Py_DECREF(code);  // a frame's code outlives the walk; interned stacks keep theirs
    PyFrameObject* back = PyFrame_GetBack(f);  // new reference
    Py_DECREF(f);
    f = back;
  }
  return intern_stack(sink.t, sink.h, sink.n);
#endif
}

// The open history stream gets the stack table so far (called right after it opens).
inline void stream_stack_table_now() {
  if (mtia::HistoryStream* s = mtia::HistoryStream::active()) stream_stack_table(s);
}

// A streamed history's write error (disk full, ...) becomes a RuntimeWarning, raised in
// the main thread at its next bytecode boundary (Py_AddPendingCall: the writer thread
// never takes the GIL, so it cannot deadlock with a thread that waits for it).
inline std::string& history_error_text() {
  static auto* text = new std::string();
  return *text;
}
inline int warn_history_error(void*) {
  if (PyErr_WarnEx(PyExc_RuntimeWarning, history_error_text().c_str(), 1) < 0) PyErr_WriteUnraisable(nullptr);
  return 0;
}
inline void on_history_error(const char* message) {
  history_error_text() = std::string("mtia_alloc: the history recording stopped: ") + message +
                         "; the file holds the events recorded before the error (allocation goes on)";
  if (interpreter_alive()) Py_AddPendingCall(warn_history_error, nullptr);
}
inline void install_history_error_hook() { mtia::HistoryStream::set_error_hook(on_history_error); }

inline int frame_line(const mtia::Frame& f) {
  if (f.lasti < 0) return f.line;
  return PyCode_Addr2Line(reinterpret_cast<PyCodeObject*>(const_cast<void*>(f.code)), f.lasti);
}
inline PyObject* frame_code(const mtia::Frame& f) { return static_cast<PyObject*>(const_cast<void*>(f.code)); }
}  // namespace mtia_binding
