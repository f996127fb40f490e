// Dense matrix products with ggml's CPU type traits: the activations are converted with the
// weight type's vec_dot_type->from_float and every output is one vec_dot over a weight row, the
// same arithmetic llama.cpp's CPU backend uses for single-token decode.
#pragma once

#include "ggml.h"
#include "pi-threadpool.h"

#include <cstddef>
#include <cstdint>
#include <vector>

// True if the CPU traits can multiply weights of this type.
bool pi_matmul_supports_type(enum ggml_type type);

struct pi_matmul_args {
    const char *   w;          // weight rows
    size_t         w_stride;   // bytes between weight rows
    enum ggml_type w_type;
    int64_t        n_in;       // elements per row
    int64_t        n_out;      // rows
    const float *  x;          // activations: n_cols rows of n_in floats
    size_t         x_stride;   // bytes between activation rows
    int64_t        n_cols;     // tokens
    float *        dst;        // n_cols rows of n_out floats
    size_t         dst_stride; // bytes between output rows
};

// Computes dst[c][r] = dot(w[r], x[c]). `scratch` holds the converted activations.
void pi_matmul(pi_threadpool * pool, const pi_matmul_args & args, std::vector<char> & scratch);
