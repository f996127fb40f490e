// Dense FFN pieces of a bundled (PowerInfer) layer that ggml has no kernel for, written as
// ggml custom ops so they run inside the split's graph on ggml's threads: the down projection
// from down_t (rows are neurons), and the ReLU-family activations llama.cpp's graph lacks.
#pragma once

#include "ggml.h"

// dst[t] = sum_i act[t][i] * down_t[i]. args: src[0] = act (f32, n_ff x T),
// src[1] = down_t (n_ff rows of n_embd). Neurons whose activation is zero for every token of a
// tile are skipped, so ReLU-family layers only touch their active rows.
void pi_down_t_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);

struct pi_bundle_layer;

// The activation of a ReLU-family or thresholded SiLU/GELU layer for one neuron's gate value,
// before the up factor; 0 means the neuron does not fire. dReLU's up factor is relu(up).
float pi_gate_activation(const struct pi_bundle_layer * L, float g);

// dst = f(gate) * g(up) for the layer's activation. args: src[0] = gate, src[1] = up (f32);
// userdata = the pi_bundle_layer.
void pi_activation_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);
