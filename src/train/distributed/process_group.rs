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
    fn magpie_c10d_reduce_scatter_sum_start(group: *mut c_void, output: *const C_tensor, input: *const C_tensor, pending: *mut *mut c_void,
                                            err: *mut c_char, len: usize) -> c_int;
    fn magpie_c10d_all_gather_start(group: *mut c_void, output: *const C_tensor, input: *const C_tensor, pending: *mut *mut c_void,
                                    err: *mut c_char, len: usize) -> c_int;
    fn magpie_c10d_wait(pending: *mut c_void, err: *mut c_char, len: usize) -> c_int;
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

    /// Starts summing `input` (contiguous, `size` times `output`'s elements) over the ranks;
    /// once waited for, `output` holds this rank's slice of the sum (slice `rank` of `size`).
    pub fn reduce_scatter_sum(&self, output: &Tensor, input: &Tensor) -> Result<Pending<'_>> {
        self.start("reduce-scatter", |pending, err, len| unsafe {
            magpie_c10d_reduce_scatter_sum_start(self.handle, output.as_ptr(), input.as_ptr(), pending, err, len)
        })
    }

    /// Starts filling the flat `output` (contiguous, `size` times `input`'s elements) with every
    /// rank's `input`, in rank order.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<Pending<'_>> {
        self.start("all-gather", |pending, err, len| unsafe {
            magpie_c10d_all_gather_start(self.handle, output.as_ptr(), input.as_ptr(), pending, err, len)
        })
    }

    fn start(&self, what: &'static str, call: impl FnOnce(*mut *mut c_void, *mut c_char, usize) -> c_int) -> Result<Pending<'_>> {
        let mut handle = std::ptr::null_mut();
        checked(&self.failure(what), |err, len| call(&mut handle, err, len))?;
        Ok(Pending { handle, group: self, what })
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

/// A collective on its way: the tensors it was given are the backend's until [`Pending::wait`]
/// returns (dropping it unwaited waits too).
#[must_use = "a collective's result is there only once it is waited for"]
pub struct Pending<'g> {
    handle: *mut c_void,
    group: &'g ProcessGroup,
    what: &'static str,
}

impl Pending<'_> {
    pub fn wait(mut self) -> Result<()> {
        let handle = std::mem::replace(&mut self.handle, std::ptr::null_mut());
        checked(&self.group.failure(self.what), |err, len| unsafe { magpie_c10d_wait(handle, err, len) })
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            let mut err = [0 as c_char; 256];
            // Only unwinding drops one unwaited; the error that started it is the one to report.
            let _ = unsafe { magpie_c10d_wait(self.handle, err.as_mut_ptr(), err.len()) };
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { magpie_c10d_free(self.handle) }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Runs `body(rank)` on two ranks of a Gloo group over localhost threads.
    pub fn on_two_ranks<T: Send>(port: u16, body: impl Fn(&ProcessGroup) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let body = &body;
                    s.spawn(move || body(&ProcessGroup::join("127.0.0.1", port, rank, 2, Device::Cpu, Duration::from_secs(60)).unwrap()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn reduce_scatter_gives_each_rank_its_slice_of_the_sum_and_all_gather_concatenates_flat() {
        let results = on_two_ranks(29616, |group| {
            let rank = group.rank as f64;
            // Rank r sends [r, r+1, ..., r+5] (f32); the sum is [1, 3, 5, 7, 9, 11].
            let input = Tensor::arange(6, (Kind::Float, Device::Cpu)).g_add_scalar(rank);
            let mine = Tensor::zeros([3], (Kind::Float, Device::Cpu));
            group.reduce_scatter_sum(&mine, &input).unwrap().wait().unwrap();
            // Both gathers in flight at once, in bf16 as the weights are.
            let gathered = Tensor::zeros([6], (Kind::BFloat16, Device::Cpu));
            let again = Tensor::zeros([6], (Kind::BFloat16, Device::Cpu));
            let sent = mine.to_kind(Kind::BFloat16);
            let first = group.all_gather(&gathered, &sent).unwrap();
            let second = group.all_gather(&again, &sent).unwrap();
            first.wait().unwrap();
            second.wait().unwrap();
            let wrong = group.all_gather(&Tensor::zeros([5], (Kind::BFloat16, Device::Cpu)), &sent).err().map(|e| format!("{e:#}"));
            (Vec::<f64>::try_from(mine).unwrap(), Vec::<f64>::try_from(gathered.to_kind(Kind::Float)).unwrap(), gathered.equal(&again), wrong)
        });
        let sum = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0];
        for (rank, (mine, gathered, same, wrong)) in results.into_iter().enumerate() {
            assert_eq!(mine, sum[rank * 3..rank * 3 + 3]);
            assert_eq!(gathered, sum);
            assert!(same);
            let wrong = wrong.expect("an output of the wrong size is refused");
            assert!(wrong.contains("all_gather: the output holds 5 elements, not 6"), "{wrong}");
        }
    }
}
