#include "ftcomm/records_json.h"

#include <cstdio>

#include <nlohmann/json.hpp>

#include "ftcomm/bucket_layout.h"

namespace ftcomm {

std::string to_json(const RecoveryReport& r) {
  nlohmann::json j = {{"resumed_from_step", r.resumed_from_step},
                      {"newest_snapshot_step", r.newest_snapshot_step},
                      {"newest_step", r.newest_step},
                      {"data_position", r.data_position},
                      {"steps_lost", r.steps_lost},
                      {"resumed_just_in_time", r.resumed_just_in_time},
                      {"policy", r.policy},
                      {"local_state", r.local_state},
                      {"local_state_reset", r.local_state_reset},
                      {"resumed_world_size", r.resumed_world_size},
                      {"discarded_steps", r.discarded_steps},
                      {"changed_settings", r.changed_settings},
                      {"agreement_ms", r.agreement_ms},
                      {"load_ms", r.load_ms},
                      {"resync_ms", r.resync_ms},
                      {"resync_bytes", r.resync_bytes},
                      {"resynced_ranks", r.resynced_ranks}};
  return j.dump();
}

std::string to_json(const SnapshotStats& s) {
  return nlohmann::json{{"taken", s.taken},
                        {"waited", s.waited},
                        {"waited_ms", s.waited_ms},
                        {"skipped", s.skipped},
                        {"written", s.written},
                        {"write_ms", s.write_ms},
                        {"staging_bytes", s.staging_bytes},
                        {"pinned_bytes", s.pinned_bytes}}
      .dump();
}

std::string to_json(const CommitRecord& c) {
  nlohmann::json j = {{"step", c.step},
                      {"epoch", c.epoch},
                      {"world_size", c.world_size},
                      {"rank", c.rank},  // whose state it holds (a store taken over keeps its writers)
                      {"data_position", c.data_position},
                      {"hook_digest", c.hook_digest},
                      {"layout_signature", signature_hex(c.layout_signature)},
                      {"snapshot", c.has_snapshot},
                      {"kind", c.just_in_time ? "just-in-time" : "periodic"}};
  if (c.just_in_time) {
    j["jit_reason"] = c.jit_reason;
    j["buddy_copies"] = nlohmann::json::array();
    if (c.buddy_parts & CommitRecord::kBuddyTrainer) j["buddy_copies"].push_back("trainer");
    if (c.buddy_parts & CommitRecord::kBuddyHook) j["buddy_copies"].push_back("hook");
  }
  j["snapshot_bytes"] = c.blob_bytes;
  j["settings"] = c.settings;
  j["unix_ms"] = c.unix_ms;
  return j.dump();
}

std::string resume_line(const RecoveryReport& r, int world_size) {
  if (r.resumed_from_step < 0) return "fresh start, world size " + std::to_string(world_size);
  char buf[512];
  std::string line = "resumed from step " + std::to_string(r.resumed_from_step);
  if (r.resumed_just_in_time) line += " (a just-in-time commit)";
  if (r.resumed_world_size != world_size) {
    line += ", written at world size " + std::to_string(r.resumed_world_size) + ": resized to " +
            std::to_string(world_size) + ", rank-local state started afresh";
  }
  if (!r.resynced_ranks.empty()) {
    std::string ranks;
    for (int x : r.resynced_ranks) ranks += (ranks.empty() ? "" : ", ") + std::to_string(x);
    line += "; resynced ranks [" + ranks + "] (" + std::to_string(r.resync_bytes) + " bytes)";
  }
  std::snprintf(buf, sizeof(buf), "; %lld step(s) behind the newest saved (policy %s)",
                static_cast<long long>(r.steps_lost), r.policy.c_str());
  line += buf;
  if (r.newest_snapshot_step > r.newest_step) {
    line += "; fell back from the damaged step-" + std::to_string(r.newest_snapshot_step) + " snapshot";
  }
  line += "; rank-local state: " + r.local_state;
  std::snprintf(buf, sizeof(buf), "; agreement %.1f ms, load %.1f ms, resync %.1f ms", r.agreement_ms, r.load_ms,
                r.resync_ms);
  return line + buf;
}

}  // namespace ftcomm
