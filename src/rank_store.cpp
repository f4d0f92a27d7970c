#include "ftcomm/rank_store.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <vector>

#include <c10/util/Exception.h>

#include "log.h"

namespace ftcomm {
namespace {

namespace fs = std::filesystem;

// The ranks of the stores under root ("rank<N>" directories), ascending.
std::vector<int> stored_ranks(const fs::path& root) {
  std::vector<int> out;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() < 5 || name.compare(0, 4, "rank") != 0) continue;
    if (!std::all_of(name.begin() + 4, name.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    if (name.size() > 13 || !it->is_directory(ec)) continue;
    out.push_back(std::stoi(name.substr(4)));
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

RankStoreDir rank_store_dir(const std::string& root, int rank, int local_rank, int local_world_size) {
  // A launcher that sets LOCAL_RANK without LOCAL_WORLD_SIZE (or values that do
  // not fit): this rank alone on its node.
  if (local_rank < 0 || local_rank >= local_world_size || local_rank > rank) {
    local_rank = 0;
    local_world_size = 1;
  }
  const fs::path base(root);
  RankStoreDir out;
  out.dir = (base / ("rank" + std::to_string(rank))).string();
  const int first = rank - local_rank, count = std::max(1, local_world_size);
  auto on_node = [&](int r) { return r >= first && r < first + count; };
  // A peer's rename can change the listing between two looks; the pairing stays
  // the same (each rename moves one leftover to its pair), so a few tries settle.
  for (int attempt = 0; attempt < 8; ++attempt) {
    std::error_code ec;
    if (fs::exists(out.dir, ec)) return out;
    const std::vector<int> stored = stored_ranks(base);
    std::vector<int> leftover, missing;
    for (int r : stored) {
      if (!on_node(r)) leftover.push_back(r);
    }
    for (int r = first; r < first + count; ++r) {
      if (!std::binary_search(stored.begin(), stored.end(), r)) missing.push_back(r);
    }
    const auto at = std::find(missing.begin(), missing.end(), rank) - missing.begin();
    if (at >= static_cast<long>(leftover.size())) return out;  // nothing to adopt: a new store
    const int from = leftover[static_cast<size_t>(at)];
    const fs::path source = base / ("rank" + std::to_string(from));
    if (std::rename(source.c_str(), out.dir.c_str()) == 0) {
      out.adopted_from = from;
      detail::log_line("ftcomm: rank " + std::to_string(rank) + " takes over " + source.string() + " as " + out.dir +
                       " (this node held rank " + std::to_string(from) +
                       "'s store; the rendezvous numbered its workers anew)");
      return out;
    }
    if (errno != ENOENT && errno != EEXIST && errno != ENOTEMPTY) {
      TORCH_CHECK(false, "cannot rename the checkpoint store ", source.string(), " to ", out.dir, ": ",
                  std::strerror(errno), ". Check the permissions of ", root);
    }
  }
  return out;
}

}  // namespace ftcomm
