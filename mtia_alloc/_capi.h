/* _capi.h: the C function table mtia_alloc._C exports in a capsule
 * ("mtia_alloc._C._capi", from mtia_alloc._C._capi_capsule()), so that native code
 * outside the module (the PyTorch backend in mtia_alloc/torch/csrc) reaches the same
 * allocator, the same thread-local current device/stream and the same streams and events
 * as the Python API, without Python on the hot path.
 *
 * Conventions: functions returning int return 0 on success, 1 for out of memory and -1
 * for any other error; the message is then in last_error() (thread-local, valid until the
 * next failing call on the thread). None of them needs the GIL; the ones that may run
 * Python (ensure_init, notify_oom, and malloc/free while memory history records stacks)
 * take it themselves. Plain C types only: no core or Python header is needed to use it. */
#ifndef MTIA_ALLOC_CAPI_H
#define MTIA_ALLOC_CAPI_H
#include <stddef.h>
#include <stdint.h>

#define MTIA_ALLOC_CAPI_VERSION 1
#define MTIA_ALLOC_CAPI_CAPSULE "mtia_alloc._C._capi"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int device;
  uint64_t alloc_size;       /* the segment size that was tried */
  uint64_t total_or_allowed; /* allowed maximum if a fraction is set, else device total */
  uint64_t device_free;
  int notify_observers;
} MtiaAllocOom;

typedef struct {
  int version; /* MTIA_ALLOC_CAPI_VERSION */
  int struct_size;
  /* lifecycle */
  int (*ensure_init)(void); /* runs mtia_alloc's lazy init (takes the GIL) if needed */
  int (*is_initialized)(void);
  int (*device_count)(void); /* -1 if not initialized */
  const char* (*last_error)(void);
  void (*last_oom)(MtiaAllocOom* out);
  /* thread-local current device and streams (shared with mtia_alloc.current_device etc.) */
  int (*current_device)(void);
  void (*set_current_device)(int device);
  int64_t (*current_stream)(int device);
  void (*set_current_stream)(int device, int64_t stream);
  /* allocation: the hot path */
  int (*malloc)(int device, size_t size, int64_t stream, uintptr_t* out);
  int (*free)(uintptr_t ptr);
  int (*record_stream)(uintptr_t ptr, int device, int64_t stream);
  int (*device_of)(uintptr_t ptr); /* -1 if not an allocated block */
  int (*notify_oom)(void);         /* calls the OOM observers with this thread's last OOM (takes the GIL) */
  /* streams */
  int (*stream_exists)(int device, int64_t stream);
  int (*new_stream)(int device, int priority, int64_t* out);
  int (*stream_query)(int device, int64_t stream); /* 1 idle, 0 busy, -1 error */
  int (*stream_synchronize)(int device, int64_t stream);
  int (*device_synchronize)(int device);
  int (*mem_get_info)(int device, uint64_t* free_bytes, uint64_t* total_bytes);
  /* events (opaque handles) */
  void* (*event_create)(int enable_timing);
  void (*event_destroy)(void* event);
  int (*event_record)(void* event, int device, int64_t stream);
  int (*event_query)(void* event); /* 1 complete, 0 pending */
  int (*event_synchronize)(void* event);
  int (*event_wait)(void* event, int device, int64_t stream);
  int (*event_elapsed_ms)(void* start, void* end, double* out);
  int (*event_recorded)(void* event);
  int (*record_level)(void); /* memory-history context level: 0 off, 1 state, 2 alloc, 3 all */
} MtiaAllocCAPI;

#ifdef __cplusplus
}
#endif
#endif
