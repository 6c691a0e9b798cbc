// Pieces every tljax FFI kernel uses: 16-float vectors and the conv attributes.
#ifndef TLJAX_OPS_CSRC_COMMON_H_
#define TLJAX_OPS_CSRC_COMMON_H_

#include <cstdint>
#include <cstring>
#include <utility>

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

#endif  // TLJAX_OPS_CSRC_COMMON_H_
