//! How tokens attend within a row: plain causal, or several packed documents, each attending
//! only to itself. Packed rows run libtorch's variable-length flash attention on a CUDA GPU in
//! bf16/fp16 (`flash_attention.cpp`: cumulative sequence lengths and no mask, as TRL's
//! padding-free packing does), and SDPA with a `[batch, 1, seq, seq]` document mask elsewhere
//! (CPU, f32). Grouped-query attention is native in both: SDPA's `enable_gqa`, and the flash
//! kernel's own, so K and V are never repeated.

use anyhow::Result;
use std::ffi::{c_char, c_int};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::torch_ffi::checked;

unsafe extern "C" {
    fn magpie_flash_attention_varlen(query: *const C_tensor, key: *const C_tensor, value: *const C_tensor, cu_seqlens: *const C_tensor,
                                     max_len: i64, scale: f64, out: *mut *mut C_tensor, err: *mut c_char, len: usize) -> c_int;
}

/// How tokens may attend within a row.
pub enum AttentionMask {
    /// Plain causal attention (one document per row, padding only at the end).
    Causal,
    /// Packed rows. `ids` `[batch, seq]`: each token's document; a token sees earlier tokens of
    /// its own document. `cu_seqlens` (int32) bounds the same documents over the flattened
    /// `[batch * seq]` tokens, each row's padding tail a segment of its own, and `max_len` is the
    /// longest segment: the varlen kernel's inputs, made on the host with the batch.
    Documents { ids: Tensor, cu_seqlens: Tensor, max_len: i64 },
}

/// What every layer's attention runs, chosen once a forward pass.
pub enum Attend {
    Causal,
    /// SDPA with this boolean `[batch, 1, seq, seq]` mask, `true` where attention is allowed.
    Mask(Tensor),
    /// Varlen flash attention over these segments.
    Varlen { cu_seqlens: Tensor, max_len: i64 },
}

impl AttentionMask {
    /// The kernel for a model on `device` computing in `kind`: varlen flash attention for packed
    /// rows where it runs (CUDA, bf16/fp16, a GPU it supports: checked once a process), else SDPA.
    pub fn attend(&self, device: Device, kind: Kind) -> Attend {
        match self {
            AttentionMask::Causal => Attend::Causal,
            AttentionMask::Documents { cu_seqlens, max_len, .. } if matches!(kind, Kind::BFloat16 | Kind::Half) && flash_runs_on(device, kind) => {
                Attend::Varlen { cu_seqlens: cu_seqlens.shallow_clone(), max_len: *max_len }
            }
            AttentionMask::Documents { ids, .. } => {
                let t = ids.size()[1];
                let same = ids.unsqueeze(2).eq_tensor(&ids.unsqueeze(1));
                let causal = Tensor::ones([t, t], (Kind::Bool, ids.device())).tril(0);
                Attend::Mask(same.logical_and(&causal).unsqueeze(1))
            }
        }
    }
}

impl Attend {
    /// Attention of `query` `[batch, seq, heads, head_dim]` over `key` and `value`
    /// `[batch, seq, kv_heads, head_dim]`, as `[batch, seq, heads * head_dim]`.
    pub fn attention(&self, query: &Tensor, key: &Tensor, value: &Tensor) -> Tensor {
        match self {
            Attend::Varlen { cu_seqlens, max_len } => {
                let (b, t, heads, dim) = query.size4().expect("query is [batch, seq, heads, head_dim]");
                let flat = |x: &Tensor| x.reshape([b * t, x.size()[2], dim]);
                let y = flash_varlen(&flat(query), &flat(key), &flat(value), cu_seqlens, *max_len)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                y.reshape([b, t, heads * dim])
            }
            Attend::Causal => sdpa(query, key, value, None),
            Attend::Mask(mask) => sdpa(query, key, value, Some(mask)),
        }
    }
}

/// SDPA over `[batch, seq, heads, head_dim]` tensors: causal, or with a boolean mask.
fn sdpa(query: &Tensor, key: &Tensor, value: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let (b, t, heads, dim) = query.size4().expect("query is [batch, seq, heads, head_dim]");
    let gqa = heads != key.size()[2];
    let (q, k, v) = (query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2));
    let y = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, mask.is_none(), None, gqa);
    y.transpose(1, 2).reshape([b, t, heads * dim])
}

/// Causal varlen flash attention: `[tokens, heads, head_dim]` queries over
/// `[tokens, kv_heads, head_dim]` keys and values, sequences bounded by `cu_seqlens`.
fn flash_varlen(query: &Tensor, key: &Tensor, value: &Tensor, cu_seqlens: &Tensor, max_len: i64) -> Result<Tensor> {
    let scale = 1.0 / (query.size()[2] as f64).sqrt();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    checked("varlen flash attention", |err, len| unsafe {
        magpie_flash_attention_varlen(query.as_ptr(), key.as_ptr(), value.as_ptr(), cu_seqlens.as_ptr(), max_len, scale, &mut out, err, len)
    })?;
    // SAFETY: on success the shim stored a tensor it allocated with `new`, which tch now owns.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Runs `op` forward and backward on a tiny input of `kind` on `device`, with gradients on
/// whatever the caller's mode: the first packed batch may come under no_grad (an evaluation, or
/// DPO's reference pass), and a probe without the backward would pass a kernel whose backward
/// fails.
fn forward_and_backward(device: Device, kind: Kind, op: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    tch::with_grad(|| {
        let x = Tensor::ones([4, 2, 8], (kind, device)).set_requires_grad(true);
        Ok(op(&x)?.sum(Kind::Float).f_backward()?)
    })
}

/// Whether varlen flash attention runs on `device` in `kind`, forward and backward: tried once
/// on a tiny input (the kernel needs an sm80+ GPU), so a failing backward cannot stop a training
/// step later; where it does not run, packed rows fall back to SDPA with a mask, and the first
/// failure is printed.
fn flash_runs_on(device: Device, kind: Kind) -> bool {
    static CHECKED: Mutex<Vec<(Device, Kind, bool)>> = Mutex::new(vec![]);
    if !device.is_cuda() {
        return false;
    }
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, _, runs)) = checked.iter().find(|(d, k, _)| *d == device && *k == kind) {
        return runs;
    }
    let cu = Tensor::from_slice(&[0i32, 1, 4]).to_device(device);
    let runs = match forward_and_backward(device, kind, |x| flash_varlen(x, x, x, &cu, 3)) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("warning: {e:#}; packed rows use SDPA with a document mask instead");
            false
        }
    };
    checked.push((device, kind, runs));
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe's backward runs even when the caller is under no_grad (the step-0 evaluation).
    #[test]
    fn the_kernel_probe_runs_the_backward_under_no_grad_too() {
        let doubled = |x: &Tensor| Ok(x * 2.0);
        assert!(tch::no_grad(|| forward_and_backward(Device::Cpu, Kind::Float, doubled)).is_ok());
        let failing = |_: &Tensor| -> Result<Tensor> { anyhow::bail!("no kernel") };
        assert!(forward_and_backward(Device::Cpu, Kind::Float, failing).is_err());
    }
}
