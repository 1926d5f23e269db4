//! A c10d process group from the libtorch that tch links (`c10d.cpp`, compiled by build.rs): a
//! TCPStore rendezvous and Gloo (CPU) or NCCL (CUDA), with the collectives data parallelism needs.

use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, c_long, c_void, CString};
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::torch_ffi::checked;

unsafe extern "C" {
    fn magpie_c10d_new(backend: *const c_char, host: *const c_char, port: c_int, rank: c_int, world: c_int, device: c_int, timeout_ms: c_long,
                       out: *mut *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn magpie_c10d_free(group: *mut c_void);
    fn magpie_c10d_all_reduce_sum(group: *mut c_void, tensor: *const C_tensor, err: *mut c_char, len: usize) -> c_int;
    fn magpie_c10d_all_gather(group: *mut c_void, output: *const C_tensor, input: *const C_tensor, err: *mut c_char, len: usize) -> c_int;
}

/// This process's membership of the group; leaving it (drop) closes the connections.
pub struct ProcessGroup {
    handle: *mut c_void,
    pub rank: usize,
    pub size: usize,
    /// Where the group's tensors live: CPU for Gloo, this rank's GPU for NCCL.
    pub device: Device,
}

// The c10d objects are thread-safe; the handle is only freed on drop.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group of `size` processes whose rank 0 serves the rendezvous at `host:port`.
    /// Every collective fails after `timeout`, as does a rendezvous that does not complete.
    pub fn join(host: &str, port: u16, rank: usize, size: usize, device: Device, timeout: Duration) -> Result<ProcessGroup> {
        let (backend, index) = match device {
            Device::Cuda(index) => ("nccl", index),
            _ => ("gloo", 0),
        };
        let (c_backend, c_host) = (CString::new(backend)?, CString::new(host)?);
        let mut handle = std::ptr::null_mut();
        let what = format!("rank {rank} of {size}: joining the {backend} process group at {host}:{port}");
        checked(&what, |err, len| unsafe {
            magpie_c10d_new(c_backend.as_ptr(), c_host.as_ptr(), port as c_int, rank as c_int, size as c_int, index as c_int,
                            timeout.as_millis() as c_long, &mut handle, err, len)
        })?;
        Ok(ProcessGroup { handle, rank, size, device })
    }

    /// Sums a contiguous tensor over the ranks, in place.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        checked(&self.failure("all-reduce"), |err, len| unsafe { magpie_c10d_all_reduce_sum(self.handle, tensor.as_ptr(), err, len) })
    }

    /// Fills `output` (contiguous, `size` times `input`'s elements) with every rank's `input`,
    /// in rank order.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        checked(&self.failure("all-gather"), |err, len| unsafe { magpie_c10d_all_gather(self.handle, output.as_ptr(), input.as_ptr(), err, len) })
    }

    /// Returns once every rank has called it (an all-reduce whose result is read).
    pub fn barrier(&self) -> Result<()> {
        let token = Tensor::ones([1], (Kind::Float, self.device));
        self.all_reduce_sum(&token)?;
        let arrived = token.double_value(&[0]) as usize;
        if arrived != self.size {
            bail!("barrier: {arrived} of {} ranks arrived", self.size);
        }
        Ok(())
    }

    fn failure(&self, what: &str) -> String {
        format!("rank {} of {}: {what} failed (another rank stopped, failed or timed out; its own log says why)", self.rank, self.size)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { magpie_c10d_free(self.handle) }
    }
}
