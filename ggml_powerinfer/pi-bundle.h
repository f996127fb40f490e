// The neuron-bundle region of a PowerInfer model file (docs/format.md): where each layer's
// clusters are, their types, and the activation the layer computes.
#pragma once

#include "pi-file.h"

#include <cstdint>
#include <string>
#include <vector>

struct gguf_context;

enum pi_activation {
    PI_ACT_GRAPH   = 0, // whatever the graph's GLU computes (silu, gelu): dense as the source
    PI_ACT_RELU    = 1, // relu(gate) * up
    PI_ACT_RELU2   = 2, // relu(gate)^2 * up
    PI_ACT_DRELU   = 3, // relu(gate) * relu(up)
    PI_ACT_FATRELU = 4, // gate > threshold ? gate : 0, times up
    PI_ACT_SILU_THRESHOLD = 5, // CATS: |silu(gate)| > threshold ? silu(gate) * up : 0
    PI_ACT_GELU_THRESHOLD = 6, // the same with gelu (Gemma's GeGLU)
};

// Thresholded SiLU/GELU layers are the source model when run dense: the graph's own GLU.
static inline bool pi_activation_is_thresholded(enum pi_activation act) {
    return act == PI_ACT_SILU_THRESHOLD || act == PI_ACT_GELU_THRESHOLD;
}

// The activation a bundle table names ("relu", "gelu_threshold", ...); false for an unknown name.
bool pi_activation_from_name(const char * name, enum pi_activation * act);

// A layer's predictor in the file: score = fc2 . relu(fc1 . x) + bias, neuron i is a candidate
// when score_i >= threshold. rank 0: the layer has none.
struct pi_bundle_predictor {
    int64_t  rank = 0;
    uint64_t fc1_offset  = 0; // absolute: n_embd rows of rank F16
    uint64_t fc2_offset  = 0; // rank rows of n_ff F16, hot-first neuron order
    uint64_t bias_offset = 0; // n_ff F32
    float    threshold   = 0.0f;
    float    predicted_fraction = 0.0f; // measured on held-out text at conversion (0: unknown)
    float    recall = 1.0f;             // of truly active neurons, measured likewise (1: unknown)
};

// Values per Q8_0 block (fixed by GGUF), and n rounded up to whole blocks: the length of a
// predictor row as memory holds it (pi-slot.h).
constexpr int64_t PI_Q8_0_BLOCK = 32;
static inline int64_t pi_q8_0_padded(int64_t n) {
    return (n + PI_Q8_0_BLOCK - 1) / PI_Q8_0_BLOCK * PI_Q8_0_BLOCK;
}

// Bytes that sparse decode reads per token for a predictor of stored rank `rank`, as memory holds
// it (Q8_0 rows, pi-slot.h): fc1, fc2 and the bias; for one stored as ReLU pairs (`linear`,
// held as the rank/2 linear map) half the hidden units.
double pi_predictor_decode_bytes(int64_t n_embd, int64_t n_ff, int64_t rank, bool linear);

// Whether a layer's predictor (held `linear` or not) saves time over computing every gate row
// with ggml's matmul: it reads its decode bytes and the candidates' gate rows, at a lower speed
// than a dense matmul streams the gate matrix.
bool pi_predictor_worth_it(const struct pi_bundle_layer * L, bool linear);

struct pi_bundle_layer {
    int      layer;        // block index in the model
    int64_t  n_ff;
    int64_t  n_embd;
    int      gate_type;    // ggml_type of gate and up rows (n_embd elements each)
    int      down_type;    // ggml_type of down_t rows (n_embd elements each)
    int64_t  cluster;      // neurons per cluster
    uint64_t offset;       // absolute file offset of the first cluster
    size_t   gate_row;     // bytes of a gate (or up) row
    size_t   down_row;     // bytes of a down_t row
    size_t   gate_half;    // bytes of a cluster's gate half, padded to 4 KiB
    size_t   updown_half;  // bytes of a cluster's up/down half, padded to 4 KiB
    enum pi_activation activation;
    float    act_threshold; // FATReLU / SiLU / GELU threshold (0 otherwise)
    pi_bundle_predictor predictor;
};

struct pi_bundle_index {
    std::vector<pi_bundle_layer> layers;
    std::vector<int>             by_block; // block index -> position in layers, or -1

    const pi_bundle_layer * find(int block) const {
        return block >= 0 && block < (int) by_block.size() && by_block[block] >= 0 ? &layers[by_block[block]] : nullptr;
    }
};

// Whether the GGUF is a PowerInfer model (general.architecture == "powerinfer").
bool pi_bundle_is_powerinfer(const struct gguf_context * gguf);

// Reads the bundle table of a PowerInfer model; checks that every cluster lies inside the file.
bool pi_bundle_index_read(const struct gguf_context * gguf, uint64_t file_size, pi_bundle_index * index,
                          std::string * err);

int64_t pi_bundle_n_clusters(const pi_bundle_layer * L);
// absolute file offsets of cluster c's halves
uint64_t pi_bundle_gate_half_offset(const pi_bundle_layer * L, int64_t c);
uint64_t pi_bundle_updown_half_offset(const pi_bundle_layer * L, int64_t c);

// Reads a layer's predictor: fc1 (n_embd x rank) and fc2 (rank x n_ff) as F16, bias as F32.
bool pi_bundle_read_predictor(pi_file * file, const pi_bundle_layer * L, uint16_t * fc1, uint16_t * fc2, float * bias,
                              std::string * err);

// Reads a whole layer and scatters it into contiguous hot-first matrices: gate and up
// (n_ff rows of gate_row bytes) and down_t (n_ff rows of down_row bytes).
bool pi_bundle_read_layer(pi_file * file, const pi_bundle_layer * L, void * gate, void * up, void * down_t,
                          std::string * err);

// The block index in a tensor name "blk.N.ffn_{gate,up,down}.weight", and which of the three
// (0 gate, 1 up, 2 down), or -1.
int pi_bundle_ffn_tensor(const char * name, int * block);
