// The part of libtorch's c10d that `magpie sft/dpo` use, behind a C interface for Rust
// (src/train/distributed/process_group.rs): a TCPStore rendezvous and a process group, Gloo on
// CPU or NCCL on CUDA, with the collectives the data-parallel trainer needs. Compiled by build.rs
// against the same libtorch that tch links; tensors cross as tch's `torch::Tensor*`.
//
// Every function returns 0 on success, or writes the exception's message into `err` and returns 1.

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef MAGPIE_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "../../torch_ffi.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

using magpie::guarded;
using magpie::set_error;

// A collective started and not yet waited for, with the tensors it reads and writes.
struct Pending {
  c10::intrusive_ptr<c10d::Work> work;
  std::vector<at::Tensor> tensors;
};

// Without a timeout: a timed WorkNCCL::wait busy-blocks the CPU, and NCCL's watchdog (and Gloo,
// from the options) already fail a collective that outlives the group's timeout.
void wait(const c10::intrusive_ptr<c10d::Work>& work) { work->wait(); }

}  // namespace

extern "C" {

// Joins the group: rank 0 serves the TCPStore at host:port, every rank connects to it, then the
// backend ("gloo" or "nccl") connects the ranks. On CUDA, `device` is this rank's GPU index.
int magpie_c10d_new(const char* backend, const char* host, int port, int rank, int world, int device, long timeout_ms,
                    void** out, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(port);
    store_options.isServer = rank == 0;
    store_options.numWorkers = world;
    store_options.timeout = timeout;
    auto group = new Group{c10::make_intrusive<c10d::TCPStore>(host, store_options), {}, timeout};
    std::string name(backend);
    if (name == "gloo") {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      // GLOO_SOCKET_IFNAME picks the network interface, as it does for torch.distributed.
      const char* interface = std::getenv("GLOO_SOCKET_IFNAME");
      options->devices.push_back(interface && *interface ? c10d::ProcessGroupGloo::createDeviceForInterface(interface)
                                                         : c10d::ProcessGroupGloo::createDefaultDevice());
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, rank, world, options);
#ifdef MAGPIE_NCCL
    } else if (name == "nccl") {
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
      auto options = c10::make_intrusive<c10d::ProcessGroupNCCL::Options>();
      options->timeout = timeout;
      group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(group->store, rank, world, options);
#endif
    } else {
      delete group;
      throw std::runtime_error("process group backend `" + name + "` is not built into this binary");
    }
    *out = group;
  });
}

void magpie_c10d_free(void* group) { delete static_cast<Group*>(group); }

// Sums `tensor` over the ranks, in place.
int magpie_c10d_all_reduce_sum(void* handle, at::Tensor* tensor, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto group = static_cast<Group*>(handle);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = group->timeout;
    wait(group->backend->allreduce(tensors, options));
  });
}

// Starts summing `input` (world × the output's elements) over the ranks, leaving in `output`
// this rank's slice of the sum; `magpie_c10d_wait` completes it.
int magpie_c10d_reduce_scatter_sum_start(void* handle, at::Tensor* output, at::Tensor* input, void** pending, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto group = static_cast<Group*>(handle);
    auto world = group->backend->getSize();
    TORCH_CHECK(input->numel() == output->numel() * world, "reduce_scatter: the input holds ", input->numel(), " elements, not ",
                output->numel() * world);
    c10d::ReduceScatterOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = group->timeout;
    auto work = group->backend->_reduce_scatter_base(*output, *input, options);
    *pending = new Pending{work, {*output, *input}};
  });
}

// Starts concatenating every rank's `input` (each the same size) into the flat `output`, in rank
// order; `magpie_c10d_wait` completes it.
int magpie_c10d_all_gather_start(void* handle, at::Tensor* output, at::Tensor* input, void** pending, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto group = static_cast<Group*>(handle);
    auto world = group->backend->getSize();
    TORCH_CHECK(output->numel() == input->numel() * world, "all_gather: the output holds ", output->numel(), " elements, not ",
                input->numel() * world);
    c10d::AllgatherOptions options;
    options.timeout = group->timeout;
    auto work = group->backend->_allgather_base(*output, *input, options);
    *pending = new Pending{work, {*output, *input}};
  });
}

// Waits for a started collective and frees it, whether it succeeded or not.
int magpie_c10d_wait(void* pending, char* err, size_t len) {
  std::unique_ptr<Pending> owned(static_cast<Pending*>(pending));
  return guarded(err, len, [&] { wait(owned->work); });
}

}  // extern "C"
