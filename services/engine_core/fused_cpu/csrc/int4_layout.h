// The constants of the fused step's int4 weight layout (int4_matmul.h describes it), shared by
// its kernels for each instruction set.
#pragma once

#include "common.h"

namespace novainfer {

constexpr int64_t kInt4Group = 32;  // models/int4.py GROUP
constexpr int64_t kInt4Block = 64;  // columns per strip
constexpr int64_t kPrefetchK = 64;  // inputs ahead to prefetch a strip's bytes (2 KB, as torch's kernel)

}  // namespace novainfer
