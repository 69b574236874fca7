/* Prefill kernels on all cores for MLX's CPU build (Linux), called through ctypes by mlx_kvpred.cpu_kernels.

MLX's CPU ops run on one thread, and its exp is scalar. Causal attention over many query rows runs in tasks
shared by worker threads (one per core), each task a block of query rows of one head: scores by the BLAS's sgemm
(one thread per call), softmax in vectorized C, P V by sgemm again. SwiGLU and RoPE give each thread a share of
the floats or rows. kernels_init loads the BLAS MLX uses. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*set_threads_fn)(int);
typedef int (*get_threads_fn)(void);

static sgemm_fn sgemm;
static set_threads_fn blas_set_threads;
static get_threads_fn blas_get_threads;

/* Load the BLAS at `path` (already loaded by blas.py), whose symbols carry `prefix` ("scipy_" for scipy-openblas32);
   0 on success. Without openblas_set_num_threads (not OpenBLAS) the kernels run on the calling thread alone and the
   BLAS threads as it likes. */
int kernels_init(const char *path, const char *prefix) {
    char name[64];
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) return 1;
    snprintf(name, sizeof name, "%scblas_sgemm", prefix);
    sgemm = (sgemm_fn)dlsym(lib, name);
    snprintf(name, sizeof name, "%sopenblas_set_num_threads", prefix);
    blas_set_threads = (set_threads_fn)dlsym(lib, name);
    snprintf(name, sizeof name, "%sopenblas_get_num_threads", prefix);
    blas_get_threads = (get_threads_fn)dlsym(lib, name);
    if (!blas_set_threads || !blas_get_threads) blas_set_threads = NULL, blas_get_threads = NULL;
    return sgemm ? 0 : 2;
}

/* How many threads the kernels use: the BLAS's own thread count (1 if it cannot be set per call). */
int kernels_threads(void) { return blas_get_threads ? blas_get_threads() : 1; }

/* Threads a kernel runs on: the BLAS's thread count, at most 64 ... */
int max_threads(void) {
    int threads = kernels_threads();
    return threads > 64 ? 64 : threads;
}

/* ... and one for an elementwise kernel under 131072 floats: below that, starting a thread cost more than it saved
   (docs/performance.md). */
static int threads_for(long floats) { return floats < (1L << 17) ? 1 : max_threads(); }

static void pin_caller(worker_threads *w, int threads) {
    w->pinned = 0;
#ifdef __linux__
    int cpu = sched_getcpu(), n = 0;
    if (threads < 2 || cpu < 0 || pthread_getaffinity_np(pthread_self(), sizeof w->was, &w->was) != 0) return;
    int others[CPU_SETSIZE];
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (c != cpu && CPU_ISSET(c, &w->was)) others[n++] = c;
    if (n == 0) return;
    for (int i = 1; i < threads && i < 64; i++) {
        CPU_ZERO(&w->cpus[i]);
        CPU_SET(others[(i - 1) % n], &w->cpus[i]);
    }
    CPU_ZERO(&w->cpus[0]);
    CPU_SET(cpu, &w->cpus[0]);
    w->pinned = pthread_setaffinity_np(pthread_self(), sizeof w->cpus[0], &w->cpus[0]) == 0;
#else
    (void)threads;
#endif
}

int start_workers(worker_threads *w, int threads, void *(*fn)(void *), void *args, size_t arg_size) {
    pin_caller(w, threads);
    for (w->started = 0; w->started < threads - 1 && w->started < 63; w->started++) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
#ifdef __linux__
        if (w->pinned) pthread_attr_setaffinity_np(&attr, sizeof w->cpus[0], &w->cpus[w->started + 1]);
#endif
        int failed = pthread_create(&w->ids[w->started], &attr, fn, (char *)args + w->started * arg_size);
        pthread_attr_destroy(&attr);
        if (failed) break;
    }
    return w->started;
}

void join_workers(worker_threads *w) {
    for (int i = 0; i < w->started; i++) pthread_join(w->ids[i], NULL);
#ifdef __linux__
    if (w->pinned) pthread_setaffinity_np(pthread_self(), sizeof w->was, &w->was);
#endif
}

/* Runs work(arg, lo, hi) over [0, n) in one contiguous share per thread, the calling thread's included. */
typedef void (*range_fn)(void *arg, long lo, long hi);
typedef struct {
    range_fn work;
    void *arg;
    long n;
    int threads, index;
} share;

static void *share_worker(void *p) {
    share *s = p;
    long per = (s->n + s->threads - 1) / s->threads, lo = s->index * per, hi = lo + per < s->n ? lo + per : s->n;
    if (lo < hi) s->work(s->arg, lo, hi);
    return NULL;
}

static void run_split(range_fn work, void *arg, long n, int threads) {
    share shares[64];
    for (int i = 0; i < threads; i++) shares[i] = (share){work, arg, n, threads, i};
    worker_threads w;
    int started = start_workers(&w, threads, share_worker, &shares[1], sizeof(share));
    share_worker(&shares[0]);
    join_workers(&w);
    for (int i = started + 1; i < threads; i++) share_worker(&shares[i]); /* threads not had */
}

typedef struct {
    const float *q, *k, *v;
    float *out;
    long q_head, q_row, k_head, k_row, v_head, v_row; /* strides in floats; batches are heads here */
    int n_q, n_kv, L, S, D, rows;
    float scale;
    const int *starts, *ends; /* row r sees keys [starts[r], ends[r]) (each nondecreasing; starts NULL: 0); ends
                                 NULL: causal, aligned to the end of the keys */
    int blocks, tasks;
    atomic_int next, done;
} attention_job;

/* One task: query rows [start, end) of query head `h` (over all batches: h counts batch * n_q + head). */
static void attention_task(attention_job *j, int task, float *scores, float *pv) {
    int block = j->blocks - 1 - task / (j->tasks / j->blocks); /* the longest blocks first */
    int h = task % (j->tasks / j->blocks);
    int b = h / j->n_q, head = h % j->n_q, kv = b * j->n_kv + head / (j->n_q / j->n_kv);
    int start = block * j->rows, end = start + j->rows < j->L ? start + j->rows : j->L;
    /* the block's keys [first, first + seen): from its first row's first key to its last row's last */
    int rows = end - start, first = j->starts ? j->starts[start] : 0;
    int seen = (j->ends ? j->ends[end - 1] : j->S - j->L + end) - first;
    const float *q = j->q + h * j->q_head + start * j->q_row;
    const float *k = j->k + kv * j->k_head + first * j->k_row, *v = j->v + kv * j->v_head + first * j->v_row;
    sgemm(RowMajor, NoTrans, Trans, rows, seen, j->D, j->scale, q, (int)j->q_row, k, (int)j->k_row, 0.0f, scores,
          seen);
    float sums[rows];
    for (int r = 0; r < rows; r++) { /* row r sees keys [a, n) of the block's: the rest of its scores become 0 */
        float *row = scores + (long)r * seen;
        int a = j->starts ? j->starts[start + r] - first : 0;
        int n = j->ends ? j->ends[start + r] - first : seen - rows + r + 1;
        sums[r] = exp_shifted_sum(row + a, n - a, row_max(row + a, n - a));
        memset(row, 0, (size_t)a * sizeof(float));
        memset(row + n, 0, (size_t)(seen - n) * sizeof(float));
    }
    sgemm(RowMajor, NoTrans, NoTrans, rows, j->D, seen, 1.0f, scores, seen, v, (int)j->v_row, 0.0f, pv, j->D);
    float *out = j->out + ((long)h * j->L + start) * j->D;
    for (int r = 0; r < rows; r++) {
        float inv = 1.0f / sums[r];
        for (int d = 0; d < j->D; d++) out[(long)r * j->D + d] = pv[(long)r * j->D + d] * inv;
    }
}

/* One thread's part: tasks from the shared queue until it is empty (its share of [0, threads) is itself). */
static void attention_worker(void *arg, long lo, long hi) {
    attention_job *j = arg;
    (void)lo, (void)hi;
    float *scores = malloc(sizeof(float) * (size_t)j->rows * j->S), *pv = malloc(sizeof(float) * j->rows * j->D);
    if (scores && pv)
        for (int t; (t = atomic_fetch_add(&j->next, 1)) < j->tasks;) {
            attention_task(j, t, scores, pv);
            atomic_fetch_add(&j->done, 1);
        }
    free(scores);
    free(pv);
}

/* Causal attention ("causal" aligned to the end of the keys) of q (B, n_q, L, D) against k and v (B, n_kv, S, D),
   grouped heads, rows of each array contiguous, strides given in floats (per head and per row; batches must
   follow heads at the same stride); out is (B, n_q, L, D) contiguous. Query rows go in blocks of `rows`. With
   `ends` (L), row r sees keys [starts[r], ends[r]) instead (starts NULL: from 0; each nondecreasing, within
   [0, S], none empty): rows at scattered positions, in sliding windows. 0 on success; 1 if no thread got its
   scratch memory (out is then not all written), 2 before kernels_init. */
int causal_attention(const float *q, long q_head, long q_row, const float *k, long k_head, long k_row,
                     const float *v, long v_head, long v_row, float *out, int B, int n_q, int n_kv, int L, int S,
                     int D, float scale, int rows, const int *starts, const int *ends) {
    if (!sgemm) return 2;
    attention_job j = {q, k, v, out, q_head, q_row, k_head, k_row, v_head, v_row,
                       n_q, n_kv, L, S, D, rows, scale, starts, ends};
    j.blocks = (L + rows - 1) / rows;
    j.tasks = j.blocks * B * n_q;
    atomic_init(&j.next, 0);
    atomic_init(&j.done, 0);
    int blas_threads = kernels_threads(), threads = max_threads();
    if (threads > 1) blas_set_threads(1); /* each worker's sgemm runs on its own thread */
    run_split(attention_worker, &j, threads, threads);
    if (threads > 1) blas_set_threads(blas_threads);
    return atomic_load(&j.done) == j.tasks ? 0 : 1;
}

/* out = silu(gate) * x = gate / (1 + exp(-gate)) * x, cpu_ops._swiglu_kernel's arithmetic. */
VECTOR_CLONES static void swiglu_range(const float *gate, const float *x, float *out, long n) {
#pragma omp simd
    for (long i = 0; i < n; i++) out[i] = silu_times(gate[i], x[i]);
}

typedef struct {
    const float *gate, *x;
    float *out;
} swiglu_args;

static void swiglu_part(void *arg, long lo, long hi) {
    const swiglu_args *a = arg;
    swiglu_range(a->gate + lo, a->x + lo, a->out + lo, hi - lo);
}

/* out = silu(gate) * x over n floats, on all cores. */
void swiglu(const float *gate, const float *x, float *out, long n) {
    swiglu_args a = {gate, x, out};
    run_split(swiglu_part, &a, n, threads_for(n));
}

typedef struct {
    const float *x, *cos, *sin;
    const int *partner;
    float *out;
    long x_head, x_row, out_head, out_row;
    int L, d;
} rope_args;

VECTOR_CLONES static void rope_part(void *arg, long lo, long hi) {
    const rope_args *a = arg;
    int d = a->d;
    for (long r = lo; r < hi; r++) { /* r counts (head, position) rows */
        long h = r / a->L, l = r % a->L;
        const float *x = a->x + h * a->x_head + l * a->x_row;
        float *out = a->out + h * a->out_head + l * a->out_row;
        if (!a->cos) {
            memcpy(out, x, sizeof(float) * d);
            continue;
        }
        const float *c = a->cos + l * d, *s = a->sin + l * d;
#pragma omp simd
        for (int i = 0; i < d; i++) out[i] = x[i] * c[i] + x[a->partner[i]] * s[i];
    }
}

/* RoPE from tables: out[h, l, i] = x[h, l, i] cos[l, i] + x[h, l, partner[i]] sin[l, i] (sin's sign folded in per
   entry: mlx_kvpred.rope_layout), x's and out's heads and rows at the given strides (in floats; rows of d floats
   contiguous). With cos NULL, a copy (values written into a cache beside their keys). */
void rope(const float *x, long x_head, long x_row, const float *cos, const float *sin, const int *partner,
          float *out, long out_head, long out_row, int heads, int L, int d) {
    rope_args a = {x, cos, sin, partner, out, x_head, x_row, out_head, out_row, L, d};
    run_split(rope_part, &a, (long)heads * L, threads_for((long)heads * L * d));
}
