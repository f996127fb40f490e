// Executes the FFN splits the scheduler hands to the backend.
#pragma once

#include "ggml-backend.h"

struct pi_compute_context;

pi_compute_context * pi_compute_context_new(void);
void                 pi_compute_context_free(pi_compute_context * ctx);
void                 pi_compute_set_n_threads(pi_compute_context * ctx, int n_threads);

enum ggml_status pi_compute_graph(pi_compute_context * ctx, struct ggml_cgraph * cgraph);
