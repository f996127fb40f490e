// Dot products of several weight rows with one activation row, for the types where ggml's
// one-row vec_dot is latency-bound: its loop carries one FMA chain, so a row costs at least
// four cycles per block. Up to eight rows at once run eight chains and share the activation
// loads. The rows can lie anywhere (a sparse FFN gathers the rows of its active neurons), and
// the kernel prefetches the rows of the next group while it reads the current one, so a
// gathered row does not wait for DRAM when its first cache line is touched.
//
// The results are bit-identical to ggml's vec_dot for the same row: every row keeps the same
// per-block integer lanes, the same FMA sequence and the same final horizontal sum.
#pragma once

#include "ggml.h"

#include <cstddef>

// Most rows handled by one call.
constexpr int PI_DOT_ROWS = 8;

// out[r] = dot(rows[r], y) for r in [0, n_rows), 1 <= n_rows <= PI_DOT_ROWS; y is the activation
// already converted to the type's vec_dot_type. `next` (n_next rows, may be 0) are the rows of
// the following call, prefetched.
typedef void (*pi_dot_rows_fn)(int n, int n_rows, float * out, const char * const * rows, int n_next,
                               const char * const * next, const void * y);

// The kernel for a weight type on this CPU, or nullptr (then use vec_dot row by row).
pi_dot_rows_fn pi_dot_rows_kernel(enum ggml_type type);
