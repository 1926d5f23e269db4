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

void wait(Group* group, const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait(group->timeout);
}

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
    wait(group, group->backend->allreduce(tensors, options));
  });
}

// Concatenates every rank's `input` (each the same size) into `output`, in rank order.
int magpie_c10d_all_gather(void* handle, at::Tensor* output, at::Tensor* input, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto group = static_cast<Group*>(handle);
    int world = group->backend->getSize();
    auto chunk = input->numel();
    TORCH_CHECK(output->numel() == chunk * world, "all_gather: the output holds ", output->numel(), " elements, not ", chunk * world);
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < world; r++) outputs[0].push_back(output->view({-1}).narrow(0, r * chunk, chunk));
    std::vector<at::Tensor> inputs{input->view({-1})};
    c10d::AllgatherOptions options;
    options.timeout = group->timeout;
    wait(group, group->backend->allgather(outputs, inputs, options));
  });
}

}  // extern "C"
