// Internal: the few file-system operations ftcomm needs, on POSIX calls.
//
// Not std::filesystem: the torch 2.11 wheel's libtorch.so exports its own copies
// of std::filesystem symbols, which the dynamic linker binds ahead of libstdc++'s,
// and std::filesystem::remove_all crashed (SIGSEGV at address 0) when called from
// a program linked against libtorch.
#pragma once

#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

namespace ftcomm::detail {

inline bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// mkdir -p; on failure returns false and sets *error to strerror.
inline bool make_dirs(const std::string& path, std::string* error) {
  std::string partial;
  for (size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || (path[i] == '/' && i > 0)) {
      partial = path.substr(0, i);
      if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
        if (error) *error = partial + ": " + std::strerror(errno);
        return false;
      }
    }
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    if (error) *error = path + ": not a directory";
    return false;
  }
  return true;
}

// Names of the entries of `dir` (not . or ..); empty when it cannot be read.
inline std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.emplace_back(e->d_name);
    }
    ::closedir(d);
  }
  return names;
}

// rm -rf; best effort.
inline void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); },
      16, FTW_DEPTH | FTW_PHYS);
}

}  // namespace ftcomm::detail
