// Variable-length flash attention (`at::_flash_attention_forward` with cumulative sequence
// lengths, the kernel transformers and TRL use for padding-free packing) behind a C interface for
// Rust (src/model/attention.rs); tch 0.26 does not wrap it. The call goes through the dispatcher,
// so autograd records it and the backward is libtorch's `_flash_attention_backward`. CUDA only
// (fp16/bf16, sm80+). Compiled by build.rs against the same libtorch as tch; tensors cross as
// `torch::Tensor*`. The output comes back in `out`; errors as torch_ffi.h says.

#include <ATen/ATen.h>
#include <ATen/ops/_flash_attention_forward.h>

#include "../torch_ffi.h"

extern "C" int magpie_flash_attention_varlen(at::Tensor* query, at::Tensor* key, at::Tensor* value, at::Tensor* cu_seqlens, int64_t max_len,
                                             double scale, at::Tensor** out, char* err, size_t len) {
  return magpie::guarded(err, len, [&] {
    // query [tokens, heads, head_dim]; key and value [tokens, kv_heads, head_dim] (GQA native);
    // cu_seqlens int32 [sequences + 1]; causal within each sequence, no dropout.
    auto result = at::_flash_attention_forward(*query, *key, *value, *cu_seqlens, *cu_seqlens, max_len, max_len, /*dropout_p=*/0.0,
                                               /*is_causal=*/true, /*return_debug_mask=*/false, scale);
    *out = new at::Tensor(std::get<0>(result));
  });
}
