// ggml-powerinfer: a ggml backend that runs the FFN of every layer, registered at run time
// into the ggml registry that libllama uses.
//
// Weights reach the backend through llama.cpp's tensor_buft_overrides: each model gets its own
// buffer type (a "model slot"), either RAM-resident or disk-resident (read with direct I/O when
// an op needs them). The slot also keeps the model's counters.
#pragma once

#include "ggml-backend.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The registry; registers it with ggml on the first call (idempotent).
GGML_BACKEND_API ggml_backend_reg_t ggml_backend_powerinfer_reg(void);

// Counters of one model slot. All times in nanoseconds.
struct pi_stats {
    uint64_t ffn_bytes_read;     // weight bytes read from the model file during compute
    uint64_t ffn_read_ns;        // time spent waiting for those reads
    uint64_t ffn_rows_computed;  // weight rows multiplied (one row per output element per token)
    uint64_t ffn_matmuls;        // MUL_MAT ops executed
    uint64_t ffn_graphs;         // graph splits executed
    uint64_t ffn_ns;             // wall time inside graph_compute
    uint64_t ffn_tokens;         // tokens passed through FFN splits (summed over layers)
    uint64_t sparse_layer_tokens; // of those, (layer, token) pairs computed sparse
    uint64_t neurons_total;      // neurons of the layers computed sparse (n_ff per layer-token)
    uint64_t neurons_predicted;  // of those, the candidates whose gate row was computed
    uint64_t neurons_active;     // of those, the ones whose activation was non-zero
    uint64_t batch_repacks;      // plain gate/up matrices repacked for a batch (PowerInfer models)
    uint64_t down_transposes;    // down_t matrices transposed back for a batch (dense activations)
};

// How the FFN of a PowerInfer model runs (RAM slots). Batches of tokens always run dense.
enum pi_sparse_mode {
    PI_SPARSE_OFF       = 0, // dense: the source model's FFN
    PI_SPARSE_PREDICTED = 1, // single tokens: per layer, the predictor's candidates' gate rows where that
                             // is cheaper than every gate row; up/down of the firing neurons
    PI_SPARSE_ORACLE    = 2, // single tokens: every gate row, up/down of the neurons that truly fire
    PI_SPARSE_PREDICTOR = 3, // as PREDICTED, but every layer with a predictor uses it (to measure them)
};

enum pi_residency {
    PI_RESIDENCY_RAM  = 0, // weights copied into anonymous memory at load
    PI_RESIDENCY_DISK = 1, // weights stay in the file; read when used
};

typedef struct pi_model_slot * pi_model_slot_t;

// Checks that `path` is a GGUF file whose header parses and whose tensors all lie inside it.
// Returns false and fills err (if not NULL) otherwise.
GGML_BACKEND_API bool pi_check_gguf(const char * path, char * err, size_t err_size);

// Create a slot for the GGUF at `path`. The file is indexed now, so a tensor whose name the
// file does not hold fails at load time, not at compute time. With `repack`, RAM weights that
// ggml's CPU backend would repack for stock llama.cpp (use_extra_bufts) are repacked the same
// way. Returns NULL and fills err (if not NULL) on failure.
GGML_BACKEND_API pi_model_slot_t pi_model_slot_new(const char * path, enum pi_residency residency,
                                                   bool repack, char * err, size_t err_size);
// Drop the caller's reference. The slot lives on while buffers allocated from it exist.
GGML_BACKEND_API void pi_model_slot_release(pi_model_slot_t slot);

GGML_BACKEND_API ggml_backend_buffer_type_t pi_model_slot_buft(pi_model_slot_t slot);
GGML_BACKEND_API void pi_model_slot_get_stats(pi_model_slot_t slot, struct pi_stats * out);
GGML_BACKEND_API void pi_model_slot_reset_stats(pi_model_slot_t slot);
// Bytes of memory holding this slot's weights (RAM mode) or 0 (disk mode).
GGML_BACKEND_API size_t pi_model_slot_resident_bytes(pi_model_slot_t slot);
// Bytes of weight tensors assigned to this slot (both modes).
GGML_BACKEND_API size_t pi_model_slot_weight_bytes(pi_model_slot_t slot);
// The sparse mode of a PowerInfer model's slot; false (and no change) for other slots, or for a
// sparse mode when gate and up are repacked (sparse rows need the plain layout: open the slot
// without `repack`).
GGML_BACKEND_API bool pi_model_slot_set_sparse_mode(pi_model_slot_t slot, enum pi_sparse_mode mode);
GGML_BACKEND_API enum pi_sparse_mode pi_model_slot_sparse_mode(pi_model_slot_t slot);
// Whether the disk reader uses O_DIRECT (false when the file system refuses it).
GGML_BACKEND_API bool pi_model_slot_direct_io(pi_model_slot_t slot);

#ifdef __cplusplus
}
#endif
