// Activation profiling through llama.cpp's cb_eval hook: per layer, how often each FFN neuron
// is active, the distribution of activation magnitudes, and (input, active set) samples for
// training predictors. The callback only observes; results are unchanged.
#pragma once

#include "ggml.h"

#include <cstddef>
#include <cstdint>
#include <vector>

// Log2-spaced magnitude bins: bin b holds |a| in [2^(b+PI_HIST_MIN_EXP), 2^(b+1+PI_HIST_MIN_EXP)),
// bin 0 also everything smaller (zeros included), the last bin everything larger.
constexpr int PI_HIST_BINS    = 64;
constexpr int PI_HIST_MIN_EXP = -40;

struct pi_layer_profile {
    int64_t n_embd = 0;
    int64_t n_ff   = 0;
    int64_t tokens = 0;                   // tokens whose gate was seen
    std::vector<uint64_t> gate_positive;  // per neuron: gate pre-activation > 0 (ReLU active)
    std::vector<uint64_t> both_positive;  // per neuron: gate > 0 and up > 0 (dReLU active)
    std::vector<double>   abs_act_sum;    // per neuron: sum of |activation| (gate-up product)
    uint64_t hist[PI_HIST_BINS] = {0};    // |activation| of all neurons and tokens

    // samples of the first max_samples tokens: FFN input (f16) and gate > 0 bits
    int64_t samples = 0;
    std::vector<ggml_fp16_t> x;           // samples x n_embd
    std::vector<uint8_t>     active_bits; // samples x ceil(n_ff / 8)

    // the FFN input of the batch in flight, kept until its gate arrives
    std::vector<float> pending_x;
    int64_t            pending_tokens = 0;
    std::vector<float> pending_up;
};

struct pi_profiler {
    int64_t max_samples = 0;
    std::vector<pi_layer_profile> layers;
};

pi_profiler * pi_profiler_new(int64_t max_samples);
void          pi_profiler_free(pi_profiler * p);

// The cb_eval callback (ggml_backend_sched_eval_callback); user_data is the profiler.
extern "C" bool pi_profiler_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);
