#include "pi-matmul.h"

#include "pi-dot.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <atomic>

// Rows per work item: small enough to balance two to eight threads on a 4096-row matrix,
// large enough that the atomic counter is not contended.
static const int64_t PI_ROWS_PER_CHUNK = 16;
// Tokens per block: the converted activations of a block stay in L1/L2 while a chunk of rows
// streams past them.
static const int64_t PI_COLS_PER_BLOCK = 16;

bool pi_matmul_supports_type(enum ggml_type type) {
    const struct ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(type);
    if (traits == nullptr || traits->vec_dot == nullptr) {
        return false;
    }
    const struct ggml_type_traits_cpu * dot_traits = ggml_get_type_traits_cpu(traits->vec_dot_type);
    return traits->vec_dot_type == GGML_TYPE_F32 || (dot_traits != nullptr && dot_traits->from_float != nullptr);
}

struct pi_matmul_job {
    const pi_matmul_args * args;
    const char *           xq;        // converted activations
    size_t                 xq_stride;
    ggml_vec_dot_t         vec_dot;
    pi_dot_rows_fn         dot_rows;  // several rows at once, or nullptr
    ggml_from_float_t      from_float; // nullptr when x is used as is
    std::atomic<int64_t>   next_chunk{0};
    std::atomic<int>       converted{0};
};

static void matmul_task(int ith, int nth, void * user_data) {
    pi_matmul_job * job = (pi_matmul_job *) user_data;
    const pi_matmul_args & a = *job->args;

    if (job->from_float != nullptr) {
        // convert the activations: one token row per thread in turn
        for (int64_t c = ith; c < a.n_cols; c += nth) {
            job->from_float((const float *) ((const char *) a.x + c*a.x_stride),
                            (char *) job->xq + c*job->xq_stride, a.n_in);
        }
        job->converted.fetch_add(1, std::memory_order_acq_rel);
        while (job->converted.load(std::memory_order_acquire) < nth) {
            // all rows must be converted before anyone reads them
        }
    }

    const int64_t n_chunks = (a.n_out + PI_ROWS_PER_CHUNK - 1) / PI_ROWS_PER_CHUNK;
    for (;;) {
        const int64_t chunk = job->next_chunk.fetch_add(1, std::memory_order_relaxed);
        if (chunk >= n_chunks) {
            break;
        }
        const int64_t r0 = chunk*PI_ROWS_PER_CHUNK;
        const int64_t r1 = std::min(r0 + PI_ROWS_PER_CHUNK, a.n_out);
        for (int64_t c0 = 0; c0 < a.n_cols; c0 += PI_COLS_PER_BLOCK) {
            const int64_t c1 = std::min(c0 + PI_COLS_PER_BLOCK, a.n_cols);
            int64_t r = r0;
            for (; job->dot_rows != nullptr && r + PI_DOT_ROWS <= r1; r += PI_DOT_ROWS) {
                const char * w_rows[PI_DOT_ROWS];
                for (int k = 0; k < PI_DOT_ROWS; k++) {
                    w_rows[k] = a.w + (r + k)*a.w_stride;
                }
                for (int64_t c = c0; c < c1; c++) {
                    float sums[PI_DOT_ROWS];
                    job->dot_rows((int) a.n_in, PI_DOT_ROWS, sums, w_rows, 0, nullptr, job->xq + c*job->xq_stride);
                    float * out = (float *) ((char *) a.dst + c*a.dst_stride) + r;
                    for (int k = 0; k < PI_DOT_ROWS; k++) {
                        out[k] = sums[k];
                    }
                }
            }
            for (; r < r1; r++) {
                const char * w_row = a.w + r*a.w_stride;
                for (int64_t c = c0; c < c1; c++) {
                    float * out = (float *) ((char *) a.dst + c*a.dst_stride) + r;
                    job->vec_dot((int) a.n_in, out, 0, w_row, 0, job->xq + c*job->xq_stride, 0, 1);
                }
            }
        }
    }
}

void pi_matmul(pi_threadpool * pool, const pi_matmul_args & args, std::vector<char> & scratch) {
    const struct ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(args.w_type);
    const enum ggml_type dot_type = traits->vec_dot_type;

    pi_matmul_job job;
    job.args    = &args;
    job.vec_dot  = traits->vec_dot;
    job.dot_rows = pi_dot_rows_kernel(args.w_type);
    if (dot_type == GGML_TYPE_F32) {
        job.xq         = (const char *) args.x;
        job.xq_stride  = args.x_stride;
        job.from_float = nullptr;
    } else {
        job.xq_stride = ggml_row_size(dot_type, args.n_in);
        if (scratch.size() < job.xq_stride*args.n_cols) {
            scratch.resize(job.xq_stride*args.n_cols);
        }
        job.xq         = scratch.data();
        job.from_float = ggml_get_type_traits_cpu(dot_type)->from_float;
    }
    pi_threadpool_run(pool, matmul_task, &job);
}
