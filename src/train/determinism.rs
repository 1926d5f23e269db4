//! `--full-determinism`, as transformers' `enable_full_determinism`: libtorch's deterministic
//! kernels (flash attention's backward, scatter and index additions, cuDNN) and cuBLAS's fixed
//! workspace (`CUBLAS_WORKSPACE_CONFIG=:4096:8`), so a CUDA run, and a resumed one, repeat bit
//! for bit. An op with no deterministic kernel then fails naming itself. CPU runs are
//! deterministic without it. `determinism.cpp` (compiled by build.rs) holds the libtorch calls.

use anyhow::Result;
use std::ffi::{c_char, c_int};

use crate::torch_ffi::checked;

unsafe extern "C" {
    fn magpie_set_deterministic(on: c_int, err: *mut c_char, len: usize) -> c_int;
    fn magpie_deterministic_algorithms() -> c_int;
}

/// cuBLAS's deterministic workspace setting (CUDA's documented value for one stream).
pub const CUBLAS_WORKSPACE: &str = ":4096:8";

/// Turns deterministic mode on. Call before the first CUDA work: cuBLAS reads its workspace
/// setting when it makes a handle. A `CUBLAS_WORKSPACE_CONFIG` already set is kept.
pub fn enable() -> Result<()> {
    if std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
        // SAFETY: called at the start of a training command, before the loop starts threads
        // that read the environment.
        unsafe { std::env::set_var("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE) };
    }
    checked("enabling deterministic algorithms", |err, len| unsafe { magpie_set_deterministic(1, err, len) })
}

/// Whether libtorch's deterministic algorithms are on.
pub fn enabled() -> bool {
    unsafe { magpie_deterministic_algorithms() != 0 }
}
