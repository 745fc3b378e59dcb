// oneDNN 2-D convolutions for XLA:CPU, as XLA FFI handlers (resnet_jax/ops/onednn.py builds,
// loads and wraps them).
//
//   resnet_jax_onednn_conv_fwd          y  = conv(x, w)          x: NHWC, w: HWIO, y: NHWC
//   resnet_jax_onednn_conv_bwd_data     dx = conv^T_x(dy, w)     (the input gradient)
//   resnet_jax_onednn_conv_bwd_weights  dw = conv^T_w(x, dy)     (the weight gradient)
//
// Attributes (int64): stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, threads
// (OpenMP threads for this call; 0 keeps the OpenMP default), split (> 1: the batch in that many
// single-threaded slices on XLA's own thread pool instead of an OpenMP team). float32 and
// bfloat16 (where this CPU's oneDNN has a bf16 convolution); no dilation or groups
// (resnet_jax's networks use none).
//
// Activations stay in XLA's NHWC layout (no reorders of the large tensors); oneDNN picks its own
// weight layout ("any") and the small kernels are reordered from/to HWIO on every call (1x1
// stride-1 weight gradients excepted: written in HWIO, see Create).
// Primitives are created once per (kind, dtype, shapes, strides, padding, threads) and cached;
// the scratchpad is user-managed and per calling thread, so concurrent calls from several XLA
// threads (one per CPU device) never share memory.

#include <oneapi/dnnl/dnnl.hpp>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

enum Kind : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// (kind, dtype, N, H, W, C, KH, KW, O, OH, OW, sh, sw, pt, pb, pl, pr, threads)
using Key = std::array<int64_t, 18>;

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

struct Conv {
  dnnl::primitive prim;
  memory::desc weights_md;       // oneDNN's chosen weight layout
  memory::desc user_weights_md;  // HWIO
  dnnl::reorder weights_reorder; // HWIO -> chosen (forward, backward data) or back (weights)
  bool needs_reorder = false;
  size_t scratchpad_bytes = 0;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::mutex cache_mutex;
std::unordered_map<Key, std::shared_ptr<const Conv>, KeyHash> cache;

struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;
};

Geometry GeometryOf(const Key& k) {
  const int64_t n = k[2], h = k[3], w = k[4], c = k[5], kh = k[6], kw = k[7], o = k[8];
  const int64_t oh = k[9], ow = k[10];
  return {{n, c, h, w}, {o, c, kh, kw}, {n, o, oh, ow}, {k[11], k[12]}, {k[13], k[15]},
          {k[14], k[16]}};
}

std::shared_ptr<const Conv> Create(const Key& k) {
  const Geometry g = GeometryOf(k);
  const auto dt = k[1] == 1 ? memory::data_type::bf16 : memory::data_type::f32;
  const memory::desc src(g.src, dt, Tag::nhwc), dst(g.dst, dt, Tag::nhwc);
  const memory::desc any_weights(g.weights, dt, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& engine = Engine();
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      engine, dnnl::prop_kind::forward_training, algo, src, any_weights, dst, g.strides, g.pad_l,
      g.pad_r, attr);
  auto conv = std::make_shared<Conv>();
  conv->user_weights_md = memory::desc(g.weights, dt, Tag::hwio);
  if (k[0] == kForward) {
    conv->prim = dnnl::convolution_forward(fwd);
    conv->weights_md = fwd.weights_desc();
    conv->scratchpad_bytes = fwd.scratchpad_desc().get_size();
  } else if (k[0] == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        engine, algo, src, any_weights, dst, g.strides, g.pad_l, g.pad_r, fwd, attr);
    conv->prim = dnnl::convolution_backward_data(bwd);
    conv->weights_md = bwd.weights_desc();
    conv->scratchpad_bytes = bwd.scratchpad_desc().get_size();
  } else {
    // A float32 1x1 stride-1 weight gradient is written straight into HWIO: there oneDNN runs
    // a GEMM, 1.1-2x faster than its blocked 1x1 kernel on ResNet-50's shapes (16 images, one
    // thread: 359 -> 279 ms of a step's 1x1 weight gradients; benchmarks/RESULTS.md).
    const bool plain = k[1] == 0 && k[6] == 1 && k[7] == 1 && k[11] == 1 && k[12] == 1;
    dnnl::convolution_backward_weights::primitive_desc bwd(
        engine, algo, src, plain ? conv->user_weights_md : any_weights, dst, g.strides, g.pad_l,
        g.pad_r, fwd, attr);
    conv->prim = dnnl::convolution_backward_weights(bwd);
    conv->weights_md = bwd.diff_weights_desc();
    conv->scratchpad_bytes = bwd.scratchpad_desc().get_size();
  }
  conv->needs_reorder = conv->weights_md != conv->user_weights_md;
  if (conv->needs_reorder) {
    conv->weights_reorder = k[0] == kBackwardWeights
        ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, conv->weights_md, engine,
                                                      conv->user_weights_md))
        : dnnl::reorder(dnnl::reorder::primitive_desc(engine, conv->user_weights_md, engine,
                                                      conv->weights_md));
  }
  return conv;
}

std::shared_ptr<const Conv> Get(const Key& k) {
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
  }
  auto conv = Create(k);  // outside the lock: creation may take milliseconds
  std::lock_guard<std::mutex> lock(cache_mutex);
  return cache.emplace(k, std::move(conv)).first->second;
}

// Per calling thread: a stream and grow-only buffers for the scratchpad and reordered weights.
struct ThreadBuffers {
  dnnl::stream stream{Engine()};
  std::vector<uint8_t> scratchpad, weights;
};

ThreadBuffers& Buffers() {
  thread_local ThreadBuffers buffers;
  return buffers;
}

uint8_t* Grow(std::vector<uint8_t>& v, size_t bytes) {
  if (v.size() < bytes) v.resize(bytes);
  return v.data();
}

ffi::Error Check4D(const ffi::AnyBuffer& b, const char* name) {
  if (b.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument(std::string(name) + " must be 4-D");
  }
  return ffi::Error::Success();
}

// One problem (key) on the calling thread: `a`, `b` the inputs, `out` the result (raw pointers
// to NHWC activations / HWIO weights):
//   forward: (x, w) -> y;  backward data: (dy, w) -> dx;  backward weights: (x, dy) -> dw.
void Execute(const Key& key, void* a, void* b, void* out) {
  const Kind kind = static_cast<Kind>(key[0]);
  auto conv = Get(key);
  const Geometry g = GeometryOf(key);
  const auto dt = key[1] ? memory::data_type::bf16 : memory::data_type::f32;
  auto& engine = Engine();
  auto& buf = Buffers();
  const memory::desc src_md(g.src, dt, Tag::nhwc), dst_md(g.dst, dt, Tag::nhwc);
  memory scratch(memory::desc({int64_t(conv->scratchpad_bytes)}, memory::data_type::u8, Tag::a),
                 engine, Grow(buf.scratchpad, conv->scratchpad_bytes + 1));
  // The weights as oneDNN wants them: the user's HWIO buffer, or a reordered copy.
  memory user_weights(conv->user_weights_md, engine, kind == kBackwardWeights ? out : b);
  memory weights = conv->needs_reorder
      ? memory(conv->weights_md, engine, Grow(buf.weights, conv->weights_md.get_size()))
      : user_weights;
  if (conv->needs_reorder && kind != kBackwardWeights) {
    conv->weights_reorder.execute(buf.stream, user_weights, weights);
  }
  if (kind == kForward) {
    memory src(src_md, engine, a), dst(dst_md, engine, out);
    conv->prim.execute(buf.stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                                    {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == kBackwardData) {
    memory diff_dst(dst_md, engine, a), diff_src(src_md, engine, out);
    conv->prim.execute(buf.stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights},
                                    {DNNL_ARG_DIFF_SRC, diff_src},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    memory src(src_md, engine, a), diff_dst(dst_md, engine, b);
    conv->prim.execute(buf.stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                    {DNNL_ARG_DIFF_WEIGHTS, weights},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
    if (conv->needs_reorder) conv->weights_reorder.execute(buf.stream, weights, user_weights);
  }
  buf.stream.wait();
}

std::string Describe(const std::exception& e, const Key& key) {
  return std::string("oneDNN conv: ") + e.what() +
         (key[1] ? " (no bfloat16 convolution on this CPU?)" : "");
}

// Split mode: the batch in `chunks` slices, each a single-threaded oneDNN call, run on XLA's
// own intra-op thread pool (the FFI's thread-pool context) and on the calling thread, which
// claims slices too (so it never waits on a pool busy elsewhere, and cannot deadlock). The
// weight gradient sums the slices' partial gradients (float32 only; see Run).
// A slice's failure, already described; rethrown on the calling thread (parallel_for.h).
struct SliceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void RunSplit(ffi::ThreadPool& pool, const Key& key, int64_t chunks, uint8_t* a, uint8_t* b,
              uint8_t* out, size_t elem) {
  const Kind kind = static_cast<Kind>(key[0]);
  const int64_t n = key[2];
  const size_t x_row = size_t(key[3] * key[4] * key[5]) * elem;
  const size_t y_row = size_t(key[9] * key[10] * key[8]) * elem;
  const size_t w_size = size_t(key[6] * key[7] * key[5] * key[8]);
  std::vector<float> partial(kind == kBackwardWeights ? w_size * (chunks - 1) : 0);
  resnet_jax::ParallelFor<SliceError>(pool, chunks, [&](int64_t c) {
    if (omp_get_max_threads() != 1) omp_set_num_threads(1);
    const int64_t n0 = n * c / chunks, n1 = n * (c + 1) / chunks;
    Key k = key;
    k[2] = n1 - n0;
    k[17] = 1;
    try {
      if (kind == kForward) {
        Execute(k, a + n0 * x_row, b, out + n0 * y_row);
      } else if (kind == kBackwardData) {
        Execute(k, a + n0 * y_row, b, out + n0 * x_row);
      } else {
        void* dw = c == 0 ? static_cast<void*>(out) : partial.data() + (c - 1) * w_size;
        Execute(k, a + n0 * x_row, b + n0 * y_row, dw);
      }
    } catch (const std::exception& e) {
      throw SliceError(Describe(e, key));
    }
  });
  if (kind == kBackwardWeights) {
    float* dw = reinterpret_cast<float*>(out);
    for (int64_t c = 0; c + 1 < chunks; ++c) {
      const float* p = partial.data() + c * w_size;
      for (size_t i = 0; i < w_size; ++i) dw[i] += p[i];
    }
  }
}

// The handler body for all three kinds: checks, then one oneDNN call on an OpenMP team of
// `threads` (split <= 1), or `split` single-threaded slices on XLA's pool.
ffi::Error Run(Kind kind, ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
               ffi::Result<ffi::AnyBuffer> out, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
               int64_t pl, int64_t pr, int64_t threads, int64_t split) {
  const auto type = a.element_type();
  if (type != b.element_type() || type != out->element_type()) {
    return ffi::Error::InvalidArgument("oneDNN conv: operands and result must share a dtype");
  }
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("oneDNN conv: only float32 and bfloat16 are supported");
  }
  for (auto [buf, name] : {std::pair{&a, "first operand"}, {&b, "second operand"}}) {
    if (auto e = Check4D(*buf, name); e.failure()) return e;
  }
  if (auto e = Check4D(*out, "result"); e.failure()) return e;
  // x (NHWC), w (HWIO), y (NHWC) dimensions from whichever buffers hold them.
  const auto x = kind == kBackwardData ? out->dimensions() : a.dimensions();
  const auto w = kind == kForward ? b.dimensions()
                                  : (kind == kBackwardData ? b.dimensions() : out->dimensions());
  const auto y = kind == kForward ? out->dimensions()
                                  : (kind == kBackwardData ? a.dimensions() : b.dimensions());
  if (w[2] != x[3] || w[3] != y[3] || x[0] != y[0]) {
    return ffi::Error::InvalidArgument("oneDNN conv: channel or batch sizes do not match");
  }
  if ((x[1] + pt + pb - w[0]) / sh + 1 != y[1] || (x[2] + pl + pr - w[1]) / sw + 1 != y[2]) {
    return ffi::Error::InvalidArgument("oneDNN conv: output size does not match the geometry");
  }
  const bool bf16 = type == ffi::DataType::BF16;
  const int64_t chunks = std::min<int64_t>(bf16 && kind == kBackwardWeights ? 1 : split, x[0]);
  if (chunks <= 1 && threads > 0 && omp_get_max_threads() != threads) {
    omp_set_num_threads(int(threads));
  }
  const Key key{kind, bf16 ? 1 : 0, x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
                sh, sw, pt, pb, pl, pr, chunks > 1 ? 1 : omp_get_max_threads()};
  try {
    if (chunks > 1) {
      RunSplit(pool, key, chunks, static_cast<uint8_t*>(a.untyped_data()),
               static_cast<uint8_t*>(b.untyped_data()),
               static_cast<uint8_t*>(out->untyped_data()), bf16 ? 2 : 4);
    } else {
      Execute(key, a.untyped_data(), b.untyped_data(), out->untyped_data());
    }
  } catch (const SliceError& e) {
    return ffi::Error::Internal(e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(Describe(e, key));
  }
  return ffi::Error::Success();
}

#define RESNET_JAX_CONV_HANDLER(name, kind)                                                  \
  ffi::Error name##Impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,            \
                        ffi::Result<ffi::AnyBuffer> out, int64_t sh, int64_t sw, int64_t pt, \
                        int64_t pb, int64_t pl, int64_t pr, int64_t threads, int64_t split) { \
    return Run(kind, pool, a, b, out, sh, sw, pt, pb, pl, pr, threads, split);               \
  }

RESNET_JAX_CONV_HANDLER(ConvForward, kForward)
RESNET_JAX_CONV_HANDLER(ConvBackwardData, kBackwardData)
RESNET_JAX_CONV_HANDLER(ConvBackwardWeights, kBackwardWeights)

}  // namespace

#define RESNET_JAX_BIND                                                                      \
  ffi::Ffi::Bind()                                                                           \
      .Ctx<ffi::ThreadPool>()                                                                \
      .Arg<ffi::AnyBuffer>()                                                                 \
      .Arg<ffi::AnyBuffer>()                                                                 \
      .Ret<ffi::AnyBuffer>()                                                                 \
      .Attr<int64_t>("stride_h")                                                             \
      .Attr<int64_t>("stride_w")                                                             \
      .Attr<int64_t>("pad_top")                                                              \
      .Attr<int64_t>("pad_bottom")                                                           \
      .Attr<int64_t>("pad_left")                                                             \
      .Attr<int64_t>("pad_right")                                                            \
      .Attr<int64_t>("threads")                                                              \
      .Attr<int64_t>("split")

XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_onednn_conv_fwd, ConvForwardImpl, RESNET_JAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_onednn_conv_bwd_data, ConvBackwardDataImpl,
                              RESNET_JAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(resnet_jax_onednn_conv_bwd_weights, ConvBackwardWeightsImpl,
                              RESNET_JAX_BIND);

// The oneDNN version this library runs with and the instruction set it dispatches to.
extern "C" const char* resnet_jax_onednn_describe() {
  static std::string text = [] {
    const dnnl_version_t* v = dnnl_version();
    std::string isa;
    switch (dnnl::get_effective_cpu_isa()) {
      case dnnl::cpu_isa::avx2: isa = "avx2"; break;
      case dnnl::cpu_isa::avx2_vnni: isa = "avx2_vnni"; break;
      case dnnl::cpu_isa::avx512_core: isa = "avx512_core"; break;
      case dnnl::cpu_isa::avx512_core_vnni: isa = "avx512_core_vnni"; break;
      case dnnl::cpu_isa::avx512_core_bf16: isa = "avx512_core_bf16"; break;
      case dnnl::cpu_isa::avx512_core_amx: isa = "avx512_core_amx"; break;
      default: isa = "other"; break;
    }
    return "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch) + " (" +
           (v->cpu_runtime == DNNL_RUNTIME_OMP ? "OpenMP" : "other runtime") + "), " + isa;
  }();
  return text.c_str();
}
