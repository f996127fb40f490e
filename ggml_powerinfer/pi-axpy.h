// y += a * row for a quantized (or F16/F32) row segment: the down projection of sparse FFNs,
// where each firing neuron adds its scaled down_t row to the output. ggml's type traits only
// dequantize (scalar code for most types), so the common down_t types get AVX2 kernels that
// dequantize a block in registers and add it straight into y.
#pragma once

#include "ggml.h"

#include <cstdint>

// y[0..n) += a * row[0..n). `row` points at the first block of the segment; n is a multiple of
// the type's block size.
typedef void (*pi_axpy_fn)(int64_t n, float a, const void * row, float * y);

// The kernel for a type: vectorised for F32, F16, Q8_0, Q5_0, Q5_1 and Q4_0 on AVX2 CPUs, else
// the type's to_float through a small buffer. nullptr if the type cannot be dequantized.
pi_axpy_fn pi_axpy_kernel(enum ggml_type type);
