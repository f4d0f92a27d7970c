// Which checkpoint store a rank uses.
//
// Each node keeps its ranks' stores under one root (its own disk): ROOT/rank<R>.
// A rendezvous may number a node's workers anew (after a node was replaced or
// lost, torchrun orders the nodes afresh), so a node can come back as ranks whose
// stores it does not hold, while it holds stores of ranks it no longer runs.
// Those stores still hold the job's replicated state: rank_store_dir gives each
// rank without a store of its own one of the leftover stores, renamed to its
// rank. The commits inside keep the rank that wrote them (CommitRecord::rank), so
// recovery knows whose rank-local state they hold.
//
// Which stores are leftovers is decided by all ranks together: the ranks that
// share a root (the same directory on the same host: several torchrun agents on
// one disk, or a launcher that does not say which ranks share a node) see each
// other's stores as their own, never as leftovers, and only stores of ranks that
// no longer use the root are taken over.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace ftcomm {

struct RankStoreDir {
  std::string dir;       // ROOT/rank<R>
  int adopted_from = -1; // the rank whose store was renamed to dir; -1: none
};

// Collective over `pg`: this rank's store directory under `root` (created if
// missing). Of the ranks that share `root`, the lowest one, holding a lock file in
// root, renames each leftover store (a rank not among them, in rank order) to a
// sharing rank without a store (in rank order). A leftover store still in use by
// another process (its RocksDB LOCK held) is refused on every rank, naming it and
// the fix; so is a root that cannot be created. Nothing is renamed on a fresh
// start or when every sharing rank has its store.
RankStoreDir rank_store_dir(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const std::string& root);

// The pairing alone (no file system): leftover stores, i.e. `stored` ranks not in
// `sharing`, to the ranks of `sharing` not in `stored`, both in rank order.
// Returns new rank -> old rank.
std::map<int, int> pair_leftover_stores(const std::vector<int>& stored, const std::vector<int>& sharing);

}  // namespace ftcomm
