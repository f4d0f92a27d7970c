#include "ftcomm/ddp.h"

#include <chrono>
#include <iostream>
#include <map>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "ftcomm/broadcast.h"
#include "ftcomm/bucket_layout.h"
#include "sha256.h"

namespace ftcomm {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

std::vector<int64_t> allgather_int(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, int64_t value) {
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < pg->getSize(); ++r) out[0].push_back(at::empty({1}, at::kLong));
  std::vector<at::Tensor> in{at::tensor({value})};
  pg->allgather(out, in)->wait();
  std::vector<int64_t> values;
  for (const auto& t : out[0]) values.push_back(t.item<int64_t>());
  return values;
}

// Root's (name, dtype, shape) list to every rank, which allocates to match.
void broadcast_manifest(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, int root, std::vector<NamedTensor>* items) {
  std::string text;
  if (pg->getRank() == root) {
    for (const auto& nt : *items) {
      text += nt.name + "\t" + std::to_string(static_cast<int>(nt.tensor.scalar_type()));
      for (int64_t s : nt.tensor.sizes()) text += "\t" + std::to_string(s);
      text += "\n";
    }
  }
  std::vector<at::Tensor> length{at::tensor({static_cast<int64_t>(text.size())})};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  pg->broadcast(length, options)->wait();
  at::Tensor bytes = at::empty({length[0].item<int64_t>()}, at::kByte);
  if (pg->getRank() == root) std::memcpy(bytes.data_ptr(), text.data(), text.size());
  std::vector<at::Tensor> payload{bytes};
  if (bytes.numel() > 0) pg->broadcast(payload, options)->wait();
  if (pg->getRank() == root) return;
  items->clear();
  std::istringstream in(std::string(static_cast<const char*>(bytes.data_ptr()), bytes.numel()));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string name, field;
    std::getline(fields, name, '\t');
    std::getline(fields, field, '\t');
    const auto dtype = static_cast<at::ScalarType>(std::stoi(field));
    std::vector<int64_t> shape;
    while (std::getline(fields, field, '\t')) shape.push_back(std::stoll(field));
    items->push_back({name, at::empty(shape, at::TensorOptions().dtype(dtype))});
  }
}

// Hook state <-> named tensors: "hook_r/<name>/<bucket>[@cuda]" and "hook_l/...".
// Snapshots and resync carry them on the host; "@cuda" says where they go back to
// (this rank's own GPU, whatever its index was on the rank that wrote them).
void add_hook_state(const ScriptHook& hook, bool replicated, std::vector<NamedTensor>* out) {
  const auto state = hook.state();
  for (const auto& name : replicated ? hook.replicated_state() : hook.local_state()) {
    for (const auto& entry : state.at(name)) {
      const at::Tensor& t = entry.value();
      out->push_back({std::string(replicated ? "hook_r/" : "hook_l/") + name + "/" + std::to_string(entry.key()) +
                          (t.is_cuda() ? "@cuda" : ""),
                      t});
    }
  }
}

void restore_hook_state(const ScriptHook& hook, const std::vector<NamedTensor>& items, bool local_too,
                        at::Device gpu) {
  auto state = hook.state();
  for (const auto& nt : items) {
    const bool r = nt.name.rfind("hook_r/", 0) == 0, l = nt.name.rfind("hook_l/", 0) == 0;
    if (!r && !(l && local_too)) continue;
    std::string rest = nt.name.substr(7);
    const bool on_gpu = rest.size() > 5 && rest.compare(rest.size() - 5, 5, "@cuda") == 0;
    if (on_gpu) rest.resize(rest.size() - 5);
    const auto slash = rest.rfind('/');
    const std::string name = rest.substr(0, slash);
    TORCH_CHECK(state.contains(name), "snapshot holds hook state '", name, "' that hook ", hook.name(),
                " does not declare; was it written by another hook?");
    state.at(name).insert_or_assign(std::stoll(rest.substr(slash + 1)),
                                    on_gpu ? nt.tensor.to(gpu, /*non_blocking=*/false, /*copy=*/true) : nt.tensor.clone());
  }
}

std::vector<NamedTensor> on_host(std::vector<NamedTensor> items) {
  for (auto& nt : items) nt.tensor = nt.tensor.to(at::kCPU);
  return items;
}

}  // namespace

std::string tensors_digest(const std::vector<at::Tensor>& tensors) {
  std::string bytes;
  for (const auto& t : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    bytes.append(static_cast<const char*>(c.data_ptr()), c.nbytes());
  }
  return sha256_hex(bytes);
}

DistributedDataParallel::DistributedDataParallel(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                                 std::vector<at::Tensor> params, std::vector<at::Tensor> extra_state,
                                                 DdpOptions options)
    : pg_(std::move(pg)), params_(std::move(params)), extra_(std::move(extra_state)), options_(std::move(options)) {
  hook_ = ScriptHook::load(options_.hook);
  for (const auto& [k, v] : options_.hook_args) hook_->set_param(k, v);
  agree_on_hook(pg_, *hook_, options_.pinned_digests);
  if (!options_.ckpt_dir.empty()) {
    CheckpointStoreOptions so;
    so.dir = options_.ckpt_dir;
    so.job_id = options_.job_id;
    so.rank = pg_->getRank();
    so.keep_snapshots = options_.keep_snapshots;
    check(CheckpointStore::Open(so, &store_));
  }
}

DistributedDataParallel::~DistributedDataParallel() {
  if (store_) store_->WaitForSnapshot();
}

std::vector<NamedTensor> DistributedDataParallel::snapshot_state() const {
  std::vector<NamedTensor> out;
  for (size_t i = 0; i < params_.size(); ++i) out.push_back({"param/" + std::to_string(i), params_[i].detach()});
  for (size_t i = 0; i < extra_.size(); ++i) out.push_back({"extra/" + std::to_string(i), extra_[i]});
  add_hook_state(*hook_, true, &out);
  std::vector<NamedTensor> local;
  add_hook_state(*hook_, false, &local);
  out.insert(out.end(), local.begin(), local.end());
  // The buddy copy: this rank also keeps rank (r - 1)'s rank-local hook state, so
  // a replaced rank r - 1 resumes bit-exactly. Every rank has the same local
  // state layout (same hook, same buckets): one allgather of it, flattened.
  const int world = pg_->getSize();
  if (world > 1 && !local.empty()) {
    std::vector<at::Tensor> flat_parts;
    for (const auto& nt : local) flat_parts.push_back(nt.tensor.detach().reshape({-1}).to(at::kDouble));
    at::Tensor flat = at::cat(flat_parts);
    std::vector<std::vector<at::Tensor>> gathered(1);
    for (int r = 0; r < world; ++r) gathered[0].push_back(at::empty_like(flat));
    std::vector<at::Tensor> in{flat};
    pg_->allgather(gathered, in)->wait();
    const at::Tensor& theirs = gathered[0][(pg_->getRank() + world - 1) % world];
    int64_t at = 0;
    for (const auto& nt : local) {
      const int64_t n = nt.tensor.numel();
      out.push_back({"buddy_" + nt.name.substr(5), theirs.narrow(0, at, n).view(nt.tensor.sizes()).to(nt.tensor.scalar_type())});
      at += n;
    }
  }
  return out;
}

RecoveryReport DistributedDataParallel::recover() {
  RecoveryReport report;
  at::NoGradGuard no_grad;
  const int rank = pg_->getRank(), world = pg_->getSize();

  // Where this rank's GPU state lives, for hook state restored onto a GPU.
  at::Device gpu(at::kCUDA, 0);
  for (const auto& p : params_) {
    if (p.is_cuda()) {
      gpu = p.device();
      break;
    }
  }
  // 1. Agree on the newest step some rank can resume from.
  auto start = Clock::now();
  CommitRecord mine;
  std::vector<NamedTensor> loaded;
  int64_t my_step = -1;
  if (store_ && store_->LatestSnapshot(&mine).ok()) {
    TORCH_CHECK(mine.world_size == world, "checkpoint ", options_.ckpt_dir, " was written by a job of world size ",
                mine.world_size, ", this job has ", world,
                ". Resume with the same world size, or point --ckpt at a new directory");
    const auto s = store_->LoadSnapshot(mine, &loaded);
    if (s.ok()) {
      my_step = mine.step;
    } else {
      std::cerr << "ftcomm: rank " << rank << ": " << s.ToString() << "; this rank will be resynced\n";
    }
  }
  const auto steps = allgather_int(pg_, my_step);
  const int64_t step = *std::max_element(steps.begin(), steps.end());
  report.agreement_ms = ms_since(start);
  int root = -1;
  for (int r = 0; r < world; ++r) {
    if (steps[r] == step && root < 0) root = r;
    if (steps[r] != step) report.resynced_ranks.push_back(r);
  }

  // 2. Load, on the ranks that have the step.
  start = Clock::now();
  std::unique_ptr<BucketLayout> layout;
  if (step >= 0 && my_step == step) {
    std::map<std::string, at::Tensor> by_name;
    for (const auto& nt : loaded) by_name[nt.name] = nt.tensor;
    for (size_t i = 0; i < params_.size(); ++i) {
      auto it = by_name.find("param/" + std::to_string(i));
      TORCH_CHECK(it != by_name.end() && it->second.sizes() == params_[i].sizes(), "checkpoint ", options_.ckpt_dir,
                  " does not fit this model: parameter ", i, " is missing or has another shape. Was it written by "
                  "another --model? Point --ckpt elsewhere to start afresh");
      params_[i].detach().copy_(it->second);
    }
    for (size_t i = 0; i < extra_.size(); ++i) extra_[i].copy_(by_name.at("extra/" + std::to_string(i)));
    TORCH_CHECK(mine.hook_digest == hook_->digest(), "checkpoint ", options_.ckpt_dir, " of step ", step,
                " was written with hook digest ", mine.hook_digest, ", this run's hook ", hook_->name(), " has ",
                hook_->digest(), ". Resume with the same hook, or point --ckpt elsewhere");
    restore_hook_state(*hook_, loaded, /*local_too=*/true, gpu);
    BucketLayout stored;
    if (store_->GetLayout(mine.layout_signature, &stored).ok()) {
      const std::string why = layout_mismatch(stored, params_);
      TORCH_CHECK(why.empty(), "the stored bucket layout ", signature_hex(mine.layout_signature), " in ",
                  options_.ckpt_dir, " does not fit this model: ", why);
      layout = std::make_unique<BucketLayout>(stored);
    }
  }
  report.load_ms = ms_since(start);

  // 3. Resync the ranks that lack it, from the first rank that has it.
  if (options_.on_phase) options_.on_phase("resync");
  start = Clock::now();
  if (step >= 0 && !report.resynced_ranks.empty()) {
    std::vector<NamedTensor> replicated;
    if (rank == root) {
      add_hook_state(*hook_, true, &replicated);
      replicated = on_host(std::move(replicated));
    }
    broadcast_manifest(pg_, root, &replicated);
    std::vector<at::Tensor> all;
    for (auto& p : params_) all.push_back(p.detach());
    for (auto& e : extra_) all.push_back(e);
    for (auto& nt : replicated) all.push_back(nt.tensor);
    BroadcastCoalescedOptions bo;
    bo.root = root;
    bo.buffer_bytes = size_t(32) << 20;
    report.resync_bytes = broadcast_coalesced(pg_, all, bo).bytes;
    if (my_step != step) restore_hook_state(*hook_, replicated, /*local_too=*/false, gpu);
    // Rank-local hook state of each rank that lacks the step: from its buddy
    // (rank r + 1 keeps r's copy), else reset under a logged policy.
    for (int lost : report.resynced_ranks) {
      const int buddy = (lost + 1) % world;
      const bool buddy_has = world > 1 && steps[buddy] == step;
      if (!buddy_has) {
        if (rank == lost && !hook_->local_state().empty()) {
          report.local_state = "lost with this rank's store and its buddy's; reset to empty (policy: reset)";
          std::cerr << "ftcomm: rank " << rank << ": rank-local hook state of " << hook_->name()
                    << " was lost with its store and with rank " << buddy << "'s copy; reset to empty\n";
        }
        continue;
      }
      std::vector<NamedTensor> copy;
      if (rank == buddy) {
        for (const auto& nt : loaded) {
          if (nt.name.rfind("buddy_l/", 0) == 0) copy.push_back({"hook_l/" + nt.name.substr(8), nt.tensor});
        }
      }
      broadcast_manifest(pg_, buddy, &copy);
      std::vector<at::Tensor> tensors;
      for (auto& nt : copy) tensors.push_back(nt.tensor);
      BroadcastCoalescedOptions bo;
      bo.root = buddy;
      report.resync_bytes += broadcast_coalesced(pg_, tensors, bo).bytes;
      if (rank == lost) {
        restore_hook_state(*hook_, copy, /*local_too=*/true, gpu);
        report.local_state = "restored from rank " + std::to_string(buddy) + "'s buddy copy";
      }
    }
  }
  report.resync_ms = ms_since(start);
  if (report.local_state.empty()) report.local_state = step >= 0 ? "restored from this rank's store" : "fresh";
  report.resumed_from_step = step;

  // 4. The Reducer, on one layout for all ranks: the stored one of the rank that
  // resumed (a replaced rank has none), else a fresh assignment.
  std::vector<bool> sparse(params_.size(), false);
  std::vector<std::vector<size_t>> buckets =
      layout ? bucket_indices(*layout)
             : std::get<0>(c10d::compute_bucket_assignment_by_size(
                   params_, {static_cast<size_t>(options_.bucket_bytes)}, sparse));
  if (step >= 0) {
    std::vector<int64_t> flat;
    if (rank == root) {
      flat.push_back(static_cast<int64_t>(buckets.size()));
      for (const auto& b : buckets) {
        flat.push_back(static_cast<int64_t>(b.size()));
        flat.insert(flat.end(), b.begin(), b.end());
      }
    }
    std::vector<at::Tensor> size{at::tensor({static_cast<int64_t>(flat.size())})};
    c10d::BroadcastOptions from_root;
    from_root.rootRank = root;
    pg_->broadcast(size, from_root)->wait();
    std::vector<at::Tensor> data{rank == root ? at::tensor(flat) : at::empty({size[0].item<int64_t>()}, at::kLong)};
    pg_->broadcast(data, from_root)->wait();
    const int64_t* p = data[0].data_ptr<int64_t>();
    buckets.assign(static_cast<size_t>(*p++), {});
    for (auto& b : buckets) {
      b.resize(static_cast<size_t>(*p++));
      for (auto& i : b) i = static_cast<size_t>(*p++);
    }
  }
  // Every rank must reduce the same buckets; a mismatch would silently mix
  // gradients of different parameters.
  BucketLayout chosen;
  for (const auto& b : buckets) chosen.buckets.push_back({std::vector<int64_t>(b.begin(), b.end()), {}, {}, {}, 0, ""});
  const auto signatures = allgather_int(pg_, static_cast<int64_t>(chosen.signature()));
  for (int r = 1; r < world; ++r) {
    TORCH_CHECK(signatures[r] == signatures[0], "bucket layouts differ: rank 0 uses ",
                signature_hex(static_cast<uint64_t>(signatures[0])), ", rank ", r, " uses ",
                signature_hex(static_cast<uint64_t>(signatures[r])), "; every rank must run the same model and --bucket-mb");
  }
  reducer_ = std::make_unique<c10d::Reducer>(params_, buckets, pg_, sparse, options_.bucket_bytes, false, false,
                                             std::unordered_map<size_t, std::string>(), options_.bucket_bytes, false,
                                             false, std::vector<int64_t>());
  auto comm = std::make_unique<ScriptCommHook>(pg_, hook_, options_.hook_options);
  comm_ = comm.get();
  reducer_->register_comm_hook(std::move(comm));
  return report;
}

void DistributedDataParallel::before_forward() {
  TORCH_CHECK(reducer_, "DistributedDataParallel: call recover() before the first step");
  reducer_->rebuild_buckets();
  reducer_->prepare_for_forward();
}

void DistributedDataParallel::before_backward(const at::Tensor& loss) {
  reducer_->prepare_for_backward({loss});
}

void DistributedDataParallel::after_step(int64_t step, int64_t data_position) {
  if (!store_ || options_.commit_every <= 0 || step % options_.commit_every != 0) return;
  // The layout as the Reducer has it now (after its first-iteration rebuild);
  // stored under its signature, which the commit names.
  const BucketLayout layout = bucket_layout_of(*reducer_, params_);
  check(store_->PutLayout(layout));
  CommitRecord record;
  record.step = step;
  record.world_size = pg_->getSize();
  record.data_position = data_position;
  record.hook_digest = hook_->digest();
  record.layout_signature = layout.signature();
  check(store_->WaitForSnapshot());
  store_->CommitSnapshotAsync(record, {}, snapshot_state());
}

double DistributedDataParallel::comm_seconds() const {
  return comm_ ? comm_->busy_seconds() : 0.0;
}

void DistributedDataParallel::flush() {
  if (store_) check(store_->WaitForSnapshot());
}

}  // namespace ftcomm
