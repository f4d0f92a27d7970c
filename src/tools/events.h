// Internal to `ftcomm train`: structured events as JSON lines (--events FILE, or
// '-' for stderr), for programs that follow a run (the demo, the end-to-end
// tests) instead of reading the human progress text. Every rank of every attempt
// appends to the same file; each line is one write(2) to a file opened with
// O_APPEND, so lines never interleave. Each carries "event", "rank", "attempt"
// and "unix_ms".
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

namespace ftcomm::tools {

class EventLog {
 public:
  EventLog() = default;
  EventLog(const std::string& path, int rank, int64_t attempt) : rank_(rank), attempt_(attempt) {
    if (path.empty()) return;
    if (path == "-") {
      fd_ = STDERR_FILENO;
      return;
    }
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    owned_ = fd_ >= 0;
    TORCH_CHECK(fd_ >= 0, "--events '", path, "' cannot be opened for appending: ", std::strerror(errno));
  }
  EventLog(const EventLog&) = delete;
  EventLog& operator=(const EventLog&) = delete;
  ~EventLog() {
    if (owned_) ::close(fd_);
  }
  bool enabled() const { return fd_ >= 0; }

  // Writes `fields` plus the event's name, rank, attempt and time as one line.
  void emit(const std::string& event, nlohmann::json fields = nlohmann::json::object()) const {
    if (fd_ < 0) return;
    fields["event"] = event;
    fields["rank"] = rank_;
    fields["attempt"] = attempt_;
    fields["unix_ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    const std::string line = fields.dump() + "\n";
    // One write: the file is shared by every rank.
    if (::write(fd_, line.data(), line.size()) < 0) return;
  }

 private:
  int fd_ = -1;
  bool owned_ = false;
  int rank_ = 0;
  int64_t attempt_ = 0;
};

}  // namespace ftcomm::tools
