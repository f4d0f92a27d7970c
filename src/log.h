// Internal: one line to stderr in one write(2), so lines of ranks that share a
// terminal or a pipe (torchrun's) never interleave mid-line.
#pragma once

#include <unistd.h>

#include <cerrno>
#include <string>

namespace ftcomm::detail {

inline void log_line(std::string line) {
  if (line.empty() || line.back() != '\n') line += '\n';
  const char* p = line.data();
  size_t n = line.size();
  while (n > 0) {
    const ssize_t w = ::write(STDERR_FILENO, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace ftcomm::detail
