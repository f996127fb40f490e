// The activations of bundled (PowerInfer) layers that llama.cpp's graph lacks (ReLU family,
// thresholded SiLU/GELU), as a ggml custom op run inside the split's graph on ggml's threads.
#pragma once

#include "ggml.h"

// dst = f(gate) * g(up) for the layer's activation. args: src[0] = gate, src[1] = up (f32);
// userdata = the pi_bundle_layer.
void pi_activation_op(struct ggml_tensor * dst, int ith, int nth, void * userdata);
