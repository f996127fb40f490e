#include "pi-threadpool.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() { std::this_thread::yield(); }
#endif

// Spin iterations before an idle worker sleeps (a pause is ~10-140 cycles depending on the core).
static const int PI_SPIN_ITERS = 1 << 14;

struct pi_threadpool {
    int n_threads = 1;
    std::vector<std::thread> workers;

    std::mutex              mutex;
    std::condition_variable wake;
    std::atomic<unsigned>   generation{0}; // bumped for every job
    std::atomic<int>        pending{0};    // workers still running the current job
    std::atomic<bool>       stop{false};

    pi_task_fn fn        = nullptr;
    void *     user_data = nullptr;
};

static void worker_main(pi_threadpool * pool, int ith) {
    unsigned seen = 0;
    for (;;) {
        unsigned gen = pool->generation.load(std::memory_order_acquire);
        for (int i = 0; gen == seen && i < PI_SPIN_ITERS; i++) {
            cpu_relax();
            gen = pool->generation.load(std::memory_order_acquire);
        }
        if (gen == seen) {
            std::unique_lock<std::mutex> lock(pool->mutex);
            pool->wake.wait(lock, [&] {
                return pool->generation.load(std::memory_order_acquire) != seen || pool->stop.load();
            });
            gen = pool->generation.load(std::memory_order_acquire);
        }
        if (pool->stop.load()) {
            return;
        }
        seen = gen;
        pool->fn(ith, pool->n_threads, pool->user_data);
        pool->pending.fetch_sub(1, std::memory_order_acq_rel);
    }
}

pi_threadpool * pi_threadpool_new(int n_threads) {
    pi_threadpool * pool = new pi_threadpool;
    pool->n_threads = n_threads < 1 ? 1 : n_threads;
    for (int i = 1; i < pool->n_threads; i++) {
        pool->workers.emplace_back(worker_main, pool, i);
    }
    return pool;
}

void pi_threadpool_free(pi_threadpool * pool) {
    if (pool == nullptr) {
        return;
    }
    {
        std::lock_guard<std::mutex> lock(pool->mutex);
        pool->stop.store(true);
    }
    pool->wake.notify_all();
    for (auto & t : pool->workers) {
        t.join();
    }
    delete pool;
}

int pi_threadpool_n_threads(const pi_threadpool * pool) {
    return pool->n_threads;
}

void pi_threadpool_run(pi_threadpool * pool, pi_task_fn fn, void * user_data) {
    if (pool->n_threads == 1) {
        fn(0, 1, user_data);
        return;
    }
    pool->fn        = fn;
    pool->user_data = user_data;
    pool->pending.store(pool->n_threads - 1, std::memory_order_release);
    {
        // the lock orders the bump against a worker that is about to sleep
        std::lock_guard<std::mutex> lock(pool->mutex);
        pool->generation.fetch_add(1, std::memory_order_acq_rel);
    }
    pool->wake.notify_all();
    fn(0, pool->n_threads, user_data);
    while (pool->pending.load(std::memory_order_acquire) != 0) {
        cpu_relax();
    }
}
