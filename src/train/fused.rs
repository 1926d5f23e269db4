//! libtorch's fused AdamW kernel, the one `torch.optim.AdamW(fused=True)` runs: every tensor of a
//! group updated by one multi-tensor kernel (CUDA and CPU), instead of a dozen small ops a
//! parameter. tch 0.26 does not wrap it, so `fused_adamw.cpp` (compiled by build.rs) does.

use anyhow::Result;
use std::ffi::{c_char, c_int};
use tch::Tensor;
use torch_sys::C_tensor;

use crate::torch_ffi::checked;

unsafe extern "C" {
    fn magpie_fused_adamw(params: *const *const C_tensor, grads: *const *const C_tensor, exp_avgs: *const *const C_tensor,
                          exp_avg_sqs: *const *const C_tensor, n: c_int, step: f64, lr: f64, beta1: f64, beta2: f64, weight_decay: f64,
                          eps: f64, err: *mut c_char, len: usize) -> c_int;
}

/// Tensors updated together: same device and dtype, one weight-decay setting.
#[derive(Default)]
pub struct Group {
    pub values: Vec<Tensor>,
    pub grads: Vec<Tensor>,
    pub exp_avgs: Vec<Tensor>,
    pub exp_avg_sqs: Vec<Tensor>,
}

impl Group {
    pub fn push(&mut self, value: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) {
        self.values.push(value);
        self.grads.push(grad);
        self.exp_avgs.push(exp_avg);
        self.exp_avg_sqs.push(exp_avg_sq);
    }
}

/// AdamW's hyper-parameters for one call.
pub struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    /// The 1-based step the bias corrections use.
    pub step: i64,
}

/// Updates `group` in place: values, and both moments.
pub fn adamw(group: &Group, h: &Hyper) -> Result<()> {
    let ptrs = |tensors: &[Tensor]| tensors.iter().map(|t| t.as_ptr()).collect::<Vec<_>>();
    let (values, grads, exp_avgs, exp_avg_sqs) = (ptrs(&group.values), ptrs(&group.grads), ptrs(&group.exp_avgs), ptrs(&group.exp_avg_sqs));
    checked("fused AdamW", |err, len| unsafe {
        magpie_fused_adamw(values.as_ptr(), grads.as_ptr(), exp_avgs.as_ptr(), exp_avg_sqs.as_ptr(), values.len() as c_int, h.step as f64, h.lr,
                           h.beta1, h.beta2, h.weight_decay, h.eps, err, len)
    })
}
