/* Runs fn on each of n jobs (jobs[t] at (char *)jobs + t * size), in parallel, and returns when all are done.
 *
 * Built with -fopenmp (kernels/cpu_fused.py), the jobs run on OpenMP's threads: loaded into a process that has
 * imported torch, the library binds to torch's own libgomp (the same soname, already loaded), so its threads
 * are the ones torch's ops use. Threads of our own (pthreads, the fallback without OpenMP) competed with
 * torch's OpenMP workers, which spin for a while after each parallel region: a 2-thread GEMM right after a
 * torch op ran ~1.3x slower than alone, and in an engine step no faster than on one thread. */
#ifndef PDSERVE_CPU_THREADS_H
#define PDSERVE_CPU_THREADS_H

#include <stddef.h>
#include <stdint.h>

#define MAX_THREADS 64  /* jobs a call splits into at most (callers clamp their thread count to it) */
#ifndef _OPENMP
#include <pthread.h>
#endif

static inline void run_jobs(void *(*fn)(void *), void *jobs, size_t size, int64_t n) {
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)n) schedule(static, 1)
    for (int64_t t = 0; t < n; ++t) fn((char *)jobs + t * size);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 1; t < n && t < MAX_THREADS; ++t)
        started[t] = pthread_create(&ids[t], NULL, fn, (char *)jobs + t * size) == 0;
    fn(jobs);
    for (int64_t t = 1; t < n; ++t) {
        if (t < MAX_THREADS && started[t]) pthread_join(ids[t], NULL); else fn((char *)jobs + t * size);
    }
#endif
}

#endif
