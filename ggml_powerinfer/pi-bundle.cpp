#include "pi-bundle.h"

#include "ggml.h"
#include "gguf.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

static const char * KEY_PREFIX = "powerinfer.";

static uint64_t pad_to(uint64_t n, uint64_t align) {
    return (n + align - 1) / align * align;
}

bool pi_bundle_is_powerinfer(const struct gguf_context * gguf) {
    const int64_t k = gguf_find_key(gguf, "general.architecture");
    return k >= 0 && gguf_get_kv_type(gguf, k) == GGUF_TYPE_STRING &&
           strcmp(gguf_get_val_str(gguf, k), "powerinfer") == 0;
}

// An integer array under powerinfer.<name> with n entries (n < 0: any length, set on return).
static bool read_uint_array(const struct gguf_context * gguf, const char * name, int64_t * n,
                            std::vector<uint64_t> * out, std::string * err) {
    const std::string key = std::string(KEY_PREFIX) + name;
    const int64_t k = gguf_find_key(gguf, key.c_str());
    if (k < 0 || gguf_get_kv_type(gguf, k) != GGUF_TYPE_ARRAY) {
        *err = "missing key " + key;
        return false;
    }
    const enum gguf_type type = gguf_get_arr_type(gguf, k);
    const size_t len = gguf_get_arr_n(gguf, k);
    if ((type != GGUF_TYPE_UINT32 && type != GGUF_TYPE_UINT64) || (*n >= 0 && (int64_t) len != *n)) {
        *err = "key " + key + " has the wrong type or length";
        return false;
    }
    *n = (int64_t) len;
    const void * data = gguf_get_arr_data(gguf, k);
    out->resize(len);
    for (size_t i = 0; i < len; i++) {
        (*out)[i] = type == GGUF_TYPE_UINT32 ? ((const uint32_t *) data)[i] : ((const uint64_t *) data)[i];
    }
    return true;
}

// The f32 array under powerinfer.<name> with n entries, or nullptr if absent or malformed.
static const float * f32_array(const struct gguf_context * gguf, const char * name, int64_t n) {
    const std::string key = std::string(KEY_PREFIX) + name;
    const int64_t k = gguf_find_key(gguf, key.c_str());
    if (k < 0 || gguf_get_kv_type(gguf, k) != GGUF_TYPE_ARRAY || gguf_get_arr_type(gguf, k) != GGUF_TYPE_FLOAT32 ||
        (int64_t) gguf_get_arr_n(gguf, k) != n) {
        return nullptr;
    }
    return (const float *) gguf_get_arr_data(gguf, k);
}

bool pi_activation_from_name(const char * name, enum pi_activation * act) {
    static const struct { const char * name; enum pi_activation act; } names[] = {
        { "graph", PI_ACT_GRAPH }, { "silu_threshold", PI_ACT_SILU_THRESHOLD }, { "gelu_threshold", PI_ACT_GELU_THRESHOLD },
        { "relu", PI_ACT_RELU }, { "relu2", PI_ACT_RELU2 }, { "drelu", PI_ACT_DRELU }, { "fatrelu", PI_ACT_FATRELU },
    };
    for (const auto & n : names) {
        if (strcmp(name, n.name) == 0) {
            *act = n.act;
            return true;
        }
    }
    return false;
}

// The first byte after the GGUF data section, rounded up to 4 KiB: where the region starts.
static uint64_t region_start(const struct gguf_context * gguf) {
    const uint64_t data_offset = gguf_get_data_offset(gguf);
    const uint64_t align = gguf_get_alignment(gguf);
    uint64_t end = data_offset;
    for (int64_t i = 0; i < gguf_get_n_tensors(gguf); i++) {
        const uint64_t e = data_offset + gguf_get_tensor_offset(gguf, i) + pad_to(gguf_get_tensor_size(gguf, i), align);
        end = e > end ? e : end;
    }
    return pad_to(end, PI_IO_ALIGN);
}

// The optional predictor table: powerinfer.predictor.{layer,rank,offset,threshold}. Each
// predictor is fc1, fc2 and bias, each starting on a 4 KiB boundary.
static bool read_predictors(const struct gguf_context * gguf, uint64_t region, uint64_t file_size,
                            pi_bundle_index * index, std::string * err) {
    if (gguf_find_key(gguf, "powerinfer.predictor.layer") < 0) {
        return true;
    }
    int64_t n = -1;
    std::vector<uint64_t> layer, rank, offset;
    if (!read_uint_array(gguf, "predictor.layer", &n, &layer, err) ||
        !read_uint_array(gguf, "predictor.rank", &n, &rank, err) ||
        !read_uint_array(gguf, "predictor.offset", &n, &offset, err)) {
        return false;
    }
    const float * thresholds = f32_array(gguf, "predictor.threshold", n);
    if (thresholds == nullptr) {
        *err = "missing or malformed key powerinfer.predictor.threshold";
        return false;
    }
    const float * fractions = f32_array(gguf, "predictor.predicted_fraction", n); // optional
    const float * recalls   = f32_array(gguf, "predictor.recall", n);             // optional
    char what[256];
    for (int64_t i = 0; i < n; i++) {
        pi_bundle_layer * L = layer[i] < index->by_block.size() && index->by_block[layer[i]] >= 0
                                  ? &index->layers[index->by_block[layer[i]]] : nullptr;
        if (L == nullptr || rank[i] == 0 || rank[i] > 65536 || L->predictor.rank != 0) {
            snprintf(what, sizeof(what), "predictor table entry %lld is invalid", (long long) i);
            *err = what;
            return false;
        }
        pi_bundle_predictor & P = L->predictor;
        P.rank        = (int64_t) rank[i];
        P.fc1_offset  = region + offset[i];
        P.fc2_offset  = pad_to(P.fc1_offset + 2 * (uint64_t) (L->n_embd * P.rank), PI_IO_ALIGN);
        P.bias_offset = pad_to(P.fc2_offset + 2 * (uint64_t) (P.rank * L->n_ff), PI_IO_ALIGN);
        P.threshold   = thresholds[i];
        P.predicted_fraction = fractions != nullptr ? fractions[i] : 0.0f;
        P.recall = recalls != nullptr ? recalls[i] : 1.0f;
        if (P.bias_offset + 4 * (uint64_t) L->n_ff > file_size) {
            snprintf(what, sizeof(what), "truncated PowerInfer file: the predictor of layer %d ends past its end", L->layer);
            *err = what;
            return false;
        }
    }
    return true;
}

bool pi_bundle_index_read(const struct gguf_context * gguf, uint64_t file_size, pi_bundle_index * index,
                          std::string * err) {
    int64_t n = -1;
    std::vector<uint64_t> layer, n_ff, n_embd, gate_type, down_type, cluster, offset;
    if (!read_uint_array(gguf, "bundle.layer", &n, &layer, err) ||
        !read_uint_array(gguf, "bundle.n_ff", &n, &n_ff, err) ||
        !read_uint_array(gguf, "bundle.n_embd", &n, &n_embd, err) ||
        !read_uint_array(gguf, "bundle.gate_type", &n, &gate_type, err) ||
        !read_uint_array(gguf, "bundle.down_type", &n, &down_type, err) ||
        !read_uint_array(gguf, "bundle.cluster", &n, &cluster, err) ||
        !read_uint_array(gguf, "bundle.offset", &n, &offset, err)) {
        return false;
    }
    const int64_t k_act = gguf_find_key(gguf, "powerinfer.bundle.activation");
    if (k_act < 0 || gguf_get_arr_type(gguf, k_act) != GGUF_TYPE_STRING || (int64_t) gguf_get_arr_n(gguf, k_act) != n) {
        *err = "missing or malformed key powerinfer.bundle.activation";
        return false;
    }
    const float * thresholds = f32_array(gguf, "bundle.activation_threshold", n);
    if (thresholds == nullptr) {
        *err = "missing or malformed key powerinfer.bundle.activation_threshold";
        return false;
    }
    const uint64_t region = region_start(gguf);
    const int64_t k_size = gguf_find_key(gguf, "powerinfer.region_size");
    if (k_size < 0 || gguf_get_kv_type(gguf, k_size) != GGUF_TYPE_UINT64) {
        *err = "missing key powerinfer.region_size";
        return false;
    }
    char what[256];
    if (region + gguf_get_val_u64(gguf, k_size) > file_size) {
        snprintf(what, sizeof(what), "truncated PowerInfer file: its region ends at byte %llu, the file has %llu",
                 (unsigned long long) (region + gguf_get_val_u64(gguf, k_size)), (unsigned long long) file_size);
        *err = what;
        return false;
    }

    index->layers.clear();
    index->by_block.clear();
    for (int64_t i = 0; i < n; i++) {
        pi_bundle_layer L;
        L.layer     = (int) layer[i];
        L.n_ff      = (int64_t) n_ff[i];
        L.n_embd    = (int64_t) n_embd[i];
        L.gate_type = (int) gate_type[i];
        L.down_type = (int) down_type[i];
        L.cluster   = (int64_t) cluster[i];
        L.offset    = region + offset[i];
        if (L.layer < 0 || L.layer > 100000 || L.n_ff <= 0 || L.n_embd <= 0 || L.cluster <= 0 ||
            gate_type[i] >= GGML_TYPE_COUNT || down_type[i] >= GGML_TYPE_COUNT ||
            ggml_get_type_traits((enum ggml_type) L.gate_type)->blck_size <= 0 ||
            ggml_get_type_traits((enum ggml_type) L.down_type)->blck_size <= 0 ||
            L.n_embd % ggml_blck_size((enum ggml_type) L.gate_type) != 0 ||
            L.n_embd % ggml_blck_size((enum ggml_type) L.down_type) != 0) {
            snprintf(what, sizeof(what), "bundle table entry %lld is invalid", (long long) i);
            *err = what;
            return false;
        }
        if (!pi_activation_from_name(gguf_get_arr_str(gguf, k_act, i), &L.activation)) {
            *err = std::string("unknown activation '") + gguf_get_arr_str(gguf, k_act, i) + "' in bundle table";
            return false;
        }
        L.act_threshold = thresholds[i];
        if (pi_activation_is_thresholded(L.activation) && !(L.act_threshold > 0.0f)) {
            L.activation = PI_ACT_GRAPH; // no threshold: the source model's SiLU/GELU, dense
        }
        L.gate_row    = ggml_row_size((enum ggml_type) L.gate_type, L.n_embd);
        L.down_row    = ggml_row_size((enum ggml_type) L.down_type, L.n_embd);
        L.gate_half   = pad_to(L.cluster * L.gate_row, PI_IO_ALIGN);
        L.updown_half = pad_to(L.cluster * (L.gate_row + L.down_row), PI_IO_ALIGN);
        const uint64_t end = L.offset + (uint64_t) pi_bundle_n_clusters(&L) * (L.gate_half + L.updown_half);
        if (end > file_size) {
            snprintf(what, sizeof(what), "truncated PowerInfer file: the bundles of layer %d end at byte %llu, "
                     "the file has %llu", L.layer, (unsigned long long) end, (unsigned long long) file_size);
            *err = what;
            return false;
        }
        if ((int) index->by_block.size() <= L.layer) {
            index->by_block.resize(L.layer + 1, -1);
        }
        if (index->by_block[L.layer] >= 0) {
            snprintf(what, sizeof(what), "layer %d appears twice in the bundle table", L.layer);
            *err = what;
            return false;
        }
        index->by_block[L.layer] = (int) index->layers.size();
        index->layers.push_back(L);
    }
    return read_predictors(gguf, region, file_size, index, err);
}

int64_t pi_bundle_n_clusters(const pi_bundle_layer * L) {
    return (L->n_ff + L->cluster - 1) / L->cluster;
}

uint64_t pi_bundle_gate_half_offset(const pi_bundle_layer * L, int64_t c) {
    return L->offset + (uint64_t) c * (L->gate_half + L->updown_half);
}

uint64_t pi_bundle_updown_half_offset(const pi_bundle_layer * L, int64_t c) {
    return pi_bundle_gate_half_offset(L, c) + L->gate_half;
}

// Gathered gate rows (eight-row kernels over candidate lists, next rows prefetched) and the
// predictor are read at about 0.9 of the speed ggml's dense matmul reads the whole gate matrix
// (7B-class Q4_0 model, two threads: every predictor, 80% of gate rows, FFN 82 ms per token;
// ggml's gate matmul 87 ms; measured while predictors were held in F16).
static const double PI_GATHER_SPEED = 0.9;
// Held-out recall below which the default mode does not use a layer's predictor. Misses add up
// over layers: on the 7B-class model predictors with held-out recall 0.992-0.994 in all 32
// layers kept only 87% of greedy tokens (top-1 vs dense); an imported predictor made for other
// text (recall 0.35) turns text into garbage. `sparse="predictor"` uses them regardless.
static const float PI_MIN_RECALL = 0.995f;

double pi_predictor_decode_bytes(int64_t n_embd, int64_t n_ff, int64_t rank, bool linear) {
    const int64_t held = linear ? rank / 2 : rank;
    return (double) ggml_row_size(GGML_TYPE_Q8_0, pi_q8_0_padded(n_embd)) * held +
           (double) ggml_row_size(GGML_TYPE_Q8_0, pi_q8_0_padded(held)) * n_ff + 4.0 * n_ff;
}

bool pi_predictor_worth_it(const pi_bundle_layer * L, bool linear) {
    const pi_bundle_predictor & P = L->predictor;
    const double predictor_bytes = pi_predictor_decode_bytes(L->n_embd, L->n_ff, P.rank, linear);
    const double gate_bytes = (double) L->gate_row * L->n_ff;
    // a predictor that misses many active neurons (an imported one made for other text, say)
    // would change the model's output: every gate row instead
    return P.rank > 0 && P.recall >= PI_MIN_RECALL &&
           predictor_bytes + P.predicted_fraction * gate_bytes < PI_GATHER_SPEED * gate_bytes;
}

bool pi_bundle_read_predictor(pi_file * file, const pi_bundle_layer * L, uint16_t * fc1, uint16_t * fc2, float * bias,
                              std::string * err) {
    const pi_bundle_predictor & P = L->predictor;
    const struct { uint64_t offset; size_t size; void * dst; } parts[3] = {
        { P.fc1_offset,  2 * (size_t) (L->n_embd * P.rank), fc1 },
        { P.fc2_offset,  2 * (size_t) (P.rank * L->n_ff),   fc2 },
        { P.bias_offset, 4 * (size_t) L->n_ff,              bias },
    };
    pi_aligned_buf buf;
    bool ok = true;
    for (const auto & part : parts) {
        const void * data = pi_file_read(file, part.offset, part.size, &buf, err);
        if (data == nullptr) {
            ok = false;
            break;
        }
        memcpy(part.dst, data, part.size);
    }
    pi_aligned_buf_free(&buf);
    return ok;
}

bool pi_bundle_read_layer(pi_file * file, const pi_bundle_layer * L, void * gate, void * up, void * down_t,
                          std::string * err) {
    const int64_t n_clusters = pi_bundle_n_clusters(L);
    const size_t cluster_bytes = L->gate_half + L->updown_half;
    // a few clusters per read: large sequential reads, bounded scratch
    const int64_t per_read = cluster_bytes >= (16u << 20) ? 1 : (int64_t) ((16u << 20) / cluster_bytes);
    pi_aligned_buf buf;
    bool ok = true;
    for (int64_t c0 = 0; c0 < n_clusters && ok; c0 += per_read) {
        const int64_t c1 = c0 + per_read < n_clusters ? c0 + per_read : n_clusters;
        const char * data = (const char *) pi_file_read(file, pi_bundle_gate_half_offset(L, c0),
                                                        (size_t) (c1 - c0) * cluster_bytes, &buf, err);
        if (data == nullptr) {
            ok = false;
            break;
        }
        for (int64_t c = c0; c < c1; c++) {
            const char * g  = data + (size_t) (c - c0) * cluster_bytes;
            const char * ud = g + L->gate_half;
            const int64_t j0 = c * L->cluster;
            const int64_t nj = j0 + L->cluster <= L->n_ff ? L->cluster : L->n_ff - j0;
            memcpy((char *) gate + (size_t) j0 * L->gate_row, g, (size_t) nj * L->gate_row);
            for (int64_t j = 0; j < nj; j++) {
                const char * row = ud + (size_t) j * (L->gate_row + L->down_row);
                memcpy((char *) up + (size_t) (j0 + j) * L->gate_row, row, L->gate_row);
                memcpy((char *) down_t + (size_t) (j0 + j) * L->down_row, row + L->gate_row, L->down_row);
            }
        }
    }
    pi_aligned_buf_free(&buf);
    return ok;
}

int pi_bundle_ffn_tensor(const char * name, int * block) {
    int b = -1;
    int n = 0;
    char which[8] = {0};
    if (sscanf(name, "blk.%d.ffn_%7[a-z].weight%n", &b, which, &n) != 2 || name[n] != '\0' || b < 0) {
        return -1;
    }
    *block = b;
    if (strcmp(which, "gate") == 0) return 0;
    if (strcmp(which, "up") == 0)   return 1;
    if (strcmp(which, "down") == 0) return 2;
    return -1;
}
