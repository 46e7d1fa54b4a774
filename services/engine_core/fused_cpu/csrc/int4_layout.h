// The fused step's int4 weight layout, shared by its kernels for each instruction set
// (int4_matmul.h, int4_matmul_avx512.h, int4_matmul_avx2.h) and fused_cpu/int4_matmul.py's pack():
//
//   packed uint8 [N / 16, K / 8, 64]: for 16-column vector v and 8-input chunk c (inputs
//   8c .. 8c + 7), byte 4 l + i holds column 16 v + l's q (0..15) of input 8c + i in its low
//   nibble and of input 8c + 4 + i in its high one;
//   scales_zeros bf16 [K / 32, 2, N]: per group of 32 inputs and column, scale then zero;
//   w = (q - 8) * scale + zero (models/int4.py's values, no requantization).
//
// So one 64-byte line, an and and a shift + and give two byte vectors whose 32-bit lane l holds
// column l's q of 4 consecutive inputs: the unsigned operands of two 4-way integer dot products
// (vpdpbusd) against the int8 activations of those inputs, broadcast. N % 16 == 0 (models/int4.py
// _N_MULTIPLE), K % 32 == 0.
#pragma once

#include "common.h"

namespace novainfer {

constexpr int64_t kInt4Group = 32;  // inputs per scale and zero (models/int4.py GROUP)
constexpr int64_t kInt4Vector = 16;  // columns per vector (a 64-byte line's 16 32-bit lanes)
constexpr int64_t kInt4Chunk = 8;  // inputs per 64-byte line (two nibbles of 4 inputs a lane)

}  // namespace novainfer
