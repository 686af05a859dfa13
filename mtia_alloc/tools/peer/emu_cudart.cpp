// emu_cudart.cpp: an emulated CUDA 13 runtime (libcudart.so.13) for running PyTorch's
// prebuilt libc10_cuda.so, and so its CUDACachingAllocator, on a machine without a GPU.
// Part of mtia_alloc (`python -m mtia_alloc peer build`), which compiles it with g++
// against the CUDA 13 headers and a version script naming the node libcudart.so.13.
//
// Device memory: one address range per device is reserved (PROT_NONE, MAP_NORESERVE) and
// cudaMalloc carves segments out of it, lowest free address first, mapping them read-write
// but never touching them (no resident memory). The same sequence of cudaMalloc/cudaFree
// calls therefore always yields the same addresses, as in mtia_alloc's emulator. The
// capacity per device is charged in units of the driver's granularity (2 MiB); a call
// beyond it returns cudaErrorMemoryAllocation.
// Streams and events are handles only: all work completes at once.
// The driver's virtual-memory calls (expandable segments) are handed out through
// cudaGetDriverEntryPointByVersion and share the capacity with cudaMalloc.
//
// Environment: FAKE_CUDA_MEM_BYTES (capacity per device, default 80G; K/M/G/T suffixes,
// binary), FAKE_CUDA_DEVICES (default 1), MTIA_PEER_TRACE_CALLS=1 (log calls on stderr).
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>

#define EMU_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr size_t kGranule = size_t(2) << 20;
constexpr int kDeviceLimit = 16;

size_t align_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

size_t env_bytes(const char* name, size_t fallback) {
  const char* text = getenv(name);
  if (!text || !*text) return fallback;
  char* rest = nullptr;
  long double n = strtold(text, &rest);  // "80G", "3.5G", "1073741824"
  if (rest && *rest) {
    switch (*rest | 0x20) {
      case 'k': n *= 1024.0L; break;
      case 'm': n *= 1024.0L * 1024; break;
      case 'g': n *= 1024.0L * 1024 * 1024; break;
      case 't': n *= 1024.0L * 1024 * 1024 * 1024; break;
      default: break;
    }
  }
  return n > 0 ? size_t(n) : fallback;
}

struct Settings {
  size_t capacity;
  int devices;
  bool log;
  Settings() {
    capacity = env_bytes("FAKE_CUDA_MEM_BYTES", size_t(80) << 30);
    const char* d = getenv("FAKE_CUDA_DEVICES");
    devices = d && *d ? atoi(d) : 1;
    if (devices < 0) devices = 0;
    if (devices > kDeviceLimit) devices = kDeviceLimit;
    const char* t = getenv("MTIA_PEER_TRACE_CALLS");
    log = t && *t == '1';
  }
};

const Settings& settings() {
  static const Settings s;
  return s;
}

#define EMU_LOG(...)                                   \
  do {                                                 \
    if (settings().log) {                              \
      fprintf(stderr, "emu_cudart: " __VA_ARGS__);     \
      fputc('\n', stderr);                             \
    }                                                  \
  } while (0)

// One device's memory: the capacity accounting and the address range segments come from.
class Device {
 public:
  // Charges `bytes` against the capacity; false when it does not fit.
  bool charge(size_t bytes) {
    if (bytes > settings().capacity - used_) return false;
    used_ += bytes;
    return true;
  }
  void refund(size_t bytes) { used_ -= bytes; }
  size_t used() const { return used_; }

  // A read-write range of `bytes` (a multiple of kGranule) at the lowest free address.
  void* place(size_t bytes) {
    if (!base_ && !reserve()) return nullptr;
    for (auto it = holes_.begin(); it != holes_.end(); ++it) {
      if (it->second < bytes) continue;
      uintptr_t at = it->first;
      size_t left = it->second - bytes;
      holes_.erase(it);
      if (left) holes_.emplace(at + bytes, left);
      void* p = mmap(reinterpret_cast<void*>(at), bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
      if (p == MAP_FAILED) {
        release(at, bytes);
        return nullptr;
      }
      return p;
    }
    return nullptr;
  }
  // Gives a range back (inaccessible again), merging it with free neighbours.
  void release(uintptr_t at, size_t bytes) {
    mmap(reinterpret_cast<void*>(at), bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
         -1, 0);
    auto after = holes_.lower_bound(at);
    if (after != holes_.end() && at + bytes == after->first) {
      bytes += after->second;
      after = holes_.erase(after);
    }
    if (after != holes_.begin()) {
      auto before = std::prev(after);
      if (before->first + before->second == at) {
        before->second += bytes;
        return;
      }
    }
    holes_.emplace(at, bytes);
  }

 private:
  bool reserve() {
    // twice the capacity, so that holes between segments never make a fitting call fail
    size_t span = 2 * align_up(settings().capacity, kGranule) + kGranule;
    void* p = mmap(nullptr, span + kGranule, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    base_ = align_up(reinterpret_cast<uintptr_t>(p), kGranule);
    holes_.emplace(base_, span);
    return true;
  }

  size_t used_ = 0;
  uintptr_t base_ = 0;
  std::map<uintptr_t, size_t> holes_;
};

struct Segment {
  int device;
  size_t bytes;
};

struct Physical {  // a cuMemCreate handle
  int device;
  size_t bytes;
};

std::mutex mu;
Device devices[kDeviceLimit];
std::unordered_map<uintptr_t, Segment> segments;
thread_local int current_device = 0;
thread_local cudaError_t sticky_error = cudaSuccess;
thread_local cudaStreamCaptureMode capture_mode = cudaStreamCaptureModeGlobal;
char handle_tokens[64];  // addresses handed out as stream/event handles

cudaError_t fail(cudaError_t e) {
  sticky_error = e;
  return e;
}

bool valid_device(int d) { return d >= 0 && d < settings().devices; }

// ------------------------------------------------------------------ driver API, by entry point

CUresult cu_error_string(CUresult e, const char** out) {
  *out = e == CUDA_SUCCESS ? "no error"
         : e == CUDA_ERROR_OUT_OF_MEMORY ? "out of memory"
         : e == CUDA_ERROR_INVALID_VALUE ? "invalid argument"
         : e == CUDA_ERROR_NOT_SUPPORTED ? "operation not supported by the emulated runtime"
                                         : "error in the emulated runtime";
  return CUDA_SUCCESS;
}

CUresult cu_device_get(CUdevice* out, int ordinal) {
  if (!valid_device(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
  *out = ordinal;
  return CUDA_SUCCESS;
}

CUresult cu_device_attribute(int* out, CUdevice_attribute what, CUdevice) {
  *out = what == CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED ||
         what == CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED;
  return CUDA_SUCCESS;
}

CUresult cu_granularity(size_t* out, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) {
  *out = kGranule;
  return CUDA_SUCCESS;
}

CUresult cu_address_reserve(CUdeviceptr* out, size_t size, size_t alignment, CUdeviceptr, unsigned long long) {
  if (alignment < kGranule) alignment = kGranule;
  size_t span = size + alignment;
  void* raw = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  uintptr_t start = align_up(reinterpret_cast<uintptr_t>(raw), alignment);
  size_t head = start - reinterpret_cast<uintptr_t>(raw);
  if (head) munmap(raw, head);
  if (span - head - size) munmap(reinterpret_cast<void*>(start + size), span - head - size);
  *out = start;
  EMU_LOG("cuMemAddressReserve(%zu) = %#lx", size, (unsigned long)start);
  return CUDA_SUCCESS;
}

CUresult cu_address_free(CUdeviceptr at, size_t size) {
  return munmap(reinterpret_cast<void*>(at), size) == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cu_mem_create(CUmemGenericAllocationHandle* out, size_t size, const CUmemAllocationProp* prop,
                       unsigned long long) {
  int d = prop ? prop->location.id : 0;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  size_t bytes = align_up(size, kGranule);
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!devices[d].charge(bytes)) {
      EMU_LOG("cuMemCreate(%zu) = out of memory", size);
      return CUDA_ERROR_OUT_OF_MEMORY;
    }
  }
  *out = reinterpret_cast<CUmemGenericAllocationHandle>(new Physical{d, bytes});
  EMU_LOG("cuMemCreate(%zu) on device %d", size, d);
  return CUDA_SUCCESS;
}

CUresult cu_mem_release(CUmemGenericAllocationHandle h) {
  auto* phys = reinterpret_cast<Physical*>(h);
  {
    std::lock_guard<std::mutex> lock(mu);
    devices[phys->device].refund(phys->bytes);
  }
  delete phys;
  return CUDA_SUCCESS;
}

CUresult remap(CUdeviceptr at, size_t size, int prot) {
  void* p = mmap(reinterpret_cast<void*>(at), size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
                 -1, 0);
  return p == MAP_FAILED ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

CUresult cu_mem_map(CUdeviceptr at, size_t size, size_t, CUmemGenericAllocationHandle, unsigned long long) {
  return remap(at, size, PROT_READ | PROT_WRITE);
}

CUresult cu_mem_unmap(CUdeviceptr at, size_t size) { return remap(at, size, PROT_NONE); }

CUresult cu_set_access(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) { return CUDA_SUCCESS; }

CUresult cu_unsupported() { return CUDA_ERROR_NOT_SUPPORTED; }

struct EntryPoint {
  const char* name;
  void* fn;
};

// What c10::cuda::DriverAPI resolves. The allocation path uses the first group; the
// others (IPC, memset, stream writes) must resolve but are never called in a replay.
const EntryPoint entry_points[] = {
    {"cuGetErrorString", reinterpret_cast<void*>(&cu_error_string)},
    {"cuDeviceGet", reinterpret_cast<void*>(&cu_device_get)},
    {"cuDeviceGetAttribute", reinterpret_cast<void*>(&cu_device_attribute)},
    {"cuMemGetAllocationGranularity", reinterpret_cast<void*>(&cu_granularity)},
    {"cuMemAddressReserve", reinterpret_cast<void*>(&cu_address_reserve)},
    {"cuMemAddressFree", reinterpret_cast<void*>(&cu_address_free)},
    {"cuMemCreate", reinterpret_cast<void*>(&cu_mem_create)},
    {"cuMemRelease", reinterpret_cast<void*>(&cu_mem_release)},
    {"cuMemMap", reinterpret_cast<void*>(&cu_mem_map)},
    {"cuMemUnmap", reinterpret_cast<void*>(&cu_mem_unmap)},
    {"cuMemSetAccess", reinterpret_cast<void*>(&cu_set_access)},
    {"cuMemGetAddressRange", reinterpret_cast<void*>(&cu_unsupported)},
    {"cuMemExportToShareableHandle", reinterpret_cast<void*>(&cu_unsupported)},
    {"cuMemImportFromShareableHandle", reinterpret_cast<void*>(&cu_unsupported)},
    {"cuMemRetainAllocationHandle", reinterpret_cast<void*>(&cu_unsupported)},
    {"cuMemGetAllocationPropertiesFromHandle", reinterpret_cast<void*>(&cu_unsupported)},
    {"cuMemsetD32Async", reinterpret_cast<void*>(&cu_unsupported)},
    {"cuStreamWriteValue32", reinterpret_cast<void*>(&cu_unsupported)},
};

const char* error_name(cudaError_t e, bool text) {
  switch (e) {
    case cudaSuccess: return text ? "no error" : "cudaSuccess";
    case cudaErrorMemoryAllocation: return text ? "out of memory" : "cudaErrorMemoryAllocation";
    case cudaErrorInvalidValue: return text ? "invalid argument" : "cudaErrorInvalidValue";
    case cudaErrorInvalidDevice: return text ? "invalid device ordinal" : "cudaErrorInvalidDevice";
    case cudaErrorNoDevice: return text ? "no CUDA-capable device is detected" : "cudaErrorNoDevice";
    case cudaErrorNotSupported:
      return text ? "operation not supported by the emulated runtime" : "cudaErrorNotSupported";
    default: return text ? "error in the emulated runtime" : "cudaErrorUnknown";
  }
}

}  // namespace

extern "C" {

// ------------------------------------------------------------------ devices

EMU_API cudaError_t cudaGetDeviceCount(int* count) {
  *count = settings().devices;
  return *count ? cudaSuccess : fail(cudaErrorNoDevice);
}

EMU_API cudaError_t cudaGetDevice(int* device) {
  *device = current_device;
  return cudaSuccess;
}

EMU_API cudaError_t cudaSetDevice(int device) {
  if (!valid_device(device)) return fail(cudaErrorInvalidDevice);
  current_device = device;
  return cudaSuccess;
}

EMU_API cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

EMU_API cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

EMU_API cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (!valid_device(device)) return fail(cudaErrorInvalidDevice);
  memset(prop, 0, sizeof *prop);
  snprintf(prop->name, sizeof prop->name, "emulated CUDA device %d (mtia_alloc peer)", device);
  prop->uuid.bytes[15] = static_cast<char>(device + 1);
  prop->totalGlobalMem = settings().capacity;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 132;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
  prop->sharedMemPerBlock = 48 << 10;
  prop->regsPerBlock = 65536;
  prop->l2CacheSize = 50 << 20;
  prop->pciBusID = device + 1;
  prop->unifiedAddressing = 1;
  prop->concurrentKernels = 1;
  prop->streamPrioritiesSupported = 1;
  return cudaSuccess;
}

EMU_API cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return cudaSuccess;
}

EMU_API cudaError_t cudaDeviceCanAccessPeer(int* can, int, int) {
  *can = 0;
  return cudaSuccess;
}

EMU_API cudaError_t cudaDeviceEnablePeerAccess(int, unsigned int) { return fail(cudaErrorNotSupported); }

EMU_API cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

EMU_API cudaError_t cudaGetLastError(void) {
  cudaError_t e = sticky_error;
  sticky_error = cudaSuccess;
  return e;
}

EMU_API const char* cudaGetErrorName(cudaError_t e) { return error_name(e, false); }

EMU_API const char* cudaGetErrorString(cudaError_t e) { return error_name(e, true); }

// ------------------------------------------------------------------ memory

EMU_API cudaError_t cudaMalloc(void** out, size_t size) {
  const int d = current_device;
  const size_t bytes = align_up(size ? size : 1, kGranule);
  std::lock_guard<std::mutex> lock(mu);
  *out = nullptr;
  if (!devices[d].charge(bytes)) {
    EMU_LOG("cudaMalloc(%zu) = out of memory (%zu of %zu in use)", size, devices[d].used(), settings().capacity);
    return fail(cudaErrorMemoryAllocation);
  }
  void* p = devices[d].place(bytes);
  if (!p) {
    devices[d].refund(bytes);
    return fail(cudaErrorMemoryAllocation);
  }
  segments.emplace(reinterpret_cast<uintptr_t>(p), Segment{d, bytes});
  EMU_LOG("cudaMalloc(%zu) = %p", size, p);
  *out = p;
  return cudaSuccess;
}

EMU_API cudaError_t cudaFree(void* ptr) {
  if (!ptr) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mu);
  auto it = segments.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == segments.end()) return fail(cudaErrorInvalidValue);
  Segment s = it->second;
  segments.erase(it);
  devices[s.device].refund(s.bytes);
  devices[s.device].release(reinterpret_cast<uintptr_t>(ptr), s.bytes);
  EMU_LOG("cudaFree(%p)", ptr);
  return cudaSuccess;
}

EMU_API cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> lock(mu);
  *total_bytes = settings().capacity;
  *free_bytes = settings().capacity - devices[current_device].used();
  return cudaSuccess;
}

EMU_API cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  memmove(dst, src, n);
  return cudaSuccess;
}

EMU_API cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  memmove(dst, src, n);
  return cudaSuccess;
}

EMU_API cudaError_t cudaMemcpyPeerAsync(void* dst, int, const void* src, int, size_t n, cudaStream_t) {
  memmove(dst, src, n);
  return cudaSuccess;
}

// ------------------------------------------------------------------ streams and events: done at once

EMU_API cudaError_t cudaStreamCreateWithPriority(cudaStream_t* out, unsigned int, int) {
  static std::atomic<unsigned> next{1};
  // distinct, never dereferenced handles
  *out = reinterpret_cast<cudaStream_t>(reinterpret_cast<uintptr_t>(handle_tokens) + 0x1000 * uintptr_t(next++));
  return cudaSuccess;
}

EMU_API cudaError_t cudaStreamQuery(cudaStream_t) { return cudaSuccess; }
EMU_API cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
EMU_API cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return cudaSuccess; }

EMU_API cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

EMU_API cudaError_t cudaStreamGetCaptureInfo(cudaStream_t, cudaStreamCaptureStatus* status, unsigned long long* id,
                                             cudaGraph_t* graph, const cudaGraphNode_t** deps,
                                             const cudaGraphEdgeData** edges, size_t* ndeps) {
  if (status) *status = cudaStreamCaptureStatusNone;
  if (id) *id = 0;
  if (graph) *graph = nullptr;
  if (deps) *deps = nullptr;
  if (edges) *edges = nullptr;
  if (ndeps) *ndeps = 0;
  return cudaSuccess;
}

EMU_API cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
  cudaStreamCaptureMode old = capture_mode;
  capture_mode = *mode;
  *mode = old;
  return cudaSuccess;
}

EMU_API cudaError_t cudaEventCreateWithFlags(cudaEvent_t* out, unsigned int) {
  *out = reinterpret_cast<cudaEvent_t>(new char);
  return cudaSuccess;
}

EMU_API cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<char*>(e);
  return cudaSuccess;
}

EMU_API cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
EMU_API cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
EMU_API cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }

EMU_API cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 0.0f;
  return cudaSuccess;
}

// ------------------------------------------------------------------ driver entry points

EMU_API cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                                     cudaDriverEntryPointQueryResult* status) {
  *fn = nullptr;
  for (const EntryPoint& e : entry_points) {
    if (strcmp(e.name, symbol) == 0) {
      *fn = e.fn;
      break;
    }
  }
  if (status) *status = *fn ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  EMU_LOG("cudaGetDriverEntryPointByVersion(%s): %s", symbol, *fn ? "found" : "not found");
  return cudaSuccess;
}

// ------------------------------------------------------------------ not emulated
// (the cudaMallocAsync backend, CUDA graphs, IPC): "not supported"

EMU_API cudaError_t cudaMallocAsync(void**, size_t, cudaStream_t) { return fail(cudaErrorNotSupported); }
EMU_API cudaError_t cudaFreeAsync(void*, cudaStream_t) { return fail(cudaErrorNotSupported); }
EMU_API cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t*, int) { return fail(cudaErrorNotSupported); }
EMU_API cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) {
  return fail(cudaErrorNotSupported);
}
EMU_API cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) {
  return fail(cudaErrorNotSupported);
}
EMU_API cudaError_t cudaMemPoolSetAccess(cudaMemPool_t, const cudaMemAccessDesc*, size_t) {
  return fail(cudaErrorNotSupported);
}
EMU_API cudaError_t cudaMemPoolTrimTo(cudaMemPool_t, size_t) { return fail(cudaErrorNotSupported); }
EMU_API cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t*, void*) { return fail(cudaErrorNotSupported); }
EMU_API cudaError_t cudaIpcOpenMemHandle(void**, cudaIpcMemHandle_t, unsigned int) {
  return fail(cudaErrorNotSupported);
}
EMU_API cudaError_t cudaIpcCloseMemHandle(void*) { return fail(cudaErrorNotSupported); }
EMU_API cudaError_t cudaGraphNodeGetDependencies(cudaGraphNode_t, cudaGraphNode_t*, cudaGraphEdgeData*, size_t*) {
  return fail(cudaErrorNotSupported);
}

}  // extern "C"
