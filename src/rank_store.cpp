#include "ftcomm/rank_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <thread>

#include <c10/util/Exception.h>

#include "control.h"
#include "fsutil.h"
#include "log.h"

namespace ftcomm {
namespace {

using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

// The ranks of the stores under root ("rank<N>" directories), ascending.
std::vector<int> stored_ranks(const std::string& root) {
  std::vector<int> out;
  for (const std::string& name : detail::list_dir(root)) {
    if (name.size() < 5 || name.size() > 13 || name.compare(0, 4, "rank") != 0) continue;
    if (!std::all_of(name.begin() + 4, name.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    struct stat st {};
    if (::lstat((root + "/" + name).c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) continue;
    out.push_back(std::stoi(name.substr(4)));
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Which directory this is, as every rank on the same host sees it.
std::string root_identity(const std::string& root) {
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  struct stat st {};
  ::stat(root.c_str(), &st);
  return std::string(host) + ":" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
}

// The process holding the store's RocksDB lock (a writer has it open), or 0.
pid_t lock_holder(const std::string& store) {
  const int fd = ::open((store + "/LOCK").c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return 0;
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  const bool held = ::fcntl(fd, F_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
  ::close(fd);
  return held ? fl.l_pid : 0;
}

// The leader's work: under the root's lock file, rename leftovers to the
// sharing ranks that lack a store. Returns "new old;..." or throws.
std::string take_over_leftovers(const std::string& root, const std::vector<int>& sharing) {
  const std::string lock_path = root + "/.ftcomm-stores.lock";
  const int lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  TORCH_CHECK(lock >= 0, "cannot open ", lock_path, ": ", std::strerror(errno),
              ". Check that the checkpoint directory is writable");
  // Another job on the same root holds it only for the few renames it makes.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (::flock(lock, LOCK_EX | LOCK_NB) != 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::close(lock);
      TORCH_CHECK(false, "another process has held ", lock_path,
                  " for 60 s; is another job using this checkpoint directory? Give each job its own");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::string out, error;
  for (const auto& [to, from] : pair_leftover_stores(stored_ranks(root), sharing)) {
    const std::string source = root + "/rank" + std::to_string(from), target = root + "/rank" + std::to_string(to);
    if (const pid_t pid = lock_holder(source)) {
      error = "checkpoint store " + source + " is open in process " + std::to_string(pid) +
              ", not of this job's ranks on this directory, so it cannot be taken over as rank " + std::to_string(to) +
              "'s. Is another job, or another node's agent that does not share this rendezvous, using " + root +
              "? Give each job its own checkpoint directory";
      break;
    }
    if (std::rename(source.c_str(), target.c_str()) != 0) {
      error = "cannot rename the checkpoint store " + source + " to " + target + ": " + std::strerror(errno) +
              ". Check the permissions of " + root;
      break;
    }
    out += std::to_string(to) + " " + std::to_string(from) + ";";
  }
  ::flock(lock, LOCK_UN);
  ::close(lock);
  TORCH_CHECK(error.empty(), error);
  return out;
}

}  // namespace

std::map<int, int> pair_leftover_stores(const std::vector<int>& stored, const std::vector<int>& sharing) {
  std::vector<int> leftover, missing;
  for (int r : stored) {
    if (std::find(sharing.begin(), sharing.end(), r) == sharing.end()) leftover.push_back(r);
  }
  for (int r : sharing) {
    if (std::find(stored.begin(), stored.end(), r) == stored.end()) missing.push_back(r);
  }
  std::sort(leftover.begin(), leftover.end());
  std::sort(missing.begin(), missing.end());
  std::map<int, int> out;
  for (size_t i = 0; i < leftover.size() && i < missing.size(); ++i) out[missing[i]] = leftover[i];
  return out;
}

RankStoreDir rank_store_dir(const Group& pg, const std::string& root) {
  const int rank = pg->getRank();
  RankStoreDir out;
  out.dir = root + "/rank" + std::to_string(rank);
  std::string error;
  if (!detail::make_dirs(root, &error)) {
    error = "cannot create the checkpoint directory " + root + " (" + error +
            "). Choose a writable --ckpt (in Python: FaultTolerant's ckpt_dir)";
  }
  // Which ranks share this root: they see each other's stores, never leftovers.
  const auto roots = control::allgather_bytes(pg, error.empty() ? root_identity(root) : std::string());
  std::vector<int> sharing;
  for (int r = 0; r < static_cast<int>(roots.size()); ++r) {
    if (error.empty() && roots[static_cast<size_t>(r)] == roots[static_cast<size_t>(rank)]) sharing.push_back(r);
  }
  std::string renames;
  if (error.empty() && sharing.front() == rank) {
    try {
      renames = take_over_leftovers(root, sharing);
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    }
  }
  // Every rank learns its leader's renames, and any rank's refusal stops all.
  const auto all = control::allgather_bytes(pg, error.empty() ? renames : std::string());
  control::throw_if_any(pg, error);
  std::istringstream in(all[static_cast<size_t>(sharing.front())]);
  int to = -1, from = -1;
  char sep = 0;
  while (in >> to >> from >> sep) {
    if (to != rank) continue;
    out.adopted_from = from;
    detail::log_line("ftcomm: rank " + std::to_string(rank) + " takes over " + root + "/rank" + std::to_string(from) +
                     " as " + out.dir + " (this disk held rank " + std::to_string(from) +
                     "'s store, and no rank of this job uses that number here now)");
  }
  return out;
}

}  // namespace ftcomm
