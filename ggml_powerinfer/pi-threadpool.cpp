#include "pi-threadpool.h"

#include <omp.h>

struct pi_threadpool {
    int n_threads = 1;
};

pi_threadpool * pi_threadpool_new(int n_threads) {
    pi_threadpool * pool = new pi_threadpool;
    pool->n_threads = n_threads < 1 ? 1 : n_threads;
    return pool;
}

void pi_threadpool_free(pi_threadpool * pool) {
    delete pool;
}

void pi_threadpool_run(pi_threadpool * pool, pi_task_fn fn, void * user_data) {
    if (pool->n_threads == 1) {
        fn(0, 1, user_data);
        return;
    }
    #pragma omp parallel num_threads(pool->n_threads)
    {
        fn(omp_get_thread_num(), omp_get_num_threads(), user_data);
    }
}
