// A GPU's memory as libtorch's allocator asks the CUDA runtime for it (`cudaMemGetInfo` on that
// device: a MIG slice's own), behind a C interface for Rust (src/train/memory.rs), as
// `torch.cuda.mem_get_info` reads it; tch 0.26 does not wrap it. Compiled by build.rs against the
// same libtorch as tch. Errors as torch_ffi.h says (a libtorch without CUDA has no accelerator
// and says so).

#include <ATen/DeviceAccelerator.h>

#include "../torch_ffi.h"

extern "C" int magpie_device_total_memory(int device, size_t* total, char* err, size_t len) {
  return magpie::guarded(err, len, [&] {
    *total = at::accelerator::getMemoryInfo(static_cast<c10::DeviceIndex>(device)).second;
  });
}
