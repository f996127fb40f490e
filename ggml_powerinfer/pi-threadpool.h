// The backend's worker threads: an OpenMP team of n_threads.
//
// ggml's CPU backend in llama-cpp-python runs on libgomp. Between its splits its workers keep
// spinning for a while; a second pool of our own would fight them for the same cores (2 cores
// here), halving both. An OpenMP team opened from the same calling thread reuses those very
// workers, so the FFN split starts on threads that are already awake and nothing oversubscribes.
#pragma once

struct pi_threadpool;

typedef void (*pi_task_fn)(int ith, int nth, void * user_data);

pi_threadpool * pi_threadpool_new(int n_threads);
void            pi_threadpool_free(pi_threadpool * pool);

// Runs fn(ith, nth, user_data) for ith in [0, nth) and returns when all have finished. nth may
// be smaller than n_threads if the OpenMP runtime grants fewer threads.
void pi_threadpool_run(pi_threadpool * pool, pi_task_fn fn, void * user_data);
