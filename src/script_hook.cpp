#include "ftcomm/script_hook.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/sugared_value.h>
#include <torch/csrc/jit/serialization/import.h>

#include "fsutil.h"
#include "hook_text.h"
#include "sha256.h"

#ifndef FTCOMM_SOURCE_HOOKS_DIR
#define FTCOMM_SOURCE_HOOKS_DIR ""
#endif
#ifndef FTCOMM_INSTALL_HOOKS_DIR
#define FTCOMM_INSTALL_HOOKS_DIR ""
#endif

namespace ftcomm {

using detail::first_line;

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
// Group, Bucket and Work (and their qualified spellings), torch's dtypes and the
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
    if (name == "Work" || name == "ftcomm.Work") return c10::getCustomClassType<c10::intrusive_ptr<HookWork>>();
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

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
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

// Checks `schema` against hook(state, params, group, bucket) -> Tensor (or Work).
void check_hook_schema(const c10::FunctionSchema& schema, const std::string& where, size_t skip_self) {
  const auto& args = schema.arguments();
  const std::string want =
      "hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor "
      "(or -> Work)";
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
  if (schema.returns().size() != 1 || (*schema.returns()[0].type() != *c10::TensorType::get() &&
                                        *schema.returns()[0].type() != *c10::getCustomClassType<c10::intrusive_ptr<HookWork>>())) {
    fail("it must return Tensor, or the Work of its last collective");
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
      TORCH_CHECK(cu->find_function("hook") != nullptr, "hook ", path,
                  " is not a hook: it defines no 'hook' function (a hook defines hook(state, params, group, bucket), "
                  "and spec(), params() and ranges() when it keeps state or takes parameters)");
      check_hook_schema(cu->get_function("hook").getSchema(), path, 0);
      // spec(), params() and ranges() are optional: a hook without them keeps no
      // state and takes no parameters.
      if (cu->find_function("spec") != nullptr) hook->spec_fn_ = [cu] { return cu->get_function("spec")({}); };
      if (cu->find_function("ranges") != nullptr) hook->ranges_fn_ = [cu] { return cu->get_function("ranges")({}); };
      if (cu->find_function("params") != nullptr) hook->params_fn_ = [cu] { return cu->get_function("params")({}); };
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
      TORCH_CHECK(module->find_method("forward").has_value(), "hook ", path,
                  " is not a hook: the module has no 'forward' method (the hook; export spec, params and ranges "
                  "with @torch.jit.export when it has them)");
      check_hook_schema(module->get_method("forward").function().getSchema(), path, 1);
      if (module->find_method("spec").has_value()) hook->spec_fn_ = [module] { return module->get_method("spec")({}); };
      if (module->find_method("ranges").has_value()) {
        hook->ranges_fn_ = [module] { return module->get_method("ranges")({}); };
      }
      if (module->find_method("params").has_value()) {
        hook->params_fn_ = [module] { return module->get_method("params")({}); };
      }
      hook->hook_ = [module](std::vector<c10::IValue> args) { return module->get_method("forward")(std::move(args)); };
      hook->keep_alive_ = module;
    }

    // The state declaration and the parameters.
    const c10::IValue spec = hook->spec_fn_ ? call_declaration(hook->spec_fn_, path, "spec")
                                            : c10::IValue(c10::impl::GenericDict(c10::StringType::get(),
                                                                                 c10::ListType::ofStrings()));
    TORCH_CHECK(spec.isGenericDict(), "hook ", path,
                ": spec() must return Dict[str, List[str]] with keys 'replicated' and 'local'");
    auto spec_dict = spec.toGenericDict();
    for (const char* key : {"replicated", "local"}) {
      if (!hook->spec_fn_) break;
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
    if (hook->params_fn_) {
      const c10::IValue params = call_declaration(hook->params_fn_, path, "params");
      TORCH_CHECK(params.isGenericDict(), "hook ", path, ": params() must return Dict[str, float]");
      for (const auto& entry : params.toGenericDict()) {
        hook->params_.insert(entry.key().toStringRef(), entry.value().toDouble());
      }
    }
    // Optional: ranges() -> Dict[str, List[float]], [lo, hi] per parameter.
    if (hook->ranges_fn_) {
      const c10::IValue ranges = call_declaration(hook->ranges_fn_, path, "ranges");
      TORCH_CHECK(ranges.isGenericDict(), "hook ", path, ": ranges() must return Dict[str, List[float]]");
      for (const auto& entry : ranges.toGenericDict()) {
        const std::string key = entry.key().toStringRef();
        TORCH_CHECK(hook->params_.contains(key), "hook ", path, ": ranges() names '", key,
                    "', which params() does not declare");
        const auto& bounds = entry.value();
        const size_t n = bounds.isList() ? bounds.toListRef().size() : 0;
        TORCH_CHECK(n == 2 || n == 3, "hook ", path, ": ranges()['", key,
                    "'] must be [lo, hi], or [lo, hi, 1.0] for a whole number");
        const double lo = bounds.toListRef()[0].toDouble(), hi = bounds.toListRef()[1].toDouble();
        TORCH_CHECK(lo <= hi, "hook ", path, ": ranges()['", key, "'] has lo ", lo, " above hi ", hi);
        hook->ranges_[key] = {lo, hi};
        if (n == 3) {
          TORCH_CHECK(bounds.toListRef()[2].toDouble() == 1.0, "hook ", path, ": ranges()['", key,
                      "'] third element must be 1.0 (whole numbers only)");
          hook->whole_.insert(key);
        }
        hook->check_param(key, hook->params_.at(key), "its default");
      }
    }
    return hook;
  }
};

std::shared_ptr<ScriptHook> ScriptHook::load(const std::string& file_or_name) {
  return ScriptHookLoader::load(file_or_name);
}

size_t ScriptHook::reset_bucket(int64_t bucket) {
  size_t dropped = 0;
  for (const auto& entry : state_) {
    auto buckets = entry.value();
    dropped += buckets.erase(bucket);
  }
  return dropped;
}

void ScriptHook::set_param(const std::string& key, const std::string& value) {
  if (!params_.contains(key)) {
    std::string known;
    for (const auto& [k, v] : params()) known += (known.empty() ? "" : ", ") + k;
    TORCH_CHECK(false, "hook ", name_, " has no parameter '", key, "'; its parameters are: ",
                known.empty() ? "(none)" : known);
  }
  char* end = nullptr;
  const double v = std::strtod(value.c_str(), &end);
  TORCH_CHECK(end != value.c_str() && *end == '\0' && std::isfinite(v), "hook ", name_, ": parameter ", key, "='",
              value, "' is not a finite number");
  check_param(key, v, "--hook-arg");
  params_.insert_or_assign(key, v);
}

std::map<std::string, double> ScriptHook::params() const {
  std::map<std::string, double> out;
  for (const auto& entry : params_) out[entry.key()] = entry.value();
  return out;
}

void ScriptHook::check_param(const std::string& key, double value, const std::string& where) const {
  auto it = ranges_.find(key);
  if (it == ranges_.end()) return;
  TORCH_CHECK(value >= it->second.first && value <= it->second.second, "hook ", name_, ": parameter ", key, "=",
              value, " (", where, ") is outside its range [", it->second.first, ", ", it->second.second,
              "] (the hook's ranges())");
  TORCH_CHECK(!whole_.count(key) || value == std::floor(value), "hook ", name_, ": parameter ", key, "=", value, " (",
              where, ") must be a whole number (the hook's ranges() says so); it would be cut to ",
              std::floor(value));
}

HookOutput ScriptHook::start(const c10::intrusive_ptr<HookGroup>& group, const c10::intrusive_ptr<HookBucket>& bucket) {
  c10::IValue out = hook_({c10::IValue(state_), c10::IValue(params_), c10::IValue(group), c10::IValue(bucket)});
  if (out.isTensor()) return {out.toTensor(), {}};
  TORCH_CHECK(out.isCustomClass(), "hook ", name_, " returned ", out.tagKind(), ", not a Tensor or a Work");
  auto work = out.toCustomClass<HookWork>();
  return {work->result(), work->pending() ? work : c10::intrusive_ptr<HookWork>()};
}

at::Tensor ScriptHook::run(const c10::intrusive_ptr<HookGroup>& group, const c10::intrusive_ptr<HookBucket>& bucket) {
  HookOutput out = start(group, bucket);
  return out.work ? out.work->wait() : out.tensor;
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

}  // namespace ftcomm
