// The sparse FFN of a bundled layer for one token (PowerInfer-2's decode path), as three ggml
// custom ops that run one after the other on ggml's threads (the graph gives the barriers):
//   1. prepare: x converted to the gate type's vec_dot_type; predictor hidden h = relu(x . fc1)
//               (x . fc1 for a linear predictor), Q8_0 dots, each thread a slice of the rank
//   2. neurons: predictor scores (Q8_0 dots of fc2 rows with h) pick candidate neurons; their
//               gate rows, the activation, and the up rows of those that fire give act[i] (0 for
//               every other neuron). Without a predictor every gate row is needed: the graph's
//               own gate matmul computes them (ggml's dense kernel reads rows faster than
//               gathered row dots) and op 2 reads it.
//   3. down:    y = sum over firing neurons of act[i] * down_t[i], a column slice per thread
#pragma once

#include "pi-bundle.h"
#include "pi-slot.h"

#include "ggml.h"

#include <atomic>
#include <cstdint>
#include <vector>

// Shared by the three ops of one layer: weights, predictor and scratch.
struct pi_sparse_layer {
    pi_model_slot *            slot     = nullptr; // whose counters the layer's work adds to
    const pi_bundle_layer *    L        = nullptr;
    const pi_predictor_ram *   pred     = nullptr; // nullptr: every neuron is a candidate
    const struct ggml_tensor * gate_out = nullptr; // f32 n_ff: every gate row, computed by ggml's
                                                   // matmul in the graph (no predictor), or nullptr
    const struct ggml_tensor * x        = nullptr; // f32, n_embd (the FFN input)
    const struct ggml_tensor * gate     = nullptr; // host tensors: plain hot-first rows
    const struct ggml_tensor * up       = nullptr;
    const struct ggml_tensor * down_t   = nullptr;
    const float *              down_scale_max = nullptr; // per down_t row (integer kernel), or nullptr
    int                        n_threads = 1;      // most threads the ops run on
    std::vector<char>          xq;                 // x in the gate type's vec_dot_type
    std::vector<char>          x8;                 // per thread: x in Q8_0 (fc1's input)
    std::vector<float>         h;                  // predictor hidden (rank_padded, zero-padded)
    std::vector<char>          h8;                 // per thread: h in Q8_0 (fc2's input)
    std::vector<float>         act;                // per neuron: activation * up, or 0
    std::atomic<int64_t>       next_chunk{0};      // op 2's work queue: the next unclaimed chunk
    std::atomic<uint64_t>      n_predicted{0};
    std::atomic<uint64_t>      n_active{0};
};

// Whether the sparse ops can run this layer: plain (not repacked) gate/up rows of a type with
// CPU vec_dot, a down_t type with an axpy kernel, and a ReLU-family or thresholded activation.
bool pi_sparse_supported(const pi_bundle_layer * L, const struct ggml_tensor * gate, const struct ggml_tensor * up,
                         const struct ggml_tensor * down_t);

// Sizes the scratch of `s` for its layer and up to `n_threads` threads; call before the ops run.
void pi_sparse_layer_prepare(pi_sparse_layer * s, int n_threads);

// The three ops; userdata is the pi_sparse_layer. Ops 1 and 2 write only the scratch; op 3's
// dst is the FFN output (n_embd f32).
void pi_sparse_prepare_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);
void pi_sparse_neurons_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);
void pi_sparse_down_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);
