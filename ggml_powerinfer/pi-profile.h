// Activation profiling through llama.cpp's cb_eval hook: per layer, how often each FFN neuron
// is active, the distribution of activation magnitudes, and (input, active set) samples for
// training predictors. The callback only observes (results are unchanged), except in emulate
// mode, which zeroes the activation of thresholded-out neurons to measure what that costs.
#pragma once

#include "ggml.h"

#include <cstddef>
#include <cstdint>
#include <vector>

// Log2-spaced magnitude bins: bin b holds |a| in [2^(b+PI_HIST_MIN_EXP), 2^(b+1+PI_HIST_MIN_EXP)),
// bin 0 also everything smaller (zeros included), the last bin everything larger.
constexpr int PI_HIST_BINS    = 64;
constexpr int PI_HIST_MIN_EXP = -40;

// The |f(gate)| histogram that magnitude thresholds (CATS) are calibrated on: every octave of
// float (subnormals included: silu of a very negative gate is tiny but not zero, and a quantile
// can fall there), each split into PI_FHIST_SUB equal-width bins, so a quantile is found to
// within 3% of its value before interpolation. Bin 0 holds [0, 2^PI_FHIST_MIN_EXP): zeros.
// pi_fhist_edge() gives the bin edges.
constexpr int PI_FHIST_SUB     = 32;
constexpr int PI_FHIST_MIN_EXP = -150;
constexpr int PI_FHIST_OCTAVES = 280;  // up to 2^130, above FLT_MAX
constexpr int PI_FHIST_BINS    = 1 + PI_FHIST_OCTAVES * PI_FHIST_SUB;

// The function the graph applies to the gate before multiplying by up (swiglu, geglu).
enum pi_glu_fn {
    PI_GLU_NONE = 0,
    PI_GLU_SILU = 1,
    PI_GLU_GELU = 2, // tanh approximation, as ggml computes it
};

float pi_glu_apply(pi_glu_fn fn, float g);
int   pi_fhist_bin(float a);   // bin of a magnitude >= 0
double pi_fhist_edge(int b);   // lower edge of bin b (0 for bin 0); b = PI_FHIST_BINS: the top

struct pi_layer_profile {
    int64_t n_embd = 0;
    int64_t n_ff   = 0;
    int64_t tokens = 0;                   // tokens whose gate was seen
    std::vector<uint64_t> gate_positive;  // per neuron: gate pre-activation > 0 (ReLU active)
    std::vector<uint64_t> both_positive;  // per neuron: gate > 0 and up > 0 (dReLU active)
    std::vector<double>   abs_act_sum;    // per neuron: sum of |activation| (gate-up product)
    uint64_t hist[PI_HIST_BINS] = {0};    // |activation| of all neurons and tokens
    std::vector<uint64_t> fhist;          // |f(gate)| of all neurons and tokens (PI_FHIST_BINS)
    std::vector<uint64_t> above;          // per neuron: |f(gate)| > threshold (thresholded layers)

    // samples of the first max_samples tokens: FFN input (f16) and active bits: |f(gate)| >
    // threshold for a thresholded layer, else gate > 0
    int64_t samples = 0;
    std::vector<ggml_fp16_t> x;           // samples x n_embd
    std::vector<uint8_t>     active_bits; // samples x ceil(n_ff / 8)

    // the FFN input of the batch in flight, kept until its gate arrives
    std::vector<float> pending_x;
    int64_t            pending_tokens = 0;
    std::vector<float> pending_up;
    std::vector<uint8_t> pending_off;     // emulate: 1 where the batch's neuron is thresholded out
};

struct pi_profiler {
    int64_t max_samples = 0;
    pi_glu_fn fn = PI_GLU_NONE;
    std::vector<float> thresholds;        // per layer; negative: the layer has none
    bool emulate = false;
    std::vector<pi_layer_profile> layers;

    float threshold(int il) const {
        return il < (int) thresholds.size() ? thresholds[il] : -1.0f;
    }
};

// fn: the graph's gate function (for the |f(gate)| histogram and thresholds); thresholds: per
// layer (negative: none); emulate: zero the activation of neurons whose |f(gate)| is at or
// below their layer's threshold, as sparse decode with a perfect predictor would.
pi_profiler * pi_profiler_new(int64_t max_samples, pi_glu_fn fn, const float * thresholds,
                              int n_thresholds, bool emulate);
void          pi_profiler_free(pi_profiler * p);

// The cb_eval callback (ggml_backend_sched_eval_callback); user_data is the profiler.
extern "C" bool pi_profiler_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);
