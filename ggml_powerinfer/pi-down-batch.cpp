#include "pi-down-batch.h"

#include "pi-axpy.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PI_DOWN_AVX2 1
#endif

// Output columns per micro-tile (two AVX registers) and the panel of dequantized down_t rows a
// thread keeps in L2: chunk neurons x strip columns of f32, at most PANEL_BYTES.
static const int64_t MICRO_COLS  = 16;
static const int64_t STRIP_COLS  = 512;
// A token block in which at most this fraction of (token, neuron) activations are non-zero runs
// token by token (pi_down_t_rows, a down_t row read per firing pair) instead of as a panel GEMM
// (every token of the block times every neuron firing for any of them). Synthetic 7B Q4_0 at 10%
// active: pp512 12.4 t/s by rows, 10.8 by panels.
static const float ROWS_MAX_ACTIVE = 0.25f;
static const size_t  PANEL_BYTES = 192 * 1024;

static int64_t n_tokens(const pi_down_batch * b) {
    return b->act->ne[1];
}

// Columns of down_t dequantized together by the transpose op: whole blocks, at least 32.
static int64_t transpose_group(enum ggml_type type) {
    return std::max<int64_t>(ggml_blck_size(type), 32);
}

// F16 rows transpose exactly; quantized ones are re-quantized to Q8_0 (ggml's integer kernels).
static enum ggml_type transposed_type(enum ggml_type down_t_type) {
    return down_t_type == GGML_TYPE_F16 ? GGML_TYPE_F16 : GGML_TYPE_Q8_0;
}

void pi_down_batch_prepare(pi_down_batch * b, const struct ggml_tensor * act, const struct ggml_tensor * down_t,
                           const float * scale_max, bool dense_activation) {
    b->act       = act;
    b->down_t    = down_t;
    b->scale_max = scale_max;
    b->n_tb      = (act->ne[1] + PI_DOWN_TB - 1) / PI_DOWN_TB;
    const int64_t n_embd = down_t->ne[0];
    const int64_t n_ff   = down_t->ne[1];
    b->transposed = dense_activation && act->ne[1] >= PI_DOWN_TRANSPOSE_MIN && n_ff % ggml_blck_size(transposed_type(down_t->type)) == 0 &&
                    n_embd % transpose_group(down_t->type) == 0 && ggml_get_type_traits(down_t->type)->to_float != nullptr;
    if (b->transposed) {
        const enum ggml_type type = transposed_type(down_t->type);
        const size_t row = ggml_row_size(type, n_ff);
        b->w_data.resize(row * (size_t) n_embd);
        b->w = {};
        b->w.type  = type;
        b->w.ne[0] = n_ff;
        b->w.ne[1] = n_embd;
        b->w.ne[2] = b->w.ne[3] = 1;
        b->w.nb[0] = ggml_type_size(type);
        b->w.nb[1] = row;
        b->w.nb[2] = b->w.nb[3] = row * (size_t) n_embd;
        b->w.data  = b->w_data.data();
        return;
    }
    if (!pi_down_batch_needs_pack(b)) {
        return;
    }
    b->panels.resize((size_t) (b->n_tb * n_ff * PI_DOWN_TB));
    b->active.resize((size_t) (b->n_tb * n_ff));
    b->n_active.resize((size_t) b->n_tb);
    b->by_rows.resize((size_t) b->n_tb);
}

bool pi_down_batch_needs_pack(const pi_down_batch * b) {
    return n_tokens(b) >= 2 * PI_DOWN_TB;
}

static float act_at(const pi_down_batch * b, int64_t t, int64_t i) {
    return *(const float *) ((const char *) b->act->data + t*b->act->nb[1] + i*b->act->nb[0]);
}

void pi_down_transpose_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    pi_down_batch * b = (pi_down_batch *) userdata; // added to the graph only when transposed
    const struct ggml_tensor * down_t = b->down_t;
    const int64_t n_embd = down_t->ne[0];
    const int64_t n_ff   = down_t->ne[1];
    const int64_t G      = transpose_group(down_t->type);
    const size_t  g_off  = (size_t) (G / ggml_blck_size(down_t->type)) * ggml_type_size(down_t->type);
    const ggml_to_float_t to_float = ggml_get_type_traits(down_t->type)->to_float;
    const ggml_from_float_t from_float = ggml_get_type_traits_cpu(b->w.type)->from_float;
    // a group of G columns of every row, then each column gathered into a row of w
    static thread_local std::vector<float> panel, col;
    panel.resize((size_t) (n_ff * G));
    col.resize((size_t) n_ff);
    for (int64_t g = ith; g < n_embd / G; g += nth) {
        for (int64_t i = 0; i < n_ff; i++) {
            to_float((const char *) down_t->data + i*down_t->nb[1] + g*g_off, panel.data() + i*G, G);
        }
        for (int64_t k = 0; k < G; k++) {
            for (int64_t i = 0; i < n_ff; i++) {
                col[i] = panel[i*G + k];
            }
            from_float(col.data(), b->w_data.data() + (g*G + k) * b->w.nb[1], n_ff);
        }
    }
    (void) dst;
}

void pi_down_pack_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    pi_down_batch * b = (pi_down_batch *) userdata; // added to the graph only when it needs packing
    const int64_t n_ff = b->down_t->ne[1];
    const int64_t T = n_tokens(b);
    for (int64_t tb = ith; tb < b->n_tb; tb += nth) {
        float * panel = b->panels.data() + tb * n_ff * PI_DOWN_TB;
        int32_t * active = b->active.data() + tb * n_ff;
        int64_t n = 0;
        const int64_t t0 = tb * PI_DOWN_TB;
        const int64_t nt = t0 + PI_DOWN_TB <= T ? PI_DOWN_TB : T - t0;
        int64_t n_pairs = 0;
        for (int64_t k = 0; k < nt; k++) {
            for (int64_t i = 0; i < n_ff; i++) {
                n_pairs += act_at(b, t0 + k, i) != 0.0f;
            }
        }
        b->by_rows[tb] = (float) n_pairs <= ROWS_MAX_ACTIVE * (float) (nt * n_ff);
        if (b->by_rows[tb]) {
            b->n_active[tb] = 0;
            continue;
        }
        for (int64_t i = 0; i < n_ff; i++) {
            bool any = false;
            for (int64_t k = 0; k < PI_DOWN_TB; k++) {
                const float a = k < nt ? act_at(b, t0 + k, i) : 0.0f;
                panel[i*PI_DOWN_TB + k] = a;
                any |= a != 0.0f;
            }
            if (any) {
                active[n++] = (int32_t) i;
            }
        }
        b->n_active[tb] = n;
    }
    (void) dst;
}

// acc[k][c] = sum over the listed neurons of panel[i][k] * rows[i][c], for k < PI_DOWN_TB and
// c < MICRO_COLS; rows are `row_stride` floats apart. Added into y rows t0..t0+nt.
static void micro_kernel(const int32_t * list, int64_t n, const float * panel, const float * rows, int64_t row_stride,
                         int64_t i_base, float * y, size_t y_stride, int64_t nt) {
#ifdef PI_DOWN_AVX2
    __m256 acc[PI_DOWN_TB][2];
    for (int k = 0; k < PI_DOWN_TB; k++) {
        acc[k][0] = _mm256_setzero_ps();
        acc[k][1] = _mm256_setzero_ps();
    }
    for (int64_t j = 0; j < n; j++) {
        const int64_t i = list[j];
        const float * r = rows + (i - i_base) * row_stride;
        const __m256 r0 = _mm256_loadu_ps(r);
        const __m256 r1 = _mm256_loadu_ps(r + 8);
        const float * p = panel + i * PI_DOWN_TB;
        for (int k = 0; k < PI_DOWN_TB; k++) {
            const __m256 a = _mm256_broadcast_ss(p + k);
            acc[k][0] = _mm256_fmadd_ps(a, r0, acc[k][0]);
            acc[k][1] = _mm256_fmadd_ps(a, r1, acc[k][1]);
        }
    }
    for (int64_t k = 0; k < nt; k++) {
        float * out = (float *) ((char *) y + k * y_stride);
        _mm256_storeu_ps(out,     _mm256_add_ps(_mm256_loadu_ps(out),     acc[k][0]));
        _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_loadu_ps(out + 8), acc[k][1]));
    }
#else
    float acc[PI_DOWN_TB][MICRO_COLS] = {};
    for (int64_t j = 0; j < n; j++) {
        const int64_t i = list[j];
        const float * r = rows + (i - i_base) * row_stride;
        const float * p = panel + i * PI_DOWN_TB;
        for (int k = 0; k < PI_DOWN_TB; k++) {
            for (int c = 0; c < MICRO_COLS; c++) {
                acc[k][c] += p[k] * r[c];
            }
        }
    }
    for (int64_t k = 0; k < nt; k++) {
        float * out = (float *) ((char *) y + k * y_stride);
        for (int c = 0; c < MICRO_COLS; c++) {
            out[c] += acc[k][c];
        }
    }
#endif
}

void pi_down_t_rows(const struct ggml_tensor * down_t, const float * scale_max, const float * act, size_t act_stride,
                    float * y, int ith, int nth) {
    const int64_t blck = ggml_blck_size(down_t->type);
    const int64_t n_blocks = down_t->ne[0] / blck;
    const int64_t per = (n_blocks + nth - 1) / nth;
    const int64_t b0 = per * ith < n_blocks ? per * ith : n_blocks;
    const int64_t b1 = b0 + per < n_blocks ? b0 + per : n_blocks;
    if (b0 >= b1) {
        return;
    }
    const int64_t w = (b1 - b0) * blck;
    y += b0 * blck;
    memset(y, 0, sizeof(float) * w);
    const char * rows = (const char *) down_t->data + (size_t) b0 * ggml_type_size(down_t->type);
    // the firing neurons, listed without branches (which fired is close to a coin toss)
    static thread_local std::vector<int32_t> fired;
    fired.resize((size_t) down_t->ne[1]);
    int64_t n = 0;
    for (int64_t i = 0; i < down_t->ne[1]; i++) {
        fired[n] = (int32_t) i;
        n += *(const float *) ((const char *) act + i * act_stride) != 0.0f;
    }
    const pi_axpy_int_fn axpy_int = scale_max != nullptr ? pi_axpy_int_kernel(down_t->type) : nullptr;
    if (axpy_int != nullptr) { // all rows in one call: it sets one integer step for them
        static thread_local std::vector<const char *> seg;
        static thread_local std::vector<float> coef, smax;
        seg.resize((size_t) n);
        coef.resize((size_t) n);
        smax.resize((size_t) n);
        for (int64_t j = 0; j < n; j++) {
            seg[j]  = rows + (size_t) fired[j] * down_t->nb[1];
            coef[j] = *(const float *) ((const char *) act + fired[j] * act_stride);
            smax[j] = scale_max[fired[j]];
        }
        axpy_int(w, n, coef.data(), smax.data(), seg.data(), y);
        return;
    }
    // else their row segments added PI_AXPY_ROWS at a time, the next group prefetched
    const pi_axpy_fn axpy = pi_axpy_kernel(down_t->type);
    for (int64_t j = 0; j < n; j += PI_AXPY_ROWS) {
        const int n_rows = (int) (j + PI_AXPY_ROWS <= n ? PI_AXPY_ROWS : n - j);
        const int64_t k = j + n_rows;
        const int n_next = (int) (k + PI_AXPY_ROWS <= n ? PI_AXPY_ROWS : n - k);
        const char * seg[2 * PI_AXPY_ROWS];
        float coef[PI_AXPY_ROWS];
        for (int r = 0; r < n_rows + n_next; r++) {
            seg[r] = rows + (size_t) fired[j + r] * down_t->nb[1];
        }
        for (int r = 0; r < n_rows; r++) {
            coef[r] = *(const float *) ((const char *) act + fired[j + r] * act_stride);
        }
        axpy(w, n_rows, coef, seg, n_next, seg + n_rows, y);
    }
}

// Columns per strip: whole quant blocks and whole micro-tiles, wide enough that dequantizing
// a row's segment into the panel reads a few hundred contiguous bytes, and as many strips as a
// multiple of the thread count, of equal width (up to the last): n_embd 640 on two threads is
// two strips of 320, not 512 and 128.
static int64_t strip_width(int64_t n_embd, int64_t blck, int nth) {
    const int64_t unit = blck % MICRO_COLS == 0 ? blck : (MICRO_COLS % blck == 0 ? MICRO_COLS : blck * MICRO_COLS);
    const int64_t n_units = (n_embd + unit - 1) / unit;
    int64_t n_strips = (n_embd + STRIP_COLS - 1) / STRIP_COLS;
    n_strips = (n_strips + nth - 1) / nth * nth;
    if (n_strips > n_units) {
        n_strips = n_units;
    }
    return (n_units + n_strips - 1) / n_strips * unit;
}

void pi_down_gemm_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    pi_down_batch * b = (pi_down_batch *) userdata;
    const struct ggml_tensor * down_t = b->down_t;
    const int64_t n_embd = down_t->ne[0];
    const int64_t n_ff   = down_t->ne[1];
    const int64_t blck   = ggml_blck_size(down_t->type);
    const int64_t strip = strip_width(n_embd, blck, nth);
    const int64_t n_strips = (n_embd + strip - 1) / strip;
    if (!pi_down_batch_needs_pack(b)) { // small batches: firing rows added token by token
        for (int64_t t = 0; t < n_tokens(b); t++) {
            pi_down_t_rows(down_t, b->scale_max, (const float *) ((const char *) b->act->data + t*b->act->nb[1]), b->act->nb[0],
                           (float *) ((char *) dst->data + t*dst->nb[1]), ith, nth);
        }
        return;
    }
    const pi_axpy_fn axpy = pi_axpy_kernel(down_t->type);
    const int64_t T = n_tokens(b);
    const int64_t chunk = (int64_t) (PANEL_BYTES / (sizeof(float) * strip));
    static thread_local std::vector<float> panel;
    panel.resize((size_t) (chunk * strip));
    std::vector<int64_t> lo((size_t) b->n_tb), hi((size_t) b->n_tb);
    std::vector<char> used((size_t) chunk);

    for (int64_t t = 0; t < T; t++) { // sparse token blocks: each firing row added per token
        if (b->by_rows[t / PI_DOWN_TB]) {
            pi_down_t_rows(down_t, b->scale_max, (const float *) ((const char *) b->act->data + t*b->act->nb[1]), b->act->nb[0],
                           (float *) ((char *) dst->data + t*dst->nb[1]), ith, nth);
        }
    }
    bool any_panel = false;
    for (int64_t tb = 0; tb < b->n_tb; tb++) {
        any_panel |= !b->by_rows[tb];
    }
    for (int64_t s = ith; any_panel && s < n_strips; s += nth) {
        const int64_t c0 = s * strip;
        const int64_t w  = c0 + strip <= n_embd ? strip : n_embd - c0; // a multiple of the block size
        for (int64_t t = 0; t < T; t++) {
            if (!b->by_rows[t / PI_DOWN_TB]) {
                memset((char *) dst->data + t*dst->nb[1] + c0*sizeof(float), 0, sizeof(float) * w);
            }
        }
        const size_t off = (size_t) (c0 / blck) * ggml_type_size(down_t->type);
        for (int64_t tb = 0; tb < b->n_tb; tb++) {
            lo[tb] = hi[tb] = 0;
        }
        for (int64_t i0 = 0; i0 < n_ff; i0 += chunk) {
            const int64_t i1 = i0 + chunk <= n_ff ? i0 + chunk : n_ff;
            // dequantize the chunk's rows of this strip (neurons that never fire stay stale:
            // they are never read)
            for (int64_t tb = 0; tb < b->n_tb; tb++) {
                const int32_t * list = b->active.data() + tb * n_ff;
                lo[tb] = hi[tb];
                while (hi[tb] < b->n_active[tb] && list[hi[tb]] < i1) {
                    hi[tb]++;
                }
            }
            // only rows some token block needs
            std::fill(used.begin(), used.begin() + (i1 - i0), (char) 0);
            for (int64_t tb = 0; tb < b->n_tb; tb++) {
                const int32_t * list = b->active.data() + tb * n_ff;
                for (int64_t j = lo[tb]; j < hi[tb]; j++) {
                    used[(size_t) (list[j] - i0)] = 1;
                }
            }
            for (int64_t i = i0; i < i1; i++) {
                if (!used[(size_t) (i - i0)]) {
                    continue;
                }
                float * row = panel.data() + (i - i0) * strip;
                memset(row, 0, sizeof(float) * w);
                const float one = 1.0f;
                const char * src = (const char *) down_t->data + i*down_t->nb[1] + off;
                axpy(w, 1, &one, &src, 0, nullptr, row);
            }
            int64_t m = 0;
            for (; m + MICRO_COLS <= w; m += MICRO_COLS) {
                for (int64_t tb = 0; tb < b->n_tb; tb++) {
                    const int64_t t0 = tb * PI_DOWN_TB;
                    const int64_t nt = t0 + PI_DOWN_TB <= T ? PI_DOWN_TB : T - t0;
                    if (hi[tb] == lo[tb]) {
                        continue; // nothing fires in this chunk (or the block runs by rows)
                    }
                    micro_kernel(b->active.data() + tb * n_ff + lo[tb], hi[tb] - lo[tb],
                                 b->panels.data() + tb * n_ff * PI_DOWN_TB, panel.data() + m, strip, i0,
                                 (float *) ((char *) dst->data + t0*dst->nb[1]) + c0 + m, dst->nb[1], nt);
                }
            }
            for (; m < w; m++) { // F16/F32 rows whose width is not a multiple of the micro-tile
                for (int64_t tb = 0; tb < b->n_tb; tb++) {
                    const int32_t * list = b->active.data() + tb * n_ff;
                    const float * p = b->panels.data() + tb * n_ff * PI_DOWN_TB;
                    for (int64_t t = tb * PI_DOWN_TB; t < T && t < (tb + 1) * PI_DOWN_TB; t++) {
                        float * out = (float *) ((char *) dst->data + t*dst->nb[1]) + c0 + m;
                        for (int64_t j = lo[tb]; j < hi[tb]; j++) {
                            *out += p[list[j]*PI_DOWN_TB + (t - tb*PI_DOWN_TB)] * panel[(list[j] - i0)*strip + m];
                        }
                    }
                }
            }
        }
    }
}
