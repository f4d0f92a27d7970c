#include "intra_op_threads.h"

#include <dlfcn.h>
#include <link.h>

#include <cstring>
#include <string>

#include <ATen/ATen.h>

namespace ftcomm::detail {

namespace {

using SetThreads = void (*)(int);

// omp_set_num_threads of the OpenMP runtime in this process. Looked up, not
// linked: libtorch brings its own copy (libgomp, under its own name in some
// wheels), and linking another one would put two OpenMP runtimes in the process.
SetThreads find_omp_set_num_threads() {
  if (auto f = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"))) return f;
  // Python loads extensions with RTLD_LOCAL: look through the loaded objects.
  SetThreads found = nullptr;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        const char* name = info->dlpi_name;
        const char* base = name ? std::strrchr(name, '/') : nullptr;
        base = base ? base + 1 : name;
        if (!base || !(std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp", 7) == 0 ||
                       std::strncmp(base, "libomp", 6) == 0)) {
          return 0;
        }
        void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
        if (!handle) return 0;
        auto f = reinterpret_cast<SetThreads>(dlsym(handle, "omp_set_num_threads"));
        dlclose(handle);  // RTLD_NOLOAD took a reference: give it back (the library stays loaded)
        if (!f) return 0;
        *static_cast<SetThreads*>(out) = f;
        return 1;
      },
      &found);
  return found;
}

}  // namespace

bool set_intra_op_threads_of_this_thread(int threads) {
  static const SetThreads set = find_omp_set_num_threads();
  if (!set || threads < 1) return false;
  // ATen sets a thread's count from the process's setting the first time that
  // thread reaches one of its parallel loops (at::internal::lazy_init_num_threads,
  // once per thread, inside libtorch), which would undo the setting below at the
  // hook's first kernel, after its team had started. Reach a loop first, over a
  // range too short to start a team: at::arange's is one.
  thread_local bool primed = false;
  if (!primed) {
    (void)at::arange(2);
    primed = true;
  }
  set(threads);
  return true;
}

}  // namespace ftcomm::detail
