// The errors a caller may want to tell apart: a hook failure the ranks agreed on
// (HookError), a resume refused before anything changed (ResumeRefused), and a
// checkpoint store that cannot be used (StoreError). Each is a c10::Error, as
// TORCH_CHECK throws, so code that catches c10::Error or std::exception keeps
// working; what() is the whole message, the accessors its parts. The Python
// package raises them as ftcomm.HookError, ftcomm.ResumeRefused and
// ftcomm.StoreError (RuntimeError subclasses).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

namespace ftcomm {

// What every rank knows of a hook failure. rank and bucket are -1 where the
// failure is not one rank's (the ranks could not agree, a peer's process died,
// the communicator was aborted).
struct HookFailure {
  std::string message;  // the whole error, as every rank reports it
  std::string hook;     // the hook's name
  int64_t rank = -1;    // the rank whose hook failed (or was stuck)
  int64_t bucket = -1;  // the bucket it failed in
  bool stuck = false;   // did not return within its deadline (else: threw or returned a bad result)
};

class HookError : public c10::Error {
 public:
  explicit HookError(HookFailure failure);
  const HookFailure& failure() const { return failure_; }

 private:
  HookFailure failure_;
};

// Resuming would have restored a checkpoint that does not fit (other settings,
// another model, another hook, another trainer); nothing was discarded or written.
// settings() names the settings that differ, where that was the reason.
class ResumeRefused : public c10::Error {
 public:
  ResumeRefused(std::string message, int64_t step, std::vector<std::string> settings = {});
  int64_t step() const { return step_; }
  const std::vector<std::string>& settings() const { return settings_; }

 private:
  int64_t step_;
  std::vector<std::string> settings_;
};

// A checkpoint store that cannot be opened, read or written. code() is the
// StoreStatus code's name: NotFound, Corruption, IOError, InvalidArgument, Busy
// (another process holds it) or Incompatible (another job, rank or format).
class StoreError : public c10::Error {
 public:
  StoreError(std::string message, std::string code);
  const std::string& code() const { return code_; }

 private:
  std::string code_;
};

}  // namespace ftcomm
