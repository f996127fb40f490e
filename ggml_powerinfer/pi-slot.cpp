#include "pi-slot.h"
#include "pi-log.h"

#include <cstdlib>
#include <cstring>
#include <sys/mman.h>

// Tensor data alignment inside our buffers: matches the CPU backend, and keeps rows aligned for
// the vector kernels.
static const size_t PI_TENSOR_ALIGN = 64;

static void slot_unref(pi_model_slot * slot) {
    if (slot->refs.fetch_sub(1) == 1) {
        pi_file_close(&slot->file);
        delete slot;
    }
}

//
// RAM buffer: weights copied into anonymous memory
//

struct pi_ram_buffer {
    pi_model_slot * slot;
    void *          data;
    size_t          size;
};

static void ram_buffer_free(ggml_backend_buffer_t buffer) {
    pi_ram_buffer * ctx = (pi_ram_buffer *) buffer->context;
    ctx->slot->resident_bytes -= ctx->size;
    free(ctx->data);
    slot_unref(ctx->slot);
    delete ctx;
}

static void * ram_buffer_get_base(ggml_backend_buffer_t buffer) {
    return ((pi_ram_buffer *) buffer->context)->data;
}

static enum ggml_status ram_buffer_init_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor) {
    pi_ram_buffer * ctx = (pi_ram_buffer *) buffer->context;
    if (tensor->view_src == nullptr) {
        ctx->slot->weight_bytes += ggml_nbytes(tensor);
    }
    return GGML_STATUS_SUCCESS;
}

static void ram_buffer_memset_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor, uint8_t value, size_t offset, size_t size) {
    memset((char *) tensor->data + offset, value, size);
    GGML_UNUSED(buffer);
}

static void ram_buffer_set_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor, const void * data, size_t offset, size_t size) {
    memcpy((char *) tensor->data + offset, data, size);
    GGML_UNUSED(buffer);
}

static void ram_buffer_get_tensor(ggml_backend_buffer_t buffer, const struct ggml_tensor * tensor, void * data, size_t offset, size_t size) {
    memcpy(data, (const char *) tensor->data + offset, size);
    GGML_UNUSED(buffer);
}

static void ram_buffer_clear(ggml_backend_buffer_t buffer, uint8_t value) {
    pi_ram_buffer * ctx = (pi_ram_buffer *) buffer->context;
    memset(ctx->data, value, ctx->size);
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
    pi_disk_buffer * ctx = (pi_disk_buffer *) buffer->context;
    const pi_tensor_loc * loc = pi_disk_tensor_loc(tensor);
    pi_aligned_buf tmp;
    std::string err;
    const void * src = loc ? pi_file_read(&ctx->slot->file, loc->offset + offset, size, &tmp, &err) : nullptr;
    if (src == nullptr) {
        // get_tensor cannot fail in ggml's interface: report and return zeros, never garbage
        pi_log_error("cannot read %s: %s\n", tensor->name, err.c_str());
        memset(data, 0, size);
    } else {
        memcpy(data, src, size);
    }
    pi_aligned_buf_free(&tmp);
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
    // ggml asks for 0-byte dummy buffers when probing support: give them one page
    const size_t alloc_size = size == 0 ? PI_TENSOR_ALIGN : (size + PI_TENSOR_ALIGN - 1) / PI_TENSOR_ALIGN * PI_TENSOR_ALIGN;

    if (slot->residency == PI_RESIDENCY_RAM) {
        void * data = nullptr;
        if (posix_memalign(&data, PI_TENSOR_ALIGN, alloc_size) != 0) {
            pi_log_error("cannot allocate %zu bytes for %s\n", size, slot->buft_name.c_str());
            return nullptr;
        }
        slot->refs++;
        slot->resident_bytes += alloc_size;
        pi_ram_buffer * ctx = new pi_ram_buffer{ slot, data, alloc_size };
        return ggml_backend_buffer_init(buft, pi_ram_buffer_i, ctx, size);
    }

    void * base = mmap(nullptr, alloc_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        pi_log_error("cannot reserve %zu bytes of address space\n", size);
        return nullptr;
    }
    slot->refs++;
    pi_disk_buffer * ctx = new pi_disk_buffer{ slot, base, alloc_size };
    return ggml_backend_buffer_init(buft, pi_disk_buffer_i, ctx, size);
}

static size_t slot_buft_get_alignment(ggml_backend_buffer_type_t buft) {
    return PI_TENSOR_ALIGN;
    GGML_UNUSED(buft);
}

static bool slot_buft_is_host(ggml_backend_buffer_type_t buft) {
    // RAM weights use the standard layout in host memory, so the CPU backend may read them too
    return ((pi_model_slot *) buft->context)->residency == PI_RESIDENCY_RAM;
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

//
// Public slot API
//

pi_model_slot_t pi_model_slot_new(const char * path, enum pi_residency residency, char * err, size_t err_size) {
    pi_model_slot * slot = new pi_model_slot;
    slot->path      = path;
    slot->residency = residency;
    if (residency == PI_RESIDENCY_DISK) {
        std::string why;
        if (!pi_file_open(&slot->file, path, &why)) {
            if (err != nullptr && err_size > 0) {
                snprintf(err, err_size, "%s", why.c_str());
            }
            delete slot;
            return nullptr;
        }
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
