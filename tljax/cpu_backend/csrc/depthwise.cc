// Depthwise 2-D convolution for XLA:CPU, called through XLA's FFI.
//
// NHWC float32 input, [KH, KW, C] kernel (one filter per channel), explicit
// stride and top/left padding. Channels are contiguous, so every kernel walks
// pixels and vectorises over 16-channel blocks; a block's taps and its
// kernel-gradient accumulators stay in registers for a whole row.
//
// The backward pass is one sweep per image that reads the input and the
// output cotangent once and produces both gradients: the input gradient is
// scattered tap by tap into rows that are still in cache, the kernel gradient
// is accumulated per fixed range of images and summed in order at the end
// (bit-identical from run to run). XLA's intra-op thread pool
// runs the rows (forward) or images (backward).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tljax::ParallelFor;
using tljax::ParallelSlots;
using tljax::ReductionSlots;
using tljax::SlotSums;
using tljax::V16;
using tljax::WithStridesAndPadding;

namespace {

// One 16-channel block, or one channel for the tail of C.
struct Block {
  using T = V16;
  static constexpr int64_t kWidth = 16;
  static T Load(const float* p) { return tljax::Load(p); }
  static void Store(float* p, T v) { tljax::Store(p, v); }
  static T Zero() { return T{}; }
};

struct Lane {
  using T = float;
  static constexpr int64_t kWidth = 1;
  static T Load(const float* p) { return *p; }
  static void Store(float* p, T v) { *p = v; }
  static T Zero() { return 0.0f; }
};

struct Geometry {
  int64_t n, h, w, c, kh, kw, sh, sw, pt, pl, ho, wo;

  // Output columns [lo, hi) whose tap j reads an input column inside the image;
  // 0 <= lo <= hi <= wo, even when the padding or the kernel is wider than the image.
  void Columns(int64_t j, int64_t* lo, int64_t* hi) const {
    int64_t first = pl - j;  // ow * sw >= first
    *lo = std::min(wo, first > 0 ? (first + sw - 1) / sw : 0);
    int64_t last = w - 1 + pl - j;  // ow * sw <= last
    *hi = last < 0 ? 0 : std::min(wo, last / sw + 1);
    if (*hi < *lo) *hi = *lo;
  }
};

// Output columns [lo, hi) whose whole window lies inside the image (no bounds checks needed);
// 0 <= lo <= hi <= wo: columns left of lo are edge columns, and with a left padding wider
// than the output row (a 1-pixel map under a 5x5 kernel) that is all of them, not more.
inline void Interior(const Geometry& g, int64_t* lo, int64_t* hi) {
  *lo = std::min(g.wo, (g.pl + g.sw - 1) / g.sw);
  int64_t last = g.w - g.kw + g.pl;
  *hi = last < 0 ? 0 : std::min(g.wo, last / g.sw + 1);
  if (*hi < *lo) *hi = *lo;
}

// kTile output pixels at once: independent accumulators keep the FMA pipes busy.
constexpr int kTile = 8;

template <class B>
void ForwardRow(const Geometry& g, const float* x, const float* k, float* y, int64_t n,
                int64_t oh, int64_t c0) {
  int64_t ih0 = oh * g.sh - g.pt;
  int64_t i_lo = std::max<int64_t>(0, -ih0), i_hi = std::min(g.kh, g.h - ih0);
  const float* xn = x + n * g.h * g.w * g.c + c0;
  float* yr = y + (n * g.ho + oh) * g.wo * g.c + c0;
  auto edge = [&](int64_t ow) {
    int64_t iw0 = ow * g.sw - g.pl;
    int64_t j_lo = std::max<int64_t>(0, -iw0), j_hi = std::min(g.kw, g.w - iw0);
    typename B::T acc = B::Zero();
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const float* xr = xn + (ih0 + i) * g.w * g.c;  // row start: iw0 may be negative
      const float* kr = k + i * g.kw * g.c + c0;
      for (int64_t j = j_lo; j < j_hi; ++j)
        acc += B::Load(xr + (iw0 + j) * g.c) * B::Load(kr + j * g.c);
    }
    B::Store(yr + ow * g.c, acc);
  };
  int64_t lo, hi;
  Interior(g, &lo, &hi);
  for (int64_t ow = 0; ow < lo; ++ow) edge(ow);
  int64_t ow = lo;
  const int64_t step = g.sw * g.c;
  for (; ow + kTile <= hi; ow += kTile) {
    typename B::T acc[kTile];
#pragma GCC unroll 16
    for (int t = 0; t < kTile; ++t) acc[t] = B::Zero();
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const float* xr = xn + ((ih0 + i) * g.w + ow * g.sw - g.pl) * g.c;
      const float* kr = k + i * g.kw * g.c + c0;
      for (int64_t j = 0; j < g.kw; ++j) {
        typename B::T tap = B::Load(kr + j * g.c);
        const float* xp = xr + j * g.c;
#pragma GCC unroll 16
        for (int t = 0; t < kTile; ++t) acc[t] += B::Load(xp + t * step) * tap;
      }
    }
#pragma GCC unroll 16
    for (int t = 0; t < kTile; ++t) B::Store(yr + (ow + t) * g.c, acc[t]);
  }
  for (; ow < g.wo; ++ow) edge(ow);
}

constexpr int kGradTile = 4;

template <class B>
void BackwardRow(const Geometry& g, const float* x, const float* k, const float* gy, float* dx,
                 float* dk, int64_t n, int64_t oh, int64_t c0) {
  int64_t ih0 = oh * g.sh - g.pt;
  int64_t i_lo = std::max<int64_t>(0, -ih0), i_hi = std::min(g.kh, g.h - ih0);
  const float* gr = gy + (n * g.ho + oh) * g.wo * g.c + c0;
  const int64_t step = g.sw * g.c;
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const float* xr = x + (n * g.h + ih0 + i) * g.w * g.c + c0;
    float* dxr = dx + (n * g.h + ih0 + i) * g.w * g.c + c0;
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t lo, hi;
      g.Columns(j, &lo, &hi);
      typename B::T tap = B::Load(k + (i * g.kw + j) * g.c + c0);
      typename B::T acc[kGradTile];
#pragma GCC unroll 8
      for (int t = 0; t < kGradTile; ++t) acc[t] = B::Zero();
      int64_t ow = lo;
      for (; ow + kGradTile <= hi; ow += kGradTile) {
        const float* gp = gr + ow * g.c;
        int64_t off = (ow * g.sw + j - g.pl) * g.c;
#pragma GCC unroll 8
        for (int t = 0; t < kGradTile; ++t) {
          typename B::T gv = B::Load(gp + t * g.c);
          acc[t] += gv * B::Load(xr + off + t * step);
          B::Store(dxr + off + t * step, B::Load(dxr + off + t * step) + gv * tap);
        }
      }
      for (; ow < hi; ++ow) {
        int64_t off = (ow * g.sw + j - g.pl) * g.c;
        typename B::T gv = B::Load(gr + ow * g.c);
        acc[0] += gv * B::Load(xr + off);
        B::Store(dxr + off, B::Load(dxr + off) + gv * tap);
      }
      float* dkp = dk + (i * g.kw + j) * g.c + c0;
      B::Store(dkp, B::Load(dkp) + ((acc[0] + acc[1]) + (acc[2] + acc[3])));
    }
  }
}

template <class F>
void ForEachBlock(int64_t c, F&& f) {
  int64_t c0 = 0;
  for (; c0 + Block::kWidth <= c; c0 += Block::kWidth) f(Block{}, c0);
  for (; c0 < c; ++c0) f(Lane{}, c0);
}

ffi::Error CheckGeometry(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions kd,
                         ffi::AnyBuffer::Dimensions yd, int64_t sh, int64_t sw, int64_t pt,
                         int64_t pl, Geometry* g) {
  if (xd.size() != 4 || kd.size() != 3 || yd.size() != 4)
    return ffi::Error::InvalidArgument("depthwise: want x [N,H,W,C], kernel [KH,KW,C], y [N,HO,WO,C]");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], sh, sw, pt, pl, yd[1], yd[2]};
  if (kd[2] != g->c || yd[0] != g->n || yd[3] != g->c || sh < 1 || sw < 1 || pt < 0 || pl < 0)
    return ffi::Error::InvalidArgument("depthwise: inconsistent shapes, strides or padding");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  Geometry g;
  if (ffi::Error e = CheckGeometry(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pl, &g);
      e.failure())
    return e;
  const tljax::In xb(x), kb(k);
  tljax::Out yb(y);
  const float* xp = xb.get();
  const float* kp = kb.get();
  float* yp = yb.get();
  auto body = [&](int64_t item, int) {
    int64_t n = item / g.ho, oh = item % g.ho;
    ForEachBlock(g.c, [&](auto b, int64_t c0) {
      ForwardRow<decltype(b)>(g, xp, kp, yp, n, oh, c0);
    });
  };
  ParallelFor(pool, g.n * g.ho, g.n * g.ho, body);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> gy, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  Geometry g;
  if (ffi::Error e = CheckGeometry(x.dimensions(), k.dimensions(), gy.dimensions(), sh, sw, pt, pl, &g);
      e.failure())
    return e;
  const tljax::In xb(x), kb(k), gb(gy);
  tljax::Out dxb(dx), dkb(dk);
  const float* xp = xb.get();
  const float* kp = kb.get();
  const float* gp = gb.get();
  float* dxp = dxb.get();
  int64_t taps = g.kh * g.kw * g.c;
  const int64_t slots = ReductionSlots(g.n, taps * sizeof(float));
  SlotSums sums(dkb.get(), taps, slots);
  auto body = [&](int64_t slot, int64_t n) {
    float* dkw = sums[slot];
    std::memset(dxp + n * g.h * g.w * g.c, 0, sizeof(float) * g.h * g.w * g.c);
    for (int64_t oh = 0; oh < g.ho; ++oh)
      ForEachBlock(g.c, [&](auto b, int64_t c0) {
        BackwardRow<decltype(b)>(g, xp, kp, gp, dxp, dkw, n, oh, c0);
      });
  };
  ParallelSlots(pool, g.n, slots, body);
  sums.Finish(pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(tljax_depthwise_forward, Forward,
                              WithStridesAndPadding(ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(tljax_depthwise_backward, Backward,
                              WithStridesAndPadding(ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()));
