// emu_nvml.cpp: an emulated libnvidia-ml.so.1 for the peer build of mtia_alloc.
//
// libc10_cuda.so loads NVML with dlopen and resolves a few functions by name. With
// expandable_segments:True the allocator asks NVML for the device's fabric (NVLink)
// information without checking that NVML was found, so a library must be there. This one
// reports one device per PCI bus id, no NVLink, no processes, and does not export
// nvmlDeviceGetGpuFabricInfoV: the allocator then uses POSIX file descriptors for its
// memory handles, as on a plain PCIe GPU. The NVML types are written out here (nvml.h is
// not part of the CUDA toolkit's headers).
#define NVML_API extern "C" __attribute__((visibility("default")))

typedef int nvmlReturn_t;
typedef void* nvmlDevice_t;
enum : nvmlReturn_t { kSuccess = 0, kNotSupported = 3 };

namespace {
char device_token;
}

NVML_API nvmlReturn_t nvmlInit_v2(void) { return kSuccess; }
NVML_API nvmlReturn_t nvmlInit(void) { return kSuccess; }
NVML_API nvmlReturn_t nvmlShutdown(void) { return kSuccess; }
NVML_API const char* nvmlErrorString(nvmlReturn_t r) {
  return r == kSuccess ? "Success" : "Not supported by the emulated NVML";
}
NVML_API nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char*, nvmlDevice_t* device) {
  *device = &device_token;
  return kSuccess;
}
NVML_API nvmlReturn_t nvmlDeviceGetNvLinkRemoteDeviceType(nvmlDevice_t, unsigned int, int*) { return kNotSupported; }
NVML_API nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t, unsigned int, void*) { return kNotSupported; }
NVML_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t, unsigned int* count, void*) {
  *count = 0;
  return kSuccess;
}
NVML_API nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int* version) {
  *version = 13000;
  return kSuccess;
}
