// Random tensors from a seed of their own (src/model/lora.rs: LoRA's initialisation and dropout
// masks) behind a C interface: libtorch's samplers on a fresh generator of the tensor's device
// (Philox on CUDA, mt19937 on the CPU) seeded by the caller, so the values are a function of the
// seed alone, whatever else draws from the global generators: gradient checkpointing's recompute
// and a resumed run draw the same masks. tch 0.26 wraps no generators. Errors as torch_ffi.h says.

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "../torch_ffi.h"

static at::Generator seeded(const at::Tensor& like, uint64_t seed) {
  at::Generator generator = at::globalContext().defaultGenerator(like.device()).clone();
  generator.set_current_seed(seed);
  return generator;
}

// 1 with probability `keep`, else 0, shaped and typed as `like`.
extern "C" int magpie_seeded_bernoulli(at::Tensor* like, double keep, uint64_t seed, at::Tensor** out, char* err, size_t len) {
  return magpie::guarded(err, len, [&] { *out = new at::Tensor(at::empty_like(*like).bernoulli_(keep, seeded(*like, seed))); });
}

// Fills `tensor` in place, uniform in [low, high).
extern "C" int magpie_seeded_uniform_(at::Tensor* tensor, double low, double high, uint64_t seed, char* err, size_t len) {
  return magpie::guarded(err, len, [&] { tensor->uniform_(low, high, seeded(*tensor, seed)); });
}
