#include "ftcomm/recovery.h"

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "control.h"
#include "ftcomm/broadcast.h"
#include "ftcomm/bucket_layout.h"
#include "ftcomm/errors.h"
#include "log.h"
#include "tensor_bytes.h"

namespace ftcomm {
namespace {

using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

std::string rank_text(int rank) {
  return "rank " + std::to_string(rank);
}

std::string join(const std::vector<int64_t>& values) {
  std::string out;
  for (int64_t v : values) out += (out.empty() ? "" : ", ") + std::to_string(v);
  return out;
}

// --- how state is named in a snapshot ------------------------------------------
// "param/<i>", "buffer/<i>", "extra/<i>" (optimizer state), "object/<i>",
// "local/<i>" (the trainer's rank-local state) with its buddy copy
// "buddy_local/<i>", and hook state as "<kind>/<name>/<bucket>" with kind hook_r
// (replicated), hook_l (rank-local) or buddy_l (the previous rank's rank-local
// state). Snapshots written before the device type was recorded end CUDA hook
// state's name in "@cuda".

// The name of rank (r - stride)'s copy of a rank-local entry, and back.
std::string buddy_name(const std::string& name) {
  return name.rfind("hook_l/", 0) == 0 ? "buddy_l/" + name.substr(7) : "buddy_" + name;
}
std::string from_buddy_name(const std::string& name) {
  if (name.rfind("buddy_l/", 0) == 0) return "hook_l/" + name.substr(8);
  if (name.rfind("buddy_local/", 0) == 0) return name.substr(6);
  return "";
}

at::Device home_device(c10::DeviceType home, at::Device accelerator) {
  return home == c10::DeviceType::CPU ? at::Device(at::kCPU) : accelerator;
}

using Entries = std::map<std::string, const NamedTensor*>;

Entries by_name(const std::vector<NamedTensor>& items) {
  Entries out;
  for (const auto& nt : items) out[nt.name] = &nt;
  return out;
}

// The entries "<prefix>0", "<prefix>1", ... of `items`, in order, each on its
// home device; stops at the first index missing. An entry already on its home
// device is taken as it is, not copied: the items are a load's or a broadcast's
// own tensors, and the optimizer's state (most of a snapshot's bytes) would
// otherwise be copied twice into fresh memory.
std::vector<at::Tensor> indexed_entries(const Entries& items, const std::string& prefix, at::Device accelerator) {
  std::vector<at::Tensor> out;
  for (size_t i = 0;; ++i) {
    const auto it = items.find(prefix + std::to_string(i));
    if (it == items.end()) return out;
    out.push_back(it->second->tensor.to(home_device(it->second->home, accelerator), false, /*copy=*/false));
  }
}

struct HookEntry {
  std::string kind, name;
  int64_t bucket = 0;
};

bool parse_hook_entry(std::string text, c10::DeviceType* home, HookEntry* out) {
  const auto first = text.find('/');
  if (first == std::string::npos) return false;
  out->kind = text.substr(0, first);
  if (out->kind != "hook_r" && out->kind != "hook_l" && out->kind != "buddy_l") return false;
  const std::string legacy = "@cuda";
  if (text.size() > legacy.size() && text.compare(text.size() - legacy.size(), legacy.size(), legacy) == 0) {
    text.resize(text.size() - legacy.size());
    *home = c10::DeviceType::CUDA;
  }
  const auto last = text.rfind('/');
  if (last == first) return false;
  out->name = text.substr(first + 1, last - first - 1);
  out->bucket = std::strtoll(text.c_str() + last + 1, nullptr, 10);
  return true;
}

// The hook's state of one kind, as named host-or-device tensors.
std::vector<NamedTensor> hook_tensors(const ScriptHook& hook, bool replicated) {
  std::vector<NamedTensor> out;
  const auto state = hook.state();
  for (const auto& name : replicated ? hook.replicated_state() : hook.local_state()) {
    for (const auto& entry : state.at(name)) {
      const at::Tensor& t = entry.value();
      out.push_back({std::string(replicated ? "hook_r/" : "hook_l/") + name + "/" + std::to_string(entry.key()), t,
                     t.device().type()});
    }
  }
  return out;
}

// Puts named hook state of `kinds` into the hook, each tensor on its home device.
void restore_hook_tensors(ScriptHook& hook, const std::vector<NamedTensor>& items, const std::set<std::string>& kinds,
                          at::Device accelerator) {
  auto state = hook.state();
  for (const auto& nt : items) {
    c10::DeviceType home = nt.home;
    HookEntry e;
    if (!parse_hook_entry(nt.name, &home, &e) || !kinds.count(e.kind)) continue;
    TORCH_CHECK(state.contains(e.name), "snapshot holds hook state '", e.name, "' that hook ", hook.name(),
                " does not declare; was it written by another hook?");
    const at::Device device = home_device(home, accelerator);
    state.at(e.name).insert_or_assign(e.bucket, nt.tensor.to(device, /*non_blocking=*/false, /*copy=*/true));
  }
}

// Root's (name, dtype, shape, home) list to every rank, which allocates to match.
void broadcast_manifest(const Group& pg, int root, std::vector<NamedTensor>* items) {
  nlohmann::json manifest = nlohmann::json::array();
  if (pg->getRank() == root) {
    for (const auto& nt : *items) {
      manifest.push_back({{"name", nt.name},
                          {"dtype", static_cast<int>(nt.tensor.scalar_type())},
                          {"shape", nt.tensor.sizes().vec()},
                          {"home", static_cast<int>(nt.home)}});
    }
  }
  const std::string text = control::broadcast_bytes(pg, manifest.dump(), root);
  if (pg->getRank() == root) return;
  items->clear();
  for (const auto& m : nlohmann::json::parse(text)) {
    const auto dtype = static_cast<at::ScalarType>(m.at("dtype").get<int>());
    items->push_back({m.at("name").get<std::string>(), at::empty(m.at("shape").get<std::vector<int64_t>>(), dtype),
                      static_cast<c10::DeviceType>(m.at("home").get<int>())});
  }
}

int64_t broadcast_tensors(const Group& pg, std::vector<at::Tensor> tensors, int root) {
  BroadcastCoalescedOptions bo;
  bo.root = root;
  bo.buffer_bytes = size_t(32) << 20;
  return static_cast<int64_t>(broadcast_coalesced(pg, tensors, bo).bytes);
}

}  // namespace

at::Device TrainingState::accelerator() const {
  for (const auto& p : parameters) {
    if (!p.is_cpu()) return p.device();
  }
  return at::Device(at::kCPU);
}

LocalCheckpoint load_newest_intact(CheckpointStore* store, int world_size, int rank) {
  LocalCheckpoint local;
  local.rank = rank;
  local.world_size = world_size;
  if (store == nullptr) return local;
  std::vector<CommitRecord> commits;
  check(store->ListCommits(&commits));
  for (const auto& c : commits) local.commits.push_back(c.step);
  for (auto it = commits.rbegin(); it != commits.rend(); ++it) {
    if (!it->has_snapshot) continue;
    local.newest = std::max(local.newest, it->step);
    const auto s = store->LoadSnapshot(*it, &local.tensors);
    if (s.ok()) {
      local.record = *it;
      local.step = it->step;
      for (auto older = it; older != commits.rend(); ++older) {
        if (older->has_snapshot) {
          local.candidates.push_back(
              {older->step, older->just_in_time, older->buddy_parts, older->world_size, older->rank, older->buddy_stride});
        }
      }
      break;
    }
    local.damaged.push_back(it->step);
    detail::log_line("ftcomm: " + rank_text(rank) + ": " + s.ToString() +
                     "; falling back to this rank's previous snapshot, if any");
  }
  if (local.step < 0) local.tensors.clear();
  return local;
}

const char* policy_name(LocalStatePolicy policy) {
  return policy == LocalStatePolicy::kExact ? "exact" : "reset";
}

LocalStatePolicy parse_local_state_policy(const std::string& text, const std::string& what) {
  if (text == "exact") return LocalStatePolicy::kExact;
  if (text == "reset") return LocalStatePolicy::kReset;
  TORCH_CHECK(false, what, " must be 'exact' or 'reset', got '", text, "'");
}

RecoveryPlan plan_recovery(const std::vector<std::vector<SnapshotCandidate>>& candidates, const RecoveryNeeds& needs) {
  RecoveryPlan plan;
  plan.policy = needs.policy;
  const int world = static_cast<int>(candidates.size());
  const bool any_local = needs.hook_local || needs.trainer_local;
  auto held = [&](int r, int64_t step) -> const SnapshotCandidate* {
    for (const auto& c : candidates[static_cast<size_t>(r)]) {
      if (c.step == step) return &c;
    }
    return nullptr;
  };
  auto same_world = [&](const SnapshotCandidate& c) { return c.world_size == 0 || c.world_size == world; };
  auto owner = [](const SnapshotCandidate& c, int holder) { return c.owner < 0 ? holder : c.owner; };
  // Where rank r's rank-local state at `step` can be had: a snapshot of this
  // world size that holds it as its owner's (its own store, or one a renumbered
  // rank took over), else the buddy copy in rank r + stride's snapshot, with
  // every part r keeps.
  // (With no needs stated, every part: the plan still says where each rank's
  // state would come from.)
  const uint64_t want = any_local ? (needs.hook_local ? CommitRecord::kBuddyHook : 0) |
                                        (needs.trainer_local ? CommitRecord::kBuddyTrainer : 0)
                                  : CommitRecord::kBuddyHook | CommitRecord::kBuddyTrainer;
  auto local_source_of = [&](int r, int64_t step, uint64_t want) -> RecoveryPlan::LocalSource {
    for (int x = 0; x < world; ++x) {
      const SnapshotCandidate* c = held(x, step);
      if (c && same_world(*c) && owner(*c, x) == r) return {x, false};
    }
    if (world == 1) return {};
    for (int x = 0; x < world; ++x) {
      const SnapshotCandidate* c = held(x, step);
      if (!c || !same_world(*c) || (c->buddy_parts & want) != want) continue;
      // The copy is of rank owner - stride: on another node than its owner.
      if (buddy_copy_of(owner(*c, x), c->buddy_stride, world) == r) return {x, true};
    }
    return {};
  };
  auto local_source = [&](int r, int64_t step) { return local_source_of(r, step, want); };
  auto local_ok = [&](int r, int64_t step) { return !any_local || local_source(r, step).rank >= 0; };
  auto foreign = [&](int64_t step) {
    for (int r = 0; r < world; ++r) {
      const SnapshotCandidate* c = held(r, step);
      if (c && !same_world(*c)) return true;
    }
    return false;
  };
  std::set<int64_t, std::greater<int64_t>> steps;
  for (const auto& rank_candidates : candidates) {
    for (const auto& c : rank_candidates) steps.insert(c.step);
  }
  if (steps.empty()) {
    plan.rank_steps.assign(static_cast<size_t>(world), -1);
    return plan;
  }
  plan.newest_step = *steps.begin();
  int64_t chosen = -1;
  if (needs.policy == LocalStatePolicy::kExact) {
    for (int64_t step : steps) {
      bool all = true;
      for (int r = 0; r < world && all; ++r) all = local_ok(r, step);
      if (all) {
        chosen = step;
        break;
      }
      // Never back past a resize: the steps before it are of another run shape,
      // and going back would give up every step since.
      if (foreign(step)) break;
    }
  }
  // kReset, or no step has every rank's state: the newest step.
  if (chosen < 0) chosen = plan.newest_step;
  plan.step = chosen;
  for (int r = 0; r < world; ++r) {
    const SnapshotCandidate* mine = held(r, chosen);
    const auto& rank_candidates = candidates[static_cast<size_t>(r)];
    plan.rank_steps.push_back(mine ? chosen : (rank_candidates.empty() ? -1 : rank_candidates.front().step));
    if (mine && plan.source < 0) {
      plan.source = r;
      plan.just_in_time = mine->just_in_time;
      plan.step_world_size = mine->world_size == 0 ? world : mine->world_size;
    }
    if (!mine) plan.resync.push_back(r);
  }
  for (int r = 0; r < world; ++r) {
    plan.local_source.push_back(local_source(r, chosen));
    if (any_local && plan.local_source.back().rank < 0) plan.local_reset.push_back(r);
    plan.trainer_source.push_back(plan.local_source.back().rank >= 0 || !needs.trainer_local
                                      ? plan.local_source.back()
                                      : local_source_of(r, chosen, CommitRecord::kBuddyTrainer));
  }
  return plan;
}

RecoveryPlan agree_on_step(const Group& pg, const LocalCheckpoint& local) {
  return agree_on_step(pg, local, RecoveryNeeds{false, false, LocalStatePolicy::kReset});
}

RecoveryPlan agree_on_step(const Group& pg, const LocalCheckpoint& local, const RecoveryNeeds& needs) {
  const int world = pg->getSize();
  // Fixed size on every rank: the newest step the store names, the number of
  // candidates, then (step, just_in_time | buddy_parts << 1, world_size << 32 |
  // owner + 1, buddy_stride) for the newest few.
  constexpr size_t kMaxCandidates = 8;
  std::vector<int64_t> mine{local.newest, static_cast<int64_t>(std::min(local.candidates.size(), kMaxCandidates))};
  for (size_t i = 0; i < kMaxCandidates; ++i) {
    const bool have = i < local.candidates.size();
    const SnapshotCandidate c = have ? local.candidates[i] : SnapshotCandidate{};
    mine.push_back(c.step);
    mine.push_back(int64_t(c.just_in_time) | int64_t(c.buddy_parts << 1));
    mine.push_back((int64_t(c.world_size) << 32) | int64_t(c.owner + 1));
    mine.push_back(c.buddy_stride);
  }
  const auto gathered = control::allgather(pg, mine);
  std::vector<std::vector<SnapshotCandidate>> candidates(static_cast<size_t>(world));
  int64_t newest_named = -1;
  for (int r = 0; r < world; ++r) {
    const auto& g = gathered[static_cast<size_t>(r)];
    newest_named = std::max(newest_named, g[0]);
    for (int64_t i = 0; i < g[1]; ++i) {
      const size_t at = static_cast<size_t>(2 + 4 * i);
      const int64_t flags = g[at + 1], shape = g[at + 2];
      candidates[static_cast<size_t>(r)].push_back({g[at], (flags & 1) != 0, static_cast<uint64_t>(flags >> 1),
                                                    static_cast<int>(shape >> 32),
                                                    static_cast<int>(shape & 0xffffffff) - 1,
                                                    static_cast<int>(g[at + 3])});
    }
  }
  RecoveryPlan plan = plan_recovery(candidates, needs);
  plan.newest_snapshot_step = newest_named;
  if (pg->getRank() != 0) return plan;
  if (newest_named > plan.newest_step) {
    std::vector<int64_t> ranks;
    for (int r = 0; r < world; ++r) {
      if (gathered[static_cast<size_t>(r)][0] > plan.newest_step) ranks.push_back(r);
    }
    detail::log_line("ftcomm: the newest snapshot (step " + std::to_string(newest_named) +
                     ") is damaged on every rank that has it (ranks " + join(ranks) + "); " +
                     (plan.step >= 0 ? "resuming from step " + std::to_string(plan.step) + ", the newest intact one"
                                     : "no intact snapshot is left: starting afresh"));
  }
  if (plan.step >= 0 && plan.step < plan.newest_step) {
    std::vector<int64_t> lacking;
    for (int r = 0; r < world; ++r) {
      bool has_newest = false;
      for (const auto& c : candidates[static_cast<size_t>(r)]) has_newest |= c.step == plan.newest_step;
      if (!has_newest) lacking.push_back(r);
    }
    detail::log_line("ftcomm: resuming from step " + std::to_string(plan.step) + ", not the newest step " +
                     std::to_string(plan.newest_step) + ": the rank-local state of rank(s) " + join(lacking) +
                     " exists no later (policy exact, which keeps the run bit-identical; policy reset resumes from step " +
                     std::to_string(plan.newest_step) + " with that state started afresh)");
  }
  if (plan.resized()) {
    detail::log_line("ftcomm: resuming at world size " + std::to_string(world) + " from step " +
                     std::to_string(plan.step) + ", written at world size " + std::to_string(plan.step_world_size) +
                     ": parameters, buffers, optimizer and replicated hook state carry over" +
                     (needs.hook_local || needs.trainer_local
                          ? "; every rank's rank-local state (error feedback, the trainer's own) starts afresh"
                          : ""));
  } else if (!plan.local_reset.empty() && (needs.hook_local || needs.trainer_local)) {
    std::vector<int64_t> ranks(plan.local_reset.begin(), plan.local_reset.end());
    detail::log_line("ftcomm: resuming from step " + std::to_string(plan.step) + " with the rank-local state of rank(s) " +
                     join(ranks) + " started afresh (policy " + policy_name(needs.policy) +
                     (needs.policy == LocalStatePolicy::kExact ? ": no step has all of it" : "") + ")");
  }
  return plan;
}

bool load_agreed_step(CheckpointStore* store, const RecoveryPlan& plan, int rank, LocalCheckpoint* local) {
  if (store == nullptr || !plan.has_step(rank) || local->step == plan.step) return true;
  std::vector<CommitRecord> commits;
  check(store->ListCommits(&commits));
  for (const auto& c : commits) {
    if (c.step != plan.step || !c.has_snapshot) continue;
    std::vector<NamedTensor> tensors;
    const auto s = store->LoadSnapshot(c, &tensors);
    if (s.ok()) {
      local->record = c;
      local->step = c.step;
      local->tensors = std::move(tensors);
      return true;
    }
    detail::log_line("ftcomm: " + rank_text(rank) + ": " + s.ToString() + "; the ranks agree on another step");
    break;
  }
  local->damaged.push_back(plan.step);
  auto& cands = local->candidates;
  cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const SnapshotCandidate& c) { return c.step == plan.step; }),
              cands.end());
  return false;
}

std::vector<int64_t> unusable_steps(const RecoveryPlan& plan, const LocalCheckpoint& local) {
  std::vector<int64_t> steps;
  for (int64_t step : local.commits) {
    const bool damaged = std::find(local.damaged.begin(), local.damaged.end(), step) != local.damaged.end();
    if (damaged || step > plan.step) steps.push_back(step);
  }
  return steps;
}

void discard_commits(CheckpointStore* store, const std::vector<int64_t>& steps, int64_t resumed_step) {
  if (store == nullptr || steps.empty()) return;
  check(store->DiscardCommits(steps));
  detail::log_line("ftcomm: " + rank_text(store->options().rank) + ": discarded commits of step(s) " + join(steps) +
                   " from " + store->options().dir + " (damaged, or newer than the resumed step " +
                   std::to_string(resumed_step) + ")");
}

std::vector<int64_t> discard_unusable(CheckpointStore* store, const RecoveryPlan& plan, const LocalCheckpoint& local) {
  if (store == nullptr) return {};
  const std::vector<int64_t> steps = unusable_steps(plan, local);
  discard_commits(store, steps, plan.step);
  return steps;
}

std::vector<std::string> check_settings(const Group& pg, const RecoveryPlan& plan, const LocalCheckpoint& local,
                                        const std::map<std::string, std::string>& current,
                                        const std::set<std::string>& allowed, const ResumeFixes& fixes) {
  std::vector<std::string> changes;
  std::string refusal;
  std::vector<std::string> refused_names;
  // Records written before settings were recorded have none: nothing to compare.
  if (plan.has_step(pg->getRank()) && !local.record.settings.empty()) {
    const auto& stored = local.record.settings;
    std::set<std::string> names;
    for (const auto& [k, v] : stored) names.insert(k);
    for (const auto& [k, v] : current) names.insert(k);
    for (const auto& name : names) {
      const auto was = stored.find(name);
      const auto now = current.find(name);
      const std::string a = was == stored.end() ? "(unset)" : was->second;
      const std::string b = now == current.end() ? "(unset)" : now->second;
      if (a == b) continue;
      if (allowed.count(name) || allowed.count("all")) {
        changes.push_back(name + ": " + a + " -> " + b);
      } else {
        refusal += (refusal.empty() ? "" : "; ") + std::string("'") + name + "' was " + a +
                   " in the checkpoint and is " + b + " now";
        refused_names.push_back(name);
      }
    }
  }
  const auto refused = control::allgather(pg, int64_t(refusal.empty() ? 0 : 1));
  for (int r = 0; r < pg->getSize(); ++r) {
    if (refused[r] == 0) continue;
    // Every rank names the settings, whichever ranks found them.
    std::string mine;
    for (const auto& name : refused_names) mine += name + "\n";
    std::set<std::string> names;
    for (const auto& text : control::allgather_bytes(pg, mine)) {
      for (size_t at = 0, end; (end = text.find('\n', at)) != std::string::npos; at = end + 1) {
        names.insert(text.substr(at, end - at));
      }
    }
    throw ResumeRefused("refusing to resume from step " + std::to_string(plan.step) + " with other settings: " +
                            (refusal.empty() ? rank_text(r) + " found changed settings (see its error)" : refusal) +
                            ". Resume with the stored values, " + fixes.allow_change + ", or " + fixes.new_store +
                            ". Nothing was discarded",
                        plan.step, std::vector<std::string>(names.begin(), names.end()));
  }
  if (pg->getRank() == 0 && !changes.empty()) {
    std::string list;
    for (const auto& c : changes) list += (list.empty() ? "" : "; ") + c;
    detail::log_line("ftcomm: resuming from step " + std::to_string(plan.step) + " with changed settings (allowed): " + list);
  }
  return changes;
}

void restore_from_checkpoint(const RecoveryPlan& plan, const LocalCheckpoint& local, TrainingState& state,
                             const std::string& where, const ResumeFixes& fixes) {
  at::NoGradGuard no_grad;
  const Entries entries = by_name(local.tensors);
  auto fill = [&](std::vector<at::Tensor>& tensors, const std::string& prefix, const char* what) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      auto it = entries.find(prefix + std::to_string(i));
      TORCH_CHECK(it != entries.end() && it->second->tensor.sizes() == tensors[i].sizes(), "checkpoint ", where,
                  " does not fit this model: ", what, " ", i, " is missing or has another shape. Was it written by "
                  "another model? To start afresh, ", fixes.new_store);
      tensors[i].detach().copy_(it->second->tensor);
    }
  };
  fill(state.parameters, "param/", "parameter");
  // Snapshots of the Python package written before buffers were replicated
  // state hold them as rank-local state only: then the live buffers stay, and
  // the rank-local restore brings them back.
  if (!state.buffers.empty() && entries.count("buffer/0") == 0 && entries.count("param/0") != 0 &&
      entries.count("local/0") != 0) {
    detail::log_line("ftcomm: " + where + ": this snapshot keeps buffers as rank-local state only (written by an "
                     "older ftcomm); they come back with the rank-local state");
  } else {
    fill(state.buffers, "buffer/", "buffer");
  }
  fill(state.optimizer, "extra/", "optimizer state");
  state.objects = indexed_entries(entries, "object/", state.accelerator());
  // Rank-local state only from this rank's own snapshot of this world size; a
  // store taken over from another rank holds that rank's (restore_rank_local
  // moves it to its owner).
  const bool own = (local.record.rank < 0 || local.record.rank == local.rank) &&
                   local.record.world_size == local.world_size;
  if (!state.rank_local.empty() && own) {
    auto mine = indexed_entries(entries, "local/", state.accelerator());
    TORCH_CHECK(mine.size() == state.rank_local.size(), "checkpoint ", where, " holds ", mine.size(),
                " rank-local tensors, this trainer keeps ", state.rank_local.size(),
                ". Was it written by another trainer? Point the checkpoint directory elsewhere to start afresh");
    state.rank_local = std::move(mine);
  }
  const std::string stored_digest = local.record.hook_digest;
  TORCH_CHECK(state.hook || stored_digest.empty(), "checkpoint ", where, " of step ", plan.step,
              " was written with a comm hook (digest ", stored_digest, ") and this run has none. Resume with the "
              "same hook, or ", fixes.new_store);
  if (!state.hook) return;
  TORCH_CHECK(!stored_digest.empty(), "checkpoint ", where, " of step ", plan.step,
              " was written without a comm hook and this run has hook ", state.hook->name(), ". Resume without it, or ",
              fixes.new_store);
  TORCH_CHECK(stored_digest == state.hook->digest(), "checkpoint ", where, " of step ", plan.step,
              " was written with hook digest ", stored_digest, ", this run's hook ", state.hook->name(),
              " has ", state.hook->digest(), ". Resume with the same hook, or ", fixes.new_store);
  if (own) {
    restore_hook_tensors(*state.hook, local.tensors, {"hook_r", "hook_l"}, state.accelerator());
  } else {
    restore_hook_tensors(*state.hook, local.tensors, {"hook_r"}, state.accelerator());
  }
}

int64_t resync(const Group& pg, const RecoveryPlan& plan, TrainingState& state) {
  if (plan.fresh() || plan.resync.empty()) return 0;
  at::NoGradGuard no_grad;
  // The replicated hook state's manifest comes from the source; the rest has the
  // same shapes on every rank.
  std::vector<NamedTensor> replicated;
  if (pg->getRank() == plan.source) {
    if (state.hook) replicated = hook_tensors(*state.hook, /*replicated=*/true);
    for (size_t i = 0; i < state.objects.size(); ++i) {
      replicated.push_back({"object/" + std::to_string(i), state.objects[i], state.objects[i].device().type()});
    }
    for (auto& nt : replicated) nt.tensor = nt.tensor.to(at::kCPU);
  }
  broadcast_manifest(pg, plan.source, &replicated);
  std::vector<at::Tensor> all;
  for (auto& p : state.parameters) all.push_back(p.detach());
  for (auto& b : state.buffers) all.push_back(b);
  for (auto& o : state.optimizer) all.push_back(o);
  for (auto& nt : replicated) all.push_back(nt.tensor);
  const int64_t bytes = broadcast_tensors(pg, all, plan.source);
  if (!plan.has_step(pg->getRank())) {
    if (state.hook) restore_hook_tensors(*state.hook, replicated, {"hook_r"}, state.accelerator());
    state.objects = indexed_entries(by_name(replicated), "object/", state.accelerator());
  }
  return bytes;
}

RankLocalOutcome restore_rank_local(const Group& pg, const RecoveryPlan& plan, const LocalCheckpoint& local,
                                    TrainingState& state) {
  RankLocalOutcome out;
  if (plan.fresh()) {
    out.summary = "fresh";
    return out;
  }
  const int rank = pg->getRank(), world = pg->getSize();
  const bool hook_local = state.hook && !state.hook->local_state().empty();
  const bool has_local = hook_local || !state.rank_local.empty();
  if (!has_local) {
    out.summary = "none kept";
    return out;
  }
  TORCH_CHECK(plan.local_source.size() == static_cast<size_t>(world),
              "restore_rank_local: the plan names no source of rank-local state; was it agreed with RecoveryNeeds "
              "that say the job keeps some?");
  const std::string what = hook_local ? "rank-local hook state of " + state.hook->name() : "rank-local state";
  if (plan.resized()) {
    out.summary = "every rank's reset (world size " + std::to_string(plan.step_world_size) + " -> " +
                  std::to_string(world) + ")";
    detail::log_line("ftcomm: " + rank_text(rank) + ": " + what + " started afresh: the job resumed at world size " +
                     std::to_string(world) + " from a step of world size " + std::to_string(plan.step_world_size) +
                     (state.rank_local.empty() ? "" : " (the trainer's keeps its current value)"));
    return out;
  }
  std::vector<std::string> notes;
  for (int r = 0; r < world; ++r) {
    RecoveryPlan::LocalSource from = plan.local_source[static_cast<size_t>(r)];
    // The hook's part is missing, the trainer's (RNG, buffers) is not: that part
    // comes back, and the hook's alone starts afresh.
    bool trainer_only = false;
    if (from.rank < 0 && !state.rank_local.empty() && r < static_cast<int>(plan.trainer_source.size()) &&
        plan.trainer_source[static_cast<size_t>(r)].rank >= 0) {
      from = plan.trainer_source[static_cast<size_t>(r)];
      trainer_only = true;
    }
    if (from.rank < 0) {
      const int buddy = (r + state.buddy_stride) % world;
      const bool lost = std::find(plan.resync.begin(), plan.resync.end(), r) != plan.resync.end();
      const std::string why = lost && plan.has_step(buddy)
                                  ? rank_text(buddy) + "'s just-in-time commit of step " + std::to_string(plan.step) +
                                        " has no full copy of it"
                                  : "lost with its store and " + rank_text(buddy) + "'s copy";
      notes.push_back(rank_text(r) + (hook_local ? ": reset to empty" : ": reset") + " (" + why + "; policy " +
                      policy_name(plan.policy) + ")");
      if (rank == r) {
        detail::log_line("ftcomm: " + rank_text(rank) + ": " + what + " does not exist at step " +
                         std::to_string(plan.step) + " (" + why + "); started afresh" +
                         (state.rank_local.empty() ? " (empty)" : " (the trainer's keeps its current value)"));
      }
      continue;
    }
    if (from.rank == r && !from.buddy) continue;  // its own snapshot, loaded already
    // The holder sends r's entries under their own names: a buddy copy renamed,
    // or the rank-local entries of a snapshot r wrote (a store another rank took over).
    std::vector<NamedTensor> copy;
    if (rank == from.rank) {
      for (const auto& nt : local.tensors) {
        if (from.buddy) {
          const std::string own = from_buddy_name(nt.name);
          if (!own.empty() && (!trainer_only || own.rfind("local/", 0) == 0)) copy.push_back({own, nt.tensor, nt.home});
        } else if (nt.name.rfind("local/", 0) == 0 || (!trainer_only && nt.name.rfind("hook_l/", 0) == 0)) {
          copy.push_back(nt);
        }
      }
    }
    broadcast_manifest(pg, from.rank, &copy);
    std::vector<at::Tensor> tensors;
    for (auto& nt : copy) tensors.push_back(nt.tensor);
    out.bytes += broadcast_tensors(pg, tensors, from.rank);
    if (rank == r) {
      if (state.hook) restore_hook_tensors(*state.hook, copy, {"hook_l"}, state.accelerator());
      auto mine = indexed_entries(by_name(copy), "local/", state.accelerator());
      if (mine.size() == state.rank_local.size()) state.rank_local = std::move(mine);
    }
    const std::string part = trainer_only ? " (the trainer's part; the hook's reset to empty, policy " +
                                                std::string(policy_name(plan.policy)) + ")"
                                          : "";
    notes.push_back(rank_text(r) + (from.buddy ? ": restored from " + rank_text(from.rank) + "'s buddy copy"
                                               : ": restored from its own snapshot, held by " + rank_text(from.rank)) +
                    part);
    if (trainer_only && rank == r) {
      detail::log_line("ftcomm: " + rank_text(rank) + ": " + what + " does not exist at step " +
                       std::to_string(plan.step) + "; started afresh (empty); the trainer's rank-local state comes "
                       "from " + rank_text(from.rank) + (from.buddy ? "'s buddy copy" : ""));
    }
  }
  if (notes.empty()) {
    out.summary = "restored from each rank's store";
  } else {
    out.summary = notes.size() < static_cast<size_t>(world) ? "the other ranks' from their stores; " : "";
    for (size_t i = 0; i < notes.size(); ++i) out.summary += (i ? "; " : "") + notes[i];
  }
  return out;
}

std::vector<std::vector<size_t>> agree_on_buckets(const Group& pg, const RecoveryPlan& plan,
                                                  std::vector<std::vector<size_t>> candidate,
                                                  const std::vector<at::Tensor>& parameters) {
  if (!plan.fresh()) {
    // The source's buckets, flattened as count, then each bucket's size and indices.
    std::vector<int64_t> flat;
    if (pg->getRank() == plan.source) {
      flat.push_back(static_cast<int64_t>(candidate.size()));
      for (const auto& b : candidate) {
        flat.push_back(static_cast<int64_t>(b.size()));
        flat.insert(flat.end(), b.begin(), b.end());
      }
    }
    flat = control::broadcast(pg, flat, plan.source);
    auto p = flat.begin();
    candidate.assign(static_cast<size_t>(*p++), {});
    for (auto& b : candidate) {
      b.resize(static_cast<size_t>(*p++));
      for (auto& i : b) i = static_cast<size_t>(*p++);
    }
  }
  // Every rank must reduce the same buckets; a mismatch would silently mix
  // gradients of different parameters.
  const auto signatures = control::allgather(pg, static_cast<int64_t>(layout_of(candidate, parameters).signature()));
  for (int r = 1; r < pg->getSize(); ++r) {
    TORCH_CHECK(signatures[r] == signatures[0], "bucket layouts differ: rank 0 uses ",
                signature_hex(static_cast<uint64_t>(signatures[0])), ", rank ", r, " uses ",
                signature_hex(static_cast<uint64_t>(signatures[r])),
                "; every rank must run the same model and --bucket-mb");
  }
  return candidate;
}

std::string trainer_buddy_name(size_t index) {
  return buddy_name("local/" + std::to_string(index));
}

std::vector<NamedTensor> hook_state_entries(const ScriptHook& hook, std::vector<NamedTensor> reuse) {
  std::map<std::string, at::Tensor> spare;
  for (auto& nt : reuse) spare.emplace(nt.name, std::move(nt.tensor));
  std::vector<NamedTensor> out = hook_tensors(hook, /*replicated=*/true);
  for (auto& nt : hook_tensors(hook, /*replicated=*/false)) out.push_back(std::move(nt));
  for (auto& nt : out) {
    const at::Tensor live = nt.tensor.detach();
    auto it = spare.find(nt.name);
    if (it != spare.end() && it->second.sizes() == live.sizes() && it->second.strides() == live.strides() &&
        it->second.scalar_type() == live.scalar_type() && it->second.device() == live.device()) {
      nt.tensor = it->second.copy_(live);
    } else {
      nt.tensor = live.clone();
    }
  }
  return out;
}

std::vector<NamedTensor> own_state_tensors(const TrainingState& state, const std::vector<NamedTensor>& hook_state,
                                           const std::vector<at::Tensor>& rank_local) {
  std::vector<NamedTensor> out;
  auto add = [&](const std::vector<at::Tensor>& tensors, const std::string& prefix) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      out.push_back({prefix + std::to_string(i), tensors[i].detach(), tensors[i].device().type()});
    }
  };
  add(state.parameters, "param/");
  add(state.buffers, "buffer/");
  add(state.optimizer, "extra/");
  add(state.objects, "object/");
  add(rank_local, "local/");
  out.insert(out.end(), hook_state.begin(), hook_state.end());
  return out;
}

std::vector<NamedTensor> snapshot_tensors(const Group& pg, const TrainingState& state) {
  std::vector<NamedTensor> hook_state;
  if (state.hook) {
    hook_state = hook_tensors(*state.hook, /*replicated=*/true);
    for (auto& nt : hook_tensors(*state.hook, /*replicated=*/false)) hook_state.push_back(std::move(nt));
  }
  std::vector<NamedTensor> out = own_state_tensors(state, hook_state, state.rank_local);
  std::vector<NamedTensor> local;
  for (const auto& nt : out) {
    if (nt.name.rfind("local/", 0) == 0 || nt.name.rfind("hook_l/", 0) == 0) local.push_back(nt);
  }
  // The buddy copy: this rank also keeps rank (r - stride)'s rank-local state, so a
  // replaced rank r - stride resumes bit-exactly. Every rank has the same local state
  // layout (same hook, same buckets, same trainer): one allgather of its bytes,
  // after one of its size, so that a rank whose size differs fails on every rank.
  const int world = pg->getSize();
  if (world > 1 && !local.empty()) {
    std::vector<at::Tensor> parts;
    for (const auto& nt : local) parts.push_back(detail::as_bytes(nt.tensor));
    at::Tensor flat = at::cat(parts);
    const auto sizes = control::allgather(pg, flat.numel());
    for (int r = 0; r < world; ++r) {
      TORCH_CHECK(sizes[r] == flat.numel(), "rank-local state differs in size: rank ", pg->getRank(), " keeps ",
                  flat.numel(), " bytes, rank ", r, " keeps ", sizes[r],
                  "; every rank must keep the same rank-local state (same hook, buckets and trainer)");
    }
    std::vector<std::vector<at::Tensor>> gathered(1);
    for (int r = 0; r < world; ++r) gathered[0].push_back(at::empty_like(flat));
    std::vector<at::Tensor> in{flat};
    pg->allgather(gathered, in)->wait();
    const at::Tensor& theirs =
        gathered[0][static_cast<size_t>(buddy_copy_of(pg->getRank(), state.buddy_stride, world))];
    int64_t at = 0;
    for (const auto& nt : local) {
      const auto n = static_cast<int64_t>(nt.tensor.nbytes());
      out.push_back({buddy_name(nt.name), detail::from_bytes(theirs.narrow(0, at, n), nt.tensor), nt.home});
      at += n;
    }
  }
  return out;
}

}  // namespace ftcomm
