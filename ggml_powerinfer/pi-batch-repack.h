// Prompt batches of PowerInfer models in RAM. Their gate and up matrices are stored plain,
// because sparse decode reads single neuron rows and interleaved (repacked) blocks would mix
// eight neurons per block. For a batch of tokens ggml multiplies plain rows slower than the
// interleaved blocks stock llama.cpp repacks the same weights into, so each gate/up matrix is
// repacked into one scratch weight just before its matmul: the repack reads the matrix once,
// the matmul reads it once per column block, and the scratch is reused by every layer.
#pragma once

#include "ggml.h"

struct pi_batch_repack;

pi_batch_repack * pi_batch_repack_new(void);
void              pi_batch_repack_free(pi_batch_repack * r);

// Whether a batch of n_tokens should multiply by w repacked (enough tokens, a plain host weight).
bool pi_batch_repack_worth_it(const struct ggml_tensor * w, int64_t n_tokens);

// `w` (a plain host weight) repacked into the scratch, valid until the next call, or nullptr
// when ggml has no repacked kernel for it. Single-threaded: ggml repacks a weight in one call.
const struct ggml_tensor * pi_batch_repack_weight(pi_batch_repack * r, const struct ggml_tensor * w);
