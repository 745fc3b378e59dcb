// The max pool's backward for XLA:CPU, as an XLA FFI handler (resnet_jax/ops/pool.py wraps it;
// resnet_jax/ops/onednn.py builds it into the oneDNN extension's library).
//
//   resnet_jax_pool_scatter  (code s8 (N, OH, OW, C), g f32 (N, OH, OW, C)) -> dx f32 (N, H, W, C)
//
// code holds each window's winner as di * k + dj (row-major window position); dx is g placed at
// the winners of the k x k windows at stride s, the windows starting at -pad_top, -pad_left
// (a winner in the padding, possible only where a window's real values are all -inf, is
// dropped, as the transposed pad crops it), and summed where windows overlap. Attributes
// (int64): k, s, pad_top, pad_left, split (images in that many chunks on XLA's intra-op pool and
// the calling thread; <= 1: one chunk). One pass writes dx once: XLA:CPU wrote the k*k
// transposed pads of the lax formulation out one by one in a train step (ResNet-50's stem:
// 9 buffers of 32x114x114x64). Within a position the windows add in (oh, ow) order.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

struct PoolError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Geometry {
  int64_t n, oh, ow, c, h, w, k, s, pt, pl;
};

// dx[n] for images [n0, n1).
RESNET_JAX_CLONES
void Scatter(const Geometry& q, const int8_t* code, const float* g, float* dx, int64_t n0,
             int64_t n1) {
  const int64_t c = q.c;
  for (int64_t n = n0; n < n1; ++n) {
    float* out = dx + n * q.h * q.w * c;
    std::memset(out, 0, sizeof(float) * q.h * q.w * c);
    for (int64_t oh = 0; oh < q.oh; ++oh) {
      for (int64_t ow = 0; ow < q.ow; ++ow) {
        const int64_t at = ((n * q.oh + oh) * q.ow + ow) * c;
        const int8_t* cd = code + at;
        const float* gv = g + at;
        for (int64_t di = 0; di < q.k; ++di) {
          const int64_t i = q.s * oh + di - q.pt;
          if (i < 0 || i >= q.h) continue;
          for (int64_t dj = 0; dj < q.k; ++dj) {
            const int64_t j = q.s * ow + dj - q.pl;
            if (j < 0 || j >= q.w) continue;
            const int8_t d = static_cast<int8_t>(di * q.k + dj);
            float* o = out + (i * q.w + j) * c;
            for (int64_t ch = 0; ch < c; ++ch) o[ch] += cd[ch] == d ? gv[ch] : 0.0f;
          }
        }
      }
    }
  }
}

ffi::Error ScatterImpl(ffi::ThreadPool pool, ffi::AnyBuffer code, ffi::AnyBuffer g,
                       ffi::Result<ffi::AnyBuffer> dx, int64_t k, int64_t s, int64_t pad_top,
                       int64_t pad_left, int64_t split) {
  const char* op = "resnet_jax pool_scatter: ";
  if (code.element_type() != ffi::DataType::S8 || g.element_type() != ffi::DataType::F32 ||
      dx->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(std::string(op) +
                                       "code must be int8, g and dx float32");
  }
  const auto cd = code.dimensions(), gd = g.dimensions(), xd = dx->dimensions();
  if (cd.size() != 4 || gd.size() != 4 || xd.size() != 4 || !(cd == gd)) {
    return ffi::Error::InvalidArgument(std::string(op) +
                                       "code and g must be one 4-D NHWC shape, dx 4-D");
  }
  if (xd[0] != gd[0] || xd[3] != gd[3]) {
    return ffi::Error::InvalidArgument(std::string(op) + "dx's batch or channels differ from g's");
  }
  if (k < 1 || k * k > 127 || s < 1 || pad_top < 0 || pad_left < 0) {
    return ffi::Error::InvalidArgument(std::string(op) + "needs 1 <= k, k*k <= 127, s >= 1, "
                                       "pads >= 0");
  }
  const Geometry q{gd[0], gd[1], gd[2], gd[3], xd[1], xd[2], k, s, pad_top, pad_left};
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(split, q.n));
  const auto* codes = static_cast<const int8_t*>(code.untyped_data());
  const auto* grads = static_cast<const float*>(g.untyped_data());
  auto* out = static_cast<float*>(dx->untyped_data());
  try {
    resnet_jax::ParallelFor<PoolError>(pool, chunks, [&](int64_t c) {
      Scatter(q, codes, grads, out, q.n * c / chunks, q.n * (c + 1) / chunks);
    });
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(op) + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_pool_scatter, ScatterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("split"));
