// The gate activations of bundled (PowerInfer) layers that llama.cpp's graph lacks: the ReLU
// family and thresholded SiLU/GELU. Shared by the batch op and the sparse decode op.
#pragma once

#include "pi-bundle.h"

#include <cstdint>

// a[k] = the activation of neuron k's gate value g[k], before the up factor; 0 means the
// neuron does not fire (dReLU's up factor, relu(up), is the caller's). SiLU and GELU (ggml's
// tanh approximation) are computed as g * sigmoid(.) with a vectorised exp, within a few ulp
// of libm, eight values at a time: the same value whichever op or position computes it.
void pi_gate_activations(const struct pi_bundle_layer * L, const float * g, float * a, int64_t n);

// What a firing neuron's activation is multiplied by: relu(up) for dReLU, up for the others.
static inline float pi_up_factor(const struct pi_bundle_layer * L, float up) {
    return L->activation == PI_ACT_DRELU ? (up > 0.0f ? up : 0.0f) : up;
}
