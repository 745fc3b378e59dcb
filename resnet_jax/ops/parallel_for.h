// ParallelFor: the one way this library's FFI kernels split work over XLA's thread pool.
// Shared by onednn.cc (the batch in single-threaded oneDNN slices), bn_kernels.cc (rows of
// the batch-norm reductions and passes) and pool_kernels.cc (images of the max pool's
// backward); also RESNET_JAX_CLONES, the instruction sets the kernels' hot loops are compiled
// for. Header-only; all are built into one library.
#ifndef RESNET_JAX_OPS_PARALLEL_FOR_H_
#define RESNET_JAX_OPS_PARALLEL_FOR_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "xla/ffi/api/ffi.h"

// -DRESNET_JAX_CLONES='__attribute__((target("arch=x86-64-v3")))' (or empty: baseline) builds one
// variant alone, to test it on a machine that would pick another.
#ifndef RESNET_JAX_CLONES
#if defined(__x86_64__) && defined(__GNUC__)
#define RESNET_JAX_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RESNET_JAX_CLONES
#endif
#endif

namespace resnet_jax {

struct ParallelForState {
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  int64_t done = 0;
  std::string error;
};

// fn(c) for every c in [0, chunks): chunks are claimed off an atomic counter by chunks - 1
// tasks on XLA's intra-op pool (the FFI's thread-pool context) and by the calling thread, so
// the caller never waits on a pool that is busy elsewhere and cannot deadlock. Returns when all
// have run; the first chunk's exception message is rethrown here as an Error.
template <typename Error = std::runtime_error, typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, const F& fn) {
  if (chunks <= 1) {
    if (chunks == 1) fn(0);
    return;
  }
  auto state = std::make_shared<ParallelForState>();
  const F* body = &fn;  // only dereferenced for a claimed chunk, i.e. before we return
  auto work = [state, body, chunks]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      std::string error;
      try {
        (*body)(c);
      } catch (const std::exception& e) {
        error = e.what();
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (!error.empty() && state->error.empty()) state->error = error;
      if (++state->done == chunks) state->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < chunks; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == chunks; });
  if (!state->error.empty()) throw Error(state->error);
}

}  // namespace resnet_jax

#endif  // RESNET_JAX_OPS_PARALLEL_FOR_H_
