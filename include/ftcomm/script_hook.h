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
// (or -> Work: the hook returns its last collective, group.start_allreduce(...),
// and the bucket is done when it is; see HookWork)
//
// either as module-level functions in a .py file of TorchScript source (compiled
// here, at load time), or as methods (spec, params, forward) of a module saved with
// torch.jit.save (.pt) after torch.ops.load_library("libftcomm.so"), or by name
// from hooks_ts/. `state` holds one Dict[int, Tensor] (keyed by bucket index) per
// declared name; the hook mutates it in place.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

#include "ftcomm/hook_group.h"

namespace ftcomm {

using HookState = c10::Dict<std::string, c10::Dict<int64_t, at::Tensor>>;

// What one hook call gave: the bucket's result, and the collective still
// producing it when the hook returned a Work in flight (null otherwise).
struct HookOutput {
  at::Tensor tensor;
  c10::intrusive_ptr<HookWork> work;
};

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
  // The parameters as the hook sees them (a copy, sorted by name).
  std::map<std::string, double> params() const;
  // The [lo, hi] the hook declares for some of its parameters (ranges()).
  const std::map<std::string, std::pair<double, double>>& ranges() const { return ranges_; }
  // Sets parameter `key` from text; throws naming the known parameters, or the
  // declared range when the value is outside it.
  void set_param(const std::string& key, const std::string& value);

  // Runs the hook once on this thread; a Work it returns may still be in flight.
  // Not thread-safe: one caller at a time (ScriptCommHook serialises calls on
  // its worker).
  HookOutput start(const c10::intrusive_ptr<HookGroup>& group, const c10::intrusive_ptr<HookBucket>& bucket);
  // start(), then waits for the Work, if any: the bucket's result.
  at::Tensor run(const c10::intrusive_ptr<HookGroup>& group, const c10::intrusive_ptr<HookBucket>& bucket);

  // The hook's state: declared name -> bucket index -> tensor. Shared, not copied.
  HookState state() const { return state_; }
  // Drops every declared state entry of bucket `bucket` (the hook starts that
  // bucket afresh at its next call); how many were dropped.
  size_t reset_bucket(int64_t bucket);

 private:
  ScriptHook() = default;
  void check_param(const std::string& key, double value, const std::string& where) const;
  std::string name_, path_, digest_;
  std::vector<std::string> replicated_, local_;
  std::map<std::string, std::pair<double, double>> ranges_;
  std::set<std::string> whole_;  // parameters that take whole numbers only (ranges() [lo, hi, 1.0])
  std::function<c10::IValue(std::vector<c10::IValue>)> hook_;
  std::function<c10::IValue()> spec_fn_, params_fn_, ranges_fn_;
  std::shared_ptr<void> keep_alive_;  // the CompilationUnit or Module the functions live in
  HookState state_;
  c10::Dict<std::string, double> params_;  // passed to every call
  friend struct ScriptHookLoader;
};

// Where named hooks are looked up: $FTCOMM_HOOKS_DIR, else the source tree's or
// the installed hooks_ts/.
std::string hooks_dir();
std::vector<std::string> list_hooks();

}  // namespace ftcomm
