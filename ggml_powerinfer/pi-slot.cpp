#include "pi-slot.h"

#include "pi-axpy.h"
#include "pi-log.h"

#include "ggml-cpu.h"
#include "gguf.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <unordered_map>
#include <vector>

// Tensor data alignment inside our buffers: matches the CPU backend, and keeps rows aligned for
// the vector kernels.
static const size_t PI_TENSOR_ALIGN = 64;

static void slot_unref(pi_model_slot * slot) {
    if (slot->refs.fetch_sub(1) == 1) {
        pi_file_close(&slot->file);
        delete slot;
    }
}

// get_tensor cannot fail in ggml's interface: on a read error report it and return zeros,
// never garbage.
static void read_from_model_file(pi_model_slot * slot, const struct ggml_tensor * tensor, void * data, size_t offset, size_t size) {
    auto it = slot->file.tensors.find(tensor->name);
    pi_aligned_buf tmp;
    std::string err = "not in the model file";
    const void * src = it == slot->file.tensors.end() ? nullptr :
        pi_file_read(&slot->file, it->second.offset + offset, size, &tmp, &err);
    if (src == nullptr) {
        pi_log_error("cannot read %s: %s\n", tensor->name, err.c_str());
        memset(data, 0, size);
    } else {
        memcpy(data, src, size);
    }
    pi_aligned_buf_free(&tmp);
}

//
// RAM buffer: each weight is stored the way ggml's CPU backend would store it for stock
// llama.cpp, in a CPU buffer of its own: repacked into interleaved blocks (CPU_REPACK) where the
// CPU backend supports that for the weight and the slot allows it, plain otherwise. The slot's
// buffer itself only reserves address space, so that ggml can lay the tensors out.
//

struct pi_ram_tensor {
    struct ggml_tensor      host; // the weight as the CPU kernels see it
    ggml_backend_buffer_t   buf;
    const pi_bundle_layer * bundle = nullptr; // PowerInfer model: the layer the weight is read from
    int                     which  = -1;      // 0 gate, 1 up, 2 down (held as down_t)
    std::vector<float>      scale_max;        // down_t of a type with an integer kernel: each
                                              // row's largest block scale
};

struct pi_ram_buffer {
    pi_model_slot *              slot;
    void *                       base;
    size_t                       size;
    std::vector<pi_ram_tensor *> tensors;
    // bundled layers whose gate, up and down are not all placed yet: the layer is read from
    // the bundles once all three have memory
    std::unordered_map<int, std::array<pi_ram_tensor *, 3>> pending;
};

static ggml_backend_dev_t cpu_device(void) {
    static ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    return dev;
}

// The CPU backend's extra buffer types (weight repacking), NULL-terminated, or nullptr.
static ggml_backend_buffer_type_t * cpu_extra_bufts(void) {
    static ggml_backend_buffer_type_t * bufts = [] {
        ggml_backend_dev_t dev = cpu_device();
        if (dev == nullptr) {
            return (ggml_backend_buffer_type_t *) nullptr;
        }
        auto get = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
            ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
        return get ? get(dev) : nullptr;
    }();
    return bufts;
}

// Whether the CPU backend would multiply by `w` from a buffer of type `buft` (the test
// llama.cpp's loader makes before placing a weight in an extra buffer type).
static bool cpu_supports_weight_in(ggml_backend_buffer_type_t buft, const struct ggml_tensor * w) {
    struct ggml_init_params params = { 3*ggml_tensor_overhead(), nullptr, /*.no_alloc =*/ true };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * wc = ggml_new_tensor_2d(ctx, w->type, w->ne[0], w->ne[1]);
    struct ggml_tensor * x  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 512);
    struct ggml_tensor * op = ggml_mul_mat(ctx, wc, x);
    wc->buffer = ggml_backend_buft_alloc_buffer(buft, 0);
    const bool ok = wc->buffer != nullptr && ggml_backend_dev_supports_op(cpu_device(), op);
    if (wc->buffer != nullptr) {
        ggml_backend_buffer_free(wc->buffer);
    }
    ggml_free(ctx);
    return ok;
}

ggml_backend_buffer_type_t pi_cpu_repack_buft(const struct ggml_tensor * w) {
    ggml_backend_buffer_type_t * extra = ggml_n_dims(w) == 2 ? cpu_extra_bufts() : nullptr;
    for (; extra != nullptr && *extra != nullptr; extra++) {
        if (cpu_supports_weight_in(*extra, w)) {
            return *extra;
        }
    }
    return nullptr;
}

static ggml_backend_buffer_type_t choose_cpu_buft(const pi_model_slot * slot, const struct ggml_tensor * w) {
    ggml_backend_buffer_type_t buft = slot->repack ? pi_cpu_repack_buft(w) : nullptr;
    return buft != nullptr ? buft : ggml_backend_cpu_buffer_type();
}

static void ram_buffer_free(ggml_backend_buffer_t buffer) {
    pi_ram_buffer * ctx = (pi_ram_buffer *) buffer->context;
    for (pi_ram_tensor * t : ctx->tensors) {
        ctx->slot->resident_bytes -= ggml_backend_buffer_get_size(t->buf);
        ggml_backend_buffer_free(t->buf);
        delete t;
    }
    munmap(ctx->base, ctx->size);
    slot_unref(ctx->slot);
    delete ctx;
}

static void * ram_buffer_get_base(ggml_backend_buffer_t buffer) {
    return ((pi_ram_buffer *) buffer->context)->base;
}

// Whether each of `rows` F16 rows of `cols` values (cols even) is [a, -a]: every value of its
// second half the negation of the value cols/2 before it (+0 and -0 count as negations). fc1
// (n_embd rows of rank) pairs columns; fc2 (rank rows of n_ff), read as one row, pairs rows.
static bool negated_pairs(const uint16_t * m, int64_t rows, int64_t cols) {
    if (cols % 2 != 0) {
        return false;
    }
    const int64_t half = cols / 2;
    for (int64_t j = 0; j < rows; j++) {
        const uint16_t * a = m + j*cols;
        for (int64_t r = 0; r < half; r++) {
            const uint16_t x = a[r], y = a[r + half];
            if ((x ^ y) != 0x8000 && ((x | y) & 0x7fff) != 0) {
                return false;
            }
        }
    }
    return true;
}

// The first P->rank hidden units of a file predictor (fc1: n_embd rows of `rank` F16; fc2: `rank`
// rows of n_ff F16) as P's Q8_0 rows: fc1 by hidden unit, fc2 by neuron, both zero-padded.
static void hold_predictor_q8_0(pi_predictor_ram * P, const uint16_t * fc1, const uint16_t * fc2, int64_t rank,
                                int64_t n_embd, int64_t n_ff) {
    const ggml_from_float_t quantize = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float;
    P->rank_padded   = pi_q8_0_padded(P->rank);
    P->n_embd_padded = pi_q8_0_padded(n_embd);
    const size_t fc1_row = ggml_row_size(GGML_TYPE_Q8_0, P->n_embd_padded);
    const size_t fc2_row = ggml_row_size(GGML_TYPE_Q8_0, P->rank_padded);
    P->fc1.resize(fc1_row * (size_t) P->rank);
    P->fc2.resize(fc2_row * (size_t) n_ff);
    std::vector<float> row((size_t) std::max(P->n_embd_padded, P->rank_padded), 0.0f);
    for (int64_t r = 0; r < P->rank; r++) {
        for (int64_t j = 0; j < n_embd; j++) {
            row[j] = ggml_fp16_to_fp32(fc1[j*rank + r]);
        }
        quantize(row.data(), P->fc1.data() + r*fc1_row, P->n_embd_padded);
    }
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t i = 0; i < n_ff; i++) {
        for (int64_t r = 0; r < P->rank; r++) {
            row[r] = ggml_fp16_to_fp32(fc2[r*n_ff + i]);
        }
        quantize(row.data(), P->fc2.data() + i*fc2_row, P->rank_padded);
    }
}

// Reads a bundled layer into its three weights: gate and up as contiguous hot-first matrices
// (repacked by the CPU backend where it would repack them), down as down_t.
static bool load_bundled_layer(pi_model_slot * slot, const std::array<pi_ram_tensor *, 3> & parts) {
    const pi_bundle_layer * L = parts[0]->bundle;
    std::vector<char> staging[2];
    void * dst[3];
    for (int i = 0; i < 3; i++) {
        struct ggml_tensor * host = &parts[i]->host;
        if (host->buffer->buft == ggml_backend_cpu_buffer_type()) {
            dst[i] = host->data;
        } else {
            staging[i].resize(ggml_nbytes(host));
            dst[i] = staging[i].data();
        }
    }
    std::string err;
    if (!pi_bundle_read_layer(&slot->file, L, dst[0], dst[1], dst[2], &err)) {
        pi_log_error("cannot read the neuron bundles of layer %d from %s: %s\n", L->layer, slot->path.c_str(), err.c_str());
        return false;
    }
    for (int i = 0; i < 2; i++) {
        if (!staging[i].empty()) {
            ggml_backend_tensor_set(&parts[i]->host, staging[i].data(), 0, staging[i].size());
        }
    }
    const struct ggml_tensor * down_t = &parts[2]->host;
    if (pi_axpy_int_kernel(down_t->type) != nullptr) {
        std::vector<float> & m = parts[2]->scale_max;
        m.resize((size_t) down_t->ne[1]);
        for (int64_t i = 0; i < down_t->ne[1]; i++) {
            m[(size_t) i] = pi_row_scale_max(down_t->type, (const char *) down_t->data + i*down_t->nb[1], down_t->ne[0]);
        }
        slot->resident_bytes += sizeof(float) * m.size();
    }
    if (L->predictor.rank > 0) {
        pi_predictor_ram & P = slot->predictors[slot->bundles.by_block[L->layer]];
        const int64_t rank = L->predictor.rank;
        std::vector<uint16_t> fc1((size_t) (L->n_embd * rank));
        std::vector<uint16_t> fc2((size_t) (rank * L->n_ff));
        P.bias.resize((size_t) L->n_ff);
        if (!pi_bundle_read_predictor(&slot->file, L, fc1.data(), fc2.data(), P.bias.data(), &err)) {
            pi_log_error("cannot read the predictor of layer %d from %s: %s\n", L->layer, slot->path.c_str(), err.c_str());
            return false;
        }
        P.linear = negated_pairs(fc1.data(), L->n_embd, rank) && negated_pairs(fc2.data(), 1, rank * L->n_ff);
        P.rank   = P.linear ? rank / 2 : rank;
        hold_predictor_q8_0(&P, fc1.data(), fc2.data(), rank, L->n_embd, L->n_ff);
        slot->resident_bytes += P.fc1.size() + P.fc2.size() + sizeof(float) * P.bias.size();
    }
    return true;
}

const pi_predictor_ram * pi_slot_predictor(const pi_model_slot * slot, const pi_bundle_layer * L) {
    const int i = L->layer < (int) slot->bundles.by_block.size() ? slot->bundles.by_block[L->layer] : -1;
    return i >= 0 && i < (int) slot->predictors.size() && !slot->predictors[i].fc1.empty() ? &slot->predictors[i] : nullptr;
}

// For a FFN weight of a PowerInfer model: its layer in the bundle table, after checking that
// the shapes llama.cpp expects agree with the table.
static const pi_bundle_layer * bundled_layer_for(pi_model_slot * slot, const struct ggml_tensor * tensor, int * which) {
    int block = -1;
    *which = pi_bundle_ffn_tensor(tensor->name, &block);
    const pi_bundle_layer * L = *which >= 0 ? slot->bundles.find(block) : nullptr;
    if (L == nullptr) {
        pi_log_error("%s is not in the neuron bundles of %s\n", tensor->name, slot->path.c_str());
        return nullptr;
    }
    const bool down = *which == 2;
    const int64_t ne0 = down ? L->n_ff : L->n_embd;
    const int64_t ne1 = down ? L->n_embd : L->n_ff;
    if (tensor->ne[0] != ne0 || tensor->ne[1] != ne1 || tensor->ne[2] != 1 || tensor->ne[3] != 1 ||
        (!down && (int) tensor->type != L->gate_type)) {
        pi_log_error("%s: shape or type differs from the neuron bundles of layer %d in %s\n",
                     tensor->name, L->layer, slot->path.c_str());
        return nullptr;
    }
    return L;
}

// Sparse decode reads a few KiB here and there across each weight: with 4 KiB pages nearly every
// row is a TLB miss and the hardware prefetcher stops at each page edge. Transparent huge pages
// (where the kernel allows them on request) make a row one page walk at most. Best effort.
static void advise_huge_pages(void * base, size_t size) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge  = (uintptr_t) 2 << 20;
    const uintptr_t begin = ((uintptr_t) base + huge - 1) & ~(huge - 1);
    const uintptr_t end   = ((uintptr_t) base + size) & ~(huge - 1);
    if (end > begin) {
        madvise((void *) begin, end - begin, MADV_HUGEPAGE);
    }
#else
    (void) base; (void) size;
#endif
}

static enum ggml_status ram_buffer_init_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor) {
    pi_ram_buffer * ctx = (pi_ram_buffer *) buffer->context;
    pi_model_slot * slot = ctx->slot;
    if (tensor->view_src != nullptr) {
        pi_log_error("views of weights are not supported (%s)\n", tensor->name);
        return GGML_STATUS_FAILED;
    }
    const pi_bundle_layer * L = nullptr;
    int which = -1;
    if (slot->powerinfer && (L = bundled_layer_for(slot, tensor, &which)) == nullptr) {
        return GGML_STATUS_FAILED;
    }
    struct ggml_tensor host = *tensor;
    host.buffer = nullptr;
    host.data   = nullptr;
    host.extra  = nullptr;
    ggml_backend_buffer_type_t buft;
    if (which == 2) {
        // ffn_down is held transposed (down_t): rows of n_embd, one per neuron
        host.type  = (enum ggml_type) L->down_type;
        host.ne[0] = L->n_embd;
        host.ne[1] = L->n_ff;
        host.nb[0] = ggml_type_size(host.type);
        host.nb[1] = L->down_row;
        host.nb[2] = host.nb[1]*host.ne[1];
        host.nb[3] = host.nb[2];
        buft = ggml_backend_cpu_buffer_type();
    } else {
        buft = choose_cpu_buft(slot, tensor);
    }
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, ggml_nbytes(&host));
    if (buf == nullptr) {
        pi_log_error("cannot allocate %zu bytes for %s\n", ggml_nbytes(&host), tensor->name);
        return GGML_STATUS_ALLOC_FAILED;
    }
    advise_huge_pages(ggml_backend_buffer_get_base(buf), ggml_backend_buffer_get_size(buf));
    pi_ram_tensor * t = new pi_ram_tensor;
    t->host   = host;
    t->buf    = buf;
    t->bundle = L;
    t->which  = which;
    enum ggml_status status = ggml_backend_tensor_alloc(buf, &t->host, ggml_backend_buffer_get_base(buf));
    if (status != GGML_STATUS_SUCCESS) {
        ggml_backend_buffer_free(buf);
        delete t;
        return status;
    }
    ctx->tensors.push_back(t);
    tensor->extra = t;
    slot->weight_bytes   += ggml_nbytes(tensor);
    slot->resident_bytes += ggml_backend_buffer_get_size(buf);

    if (L != nullptr) {
        std::array<pi_ram_tensor *, 3> & parts = ctx->pending[L->layer];
        parts[which] = t;
        if (parts[0] != nullptr && parts[1] != nullptr && parts[2] != nullptr) {
            const bool ok = load_bundled_layer(slot, parts);
            ctx->pending.erase(L->layer);
            if (!ok) {
                return GGML_STATUS_FAILED; // llama.cpp fails the load with our message logged
            }
        }
    }
    return GGML_STATUS_SUCCESS;
}

static void ram_buffer_memset_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor, uint8_t value, size_t offset, size_t size) {
    if (((pi_ram_tensor *) tensor->extra)->bundle != nullptr) {
        return; // read from the bundles; the GGUF region of the tensor is a hole
    }
    ggml_backend_tensor_memset(pi_ram_host_tensor(tensor), value, offset, size);
    GGML_UNUSED(buffer);
}

static void ram_buffer_set_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor, const void * data, size_t offset, size_t size) {
    if (((pi_ram_tensor *) tensor->extra)->bundle != nullptr) {
        return; // the loader read the tensor's hole in the GGUF: the weight came from the bundles
    }
    struct ggml_tensor * host = pi_ram_host_tensor(tensor);
    if (host->buffer->buft != ggml_backend_cpu_buffer_type() && (offset != 0 || size != ggml_nbytes(tensor))) {
        // a repacked weight can only be written whole; llama.cpp's loader always does that
        pi_log_error("partial write of repacked weight %s refused\n", tensor->name);
        return;
    }
    ggml_backend_tensor_set(host, data, offset, size);
    GGML_UNUSED(buffer);
}

static void ram_buffer_get_tensor(ggml_backend_buffer_t buffer, const struct ggml_tensor * tensor, void * data, size_t offset, size_t size) {
    pi_ram_buffer * ctx = (pi_ram_buffer *) buffer->context;
    if (((pi_ram_tensor *) tensor->extra)->bundle != nullptr) {
        // neurons are stored hot-first and down transposed: not the source layout
        pi_log_error("reading bundled weight %s back is not supported\n", tensor->name);
        memset(data, 0, size);
        return;
    }
    struct ggml_tensor * host = pi_ram_host_tensor(tensor);
    if (host->buffer->buft == ggml_backend_cpu_buffer_type()) {
        ggml_backend_tensor_get(host, data, offset, size);
        return;
    }
    // repacked bytes are not the file's: read the original from the model file
    read_from_model_file(ctx->slot, tensor, data, offset, size);
}

static void ram_buffer_clear(ggml_backend_buffer_t buffer, uint8_t value) {
    GGML_UNUSED(buffer); GGML_UNUSED(value); // weights are never cleared
}

static const struct ggml_backend_buffer_i pi_ram_buffer_i = {
    /* .free_buffer   = */ ram_buffer_free,
    /* .get_base      = */ ram_buffer_get_base,
    /* .init_tensor   = */ ram_buffer_init_tensor,
    /* .memset_tensor = */ ram_buffer_memset_tensor,
    /* .set_tensor    = */ ram_buffer_set_tensor,
    /* .get_tensor    = */ ram_buffer_get_tensor,
    /* .set_tensor_2d = */ NULL,
    /* .get_tensor_2d = */ NULL,
    /* .cpy_tensor    = */ NULL,
    /* .clear         = */ ram_buffer_clear,
    /* .reset         = */ NULL,
};

//
// Disk buffer: weights stay in the model file. The buffer only reserves address space (no
// memory) so that ggml can lay tensors out in it; touching it faults, which would be a bug.
//

struct pi_disk_buffer {
    pi_model_slot * slot;
    void *          base;
    size_t          size;
};

static void disk_buffer_free(ggml_backend_buffer_t buffer) {
    pi_disk_buffer * ctx = (pi_disk_buffer *) buffer->context;
    munmap(ctx->base, ctx->size);
    slot_unref(ctx->slot);
    delete ctx;
}

static void * disk_buffer_get_base(ggml_backend_buffer_t buffer) {
    return ((pi_disk_buffer *) buffer->context)->base;
}

static enum ggml_status disk_buffer_init_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor) {
    pi_disk_buffer * ctx = (pi_disk_buffer *) buffer->context;
    if (tensor->view_src != nullptr) {
        tensor->extra = tensor->view_src->extra;
        return GGML_STATUS_SUCCESS;
    }
    auto it = ctx->slot->file.tensors.find(tensor->name);
    if (it == ctx->slot->file.tensors.end() || it->second.size != ggml_nbytes(tensor)) {
        pi_log_error("tensor %s is not in %s (or has another size)\n",
                       tensor->name, ctx->slot->path.c_str());
        return GGML_STATUS_FAILED;
    }
    tensor->extra = &it->second;
    ctx->slot->weight_bytes += ggml_nbytes(tensor);
    return GGML_STATUS_SUCCESS;
}

static void disk_buffer_memset_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor, uint8_t value, size_t offset, size_t size) {
    // weights are read-only here; llama.cpp never clears weights
    GGML_UNUSED(buffer); GGML_UNUSED(tensor); GGML_UNUSED(value); GGML_UNUSED(offset); GGML_UNUSED(size);
}

static void disk_buffer_set_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor, const void * data, size_t offset, size_t size) {
    // The loader hands over the bytes it read (or mapped) from the same file: nothing to keep.
    // Not touching `data` means a mapped file region is never faulted in.
    GGML_UNUSED(buffer); GGML_UNUSED(tensor); GGML_UNUSED(data); GGML_UNUSED(offset); GGML_UNUSED(size);
}

static void disk_buffer_get_tensor(ggml_backend_buffer_t buffer, const struct ggml_tensor * tensor, void * data, size_t offset, size_t size) {
    read_from_model_file(((pi_disk_buffer *) buffer->context)->slot, tensor, data, offset, size);
}

static void disk_buffer_clear(ggml_backend_buffer_t buffer, uint8_t value) {
    GGML_UNUSED(buffer); GGML_UNUSED(value);
}

static const struct ggml_backend_buffer_i pi_disk_buffer_i = {
    /* .free_buffer   = */ disk_buffer_free,
    /* .get_base      = */ disk_buffer_get_base,
    /* .init_tensor   = */ disk_buffer_init_tensor,
    /* .memset_tensor = */ disk_buffer_memset_tensor,
    /* .set_tensor    = */ disk_buffer_set_tensor,
    /* .get_tensor    = */ disk_buffer_get_tensor,
    /* .set_tensor_2d = */ NULL,
    /* .get_tensor_2d = */ NULL,
    /* .cpy_tensor    = */ NULL,
    /* .clear         = */ disk_buffer_clear,
    /* .reset         = */ NULL,
};

//
// Buffer types
//

static const char * slot_buft_get_name(ggml_backend_buffer_type_t buft) {
    return ((pi_model_slot *) buft->context)->buft_name.c_str();
}

static ggml_backend_buffer_t slot_buft_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size) {
    pi_model_slot * slot = (pi_model_slot *) buft->context;
    // ggml asks for 0-byte dummy buffers when probing support
    const size_t alloc_size = size == 0 ? PI_TENSOR_ALIGN : (size + PI_TENSOR_ALIGN - 1) / PI_TENSOR_ALIGN * PI_TENSOR_ALIGN;
    // both kinds only reserve address space: the bytes live in per-weight CPU buffers (RAM)
    // or stay in the file (disk); touching the reservation faults, which would be a bug
    void * base = mmap(nullptr, alloc_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        pi_log_error("cannot reserve %zu bytes of address space\n", size);
        return nullptr;
    }
    slot->refs++;
    if (slot->residency == PI_RESIDENCY_RAM) {
        pi_ram_buffer * ctx = new pi_ram_buffer{ slot, base, alloc_size, {}, {} };
        return ggml_backend_buffer_init(buft, pi_ram_buffer_i, ctx, size);
    }
    pi_disk_buffer * ctx = new pi_disk_buffer{ slot, base, alloc_size };
    return ggml_backend_buffer_init(buft, pi_disk_buffer_i, ctx, size);
}

static size_t slot_buft_get_alignment(ggml_backend_buffer_type_t buft) {
    return PI_TENSOR_ALIGN;
    GGML_UNUSED(buft);
}

static bool slot_buft_is_host(ggml_backend_buffer_type_t buft) {
    // the buffer's own address range holds no data: the loader must go through set_tensor
    return false;
    GGML_UNUSED(buft);
}

static const struct ggml_backend_buffer_type_i pi_slot_buft_i = {
    /* .get_name       = */ slot_buft_get_name,
    /* .alloc_buffer   = */ slot_buft_alloc_buffer,
    /* .get_alignment  = */ slot_buft_get_alignment,
    /* .get_max_size   = */ NULL,
    /* .get_alloc_size = */ NULL,
    /* .is_host        = */ slot_buft_is_host,
};

bool pi_buft_is_ours(ggml_backend_buffer_type_t buft) {
    return buft != nullptr && buft->iface.get_name == slot_buft_get_name;
}

pi_model_slot * pi_slot_of_tensor(const struct ggml_tensor * t) {
    const ggml_backend_buffer_t buf = t->view_src ? t->view_src->buffer : t->buffer;
    if (buf == nullptr || !pi_buft_is_ours(buf->buft)) {
        return nullptr;
    }
    return (pi_model_slot *) buf->buft->context;
}

const pi_tensor_loc * pi_disk_tensor_loc(const struct ggml_tensor * t) {
    return (const pi_tensor_loc *) t->extra;
}

struct ggml_tensor * pi_ram_host_tensor(const struct ggml_tensor * t) {
    return &((pi_ram_tensor *) t->extra)->host;
}

const float * pi_ram_row_scale_max(const struct ggml_tensor * t) {
    const pi_ram_tensor * rt = (const pi_ram_tensor *) t->extra;
    return rt->scale_max.empty() ? nullptr : rt->scale_max.data();
}

const pi_bundle_layer * pi_bundle_layer_of(const struct ggml_tensor * t, int * which) {
    pi_model_slot * slot = pi_slot_of_tensor(t);
    if (slot == nullptr || !slot->powerinfer || slot->residency != PI_RESIDENCY_RAM) {
        return nullptr;
    }
    const pi_ram_tensor * rt = (const pi_ram_tensor *) (t->view_src ? t->view_src->extra : t->extra);
    *which = rt->which;
    return rt->bundle;
}

//
// Public slot API
//

pi_model_slot_t pi_model_slot_new(const char * path, enum pi_residency residency, bool repack, char * err, size_t err_size) {
    pi_model_slot * slot = new pi_model_slot;
    slot->path      = path;
    slot->residency = residency;
    slot->repack    = repack;
    std::string why;
    struct gguf_context * gguf = nullptr;
    if (!pi_file_open(&slot->file, path, &why, &gguf)) {
        if (err != nullptr && err_size > 0) {
            snprintf(err, err_size, "%s", why.c_str());
        }
        delete slot;
        return nullptr;
    }
    slot->powerinfer = pi_bundle_is_powerinfer(gguf);
    bool ok = true;
    if (slot->powerinfer) {
        ok = pi_bundle_index_read(gguf, slot->file.file_size, &slot->bundles, &why);
        why = std::string(path) + ": " + why;
        slot->predictors.resize(slot->bundles.layers.size());
        if (ok && residency != PI_RESIDENCY_RAM) {
            ok  = false;
            why = "a PowerInfer model cannot yet keep its FFN on disk (that arrives with the neuron cache); "
                  "open it with the FFN in memory";
        }
    }
    gguf_free(gguf);
    if (!ok) {
        if (err != nullptr && err_size > 0) {
            snprintf(err, err_size, "%s", why.c_str());
        }
        pi_file_close(&slot->file);
        delete slot;
        return nullptr;
    }
    slot->buft_name = residency == PI_RESIDENCY_RAM ? "PowerInfer_RAM" : "PowerInfer_Disk";
    slot->buft.iface   = pi_slot_buft_i;
    slot->buft.device  = pi_device();
    slot->buft.context = slot;
    return slot;
}

bool pi_check_gguf(const char * path, char * err, size_t err_size) {
    pi_file file;
    std::string why;
    const bool ok = pi_file_open(&file, path, &why);
    if (!ok && err != nullptr && err_size > 0) {
        snprintf(err, err_size, "%s", why.c_str());
    }
    pi_file_close(&file);
    return ok;
}

void pi_model_slot_release(pi_model_slot_t slot) {
    if (slot != nullptr) {
        slot_unref(slot);
    }
}

ggml_backend_buffer_type_t pi_model_slot_buft(pi_model_slot_t slot) {
    return &slot->buft;
}

void pi_model_slot_get_stats(pi_model_slot_t slot, struct pi_stats * out) {
    const pi_counters & c = slot->counters;
    out->ffn_bytes_read    = c.ffn_bytes_read.load();
    out->ffn_read_ns       = c.ffn_read_ns.load();
    out->ffn_rows_computed = c.ffn_rows_computed.load();
    out->ffn_matmuls       = c.ffn_matmuls.load();
    out->ffn_graphs        = c.ffn_graphs.load();
    out->ffn_ns            = c.ffn_ns.load();
    out->ffn_tokens        = c.ffn_tokens.load();
    out->sparse_layer_tokens = c.sparse_layer_tokens.load();
    out->neurons_total     = c.neurons_total.load();
    out->neurons_predicted = c.neurons_predicted.load();
    out->neurons_active    = c.neurons_active.load();
    out->batch_repacks     = c.batch_repacks.load();
    out->down_transposes   = c.down_transposes.load();
}

bool pi_model_slot_set_sparse_mode(pi_model_slot_t slot, enum pi_sparse_mode mode) {
    if (mode != PI_SPARSE_OFF && (!slot->powerinfer || slot->residency != PI_RESIDENCY_RAM || slot->repack)) {
        return false;
    }
    slot->sparse_mode = mode;
    return true;
}

enum pi_sparse_mode pi_model_slot_sparse_mode(pi_model_slot_t slot) {
    return (enum pi_sparse_mode) slot->sparse_mode.load();
}

void pi_model_slot_reset_stats(pi_model_slot_t slot) {
    pi_counters & c = slot->counters;
    c.ffn_bytes_read = 0;
    c.ffn_read_ns = 0;
    c.ffn_rows_computed = 0;
    c.ffn_matmuls = 0;
    c.ffn_graphs = 0;
    c.ffn_ns = 0;
    c.ffn_tokens = 0;
    c.sparse_layer_tokens = 0;
    c.neurons_total = 0;
    c.neurons_predicted = 0;
    c.neurons_active = 0;
    c.batch_repacks = 0;
    c.down_transposes = 0;
}

size_t pi_model_slot_resident_bytes(pi_model_slot_t slot) {
    return slot->resident_bytes.load();
}

size_t pi_model_slot_weight_bytes(pi_model_slot_t slot) {
    return slot->weight_bytes.load();
}

bool pi_model_slot_direct_io(pi_model_slot_t slot) {
    return slot->file.fd_direct >= 0;
}
