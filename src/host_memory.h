// Internal: fresh host memory for snapshots, faulted in at once.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

namespace ftcomm::store {

// Fresh memory faults in page by page as a read() or a copy fills it: for a 1 GB
// snapshot that took longer than the read itself, and a first commit's copy of
// 151 MB into a new staging buffer took 74-91 ms against 67 ms with the pages
// faulted in first (this project's CI machine). Buffers of at least this size have
// the kernel fault their pages in at once (advice only: ignored where
// unsupported). Not huge pages: asking for them (MADV_HUGEPAGE) made a restarted
// process's load of 101 MB take 170-280 ms instead of 50-60 ms on that machine,
// whose kernel compacts memory for them on the spot (transparent_hugepage/defrag
// "madvise").
constexpr size_t kPrefaultBytes = size_t(4) << 20;
inline void prefault(void* data, size_t n) {
#ifdef MADV_POPULATE_WRITE
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(data) + n) & ~(page - 1);
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
#else
  (void)data;
  (void)n;
#endif
}

}  // namespace ftcomm::store
