// Dot products of several weight rows with one activation row, for the types where ggml's
// one-row vec_dot is latency-bound: its loop carries one FMA chain, so a row costs at least
// four cycles per block. Eight rows at once run eight chains and share the activation loads.
//
// The results are bit-identical to ggml's vec_dot for the same row: every row keeps the same
// per-block integer lanes, the same FMA sequence and the same final horizontal sum.
#pragma once

#include "ggml.h"

#include <cstddef>

// Rows handled by one call of a group kernel.
constexpr int PI_DOT_ROWS = 8;

// out[r] = dot(row r, y) for r in [0, PI_DOT_ROWS); rows are `row_stride` bytes apart and y is
// the activation already converted to the type's vec_dot_type.
typedef void (*pi_dot_rows_fn)(int n, float * out, const char * rows, size_t row_stride, const void * y);

// The group kernel for a weight type on this CPU, or nullptr (then use vec_dot row by row).
pi_dot_rows_fn pi_dot_rows_kernel(enum ggml_type type);
