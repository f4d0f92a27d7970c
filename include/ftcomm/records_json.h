// What a resume did (RecoveryReport) and what a store holds (CommitRecord), as
// JSON text: one serializer each, one set of field names everywhere (the CLI's
// events, summary and `inspect --json`; the Python package's FaultTolerant.report
// and commits()). Plus the one line rank 0 prints after a resume.
//
//   RecoveryReport: resumed_from_step, newest_snapshot_step, newest_step,
//     data_position, steps_lost, resumed_just_in_time, policy, local_state,
//     local_state_reset, resumed_world_size, discarded_steps, changed_settings,
//     agreement_ms, load_ms, resync_ms, resync_bytes, resynced_ranks
//   CommitRecord: step, epoch, world_size, rank, data_position, hook_digest,
//     layout_signature (hex), snapshot (bool), kind ("periodic"|"just-in-time"),
//     jit_reason and buddy_copies (just-in-time only), snapshot_bytes, settings,
//     unix_ms
//   SnapshotStats: taken, waited, waited_ms, skipped, written, write_ms,
//     staging_bytes, pinned_bytes
#pragma once

#include <string>

#include "ftcomm/checkpoint_store.h"
#include "ftcomm/checkpointer.h"

namespace ftcomm {

std::string to_json(const RecoveryReport& report);
std::string to_json(const CommitRecord& record);
std::string to_json(const SnapshotStats& stats);

// "resumed from step S (a just-in-time commit), ...; rank-local state: ...; ..."
// or "fresh start"; `world_size` is this job's (a resize is named).
std::string resume_line(const RecoveryReport& report, int world_size);

}  // namespace ftcomm
