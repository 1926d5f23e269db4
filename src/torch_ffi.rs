//! Calls into magpie's C++ shims over libtorch (`*.cpp` beside the modules that use them, compiled
//! by build.rs against tch's libtorch), for what tch 0.26 does not wrap. They share one error
//! convention (`torch_ffi.h`): 0, or 1 with the exception's message in a buffer.

use anyhow::{bail, Result};
use std::ffi::{c_char, c_int};

/// Runs a shim call, turning its error text into an error that starts with `what`.
pub fn checked(what: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut err = vec![0u8; 4096];
    if call(err.as_mut_ptr() as *mut c_char, err.len()) == 0 {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&err[..err.iter().position(|&b| b == 0).unwrap_or(err.len())]).into_owned();
    bail!("{what}: {}", text.lines().next().unwrap_or("").trim())
}
