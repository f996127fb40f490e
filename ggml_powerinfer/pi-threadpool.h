// The backend's own worker threads. The calling thread works as thread 0, so n_threads == 1
// starts no thread at all. Idle workers spin briefly (the next FFN op usually follows within
// microseconds during decode), then sleep so they do not steal cores from the CPU backend.
#pragma once

struct pi_threadpool;

typedef void (*pi_task_fn)(int ith, int nth, void * user_data);

pi_threadpool * pi_threadpool_new(int n_threads);
void            pi_threadpool_free(pi_threadpool * pool);
int             pi_threadpool_n_threads(const pi_threadpool * pool);

// Runs fn(ith, nth, user_data) for ith in [0, nth) and returns when all have finished.
void pi_threadpool_run(pi_threadpool * pool, pi_task_fn fn, void * user_data);
