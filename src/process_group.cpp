#include "ftcomm/process_group.h"

#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <sstream>
#include <vector>

#include <ATen/Context.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "log.h"
#ifdef FTCOMM_WITH_NCCL
#include "nccl_backend.h"
#endif

namespace ftcomm {
namespace {

const char* env(const char* name) {
  const char* value = std::getenv(name);
  return (value != nullptr && *value != '\0') ? value : nullptr;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* value = env(name);
  if (value == nullptr) {
    return fallback;
  }
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK(
      end != value && *end == '\0',
      "environment variable ", name, "='", value,
      "' is not an integer; unset it or give a number (torchrun sets it for you)");
  return parsed;
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

std::string seconds(std::chrono::milliseconds ms) {
  std::ostringstream out;
  out << static_cast<double>(ms.count()) / 1000.0 << "s";
  return out.str();
}

void validate(const ProcessGroupOptions& o) {
  TORCH_CHECK(o.world_size >= 1, "process group: world_size is ", o.world_size,
              "; it must be at least 1 (WORLD_SIZE / --nproc-per-node)");
  TORCH_CHECK(o.rank >= 0 && o.rank < o.world_size, "process group: rank ", o.rank,
              " is outside the world of size ", o.world_size, "; give a rank in [0, ",
              o.world_size - 1, "] (RANK must be below WORLD_SIZE)");
  TORCH_CHECK(o.timeout.count() > 0, "process group: timeout must be positive, got ",
              o.timeout.count(), " ms");
  TORCH_CHECK(o.gloo_threads >= 1, "process group: gloo_threads must be at least 1");
  if (o.store == StoreKind::kTcp) {
    TORCH_CHECK(o.master_port > 0 && o.master_port < 65536, "process group: master_port ",
                o.master_port, " is not a TCP port; set MASTER_PORT to a value in [1, 65535]");
    TORCH_CHECK(!o.master_addr.empty(), "process group: master_addr is empty; set MASTER_ADDR");
  } else if (o.store == StoreKind::kFile) {
    TORCH_CHECK(!o.file_path.empty(), "process group: file store needs file_path");
  } else {
    TORCH_CHECK(o.custom_store, "process group: StoreKind::kCustom needs custom_store");
  }
}

std::string store_description(const ProcessGroupOptions& o) {
  switch (o.store) {
    case StoreKind::kTcp:
      return "tcp://" + o.master_addr + ":" + std::to_string(o.master_port) +
          (o.store_client_only ? " (agent store)" : "");
    case StoreKind::kFile:
      return "file://" + o.file_path;
    case StoreKind::kCustom:
      return "custom";
  }
  return "?";
}

std::string key_prefix(const ProcessGroupOptions& o) {
  return o.prefix + (o.attempt_in_keys ? "/attempt_" + std::to_string(o.restart_count) : std::string("/round")) +
         "/epoch_" + std::to_string(o.epoch);
}

// Every rank publishes `mine` under `key` and reads every rank's, so all ranks
// decide from the same facts. Waits at most the store's timeout.
std::vector<std::string> exchange(c10d::Store& store, const std::string& key, int rank, int world,
                                  const std::string& mine) {
  store.set(key + "/" + std::to_string(rank), std::vector<uint8_t>(mine.begin(), mine.end()));
  std::vector<std::string> keys;
  for (int r = 0; r < world; ++r) {
    keys.push_back(key + "/" + std::to_string(r));
  }
  store.wait(keys);
  std::vector<std::string> all;
  for (const auto& k : keys) {
    auto value = store.get(k);
    all.emplace_back(value.begin(), value.end());
  }
  return all;
}

// The first rank's failure ("" from every rank means all are fine).
std::string agree(c10d::Store& store, const std::string& key, int rank, int world,
                  const std::string& my_failure) {
  const auto all = exchange(store, key, rank, world, my_failure.empty() ? "ok" : my_failure);
  for (int r = 0; r < world; ++r) {
    if (all[r] != "ok") {
      return "rank " + std::to_string(r) + ": " + all[r];
    }
  }
  return "";
}

std::string host_name() {
  char name[256] = {0};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

int cuda_device_count() {
  if (!at::hasCUDA()) {
    return 0;
  }
  return c10::impl::getDeviceGuardImpl(c10::kCUDA)->deviceCount();
}

}  // namespace

NcclCandidate nccl_candidate(int rank, int local_rank, const std::string& no_nccl) {
  NcclCandidate c;
  const int gpus = cuda_device_count();
  if (gpus == 0) {
    c.local_failure = "no CUDA device";
  } else if (!no_nccl.empty()) {
    c.local_failure = no_nccl;
  } else {
    c.device = (local_rank >= 0 ? local_rank : rank) % gpus;
  }
  return c;
}

std::string agree_nccl_usable(c10d::Store& store, int rank, int world, const std::string& local_failure,
                              int device) {
  // First agree that NCCL can be tried at all, so no rank enters NCCL's
  // rendezvous alone and waits there for peers that will never come.
  std::string failure = agree(store, "nccl_precheck", rank, world, local_failure);
  if (!failure.empty()) return failure;
  // NCCL refuses two ranks on one GPU; find that here instead of inside its init.
  const std::string where = host_name() + " cuda:" + std::to_string(device);
  const auto places = exchange(store, "nccl_devices", rank, world, where);
  for (int a = 0; a < world; ++a) {
    for (int b = a + 1; b < world; ++b) {
      if (places[a] == places[b]) {
        return "ranks " + std::to_string(a) + " and " + std::to_string(b) + " share " + places[a] +
            "; NCCL needs one GPU per rank (set LOCAL_RANK or CUDA_VISIBLE_DEVICES per rank)";
      }
    }
  }
  return "";
}

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "nccl") return Backend::kNccl;
  if (name == "gloo") return Backend::kGloo;
  TORCH_CHECK(false, "unknown backend '", name, "'; use one of auto, nccl, gloo");
}

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::kAuto: return "auto";
    case Backend::kNccl: return "nccl";
    case Backend::kGloo: return "gloo";
  }
  return "?";
}

bool launched_by_torchrun() {
  return env("RANK") != nullptr && env("WORLD_SIZE") != nullptr;
}

ProcessGroupOptions process_group_options_from_env(ProcessGroupOptions o) {
  o.rank = static_cast<int>(env_int("RANK", o.rank));
  o.world_size = static_cast<int>(env_int("WORLD_SIZE", o.world_size));
  o.local_rank = static_cast<int>(env_int("LOCAL_RANK", o.local_rank));
  o.local_world_size = static_cast<int>(env_int("LOCAL_WORLD_SIZE", o.local_world_size));
  o.master_port = static_cast<int>(env_int("MASTER_PORT", o.master_port));
  o.restart_count = env_int("TORCHELASTIC_RESTART_COUNT", o.restart_count);
  if (const char* addr = env("MASTER_ADDR")) {
    o.master_addr = addr;
  }
  if (const char* agent = env("TORCHELASTIC_USE_AGENT_STORE")) {
    const std::string v(agent);
    TORCH_CHECK(v == "True" || v == "False" || v == "1" || v == "0" || v == "true" || v == "false",
                "TORCHELASTIC_USE_AGENT_STORE='", v, "' is neither True nor False");
    o.store_client_only = (v == "True" || v == "1" || v == "true");
    o.attempt_in_keys = o.store_client_only;
    // A multi-node job on the shared agent store: a node that joins later counts
    // its restarts from 0, and its ranks would wait on other keys than the rest.
    const char* nodes = env("GROUP_WORLD_SIZE");
    if (o.store_client_only && nodes && std::atoi(nodes) > 1 && o.rank == 0 && o.restart_count > 0) {
      detail::log_line("ftcomm: warning: a multi-node job on torchrun's shared store: a node that joins later (a "
                       "replacement, a grown job) counts its restarts from 0 and cannot meet the others. Launch "
                       "torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README, Losing a node)");
    }
  }
  return o;
}

c10::intrusive_ptr<c10d::Store> make_store(const ProcessGroupOptions& o) {
  validate(o);
  c10::intrusive_ptr<c10d::Store> base;
  switch (o.store) {
    case StoreKind::kTcp: {
      c10d::TCPStoreOptions tcp;
      tcp.port = static_cast<uint16_t>(o.master_port);
      tcp.isServer = (o.rank == 0 && !o.store_client_only);
      tcp.numWorkers = o.store_client_only ? std::nullopt : std::optional<size_t>(o.world_size);
      tcp.waitWorkers = false;
      tcp.timeout = o.timeout;
      try {
        base = c10::make_intrusive<c10d::TCPStore>(o.master_addr, tcp);
      } catch (const std::exception& e) {
        if (tcp.isServer) {
          TORCH_CHECK(false, "process group: rank 0 could not serve the store on ", o.master_addr, ":",
                      o.master_port, " (", e.what(), "). Is the port in use? Pick a free MASTER_PORT.");
        }
        TORCH_CHECK(false, "process group: rank ", o.rank, " could not reach the store at MASTER_ADDR=",
                    o.master_addr, " MASTER_PORT=", o.master_port, " within ", seconds(o.timeout),
                    ". Check that rank 0 (or torchrun's agent) is running and that MASTER_ADDR/MASTER_PORT "
                    "point at it. Cause: ", e.what());
      }
      break;
    }
    case StoreKind::kFile:
      try {
        base = c10::make_intrusive<c10d::FileStore>(o.file_path, o.world_size);
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "process group: cannot use the file store '", o.file_path,
                    "': ", e.what(), ". Point file_path at a writable path on a file system every rank sees.");
      }
      break;
    case StoreKind::kCustom:
      base = o.custom_store;
      break;
  }
  base->setTimeout(o.timeout);
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(key_prefix(o), base);
  prefixed->setTimeout(o.timeout);
  return prefixed;
}

c10::intrusive_ptr<c10d::ProcessGroup> make_process_group(
    const ProcessGroupOptions& o,
    ProcessGroupChoice* choice_out) {
  validate(o);
  ProcessGroupChoice choice;
  choice.store_description = store_description(o);
  const int gpus = cuda_device_count();
  choice.cuda_available = gpus > 0;

#ifndef FTCOMM_WITH_NCCL
  TORCH_CHECK(o.backend != Backend::kNccl,
              "backend 'nccl' was asked for, but this ftcomm was built without NCCL; rebuild with "
              "-DFTCOMM_WITH_NCCL=ON on a machine with the CUDA toolkit, or use --backend gloo|auto");
#endif
  TORCH_CHECK(o.backend != Backend::kNccl || choice.cuda_available,
              "backend 'nccl' was asked for, but rank ", o.rank,
              " sees no CUDA device (CUDA_VISIBLE_DEVICES=", env("CUDA_VISIBLE_DEVICES") ? env("CUDA_VISIBLE_DEVICES") : "unset",
              "); run on a GPU machine or use --backend gloo|auto");

  auto store = make_store(o);
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, o.rank, o.world_size);

  auto gloo_options = c10d::ProcessGroupGloo::Options::create(o.timeout);
  gloo_options->threads = o.gloo_threads;
  gloo_options->group_name = "ftcomm";
  if (const char* ifname = env("GLOO_SOCKET_IFNAME")) {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else if (o.store == StoreKind::kCustom || (o.store == StoreKind::kTcp && is_loopback(o.master_addr))) {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  c10::intrusive_ptr<c10d::Backend> gloo;
  try {
    gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo", store), o.rank, o.world_size, gloo_options);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "process group: Gloo rendezvous of rank ", o.rank, "/", o.world_size, " on ",
                choice.store_description, " did not complete within ", seconds(o.timeout),
                ". Are all ", o.world_size, " ranks started with the same MASTER_ADDR/MASTER_PORT? Cause: ",
                e.what());
  }
  pg->setBackend(c10::kCPU, c10d::ProcessGroup::GLOO, gloo);
  pg->setDefaultBackend(c10d::ProcessGroup::GLOO);

  c10::intrusive_ptr<c10d::Backend> cuda_backend = gloo;
  choice.cuda_backend = Backend::kGloo;
  if (o.backend == Backend::kGloo) {
    choice.fallback_reason = "gloo asked for";
  } else {
    // First agree that NCCL can be tried at all, so no rank enters NCCL's
    // rendezvous alone and waits there for peers that will never come.
#ifdef FTCOMM_WITH_NCCL
    const NcclCandidate mine = nccl_candidate(o.rank, o.local_rank, "");
#else
    const NcclCandidate mine = nccl_candidate(o.rank, o.local_rank, "built without NCCL");
#endif
    const int device = mine.device;
    std::string failure = agree_nccl_usable(*store, o.rank, o.world_size, mine.local_failure, device);
#ifdef FTCOMM_WITH_NCCL
    if (failure.empty()) {
      c10::intrusive_ptr<c10d::Backend> nccl;
      std::string init_error;
      try {
        nccl = detail::make_nccl_backend(c10::make_intrusive<c10d::PrefixStore>("nccl", store), o.rank,
                                         o.world_size, o.timeout, device);
      } catch (const std::exception& e) {
        init_error = std::string("NCCL init failed: ") + e.what();
        init_error = init_error.substr(0, init_error.find('\n'));
      }
      failure = agree(*store, "nccl_init", o.rank, o.world_size, init_error);
      if (failure.empty()) {
        cuda_backend = nccl;
        choice.cuda_backend = Backend::kNccl;
      }
    }
#endif
    if (!failure.empty()) {
      TORCH_CHECK(o.backend != Backend::kNccl, "backend 'nccl' could not be used: ", failure,
                  ". Fix the NCCL environment or use --backend gloo|auto");
      choice.fallback_reason = failure;
    }
  }
  if (choice.cuda_available || choice.cuda_backend == Backend::kNccl) {
    pg->setBackend(c10::kCUDA,
                   choice.cuda_backend == Backend::kNccl ? c10d::ProcessGroup::NCCL : c10d::ProcessGroup::GLOO,
                   cuda_backend);
  }
  if (o.announce && o.rank == 0) {
    std::ostringstream line;
    line << "ftcomm: process group of " << o.world_size << " ranks on " << choice.store_description
         << " [" << key_prefix(o) << "]: cpu->gloo, cuda->";
    if (!choice.cuda_available) {
      line << "none (no GPU)";
    } else {
      line << backend_name(choice.cuda_backend);
    }
    if (choice.cuda_available && o.backend != Backend::kGloo && choice.cuda_backend != Backend::kNccl) {
      line << " (NCCL not used: " << choice.fallback_reason << ")";
    }
    line << ", timeout " << seconds(o.timeout) << "\n";
    detail::log_line(line.str());
  }
  if (choice_out != nullptr) {
    *choice_out = choice;
  }
  return pg;
}

}  // namespace ftcomm
