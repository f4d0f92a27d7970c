// Scripted DDP communication hooks: TorchScript functions that c10d::Reducer runs
// in C++, with no Python and no GIL. A new hook deploys by pointing at a file.
//
// The hook contract (hooks_ts/README.md has it in full): a hook is TorchScript that
// provides three functions,
//
//   def spec() -> Dict[str, List[str]]       # {"replicated": [...], "local": [...]}
//   def params() -> Dict[str, float]          # parameters and their defaults
//   def ranges() -> Dict[str, List[float]]    # optional: [lo, hi] a parameter must lie in
//   def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float],
//            group: Group, bucket: Bucket) -> Tensor
//
// either as module-level functions in a .py file of TorchScript source (compiled
// here, at load time), or as methods (spec, params, forward) of a module saved with
// torch.jit.save (.pt) after torch.ops.load_library("libftcomm.so"), or by name
// from hooks_ts/. `state` holds one Dict[int, Tensor] (keyed by bucket index) per
// declared name; the hook mutates it in place.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/custom_class.h>

namespace ftcomm {

// What a hook sees of the group, as TorchScript class ftcomm.Group. Collectives
// are synchronous inside the hook (class_ methods cannot return a Future); hooks
// run on ScriptCommHook's worker thread, never on the autograd thread.
//
// Guarded mode (ScriptCommHook's per-bucket agreement): before each collective the
// ranks exchange one control value (a 1-element MAX allreduce), and a rank whose
// hook failed sends its failure there instead. So when a hook fails on some ranks
// only, at any point, every rank learns it at the same control exchange and no
// rank is left waiting in a collective the others never join.
class HookGroup : public torch::CustomClassHolder {
 public:
  explicit HookGroup(c10::intrusive_ptr<c10d::ProcessGroup> pg) : pg_(std::move(pg)) {}
  int64_t rank() const { return pg_->getRank(); }
  int64_t world_size() const { return pg_->getSize(); }
  at::Tensor allreduce(at::Tensor tensor);                   // sum, in place; returns it
  std::vector<at::Tensor> allgather(at::Tensor tensor);      // one tensor per rank
  at::Tensor broadcast(at::Tensor tensor, int64_t root);     // in place; returns it

  // For ScriptCommHook: start a bucket in guarded mode; exchange this rank's
  // verdict (0 = ok, else encode_verdict()) unless the bucket is already decided;
  // and the decision: 0 when every rank was fine, else the largest verdict.
  void begin_guarded();
  int64_t conclude(int64_t verdict);
  // For ScriptCommHook's watchdog, when this rank's hook call passed its
  // deadline: unless the hook is inside one of its collectives (which have their
  // own deadline), stops the hook from starting any further collective and, in
  // guarded mode, concludes the bucket with `verdict` for it. False when the hook
  // is inside a collective (try again later).
  bool try_abandon(int64_t verdict, int64_t* decision);
  // Verdicts: a hook that failed (threw, bad result) or that did not return in time.
  enum class Failure { kError = 0, kStuck = 1 };
  int64_t encode_verdict(Failure why) const { return 1 + rank() + world_size() * static_cast<int64_t>(why); }
  Failure failure_of(int64_t decision) const { return static_cast<Failure>((decision - 1) / world_size()); }
  int64_t rank_of(int64_t decision) const { return (decision - 1) % world_size(); }
  // Whether this bucket was stopped at a control exchange because another rank
  // had failed (this rank's hook then saw an error it did not cause).
  bool stopped_by_peer() const { return stopped_by_peer_; }

 private:
  // Takes op_mutex_ for one collective (with its control exchange).
  std::unique_lock<std::mutex> begin_collective();
  void control_before_collective();
  int64_t exchange(int64_t value);
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::mutex op_mutex_;     // held by the worker during each collective
  bool abandoned_ = false;  // the watchdog gave up on this hook call
  bool guarded_ = false;
  int64_t decision_ = -1;  // -1: undecided
  bool stopped_by_peer_ = false;
};

// What a hook sees of a gradient bucket, as TorchScript class ftcomm.Bucket.
class HookBucket : public torch::CustomClassHolder {
 public:
  HookBucket(at::Tensor buffer, int64_t index, bool is_last, std::vector<int64_t> offsets,
             std::vector<int64_t> lengths, std::vector<std::vector<int64_t>> sizes)
      : buffer_(std::move(buffer)), index_(index), is_last_(is_last), offsets_(std::move(offsets)),
        lengths_(std::move(lengths)), sizes_(std::move(sizes)) {}
  static c10::intrusive_ptr<HookBucket> from(c10d::GradBucket& bucket);
  at::Tensor buffer() const { return buffer_; }
  int64_t index() const { return index_; }
  bool is_last() const { return is_last_; }
  std::vector<int64_t> offsets() const { return offsets_; }
  std::vector<int64_t> lengths() const { return lengths_; }
  std::vector<std::vector<int64_t>> sizes() const { return sizes_; }

 private:
  at::Tensor buffer_;
  int64_t index_;
  bool is_last_;
  std::vector<int64_t> offsets_, lengths_;
  std::vector<std::vector<int64_t>> sizes_;
};

using HookState = c10::Dict<std::string, c10::Dict<int64_t, at::Tensor>>;

// A loaded hook: its code, digest, declared state and parameters.
class ScriptHook {
 public:
  // Loads `file_or_name`: a path ending in .pt or .py, or the name of a hook in
  // hooks_dir(). Throws c10::Error naming the file and what is wrong: not found,
  // a syntax error (with its line), a missing spec/params/hook, a wrong signature
  // or state declaration, or a file that is not a hook.
  static std::shared_ptr<ScriptHook> load(const std::string& file_or_name);

  const std::string& name() const { return name_; }
  const std::string& path() const { return path_; }
  // SHA-256 (hex) of the hook file's bytes.
  const std::string& digest() const { return digest_; }
  const std::vector<std::string>& replicated_state() const { return replicated_; }
  const std::vector<std::string>& local_state() const { return local_; }
  const std::map<std::string, double>& params() const { return params_; }
  // The [lo, hi] the hook declares for some of its parameters (ranges()).
  const std::map<std::string, std::pair<double, double>>& ranges() const { return ranges_; }
  // Sets parameter `key` from text; throws naming the known parameters, or the
  // declared range when the value is outside it.
  void set_param(const std::string& key, const std::string& value);

  // Runs the hook once, synchronously, on this thread. Not thread-safe: one
  // caller at a time (ScriptCommHook serialises calls on its worker).
  at::Tensor run(const c10::intrusive_ptr<HookGroup>& group, const c10::intrusive_ptr<HookBucket>& bucket);

  // The hook's state: declared name -> bucket index -> tensor. Shared, not copied.
  HookState state() const { return state_; }

 private:
  ScriptHook() = default;
  void check_param(const std::string& key, double value, const std::string& where) const;
  std::string name_, path_, digest_;
  std::vector<std::string> replicated_, local_;
  std::map<std::string, double> params_;
  std::map<std::string, std::pair<double, double>> ranges_;
  std::function<c10::IValue(std::vector<c10::IValue>)> hook_;
  std::function<c10::IValue()> spec_fn_, params_fn_, ranges_fn_;
  std::shared_ptr<void> keep_alive_;  // the CompilationUnit or Module the functions live in
  HookState state_;
  c10::Dict<std::string, double> params_dict_;
  friend struct ScriptHookLoader;
};

// Where named hooks are looked up: $FTCOMM_HOOKS_DIR, else the source tree's or
// the installed hooks_ts/.
std::string hooks_dir();
std::vector<std::string> list_hooks();

std::string sha256_hex(const std::string& bytes);

enum class OnHookError { kFail, kFallback };

struct ScriptCommHookOptions {
  // After every bucket all ranks agree (one small allreduce) on whether each
  // rank's hook ran and returned a finite tensor of the bucket's shape, dtype and
  // device, so a bad result never leaves ranks out of step. Then either every rank
  // fails with the same error (kFail) or every rank replaces the bucket's result
  // with a plain mean allreduce of the original gradients (kFallback, which keeps
  // a copy of each bucket) and logs it once.
  bool agree_per_bucket = true;
  // Also treat a result with NaN or Inf as a failure. A full pass over every
  // bucket (it took a 50 MB model's step from 121 to 183 ms on this project's
  // 2-core CI machine), so off in training and on in `ftcomm hook check`; a non-finite
  // result does not desync ranks by itself.
  bool check_finite = false;
  OnHookError on_error = OnHookError::kFail;
  // A hook call that has not returned after this long fails its bucket: with the
  // agreement on, on every rank at once, naming the hook and the stuck rank
  // (whatever on_error says: the stuck thread cannot be stopped, so this hook
  // object takes no further buckets and the process should exit). Keep it below
  // the group's timeout, so that peers waiting at the agreement hear of it before
  // their own wait ends (ftcomm train uses half of --timeout). Zero: unbounded.
  std::chrono::milliseconds hook_timeout{std::chrono::seconds(30)};
};

// A ScriptHook registered with c10d::Reducer::register_comm_hook. runHook copies
// what it needs of the bucket and returns at once; the hook runs on this object's
// one worker thread, in bucket order, so collectives stay matched across ranks.
class ScriptCommHook : public c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>> {
 public:
  ScriptCommHook(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::shared_ptr<ScriptHook> hook,
                 ScriptCommHookOptions options = {});
  ~ScriptCommHook() override;
  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override;
  const std::shared_ptr<ScriptHook>& hook() const { return hook_; }
  int64_t fallbacks() const;
  // Seconds the worker has spent running the hook (its compute and collectives).
  double busy_seconds() const;

 private:
  struct Worker;
  std::shared_ptr<ScriptHook> hook_;
  std::shared_ptr<Worker> worker_;  // shared with its threads: a stuck one outlives this object
};

// All ranks compare the hook's digest before the first step: throws on every rank,
// naming the ranks and both digests, on a mismatch; and when `pinned` is not
// empty, refuses a digest that is not in it.
void agree_on_hook(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const ScriptHook& hook,
                   const std::vector<std::string>& pinned = {});

}  // namespace ftcomm

namespace ftcomm {

// A c10d::GradBucket over `buffer` holding gradients of `shapes` back to back, for
// hook checks, benchmarks and tests. Owns the sizes GradBucket only refers to.
struct SyntheticBucket {
  SyntheticBucket(at::Tensor buffer, std::vector<std::vector<int64_t>> shapes, size_t index = 0, size_t count = 1);
  SyntheticBucket(const SyntheticBucket&) = delete;
  SyntheticBucket& operator=(const SyntheticBucket&) = delete;
  std::vector<std::vector<int64_t>> shapes;
  std::unique_ptr<c10d::GradBucket> bucket;
};

struct HookCheckOptions {
  int world_size = 2;
  int64_t numel = 1 << 14;  // elements per synthetic bucket
  int steps = 3;            // steps of 3 buckets each
  std::vector<std::pair<std::string, std::string>> params;  // --hook-arg k=v
  std::chrono::milliseconds hook_timeout{std::chrono::seconds(30)};  // per hook call
};

// The largest --numel hook check takes (1 GiB of float32 per synthetic bucket).
constexpr int64_t kMaxHookCheckNumel = int64_t(1) << 28;

struct HookCheckReport {
  std::string name, path, digest;
  std::vector<std::string> replicated, local;
  std::map<std::string, double> params;
  int64_t buckets_checked = 0;
};

// `ftcomm hook check`: loads the hook (signature and state declaration checked),
// then runs it on synthetic buckets over a real Gloo group of `world_size` ranks
// (threads of this process) and checks every output's shape, dtype, device and
// finiteness. Throws c10::Error naming the hook and the first problem found.
HookCheckReport check_hook(const std::string& file_or_name, const HookCheckOptions& options);

}  // namespace ftcomm
