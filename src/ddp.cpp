#include "ftcomm/ddp.h"

#include <chrono>
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "ftcomm/broadcast.h"
#include "ftcomm/bucket_layout.h"
#include "log.h"
#include "sha256.h"

namespace ftcomm {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

// Every rank's `values` (the same count on every rank), rank by rank.
std::vector<std::vector<int64_t>> allgather_ints(const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                                 const std::vector<int64_t>& values) {
  const auto n = static_cast<int64_t>(values.size());
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < pg->getSize(); ++r) out[0].push_back(at::empty({n}, at::kLong));
  std::vector<at::Tensor> in{at::tensor(values)};
  pg->allgather(out, in)->wait();
  std::vector<std::vector<int64_t>> all;
  for (const auto& t : out[0]) all.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
  return all;
}

std::vector<int64_t> allgather_int(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, int64_t value) {
  std::vector<int64_t> values;
  for (const auto& v : allgather_ints(pg, {value})) values.push_back(v[0]);
  return values;
}

std::string join_steps(const std::vector<int64_t>& steps) {
  std::string out;
  for (int64_t s : steps) out += (out.empty() ? "" : ", ") + std::to_string(s);
  return out;
}

// Rank-local hook state crosses ranks as raw bytes, so every dtype comes back
// bit for bit (an int64 above 2^53 included).
at::Tensor as_bytes(const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kCPU).contiguous().reshape({-1});
  return c.numel() == 0 ? at::empty({0}, at::kByte) : c.view(at::kByte);
}

at::Tensor from_bytes(const at::Tensor& bytes, const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options().device(at::kCPU).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() > 0) out.reshape({-1}).view(at::kByte).copy_(bytes);
  return out;
}

}  // namespace

// The shortest text that reads back as the same double.
std::string format_setting(double v) {
  char buf[32];
  for (int digits = 6; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

namespace {

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
    for (const auto& nt : local) flat_parts.push_back(as_bytes(nt.tensor));
    at::Tensor flat = at::cat(flat_parts);
    std::vector<std::vector<at::Tensor>> gathered(1);
    for (int r = 0; r < world; ++r) gathered[0].push_back(at::empty_like(flat));
    std::vector<at::Tensor> in{flat};
    pg_->allgather(gathered, in)->wait();
    const at::Tensor& theirs = gathered[0][(pg_->getRank() + world - 1) % world];
    int64_t at = 0;
    for (const auto& nt : local) {
      const int64_t n = static_cast<int64_t>(nt.tensor.nbytes());
      out.push_back({"buddy_" + nt.name.substr(5), from_bytes(theirs.narrow(0, at, n), nt.tensor)});
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
  // 1. This rank's newest intact snapshot: newest first, past damaged ones (a
  // retained older snapshot is worth more than a restart from step 0).
  auto start = Clock::now();
  CommitRecord mine;
  std::vector<NamedTensor> loaded;
  int64_t my_step = -1, my_newest = -1;
  std::vector<int64_t> damaged;
  std::vector<CommitRecord> commits;
  if (store_) check(store_->ListCommits(&commits));
  for (auto it = commits.rbegin(); it != commits.rend(); ++it) {
    if (!it->has_snapshot) continue;
    TORCH_CHECK(it->world_size == world, "checkpoint ", options_.ckpt_dir, " was written by a job of world size ",
                it->world_size, ", this job has ", world,
                ". Resume with the same world size, or point --ckpt at a new directory");
    my_newest = std::max(my_newest, it->step);
    const auto s = store_->LoadSnapshot(*it, &loaded);
    if (s.ok()) {
      mine = *it;
      my_step = it->step;
      break;
    }
    damaged.push_back(it->step);
    detail::log_line("ftcomm: rank " + std::to_string(rank) + ": " + s.ToString() +
                     "; falling back to this rank's previous snapshot, if any");
  }
  // 2. Agree on the newest step some rank can resume from.
  const auto gathered = allgather_ints(pg_, {my_step, my_newest});
  std::vector<int64_t> steps;
  for (const auto& g : gathered) {
    steps.push_back(g[0]);
    report.newest_snapshot_step = std::max(report.newest_snapshot_step, g[1]);
  }
  const int64_t step = *std::max_element(steps.begin(), steps.end());
  report.agreement_ms = ms_since(start);
  int root = -1;
  for (int r = 0; r < world; ++r) {
    if (steps[r] == step && root < 0) root = r;
    if (steps[r] != step) report.resynced_ranks.push_back(r);
  }
  if (report.newest_snapshot_step > step && rank == 0) {
    std::string which;
    for (int r = 0; r < world; ++r) {
      if (gathered[r][1] > step) which += (which.empty() ? "" : ", ") + std::to_string(r);
    }
    detail::log_line("ftcomm: the newest snapshot (step " + std::to_string(report.newest_snapshot_step) +
                     ") is damaged on every rank that has it (ranks " + which + "); " +
                     (step >= 0 ? "resuming from step " + std::to_string(step) + ", the newest intact one"
                                : "no intact snapshot is left: starting afresh"));
  }
  // Commits this rank cannot continue from: damaged ones, and any newer than the
  // agreed step. The next commit is then after the store's latest.
  if (store_) {
    for (const auto& c : commits) {
      if (c.step > step || std::find(damaged.begin(), damaged.end(), c.step) != damaged.end()) {
        report.discarded_steps.push_back(c.step);
      }
    }
    if (!report.discarded_steps.empty()) {
      check(store_->DiscardCommits(report.discarded_steps));
      detail::log_line("ftcomm: rank " + std::to_string(rank) + ": discarded commits of step(s) " +
                       join_steps(report.discarded_steps) + " from " + options_.ckpt_dir +
                       " (damaged, or newer than the resumed step " + std::to_string(step) + ")");
    }
  }

  // 3. The settings: a changed learning rate, batch or hook parameter would
  // resume silently into another run. Decided by all ranks, so all stop together.
  std::string refusal;
  const auto current = effective_settings();
  if (step >= 0 && my_step == step && !mine.settings.empty()) {
    std::set<std::string> names;
    for (const auto& [k, v] : mine.settings) names.insert(k);
    for (const auto& [k, v] : current) names.insert(k);
    for (const auto& name : names) {
      const auto was = mine.settings.find(name);
      const auto now = current.find(name);
      const std::string a = was == mine.settings.end() ? "(unset)" : was->second;
      const std::string b = now == current.end() ? "(unset)" : now->second;
      if (a == b) continue;
      const std::string change = name + ": " + a + " -> " + b;
      if (options_.allow_changed_settings.count(name) || options_.allow_changed_settings.count("all")) {
        report.changed_settings.push_back(change);
      } else {
        refusal += (refusal.empty() ? "" : "; ") + std::string("'") + name + "' was " + a +
                   " in the checkpoint and is " + b + " now";
      }
    }
  }
  const auto refused = allgather_int(pg_, refusal.empty() ? 0 : 1);
  for (int r = 0; r < world; ++r) {
    if (refused[r] == 0) continue;
    TORCH_CHECK(false, "refusing to resume from step ", step, " of ", options_.ckpt_dir.empty() ? "the checkpoint" : options_.ckpt_dir,
                " with other settings: ", refusal.empty() ? "rank " + std::to_string(r) + " found changed settings (see its error)" : refusal,
                ". Resume with the stored values, allow the change with --allow-change NAME (repeatable; 'all' "
                "allows every change), or point --ckpt at a new directory");
  }
  if (rank == 0 && !report.changed_settings.empty()) {
    std::string list;
    for (const auto& c : report.changed_settings) list += (list.empty() ? "" : "; ") + c;
    detail::log_line("ftcomm: resuming from step " + std::to_string(step) + " with changed settings (allowed): " + list);
  }

  // 4. Load, on the ranks that have the step.
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

  // 5. Resync the ranks that lack it, from the first rank that has it.
  if (options_.on_phase) options_.on_phase("resync");
  start = Clock::now();
  std::vector<std::string> local_notes;
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
    // (rank r + 1 keeps r's copy), else reset under a logged policy. Every rank
    // records what happened to every rank's state.
    const bool has_local = !hook_->local_state().empty();
    for (int lost : report.resynced_ranks) {
      const int buddy = (lost + 1) % world;
      const bool buddy_has = world > 1 && steps[buddy] == step;
      if (!buddy_has) {
        if (has_local) {
          local_notes.push_back("rank " + std::to_string(lost) + ": reset to empty (lost with its store and rank " +
                                std::to_string(buddy) + "'s copy; policy: reset)");
          if (rank == lost) {
            detail::log_line("ftcomm: rank " + std::to_string(rank) + ": rank-local hook state of " + hook_->name() +
                             " was lost with its store and with rank " + std::to_string(buddy) +
                             "'s copy; reset to empty");
          }
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
      if (rank == lost) restore_hook_state(*hook_, copy, /*local_too=*/true, gpu);
      if (has_local) {
        local_notes.push_back("rank " + std::to_string(lost) + ": restored from rank " + std::to_string(buddy) +
                              "'s buddy copy");
      }
    }
  }
  report.resync_ms = ms_since(start);
  if (step < 0) {
    report.local_state = "fresh";
  } else if (local_notes.empty()) {
    report.local_state = "restored from each rank's store";
  } else {
    report.local_state = report.resynced_ranks.size() < static_cast<size_t>(world) ? "the other ranks' from their stores; " : "";
    for (size_t i = 0; i < local_notes.size(); ++i) report.local_state += (i ? "; " : "") + local_notes[i];
  }
  report.resumed_from_step = step;

  // 6. The Reducer, on one layout for all ranks: the stored one of the rank that
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
  record.settings = effective_settings();
  check(store_->WaitForSnapshot());
  store_->CommitSnapshotAsync(record, {}, snapshot_state());
}

std::map<std::string, std::string> DistributedDataParallel::effective_settings() const {
  std::map<std::string, std::string> out = options_.settings;
  for (const auto& [k, v] : hook_->params()) out["hook." + k] = format_setting(v);
  return out;
}

double DistributedDataParallel::comm_seconds() const {
  return comm_ ? comm_->busy_seconds() : 0.0;
}

void DistributedDataParallel::flush() {
  if (store_) check(store_->WaitForSnapshot());
}

}  // namespace ftcomm
