// One factory for every process group ftcomm uses.
//
// A group serves CPU tensors with Gloo, always. CUDA tensors go to NCCL when it is
// built in and a GPU is present; with Backend::kAuto they fall back to Gloo (which
// moves CUDA tensors through host memory) when NCCL is missing or its
// initialisation fails on any rank. The choice is made collectively, so every rank
// of a group uses the same backend, and rank 0 states it in one line on stderr.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace ftcomm {

enum class Backend { kAuto, kNccl, kGloo };

// Parses "auto", "nccl" or "gloo"; throws naming the accepted values otherwise.
Backend parse_backend(const std::string& name);
const char* backend_name(Backend backend);

enum class StoreKind {
  kTcp,     // TCPStore at master_addr:master_port; rank 0 serves unless store_client_only
  kFile,    // FileStore at file_path (a shared file system path)
  kCustom,  // custom_store, e.g. a c10d::HashStore shared by threads
};

struct ProcessGroupOptions {
  Backend backend = Backend::kAuto;
  int rank = 0;
  int world_size = 1;

  StoreKind store = StoreKind::kTcp;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // Every rank is a client of a store someone else serves (torchrun's agent
  // store, TORCHELASTIC_USE_AGENT_STORE=True).
  bool store_client_only = false;
  // Keys carry the restart count, so a restarted attempt never reads the keys of
  // an earlier one from a store that outlives it (torchrun's shared agent store).
  // Off where the store is new every round (torchrun with
  // TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 serves it), as nodes count their
  // restarts apart: a node that joined later starts from 0.
  bool attempt_in_keys = true;
  std::string file_path;
  c10::intrusive_ptr<c10d::Store> custom_store;

  // Deadline for every wait: store connect, rendezvous, and each collective.
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};

  // Store keys are namespaced "<prefix>/attempt_<restart_count>/epoch_<epoch>/",
  // so a restarted or re-formed group never reads a previous attempt's keys.
  std::string prefix = "ftcomm";
  int64_t restart_count = 0;
  int64_t epoch = 0;

  // CUDA device for NCCL; -1 means local_rank, else rank modulo the device count.
  int local_rank = -1;
  int local_world_size = 1;  // workers on this node (torchrun's LOCAL_WORLD_SIZE)
  // Gloo worker threads; more lets more collectives progress concurrently.
  int gloo_threads = 2;
  // Print the one-line backend choice on rank 0.
  bool announce = true;
};

// Fills rank, world size, local rank, master address/port, restart count and the
// agent-store flag from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
// MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT,
// TORCHELASTIC_USE_AGENT_STORE), keeping `base` for what is unset. Throws naming
// the variable when one is set but malformed.
ProcessGroupOptions process_group_options_from_env(ProcessGroupOptions base = {});

// True when RANK and WORLD_SIZE are set (we run under torchrun or a launcher like it).
bool launched_by_torchrun();

// What a group was built with, as make_process_group decided it.
struct ProcessGroupChoice {
  Backend cuda_backend = Backend::kGloo;  // kNccl or kGloo; what serves CUDA tensors
  bool cuda_available = false;
  std::string fallback_reason;            // why NCCL was not used, if it was not
  std::string store_description;
};

// Builds the group and blocks until every rank has joined (or throws after
// `timeout`). Throws c10::Error with a message that names the bad field and the fix
// for: a rank outside the world, an unreachable master, a store file that cannot be
// created, and backend=nccl without NCCL or without a GPU.
// Call from one thread per rank; the returned group is thread-safe as c10d's are.
c10::intrusive_ptr<c10d::ProcessGroup> make_process_group(
    const ProcessGroupOptions& options,
    ProcessGroupChoice* choice = nullptr);

// This rank's side of choosing NCCL for CUDA tensors (the C++ group and the
// Python package's init_process_group both decide with it): the GPU it would use
// (its local rank, else its rank, modulo the GPUs it sees), or why it cannot:
// "no CUDA device", or `no_nccl` when that is not empty (NCCL is not there to use:
// "built without NCCL", "this torch has no NCCL").
struct NcclCandidate {
  int device = -1;
  std::string local_failure;  // empty: NCCL can be tried on `device`
};
NcclCandidate nccl_candidate(int rank, int local_rank, const std::string& no_nccl);

// Collective over `store` (every rank of a group calls it, before NCCL's own
// initialisation is tried): whether NCCL can serve CUDA tensors on every rank.
// `local_failure` is this rank's reason it cannot (empty: it can); `device` its
// GPU, and two ranks on one GPU of one host are refused. Empty when NCCL can be
// tried, else the first rank's reason ("rank R: ..."). Waits at most the store's
// timeout.
std::string agree_nccl_usable(c10d::Store& store, int rank, int world, const std::string& local_failure,
                              int device);

// The store make_process_group would use, already prefixed; exposed for tools
// that rendezvous before building a group (e.g. agreeing on a restart step).
c10::intrusive_ptr<c10d::Store> make_store(const ProcessGroupOptions& options);

}  // namespace ftcomm
