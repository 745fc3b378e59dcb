// Fused batch-norm kernels for XLA:CPU, as XLA FFI handlers (resnet_jax/ops/fused_bn.py wraps
// them; resnet_jax/ops/onednn.py builds them into the oneDNN extension's library).
//
// All arrays float32, channels last: any rank >= 2, every axis but the last flattened into rows
// (rows = N*H*W), C = the last axis, contiguous. Per-channel operands are (k, C).
//
//   resnet_jax_bn_stats             (x) -> s (2, C)        s = [mean(x), mean(x*x)]
//   resnet_jax_bn_apply             (x, coef (3, C)) -> y  y = (x - coef0) * coef1 + coef2
//   resnet_jax_bn_apply_add         (x, coef, res) -> y    y = that + res
//                                   (relu != 0: y = max(y, 0) last, NaN kept)
//   resnet_jax_bn_bwd_stats         (g, y, x, mi (2, C)) -> t (2, C)
//                                   g' = relu ? g * (y > 0) : g,  xhat = (x - mi0) * mi1,
//                                   t = [mean(g'), mean(g' * xhat)]
//   resnet_jax_bn_bwd_apply         (g, y, x, coef (5, C)) -> dx
//   resnet_jax_bn_bwd_apply_masked  (g, y, x, coef (5, C)) -> (dx, g')
//                                   coef = [mean, inv_std, a, m_g, m_gx],
//                                   dx = a * (g' - m_g - xhat * m_gx)
//
// Attributes (int64): relu (0/1; not on bn_stats), split (the rows in that many contiguous
// chunks, run on XLA's own intra-op thread pool (the FFI thread-pool context) and on the calling
// thread, which claims chunks too, so a busy pool never deadlocks it; <= 1: one chunk).
//
// Reductions are deterministic and independent of split: the rows fall into "parts" of a size
// fixed by the row count alone (kBlockRows..kMaxPartRows rows, about 64 parts); within a part,
// blocks of kBlockRows rows are summed in float and added into a double per part; the parts'
// doubles are summed in part order after all chunks finish, so any split gives the same bits.
// Hot loops run over the contiguous channel axis and are compiled for AVX-512, AVX2+FMA and
// baseline x86-64 (function multiversioning, chosen once at load by the CPU).

#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

#define RESNET_JAX_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t kBlockRows = 64;     // rows summed in float before adding into double
constexpr int64_t kMaxPartRows = 4096; // the largest part (rows per double partial sum)

// Rows per part: a function of the row count only (never of split), a multiple of kBlockRows.
int64_t PartRows(int64_t rows) {
  const int64_t target = (rows + 63) / 64;  // about 64 parts, to balance any split
  const int64_t blocks = (target + kBlockRows - 1) / kBlockRows;
  return std::clamp<int64_t>(blocks * kBlockRows, kBlockRows, kMaxPartRows);
}

// ---- hot loops (each one compiled per instruction set; the templates inline into them) ----

// out[c] += sum of x[r, c], out[C + c] += sum of x[r, c]^2 over `rows` rows.
RESNET_JAX_CLONES
void StatsRows(const float* __restrict x, int64_t rows, int64_t C, float* __restrict fs,
               float* __restrict fq, double* __restrict out) {
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t r1 = std::min(rows, r0 + kBlockRows);
    std::fill(fs, fs + C, 0.f);
    std::fill(fq, fq + C, 0.f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict xr = x + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = xr[c];
        fs[c] += v;
        fq[c] += v * v;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      out[c] += fs[c];
      out[C + c] += fq[c];
    }
  }
}

template <bool kRelu>
RESNET_JAX_INLINE void BwdStatsImpl(const float* __restrict g, const float* __restrict y,
                                    const float* __restrict x, int64_t rows, int64_t C,
                                    const float* __restrict mean, float* __restrict fs,
                                    float* __restrict fq, double* __restrict out) {
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t r1 = std::min(rows, r0 + kBlockRows);
    std::fill(fs, fs + C, 0.f);
    std::fill(fq, fq + C, 0.f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict gr = g + r * C;
      const float* __restrict yr = y + r * C;
      const float* __restrict xr = x + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const float gv = gr[c];
        const float gm = kRelu ? (yr[c] > 0.f ? gv : 0.f) : gv;
        fs[c] += gm;
        fq[c] += gm * (xr[c] - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      out[c] += fs[c];
      out[C + c] += fq[c];
    }
  }
}

// out[c] += sum of g'[r, c], out[C + c] += sum of g'[r, c] * (x[r, c] - mean[c]).
RESNET_JAX_CLONES
void BwdStatsRows(bool relu, const float* g, const float* y, const float* x, int64_t rows,
                  int64_t C, const float* mean, float* fs, float* fq, double* out) {
  if (relu) {
    BwdStatsImpl<true>(g, y, x, rows, C, mean, fs, fq, out);
  } else {
    BwdStatsImpl<false>(g, y, x, rows, C, mean, fs, fq, out);
  }
}

template <bool kResidual, bool kRelu>
RESNET_JAX_INLINE void ApplyImpl(const float* __restrict x, const float* __restrict res,
                                 float* __restrict out, int64_t rows, int64_t C,
                                 const float* __restrict m, const float* __restrict s,
                                 const float* __restrict b) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict xr = x + r * C;
    const float* __restrict rr = kResidual ? res + r * C : nullptr;
    float* __restrict yr = out + r * C;
    for (int64_t c = 0; c < C; ++c) {
      float v = (xr[c] - m[c]) * s[c] + b[c];
      if (kResidual) v += rr[c];
      if (kRelu) v = v < 0.f ? 0.f : v;  // NaN stays NaN, as jnp.maximum
      yr[c] = v;
    }
  }
}

RESNET_JAX_CLONES
void ApplyRows(bool residual, bool relu, const float* x, const float* res, float* out,
               int64_t rows, int64_t C, const float* m, const float* s, const float* b) {
  if (residual) {
    if (relu) ApplyImpl<true, true>(x, res, out, rows, C, m, s, b);
    else ApplyImpl<true, false>(x, res, out, rows, C, m, s, b);
  } else {
    if (relu) ApplyImpl<false, true>(x, res, out, rows, C, m, s, b);
    else ApplyImpl<false, false>(x, res, out, rows, C, m, s, b);
  }
}

// dx = a * (g' - m_g - (x - mean) * k) with k = inv_std * m_gx; g' written to gm if kMasked.
template <bool kRelu, bool kMasked>
RESNET_JAX_INLINE void BwdApplyImpl(const float* __restrict g, const float* __restrict y,
                                    const float* __restrict x, float* __restrict dx,
                                    float* __restrict gm, int64_t rows, int64_t C,
                                    const float* __restrict mean, const float* __restrict k,
                                    const float* __restrict a, const float* __restrict mg) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict gr = g + r * C;
    const float* __restrict yr = y + r * C;
    const float* __restrict xr = x + r * C;
    float* __restrict dr = dx + r * C;
    float* __restrict mr = kMasked ? gm + r * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const float gv = gr[c];
      const float gk = kRelu ? (yr[c] > 0.f ? gv : 0.f) : gv;
      if (kMasked) mr[c] = gk;
      dr[c] = a[c] * (gk - mg[c] - (xr[c] - mean[c]) * k[c]);
    }
  }
}

RESNET_JAX_CLONES
void BwdApplyRows(bool relu, bool masked, const float* g, const float* y, const float* x,
                  float* dx, float* gm, int64_t rows, int64_t C, const float* mean,
                  const float* k, const float* a, const float* mg) {
  if (relu) {
    if (masked) BwdApplyImpl<true, true>(g, y, x, dx, gm, rows, C, mean, k, a, mg);
    else BwdApplyImpl<true, false>(g, y, x, dx, gm, rows, C, mean, k, a, mg);
  } else {
    if (masked) BwdApplyImpl<false, true>(g, y, x, dx, gm, rows, C, mean, k, a, mg);
    else BwdApplyImpl<false, false>(g, y, x, dx, gm, rows, C, mean, k, a, mg);
  }
}

// ---- threading ----

using resnet_jax::ParallelFor;  // parallel_for.h: chunks on XLA's pool and this thread

// Per-part sums (2*C doubles each) of acc(r0, r1, fs, fq, out) over the rows, combined in part
// order into sums[0:2C]: the same bits for any split.
template <typename Acc>
void Reduce(ffi::ThreadPool& pool, int64_t split, int64_t rows, int64_t C, const Acc& acc,
            std::vector<double>& sums) {
  const int64_t part = PartRows(rows), parts = (rows + part - 1) / part;
  std::vector<double> partial(size_t(parts * 2 * C), 0.0);
  const int64_t chunks = std::clamp<int64_t>(split, 1, parts);
  ParallelFor(pool, chunks, [&](int64_t c) {
    std::vector<float> scratch(size_t(2 * C));
    for (int64_t p = parts * c / chunks; p < parts * (c + 1) / chunks; ++p) {
      const int64_t r0 = p * part, r1 = std::min(rows, r0 + part);
      acc(r0, r1, scratch.data(), scratch.data() + C, partial.data() + p * 2 * C);
    }
  });
  sums.assign(size_t(2 * C), 0.0);
  for (int64_t p = 0; p < parts; ++p) {
    const double* q = partial.data() + p * 2 * C;
    for (int64_t i = 0; i < 2 * C; ++i) sums[i] += q[i];
  }
}

// fn(r0, r1) over `split` contiguous row ranges.
template <typename F>
void Rowwise(ffi::ThreadPool& pool, int64_t split, int64_t rows, const F& fn) {
  if (rows == 0) return;
  const int64_t chunks = std::clamp<int64_t>(split, 1, rows);
  ParallelFor(pool, chunks, [&](int64_t c) { fn(rows * c / chunks, rows * (c + 1) / chunks); });
}

// ---- checks ----

struct Shape {
  int64_t rows = 1, C = 0;
};

std::string Where(const char* op, const char* name) {
  return std::string("resnet_jax ") + op + ": " + name;
}

ffi::Error IsF32(ffi::DataType type, const char* op, const char* name) {
  if (type != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(Where(op, name) + " must be float32");
  }
  return ffi::Error::Success();
}

// x-like operand: float32, rank >= 2; its (rows, C).
ffi::Error Rows(ffi::DataType type, ffi::Span<const int64_t> dims, const char* op,
                const char* name, Shape* shape) {
  if (auto e = IsF32(type, op, name); e.failure()) return e;
  if (dims.size() < 2) {
    return ffi::Error::InvalidArgument(Where(op, name) + " must have rank >= 2 (rows..., C)");
  }
  shape->rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) shape->rows *= dims[i];
  shape->C = dims.back();
  return ffi::Error::Success();
}

// Another x-like operand or result: float32 and exactly x's dimensions.
ffi::Error SameAs(ffi::DataType type, ffi::Span<const int64_t> dims,
                  ffi::Span<const int64_t> x_dims, const char* op, const char* name) {
  if (auto e = IsF32(type, op, name); e.failure()) return e;
  if (!(dims == x_dims)) {
    return ffi::Error::InvalidArgument(Where(op, name) + " must have the shape of x");
  }
  return ffi::Error::Success();
}

// A per-channel operand or result: float32 (k, C).
ffi::Error PerChannel(ffi::DataType type, ffi::Span<const int64_t> dims, int64_t k, int64_t C,
                      const char* op, const char* name) {
  if (auto e = IsF32(type, op, name); e.failure()) return e;
  if (dims.size() != 2 || dims[0] != k || dims[1] != C) {
    return ffi::Error::InvalidArgument(Where(op, name) + " must be (" + std::to_string(k) +
                                       ", C) with C = x's last dimension");
  }
  return ffi::Error::Success();
}

const float* F(const ffi::AnyBuffer& b) { return static_cast<const float*>(b.untyped_data()); }
float* F(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<float*>(b->untyped_data()); }

#define RESNET_JAX_TRY(expr)              \
  do {                                    \
    if (auto e_ = (expr); e_.failure()) { \
      return e_;                          \
    }                                     \
  } while (0)

template <typename Body>
ffi::Error Guard(const char* op, const Body& body) {
  try {
    body();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("resnet_jax ") + op + ": " + e.what());
  }
  return ffi::Error::Success();
}

// ---- handlers ----

ffi::Error StatsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out,
                     int64_t split) {
  const char* op = "bn_stats";
  Shape s;
  RESNET_JAX_TRY(Rows(x.element_type(), x.dimensions(), op, "x", &s));
  RESNET_JAX_TRY(PerChannel(out->element_type(), out->dimensions(), 2, s.C, op, "result"));
  if (s.rows == 0) return ffi::Error::InvalidArgument(Where(op, "x") + " has no rows");
  const float* xp = F(x);
  float* o = F(out);
  const int64_t C = s.C;
  return Guard(op, [&] {
    std::vector<double> sums;
    Reduce(pool, split, s.rows, C,
           [&](int64_t r0, int64_t r1, float* fs, float* fq, double* part) {
             StatsRows(xp + r0 * C, r1 - r0, C, fs, fq, part);
           },
           sums);
    for (int64_t c = 0; c < 2 * C; ++c) o[c] = float(sums[c] / double(s.rows));
  });
}

ffi::Error ApplyCommon(ffi::ThreadPool& pool, const char* op, const ffi::AnyBuffer& x,
                       const ffi::AnyBuffer& coef, const ffi::AnyBuffer* res,
                       ffi::Result<ffi::AnyBuffer>& out, int64_t relu, int64_t split) {
  Shape s;
  RESNET_JAX_TRY(Rows(x.element_type(), x.dimensions(), op, "x", &s));
  RESNET_JAX_TRY(PerChannel(coef.element_type(), coef.dimensions(), 3, s.C, op, "coef"));
  if (res) {
    RESNET_JAX_TRY(SameAs(res->element_type(), res->dimensions(), x.dimensions(), op,
                          "residual"));
  }
  RESNET_JAX_TRY(SameAs(out->element_type(), out->dimensions(), x.dimensions(), op, "result"));
  const float *xp = F(x), *cp = F(coef), *rp = res ? F(*res) : nullptr;
  float* yp = F(out);
  const int64_t C = s.C;
  return Guard(op, [&] {
    Rowwise(pool, split, s.rows, [&](int64_t r0, int64_t r1) {
      ApplyRows(rp != nullptr, relu != 0, xp + r0 * C, rp ? rp + r0 * C : nullptr, yp + r0 * C,
                r1 - r0, C, cp, cp + C, cp + 2 * C);
    });
  });
}

ffi::Error ApplyImplH(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer coef,
                      ffi::Result<ffi::AnyBuffer> out, int64_t relu, int64_t split) {
  return ApplyCommon(pool, "bn_apply", x, coef, nullptr, out, relu, split);
}

ffi::Error ApplyAddImplH(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer coef,
                         ffi::AnyBuffer res, ffi::Result<ffi::AnyBuffer> out, int64_t relu,
                         int64_t split) {
  return ApplyCommon(pool, "bn_apply_add", x, coef, &res, out, relu, split);
}

// g, y, x: the same shape; returns x's (rows, C) in *s.
ffi::Error Gradients(const ffi::AnyBuffer& g, const ffi::AnyBuffer& y, const ffi::AnyBuffer& x,
                     const char* op, Shape* s) {
  RESNET_JAX_TRY(Rows(x.element_type(), x.dimensions(), op, "x", s));
  RESNET_JAX_TRY(SameAs(g.element_type(), g.dimensions(), x.dimensions(), op, "g"));
  RESNET_JAX_TRY(SameAs(y.element_type(), y.dimensions(), x.dimensions(), op, "y"));
  return ffi::Error::Success();
}

ffi::Error BwdStatsImplH(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer y,
                         ffi::AnyBuffer x, ffi::AnyBuffer mi, ffi::Result<ffi::AnyBuffer> out,
                         int64_t relu, int64_t split) {
  const char* op = "bn_bwd_stats";
  Shape s;
  RESNET_JAX_TRY(Gradients(g, y, x, op, &s));
  RESNET_JAX_TRY(PerChannel(mi.element_type(), mi.dimensions(), 2, s.C, op, "mi"));
  RESNET_JAX_TRY(PerChannel(out->element_type(), out->dimensions(), 2, s.C, op, "result"));
  if (s.rows == 0) return ffi::Error::InvalidArgument(Where(op, "x") + " has no rows");
  const float *gp = F(g), *yp = F(y), *xp = F(x), *mp = F(mi);
  float* o = F(out);
  const int64_t C = s.C;
  return Guard(op, [&] {
    std::vector<double> sums;
    Reduce(pool, split, s.rows, C,
           [&](int64_t r0, int64_t r1, float* fs, float* fq, double* part) {
             BwdStatsRows(relu != 0, gp + r0 * C, yp + r0 * C, xp + r0 * C, r1 - r0, C, mp,
                          fs, fq, part);
           },
           sums);
    for (int64_t c = 0; c < C; ++c) {
      o[c] = float(sums[c] / double(s.rows));
      o[C + c] = float(sums[C + c] / double(s.rows) * double(mp[C + c]));
    }
  });
}

ffi::Error BwdApplyCommon(ffi::ThreadPool& pool, const char* op, const ffi::AnyBuffer& g,
                          const ffi::AnyBuffer& y, const ffi::AnyBuffer& x,
                          const ffi::AnyBuffer& coef, ffi::Result<ffi::AnyBuffer>& dx,
                          ffi::Result<ffi::AnyBuffer>* gm, int64_t relu, int64_t split) {
  Shape s;
  RESNET_JAX_TRY(Gradients(g, y, x, op, &s));
  RESNET_JAX_TRY(PerChannel(coef.element_type(), coef.dimensions(), 5, s.C, op, "coef"));
  RESNET_JAX_TRY(SameAs(dx->element_type(), dx->dimensions(), x.dimensions(), op, "dx"));
  if (gm) {
    RESNET_JAX_TRY(SameAs((*gm)->element_type(), (*gm)->dimensions(), x.dimensions(), op,
                          "masked g"));
  }
  const float *gp = F(g), *yp = F(y), *xp = F(x), *cp = F(coef);
  float* dp = F(dx);
  float* mp = gm ? F(*gm) : nullptr;
  const int64_t C = s.C;
  return Guard(op, [&] {
    std::vector<float> k(static_cast<size_t>(C));  // inv_std * m_gx
    for (int64_t c = 0; c < C; ++c) k[c] = cp[C + c] * cp[4 * C + c];
    Rowwise(pool, split, s.rows, [&](int64_t r0, int64_t r1) {
      const int64_t o = r0 * C;
      BwdApplyRows(relu != 0, mp != nullptr, gp + o, yp + o, xp + o, dp + o,
                   mp ? mp + o : nullptr, r1 - r0, C, cp, k.data(), cp + 2 * C, cp + 3 * C);
    });
  });
}

ffi::Error BwdApplyImplH(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer y,
                         ffi::AnyBuffer x, ffi::AnyBuffer coef, ffi::Result<ffi::AnyBuffer> dx,
                         int64_t relu, int64_t split) {
  return BwdApplyCommon(pool, "bn_bwd_apply", g, y, x, coef, dx, nullptr, relu, split);
}

ffi::Error BwdApplyMaskedImplH(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer y,
                               ffi::AnyBuffer x, ffi::AnyBuffer coef,
                               ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> gm,
                               int64_t relu, int64_t split) {
  return BwdApplyCommon(pool, "bn_bwd_apply_masked", g, y, x, coef, dx, &gm, relu, split);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_bn_stats, StatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("split"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_bn_apply, ApplyImplH,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("split"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_bn_apply_add, ApplyAddImplH,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("split"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_bn_bwd_stats, BwdStatsImplH,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("split"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_bn_bwd_apply, BwdApplyImplH,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("split"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_bn_bwd_apply_masked, BwdApplyMaskedImplH,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("split"));

// The instruction set the kernels' hot loops run ("avx512", "avx2", "baseline").
extern "C" const char* resnet_jax_bn_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "baseline";
}
