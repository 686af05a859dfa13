// backend.cpp: mtia_alloc as PyTorch's MTIA backend (see mtia_torch.h for the split).
// Every tensor byte comes from mtia_alloc's caching allocator through the C table that
// mtia_alloc._C exports (mtia_alloc/_capi.h): no Python and no GIL on allocation and free.
// The hooks answer torch.mtia; the slow, Python-shaped calls (stats dicts, snapshots,
// history, graphs' pools) go to mtia_alloc's Python API through mtia_alloc/torch/_bridge.py.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/MTIAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/extension.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "mtia_torch.h"

namespace py = pybind11;

namespace mtia_torch {

const MtiaAllocCAPI* capi = nullptr;

const MtiaAllocCAPI& api() {
  TORCH_CHECK(capi != nullptr,
              "mtia_alloc's PyTorch backend is loaded but not installed: import mtia_alloc.torch to finish loading it");
  return *capi;
}

[[noreturn]] void raise_capi_error(int rc, const std::string& context) {
  std::string msg = api().last_error();
  if (rc == 1) TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
  TORCH_CHECK(false, context.empty() ? msg : context + ": " + msg);
}

void ensure_init() {
  const MtiaAllocCAPI& a = api();
  if (a.is_initialized()) return;
  int rc = a.ensure_init();
  if (rc) raise_capi_error(rc, "");
}

int device_count() {
  ensure_init();
  return api().device_count();
}

int check_device(int64_t index) {
  int n = device_count();
  TORCH_CHECK_VALUE(index >= 0 && index < n, "Invalid device index ", index, " for mtia: the valid range is [0, ",
                    n - 1, "] (", n, " devices)");
  return int(index);
}

// Calls mtia_alloc.torch._bridge.<name>(args...). The caller holds the GIL (GIL below).
#define GIL py::gil_scoped_acquire gil_
template <class... Args>
static py::object bridge(const char* name, Args&&... args) {
  return py::module_::import("mtia_alloc.torch._bridge").attr(name)(std::forward<Args>(args)...);
}

// ------------------------------------------------------------------ the allocator

static void free_block(void* p) {
  if (!capi) return;
  int rc = capi->free(reinterpret_cast<uintptr_t>(p));
  if (rc) TORCH_WARN("mtia_alloc: freeing ", p, " failed: ", capi->last_error());
}

c10::DataPtr MtiaAllocator::allocate_on(int device, size_t n) {
  const MtiaAllocCAPI& a = api();
  uintptr_t p = 0;
  int rc = a.malloc(device, n, a.current_stream(device), &p);
  if (rc == 1) {
    std::string msg = a.last_error();
    if (a.notify_oom()) TORCH_WARN(a.last_error());
    TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
  }
  if (rc) raise_capi_error(rc, "");
  void* ptr = reinterpret_cast<void*>(p);
  return {ptr, ptr, &free_block, c10::Device(c10::DeviceType::MTIA, c10::DeviceIndex(device))};
}

c10::DataPtr MtiaAllocator::allocate(size_t n) {
  ensure_init();
  return allocate_on(api().current_device(), n);
}

c10::DeleterFnPtr MtiaAllocator::raw_deleter() const { return &free_block; }

void MtiaAllocator::copy_data(void* dest, const void* src, std::size_t count) const {
  if (count) std::memcpy(dest, src, count);
}

bool MtiaAllocator::initialized() { return capi && capi->is_initialized(); }

void MtiaAllocator::emptyCache(c10::MempoolId_t id) {
  GIL;
  bridge("empty_cache", py::make_tuple(id.first, id.second));
}

void MtiaAllocator::recordStream(const c10::DataPtr& ptr, c10::Stream stream) {
  if (!ptr.get()) return;
  TORCH_CHECK_VALUE(stream.device_type() == c10::DeviceType::MTIA, "record_stream: expected an MTIA stream, got ",
                    stream);
  TORCH_CHECK_VALUE(ptr.device().index() == stream.device_index(), "record_stream: the tensor is on ", ptr.device(),
                    " but the stream is on mtia:", int(stream.device_index()),
                    "; a tensor can only be recorded on a stream of its own device");
  int rc = api().record_stream(reinterpret_cast<uintptr_t>(ptr.get()), stream.device_index(), stream.id());
  if (rc) raise_capi_error(rc, "record_stream");
}

static void fill_stat(c10::CachingDeviceAllocator::Stat& s, py::handle d) {
  s.current = d["current"].cast<int64_t>();
  s.peak = d["peak"].cast<int64_t>();
  s.allocated = d["allocated"].cast<int64_t>();
  s.freed = d["freed"].cast<int64_t>();
}

c10::CachingDeviceAllocator::DeviceStats MtiaAllocator::getDeviceStats(c10::DeviceIndex device) {
  check_device(device);
  c10::CachingDeviceAllocator::DeviceStats out;
  py::gil_scoped_acquire gil;
  py::dict st = bridge("nested_stats", int(device));
  auto arr = [&](c10::CachingDeviceAllocator::StatArray& a, const char* key) {
    py::dict d = st[key];
    fill_stat(a[0], d["all"]);
    fill_stat(a[1], d["small_pool"]);
    fill_stat(a[2], d["large_pool"]);
  };
  arr(out.allocation, "allocation");
  arr(out.segment, "segment");
  arr(out.active, "active");
  arr(out.inactive_split, "inactive_split");
  arr(out.allocated_bytes, "allocated_bytes");
  arr(out.reserved_bytes, "reserved_bytes");
  arr(out.active_bytes, "active_bytes");
  arr(out.inactive_split_bytes, "inactive_split_bytes");
  arr(out.requested_bytes, "requested_bytes");
  out.num_alloc_retries = st["num_alloc_retries"].cast<int64_t>();
  out.num_ooms = st["num_ooms"].cast<int64_t>();
  fill_stat(out.oversize_allocations, st["oversize_allocations"]);
  fill_stat(out.oversize_segments, st["oversize_segments"]);
  out.num_sync_all_streams = st["num_sync_all_streams"].cast<int64_t>();
  out.num_device_alloc = st["num_device_alloc"].cast<int64_t>();
  out.num_device_free = st["num_device_free"].cast<int64_t>();
  out.max_split_size = st["max_split_size"].cast<int64_t>();
  return out;
}

void MtiaAllocator::resetAccumulatedStats(c10::DeviceIndex device) {
  GIL;
  bridge("reset_accumulated_memory_stats", check_device(device));
}

void MtiaAllocator::resetPeakStats(c10::DeviceIndex device) {
  GIL;
  bridge("reset_peak_memory_stats", check_device(device));
}

std::pair<size_t, size_t> MtiaAllocator::getMemoryInfo(c10::DeviceIndex device) {
  uint64_t free_b = 0, total = 0;
  int rc = api().mem_get_info(check_device(device), &free_b, &total);
  if (rc) raise_capi_error(rc, "mem_get_info");
  return {size_t(free_b), size_t(total)};
}

MtiaAllocator& allocator() {
  static MtiaAllocator* a = new MtiaAllocator();  // never destroyed: tensors may die at exit
  return *a;
}

// ------------------------------------------------------------------ generators

// An MTIA generator is a CPU generator with an MTIA device: the fallback runs random ops'
// CPU kernels with the wrapped generator, on the tensors' memory.
struct MTIAGeneratorImpl final : c10::GeneratorImpl {
  MTIAGeneratorImpl(c10::DeviceIndex d, at::Generator cpu)
      : c10::GeneratorImpl(c10::Device(c10::DeviceType::MTIA, d), c10::DispatchKeySet(c10::DispatchKey::MTIA)),
        cpu_(std::move(cpu)) {}
  void set_current_seed(uint64_t seed) override { cpu_.set_current_seed(seed); }
  void set_offset(uint64_t offset) override { cpu_.set_offset(offset); }
  uint64_t get_offset() const override { return cpu_.get_offset(); }
  uint64_t current_seed() const override { return cpu_.current_seed(); }
  uint64_t seed() override { return cpu_.seed(); }
  void set_state(const c10::TensorImpl& new_state) override { cpu_.unsafeGetGeneratorImpl()->set_state(new_state); }
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override { return cpu_.unsafeGetGeneratorImpl()->get_state(); }
  static c10::DeviceType device_type() { return c10::DeviceType::MTIA; }
  const at::Generator& cpu() const { return cpu_; }

 private:
  MTIAGeneratorImpl* clone_impl() const override { return new MTIAGeneratorImpl(device().index(), cpu_.clone()); }
  at::Generator cpu_;
};

at::Generator cpu_generator_of(const at::Generator& g) {
  auto* impl = dynamic_cast<MTIAGeneratorImpl*>(g.unsafeGetGeneratorImpl());
  TORCH_CHECK(impl != nullptr, "expected an MTIA generator made by mtia_alloc, got one of ", g.device());
  return impl->cpu();
}

static at::Generator new_generator(c10::DeviceIndex d) {
  return at::make_generator<MTIAGeneratorImpl>(d, at::make_generator<at::CPUGeneratorImpl>(at::default_rng_seed_val));
}

const at::Generator& default_generator(c10::DeviceIndex device) {
  static std::once_flag once;
  static std::vector<at::Generator>* gens = nullptr;
  std::call_once(once, [] {
    int n = device_count();
    gens = new std::vector<at::Generator>();
    for (int d = 0; d < n; ++d) {
      gens->push_back(at::make_generator<MTIAGeneratorImpl>(
          c10::DeviceIndex(d), at::make_generator<at::CPUGeneratorImpl>(at::default_rng_seed_val)));
    }
  });
  int d = device < 0 ? api().current_device() : check_device(device);
  return (*gens)[size_t(d)];
}

// ------------------------------------------------------------------ device guard, streams, events

struct EventBox {  // what c10 keeps in its void* event slot
  void* ev;
  bool timing;
};

static c10::Stream make_stream(int device, int64_t id) {
  return c10::Stream(c10::Stream::UNSAFE, c10::Device(c10::DeviceType::MTIA, c10::DeviceIndex(device)), id);
}

static void check_stream(const c10::Stream& s) {
  TORCH_CHECK_VALUE(s.device_type() == c10::DeviceType::MTIA, "expected an MTIA stream, got ", s);
  int d = check_device(s.device_index());
  TORCH_CHECK_VALUE(api().stream_exists(d, s.id()), "unknown stream ", s.id(), " on mtia:", d);
}

struct MtiaGuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::MTIA; }
  c10::Device exchangeDevice(c10::Device d) const override {
    c10::Device old = getDevice();
    if (d.index() != old.index()) setDevice(d);
    return old;
  }
  c10::Device getDevice() const override {
    ensure_init();
    return c10::Device(c10::DeviceType::MTIA, c10::DeviceIndex(api().current_device()));
  }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.type() == c10::DeviceType::MTIA, "expected an MTIA device, got ", d);
    if (d.index() < 0) return;
    api().set_current_device(check_device(d.index()));
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (capi && d.index() >= 0) capi->set_current_device(d.index());
  }
  static int index_of(c10::Device d) {
    if (d.index() < 0) {
      ensure_init();
      return api().current_device();
    }
    return check_device(d.index());
  }
  c10::Stream getStream(c10::Device d) const override {
    int i = index_of(d);
    return make_stream(i, api().current_stream(i));
  }
  c10::Stream getDefaultStream(c10::Device d) const override { return make_stream(index_of(d), 0); }
  c10::Stream getNewStream(c10::Device d, int priority) const override {
    int i = index_of(d);
    int64_t id = 0;
    int rc = api().new_stream(i, priority, &id);
    if (rc) raise_capi_error(rc, "new stream");
    return make_stream(i, id);
  }
  c10::Stream getStreamFromGlobalPool(c10::Device d, bool high) const override { return getNewStream(d, high ? -1 : 0); }
  c10::Stream exchangeStream(c10::Stream s) const override {
    check_stream(s);
    c10::Stream old = getStream(s.device());
    api().set_current_stream(s.device_index(), s.id());
    return old;
  }
  c10::DeviceIndex deviceCount() const noexcept override {
    try {
      return c10::DeviceIndex(device_count());
    } catch (...) {
      return 0;
    }
  }
  bool queryStream(const c10::Stream& s) const override {
    check_stream(s);
    int r = api().stream_query(s.device_index(), s.id());
    if (r < 0) raise_capi_error(-1, "stream query");
    return r == 1;
  }
  void synchronizeStream(const c10::Stream& s) const override {
    check_stream(s);
    int rc = api().stream_synchronize(s.device_index(), s.id());
    if (rc) raise_capi_error(rc, "stream synchronize");
  }
  void synchronizeDevice(const c10::DeviceIndex d) const override {
    int rc = api().device_synchronize(index_of(c10::Device(c10::DeviceType::MTIA, d)));
    if (rc) raise_capi_error(rc, "device synchronize");
  }
  void record(void** event, const c10::Stream& s, const c10::DeviceIndex device_index,
              const c10::EventFlag flag) const override {
    check_stream(s);
    TORCH_CHECK_VALUE(device_index == -1 || device_index == s.device_index(), "Event device index ",
                      int(device_index), " does not match recording stream's device index ", int(s.device_index()),
                      ".");
    if (!*event) *event = new EventBox{api().event_create(flag == c10::EventFlag::BACKEND_DEFAULT), flag == c10::EventFlag::BACKEND_DEFAULT};
    int rc = api().event_record(static_cast<EventBox*>(*event)->ev, s.device_index(), s.id());
    if (rc) raise_capi_error(rc, "event record");
  }
  void block(void* event, const c10::Stream& s) const override {
    if (!event) return;  // never recorded: nothing to wait for
    check_stream(s);
    int rc = api().event_wait(static_cast<EventBox*>(event)->ev, s.device_index(), s.id());
    if (rc) raise_capi_error(rc, "event wait");
  }
  bool queryEvent(void* event) const override {
    if (!event) return true;
    return api().event_query(static_cast<EventBox*>(event)->ev) == 1;
  }
  void synchronizeEvent(void* event) const override {
    if (!event) return;
    int rc = api().event_synchronize(static_cast<EventBox*>(event)->ev);
    if (rc) raise_capi_error(rc, "event synchronize");
  }
  double elapsedTime(void* e1, void* e2, const c10::DeviceIndex) const override {
    TORCH_CHECK_VALUE(e1 && e2, "Both events must be recorded before calculating elapsed time.");
    auto* a = static_cast<EventBox*>(e1);
    auto* b = static_cast<EventBox*>(e2);
    TORCH_CHECK_VALUE(a->timing && b->timing, "Both events must be created with argument 'enable_timing=True'.");
    TORCH_CHECK_VALUE(api().event_recorded(a->ev) && api().event_recorded(b->ev),
                      "Both events must be recorded before calculating elapsed time.");
    double ms = 0;
    int rc = api().event_elapsed_ms(a->ev, b->ev, &ms);
    if (rc) raise_capi_error(rc, "elapsed time");
    return ms;
  }
  void destroyEvent(void* event, const c10::DeviceIndex) const noexcept override {
    if (!event) return;
    auto* box = static_cast<EventBox*>(event);
    if (capi) capi->event_destroy(box->ev);
    delete box;
  }
  void recordDataPtrOnStream(const c10::DataPtr& ptr, const c10::Stream& s) const override {
    allocator().recordStream(ptr, s);
  }
};

C10_REGISTER_GUARD_IMPL(MTIA, MtiaGuardImpl);

// ------------------------------------------------------------------ hooks

static bool python_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

static int64_t next_graph = 1;
static std::mutex graph_mu;

struct MTIAHooks final : at::MTIAHooksInterface {
  MTIAHooks() = default;
  void init() const override { ensure_init(); }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return deviceCount() > 0; }
  bool hasMTIA() const override { return true; }
  c10::DeviceIndex deviceCount() const override {
    try {
      return c10::DeviceIndex(device_count());
    } catch (const c10::Error&) {
      return 0;
    }
  }
  c10::DeviceIndex getDeviceCount() const override { return deviceCount(); }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return capi && capi->is_initialized(); }
  void deviceSynchronize(c10::DeviceIndex d) const override {
    int rc = api().device_synchronize(d < 0 ? (ensure_init(), api().current_device()) : check_device(d));
    if (rc) raise_capi_error(rc, "synchronize");
  }
  std::string showConfig() const override {
    GIL;
    return py::str(bridge("show_config"));
  }
  void setCurrentDevice(c10::DeviceIndex d) const override {
    if (d < 0) return;
    api().set_current_device(check_device(d));
  }
  c10::DeviceIndex getCurrentDevice() const override {
    ensure_init();
    return c10::DeviceIndex(api().current_device());
  }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex d) const override {
    c10::DeviceIndex old = getCurrentDevice();
    setCurrentDevice(d);
    return old;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex d) const override { return exchangeDevice(d); }
  c10::Stream getCurrentStream(c10::DeviceIndex d) const override {
    int i = d < 0 ? int(getCurrentDevice()) : check_device(d);
    return make_stream(i, api().current_stream(i));
  }
  int64_t getCurrentRawStream(c10::DeviceIndex d) const override { return getCurrentStream(d).id(); }
  c10::Stream getDefaultStream(c10::DeviceIndex d) const override {
    int i = d < 0 ? int(getCurrentDevice()) : check_device(d);
    return make_stream(i, 0);
  }
  void setCurrentStream(const c10::Stream& s) const override {
    check_stream(s);  // as mtia_alloc.set_stream: the stream's device becomes current too
    api().set_current_device(s.device_index());
    api().set_current_stream(s.device_index(), s.id());
  }
  bool isPinnedPtr(const void*) const override { return false; }
  c10::Allocator* getPinnedMemoryAllocator() const override { return at::getCPUAllocator(); }
  c10::Device getDeviceFromPtr(void* data) const override {
    int d = capi ? capi->device_of(reinterpret_cast<uintptr_t>(data)) : -1;
    TORCH_CHECK(d >= 0, "pointer ", data, " is not an allocated block of mtia_alloc");
    return c10::Device(c10::DeviceType::MTIA, c10::DeviceIndex(d));
  }
  PyObject* memoryStats(c10::DeviceIndex d) const override {
    GIL;
    return bridge("memory_stats", int(d)).release().ptr();
  }
  PyObject* getDeviceCapability(c10::DeviceIndex d) const override {
    GIL;
    return bridge("device_capability", int(d)).release().ptr();
  }
  PyObject* getDeviceProperties(c10::DeviceIndex d) const override {
    GIL;
    return bridge("device_properties", int(d)).release().ptr();
  }
  void emptyCache() const override {
    GIL;
    bridge("empty_cache", py::none());
  }
  void recordMemoryHistory(const std::optional<std::string>& enabled, const std::string& stacks,
                           size_t max_entries) const override {
    py::gil_scoped_acquire gil;
    py::object en = enabled ? py::object(py::str(*enabled)) : py::object(py::none());
    bridge("record_memory_history", en, stacks, max_entries);
  }
  PyObject* memorySnapshot(const std::optional<std::string>& local_path) const override {
    py::gil_scoped_acquire gil;
    py::object p = local_path ? py::object(py::str(*local_path)) : py::object(py::none());
    return bridge("snapshot", p).release().ptr();
  }
  void resetPeakMemoryStats(c10::DeviceIndex d) const override {
    GIL;
    bridge("reset_peak_memory_stats", int(d));
  }
  void attachOutOfMemoryObserver(PyObject* observer) const override {
    py::gil_scoped_acquire gil;
    bridge("attach_out_of_memory_observer", py::reinterpret_borrow<py::object>(observer));
  }
  // Graphs: the pool and capture state live in mtia_alloc.MTIAGraph (the bridge keeps one
  // per handle); the ops captured on the stream are recorded here (kernels.cpp).
  int64_t mtiagraphCreate(bool keep_graph) const override {
    int64_t h;
    {
      std::lock_guard<std::mutex> lock(graph_mu);
      h = next_graph++;
    }
    GIL;
    bridge("graph_create", h, keep_graph);
    return h;
  }
  void mtiagraphDestroy(int64_t handle) const override {  // from a destructor: never throws
    forget(handle);
    if (!Py_IsInitialized() || python_finalizing()) return;  // at exit the pool goes with the process
    GIL;
    try {
      bridge("graph_destroy", handle);
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("mtia_alloc: destroying an MTIAGraph");
    } catch (const std::exception& e) {
      TORCH_WARN("mtia_alloc: destroying an MTIAGraph failed: ", e.what());
    }
  }
  void mtiagraphCaptureBegin(int64_t handle, c10::MempoolId_t pool) const override {
    GIL;
    bridge("graph_capture_begin", handle, py::make_tuple(pool.first, pool.second));
    int d = api().current_device();
    capture_begin(handle, d, api().current_stream(d));
  }
  void mtiagraphCaptureEnd(int64_t handle) const override {
    capture_end(handle);
    GIL;
    bridge("graph_capture_end", handle, recorded_ops(handle));
  }
  void mtiagraphInstantiate(int64_t handle) const override {
    GIL;
    bridge("graph_instantiate", handle);
  }
  void mtiagraphReplay(int64_t handle) const override {
    {
      GIL;
      bridge("graph_replay", handle);
    }
    replay(handle);
  }
  void mtiagraphReset(int64_t handle) const override {
    forget(handle);
    GIL;
    bridge("graph_reset", handle);
  }
  c10::MempoolId_t mtiagraphPool(int64_t handle) const override {
    py::gil_scoped_acquire gil;
    py::tuple t = bridge("graph_pool", handle);
    return {t[0].cast<c10::CaptureId_t>(), t[1].cast<c10::CaptureId_t>()};
  }
  c10::MempoolId_t graphPoolHandle() const override {
    py::gil_scoped_acquire gil;
    py::tuple t = bridge("graph_pool_handle");
    return {t[0].cast<c10::CaptureId_t>(), t[1].cast<c10::CaptureId_t>()};
  }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex d) const override { return default_generator(d); }
  at::Generator getNewGenerator(c10::DeviceIndex d) const override {
    return new_generator(c10::DeviceIndex(d < 0 ? int(getCurrentDevice()) : check_device(d)));
  }
};

}  // namespace mtia_torch

// The registry key is the class name as written: PyTorch looks up "MTIAHooks".
namespace at {
using at::RegistererMTIAHooksRegistry;
using mtia_torch::MTIAHooks;
REGISTER_MTIA_HOOKS(MTIAHooks);
}  // namespace at

// ------------------------------------------------------------------ the Python module

static void install(py::capsule capsule) {
  auto* table = static_cast<const MtiaAllocCAPI*>(PyCapsule_GetPointer(capsule.ptr(), MTIA_ALLOC_CAPI_CAPSULE));
  if (!table) throw py::error_already_set();
  TORCH_CHECK(table->version == MTIA_ALLOC_CAPI_VERSION && table->struct_size == int(sizeof(MtiaAllocCAPI)),
              "mtia_alloc._C exports C API version ", table->version, " (", table->struct_size,
              " bytes) but this backend was built for version ", MTIA_ALLOC_CAPI_VERSION,
              ": rebuild mtia_alloc (python setup.py build_ext --inplace)");
  mtia_torch::capi = table;
  c10::SetAllocator(c10::DeviceType::MTIA, &mtia_torch::allocator());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &install, "Connects the backend to mtia_alloc._C's C table (a capsule)");
  m.def("hooks_are_ours", [] { return at::detail::getMTIAHooks().isBuilt(); });
  m.def("recorded_ops", [](int64_t h) { return mtia_torch::recorded_ops(h); });
}
