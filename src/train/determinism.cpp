// libtorch's deterministic mode (`torch.use_deterministic_algorithms(True)` with cuDNN
// deterministic and its autotuner off, as transformers' `enable_full_determinism` sets them)
// behind a C interface for Rust (src/train/determinism.rs); tch 0.26 does not wrap it.
// Compiled by build.rs against the same libtorch as tch. Errors as torch_ffi.h says.

#include <ATen/Context.h>

#include "../torch_ffi.h"

extern "C" int magpie_set_deterministic(int on, char* err, size_t len) {
  return magpie::guarded(err, len, [&] {
    auto& context = at::globalContext();
    // Not warn-only: an op without a deterministic kernel is an error naming it.
    context.setDeterministicAlgorithms(on != 0, /*warn_only=*/false);
    context.setDeterministicCuDNN(on != 0);
    if (on != 0) context.setBenchmarkCuDNN(false);
  });
}

extern "C" int magpie_deterministic_algorithms() { return at::globalContext().deterministicAlgorithms() ? 1 : 0; }
