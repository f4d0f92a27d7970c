#include "ftcomm/script_hook.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/sugared_value.h>
#include <torch/csrc/jit/serialization/import.h>

#include "control.h"
#include "fsutil.h"
#include "log.h"

#ifndef FTCOMM_SOURCE_HOOKS_DIR
#define FTCOMM_SOURCE_HOOKS_DIR ""
#endif
#ifndef FTCOMM_INSTALL_HOOKS_DIR
#define FTCOMM_INSTALL_HOOKS_DIR ""
#endif

namespace ftcomm {

// --- the TorchScript-visible classes -----------------------------------------

int64_t HookGroup::exchange(int64_t value) {
  return control::max(pg_, value);  // on the CPU: see control.h
}

void HookGroup::begin_guarded() {
  guarded_ = true;
  decision_ = -1;
  stopped_by_peer_ = false;
}

std::unique_lock<std::mutex> HookGroup::begin_collective() {
  std::unique_lock<std::mutex> lock(op_mutex_);
  TORCH_CHECK(!abandoned_, "this hook call passed its deadline and was abandoned; no further collectives");
  return lock;
}

bool HookGroup::try_abandon(int64_t verdict, int64_t* decision) {
  std::unique_lock<std::mutex> lock(op_mutex_, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  abandoned_ = true;
  if (guarded_ && decision_ < 0) decision_ = exchange(verdict);
  guarded_ = false;
  *decision = decision_;
  return true;
}

void HookGroup::control_before_collective() {
  if (!guarded_) return;
  TORCH_CHECK(decision_ < 0, "hook bucket already decided; no further collectives");
  const int64_t got = exchange(0);
  if (got != 0) {
    decision_ = got;
    stopped_by_peer_ = true;
    TORCH_CHECK(false, "the hook failed on rank ", rank_of(got), "; stopping this bucket on every rank");
  }
}

int64_t HookGroup::conclude(int64_t verdict) {
  std::lock_guard<std::mutex> lock(op_mutex_);
  if (abandoned_) return decision_;
  if (decision_ < 0) decision_ = exchange(verdict);
  guarded_ = false;
  return decision_;
}

at::Tensor HookGroup::allreduce(at::Tensor tensor) {
  auto lock = begin_collective();
  control_before_collective();
  std::vector<at::Tensor> list{tensor};
  pg_->allreduce(list)->wait();
  return tensor;
}

std::vector<at::Tensor> HookGroup::allgather(at::Tensor tensor) {
  auto lock = begin_collective();
  control_before_collective();
  std::vector<std::vector<at::Tensor>> out(1);
  for (int64_t r = 0; r < world_size(); ++r) out[0].push_back(at::empty_like(tensor));
  std::vector<at::Tensor> in{tensor};
  pg_->allgather(out, in)->wait();
  return out[0];
}

at::Tensor HookGroup::broadcast(at::Tensor tensor, int64_t root) {
  TORCH_CHECK(root >= 0 && root < world_size(), "Group.broadcast: root ", root, " is not a rank of a group of ",
              world_size());
  auto lock = begin_collective();
  control_before_collective();
  std::vector<at::Tensor> list{tensor};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  pg_->broadcast(list, options)->wait();
  return tensor;
}

c10::intrusive_ptr<HookBucket> HookBucket::from(c10d::GradBucket& bucket) {
  // GradBucket keeps offsets, lengths and sizes private; each gradient is a view
  // of the buffer, which gives them back.
  const at::Tensor& buffer = bucket.getBuffer();
  std::vector<int64_t> offsets, lengths;
  std::vector<std::vector<int64_t>> sizes;
  for (const at::Tensor& grad : bucket.getGradients()) {
    offsets.push_back(grad.storage_offset() - buffer.storage_offset());
    lengths.push_back(grad.numel());
    sizes.push_back(grad.sizes().vec());
  }
  return c10::make_intrusive<HookBucket>(bucket.getBufferRef(), static_cast<int64_t>(bucket.getIndex()),
                                         bucket.isLast(), std::move(offsets), std::move(lengths), std::move(sizes));
}

TORCH_LIBRARY(ftcomm, m) {
  m.class_<HookGroup>("Group")
      .def("rank", &HookGroup::rank)
      .def("world_size", &HookGroup::world_size)
      .def("allreduce", &HookGroup::allreduce)
      .def("allgather", &HookGroup::allgather)
      .def("broadcast", &HookGroup::broadcast);
  m.class_<HookBucket>("Bucket")
      .def("buffer", &HookBucket::buffer)
      .def("index", &HookBucket::index)
      .def("is_last", &HookBucket::is_last)
      .def("offsets", &HookBucket::offsets)
      .def("lengths", &HookBucket::lengths)
      .def("sizes", &HookBucket::sizes);
}

// --- loading -------------------------------------------------------------------

namespace {

// `torch` for hook sources: torch's operators, as the native resolver gives them,
// plus the dtype constants (torch.float16, ...), which it does not know.
struct TorchNamespace : torch::jit::BuiltinModule {
  TorchNamespace() : torch::jit::BuiltinModule("aten") {}
  std::shared_ptr<torch::jit::SugaredValue> attr(const torch::jit::SourceRange& loc, torch::jit::GraphFunction& m,
                                                 const std::string& field) override {
    static const std::map<std::string, at::ScalarType> dtypes = {
        {"float16", at::kHalf},   {"half", at::kHalf},         {"bfloat16", at::kBFloat16}, {"float32", at::kFloat},
        {"float", at::kFloat},    {"float64", at::kDouble},    {"double", at::kDouble},     {"int8", at::kChar},
        {"uint8", at::kByte},     {"int16", at::kShort},       {"int32", at::kInt},         {"int", at::kInt},
        {"int64", at::kLong},     {"long", at::kLong},         {"bool", at::kBool}};
    auto it = dtypes.find(field);
    if (it != dtypes.end()) {
      return std::make_shared<torch::jit::SimpleValue>(m.graph()->insertConstant(c10::IValue(it->second), loc));
    }
    return torch::jit::BuiltinModule::attr(loc, m, field);
  }
};

// TorchScript compiled from C++ knows only torch's builtins; this adds the names
// Group and Bucket (and their qualified spellings), torch's dtypes and the
// exceptions a hook may raise.
struct HookResolver : torch::jit::Resolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(const std::string& name, torch::jit::GraphFunction& m,
                                                         const torch::jit::SourceRange& loc) override {
    if (name == "torch") return std::make_shared<TorchNamespace>();
    if (name == "Exception" || name == "RuntimeError" || name == "ValueError") {
      return std::make_shared<torch::jit::ExceptionValue>(name);
    }
    return torch::jit::nativeResolver()->resolveValue(name, m, loc);
  }
  c10::TypePtr resolveType(const std::string& name, const torch::jit::SourceRange&) override {
    if (name == "Group" || name == "ftcomm.Group") return c10::getCustomClassType<c10::intrusive_ptr<HookGroup>>();
    if (name == "Bucket" || name == "ftcomm.Bucket") return c10::getCustomClassType<c10::intrusive_ptr<HookBucket>>();
    return nullptr;
  }
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "hook: cannot read '", path, "'");
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// The line that says what went wrong in a TorchScript exception: the
// interpreter puts the raised message last ("builtins.Exception: boom").
std::string script_error(const std::string& what) {
  std::istringstream in(what.substr(0, what.find("\nException raised from")));
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t") != std::string::npos) last = line;
  }
  return last.empty() ? what : last;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
}

// Blanks top-level `import` and `from ... import` lines (keeping line numbers for
// error messages): hook files stay importable Python for editors and linters,
// while the C++ TorchScript compiler takes no imports.
std::string without_imports(const std::string& source) {
  std::istringstream in(source);
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.rfind("import ", 0) == 0 || line.rfind("from ", 0) == 0) line.clear();
    out += line + "\n";
  }
  return out;
}

// Runs one of the hook's declarations (spec, params, ranges); an error names it.
c10::IValue call_declaration(const std::function<c10::IValue()>& fn, const std::string& path, const char* name) {
  try {
    return fn();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "hook ", path, ": ", name, "() failed: ", first_line(e.what()));
  }
}

// Checks `schema` against hook(state, params, group, bucket) -> Tensor.
void check_hook_schema(const c10::FunctionSchema& schema, const std::string& where, size_t skip_self) {
  const auto& args = schema.arguments();
  const std::string want =
      "hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor";
  auto fail = [&](const std::string& why) {
    TORCH_CHECK(false, "hook ", where, ": wrong signature (", why, "): found ", schema, "; a hook must be ", want);
  };
  if (args.size() != 4 + skip_self) fail("it takes " + std::to_string(args.size() - skip_self) + " arguments, not 4");
  const auto state_t = c10::DictType::create(
      c10::StringType::get(), c10::DictType::create(c10::IntType::get(), c10::TensorType::get()));
  const auto params_t = c10::DictType::create(c10::StringType::get(), c10::FloatType::get());
  if (*args[skip_self].type() != *state_t) fail("argument 1 must be Dict[str, Dict[int, Tensor]]");
  if (*args[skip_self + 1].type() != *params_t) fail("argument 2 must be Dict[str, float]");
  if (*args[skip_self + 2].type() != *c10::getCustomClassType<c10::intrusive_ptr<HookGroup>>()) {
    fail("argument 3 must be Group");
  }
  if (*args[skip_self + 3].type() != *c10::getCustomClassType<c10::intrusive_ptr<HookBucket>>()) {
    fail("argument 4 must be Bucket");
  }
  if (schema.returns().size() != 1 || *schema.returns()[0].type() != *c10::TensorType::get()) {
    fail("it must return Tensor");
  }
}

}  // namespace

struct ScriptHookLoader {
  static std::shared_ptr<ScriptHook> load(const std::string& file_or_name) {
    std::string path = file_or_name;
    if (!ends_with(path, ".py") && !ends_with(path, ".pt")) {
      TORCH_CHECK(path.find('/') == std::string::npos, "hook '", path,
                  "': a hook file must end in .py (TorchScript source) or .pt (torch.jit.save)");
      const std::string dir = hooks_dir();
      path = dir + "/" + file_or_name + ".py";
      if (!detail::path_exists(path)) {
        std::string known;
        for (const auto& n : list_hooks()) known += (known.empty() ? "" : ", ") + n;
        TORCH_CHECK(false, "unknown hook '", file_or_name, "'; the hooks in ", dir, " are: ", known,
                    ". Or pass a path to a .py or .pt hook file");
      }
    }
    TORCH_CHECK(detail::path_exists(path), "hook file '", path, "' does not exist");
    auto hook = std::shared_ptr<ScriptHook>(new ScriptHook());
    hook->path_ = path;
    const std::string bytes = read_file(path);
    hook->digest_ = sha256_hex(bytes);
    const auto slash = path.find_last_of('/');
    hook->name_ = path.substr(slash == std::string::npos ? 0 : slash + 1);
    hook->name_ = hook->name_.substr(0, hook->name_.size() - 3);

    if (ends_with(path, ".py")) {
      auto cu = std::make_shared<torch::jit::CompilationUnit>();
      try {
        cu->define(std::nullopt, without_imports(bytes), std::make_shared<HookResolver>(), nullptr);
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "hook ", path, " does not compile as TorchScript:\n", e.what());
      }
      for (const char* fn : {"spec", "params", "hook"}) {
        TORCH_CHECK(cu->find_function(fn) != nullptr, "hook ", path, " is not a hook: it defines no '", fn,
                    "' function (a hook defines spec(), params() and hook(state, params, group, bucket))");
      }
      check_hook_schema(cu->get_function("hook").getSchema(), path, 0);
      hook->spec_fn_ = [cu] { return cu->get_function("spec")({}); };
      if (cu->find_function("ranges") != nullptr) hook->ranges_fn_ = [cu] { return cu->get_function("ranges")({}); };
      hook->params_fn_ = [cu] { return cu->get_function("params")({}); };
      hook->hook_ = [cu](std::vector<c10::IValue> args) { return cu->get_function("hook")(std::move(args)); };
      hook->keep_alive_ = cu;
    } else {
      std::shared_ptr<torch::jit::Module> module;
      try {
        module = std::make_shared<torch::jit::Module>(torch::jit::load(path));
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "hook ", path, " is not a TorchScript archive torch.jit.load can read (",
                    first_line(e.what()), ")");
      }
      for (const char* fn : {"spec", "params", "forward"}) {
        TORCH_CHECK(module->find_method(fn).has_value(), "hook ", path, " is not a hook: the module has no '", fn,
                    "' method (export spec and params with @torch.jit.export)");
      }
      check_hook_schema(module->get_method("forward").function().getSchema(), path, 1);
      hook->spec_fn_ = [module] { return module->get_method("spec")({}); };
      if (module->find_method("ranges").has_value()) {
        hook->ranges_fn_ = [module] { return module->get_method("ranges")({}); };
      }
      hook->params_fn_ = [module] { return module->get_method("params")({}); };
      hook->hook_ = [module](std::vector<c10::IValue> args) { return module->get_method("forward")(std::move(args)); };
      hook->keep_alive_ = module;
    }

    // The state declaration and the parameters.
    const c10::IValue spec = call_declaration(hook->spec_fn_, path, "spec");
    TORCH_CHECK(spec.isGenericDict(), "hook ", path,
                ": spec() must return Dict[str, List[str]] with keys 'replicated' and 'local'");
    auto spec_dict = spec.toGenericDict();
    for (const char* key : {"replicated", "local"}) {
      TORCH_CHECK(spec_dict.contains(key), "hook ", path, ": missing state declaration: spec() has no '", key,
                  "' entry; declare it, even as an empty list");
      auto names = spec_dict.at(key);
      TORCH_CHECK(names.isList(), "hook ", path, ": spec()['", key, "'] must be a List[str]");
      for (const auto& n : names.toListRef()) {
        auto& list = std::string(key) == "replicated" ? hook->replicated_ : hook->local_;
        list.push_back(n.toStringRef());
        hook->state_.insert(n.toStringRef(), c10::Dict<int64_t, at::Tensor>());
      }
    }
    for (const auto& entry : spec_dict) {
      const std::string key = entry.key().toStringRef();
      TORCH_CHECK(key == "replicated" || key == "local", "hook ", path, ": spec() has an unknown entry '", key,
                  "'; only 'replicated' and 'local'");
    }
    const c10::IValue params = call_declaration(hook->params_fn_, path, "params");
    TORCH_CHECK(params.isGenericDict(), "hook ", path, ": params() must return Dict[str, float]");
    for (const auto& entry : params.toGenericDict()) {
      hook->params_[entry.key().toStringRef()] = entry.value().toDouble();
      hook->params_dict_.insert(entry.key().toStringRef(), entry.value().toDouble());
    }
    // Optional: ranges() -> Dict[str, List[float]], [lo, hi] per parameter.
    if (hook->ranges_fn_) {
      const c10::IValue ranges = call_declaration(hook->ranges_fn_, path, "ranges");
      TORCH_CHECK(ranges.isGenericDict(), "hook ", path, ": ranges() must return Dict[str, List[float]]");
      for (const auto& entry : ranges.toGenericDict()) {
        const std::string key = entry.key().toStringRef();
        TORCH_CHECK(hook->params_.count(key), "hook ", path, ": ranges() names '", key,
                    "', which params() does not declare");
        const auto& bounds = entry.value();
        TORCH_CHECK(bounds.isList() && bounds.toListRef().size() == 2, "hook ", path, ": ranges()['", key,
                    "'] must be [lo, hi]");
        const double lo = bounds.toListRef()[0].toDouble(), hi = bounds.toListRef()[1].toDouble();
        TORCH_CHECK(lo <= hi, "hook ", path, ": ranges()['", key, "'] has lo ", lo, " above hi ", hi);
        hook->ranges_[key] = {lo, hi};
        hook->check_param(key, hook->params_[key], "its default");
      }
    }
    return hook;
  }
};

std::shared_ptr<ScriptHook> ScriptHook::load(const std::string& file_or_name) {
  return ScriptHookLoader::load(file_or_name);
}

void ScriptHook::set_param(const std::string& key, const std::string& value) {
  if (params_.find(key) == params_.end()) {
    std::string known;
    for (const auto& [k, v] : params_) known += (known.empty() ? "" : ", ") + k;
    TORCH_CHECK(false, "hook ", name_, " has no parameter '", key, "'; its parameters are: ",
                known.empty() ? "(none)" : known);
  }
  char* end = nullptr;
  const double v = std::strtod(value.c_str(), &end);
  TORCH_CHECK(end != value.c_str() && *end == '\0' && std::isfinite(v), "hook ", name_, ": parameter ", key, "='",
              value, "' is not a finite number");
  check_param(key, v, "--hook-arg");
  params_[key] = v;
  params_dict_.insert_or_assign(key, v);
}

void ScriptHook::check_param(const std::string& key, double value, const std::string& where) const {
  auto it = ranges_.find(key);
  if (it == ranges_.end()) return;
  TORCH_CHECK(value >= it->second.first && value <= it->second.second, "hook ", name_, ": parameter ", key, "=",
              value, " (", where, ") is outside its range [", it->second.first, ", ", it->second.second,
              "] (the hook's ranges())");
}

at::Tensor ScriptHook::run(const c10::intrusive_ptr<HookGroup>& group, const c10::intrusive_ptr<HookBucket>& bucket) {
  c10::IValue out = hook_({c10::IValue(state_), c10::IValue(params_dict_), c10::IValue(group), c10::IValue(bucket)});
  TORCH_CHECK(out.isTensor(), "hook ", name_, " returned ", out.tagKind(), ", not a Tensor");
  return out.toTensor();
}

std::string hooks_dir() {
  if (const char* env = std::getenv("FTCOMM_HOOKS_DIR")) return env;
  for (const char* dir : {FTCOMM_SOURCE_HOOKS_DIR, FTCOMM_INSTALL_HOOKS_DIR}) {
    if (*dir != '\0' && detail::path_exists(dir)) return dir;
  }
  return "hooks_ts";
}

std::vector<std::string> list_hooks() {
  std::vector<std::string> names;
  for (const auto& f : detail::list_dir(hooks_dir())) {
    if (ends_with(f, ".py")) names.push_back(f.substr(0, f.size() - 3));
  }
  std::sort(names.begin(), names.end());
  return names;
}

// --- running inside the Reducer ------------------------------------------------

struct ScriptCommHook::Worker {
  struct Task {
    c10::intrusive_ptr<HookBucket> bucket;
    at::Tensor original;  // a copy for kFallback
    // CUDA buckets: recorded on the caller's stream once the gradients are in the
    // bucket; the worker's stream waits on it before the hook runs.
    std::unique_ptr<c10::Event> ready;
    c10::intrusive_ptr<c10::ivalue::Future> future;
  };
  Worker(std::shared_ptr<ScriptHook> h, ScriptCommHookOptions o, c10::intrusive_ptr<c10d::ProcessGroup> p)
      : hook(std::move(h)), options(o), pg(std::move(p)), group(c10::make_intrusive<HookGroup>(pg)) {}
  void run();       // the worker thread: runs queued buckets in order
  void watch();     // the watchdog thread: bounds each hook call
  void process(Task& task);
  void fail(Task& task, const std::string& message) {
    task.future->setError(std::make_exception_ptr(std::runtime_error(message)));
  }
  std::string stuck_message(int64_t stuck_rank, int64_t bucket) const {
    char seconds[32];
    std::snprintf(seconds, sizeof(seconds), "%g", std::chrono::duration<double>(options.hook_timeout).count());
    return "hook " + hook->name() + " did not return within " + seconds + " s on rank " +
           std::to_string(stuck_rank) + " in bucket " + std::to_string(bucket) +
           " (stuck: an endless loop, or far too slow for the job's --timeout); every rank stops here. Fix the "
           "hook, or raise --timeout";
  }

  const std::shared_ptr<ScriptHook> hook;
  const ScriptCommHookOptions options;
  const c10::intrusive_ptr<c10d::ProcessGroup> pg;
  const c10::intrusive_ptr<HookGroup> group;

  std::mutex mutex;  // the queue, stop, abandoned, and the call in progress
  std::condition_variable ready, call_changed;
  std::deque<Task> queue;
  bool stop = false;
  bool abandoned = false;  // the watchdog gave up on a stuck call; the worker thread is lost
  bool in_call = false;    // the hook is running
  std::chrono::steady_clock::time_point call_start;
  int64_t call_bucket = 0;
  c10::intrusive_ptr<c10::ivalue::Future> call_future;
  int64_t fallbacks = 0;
  std::atomic<int64_t> busy_ns{0};
  std::thread thread, watchdog;
};

void ScriptCommHook::Worker::run() {
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mutex);
      ready.wait(lock, [&] { return stop || abandoned || !queue.empty(); });
      if (abandoned || queue.empty()) return;
      task = std::move(queue.front());
      queue.pop_front();
    }
    const auto started = std::chrono::steady_clock::now();
    process(task);
    busy_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count();
    std::lock_guard<std::mutex> lock(mutex);
    if (abandoned) return;  // a call the watchdog gave up on came back after all
  }
}

void ScriptCommHook::Worker::process(Task& task) {
  const at::Tensor buffer = task.bucket->buffer();
  c10::OptionalDeviceGuard device_guard;
  if (task.ready) {
    device_guard.reset_device(buffer.device());
    task.ready->block(c10::impl::VirtualGuardImpl(buffer.device().type()).getStream(buffer.device()));
  }
  std::string error;
  at::Tensor result;
  if (options.agree_per_bucket) group->begin_guarded();
  {
    std::lock_guard<std::mutex> lock(mutex);
    in_call = true;
    call_start = std::chrono::steady_clock::now();
    call_bucket = task.bucket->index();
    call_future = task.future;
  }
  call_changed.notify_all();
  try {
    result = hook->run(group, task.bucket);
    if (result.sizes() != buffer.sizes() || result.scalar_type() != buffer.scalar_type() ||
        result.device() != buffer.device()) {
      std::ostringstream why;
      why << "returned " << result.scalar_type() << result.sizes() << " on " << result.device() << " for a "
          << buffer.scalar_type() << buffer.sizes() << " bucket on " << buffer.device();
      error = why.str();
    } else if (options.check_finite && !at::isfinite(result).all().item<bool>()) {
      error = "returned non-finite values (NaN or Inf)";
    }
  } catch (const std::exception& e) {
    error = std::string("threw: ") + script_error(e.what());
  }
  {
    std::lock_guard<std::mutex> lock(mutex);
    in_call = false;
    call_future.reset();
    // The watchdog gave up on this call while it ran, and fails its future.
    if (abandoned) return;
  }
  if (!options.agree_per_bucket) {
    if (error.empty()) {
      task.future->markCompleted(c10::IValue(result));
    } else {
      fail(task, "hook " + hook->name() + " in bucket " + std::to_string(task.bucket->index()) + ": " + error);
    }
    return;
  }
  // One rank's failure must not leave the others out of step: all decide
  // together (see HookGroup's guarded mode).
  int64_t bad = 0;
  try {
    bad = group->conclude(error.empty() ? 0 : group->encode_verdict(HookGroup::Failure::kError));
  } catch (const std::exception& e) {
    fail(task, "hook " + hook->name() + ": ranks could not agree on bucket " + std::to_string(task.bucket->index()) +
                   ": " + first_line(e.what()));
    return;
  }
  if (bad == 0) {
    task.future->markCompleted(c10::IValue(result));
    return;
  }
  if (group->failure_of(bad) == HookGroup::Failure::kStuck) {
    fail(task, stuck_message(group->rank_of(bad), task.bucket->index()) + " (the ranks agreed)");
    return;
  }
  // Name this rank's own failure when it has one, else the rank that failed.
  const bool mine = !error.empty() && !group->stopped_by_peer();
  const std::string who = mine ? "rank " + std::to_string(group->rank()) + " (" + error + ")"
                               : "rank " + std::to_string(group->rank_of(bad));
  if (options.on_error == OnHookError::kFallback) {
    std::vector<at::Tensor> plain{task.original};
    pg->allreduce(plain)->wait();
    plain[0].div_(group->world_size());
    if (fallbacks++ == 0 && (mine || group->rank() == 0)) {
      detail::log_line("ftcomm: hook " + hook->name() + " failed on " + who + " in bucket " +
                       std::to_string(task.bucket->index()) +
                       "; every rank falls back to a mean allreduce for such buckets");
    }
    task.future->markCompleted(c10::IValue(plain[0]));
  } else {
    fail(task, "hook " + hook->name() + " failed on " + who + " in bucket " + std::to_string(task.bucket->index()) +
                   "; every rank stops here (the ranks agreed). Fix the hook, or run with the fallback policy");
  }
}

void ScriptCommHook::Worker::watch() {
  using namespace std::chrono_literals;
  std::unique_lock<std::mutex> lock(mutex);
  while (!stop) {
    if (!in_call || options.hook_timeout.count() <= 0) {
      call_changed.wait(lock);
      continue;
    }
    const auto deadline = call_start + options.hook_timeout;
    if (std::chrono::steady_clock::now() < deadline) {
      call_changed.wait_until(lock, deadline);
      continue;
    }
    // Past the deadline. The stuck call cannot be stopped; decide its bucket for
    // it, between its collectives (a collective has its own deadline).
    const int64_t bucket = call_bucket;
    auto future = call_future;
    lock.unlock();
    int64_t decision = 0;
    std::string agreement_error;
    bool acted = false;
    try {
      acted = group->try_abandon(group->encode_verdict(HookGroup::Failure::kStuck), &decision);
    } catch (const std::exception& e) {
      acted = true;
      agreement_error = first_line(e.what());
    }
    lock.lock();
    if (!acted) {
      call_changed.wait_for(lock, 50ms);
      continue;
    }
    // The group takes no further collectives now. If the call came back in the
    // meantime, the worker concludes it itself (with the decision just made).
    abandoned = true;
    const bool still_in_call = in_call && call_future == future;
    std::deque<Task> pending;
    pending.swap(queue);
    lock.unlock();
    std::string message = stuck_message(group->rank(), bucket);
    if (!agreement_error.empty()) message += " (telling the other ranks failed: " + agreement_error + ")";
    else if (decision != 0 && group->rank_of(decision) != group->rank()) message += "; rank " + std::to_string(group->rank_of(decision)) + " was stuck too";
    detail::log_line("ftcomm: rank " + std::to_string(group->rank()) + ": " + message);
    if (still_in_call && future) future->setError(std::make_exception_ptr(std::runtime_error(message)));
    for (auto& t : pending) fail(t, message);
    ready.notify_all();
    return;
  }
}

ScriptCommHook::ScriptCommHook(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::shared_ptr<ScriptHook> hook,
                               ScriptCommHookOptions options)
    : CppCommHookInterface(pg), hook_(hook), worker_(std::make_shared<Worker>(hook, options, pg)) {
  // The threads hold the worker: one stuck in a hook outlives this object.
  auto w = worker_;
  w->thread = std::thread([w] { w->run(); });
  w->watchdog = std::thread([w] { w->watch(); });
}

ScriptCommHook::~ScriptCommHook() {
  {
    std::lock_guard<std::mutex> lock(worker_->mutex);
    worker_->stop = true;
  }
  worker_->ready.notify_all();
  worker_->call_changed.notify_all();
  worker_->watchdog.join();
  bool stuck;
  {
    std::lock_guard<std::mutex> lock(worker_->mutex);
    stuck = worker_->abandoned && worker_->in_call;
  }
  if (stuck) {
    worker_->thread.detach();  // still inside the hook; it exits if the hook ever returns
  } else {
    worker_->thread.join();
  }
}

double ScriptCommHook::busy_seconds() const {
  return static_cast<double>(worker_->busy_ns.load()) * 1e-9;
}

int64_t ScriptCommHook::fallbacks() const {
  std::lock_guard<std::mutex> lock(worker_->mutex);
  return worker_->fallbacks;
}

c10::intrusive_ptr<c10::ivalue::Future> ScriptCommHook::runHook(c10d::GradBucket& bucket) {
  Worker::Task task;
  task.bucket = HookBucket::from(bucket);
  const at::Tensor& buffer = bucket.getBufferRef();
  if (worker_->options.on_error == OnHookError::kFallback) task.original = buffer.clone();
  if (buffer.is_cuda()) {
    // The future carries CUDA events: the Reducer's wait() makes its stream wait
    // for the hook's work, whichever streams the two threads use.
    task.ready = std::make_unique<c10::Event>(buffer.device().type());
    task.ready->record(c10::impl::VirtualGuardImpl(buffer.device().type()).getStream(buffer.device()));
    task.future = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get(), std::vector<c10::Device>{buffer.device()});
  } else {
    task.future = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get());
  }
  auto future = task.future;
  {
    std::lock_guard<std::mutex> lock(worker_->mutex);
    if (worker_->abandoned) {
      worker_->fail(task, "hook " + hook_->name() + " was abandoned after a call that did not return; this process "
                                                     "must exit");
      return future;
    }
    worker_->queue.push_back(std::move(task));
  }
  worker_->ready.notify_one();
  return future;
}

void agree_on_hook(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const ScriptHook& hook,
                   const std::vector<std::string>& pinned) {
  if (!pinned.empty()) {
    TORCH_CHECK(std::find(pinned.begin(), pinned.end(), hook.digest()) != pinned.end(), "hook ", hook.name(),
                " (", hook.path(), ") has digest ", hook.digest(),
                ", which is not pinned; pin it with --hook-digest ", hook.digest(), " if it is trusted");
  }
  const auto digests = control::allgather_bytes(pg, hook.digest());
  const std::string& first = digests[0];
  for (int r = 1; r < pg->getSize(); ++r) {
    const std::string& theirs = digests[static_cast<size_t>(r)];
    TORCH_CHECK(theirs == first, "hook digests differ: rank 0 has ", first, ", rank ", r, " has ", theirs,
                ". Every rank must load the same hook file (this rank, ", pg->getRank(), ", loaded ", hook.path(), ")");
  }
}

}  // namespace ftcomm
