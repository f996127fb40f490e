// The activations of bundled (PowerInfer) layers that llama.cpp's graph lacks (ReLU family,
// thresholded SiLU/GELU), as a ggml custom op run inside the split's graph on ggml's threads.
#pragma once

#include "pi-bundle.h"

#include "ggml.h"

#include <cmath>

// The activation of a ReLU-family or thresholded SiLU/GELU layer for one neuron's gate value,
// before the up factor; 0 means the neuron does not fire. dReLU's up factor is relu(up).
// Inline: it runs once per neuron and token in the sparse and the batch ops.
static inline float pi_gate_activation(const struct pi_bundle_layer * L, float g) {
    const float r = g > 0.0f ? g : 0.0f;
    switch (L->activation) {
        case PI_ACT_RELU:
        case PI_ACT_DRELU:   return r;
        case PI_ACT_RELU2:   return r * r;
        case PI_ACT_FATRELU: return g > L->act_threshold ? g : 0.0f;
        case PI_ACT_SILU_THRESHOLD: {
            const float a = g / (1.0f + expf(-g));
            return fabsf(a) > L->act_threshold ? a : 0.0f;
        }
        case PI_ACT_GELU_THRESHOLD: { // the tanh approximation, as ggml's GeGLU
            const float a = 0.5f*g*(1.0f + tanhf(0.7978845608f*g*(1.0f + 0.044715f*g*g)));
            return fabsf(a) > L->act_threshold ? a : 0.0f;
        }
        default:             return 0.0f; // PI_ACT_GRAPH: the graph's GLU runs instead
    }
}

// dst = f(gate) * g(up) for the layer's activation. args: src[0] = gate, src[1] = up (f32);
// userdata = the pi_bundle_layer.
void pi_activation_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);
