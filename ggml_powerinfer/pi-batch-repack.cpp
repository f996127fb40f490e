#include "pi-batch-repack.h"

#include "pi-slot.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

// 7B Q4_0 FFN, 2 threads: a repack costs 10% of an 8-token batch and gains 2.5% at 32 tokens,
// 9% at 64 and 23% at 512
static const int64_t PI_MIN_TOKENS_FOR_REPACK = 32;

struct pi_batch_repack {
    struct ggml_context *      ctx    = nullptr; // holds the scratch tensor's metadata
    ggml_backend_buffer_t      buf    = nullptr;
    struct ggml_tensor *       weight = nullptr; // the scratch, in a CPU_REPACK buffer
    ggml_backend_buffer_type_t buft   = nullptr;
};

pi_batch_repack * pi_batch_repack_new(void) {
    return new pi_batch_repack;
}

static void release(pi_batch_repack * r) {
    if (r->buf != nullptr) {
        ggml_backend_buffer_free(r->buf);
    }
    if (r->ctx != nullptr) {
        ggml_free(r->ctx);
    }
    r->ctx = nullptr;
    r->buf = nullptr;
    r->weight = nullptr;
    r->buft = nullptr;
}

void pi_batch_repack_free(pi_batch_repack * r) {
    if (r != nullptr) {
        release(r);
        delete r;
    }
}

bool pi_batch_repack_worth_it(const struct ggml_tensor * w, int64_t n_tokens) {
    return n_tokens >= PI_MIN_TOKENS_FOR_REPACK && w->buffer != nullptr &&
           w->buffer->buft == ggml_backend_cpu_buffer_type() && ggml_is_contiguous(w);
}

// A scratch tensor shaped like `w` in the buffer type that repacks it (kept while shapes match).
static bool ensure_scratch(pi_batch_repack * r, const struct ggml_tensor * w) {
    if (r->weight != nullptr && r->weight->type == w->type && ggml_are_same_shape(r->weight, w)) {
        return true;
    }
    release(r);
    ggml_backend_buffer_type_t buft = pi_cpu_repack_buft(w);
    if (buft == nullptr) {
        return false;
    }
    struct ggml_init_params params = { ggml_tensor_overhead(), nullptr, /*.no_alloc =*/ true };
    r->ctx = ggml_init(params);
    r->weight = ggml_new_tensor_2d(r->ctx, w->type, w->ne[0], w->ne[1]);
    r->buf = ggml_backend_buft_alloc_buffer(buft, ggml_backend_buft_get_alloc_size(buft, r->weight));
    if (r->buf == nullptr || ggml_backend_tensor_alloc(r->buf, r->weight, ggml_backend_buffer_get_base(r->buf)) !=
                                 GGML_STATUS_SUCCESS) {
        release(r);
        return false;
    }
    ggml_backend_buffer_set_usage(r->buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    r->buft = buft;
    return true;
}

const struct ggml_tensor * pi_batch_repack_weight(pi_batch_repack * r, const struct ggml_tensor * w) {
    if (!ensure_scratch(r, w)) {
        return nullptr;
    }
    ggml_backend_tensor_set(r->weight, w->data, 0, ggml_nbytes(w));
    return r->weight;
}
