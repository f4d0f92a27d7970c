// ftcomm._C: the C++ library for PyTorch's own DistributedDataParallel. Built
// with torch's bundled pybind11, so that c10d's Python types (ProcessGroup,
// Store, Reducer) cross as themselves. The Python layer (ftcomm/*.py) is the
// documented surface; these bindings stay small.
#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/csrc/utils/pybind.h>

#include "ftcomm/bucket_layout.h"
#include "ftcomm/checkpointer.h"
#include "ftcomm/ddp.h"
#include "ftcomm/hook_check.h"
#include "ftcomm/just_in_time.h"
#include "ftcomm/process_group.h"
#include "ftcomm/rank_store.h"
#include "ftcomm/script_comm_hook.h"
#include "ftcomm/script_hook.h"

namespace py = pybind11;
using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

namespace ftcomm {
namespace {

std::chrono::milliseconds millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

// A scripted hook for one PyTorch DDP model: the loaded hook (its code, digest,
// parameters and state) and the Reducer it runs in. The Reducer owns the
// ScriptCommHook; this keeps the Reducer alive so the pointer stays valid.
class PyHook {
 public:
  PyHook(Group pg, std::shared_ptr<ScriptHook> hook, ScriptCommHookOptions options)
      : pg_(std::move(pg)), hook_(std::move(hook)), options_(options) {}

  void attach(std::shared_ptr<c10d::Reducer> reducer) {
    TORCH_CHECK(!reducer_, "this hook is already registered on a model; load it again for another model");
    auto comm = std::make_unique<ScriptCommHook>(pg_, hook_, options_);
    const ScriptCommHook* raw = comm.get();
    {
      py::gil_scoped_release release;
      reducer->register_comm_hook(std::move(comm));
    }
    comm_ = raw;
    reducer_ = std::move(reducer);
  }

  const std::shared_ptr<ScriptHook>& hook() const { return hook_; }
  int64_t fallbacks() const { return comm_ ? comm_->fallbacks() : 0; }
  double busy_seconds() const { return comm_ ? comm_->busy_seconds() : 0.0; }
  // The agreement in force ("auto" until the first bucket shows its device).
  std::string agreement() const {
    return hook_agreement_name(comm_ ? comm_->agreement() : options_.agreement);
  }

 private:
  Group pg_;
  std::shared_ptr<ScriptHook> hook_;
  ScriptCommHookOptions options_;
  std::shared_ptr<c10d::Reducer> reducer_;
  const ScriptCommHook* comm_ = nullptr;  // owned by reducer_
};

std::shared_ptr<PyHook> load_hook(const Group& pg, const std::string& file_or_name,
                                  const std::map<std::string, std::string>& params,
                                  const std::vector<std::string>& pins, const std::string& on_error,
                                  double hook_timeout_s, const std::string& agreement) {
  TORCH_CHECK(on_error == "fail" || on_error == "fallback", "on_error must be 'fail' or 'fallback', got '", on_error,
              "'");
  TORCH_CHECK(hook_timeout_s >= 0 && hook_timeout_s < 1e9, "hook_timeout must be 0 (unbounded) or positive seconds "
              "below 1e9, got ", hook_timeout_s);
  std::shared_ptr<ScriptHook> hook;
  {
    py::gil_scoped_release release;
    hook = ScriptHook::load(file_or_name);
    for (const auto& [k, v] : params) hook->set_param(k, v);
    agree_on_hook(pg, *hook, pins);
  }
  ScriptCommHookOptions options;
  options.on_error = on_error == "fail" ? OnHookError::kFail : OnHookError::kFallback;
  options.hook_timeout = millis(hook_timeout_s);
  options.agreement = parse_hook_agreement(agreement);
  return std::make_shared<PyHook>(pg, std::move(hook), options);
}

// The trainer's state as the Python layer hands it over, and back.
struct PyState {
  std::vector<at::Tensor> parameters, buffers, objects, rank_local;
  std::shared_ptr<PyHook> hook;
  TrainingState view() const {
    TrainingState s;
    s.parameters = parameters;
    s.buffers = buffers;
    s.objects = objects;
    s.rank_local = rank_local;
    if (hook) s.hook = hook->hook();
    return s;
  }
};

py::dict report_dict(const RecoveryReport& r) {
  py::dict d;
  d["resumed_from_step"] = r.resumed_from_step;
  d["newest_snapshot_step"] = r.newest_snapshot_step;
  d["data_position"] = r.data_position;
  d["discarded_steps"] = r.discarded_steps;
  d["changed_settings"] = r.changed_settings;
  d["agreement_ms"] = r.agreement_ms;
  d["load_ms"] = r.load_ms;
  d["resync_ms"] = r.resync_ms;
  d["resync_bytes"] = r.resync_bytes;
  d["resynced_ranks"] = r.resynced_ranks;
  d["local_state"] = r.local_state;
  d["newest_step"] = r.newest_step;
  d["steps_lost"] = r.steps_lost;
  d["resumed_just_in_time"] = r.resumed_just_in_time;
  d["policy"] = r.policy;
  d["local_state_reset"] = r.local_state_reset;
  d["resumed_world_size"] = r.resumed_world_size;
  return d;
}

// Recovery and commits for a PyTorch DDP model: Checkpointer with the model's
// own Reducer, which a resume re-buckets to the agreed stored layout.
class PyCheckpointer {
 public:
  PyCheckpointer(Group pg, CheckpointerOptions options, bool jit, JustInTimeOptions jit_options)
      : pg_(pg), jit_enabled_(jit), jit_options_(std::move(jit_options)) {
    py::gil_scoped_release release;
    impl_ = std::make_unique<Checkpointer>(std::move(pg), std::move(options));
  }
  ~PyCheckpointer() {
    py::gil_scoped_release release;
    jit_.reset();
    impl_.reset();
  }

  // Returns (report, objects, rank_local): parameters and buffers are filled in
  // place; objects and rank-local state come back as new tensors.
  py::tuple resume(const PyState& state, const std::shared_ptr<c10d::Reducer>& reducer) {
    TrainingState s = state.view();
    RecoveryReport report;
    {
      py::gil_scoped_release release;
      impl_->prepare_recovery(s);
      buddy_stride_ = s.buddy_stride;  // every later view carries it
      std::vector<std::vector<size_t>> buckets;
      const auto current = bucket_indices(bucket_layout_of(*reducer, s.parameters));
      report = impl_->finish_recovery(s, current, &buckets);
      if (report.resumed_from_step >= 0 && buckets != current) reducer->initialize_buckets(buckets);
      if (jit_enabled_ && impl_->store() != nullptr) jit_ = std::make_unique<JustInTime>(pg_, impl_.get(), jit_options_);
    }
    return py::make_tuple(report_dict(report), s.objects, s.rank_local);
  }

  // Just in time: the optimizer step begins; step `step` finished (its state);
  // a failure on this thread (saves the last finished step).
  void begin_update(const std::vector<at::Tensor>& rank_local) {
    if (!jit_) return;
    py::gil_scoped_release release;
    jit_->begin_update(rank_local);
  }
  void step_finished(int64_t step, const PyState& state, const std::shared_ptr<c10d::Reducer>& reducer,
                     int64_t data_position) {
    if (!jit_) return;
    TrainingState s = state.view();
    s.buddy_stride = buddy_stride_;
    py::gil_scoped_release release;
    jit_->step_finished(step, s, *reducer, data_position);
  }
  bool save_just_in_time(const std::string& reason) {
    if (!jit_) return false;
    py::gil_scoped_release release;
    return jit_->save(reason);
  }
  bool jit_active() const { return jit_ != nullptr; }
  // No step counts as stalled while paused (FaultTolerant.paused()).
  void pause_watch(bool pause) {
    if (!jit_) return;
    if (pause) {
      jit_->pause();
    } else {
      jit_->resume();
    }
  }
  // The front-end restored everything: drop what the resume left behind.
  void accept() {
    py::gil_scoped_release release;
    impl_->accept_recovery();
  }
  bool commit_last(int64_t step, const PyState& state, const std::shared_ptr<c10d::Reducer>& reducer,
                   int64_t data_position) {
    TrainingState s = state.view();
    s.buddy_stride = buddy_stride_;
    py::gil_scoped_release release;
    return impl_->commit_last(step, s, *reducer, data_position);
  }
  // Ends just-in-time saving (the SIGTERM handler goes back to the previous one).
  void stop_just_in_time() {
    py::gil_scoped_release release;
    jit_.reset();
  }

  bool commit(int64_t step, const PyState& state, const std::shared_ptr<c10d::Reducer>& reducer,
              int64_t data_position) {
    if (!impl_->due(step)) return false;
    TrainingState s = state.view();
    s.buddy_stride = buddy_stride_;
    py::gil_scoped_release release;
    return impl_->commit(step, s, *reducer, data_position);
  }

  bool due(int64_t step) const { return impl_->due(step); }
  void flush() {
    py::gil_scoped_release release;
    impl_->flush();
  }
  std::vector<py::dict> commits() {
    std::vector<py::dict> out;
    if (impl_->store() == nullptr) return out;
    std::vector<CommitRecord> records;
    check(impl_->store()->ListCommits(&records));
    for (const auto& r : records) {
      py::dict d;
      d["step"] = r.step;
      d["world_size"] = r.world_size;
      d["data_position"] = r.data_position;
      d["hook_digest"] = r.hook_digest;
      d["layout"] = signature_hex(r.layout_signature);
      d["has_snapshot"] = r.has_snapshot;
      d["blob_bytes"] = r.blob_bytes;
      d["settings"] = r.settings;
      d["just_in_time"] = r.just_in_time;
      d["jit_reason"] = r.jit_reason;
      out.push_back(d);
    }
    return out;
  }

 private:
  Group pg_;
  bool jit_enabled_;
  JustInTimeOptions jit_options_;
  std::unique_ptr<Checkpointer> impl_;
  std::unique_ptr<JustInTime> jit_;  // from resume() on, when enabled
  int buddy_stride_ = 1;            // TrainingState::buddy_stride, as resume() set it
};

}  // namespace
}  // namespace ftcomm

PYBIND11_MODULE(_C, m) {
  using namespace ftcomm;
  m.doc() = "ftcomm's C++ library for PyTorch DDP (use the ftcomm package, not this module)";
  m.attr("__version__") = FTCOMM_VERSION;

  m.def(
      "torchrun_store",
      [](double timeout_s) {
        ProcessGroupOptions o = process_group_options_from_env();
        o.timeout = millis(timeout_s);
        c10::intrusive_ptr<c10d::Store> store;
        {
          py::gil_scoped_release release;
          store = make_store(o);
        }
        return py::make_tuple(store, o.rank, o.world_size, o.local_rank, o.restart_count, o.master_addr);
      },
      py::arg("timeout_s"),
      "The store of torchrun's environment, keys namespaced by restart count: "
      "(store, rank, world_size, local_rank, restart_count, master_addr).");
  m.def(
      "agree_nccl_usable",
      [](const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, const std::string& local_failure,
         int device) {
        py::gil_scoped_release release;
        return agree_nccl_usable(*store, rank, world, local_failure, device);
      },
      py::arg("store"), py::arg("rank"), py::arg("world_size"), py::arg("local_failure"), py::arg("device"));

  py::class_<PyHook, std::shared_ptr<PyHook>>(m, "Hook")
      .def("attach", &PyHook::attach)
      .def_property_readonly("name", [](const PyHook& h) { return h.hook()->name(); })
      .def_property_readonly("path", [](const PyHook& h) { return h.hook()->path(); })
      .def_property_readonly("digest", [](const PyHook& h) { return h.hook()->digest(); })
      .def_property_readonly("params", [](const PyHook& h) { return h.hook()->params(); })
      .def_property_readonly("replicated_state", [](const PyHook& h) { return h.hook()->replicated_state(); })
      .def_property_readonly("local_state", [](const PyHook& h) { return h.hook()->local_state(); })
      .def_property_readonly("fallbacks", &PyHook::fallbacks)
      .def_property_readonly("busy_seconds", &PyHook::busy_seconds)
      .def_property_readonly("agreement", &PyHook::agreement);
  m.def("load_hook", &load_hook, py::arg("pg"), py::arg("hook"), py::arg("params"), py::arg("pins"),
        py::arg("on_error"), py::arg("hook_timeout_s"), py::arg("agreement"));
  m.def("list_hooks", &list_hooks);
  m.def(
      "rank_store_dir",
      [](const Group& pg, const std::string& root) {
        py::gil_scoped_release release;
        return rank_store_dir(pg, root).dir;
      },
      py::arg("pg"), py::arg("root"),
      "Collective: this rank's store under root: root/rank<R>, or a leftover store of a rank that no longer uses "
      "this directory, renamed to it (the rendezvous numbered the ranks anew).");
  m.def("hooks_dir", &hooks_dir);

  py::class_<PyState>(m, "State")
      .def(py::init<>())
      .def_readwrite("parameters", &PyState::parameters)
      .def_readwrite("buffers", &PyState::buffers)
      .def_readwrite("objects", &PyState::objects)
      .def_readwrite("rank_local", &PyState::rank_local)
      .def_readwrite("hook", &PyState::hook);

  py::class_<PyCheckpointer>(m, "Checkpointer")
      .def(py::init([](const Group& pg, const std::string& dir, const std::string& job_id, int commit_every,
                       int keep_snapshots, const std::map<std::string, std::string>& settings,
                       const std::set<std::string>& allow, bool jit, const std::string& policy,
                       double stall_timeout_s, double update_grace_s) {
             TORCH_CHECK(policy == "exact" || policy == "reset", "jit_policy must be 'exact' or 'reset', got '", policy,
                         "'");
             TORCH_CHECK(stall_timeout_s >= 0 && stall_timeout_s < 1e9, "stall_timeout must be 0 (none) or "
                         "positive seconds below 1e9, got ", stall_timeout_s);
             TORCH_CHECK(update_grace_s >= 0 && update_grace_s < 1e9, "update_grace must be 0 or more seconds, "
                         "below 1e9, got ", update_grace_s);
             JustInTimeOptions jo;
             jo.stall_timeout = millis(stall_timeout_s);
             jo.update_grace = millis(update_grace_s);
             CheckpointerOptions o;
             o.local_state_policy = policy == "exact" ? LocalStatePolicy::kExact : LocalStatePolicy::kReset;
             o.ckpt_dir = dir;
             o.job_id = job_id;
             o.commit_every = commit_every;
             o.keep_snapshots = keep_snapshots;
             o.settings = settings;
             o.allow_changed_settings = allow;
             o.fixes.allow_change =
                 "allow the change with FaultTolerant(allow_changed_settings=['NAME']) ('all' allows every change)";
             o.fixes.new_store = "give FaultTolerant a new ckpt_dir";
             return std::make_unique<PyCheckpointer>(pg, std::move(o), jit, std::move(jo));
           }),
           py::arg("pg"), py::arg("dir"), py::arg("job_id"), py::arg("commit_every"), py::arg("keep_snapshots"),
           py::arg("settings"), py::arg("allow_changed_settings"), py::arg("jit"), py::arg("jit_policy"),
           py::arg("stall_timeout_s"), py::arg("update_grace_s"))
      .def("begin_update", &PyCheckpointer::begin_update)
      .def("step_finished", &PyCheckpointer::step_finished)
      .def("save_just_in_time", &PyCheckpointer::save_just_in_time)
      .def_property_readonly("jit_active", &PyCheckpointer::jit_active)
      .def("stop_just_in_time", &PyCheckpointer::stop_just_in_time)
      .def("resume", &PyCheckpointer::resume)
      .def("commit", &PyCheckpointer::commit)
      .def("commit_last", &PyCheckpointer::commit_last)
      .def("accept", &PyCheckpointer::accept)
      .def("pause_watch", &PyCheckpointer::pause_watch)
      .def("due", &PyCheckpointer::due)
      .def("flush", &PyCheckpointer::flush)
      .def("commits", &PyCheckpointer::commits);

  m.def(
      "hook_check",
      [](const std::string& hook, int world_size, int64_t numel, int steps,
         const std::map<std::string, std::string>& params, double hook_timeout_s) {
        HookCheckOptions o;
        o.world_size = world_size;
        o.numel = numel;
        o.steps = steps;
        for (const auto& [k, v] : params) o.params.emplace_back(k, v);
        o.hook_timeout = millis(hook_timeout_s);
        HookCheckReport r;
        {
          py::gil_scoped_release release;
          r = check_hook(hook, o);
        }
        py::dict d;
        d["name"] = r.name;
        d["path"] = r.path;
        d["digest"] = r.digest;
        d["replicated_state"] = r.replicated;
        d["local_state"] = r.local;
        d["params"] = r.params;
        d["buckets_checked"] = r.buckets_checked;
        return d;
      },
      py::arg("hook"), py::arg("world_size"), py::arg("numel"), py::arg("steps"), py::arg("params"),
      py::arg("hook_timeout_s"));
  m.def(
      "tensors_digest",
      [](const std::vector<at::Tensor>& tensors) { return tensors_digest(tensors); },
      py::arg("tensors"), "SHA-256 of the tensors' bytes, in order (ftcomm train's parameter digest).");
}
