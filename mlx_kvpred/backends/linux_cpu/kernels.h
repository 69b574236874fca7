/* Shared by cpu_kernels.c and decode_step.c: the vector-clone attribute, MLX's exp polynomial, the thread count. */
#ifndef MLX_KVPRED_KERNELS_H
#define MLX_KVPRED_KERNELS_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Minimax coefficients of 2**f on [-0.5, 0.5], highest power first (MLX's own exp, as cpu_ops._EXP2_POLY). */
#define C6 1.535336188319500e-4f
#define C5 1.339887440266574e-3f
#define C4 9.618437357674640e-3f
#define C3 5.550332471162809e-2f
#define C2 2.402264791363012e-1f
#define C1 6.931472028550421e-1f
#define C0 1.0f
#define LOG2E 1.4426950408889634f
#define ROUND 12582912.0f /* 1.5 * 2**23: (y + ROUND) - ROUND rounds y to an integer */

/* 2**y for y in [-87 log2(e), 88 log2(e)], as cpu_ops._exp2_of: inlined into the vectorized loops. */
static inline float exp2_of(float y) {
    float r = (y + ROUND) - ROUND;
    float f = y - r, f2 = f * f;
    float p = (C0 + C1 * f) + f2 * (C2 + C3 * f) + (f2 * f2) * ((C4 + C5 * f) + f2 * C6);
    int32_t bits = ((int32_t)r + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* silu(g) * u = g / (1 + exp(-g)) * u, cpu_ops._swiglu_kernel's arithmetic. */
static inline float silu_times(float g, float u) {
    float y = -g * LOG2E;
    y = y > -87.0f * LOG2E ? y : -87.0f * LOG2E;
    y = y < 88.0f * LOG2E ? y : 88.0f * LOG2E;
    return g / (1.0f + exp2_of(y)) * u;
}

/* x[i] = exp(x[i] - m) for i < n (m >= every x[i]), returns their sum; cpu_ops._exp_shifted's arithmetic. */
VECTOR_CLONES static float exp_shifted_sum(float *x, int n, float m) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) {
        float y = (x[i] - m) * LOG2E;
        x[i] = exp2_of(y > -87.0f * LOG2E ? y : -87.0f * LOG2E);
        sum += x[i];
    }
    return sum;
}

VECTOR_CLONES static float row_max(const float *x, int n) {
    float m = x[0];
#pragma omp simd reduction(max : m)
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* Threads a kernel runs on: the BLAS's thread count, at most 64 (cpu_kernels.c). */
int max_threads(void);

/* Worker threads for one kernel call (cpu_kernels.c). The caller stays on its CPU and each worker is pinned to
   another allowed one: left to the scheduler, a new worker often started on the caller's CPU and shared it for
   milliseconds while the other core idled (decode steps of twice their time). Linux only pins. */
#include <pthread.h>
#include <sched.h>
typedef struct {
    int pinned, started;
    pthread_t ids[64];
#ifdef __linux__
    cpu_set_t was, cpus[64];
#endif
} worker_threads;

/* Starts up to threads - 1 workers, worker i (from 1) running fn(args + (i - 1) * arg_size), and pins the caller;
   returns how many started (fewer if the system gives fewer). End with join_workers. */
int start_workers(worker_threads *w, int threads, void *(*fn)(void *), void *args, size_t arg_size);
void join_workers(worker_threads *w);

#endif
