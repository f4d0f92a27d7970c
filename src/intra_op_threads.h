// Internal: how many threads ATen's CPU kernels use when they run on a thread of
// ftcomm's own (a hook's worker), as opposed to one ATen or the user started.
//
// ATen parallelises a CPU kernel with OpenMP, and OpenMP keeps one team of threads
// per thread that starts a parallel region. A hook's worker thread that divides a
// 25 MB bucket therefore gets a second team beside the one backward uses: at 3
// threads a rank, 2 more threads that compete with backward's for the rank's cores
// and spin after every region. at::set_num_threads cannot help: it also changes
// the process's setting (and its other pools). This sets the calling thread's
// OpenMP thread count only.
#pragma once

namespace ftcomm::detail {

// Sets the number of threads of parallel regions that the calling thread starts
// (OpenMP's omp_set_num_threads, in the OpenMP runtime libtorch loaded); other
// threads keep theirs. Returns false, changing nothing, when libtorch runs
// without OpenMP (its own pool then serves every thread: nothing to separate).
// Cheap after the first call on a thread (a thread-local write): callers may
// repeat it before each piece of work.
bool set_intra_op_threads_of_this_thread(int threads);

}  // namespace ftcomm::detail
