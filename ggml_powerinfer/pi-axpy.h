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

// y[0..n) += sum over r < n_rows of a[r] * rows[r][0..n) for Q4_0 and Q5_0 rows, in integers.
// scale_max[r] is at least the largest |block scale| of row r. Rows go in tiers by
// v_r = |a[r]| * scale_max[r]: a row with v_r in [2^(4t), 2^(4t+4)) has each a[r] * (block scale)
// rounded to a multiple of its tier's step 2^(4t+4-14) (at least 2^10 steps for its largest
// block), and each tier's products with the quants are summed in int32. An element's error is at
// most sum_r step_r/2 * |q_r - offset| (offset 16 for Q5_0, 8 for Q4_0) beyond float rounding,
// for a fraction of the float kernel's instructions. A NaN or infinite coefficient is passed on
// through the float kernel. nullptr for other types, or CPUs without AVX2.
typedef void (*pi_axpy_int_fn)(int64_t n, int64_t n_rows, const float * a, const float * scale_max,
                               const char * const * rows, float * y);
pi_axpy_int_fn pi_axpy_int_kernel(enum ggml_type type);

// The largest |block scale| of a row of n elements, for pi_axpy_int_fn's scale_max; 0 for types
// without an integer kernel.
float pi_row_scale_max(enum ggml_type type, const char * row, int64_t n);
