// Model slots: one per loaded model, each with its own buffer type (RAM or disk resident) and
// counters. The compute code finds the slot of a weight through its buffer's type.
#pragma once

#include "ggml-powerinfer.h"
#include "pi-bundle.h"
#include "pi-file.h"

#include "ggml-backend-impl.h"

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

struct pi_counters {
    std::atomic<uint64_t> ffn_bytes_read{0};
    std::atomic<uint64_t> ffn_read_ns{0};
    std::atomic<uint64_t> ffn_rows_computed{0};
    std::atomic<uint64_t> ffn_matmuls{0};
    std::atomic<uint64_t> ffn_graphs{0};
    std::atomic<uint64_t> ffn_ns{0};
    std::atomic<uint64_t> ffn_tokens{0};
    std::atomic<uint64_t> sparse_layer_tokens{0};
    std::atomic<uint64_t> neurons_total{0};
    std::atomic<uint64_t> neurons_predicted{0};
    std::atomic<uint64_t> neurons_active{0};
    std::atomic<uint64_t> batch_repacks{0};
    std::atomic<uint64_t> down_transposes{0};
};

// A layer's predictor held in memory (RAM slots of PowerInfer models); empty when it has none.
// The file stores it in F16; memory holds it in Q8_0 so that both products are int8 dots against
// a Q8_0 input, like a gate row's: half the bytes of F16 and far fewer instructions than
// converting F16 weights to multiply them (7B-class model, validation samples: the fraction
// predicted at the same recall moves by < 0.1%).
// fc1 is held as rank rows of n_embd values and fc2 as n_ff rows of rank values (hot-first),
// each row zero-padded to whole 32-value blocks: a neuron's score is one short row dot.
// A file predictor whose hidden units come in negated pairs (fc1 columns r and r + rank/2, fc2
// rows likewise) is a linear map: relu(a) - relu(-a) = a. It is held as that map, with half the
// rank and no relu, so decode reads each weight once.
struct pi_predictor_ram {
    int64_t            rank = 0;          // hidden units held
    int64_t            rank_padded = 0;   // rank rounded up to whole Q8_0 blocks
    int64_t            n_embd_padded = 0; // n_embd likewise
    bool               linear = false;    // hidden units are not relu'd
    std::vector<char>  fc1;  // rank rows of n_embd_padded, Q8_0
    std::vector<char>  fc2;  // n_ff rows of rank_padded, Q8_0
    std::vector<float> bias; // n_ff
};

struct pi_model_slot {
    std::string   path;
    pi_residency  residency;
    bool          repack;  // RAM: let ggml's CPU backend repack weights as stock would
    pi_file       file; // the model file and its tensor index
    bool          powerinfer = false; // a PowerInfer model: the FFN lives in neuron bundles
    pi_bundle_index bundles;
    std::vector<pi_predictor_ram> predictors; // by position in bundles.layers
    std::atomic<int> sparse_mode{PI_SPARSE_OFF};
    std::string   buft_name;
    struct ggml_backend_buffer_type buft;

    std::atomic<int>    refs{1};          // the creator's reference + one per live buffer
    std::atomic<size_t> resident_bytes{0};
    std::atomic<size_t> weight_bytes{0};
    pi_counters         counters;
};

// The slot a weight belongs to, or nullptr if the tensor is not in one of our buffers.
pi_model_slot * pi_slot_of_tensor(const struct ggml_tensor * t);
bool            pi_buft_is_ours(ggml_backend_buffer_type_t buft);

// File location of a disk-resident weight (set when the tensor is placed in its buffer).
const pi_tensor_loc * pi_disk_tensor_loc(const struct ggml_tensor * t);

// The bundled layer a FFN weight of a PowerInfer model belongs to, and which of gate (0), up (1)
// or down (2) it is; nullptr for other weights. A bundled down weight's host tensor holds
// down_t (n_ff rows of n_embd), not ffn_down's layout.
const pi_bundle_layer * pi_bundle_layer_of(const struct ggml_tensor * t, int * which);

// The in-memory predictor of a bundled layer, or nullptr if it has none.
const pi_predictor_ram * pi_slot_predictor(const pi_model_slot * slot, const pi_bundle_layer * L);

// The host tensor holding a RAM-resident weight: in a CPU buffer, or a CPU_REPACK buffer whose
// interleaved layout only ggml's CPU kernels read.
struct ggml_tensor * pi_ram_host_tensor(const struct ggml_tensor * t);

// For a bundled down weight in RAM: its down_t rows' largest block scales (the integer down
// kernel's scale_max), or nullptr when its type has no integer kernel.
const float * pi_ram_row_scale_max(const struct ggml_tensor * t);

// The CPU backend's buffer type that would repack weight `w` into interleaved blocks (what
// llama.cpp's loader picks for stock), or nullptr when it has none for w's type and shape.
ggml_backend_buffer_type_t pi_cpu_repack_buft(const struct ggml_tensor * w);

// Implemented by the device: the device every slot buffer type belongs to.
ggml_backend_dev_t pi_device(void);
