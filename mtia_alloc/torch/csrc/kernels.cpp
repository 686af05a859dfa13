// kernels.cpp: the MTIA kernels. Emulated device memory is host memory, so an op runs as
// its CPU kernel on CPU tensors that alias the MTIA tensors' bytes (zero-copy): a boxed
// fallback does that for every op without an MTIA kernel of its own. Fresh results are
// copied into memory from mtia_alloc's allocator; results that view an input become views
// of the MTIA input; arguments an op writes get a resizable alias, and if the CPU kernel
// resized it the MTIA tensor is resized to match. Ops run synchronously on the calling
// thread, in program order, each after the work already queued on its device's current
// stream (so in stream order).
//
// Graph capture: while a graph captures on (device, stream), every op run there is also
// recorded (the CPU op and its arguments, MTIA tensors as aliases of their memory, which
// stays reserved in the graph's private pool) and replay() runs the records again: on the
// same memory, with fresh results copied into the memory the capture gave them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_local_scalar_dense_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/unfold_native.h>
#include <ATen/ops/view_as_complex_native.h>
#include <ATen/ops/view_as_real_native.h>
#include <ATen/ops/view_native.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "mtia_torch.h"

namespace mtia_torch {

using Stack = std::vector<c10::IValue>;
static const c10::DispatchKeySet kCpuKeys(c10::DispatchKey::CPU);
static const c10::DispatchKeySet kMtiaKeys(c10::DispatchKey::MTIA);

// ------------------------------------------------------------------ tensors over our memory

static c10::Storage new_storage(int device, size_t nbytes) {
  return c10::Storage(c10::Storage::use_byte_size_t(), nbytes, allocator().allocate_on(device, nbytes), &allocator(),
                      /*resizable=*/true);
}

static int device_arg(std::optional<c10::Device> device) {
  ensure_init();
  if (!device || !device->has_index()) return api().current_device();
  TORCH_CHECK_VALUE(device->type() == c10::DeviceType::MTIA, "expected an MTIA device, got ", *device);
  return check_device(device->index());
}

static at::Tensor empty_mtia(c10::IntArrayRef size, std::optional<at::ScalarType> dtype, std::optional<c10::Layout> layout,
                             std::optional<c10::Device> device, std::optional<bool> pin_memory,
                             std::optional<c10::MemoryFormat> memory_format) {
  TORCH_CHECK(!layout || *layout == c10::kStrided, "mtia tensors are strided only, got layout ", *layout);
  int d = device_arg(device);
  auto meta = c10::scalarTypeToTypeMeta(dtype.value_or(c10::get_default_dtype_as_scalartype()));
  size_t nbytes = at::detail::computeStorageNbytesContiguous(size, meta.itemsize());
  auto t = at::detail::make_tensor<c10::TensorImpl>(new_storage(d, nbytes), kMtiaKeys, meta);
  if (!(size.size() == 1 && size[0] == 0)) t.unsafeGetTensorImpl()->set_sizes_contiguous(size);
  if (memory_format && *memory_format != c10::MemoryFormat::Contiguous) {
    TORCH_CHECK(*memory_format != c10::MemoryFormat::Preserve, "empty: memory_format Preserve is not allowed");
    t.unsafeGetTensorImpl()->empty_tensor_restride(*memory_format);
  }
  return t;
}

static at::Tensor empty_strided_mtia(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                                     std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                                     std::optional<bool> pin_memory) {
  TORCH_CHECK(!layout || *layout == c10::kStrided, "mtia tensors are strided only, got layout ", *layout);
  int d = device_arg(device);
  auto meta = c10::scalarTypeToTypeMeta(dtype.value_or(c10::get_default_dtype_as_scalartype()));
  size_t nbytes = at::detail::computeStorageNbytes(size, stride, meta.itemsize());
  auto t = at::detail::make_tensor<c10::TensorImpl>(new_storage(d, nbytes), kMtiaKeys, meta);
  t.unsafeGetTensorImpl()->set_sizes_and_strides(size, stride);
  return t;
}

// Grows t's storage to at least `nbytes`, keeping its contents (resize_ and written args).
static void grow_storage(const at::Tensor& t, size_t nbytes) {
  c10::StorageImpl* st = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
  if (st->nbytes() >= nbytes) return;
  TORCH_CHECK(st->resizable(), "Trying to resize storage that is not resizable");
  c10::DataPtr fresh = allocator().allocate_on(t.device().index(), nbytes);
  if (st->nbytes()) std::memcpy(fresh.get(), st->data(), st->nbytes());
  st->set_data_ptr_noswap(std::move(fresh));
  st->set_nbytes(nbytes);
}

static const at::Tensor& resize_mtia_(const at::Tensor& self, c10::IntArrayRef size,
                                      std::optional<c10::MemoryFormat> memory_format) {
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_sizes_contiguous(size);
  int64_t numel = impl->numel();
  if (numel > 0) grow_storage(self, size_t(impl->storage_offset() + numel) * self.itemsize());
  if (memory_format) {
    TORCH_CHECK(*memory_format != c10::MemoryFormat::Preserve, "Unsupported memory format Preserve");
    impl->empty_tensor_restride(*memory_format);
  }
  return self;
}

static at::Tensor& set_empty_mtia_(at::Tensor& self) {
  c10::Storage st = new_storage(self.device().index(), 0);
  self.unsafeGetTensorImpl()->set_storage_offset(0);
  self.unsafeGetTensorImpl()->set_storage_keep_dtype(std::move(st));
  self.unsafeGetTensorImpl()->set_sizes_contiguous({0});
  return self;
}

static void record_stream_mtia(at::Tensor& self, c10::Stream s) {
  TORCH_CHECK_VALUE(s.device_type() == c10::DeviceType::MTIA, "record_stream: expected an MTIA stream, got ", s);
  TORCH_CHECK_VALUE(s.device_index() == self.device().index(), "record_stream: the tensor is on ", self.device(),
                    " but the stream is on mtia:", int(s.device_index()),
                    "; a tensor can only be recorded on a stream of its own device");
  allocator().recordStream(self.storage().data_ptr(), s);
}

// A CPU tensor over the same bytes as MTIA tensor t. `resizable`: a CPU kernel may resize
// it (into CPU memory; the caller copies back).
static at::Tensor cpu_alias(const at::Tensor& t, bool resizable) {
  const c10::Storage& st = t.storage();
  c10::Storage cs(c10::Storage::use_byte_size_t(), st.nbytes(),
                  c10::DataPtr(const_cast<void*>(st.data()), c10::Device(c10::DeviceType::CPU)),
                  resizable ? c10::GetAllocator(c10::DeviceType::CPU) : nullptr, resizable);
  auto out = at::detail::make_tensor<c10::TensorImpl>(std::move(cs), kCpuKeys, t.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
  if (t.is_conj()) out._set_conj(true);
  if (t.is_neg()) out._set_neg(true);
  return out;
}

static bool is_mtia(const at::Tensor& t) { return t.defined() && t.device().type() == c10::DeviceType::MTIA; }

// ------------------------------------------------------------------ graph recording

struct OpRecord {
  c10::OperatorHandle op;
  Stack args;                                         // CPU view of the arguments
  // (return index, list element or -1, alias of the result the capture got)
  std::vector<std::tuple<size_t, int64_t, at::Tensor>> outs;
};

struct Capture {
  int device = -1;
  int64_t stream = 0;
  bool active = false;
  std::vector<OpRecord> ops;
};

static std::mutex cap_mu;
static std::unordered_map<int64_t, Capture>& captures() {
  static auto* m = new std::unordered_map<int64_t, Capture>();
  return *m;
}
static std::atomic<int> active_captures{0};

// The handle of the capture recording ops run on device d's current stream, or 0.
static int64_t capture_on(int d) {
  if (!active_captures.load(std::memory_order_relaxed)) return 0;
  int64_t s = api().current_stream(d);
  std::lock_guard<std::mutex> lock(cap_mu);
  for (auto& [h, c] : captures())
    if (c.active && c.device == d && c.stream == s) return h;
  return 0;
}

// Appends a record to capture `handle` if it is still capturing (it may have ended, from
// another thread, while the op ran: the lock is not held across the op).
static void append_record(int64_t handle, OpRecord&& r) {
  std::lock_guard<std::mutex> lock(cap_mu);
  auto it = captures().find(handle);
  if (it != captures().end() && it->second.active) it->second.ops.push_back(std::move(r));
}

void capture_begin(int64_t handle, int device, int64_t stream) {
  std::lock_guard<std::mutex> lock(cap_mu);
  Capture& c = captures()[handle];
  c = Capture{device, stream, true, {}};
  active_captures.fetch_add(1);
}

void capture_end(int64_t handle) {
  std::lock_guard<std::mutex> lock(cap_mu);
  auto it = captures().find(handle);
  if (it != captures().end() && it->second.active) {
    it->second.active = false;
    active_captures.fetch_sub(1);
  }
}

void forget(int64_t handle) {
  std::lock_guard<std::mutex> lock(cap_mu);
  auto it = captures().find(handle);
  if (it == captures().end()) return;
  if (it->second.active) active_captures.fetch_sub(1);
  captures().erase(it);
}

size_t recorded_ops(int64_t handle) {
  std::lock_guard<std::mutex> lock(cap_mu);
  auto it = captures().find(handle);
  return it == captures().end() ? 0 : it->second.ops.size();
}

void replay(int64_t handle) {
  std::vector<OpRecord> ops;
  {
    std::lock_guard<std::mutex> lock(cap_mu);
    auto it = captures().find(handle);
    if (it == captures().end()) return;
    ops = it->second.ops;  // shares the tensors: cheap
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (auto& r : ops) {
    Stack stack = r.args;
    r.op.redispatchBoxed(kCpuKeys, &stack);
    for (auto& [i, k, target] : r.outs) {
      const c10::IValue& v = stack[i];
      if (k < 0 && v.isTensor() && v.toTensor().defined()) target.copy_(v.toTensor());
      if (k >= 0 && v.isTensorList()) target.copy_(v.toTensorList().get(size_t(k)));
    }
  }
}

// ------------------------------------------------------------------ the CPU-kernel runner

static bool is_generator_arg(const c10::Argument& a) {
  auto t = a.type();
  if (t->kind() == c10::TypeKind::OptionalType) t = t->castRaw<c10::OptionalType>()->getElementType();
  return t->kind() == c10::TypeKind::GeneratorType;
}

static at::Tensor to_mtia_result(const at::Tensor& r, int device, const std::vector<std::pair<at::Tensor, at::Tensor>>& inputs,
                                 bool* fresh) {
  *fresh = false;
  if (!r.defined() || r.device().type() != c10::DeviceType::CPU) return r;
  const void* data = r.storage().data();
  if (data != nullptr) {
    for (auto& [orig, alias] : inputs) {  // a view of an input: the same view of the MTIA input
      if (alias.storage().data() == data) {
        auto v = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(orig.storage()),
                                                            orig.key_set(), orig.dtype());
        v.unsafeGetTensorImpl()->set_sizes_and_strides(r.sizes(), r.strides(), r.storage_offset());
        return v;
      }
    }
  }
  *fresh = true;
  at::Tensor out = r.is_non_overlapping_and_dense()
                       ? empty_strided_mtia(r.sizes(), r.strides(), r.scalar_type(), std::nullopt, c10::Device(c10::DeviceType::MTIA, device), std::nullopt)
                       : empty_mtia(r.sizes(), r.scalar_type(), std::nullopt, c10::Device(c10::DeviceType::MTIA, device), std::nullopt, std::nullopt);
  if (r.is_non_overlapping_and_dense()) {
    if (r.nbytes()) std::memcpy(out.data_ptr(), r.data_ptr(), r.nbytes());
  } else {
    cpu_alias(out, false).copy_(r);
  }
  return out;
}

// Stream order: an op runs on the calling thread once the work already queued on the
// current stream of its device (mtia_alloc kernels, event waits) has run.
static void wait_for_current_stream(int device) {
  const MtiaAllocCAPI& a = api();
  int64_t s = a.current_stream(device);
  int idle = a.stream_query(device, s);
  if (idle == 1) return;
  int rc = idle < 0 ? -1 : a.stream_synchronize(device, s);
  if (rc) raise_capi_error(rc, "waiting for the current stream");
}

static at::Scalar local_scalar_dense_mtia(const at::Tensor& self) {
  wait_for_current_stream(self.device().index());
  return at::native::_local_scalar_dense_cpu(self);
}

// Runs `op`'s CPU kernel on the arguments at the top of `stack` (MTIA tensors replaced by
// CPU aliases) and leaves its results there, as MTIA tensors. `same_device`: all MTIA
// arguments must be on one device (every op but copy_).
static void run_on_cpu(const c10::OperatorHandle& op, Stack* stack, bool same_device) {
  const auto& schema = op.schema();
  const auto& args = schema.arguments();
  const size_t n = args.size();
  const size_t base = stack->size() - n;
  int device = -1;
  int other_device = -1;  // copy_ between devices: the second one
  auto note = [&](int d) {
    if (device < 0) {
      device = d;
      return;
    }
    if (d != device) other_device = d;
    TORCH_CHECK(!same_device || d == device,
                "Expected all tensors to be on the same device, but found at least two devices, mtia:", device,
                " and mtia:", d, "! (when checking arguments for ", schema.name(), ")");
  };
  std::vector<c10::IValue> orig(n);
  std::vector<std::pair<at::Tensor, at::Tensor>> inputs;  // (MTIA tensor, its CPU alias)
  std::vector<std::tuple<size_t, at::Tensor, at::Tensor>> written;
  std::vector<size_t> none_generators;
  for (size_t i = 0; i < n; ++i) {
    c10::IValue& v = (*stack)[base + i];
    orig[i] = v;
    const bool writes = args[i].alias_info() && args[i].alias_info()->isWrite();
    if (v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      if (!is_mtia(t)) continue;
      note(t.device().index());
      at::Tensor a = cpu_alias(t, writes);
      inputs.emplace_back(t, a);
      if (writes) written.emplace_back(i, t, a);
      v = a;
    } else if (v.isTensorList()) {
      auto list = v.toTensorList();
      c10::List<at::Tensor> out;
      out.reserve(list.size());
      for (const at::Tensor& t : list) {
        if (is_mtia(t)) {
          note(t.device().index());
          at::Tensor a = cpu_alias(t, false);
          inputs.emplace_back(t, a);
          out.push_back(a);
        } else {
          out.push_back(t);
        }
      }
      v = out;
    } else if (v.isOptionalTensorList()) {
      auto list = v.toOptionalTensorList();
      c10::List<std::optional<at::Tensor>> out;
      out.reserve(list.size());
      for (std::optional<at::Tensor> t : list) {
        if (t && is_mtia(*t)) {
          note(t->device().index());
          at::Tensor a = cpu_alias(*t, false);
          inputs.emplace_back(*t, a);
          out.push_back(a);
        } else {
          out.push_back(t);
        }
      }
      v = out;
    } else if (v.isDevice()) {
      c10::Device d = v.toDevice();
      if (d.type() != c10::DeviceType::MTIA) continue;
      note(device_arg(d));
      v = c10::Device(c10::DeviceType::CPU);
    } else if (v.isGenerator()) {
      const at::Generator& g = v.toGenerator();
      if (g.device().type() == c10::DeviceType::MTIA) {
        note(g.device().index());
        v = cpu_generator_of(g);
      }
    } else if (v.isNone() && is_generator_arg(args[i])) {
      none_generators.push_back(i);
    }
  }
  if (device < 0) {
    ensure_init();
    device = api().current_device();
  }
  for (size_t i : none_generators) (*stack)[base + i] = cpu_generator_of(default_generator(c10::DeviceIndex(device)));
  wait_for_current_stream(device);
  if (other_device >= 0) wait_for_current_stream(other_device);

  const int64_t cap = capture_on(device);
  Stack cpu_args;
  if (cap) cpu_args.assign(stack->begin() + base, stack->end());

  try {
    op.redispatchBoxed(kCpuKeys, stack);
  } catch (const c10::NotImplementedError& e) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "mtia_alloc's MTIA backend cannot run ", schema.operator_name(),
                                ": it runs ops through their CPU kernels, and this op has none (",
                                e.what_without_backtrace(), ")");
  }

  // Arguments the op wrote: if the CPU kernel resized one, resize the MTIA tensor to match.
  for (auto& [i, t, a] : written) {
    const c10::StorageImpl* as = a.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
    if (as->data() != t.storage().data()) {  // reallocated in CPU memory: bring it back
      grow_storage(t, as->nbytes());
      if (as->nbytes()) std::memcpy(t.storage().mutable_data(), as->data(), as->nbytes());
    }
    if (a.sizes() != t.sizes() || a.strides() != t.strides() || a.storage_offset() != t.storage_offset()) {
      grow_storage(t, as->nbytes());
      t.unsafeGetTensorImpl()->set_sizes_and_strides(a.sizes(), a.strides(), a.storage_offset());
    }
    if (cap) cpu_args[i] = cpu_alias(t, false);
  }

  // Results.
  const auto& rets = schema.returns();
  const size_t nret = rets.size();
  const size_t rbase = stack->size() - nret;
  std::vector<std::tuple<size_t, int64_t, at::Tensor>> outs;
  for (size_t r = 0; r < nret; ++r) {
    c10::IValue& v = (*stack)[rbase + r];
    if (rets[r].alias_info() && rets[r].alias_info()->isWrite()) {
      // returns the argument it wrote (in-place and out= ops): return the MTIA one. (Views,
      // non-writing aliases, become views of the MTIA input in to_mtia_result.)
      bool found = false;
      for (size_t i = 0; i < n && !found; ++i) {
        if (args[i].alias_info() && args[i].alias_info()->beforeSets() == rets[r].alias_info()->beforeSets()) {
          v = orig[i];
          found = true;
        }
      }
      if (found) continue;
    }
    if (v.isTensor()) {
      bool fresh = false;
      v = to_mtia_result(v.toTensor(), device, inputs, &fresh);
      if (cap && fresh) outs.emplace_back(r, -1, cpu_alias(v.toTensor(), false));
    } else if (v.isTensorList()) {
      auto list = v.toTensorList();
      c10::List<at::Tensor> out;
      for (size_t k = 0; k < list.size(); ++k) {
        bool fresh = false;
        out.push_back(to_mtia_result(list.get(k), device, inputs, &fresh));
        if (cap && fresh) outs.emplace_back(r, int64_t(k), cpu_alias(out.get(k), false));
      }
      v = out;
    }
  }
  if (cap) append_record(cap, OpRecord{op, std::move(cpu_args), std::move(outs)});
}

static void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet, Stack* stack) { run_on_cpu(op, stack, true); }

static void copy_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet, Stack* stack) {
  run_on_cpu(op, stack, /*same_device=*/false);  // mtia:0 <-> mtia:1 and cpu <-> mtia
}

// convolution_overrideable is what aten::convolution calls for a device it does not know;
// aten::convolution (same arguments) picks the CPU algorithms for the CPU aliases.
static void conv_forward_boxed(const c10::OperatorHandle&, c10::DispatchKeySet, Stack* stack) {
  static const c10::OperatorHandle conv = c10::Dispatcher::singleton().findSchemaOrThrow("aten::convolution", "");
  run_on_cpu(conv, stack, true);
}

// convolution_backward_overrideable(grad_output, input, weight, stride, padding, dilation,
// transposed, output_padding, groups, output_mask) -> aten::convolution_backward, which
// also takes bias_sizes (after weight).
static void conv_backward_boxed(const c10::OperatorHandle&, c10::DispatchKeySet, Stack* stack) {
  static const c10::OperatorHandle bwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("aten::convolution_backward", "");
  const size_t base = stack->size() - 10;
  const at::Tensor& weight = (*stack)[base + 2].toTensor();
  const bool transposed = (*stack)[base + 6].toBool();
  const int64_t groups = (*stack)[base + 8].toInt();
  int64_t bias = transposed ? weight.size(1) * groups : weight.size(0);
  stack->insert(stack->begin() + base + 3, c10::IValue(std::vector<int64_t>{bias}));
  run_on_cpu(bwd, stack, true);
}

}  // namespace mtia_torch

TORCH_LIBRARY_IMPL(_, MTIA, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&mtia_torch::fallback>()); }

TORCH_LIBRARY_IMPL(aten, MTIA, m) {
  using namespace mtia_torch;
  m.impl("empty.memory_format", TORCH_FN(empty_mtia));
  m.impl("empty_strided", TORCH_FN(empty_strided_mtia));
  m.impl("copy_", torch::CppFunction::makeFromBoxedFunction<&copy_boxed>());
  m.impl("_local_scalar_dense", TORCH_FN(local_scalar_dense_mtia));
  m.impl("view", TORCH_FN(at::native::view));
  m.impl("view.dtype", TORCH_FN(at::native::view_dtype));
  m.impl("as_strided", TORCH_FN(at::native::as_strided_tensorimpl));
  m.impl("_reshape_alias", TORCH_FN(at::native::_reshape_alias));
  m.impl("unfold", TORCH_FN(at::native::unfold));
  m.impl("view_as_real", TORCH_FN(at::native::view_as_real));
  m.impl("view_as_complex", TORCH_FN(at::native::view_as_complex));
  m.impl("resize_", TORCH_FN(resize_mtia_));
  m.impl("set_", TORCH_FN(set_empty_mtia_));
  m.impl("set_.source_Storage", TORCH_FN(static_cast<at::Tensor& (*)(at::Tensor&, at::Storage)>(at::native::set_)));
  m.impl("set_.source_Storage_storage_offset", TORCH_FN(at::native::set_storage_cpu_));
  m.impl("set_.source_Tensor", TORCH_FN(at::native::set_tensor_));
  m.impl("record_stream", TORCH_FN(record_stream_mtia));
  m.impl("convolution_overrideable", torch::CppFunction::makeFromBoxedFunction<&conv_forward_boxed>());
  m.impl("convolution_backward_overrideable", torch::CppFunction::makeFromBoxedFunction<&conv_backward_boxed>());
}
