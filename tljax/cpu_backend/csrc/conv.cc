// Dense (groups = 1) 2-D convolution for XLA:CPU as an indirect GEMM.
//
// Output pixels are the GEMM rows, output channels its columns, (tap, input
// channel) its depth. No im2col buffer is built: a tile of output pixels
// keeps one pointer per pixel to the input row a tap reads (or to a zero row
// where the tap falls in the padding), and the micro-kernel broadcasts from
// those rows against 32 output channels of the HWIO kernel, accumulating a
// 12 x 32 block in registers. Work items are chunks of output pixels, so
// every thread of XLA's pool writes its own rows.
//
// The input gradient of a stride-1 convolution is the same computation
// (cotangent in, flipped and transposed kernel), set up on the JAX side.
// The kernel gradient is the transposed product: per tap, input rows^T times
// cotangent rows, over chunks of output pixels; fixed ranges of chunks
// accumulate into their own copies, summed in order at the end, so the result
// does not depend on thread scheduling (see KernelGrad for how work is cut).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tljax::Load;
using tljax::ParallelFor;
using tljax::ReductionSlots;
using tljax::SlotSums;
using tljax::Store;
using tljax::V16;
using tljax::WithStridesAndPadding;

namespace {

constexpr int kRows = 12;         // output pixels per register tile
constexpr int64_t kTiles = 6;     // tiles per work item
constexpr int64_t kDepth = 256;   // input channels per pass (keeps the kernel slice in L2)
constexpr int64_t kGroupFloats = 160 * 1024;  // kernel floats per multi-tap pass (640 KB)

// out[r, 16v..] (+)= sum_t sum_c rows[t][r][c] * b[(t * depth + c) * ldb + 16v ..] over `taps`
// consecutive taps whose kernel rows follow each other; rows >= valid are not stored.
template <int NV>
inline void Micro(const float* const* rows, int64_t tap_stride, int64_t taps, const float* b,
                  int64_t ldb, int64_t depth, float* out, int64_t ldo, int valid,
                  bool accumulate) {
  V16 acc[kRows][NV];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      acc[r][v] = (accumulate && r < valid) ? Load(out + r * ldo + 16 * v) : V16{};
  for (int64_t t = 0; t < taps; ++t, b += depth * ldb) {
    const float* rp[kRows];
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) rp[r] = rows[t * tap_stride + r];
    for (int64_t c = 0; c < depth; ++c) {
      V16 bv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) bv[v] = Load(b + c * ldb + 16 * v);
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) {
        float a = rp[r][c];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * a;
      }
    }
  }
  for (int r = 0; r < valid; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) Store(out + r * ldo + 16 * v, acc[r][v]);
}

struct Geometry {
  int64_t n, h, w, cin, kh, kw, sh, sw, pt, pl, ho, wo, cout, stride, merge;
};

ffi::Error Check(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions kd,
                 ffi::AnyBuffer::Dimensions yd, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                 Geometry* g) {
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument(
        "conv: want x [N,H,W,Cin], kernel [KH,KW,Cin,Cout], y [N,HO,WO,Cout]");
  *g = Geometry{xd[0], xd[1], xd[2], kd[2], kd[0], kd[1], sh, sw, pt, pl, yd[1], yd[2], kd[3],
                xd[3], kd[2] / std::max<int64_t>(1, xd[3])};
  if (kd[2] != xd[3] && (kd[1] != 1 || xd[3] < 1 || kd[2] % xd[3] || pt || pl))
    return ffi::Error::InvalidArgument(
        "conv: a kernel deeper than the input must be [KH, 1, KW*C, Cout] over a padded input");
  if (yd[0] != g->n || yd[3] != g->cout || g->cout < 16 || g->cout % 16 || g->kh < 1 ||
      g->kw < 1 || g->cin < 1 || sh < 1 || sw < 1 || pt < 0 || pl < 0)
    return ffi::Error::InvalidArgument(
        "conv: inconsistent shapes, strides or padding (output channels must be a positive "
        "multiple of 16, the kernel and the input channels non-empty)");
  return ffi::Error::Success();
}

// rows[q] = the input row that output pixel p0 + q reads at tap (i, j), or `zeros` in
// the padding; pixel coordinates advance incrementally (no divisions per row).
inline void TapRows(const Geometry& g, const float* x, const float* zeros, int64_t p0,
                    int64_t count, int64_t i, int64_t j, const float** rows) {
  const int64_t plane = g.ho * g.wo;
  int64_t n = p0 / plane, oh = p0 % plane / g.wo, ow = p0 % g.wo;
  for (int64_t q = 0; q < count; ++q) {
    const int64_t ih = oh * g.sh + i - g.pt, iw = ow * g.sw + j - g.pl;
    rows[q] = (ih < 0 || ih >= g.h || iw < 0 || iw + g.merge > g.w)
        ? zeros : x + ((n * g.h + ih) * g.w + iw) * g.stride;
    if (++ow == g.wo) {
      ow = 0;
      if (++oh == g.ho) oh = 0, ++n;
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  Geometry g;
  if (ffi::Error e = Check(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pl, &g);
      e.failure())
    return e;
  const tljax::In xb(x), kb(k);
  tljax::Out yb(y);
  const float* xp = xb.get();
  const float* kp = kb.get();
  float* yp = yb.get();
  const std::vector<float> zeros(static_cast<size_t>(g.cin), 0.0f);
  const int64_t pixels = g.n * g.ho * g.wo, chunk = kRows * kTiles, taps = g.kh * g.kw;
  // Taps whose whole kernel slice fits the L2 budget run in one register-resident pass;
  // deeper inputs go one tap and kDepth channels at a time.
  const int64_t group = g.cin > kDepth ? 1
      : std::clamp<int64_t>(kGroupFloats / (g.cin * g.cout), 1, taps);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  std::vector<const float*> scratch(static_cast<size_t>(threads * taps * chunk));
  const int64_t items = (pixels + chunk - 1) / chunk;
  auto body = [&](int64_t item, int worker) {
    const int64_t p0 = item * chunk, p1 = std::min(pixels, p0 + chunk);
    const float** rows = scratch.data() + worker * taps * chunk;
    for (int64_t t = 0; t < taps; ++t) {
      TapRows(g, xp, zeros.data(), p0, p1 - p0, t / g.kw, t % g.kw, rows + t * chunk);
      std::fill(rows + t * chunk + (p1 - p0), rows + (t + 1) * chunk, zeros.data());
    }
    for (int64_t t0 = 0; t0 < taps; t0 += group) {
      const int64_t nt = std::min(group, taps - t0);
      for (int64_t c0 = 0; c0 < g.cin; c0 += kDepth) {
        const int64_t depth = std::min(kDepth, g.cin - c0);
        const bool accumulate = t0 > 0 || c0 > 0;
        const float* kt = kp + (t0 * g.cin + c0) * g.cout;
        for (int64_t tile = 0; tile * kRows < p1 - p0; ++tile) {
          const float* tr[kRows];
          const float* const* src = rows + t0 * chunk + tile * kRows;
          int64_t stride = chunk;
          if (c0 > 0) {  // one tap (group == 1): shift its pointers to the channel chunk
            for (int r = 0; r < kRows; ++r) tr[r] = src[r] + c0;
            src = tr;
            stride = kRows;
          }
          const int valid = static_cast<int>(std::min<int64_t>(kRows, p1 - p0 - tile * kRows));
          float* out = yp + (p0 + tile * kRows) * g.cout;
          int64_t co = 0;
          for (; co + 32 <= g.cout; co += 32)
            Micro<2>(src, stride, nt, kt + co, g.cout, depth, out + co, g.cout, valid, accumulate);
          if (co < g.cout)
            Micro<1>(src, stride, nt, kt + co, g.cout, depth, out + co, g.cout, valid, accumulate);
        }
      }
    }
  };
  ParallelFor(pool, items, items, body);
  return ffi::Error::Success();
}

constexpr int64_t kGradPixels = 128;  // output pixels per kernel-gradient work item

// acc[r, 16v..] += sum_q rows[q][c0 + r] * ct[q * ldc + 16v ..] for the item's pixels q;
// a partial last block (valid < kRows) repeats its last channel and stores `valid` rows.
template <int NV>
inline void MicroGrad(const float* const* rows, int64_t c0, const float* ct, int64_t ldc,
                      int64_t count, float* out, int64_t ldo, int valid) {
  V16 acc[kRows][NV];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = r < valid ? Load(out + r * ldo + 16 * v) : V16{};
  int64_t off[kRows];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) off[r] = c0 + std::min(r, valid - 1);
  for (int64_t q = 0; q < count; ++q) {
    const float* row = rows[q];
    V16 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = Load(ct + q * ldc + 16 * v);
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      float a = row[off[r]];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * a;
    }
  }
  for (int r = 0; r < valid; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) Store(out + r * ldo + 16 * v, acc[r][v]);
}

// Kernel-gradient work items are (slot, block) pairs. A slot is a fixed range of
// output pixels with its own copy of the gradient (slot 0 writes the output); a
// block is a range of output channels over all taps, at most kBlockFloats of the
// gradient, so its accumulators stay in L2 while the slot's pixels stream past.
// Small kernels are one block and get many slots (parallelism over pixels); large
// ones (ResNet's last stages: 2.4-9.4 MB) get many blocks and one or two slots,
// instead of every pixel chunk sweeping the whole gradient through memory.
constexpr int64_t kBlockFloats = 160 * 1024;
constexpr int64_t kMinItems = 16;

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ct,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pl) {
  Geometry g;
  if (ffi::Error e = Check(x.dimensions(), dk->dimensions(), ct.dimensions(), sh, sw, pt, pl, &g);
      e.failure())
    return e;
  const tljax::In xb(x), cb(ct);
  tljax::Out dkb(dk);
  const float* xp = xb.get();
  const float* cp = cb.get();
  const std::vector<float> zeros(static_cast<size_t>(g.cin), 0.0f);
  const int64_t pixels = g.n * g.ho * g.wo, taps = g.kh * g.kw, size = taps * g.cin * g.cout;
  const int64_t chunks = (pixels + kGradPixels - 1) / kGradPixels;
  const int64_t width = size <= kBlockFloats ? g.cout
      : std::min(g.cout, std::max<int64_t>(32, kBlockFloats / (taps * g.cin) / 32 * 32));
  const int64_t blocks = (g.cout + width - 1) / width;
  const int64_t slots = std::min(ReductionSlots(chunks, size * sizeof(float)),
                                 (kMinItems + blocks - 1) / blocks);
  SlotSums sums(dkb.get(), size, slots);
  auto body = [&](int64_t item, int) {
    const int64_t slot = item / blocks, co0 = item % blocks * width;
    const int64_t co1 = std::min(g.cout, co0 + width);
    float* dkw = sums[slot];
    const float* rows[kGradPixels];
    for (int64_t chunk = slot * chunks / slots, end = (slot + 1) * chunks / slots; chunk < end;
         ++chunk) {
      const int64_t p0 = chunk * kGradPixels, count = std::min(kGradPixels, pixels - p0);
      const float* ctp = cp + p0 * g.cout;
      for (int64_t t = 0; t < taps; ++t) {
        TapRows(g, xp, zeros.data(), p0, count, t / g.kw, t % g.kw, rows);
        float* dkt = dkw + t * g.cin * g.cout;
        for (int64_t c0 = 0; c0 < g.cin; c0 += kRows) {
          const int valid = static_cast<int>(std::min<int64_t>(kRows, g.cin - c0));
          float* out = dkt + c0 * g.cout;
          int64_t co = co0;
          for (; co + 32 <= co1; co += 32)
            MicroGrad<2>(rows, c0, ctp + co, g.cout, count, out + co, g.cout, valid);
          if (co < co1)
            MicroGrad<1>(rows, c0, ctp + co, g.cout, count, out + co, g.cout, valid);
        }
      }
    }
  };
  ParallelFor(pool, slots * blocks, slots * blocks, body);
  sums.Finish(pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(tljax_conv_forward, Forward,
                              WithStridesAndPadding(ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(tljax_conv_kernel_grad, KernelGrad,
                              WithStridesAndPadding(ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()));
