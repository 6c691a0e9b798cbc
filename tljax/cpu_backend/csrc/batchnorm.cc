// Per-channel sums for BatchNorm over [pixels, C] activations, one pass each.
//
// Training BatchNorm needs two sums per channel forward (x and x^2) and two
// backward (g and g * x). XLA:CPU runs each as its own reduction, a full read
// of the activations apiece: in a MobileNetV2 step these reductions took over a
// third of the time. Here both sums come from one read. Rows are cut into
// chunks summed locally, chunks into fixed slot ranges summed in order, slots
// added in order: the result is the same on every run and thread count.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tljax::Load;
using tljax::ParallelSlots;
using tljax::ReductionSlots;
using tljax::SlotSums;
using tljax::Store;
using tljax::V16;

namespace {

constexpr int64_t kChunkRows = 256;

// Few channels (a row shorter than a few vectors): the rows of a chunk are one flat stream
// whose channel pattern repeats every `period` = lcm(C, 16) floats, so V = period / 16
// register accumulators per sum cover it; they are folded into channels at the end.
template <int V>
void FlatSums(const float* a, const float* b, int64_t channels, int64_t count, float* local) {
  V16 s1[V] = {}, s2[V] = {};
  for (int64_t i = 0; i < count; i += 16 * V)
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) {
      V16 av = Load(a + i + 16 * j);
      s1[j] += av;
      s2[j] += av * Load(b + i + 16 * j);
    }
  for (int j = 0; j < V; ++j)
    for (int l = 0; l < 16; ++l) {
      const int64_t c = (16 * j + l) % channels;
      local[c] += s1[j][l];
      local[channels + c] += s2[j][l];
    }
}

// The register accumulators a flat stream of `channels` needs, or 0 when there are too many.
int FlatVectors(int64_t channels) {
  int64_t period = channels;
  while (period % 16) period += channels;
  return period / 16 <= 8 ? static_cast<int>(period / 16) : 0;
}

// sums[0, c] += sum_r a[r, c]; sums[1, c] += sum_r a[r, c] * b[r, c] over rows [r0, r1),
// first into a chunk-local buffer.
void ChunkSums(const float* a, const float* b, int64_t channels, int64_t r0, int64_t r1,
               float* local, float* sums) {
  std::fill(local, local + 2 * channels, 0.0f);
  const int64_t vec = channels / 16 * 16;
  if (const int v = FlatVectors(channels); v > 0) {
    const int64_t period = 16 * v, rows_per_period = period / channels;
    const int64_t flat_rows = (r1 - r0) / rows_per_period * rows_per_period;
    const float* ar = a + r0 * channels;
    const float* br = b + r0 * channels;
    const int64_t count = flat_rows * channels;
    switch (v) {
      case 1: FlatSums<1>(ar, br, channels, count, local); break;
      case 2: FlatSums<2>(ar, br, channels, count, local); break;
      case 3: FlatSums<3>(ar, br, channels, count, local); break;
      case 4: FlatSums<4>(ar, br, channels, count, local); break;
      case 5: FlatSums<5>(ar, br, channels, count, local); break;
      case 6: FlatSums<6>(ar, br, channels, count, local); break;
      case 7: FlatSums<7>(ar, br, channels, count, local); break;
      default: FlatSums<8>(ar, br, channels, count, local); break;
    }
    r0 += flat_rows;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* ar = a + r * channels;
    const float* br = b + r * channels;
    int64_t c = 0;
    for (; c < vec; c += 16) {
      V16 av = Load(ar + c);
      Store(local + c, Load(local + c) + av);
      Store(local + channels + c, Load(local + channels + c) + av * Load(br + c));
    }
    for (; c < channels; ++c) {
      local[c] += ar[c];
      local[channels + c] += ar[c] * br[c];
    }
  }
  for (int64_t c = 0; c < 2 * channels; ++c) sums[c] += local[c];
}

// out [2, C]: sum of a and of a * b over all leading axes (b = a for BatchNorm's statistics).
ffi::Error Sums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> out) {
  const auto ad = a.dimensions(), od = out->dimensions();
  if (ad.size() == 0 || a.element_count() != b.element_count() || od.size() != 2 || od[0] != 2 ||
      od[1] != ad.back())
    return ffi::Error::InvalidArgument(
        "batchnorm sums: want a and b of one shape [..., C] and out [2, C]");
  const int64_t channels = ad.back();
  const int64_t rows = channels ? static_cast<int64_t>(a.element_count()) / channels : 0;
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int64_t slots = std::max<int64_t>(1, ReductionSlots(chunks, 2 * channels * sizeof(float)));
  const tljax::In ab(a), bb(b);
  tljax::Out ob(out);
  SlotSums sums(ob.get(), 2 * channels, slots);
  std::vector<float> local(static_cast<size_t>(slots * 2 * channels));
  const float* ap = ab.get();
  const float* bp = bb.get();
  auto body = [&](int64_t slot, int64_t chunk) {
    const int64_t r0 = chunk * kChunkRows, r1 = std::min(rows, r0 + kChunkRows);
    ChunkSums(ap, bp, channels, r0, r1, local.data() + slot * 2 * channels, sums[slot]);
  };
  if (chunks > 0) ParallelSlots(pool, chunks, slots, body);
  sums.Finish(pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(tljax_batchnorm_sums, Sums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
