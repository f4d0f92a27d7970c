// Which checkpoint store a rank uses on its node.
//
// Each node keeps its ranks' stores under one root (its own disk): ROOT/rank<R>.
// A rendezvous may number a node's workers anew (after a node was replaced or
// lost, torchrun orders the nodes afresh), so a node can come back as ranks whose
// stores it does not hold, while it holds stores of ranks it no longer runs.
// Those stores still hold the job's replicated state: rank_store_dir gives each
// of this node's ranks without a store of its own one of the node's leftover
// stores, renamed to its rank. The commits inside keep the rank that wrote them
// (CommitRecord::rank), so recovery knows whose rank-local state they hold.
#pragma once

#include <string>

namespace ftcomm {

struct RankStoreDir {
  std::string dir;       // ROOT/rank<R>
  int adopted_from = -1; // the rank whose store was renamed to dir; -1: none
};

// For rank `rank`, the local_rank-th of the node's local_world_size workers
// (torchrun gives a node's workers consecutive ranks; values that do not fit
// mean this rank alone). Every worker of a node
// may call it at once: the leftover stores (ranks not on this node now, in rank
// order) go to the ranks without a store (in rank order), pair by pair, whatever
// the order the workers run in.
RankStoreDir rank_store_dir(const std::string& root, int rank, int local_rank, int local_world_size);

}  // namespace ftcomm
