// The PowerInfer ggml device, backend and registry.
//
// The device claims exactly the FFN of layers whose weights sit in a model slot's buffer type:
// the matmuls with those weights and the activation that joins gate and up. Anything wider
// would pull neighbouring ops (norms, residual adds) off the CPU backend, because the scheduler
// expands an accelerator's assignments to every adjacent op it says it supports.

#include "ggml-powerinfer.h"
#include "pi-compute.h"
#include "pi-matmul.h"
#include "pi-slot.h"

#include "ggml-backend-impl.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <thread>

static const char * pi_backend_get_name(ggml_backend_t backend) {
    return "PowerInfer";
    GGML_UNUSED(backend);
}

static void pi_backend_free(ggml_backend_t backend) {
    pi_compute_context_free((pi_compute_context *) backend->context);
    delete backend;
}

static enum ggml_status pi_backend_graph_compute(ggml_backend_t backend, struct ggml_cgraph * cgraph) {
    return pi_compute_graph((pi_compute_context *) backend->context, cgraph);
}

static struct ggml_backend_i pi_backend_i = {
    /* .get_name            = */ pi_backend_get_name,
    /* .free                = */ pi_backend_free,
    /* .set_tensor_async    = */ NULL,
    /* .get_tensor_async    = */ NULL,
    /* .set_tensor_2d_async = */ NULL,
    /* .get_tensor_2d_async = */ NULL,
    /* .cpy_tensor_async    = */ NULL,
    /* .synchronize         = */ NULL,
    /* .graph_plan_create   = */ NULL,
    /* .graph_plan_free     = */ NULL,
    /* .graph_plan_update   = */ NULL,
    /* .graph_plan_compute  = */ NULL,
    /* .graph_compute       = */ pi_backend_graph_compute,
    /* .event_record        = */ NULL,
    /* .event_wait          = */ NULL,
    /* .graph_optimize      = */ NULL,
};

static ggml_guid_t pi_backend_guid(void) {
    static ggml_guid guid = { 0x70, 0x6f, 0x77, 0x65, 0x72, 0x69, 0x6e, 0x66, 0x65, 0x72, 0x2d, 0x66, 0x66, 0x6e, 0x00, 0x01 };
    return &guid;
}

static void pi_backend_set_n_threads(ggml_backend_t backend, int n_threads) {
    if (backend == nullptr || !ggml_guid_matches(backend->guid, pi_backend_guid())) {
        return;
    }
    pi_compute_set_n_threads((pi_compute_context *) backend->context, n_threads);
}

//
// Device
//

static const char * pi_device_get_name(ggml_backend_dev_t dev) {
    return "PowerInfer";
    GGML_UNUSED(dev);
}

static const char * pi_device_get_description(ggml_backend_dev_t dev) {
    return "PowerInfer FFN executor (CPU)";
    GGML_UNUSED(dev);
}

static void pi_device_get_memory(ggml_backend_dev_t dev, size_t * free, size_t * total) {
    // the device has no memory of its own: it uses host memory
    *free  = 0;
    *total = 0;
    GGML_UNUSED(dev);
}

static enum ggml_backend_dev_type pi_device_get_type(ggml_backend_dev_t dev) {
    return GGML_BACKEND_DEVICE_TYPE_ACCEL;
    GGML_UNUSED(dev);
}

static void pi_device_get_props(ggml_backend_dev_t dev, struct ggml_backend_dev_props * props) {
    props->name        = pi_device_get_name(dev);
    props->description = pi_device_get_description(dev);
    props->type        = pi_device_get_type(dev);
    pi_device_get_memory(dev, &props->memory_free, &props->memory_total);
    props->caps = {
        /* .async                = */ false,
        /* .host_buffer          = */ false,
        /* .buffer_from_host_ptr = */ false,
        /* .events               = */ false,
        /* .mmap_support         = */ false,
    };
}

static ggml_backend_t pi_device_init_backend(ggml_backend_dev_t dev, const char * params) {
    pi_compute_context * ctx = pi_compute_context_new();
    ggml_backend_t backend = new ggml_backend {
        /* .guid    = */ pi_backend_guid(),
        /* .iface   = */ pi_backend_i,
        /* .device  = */ dev,
        /* .context = */ ctx,
    };
    // llama.cpp sets the real count through ggml_backend_set_n_threads before computing
    pi_backend_set_n_threads(backend, (int) std::max(1u, std::thread::hardware_concurrency()));
    return backend;
    GGML_UNUSED(params);
}

static ggml_backend_buffer_type_t pi_device_get_buffer_type(ggml_backend_dev_t dev) {
    // activations live in ordinary host memory; returning the CPU type also keeps llama.cpp from
    // offering our buffer types for weights that were not routed to us
    return ggml_backend_cpu_buffer_type();
    GGML_UNUSED(dev);
}

static bool is_our_weight(const struct ggml_tensor * t) {
    return t != nullptr && pi_slot_of_tensor(t) != nullptr;
}

static bool is_our_matmul(const struct ggml_tensor * t) {
    return t != nullptr && t->op == GGML_OP_MUL_MAT && is_our_weight(t->src[0]);
}

static bool pi_device_supports_op(ggml_backend_dev_t dev, const struct ggml_tensor * op) {
    const struct ggml_tensor * src0 = op->src[0];
    const struct ggml_tensor * src1 = op->src[1];

    switch (op->op) {
        case GGML_OP_NONE:
            return is_our_weight(op);

        case GGML_OP_MUL_MAT:
            return is_our_weight(src0) &&
                   op->op_params[1] != GGML_HINT_SRC0_IS_HADAMARD &&
                   pi_matmul_supports_type(src0->type) &&
                   ggml_is_contiguous(src0) && src0->ne[2] == 1 && src0->ne[3] == 1 &&
                   src1->type == GGML_TYPE_F32 && src1->nb[0] == sizeof(float) &&
                   src1->ne[2] == 1 && src1->ne[3] == 1 &&
                   op->type == GGML_TYPE_F32;

        case GGML_OP_GLU:
            // the activation joining gate and up (split form), or of a fused gate_up matmul
            return op->type == GGML_TYPE_F32 && is_our_matmul(src0) &&
                   (src1 == nullptr || is_our_matmul(src1));

        default:
            return false;
    }
    GGML_UNUSED(dev);
}

static bool pi_device_supports_buft(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft) {
    return pi_buft_is_ours(buft) || ggml_backend_buft_is_host(buft);
    GGML_UNUSED(dev);
}

static const struct ggml_backend_device_i pi_device_i = {
    /* .get_name             = */ pi_device_get_name,
    /* .get_description      = */ pi_device_get_description,
    /* .get_memory           = */ pi_device_get_memory,
    /* .get_type             = */ pi_device_get_type,
    /* .get_props            = */ pi_device_get_props,
    /* .init_backend         = */ pi_device_init_backend,
    /* .get_buffer_type      = */ pi_device_get_buffer_type,
    /* .get_host_buffer_type = */ NULL,
    /* .buffer_from_host_ptr = */ NULL,
    /* .supports_op          = */ pi_device_supports_op,
    /* .supports_buft        = */ pi_device_supports_buft,
    /* .offload_op           = */ NULL,
    /* .event_new            = */ NULL,
    /* .event_free           = */ NULL,
    /* .event_synchronize    = */ NULL,
};

//
// Registry
//

static const char * pi_reg_get_name(ggml_backend_reg_t reg) {
    return "PowerInfer";
    GGML_UNUSED(reg);
}

static size_t pi_reg_get_device_count(ggml_backend_reg_t reg) {
    return 1;
    GGML_UNUSED(reg);
}

static ggml_backend_dev_t pi_reg_get_device(ggml_backend_reg_t reg, size_t index) {
    GGML_ASSERT(index == 0);
    return pi_device();
    GGML_UNUSED(reg);
}

static void * pi_reg_get_proc_address(ggml_backend_reg_t reg, const char * name) {
    if (std::strcmp(name, "ggml_backend_set_n_threads") == 0) {
        return (void *) pi_backend_set_n_threads;
    }
    return NULL;
    GGML_UNUSED(reg);
}

static const struct ggml_backend_reg_i pi_reg_i = {
    /* .get_name         = */ pi_reg_get_name,
    /* .get_device_count = */ pi_reg_get_device_count,
    /* .get_device       = */ pi_reg_get_device,
    /* .get_proc_address = */ pi_reg_get_proc_address,
};

static struct ggml_backend_reg pi_reg = {
    /* .api_version = */ GGML_BACKEND_API_VERSION,
    /* .iface       = */ pi_reg_i,
    /* .context     = */ NULL,
};

ggml_backend_dev_t pi_device(void) {
    static struct ggml_backend_device device = {
        /* .iface   = */ pi_device_i,
        /* .reg     = */ &pi_reg,
        /* .context = */ nullptr,
    };
    return &device;
}

ggml_backend_reg_t ggml_backend_powerinfer_reg(void) {
    static std::once_flag once;
    std::call_once(once, [] {
        ggml_cpu_init();
        ggml_backend_register(&pi_reg);
    });
    return &pi_reg;
}

