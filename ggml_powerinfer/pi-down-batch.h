// The down projection of a bundled layer for a batch of tokens, from down_t (rows are neurons):
// y[t] = sum_i act[t][i] * down_t[i]. ggml has no kernel for this layout, so it is a small f32
// GEMM of our own, as two ggml custom ops:
//   1. pack: activations regrouped by blocks of PI_DOWN_TB tokens, neuron-major, with the list
//      of neurons that fire for at least one token of each block (ReLU models skip the rest)
//   2. gemm: each thread a strip of output columns; down_t dequantized a chunk of neurons at a
//      time into a cache-resident panel, then a register-blocked PI_DOWN_TB x 16 kernel
// Batches below 2 * PI_DOWN_TB tokens skip packing, and so do token blocks whose neurons fire for
// few of their tokens (ReLU models): each firing neuron's row is added to each token's output
// directly (the decode path's arithmetic), which reads less than the block's panel GEMM computes.
#pragma once

#include "ggml.h"

#include <cstdint>
#include <vector>

constexpr int64_t PI_DOWN_TB = 6; // tokens per register block

struct pi_down_batch {
    const struct ggml_tensor * act    = nullptr; // f32, n_ff x T
    const struct ggml_tensor * down_t = nullptr; // n_ff rows of n_embd
    const float *        scale_max = nullptr;    // per down_t row, for the integer kernel, or nullptr
    int64_t              n_tb = 0;               // token blocks
    std::vector<float>   panels;                 // [tb][neuron][PI_DOWN_TB]
    std::vector<int32_t> active;                 // [tb][...]: neurons firing in the block, ascending
    std::vector<int64_t> n_active;               // per token block
    std::vector<char>    by_rows;                // per token block: sparse enough to run token by token
    bool                 transposed = false;     // runs as ggml's matmul on `w` instead
    std::vector<char>    w_data;                 // down transposed back: n_embd rows of n_ff
    struct ggml_tensor   w = {};                 // describes w_data for ggml's kernels
};

// Layers whose activations are dense (thresholded SiLU/GELU: about half of every token's
// neurons fire, so the panels hold nearly every neuron) multiply batches of at least
// PI_DOWN_TRANSPOSE_MIN tokens with ggml's kernels instead: the transpose op writes down_t back
// in ffn_down's layout (b->w: F16 stays F16, exactly; other types are re-quantized to Q8_0, for
// ggml's integer dot products against the f32 GEMM's FMAs), and the caller adds a matmul of
// b->w with the activations. The transpose reads down_t once per batch.
constexpr int64_t PI_DOWN_TRANSPOSE_MIN = 64;
void pi_down_transpose_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);

// Sizes the scratch for these operands. `dense_activation`: the layer's activations are not of
// the ReLU family (see PI_DOWN_TRANSPOSE_MIN). scale_max (may be nullptr) is each down_t row's largest
// block scale (pi_row_scale_max), which lets Q4_0/Q5_0 rows run the integer kernel.
void pi_down_batch_prepare(pi_down_batch * b, const struct ggml_tensor * act, const struct ggml_tensor * down_t,
                           const float * scale_max, bool dense_activation);
bool pi_down_batch_needs_pack(const pi_down_batch * b);

// One token: y = sum over i with act[i] != 0 of act[i] * down_t[i], over this thread's slice of
// whole blocks of output columns (threads split the columns, each reads its part of every firing
// row). The decode path of both dense and sparse layers. With scale_max (per down_t row, see
// pi_down_batch_prepare) Q4_0/Q5_0 rows are added by the integer kernel.
void pi_down_t_rows(const struct ggml_tensor * down_t, const float * scale_max, const float * act, size_t act_stride,
                    float * y, int ith, int nth);

// userdata: the pi_down_batch. The pack op writes only the scratch; the gemm op's dst is y.
void pi_down_pack_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);
void pi_down_gemm_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);
