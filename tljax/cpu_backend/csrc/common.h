// Pieces every tljax FFI kernel uses: 16-float vectors and the conv attributes.
#ifndef TLJAX_CPU_BACKEND_CSRC_COMMON_H_
#define TLJAX_CPU_BACKEND_CSRC_COMMON_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace tljax {

// Sixteen floats: one AVX-512 register, two AVX ones; GCC picks the instructions.
typedef float V16 __attribute__((vector_size(64)));

inline V16 Load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, V16 v) { std::memcpy(p, &v, sizeof v); }

// A kernel's pointer to one of its input (In) or output (Out) buffers. In the sanitizer
// build (TLJAX_ISOLATE_BUFFERS, see tljax/cpu_backend/native.py) each is a heap copy of exactly the
// buffer's size: XLA:CPU packs a program's temporaries into one allocation, where an
// out-of-bounds access lands in a neighbour that ASan sees as valid memory; a copy has
// redzones on both sides. Outputs start as NaN there, so an element a kernel never writes
// shows in its results. Elsewhere both are the buffer's own pointer.
class In {
 public:
  template <class Buffer>
  explicit In(const Buffer& b)
#ifdef TLJAX_ISOLATE_BUFFERS
      : copy_(b.typed_data(), b.typed_data() + b.element_count()) {}
  const float* get() const { return copy_.data(); }

 private:
  std::vector<float> copy_;
#else
      : p_(b.typed_data()) {}
  const float* get() const { return p_; }

 private:
  const float* p_;
#endif
};

class Out {
 public:
  template <class Result>
  explicit Out(Result& r)
#ifdef TLJAX_ISOLATE_BUFFERS
      : p_(r->typed_data()), copy_(r->element_count(), std::numeric_limits<float>::quiet_NaN()) {}
  ~Out() { std::copy(copy_.begin(), copy_.end(), p_); }
  float* get() { return copy_.data(); }
#else
      : p_(r->typed_data()) {}
  float* get() { return p_; }
#endif
  Out(const Out&) = delete;
  Out& operator=(const Out&) = delete;

 private:
  float* p_;
#ifdef TLJAX_ISOLATE_BUFFERS
  std::vector<float> copy_;
#endif
};

// Appends the attributes every conv kernel takes: strides and top/left padding
// (bottom/right padding follows from the output's shape).
template <class Binding>
auto WithStridesAndPadding(Binding binding) {
  return std::move(binding).template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pl");
}

}  // namespace tljax

#endif  // TLJAX_CPU_BACKEND_CSRC_COMMON_H_
