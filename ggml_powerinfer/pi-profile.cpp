#include "pi-profile.h"

#include "ggml-backend.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

enum pi_probe {
    PI_PROBE_NONE,
    PI_PROBE_INPUT, // ffn_norm-<il>: the FFN input
    PI_PROBE_UP,    // ffn_up-<il>
    PI_PROBE_GATE,  // ffn_gate-<il>: the gate pre-activation
    PI_PROBE_ACT,   // ffn_swiglu/geglu/reglu-<il>: the activation that multiplies ffn_down
};

// Parses "<kind>-<il>" names from llama.cpp's graph builder.
static pi_probe probe_of(const char * name, int * il) {
    static const struct { const char * prefix; pi_probe probe; } known[] = {
        { "ffn_norm-",   PI_PROBE_INPUT },
        { "ffn_up-",     PI_PROBE_UP    },
        { "ffn_gate-",   PI_PROBE_GATE  },
        { "ffn_swiglu-", PI_PROBE_ACT   },
        { "ffn_geglu-",  PI_PROBE_ACT   },
        { "ffn_reglu-",  PI_PROBE_ACT   },
    };
    for (const auto & k : known) {
        const size_t n = strlen(k.prefix);
        if (strncmp(name, k.prefix, n) == 0) {
            char * end = nullptr;
            long v = strtol(name + n, &end, 10);
            if (end != name + n && *end == '\0' && v >= 0 && v < 100000) {
                *il = (int) v;
                return k.probe;
            }
        }
    }
    return PI_PROBE_NONE;
}

pi_profiler * pi_profiler_new(int64_t max_samples, pi_glu_fn fn, const float * thresholds,
                              int n_thresholds, bool emulate) {
    pi_profiler * p = new pi_profiler;
    p->max_samples = max_samples < 0 ? 0 : max_samples;
    p->fn = fn;
    if (thresholds != nullptr && n_thresholds > 0) {
        p->thresholds.assign(thresholds, thresholds + n_thresholds);
    }
    p->emulate = emulate;
    return p;
}

void pi_profiler_free(pi_profiler * p) {
    delete p;
}

// The tensor as contiguous floats (copied from the backend when not in host memory).
static const float * tensor_floats(struct ggml_tensor * t, std::vector<float> & tmp) {
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
        return nullptr;
    }
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
        return (const float *) t->data;
    }
    tmp.resize(ggml_nelements(t));
    ggml_backend_tensor_get(t, tmp.data(), 0, ggml_nbytes(t));
    return tmp.data();
}

static pi_layer_profile & layer_at(pi_profiler * p, int il) {
    if ((int) p->layers.size() <= il) {
        p->layers.resize(il + 1);
    }
    return p->layers[il];
}

static int hist_bin(float a) {
    if (!(a > 0.0f)) {
        return 0;
    }
    int e = 0;
    std::frexp(a, &e); // a = m * 2^e, m in [0.5, 1): a in [2^(e-1), 2^e)
    const int b = e - 1 - PI_HIST_MIN_EXP;
    return b < 0 ? 0 : (b >= PI_HIST_BINS ? PI_HIST_BINS - 1 : b);
}

float pi_glu_apply(pi_glu_fn fn, float g) {
    switch (fn) {
        case PI_GLU_SILU:
            return g / (1.0f + std::exp(-g));
        case PI_GLU_GELU: {
            const float sqrt_2_over_pi = 0.79788456080286535588f, coef_a = 0.044715f; // ggml's
            return 0.5f*g*(1.0f + std::tanh(sqrt_2_over_pi*g*(1.0f + coef_a*g*g)));
        }
        default:
            return g;
    }
}

// Bin b = 1 + octave * PI_FHIST_SUB + sub: the octave of a, then equal-width sub-bins.
int pi_fhist_bin(float a) {
    if (!(a > 0.0f)) {
        return 0;
    }
    if (std::isinf(a)) {
        return PI_FHIST_BINS - 1;
    }
    int e = 0;
    const float m = std::frexp(a, &e); // a = m * 2^e, m in [0.5, 1)
    const int octave = e - 1 - PI_FHIST_MIN_EXP;
    if (octave < 0) {
        return 0;
    }
    int sub = (int) ((2.0f*m - 1.0f) * PI_FHIST_SUB);
    sub = sub < 0 ? 0 : (sub >= PI_FHIST_SUB ? PI_FHIST_SUB - 1 : sub);
    const int b = 1 + octave*PI_FHIST_SUB + sub;
    return b < PI_FHIST_BINS ? b : PI_FHIST_BINS - 1;
}

double pi_fhist_edge(int b) {
    if (b <= 0) {
        return 0.0;
    }
    const int octave = (b - 1) / PI_FHIST_SUB, sub = (b - 1) % PI_FHIST_SUB;
    return std::ldexp(1.0 + (double) sub / PI_FHIST_SUB, octave + PI_FHIST_MIN_EXP);
}

static void on_gate(pi_profiler * p, int il, pi_layer_profile & L, const float * gate, int64_t n_ff, int64_t n_tokens) {
    const float threshold = p->threshold(il);
    const bool thresholded = p->fn != PI_GLU_NONE && threshold >= 0.0f;
    if (L.n_ff == 0) {
        L.n_ff = n_ff;
        L.gate_positive.assign(n_ff, 0);
        L.both_positive.assign(n_ff, 0);
        L.abs_act_sum.assign(n_ff, 0.0);
        if (p->fn != PI_GLU_NONE) {
            L.fhist.assign(PI_FHIST_BINS, 0);
        }
        if (thresholded) {
            L.above.assign(n_ff, 0);
        }
    }
    if (L.n_ff != n_ff) {
        return;
    }
    const bool have_up = L.pending_up.size() == (size_t) (n_ff * n_tokens);
    const bool have_x  = L.pending_tokens == n_tokens && L.n_embd > 0;
    const size_t mask_bytes = (size_t) (n_ff + 7) / 8;
    std::vector<uint8_t> active(n_ff);
    if (thresholded && p->emulate) {
        L.pending_off.assign((size_t) (n_ff * n_tokens), 0);
    }
    for (int64_t t = 0; t < n_tokens; t++) {
        const float * g = gate + t*n_ff;
        const float * u = have_up ? L.pending_up.data() + t*n_ff : nullptr;
        for (int64_t i = 0; i < n_ff; i++) {
            active[i] = g[i] > 0.0f; // ReLU's active set, unless the layer is thresholded
            if (active[i]) {
                L.gate_positive[i]++;
                if (u != nullptr && u[i] > 0.0f) {
                    L.both_positive[i]++;
                }
            }
        }
        if (p->fn != PI_GLU_NONE) {
            for (int64_t i = 0; i < n_ff; i++) {
                const float a = std::fabs(pi_glu_apply(p->fn, g[i]));
                L.fhist[pi_fhist_bin(a)]++;
                if (thresholded) {
                    active[i] = a > threshold;
                    L.above[i] += active[i];
                    if (!active[i] && p->emulate) {
                        L.pending_off[t*n_ff + i] = 1;
                    }
                }
            }
        }
        if (have_x && L.samples < p->max_samples) {
            const float * x = L.pending_x.data() + t*L.n_embd;
            L.x.resize((size_t) (L.samples + 1) * L.n_embd);
            ggml_fp32_to_fp16_row(x, L.x.data() + L.samples*L.n_embd, L.n_embd);
            L.active_bits.resize((size_t) (L.samples + 1) * mask_bytes, 0);
            uint8_t * bits = L.active_bits.data() + L.samples*mask_bytes;
            for (int64_t i = 0; i < n_ff; i++) {
                if (active[i]) {
                    bits[i >> 3] |= (uint8_t) (1u << (i & 7));
                }
            }
            L.samples++;
        }
    }
    L.tokens += n_tokens;
    L.pending_tokens = 0;
    L.pending_up.clear();
}

static void on_act(pi_layer_profile & L, const float * act, int64_t n_ff, int64_t n_tokens) {
    if (L.n_ff != n_ff) {
        return; // fused gate_up layouts are not profiled
    }
    for (int64_t t = 0; t < n_tokens; t++) {
        const float * a = act + t*n_ff;
        for (int64_t i = 0; i < n_ff; i++) {
            const float m = std::fabs(a[i]);
            L.abs_act_sum[i] += m;
            L.hist[hist_bin(m)]++;
        }
    }
}

// Emulate mode: zero the activation of the neurons the gate probe found at or below the
// threshold, in the tensor itself: ffn_down reads it after this callback returns.
static void zero_thresholded(pi_layer_profile & L, struct ggml_tensor * t, const float * act) {
    const size_t n = (size_t) ggml_nelements(t);
    if (L.pending_off.size() != n) {
        return;
    }
    std::vector<float> out(act, act + n);
    for (size_t k = 0; k < n; k++) {
        if (L.pending_off[k]) {
            out[k] = 0.0f;
        }
    }
    if (t->buffer != nullptr && !ggml_backend_buffer_is_host(t->buffer)) {
        ggml_backend_tensor_set(t, out.data(), 0, ggml_nbytes(t));
    } else {
        std::memcpy(t->data, out.data(), ggml_nbytes(t));
    }
    L.pending_off.clear();
}

extern "C" bool pi_profiler_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    pi_profiler * p = (pi_profiler *) user_data;
    int il = -1;
    const pi_probe probe = probe_of(t->name, &il);
    if (ask) {
        return probe != PI_PROBE_NONE;
    }
    if (probe == PI_PROBE_NONE || ggml_n_dims(t) > 2) {
        return true;
    }
    std::vector<float> tmp;
    const float * data = tensor_floats(t, tmp);
    if (data == nullptr) {
        return true;
    }
    pi_layer_profile & L = layer_at(p, il);
    const int64_t n = t->ne[0], n_tokens = t->ne[1];
    switch (probe) {
        case PI_PROBE_INPUT:
            L.n_embd = n;
            L.pending_x.assign(data, data + n*n_tokens);
            L.pending_tokens = n_tokens;
            break;
        case PI_PROBE_UP:
            L.pending_up.assign(data, data + n*n_tokens);
            break;
        case PI_PROBE_GATE:
            on_gate(p, il, L, data, n, n_tokens);
            break;
        case PI_PROBE_ACT:
            on_act(L, data, n, n_tokens);
            if (p->emulate) {
                zero_thresholded(L, t, data);
            }
            break;
        default:
            break;
    }
    return true; // keep computing
}
