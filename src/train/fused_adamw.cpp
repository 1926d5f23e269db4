// libtorch's fused AdamW kernel (`torch.optim.AdamW(fused=True)`: one multi-tensor kernel on CUDA
// and CPU) behind a C interface for Rust (src/train/fused.rs); tch 0.26 does not wrap it.
// Compiled by build.rs against the same libtorch as tch; tensors cross as `torch::Tensor*`.
// Errors as torch_ffi.h says.

#include <ATen/ATen.h>
#include <ATen/ops/_fused_adamw.h>

#include "../torch_ffi.h"

#include <optional>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor** tensors, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; i++) out.push_back(*tensors[i]);
  return out;
}

}  // namespace

extern "C" int magpie_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs, int n,
                                  double step, double lr, double beta1, double beta2, double weight_decay, double eps, char* err,
                                  size_t len) {
  return magpie::guarded(err, len, [&] {
    if (n == 0) return;
    auto values = list(params, n);
    // The step count the bias corrections use, one 0-dim f32 tensor per parameter as torch.optim
    // keeps them (the kernel reads them; torch.optim increments them before the call).
    std::vector<at::Tensor> steps;
    steps.reserve(n);
    auto step_tensor = at::full({}, step, values[0].options().dtype(at::kFloat));
    for (int i = 0; i < n; i++) steps.push_back(step_tensor);
    at::_fused_adamw_(values, list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
  });
}
