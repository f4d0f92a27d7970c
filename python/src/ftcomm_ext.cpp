// ftcomm._C: the C++ library for PyTorch's own DistributedDataParallel. Built
// with torch's bundled pybind11, so that c10d's Python types (ProcessGroup,
// Store, Reducer) cross as themselves. The Python layer (ftcomm/*.py) is the
// documented surface; these bindings stay small.
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include "ftcomm/bucket_layout.h"
#include "ftcomm/deadlines.h"
#include "ftcomm/digest.h"
#include "ftcomm/errors.h"
#include "ftcomm/hook_check.h"
#include "ftcomm/job.h"
#include "ftcomm/process_group.h"
#include "ftcomm/records_json.h"
#include "ftcomm/script_comm_hook.h"
#include "ftcomm/script_hook.h"

namespace py = pybind11;
using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

namespace ftcomm {
namespace {

// ftcomm.errors' classes, looked up when the module is imported (and kept).
PyObject* g_hook_error = nullptr;
PyObject* g_resume_refused = nullptr;
PyObject* g_store_error = nullptr;

// A hook failure as a failed bucket's future holds it. The Reducer's error
// reaches Python through torch's own bindings (backward, DDP's forward), which
// raise a torch::PyTorchError as its python_type() with its message, on the
// Python thread: so no Python object is made on the hook's worker thread.
// ftcomm.HookError reads the hook, rank and bucket back from the message.
struct PyHookFailure : torch::PyTorchError {
  using PyTorchError::PyTorchError;
  PyObject* python_type() override { return g_hook_error; }
};

// ftcomm's C++ errors thrown into this module's functions, as ftcomm.errors'
// classes with their attributes set.
void translate_errors(std::exception_ptr error) {
  auto raise = [](PyObject* type, py::object value) { PyErr_SetObject(type, value.ptr()); };
  try {
    if (error) std::rethrow_exception(error);
  } catch (const HookError& e) {
    const HookFailure& f = e.failure();
    auto opt = [](int64_t v) { return v < 0 ? py::object(py::none()) : py::object(py::int_(v)); };
    raise(g_hook_error, py::handle(g_hook_error)(e.what_without_backtrace(), py::arg("hook") = f.hook,
                                                 py::arg("rank") = opt(f.rank), py::arg("bucket") = opt(f.bucket),
                                                 py::arg("stuck") = f.stuck));
  } catch (const ResumeRefused& e) {
    raise(g_resume_refused, py::handle(g_resume_refused)(e.what_without_backtrace(), py::arg("step") = e.step(),
                                                         py::arg("settings") = e.settings()));
  } catch (const StoreError& e) {
    raise(g_store_error, py::handle(g_store_error)(e.what_without_backtrace(), py::arg("code") = e.code()));
  }
}

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
                                  std::optional<double> hook_timeout_s, const std::string& agreement) {
  TORCH_CHECK(on_error == "fail" || on_error == "fallback", "on_error must be 'fail' or 'fallback', got '", on_error,
              "'");
  TORCH_CHECK(!hook_timeout_s || (*hook_timeout_s >= 0 && *hook_timeout_s < 1e9),
              "hook_timeout must be 0 (unbounded) or positive seconds below 1e9, got ", hook_timeout_s.value_or(0));
  std::shared_ptr<ScriptHook> hook;
  {
    py::gil_scoped_release release;
    hook = ScriptHook::load(file_or_name);
    for (const auto& [k, v] : params) hook->set_param(k, v);
    agree_on_hook(pg, *hook, pins);
  }
  ScriptCommHookOptions options;
  options.on_error = on_error == "fail" ? OnHookError::kFail : OnHookError::kFallback;
  // Unset: the job's deadline (half the group's timeout; deadlines.h), or 30 s
  // for a group whose backends do not report their timeout.
  const JobDeadlines deadlines = deadlines_for(group_timeout(pg));
  options.hook_timeout = hook_timeout_s ? millis(*hook_timeout_s)
                                        : (deadlines.group.count() > 0 ? deadlines.hook : std::chrono::seconds(30));
  options.agreement = parse_hook_agreement(agreement);
  options.make_error = [](const HookFailure& failure) {
    return std::make_exception_ptr(PyHookFailure(failure.message));
  };
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

// FaultTolerant's core: the rank's Job (store directory, commits, recovery, just
// in time, deadlines) with the model's own Reducer, which a resume re-buckets to
// the agreed stored layout. Reports and commit records cross as JSON text
// (records_json.h), so both front-ends name their fields alike.
class PyJob {
 public:
  PyJob(Group pg, JobOptions options) : pg_size_(pg->getSize()) {
    py::gil_scoped_release release;
    impl_ = std::make_unique<Job>(std::move(pg), std::move(options));
  }
  ~PyJob() {
    py::gil_scoped_release release;
    impl_.reset();
  }

  // Returns (report as JSON, the line rank 0 prints, objects, rank_local):
  // parameters and buffers are filled in place; objects and rank-local state come
  // back as new tensors.
  py::tuple resume(const PyState& state, const std::shared_ptr<c10d::Reducer>& reducer) {
    TrainingState s = state.view();
    RecoveryReport report;
    {
      py::gil_scoped_release release;
      impl_->prepare_recovery(s);
      std::vector<std::vector<size_t>> buckets;
      const auto current = bucket_indices(bucket_layout_of(*reducer, s.parameters));
      report = impl_->finish_recovery(s, current, &buckets);
      if (report.resumed_from_step >= 0 && buckets != current) reducer->initialize_buckets(buckets);
    }
    return py::make_tuple(to_json(report), resume_line(report, pg_size_), s.objects, s.rank_local);
  }
  void begin_update(const std::vector<at::Tensor>& rank_local) {
    py::gil_scoped_release release;
    impl_->begin_update(rank_local);
  }
  bool step_done(int64_t step, const PyState& state, const std::shared_ptr<c10d::Reducer>& reducer,
                 int64_t data_position) {
    TrainingState s = state.view();
    py::gil_scoped_release release;
    return impl_->step_done(step, std::move(s), *reducer, data_position);
  }
  bool commit_last(int64_t step, const PyState& state, const std::shared_ptr<c10d::Reducer>& reducer,
                   int64_t data_position) {
    TrainingState s = state.view();
    py::gil_scoped_release release;
    return impl_->commit_last(step, std::move(s), *reducer, data_position);
  }
  bool save_just_in_time(const std::string& reason) {
    py::gil_scoped_release release;
    return impl_->save_just_in_time(reason);
  }
  void accept() {
    py::gil_scoped_release release;
    impl_->accept_recovery();
  }
  void stop_just_in_time() {
    py::gil_scoped_release release;
    impl_->stop_just_in_time();
  }
  void flush() {
    py::gil_scoped_release release;
    impl_->flush();
  }
  std::vector<std::string> commits() {
    std::vector<std::string> out;
    if (impl_->store() == nullptr) return out;
    std::vector<CommitRecord> records;
    check(impl_->store()->ListCommits(&records));
    for (const auto& r : records) out.push_back(to_json(r));
    return out;
  }
  Job& job() { return *impl_; }

 private:
  int pg_size_;
  std::unique_ptr<Job> impl_;
};

py::dict deadlines_dict(const JobDeadlines& d) {
  py::dict out;
  out["group_s"] = d.group.count() / 1000.0;
  out["hook_s"] = d.hook.count() / 1000.0;
  out["stall_s"] = d.stall.count() / 1000.0;
  return out;
}

}  // namespace
}  // namespace ftcomm

PYBIND11_MODULE(_C, m) {
  using namespace ftcomm;
  m.doc() = "ftcomm's C++ library for PyTorch DDP (use the ftcomm package, not this module)";
  m.attr("__version__") = FTCOMM_VERSION;
  {
    py::module_ errors = py::module_::import("ftcomm.errors");
    g_hook_error = py::object(errors.attr("HookError")).release().ptr();
    g_resume_refused = py::object(errors.attr("ResumeRefused")).release().ptr();
    g_store_error = py::object(errors.attr("StoreError")).release().ptr();
  }
  py::register_local_exception_translator(&translate_errors);

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
      "nccl_candidate",
      [](int rank, int local_rank, const std::string& no_nccl) {
        const NcclCandidate c = nccl_candidate(rank, local_rank, no_nccl);
        return py::make_tuple(c.device, c.local_failure);
      },
      py::arg("rank"), py::arg("local_rank"), py::arg("no_nccl"),
      "This rank's side of choosing NCCL: (its GPU or -1, why it cannot or '').");
  m.def(
      "deadlines", [](const Group& pg) { return deadlines_dict(deadlines_for(group_timeout(pg))); }, py::arg("pg"),
      "The deadlines derived from the group's timeout: group_s, hook_s (half), stall_s (0.9); 0: unknown.");
  m.def("hooks_dir", &hooks_dir);

  py::class_<PyState>(m, "State")
      .def(py::init<>())
      .def_readwrite("parameters", &PyState::parameters)
      .def_readwrite("buffers", &PyState::buffers)
      .def_readwrite("objects", &PyState::objects)
      .def_readwrite("rank_local", &PyState::rank_local)
      .def_readwrite("hook", &PyState::hook);

  py::class_<PyJob>(m, "Job")
      .def(py::init([](const Group& pg, const std::string& root, const std::string& job_id, int commit_every,
                       int keep_snapshots, int staging_slots, const std::string& when_behind,
                       double write_mb_per_s, bool direct_writes,
                       const std::map<std::string, std::string>& settings,
                       const std::set<std::string>& allow, bool jit, const std::string& policy,
                       std::optional<double> stall_timeout_s, double update_grace_s) {
             TORCH_CHECK(!stall_timeout_s || (*stall_timeout_s >= 0 && *stall_timeout_s < 1e9),
                         "stall_timeout must be 0 (none) or positive seconds below 1e9, got ",
                         stall_timeout_s.value_or(0));
             TORCH_CHECK(update_grace_s >= 0 && update_grace_s < 1e9, "update_grace must be 0 or more seconds, "
                         "below 1e9, got ", update_grace_s);
             JobOptions o;
             o.ckpt_root = root;
             o.just_in_time = jit;
             if (stall_timeout_s) o.stall_timeout = millis(*stall_timeout_s);
             o.jit.update_grace = millis(update_grace_s);
             CheckpointerOptions& c = o.checkpoint;
             c.local_state_policy = parse_local_state_policy(policy, "jit_policy");
             c.job_id = job_id;
             c.commit_every = commit_every;
             c.keep_snapshots = keep_snapshots;
             c.staging_slots = staging_slots;
             c.when_behind = parse_snapshot_when_behind(when_behind, "when_behind");
             TORCH_CHECK(write_mb_per_s >= 0 && write_mb_per_s < 1e9, "write_mb_per_s must be 0 (no cap) or "
                         "positive MB/s, got ", write_mb_per_s);
             c.write_bytes_per_sec = static_cast<int64_t>(write_mb_per_s * 1e6);
             c.direct_writes = direct_writes;
             c.settings = settings;
             c.allow_changed_settings = allow;
             c.fixes.allow_change =
                 "allow the change with FaultTolerant(allow_changed_settings=['NAME']) ('all' allows every change)";
             c.fixes.new_store = "give FaultTolerant a new ckpt_dir";
             return std::make_unique<PyJob>(pg, std::move(o));
           }),
           py::arg("pg"), py::arg("root"), py::arg("job_id"), py::arg("commit_every"), py::arg("keep_snapshots"),
           py::arg("staging_slots"), py::arg("when_behind"), py::arg("write_mb_per_s"),
           py::arg("direct_writes"), py::arg("settings"), py::arg("allow_changed_settings"), py::arg("jit"), py::arg("jit_policy"),
           py::arg("stall_timeout_s"), py::arg("update_grace_s"))
      .def("resume", &PyJob::resume)
      .def("accept", &PyJob::accept)
      .def("begin_update", &PyJob::begin_update)
      .def("step_done", &PyJob::step_done)
      .def("commit_last", &PyJob::commit_last)
      .def("save_just_in_time", &PyJob::save_just_in_time)
      .def("stop_just_in_time", &PyJob::stop_just_in_time)
      .def("pause_watch", [](PyJob& j, bool pause) { j.job().pause_stall_watch(pause); })
      .def("due", [](PyJob& j, int64_t step) { return j.job().due(step); })
      .def_property_readonly("jit_active", [](PyJob& j) { return j.job().just_in_time_active(); })
      .def_property_readonly("store_dir", [](PyJob& j) { return j.job().store_dir(); })
      .def_property_readonly("deadlines", [](PyJob& j) { return deadlines_dict(j.job().deadlines()); })
      .def("flush", &PyJob::flush)
      .def("snapshot_stats", [](PyJob& j) { return to_json(j.job().snapshot_stats()); })
      .def("snapshot_summary", [](PyJob& j) { return j.job().snapshot_summary(); })
      .def("commits", &PyJob::commits);

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
