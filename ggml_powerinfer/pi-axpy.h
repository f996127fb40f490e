// y += sum_r a[r] * row_r for quantized (or F16/F32) row segments: the down projection of sparse
// FFNs, where each firing neuron adds its scaled down_t row to the output. ggml's type traits
// only dequantize (scalar code for most types), so the common down_t types get AVX2 kernels that
// dequantize a block in registers and add it straight into y, several rows per pass over y.
#pragma once

#include "ggml.h"

#include <cstdint>

// Most rows added by one call.
constexpr int PI_AXPY_ROWS = 4;

// y[0..n) += sum over r < n_rows of a[r] * rows[r][0..n), 1 <= n_rows <= PI_AXPY_ROWS. Each row
// points at the first block of its segment; n is a multiple of the type's block size. `next`
// (n_next rows, may be 0) are the segments of the following call, prefetched.
typedef void (*pi_axpy_fn)(int64_t n, int n_rows, const float * a, const char * const * rows, int n_next,
                           const char * const * next, float * y);

// The kernel for a type: vectorised for F32, F16, Q8_0, Q5_0, Q5_1 and Q4_0 on AVX2 CPUs, else
// the type's to_float through a small buffer. nullptr if the type cannot be dequantized.
pi_axpy_fn pi_axpy_kernel(enum ggml_type type);
