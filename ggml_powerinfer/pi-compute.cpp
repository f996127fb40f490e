#include "pi-compute.h"

#include "pi-batch-repack.h"
#include "pi-down-batch.h"
#include "pi-ffn-dense.h"
#include "pi-ffn-sparse.h"
#include "pi-log.h"
#include "pi-matmul.h"
#include "pi-slot.h"
#include "pi-threadpool.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

// Dense FFN in RAM is what stock llama.cpp computes, so it runs ggml's CPU kernels on the
// weights as stock stores them (repacked where stock repacks), the whole split as one graph.
// Disk slots read each weight into scratch: batches of this many tokens or more still go to
// ggml's kernels (llamafile sgemm, tiled K-quants), single tokens to the backend's own.
static const int64_t PI_MIN_BATCH_FOR_CPU_KERNELS = 2;

struct pi_compute_context {
    int               n_threads = 1;
    pi_threadpool *   pool      = nullptr;
    std::vector<char> act_scratch;  // activations converted to the weights' vec_dot_type
    pi_aligned_buf    weight_buf;   // disk-resident weights of the current op
    pi_batch_repack * repack = nullptr; // plain RAM weights repacked for a batch
    std::vector<char> cpu_work;     // work buffer for ops run through ggml's CPU kernels
    std::vector<char> graph_mem;    // memory of the graphs handed to the CPU kernels
    std::vector<struct ggml_tensor> node_copies; // matmul nodes re-pointed at host weights
    std::vector<struct ggml_tensor *> cpu_nodes; // the run of nodes for the CPU kernels
    struct ggml_threadpool * cpu_pool = nullptr; // ggml's bookkeeping for those runs
    std::vector<char> custom_mem;   // custom-op nodes (bundled layers) of the current split
    struct ggml_context * custom_ctx = nullptr;
    // single tokens of sparse layers: their state, the down node each replaces, the nodes they skip
    std::vector<std::unique_ptr<pi_sparse_layer>> sparse_layers;
    int                                            n_sparse = 0;
    std::unordered_map<const struct ggml_tensor *, pi_sparse_layer *> sparse_by_down;
    std::unordered_set<const struct ggml_tensor *> sparse_skipped;
    // dense down projections of bundled layers in the current split
    std::vector<std::unique_ptr<pi_down_batch>> down_batches;
    int                                          n_down = 0;
};

static uint64_t now_ns() {
    return (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

pi_compute_context * pi_compute_context_new(void) {
    pi_compute_context * ctx = new pi_compute_context;
    ctx->repack = pi_batch_repack_new();
    // llama.cpp sets the real count through ggml_backend_set_n_threads before computing
    pi_compute_set_n_threads(ctx, (int) std::max(1u, std::thread::hardware_concurrency()));
    return ctx;
}

void pi_compute_context_free(pi_compute_context * ctx) {
    pi_threadpool_free(ctx->pool);
    if (ctx->cpu_pool != nullptr) {
        ggml_threadpool_free(ctx->cpu_pool);
    }
    pi_aligned_buf_free(&ctx->weight_buf);
    pi_batch_repack_free(ctx->repack);
    delete ctx;
}

void pi_compute_set_n_threads(pi_compute_context * ctx, int n_threads) {
    n_threads = n_threads < 1 ? 1 : n_threads;
    if (ctx->pool != nullptr && ctx->n_threads == n_threads) {
        return;
    }
    pi_threadpool_free(ctx->pool);
    ctx->pool      = pi_threadpool_new(n_threads);
    ctx->n_threads = n_threads;
    if (ctx->cpu_pool != nullptr) {
        ggml_threadpool_free(ctx->cpu_pool);
    }
    struct ggml_threadpool_params params = ggml_threadpool_params_default(n_threads);
    ctx->cpu_pool = ggml_threadpool_new(&params);
}

// Runs nodes with ggml's CPU kernels, as one graph: one fork/join of the workers per run
// instead of one per op, like the CPU backend itself.
static enum ggml_status compute_with_cpu_kernels(pi_compute_context * ctx, struct ggml_tensor ** nodes, int n_nodes, int n_threads) {
    if (n_nodes == 0) {
        return GGML_STATUS_SUCCESS;
    }
    const size_t graph_size = ggml_graph_overhead_custom(n_nodes, false) + ggml_tensor_overhead();
    if (ctx->graph_mem.size() < graph_size) {
        ctx->graph_mem.resize(graph_size);
    }
    struct ggml_init_params params = { graph_size, ctx->graph_mem.data(), /*.no_alloc =*/ true };
    struct ggml_context * gctx = ggml_init(params);
    struct ggml_cgraph * graph = ggml_new_graph_custom(gctx, n_nodes, false);
    for (int i = 0; i < n_nodes; i++) {
        ggml_graph_add_node(graph, nodes[i]);
    }
    struct ggml_cplan plan = ggml_graph_plan(graph, n_threads, n_threads == ctx->n_threads ? ctx->cpu_pool : nullptr);
    if (plan.work_size > 0) {
        if (ctx->cpu_work.size() < plan.work_size) {
            ctx->cpu_work.resize(plan.work_size);
        }
        plan.work_data = (uint8_t *) ctx->cpu_work.data();
    }
    enum ggml_status status = ggml_graph_compute(graph, &plan);
    ggml_free(gctx);
    return status;
}

static enum ggml_status flush_cpu_nodes(pi_compute_context * ctx) {
    enum ggml_status status = compute_with_cpu_kernels(ctx, ctx->cpu_nodes.data(), (int) ctx->cpu_nodes.size(), ctx->n_threads);
    ctx->cpu_nodes.clear();
    return status;
}

// The weight of an op as a host tensor the kernels can read. RAM slots keep one, possibly
// repacked by ggml's CPU backend; for disk slots the bytes are read into scratch and `tmp`
// describes them.
static const struct ggml_tensor * host_weight(pi_compute_context * ctx, pi_model_slot * slot,
                                              const struct ggml_tensor * w, struct ggml_tensor * tmp) {
    if (slot->residency == PI_RESIDENCY_RAM) {
        return pi_ram_host_tensor(w);
    }
    const pi_tensor_loc * loc = pi_disk_tensor_loc(w);
    const size_t size = ggml_nbytes(w);
    const uint64_t t0 = now_ns();
    std::string err;
    const void * data = pi_file_read(&slot->file, loc->offset, size, &ctx->weight_buf, &err);
    if (data == nullptr) {
        pi_log_error("reading %s failed: %s\n", w->name, err.c_str());
        return nullptr;
    }
    slot->counters.ffn_read_ns    += now_ns() - t0;
    slot->counters.ffn_bytes_read += size;
    *tmp = *w;
    tmp->data   = (void *) data;
    tmp->buffer = nullptr;
    tmp->extra  = nullptr;
    return tmp;
}

// Multiplies with the backend's kernels, or, when ggml's CPU kernels should do it, appends a
// copy of the node pointing at the host weight to ctx->cpu_nodes (the caller runs those).
static enum ggml_status compute_mul_mat(pi_compute_context * ctx, struct ggml_tensor * dst) {
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * x = dst->src[1];
    pi_model_slot * slot = pi_slot_of_tensor(w);

    struct ggml_tensor tmp;
    const struct ggml_tensor * host = host_weight(ctx, slot, w, &tmp);
    if (host == nullptr) {
        return GGML_STATUS_FAILED;
    }
    slot->counters.ffn_matmuls++;
    slot->counters.ffn_rows_computed += (uint64_t) (w->ne[1]*x->ne[1]);

    int which = -1;
    if (slot->residency == PI_RESIDENCY_RAM && pi_bundle_layer_of(w, &which) != nullptr &&
        pi_batch_repack_worth_it(host, x->ne[1])) {
        // only a PowerInfer model's gate/up: other plain weights are plain because the user
        // turned repacking off (use_extra_bufts=False), and must multiply as stock's plain kernels
        // the scratch is shared: the matmuls queued before must have read it already
        enum ggml_status status = flush_cpu_nodes(ctx);
        if (status != GGML_STATUS_SUCCESS) {
            return status;
        }
        const struct ggml_tensor * repacked = pi_batch_repack_weight(ctx->repack, host);
        if (repacked != nullptr) {
            host = repacked;
            slot->counters.batch_repacks++;
        }
    }
    if (slot->residency == PI_RESIDENCY_RAM || x->ne[1] >= PI_MIN_BATCH_FOR_CPU_KERNELS) {
        struct ggml_tensor * op = &ctx->node_copies[ctx->cpu_nodes.size()];
        *op = *dst;
        op->src[0] = (struct ggml_tensor *) host;
        ctx->cpu_nodes.push_back(op);
        if (host == &tmp) {
            // the bytes sit in the scratch buffer the next read reuses: run now
            return flush_cpu_nodes(ctx);
        }
        return GGML_STATUS_SUCCESS;
    }

    enum ggml_status status = flush_cpu_nodes(ctx); // keep the order of the graph
    if (status != GGML_STATUS_SUCCESS) {
        return status;
    }
    pi_matmul_args args;
    args.w          = (const char *) host->data;
    args.w_stride   = host->nb[1];
    args.w_type     = host->type;
    args.n_in       = host->ne[0];
    args.n_out      = host->ne[1];
    args.x          = (const float *) x->data;
    args.x_stride   = x->nb[1];
    args.n_cols     = x->ne[1];
    args.dst        = (float *) dst->data;
    args.dst_stride = dst->nb[1];
    pi_matmul(ctx->pool, args, ctx->act_scratch);
    return GGML_STATUS_SUCCESS;
}

// A custom op standing in for `node`, writing node's output, with the given sources.
static struct ggml_tensor * custom_node(pi_compute_context * ctx, const struct ggml_tensor * node, ggml_custom_op_t fun,
                                        struct ggml_tensor * a, struct ggml_tensor * b, void * userdata) {
    struct ggml_tensor * args[2] = { a, b };
    struct ggml_tensor * op = ggml_custom_4d(ctx->custom_ctx, GGML_TYPE_F32, node->ne[0], node->ne[1], node->ne[2], node->ne[3],
                                             args, 2, fun, GGML_N_TASKS_MAX, userdata);
    op->data   = node->data;
    op->flags |= GGML_TENSOR_FLAG_COMPUTE; // ggml's CPU backend skips nodes without it
    for (int k = 0; k < GGML_MAX_DIMS; k++) {
        op->nb[k] = node->nb[k];
    }
    return op;
}

// Bundled (PowerInfer) layers in RAM: gate and up are plain hot-first matrices for ggml's
// kernels; down is held as down_t and the activation may be one llama.cpp's graph lacks.
// Returns false when the node is not such a special case.
static bool add_bundled_node(pi_compute_context * ctx, struct ggml_tensor * node) {
    int which = -1;
    if (node->op == GGML_OP_MUL_MAT) {
        const pi_bundle_layer * L = pi_bundle_layer_of(node->src[0], &which);
        if (L == nullptr || which != 2) {
            return false;
        }
        pi_model_slot * slot = pi_slot_of_tensor(node->src[0]);
        slot->counters.ffn_matmuls++;
        slot->counters.ffn_rows_computed += (uint64_t) (L->n_ff*node->src[1]->ne[1]);
        if (ctx->n_down == (int) ctx->down_batches.size()) {
            ctx->down_batches.emplace_back(new pi_down_batch);
        }
        pi_down_batch * b = ctx->down_batches[ctx->n_down++].get();
        struct ggml_tensor * down_t = pi_ram_host_tensor(node->src[0]);
        const bool dense_act = L->activation == PI_ACT_GRAPH || pi_activation_is_thresholded(L->activation);
        pi_down_batch_prepare(b, node->src[1], down_t, pi_ram_row_scale_max(node->src[0]), dense_act);
        if (b->transposed) { // the transpose op writes only b->w; ggml's matmul writes the output
            slot->counters.down_transposes++;
            ctx->cpu_nodes.push_back(custom_node(ctx, node, pi_down_transpose_op, node->src[1], down_t, b));
            struct ggml_tensor * op = &ctx->node_copies[ctx->cpu_nodes.size()];
            *op = *node;
            op->src[0] = &b->w;
            ctx->cpu_nodes.push_back(op);
            return true;
        }
        // the pack op writes only the batch's scratch; the gemm op writes the output
        if (pi_down_batch_needs_pack(b)) {
            ctx->cpu_nodes.push_back(custom_node(ctx, node, pi_down_pack_op, node->src[1], down_t, b));
        }
        ctx->cpu_nodes.push_back(custom_node(ctx, node, pi_down_gemm_op, node->src[1], down_t, b));
        return true;
    }
    if (node->op == GGML_OP_GLU && node->src[1] != nullptr && node->src[0]->op == GGML_OP_MUL_MAT &&
        node->src[1]->op == GGML_OP_MUL_MAT) {
        int w0 = -1, w1 = -1;
        const pi_bundle_layer * L = pi_bundle_layer_of(node->src[0]->src[0], &w0);
        if (L == nullptr || pi_bundle_layer_of(node->src[1]->src[0], &w1) != L) {
            return false;
        }
        // thresholded SiLU/GELU layers are the source model in dense mode: the graph's GLU
        const bool sparse = pi_slot_of_tensor(node->src[0]->src[0])->sparse_mode.load() != PI_SPARSE_OFF;
        if (L->activation == PI_ACT_GRAPH || (pi_activation_is_thresholded(L->activation) && !sparse)) {
            return false;
        }
        struct ggml_tensor * gate = w0 == 0 ? node->src[0] : node->src[1];
        struct ggml_tensor * up   = w0 == 0 ? node->src[1] : node->src[0];
        ctx->cpu_nodes.push_back(custom_node(ctx, node, pi_activation_op, gate, up, (void *) L));
        return true;
    }
    return false;
}

// The gate or up matmul feeding a GLU, by which weight it multiplies.
static struct ggml_tensor * glu_operand(struct ggml_tensor * glu, int which) {
    for (int k = 0; k < 2; k++) {
        int w = -1;
        struct ggml_tensor * mm = glu->src[k];
        if (mm != nullptr && mm->op == GGML_OP_MUL_MAT && pi_bundle_layer_of(mm->src[0], &w) != nullptr && w == which) {
            return mm;
        }
    }
    return nullptr;
}

// Finds the layers of this graph that run sparse: a single token, the slot in a sparse mode,
// and the whole FFN (gate and up matmuls, GLU, down matmul) in the graph. Their down node is
// replaced by the sparse ops and the other three are not computed.
static void plan_sparse_layers(pi_compute_context * ctx, struct ggml_cgraph * cgraph) {
    ctx->n_sparse = 0;
    ctx->sparse_by_down.clear();
    ctx->sparse_skipped.clear();
    for (int i = 0; i < ggml_graph_n_nodes(cgraph); i++) {
        struct ggml_tensor * down = ggml_graph_node(cgraph, i);
        int which = -1;
        const pi_bundle_layer * L = down->op == GGML_OP_MUL_MAT ? pi_bundle_layer_of(down->src[0], &which) : nullptr;
        if (L == nullptr || which != 2 || ggml_nrows(down->src[1]) != 1) {
            continue;
        }
        pi_model_slot * slot = pi_slot_of_tensor(down->src[0]);
        const int mode = slot->sparse_mode.load();
        struct ggml_tensor * glu = down->src[1];
        if (mode == PI_SPARSE_OFF || glu->op != GGML_OP_GLU) {
            continue;
        }
        struct ggml_tensor * gate = glu_operand(glu, 0);
        struct ggml_tensor * up   = glu_operand(glu, 1);
        if (gate == nullptr || up == nullptr || gate->src[1] != up->src[1] || ggml_nrows(gate->src[1]) != 1 ||
            gate->src[1]->type != GGML_TYPE_F32 || !ggml_is_contiguous(gate->src[1]) ||
            pi_bundle_layer_of(gate->src[0], &which) != L || pi_bundle_layer_of(up->src[0], &which) != L) {
            continue;
        }
        const struct ggml_tensor * gate_w = pi_ram_host_tensor(gate->src[0]);
        const struct ggml_tensor * up_w   = pi_ram_host_tensor(up->src[0]);
        const struct ggml_tensor * down_t = pi_ram_host_tensor(down->src[0]);
        if (!pi_sparse_supported(L, gate_w, up_w, down_t)) {
            continue;
        }
        if (ctx->n_sparse == (int) ctx->sparse_layers.size()) {
            ctx->sparse_layers.emplace_back(new pi_sparse_layer);
        }
        pi_sparse_layer * s = ctx->sparse_layers[ctx->n_sparse++].get();
        s->slot   = slot;
        s->L      = L;
        // a predictor that would cost more than it saves is not used: every gate row instead
        const pi_predictor_ram * held = pi_slot_predictor(slot, L);
        const bool use_predictor = mode == PI_SPARSE_PREDICTOR ||
                                   (mode == PI_SPARSE_PREDICTED && held != nullptr && pi_predictor_worth_it(L, held->linear));
        s->pred   = use_predictor ? held : nullptr;
        s->gate_out = s->pred == nullptr ? gate : nullptr; // every gate row: the graph's matmul
        s->x      = gate->src[1];
        s->gate   = gate_w;
        s->up     = up_w;
        s->down_t = down_t;
        s->down_scale_max = pi_ram_row_scale_max(down->src[0]);
        pi_sparse_layer_prepare(s, ctx->n_threads);
        ctx->sparse_by_down[down] = s;
        if (s->gate_out == nullptr) {
            ctx->sparse_skipped.insert(gate);
        }
        ctx->sparse_skipped.insert(up);
        ctx->sparse_skipped.insert(glu);
    }
}

// Replaces a sparse layer's down node by the three sparse ops.
static void add_sparse_nodes(pi_compute_context * ctx, struct ggml_tensor * down, pi_sparse_layer * s) {
    // ops 1 and 2 only fill the layer's scratch: one-element placeholders as their outputs
    struct ggml_tensor * args[1] = { (struct ggml_tensor *) s->x };
    static float sink[2];
    struct ggml_tensor * prep = ggml_custom_4d(ctx->custom_ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 1,
                                               pi_sparse_prepare_op, GGML_N_TASKS_MAX, s);
    prep->data   = &sink[0];
    prep->flags |= GGML_TENSOR_FLAG_COMPUTE;
    args[0] = prep;
    struct ggml_tensor * neurons = ggml_custom_4d(ctx->custom_ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 1,
                                                  pi_sparse_neurons_op, GGML_N_TASKS_MAX, s);
    neurons->data   = &sink[1];
    neurons->flags |= GGML_TENSOR_FLAG_COMPUTE;
    ctx->cpu_nodes.push_back(prep);
    ctx->cpu_nodes.push_back(neurons);
    ctx->cpu_nodes.push_back(custom_node(ctx, down, pi_sparse_down_op, neurons, nullptr, s));
}

enum ggml_status pi_compute_graph(pi_compute_context * ctx, struct ggml_cgraph * cgraph) {
    const uint64_t t0 = now_ns();
    pi_model_slot * slot = nullptr;
    int64_t n_tokens = 0;
    const int n_nodes = ggml_graph_n_nodes(cgraph);
    ctx->cpu_nodes.clear();
    if ((int) ctx->node_copies.size() < 2 * n_nodes + 8) { // indexed by cpu_nodes' length, which
        // a bundled down node can grow by two
        ctx->node_copies.resize(2 * n_nodes + 8); // no reallocation below: cpu_nodes points into it
    }
    // a node may become up to three custom ops (a sparse layer's down): room for all of them
    const size_t custom_size = (size_t) (3 * n_nodes + 8) * ggml_tensor_overhead();
    if (ctx->custom_mem.size() < custom_size) {
        ctx->custom_mem.resize(custom_size);
    }
    struct ggml_init_params custom_params = { custom_size, ctx->custom_mem.data(), /*.no_alloc =*/ true };
    ctx->custom_ctx = ggml_init(custom_params);
    struct custom_ctx_guard {
        pi_compute_context * c;
        ~custom_ctx_guard() { ggml_free(c->custom_ctx); c->custom_ctx = nullptr; }
    } guard{ctx};
    plan_sparse_layers(ctx, cgraph);
    ctx->n_down = 0;

    for (int i = 0; i < n_nodes; i++) {
        struct ggml_tensor * node = ggml_graph_node(cgraph, i);
        if ((node->flags & GGML_TENSOR_FLAG_COMPUTE) == 0 || ctx->sparse_skipped.count(node) != 0) {
            continue;
        }
        enum ggml_status status = GGML_STATUS_SUCCESS;
        switch (node->op) {
            case GGML_OP_NONE:
            case GGML_OP_RESHAPE:
            case GGML_OP_VIEW:
            case GGML_OP_PERMUTE:
            case GGML_OP_TRANSPOSE:
                break;
            case GGML_OP_MUL_MAT:
                slot     = pi_slot_of_tensor(node->src[0]);
                n_tokens = node->src[1]->ne[1];
                if (ctx->sparse_by_down.count(node) != 0) {
                    add_sparse_nodes(ctx, node, ctx->sparse_by_down[node]);
                } else if (!add_bundled_node(ctx, node)) {
                    status = compute_mul_mat(ctx, node);
                }
                break;
            default:
                // the activation, through ggml's kernels so it rounds exactly like stock
                if (!add_bundled_node(ctx, node)) {
                    ctx->cpu_nodes.push_back(node);
                }
                break;
        }
        if (status != GGML_STATUS_SUCCESS) {
            ctx->cpu_nodes.clear();
            return status;
        }
    }
    enum ggml_status status = flush_cpu_nodes(ctx);
    if (status != GGML_STATUS_SUCCESS) {
        return status;
    }
    for (int k = 0; k < ctx->n_sparse; k++) {
        const pi_sparse_layer * s = ctx->sparse_layers[k].get();
        pi_model_slot * owner = s->slot;
        const uint64_t predicted = s->n_predicted.load(), active = s->n_active.load();
        owner->counters.sparse_layer_tokens++;
        owner->counters.neurons_total     += (uint64_t) s->L->n_ff;
        owner->counters.neurons_predicted += predicted;
        owner->counters.neurons_active    += active;
        owner->counters.ffn_matmuls       += 3;
        owner->counters.ffn_rows_computed += predicted + 2 * active; // gate rows; up and down_t rows
    }

    if (slot != nullptr) {
        slot->counters.ffn_graphs++;
        slot->counters.ffn_tokens += (uint64_t) n_tokens;
        slot->counters.ffn_ns     += now_ns() - t0;
    }
    return GGML_STATUS_SUCCESS;
}
