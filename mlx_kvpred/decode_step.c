/* A whole one-token decode step of a llama-style model (mlx-lm's llama, qwen2, qwen3) in C, on all cores, called
   through ctypes by mlx_kvpred.decode. A step of MLX primitives costs ~1600 x 2-5 us to schedule on the CPU, on
   top of its weight reads; here the threads run the step in lockstep, each owning a share of every matrix's rows
   (one-row products read each weight once: the step is a stream of weight reads), with a spin barrier where one
   thread's rows are another's input. Attention over the cache is split by key range, each thread keeping a
   running max, sum and P V per head, merged after. Elementwise work (norms, RoPE, SwiGLU) is small and done by
   every thread on its own copy of the residual stream. Weights are float32 or, with AVX2 or AVX-512, the GGUF's
   own 4- and 8-bit tensors (unpacked in registers; 5 or 9 bits read a weight instead of 32). The cache is only
   read: the new keys and values are returned, and mlx_kvpred.decode appends them to mlx-lm's caches. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* A weight matrix (out, in), row-major: float32, or quantized as MLX's affine format (GGUF's Q4_0/Q4_1/Q8_0 as
   mx.load gives them): `bits`-bit unsigned values packed in uint32s from the low bits up, and per group of 32
   values of a row a float16 scale and bias (value = scale * q + bias). */
typedef struct {
    const float *w;                  /* float32, or NULL: quantized */
    const uint32_t *packed;          /* (out, in * bits / 32) */
    const uint16_t *scales, *biases; /* (out, in / 32) float16 */
    int bits;                        /* 4 or 8 */
} weight;

/* One block's arrays; a NULL bias or q/k norm is none. */
typedef struct {
    const float *input_norm, *post_norm;
    weight q, k, v, o, gate, up, down;
    const float *q_bias, *k_bias, *v_bias, *o_bias, *gate_bias, *up_bias, *down_bias;
    const float *q_norm, *k_norm; /* RMSNorm over each q and k head before RoPE (qwen3) */
    const float *keys, *values; /* the cache: head h's position j at h * k_head + j * k_row (values: v_...) */
    long k_head, k_row, v_head, v_row;
} step_layer;

typedef struct {
    int n_layers, dim, n_q, n_kv, head_dim, hidden, vocab;
    float eps, qk_eps;
    const float *final_norm;
    weight head; /* (vocab, dim): the LM head or the tied embedding */
    const step_layer *layers;
} step_model;

typedef struct {
    atomic_int arrived, generation;
    int threads;
} spin_barrier;

static void spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void barrier_wait(spin_barrier *b) {
    int generation = atomic_load_explicit(&b->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == b->threads - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->generation, generation + 1, memory_order_release);
    } else /* spin, then give the core away: another process's spinning thread (a BLAS's, after its last call)
              may hold the core this barrier waits for */
        for (int spins = 0; atomic_load_explicit(&b->generation, memory_order_acquire) == generation; spins++)
            if (spins < 2000) spin_pause();
            else sched_yield();
}

/* y[r] = W[r] . x for rows [lo, hi) of W (K floats a row, rows `ld` floats apart), portable C. */
VECTOR_CLONES static void dot_rows_c(const float *W, int K, long ld, const float *x, float *y, long lo, long hi) {
    for (long r = lo; r < hi; r++) {
        const float *w = W + r * ld;
        float a = 0.0f;
#pragma omp simd reduction(+ : a)
        for (int k = 0; k < K; k++) a += w[k] * x[k];
        y[r] = a;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_ROWS 1
/* Eight rows per pass over x, a register of partial sums each: 33-36 GB/s on two cores of a Xeon where the
   portable loop (four rows) streams 27-32 (docs/performance.md). K's tail by masked loads. */
__attribute__((target("avx512f"))) static void dot_rows_avx512(const float *W, int K, long ld, const float *x,
                                                                float *y, long lo, long hi) {
    __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
    int body = K - K % 16;
    long r = lo;
    for (; r + 8 <= hi; r += 8) {
        const float *w = W + r * ld;
        __m512 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
        for (int k = 0; k < body; k += 16) {
            __m512 xv = _mm512_loadu_ps(x + k);
            for (int i = 0; i < 8; i++) a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i * ld + k), xv, a[i]);
        }
        if (tail) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, x + body);
            for (int i = 0; i < 8; i++)
                a[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + i * ld + body), xv, a[i]);
        }
        for (int i = 0; i < 8; i++) y[r + i] = _mm512_reduce_add_ps(a[i]);
    }
    dot_rows_c(W, K, ld, x, y, r, hi);
}

static float sum8(__m256 v) __attribute__((target("avx2")));
static float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

__attribute__((target("avx2,fma"))) static void dot_rows_avx2(const float *W, int K, long ld, const float *x,
                                                              float *y, long lo, long hi) {
    int body = K - K % 8;
    long r = lo;
    for (; r + 8 <= hi; r += 8) {
        const float *w = W + r * ld;
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (int k = 0; k < body; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(w + i * ld + k), xv, a[i]);
        }
        for (int i = 0; i < 8; i++) {
            float t = sum8(a[i]);
            for (int k = body; k < K; k++) t += w[i * ld + k] * x[k];
            y[r + i] = t;
        }
    }
    dot_rows_c(W, K, ld, x, y, r, hi);
}
#endif

typedef void (*dot_rows_fn)(const float *, int, long, const float *, float *, long, long);

/* The instruction sets the step uses: 2 AVX-512 (and F16C), 1 AVX2 with FMA and F16C, 0 portable C. */
static int supported_isa(void) {
#ifdef HAVE_X86_ROWS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
    return 0;
}

static dot_rows_fn dot_rows;
static int isa = -1;

/* The level in use (see supported_isa), set to min(wanted, supported) first unless wanted is -1: lower levels
   for side-by-side timing and tests on a CPU that has the higher ones. Not to be called during a step. */
int decode_isa(int wanted) {
    if (wanted < 0 && isa >= 0) return isa; /* each step asks: chosen once */
    int supported = supported_isa();
    isa = wanted >= 0 && wanted < supported ? wanted : supported;
#ifdef HAVE_X86_ROWS
    dot_rows = isa == 2 ? dot_rows_avx512 : isa == 1 ? dot_rows_avx2 : dot_rows_c;
#else
    dot_rows = dot_rows_c;
#endif
    return isa;
}

/* y[r] = W[r] . x (+ bias[r]) for rows [lo, hi) of W (rows of K floats). */
static void gemv_rows(const float *W, int K, const float *x, const float *bias, float *y, long lo, long hi) {
    dot_rows(W, K, K, x, y, lo, hi);
    if (bias)
        for (long r = lo; r < hi; r++) y[r] += bias[r];
}

/* An input vector as the quantized products read it: per group of 32, its even entries then its odd ones (the
   order in which a group's 4-bit values unpack) and the group's sum (for the biases). */
typedef struct {
    const float *x;
    float *paired, *sums;
} product_input;

static void prepare_input(product_input *in, int K) {
    for (int g = 0; g < K / 32; g++) {
        const float *x = in->x + g * 32;
        float sum = 0.0f;
        for (int i = 0; i < 16; i++) {
            in->paired[g * 32 + i] = x[2 * i], in->paired[g * 32 + 16 + i] = x[2 * i + 1];
            sum += x[2 * i] + x[2 * i + 1];
        }
        in->sums[g] = sum;
    }
}

#ifdef HAVE_X86_ROWS
/* A row's group of 32 quantized values as two vectors of 16 bytes: the 4-bit group's low nibbles (its even values)
   and high nibbles (its odd ones), or the 8-bit group's first and last 16. Both kernels below widen these. */
static inline void unpack_group(const uint8_t *q, int bits, __m128i *a, __m128i *b) {
    if (bits == 4) {
        __m128i p = _mm_loadu_si128((const __m128i *)q), low = _mm_set1_epi8(0x0F);
        *a = _mm_and_si128(p, low), *b = _mm_and_si128(_mm_srli_epi16(p, 4), low);
    } else {
        *a = _mm_loadu_si128((const __m128i *)q), *b = _mm_loadu_si128((const __m128i *)(q + 16));
    }
}

/* Quantized rows, four at a time: sum over groups of scale * (q . x) + bias * sum(x). The values are unpacked to
   floats in registers; the weights read are 5 (4-bit) or 9 (8-bit) bits a value instead of 32. */
__attribute__((target("avx512f,f16c"))) static void quantized_rows_avx512(const weight *W, int K,
                                                                            const product_input *in, float *y,
                                                                            long lo, long hi) {
    int G = K / 32;
    long row_bytes = (long)K * W->bits / 8;
    const uint8_t *Q = (const uint8_t *)W->packed;
    for (long r = lo; r < hi;) {
        int n = hi - r < 4 ? (int)(hi - r) : 4;
        __m512 acc[4];
        float bias_sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_ps();
        for (int g = 0; g < G; g++) {
            const float *xg = (W->bits == 4 ? in->paired : in->x) + g * 32;
            __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
            for (int i = 0; i < n; i++) {
                __m128i qa, qb;
                unpack_group(Q + (r + i) * row_bytes + (long)g * 4 * W->bits, W->bits, &qa, &qb);
                __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(qa));
                __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(qb));
                __m512 t = _mm512_fmadd_ps(b, x1, _mm512_mul_ps(a, x0));
                long at = (r + i) * G + g;
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(W->scales[at])), t, acc[i]);
                bias_sum[i] += _cvtsh_ss(W->biases[at]) * in->sums[g];
            }
        }
        for (int i = 0; i < n; i++) y[r + i] = _mm512_reduce_add_ps(acc[i]) + bias_sum[i];
        r += n;
    }
}
#endif

#ifdef HAVE_X86_ROWS
/* The same with AVX2: a group's 32 values as four vectors of 8. */
__attribute__((target("avx2,fma,f16c"))) static void quantized_rows_avx2(const weight *W, int K,
                                                                          const product_input *in, float *y,
                                                                          long lo, long hi) {
    int G = K / 32;
    long row_bytes = (long)K * W->bits / 8;
    const uint8_t *Q = (const uint8_t *)W->packed;
    for (long r = lo; r < hi;) {
        int n = hi - r < 4 ? (int)(hi - r) : 4;
        __m256 acc[4];
        float bias_sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
        for (int g = 0; g < G; g++) {
            const float *xg = (W->bits == 4 ? in->paired : in->x) + g * 32;
            __m256 x0 = _mm256_loadu_ps(xg), x1 = _mm256_loadu_ps(xg + 8), x2 = _mm256_loadu_ps(xg + 16),
                   x3 = _mm256_loadu_ps(xg + 24);
            for (int i = 0; i < n; i++) {
                __m128i a, b;
                unpack_group(Q + (r + i) * row_bytes + (long)g * 4 * W->bits, W->bits, &a, &b);
                __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)), x0);
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))), x1, t);
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), x2, t);
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))), x3, t);
                long at = (r + i) * G + g;
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(W->scales[at])), t, acc[i]);
                bias_sum[i] += _cvtsh_ss(W->biases[at]) * in->sums[g];
            }
        }
        for (int i = 0; i < n; i++) y[r + i] = sum8(acc[i]) + bias_sum[i];
        r += n;
    }
}
#endif

static int quantized_supported(void) { return decode_isa(-1) >= 1; }

/* Whether decode_step reads quantized weights (AVX-512 or AVX2); mlx_kvpred.decode passes float32 ones otherwise. */
int decode_quantized_supported(void) { return quantized_supported(); }

/* y[r] = W[r] . x (+ bias[r]) for rows [lo, hi) of a weight of K columns. */
static void weight_rows(const weight *W, int K, const product_input *in, const float *bias, float *y, long lo,
                        long hi) {
#ifdef HAVE_X86_ROWS
    if (!W->w) {
        if (isa == 2) quantized_rows_avx512(W, K, in, y, lo, hi);
        else quantized_rows_avx2(W, K, in, y, lo, hi);
        if (bias)
            for (long r = lo; r < hi; r++) y[r] += bias[r];
        return;
    }
#endif
    gemv_rows(W->w, K, in->x, bias, y, lo, hi);
}

/* Products with one input stacked in rows: thread t of T takes its share of all of them. */
typedef struct {
    const weight *w;
    const float *bias;
    float *y;
    long rows;
} product;

static void products_share(const product *p, int n, int K, product_input *in, int t, int T) {
    long total = 0;
    int quantized = 0;
    for (int i = 0; i < n; i++) total += p[i].rows, quantized |= !p[i].w->w;
    if (quantized) prepare_input(in, K);
    long lo = total * t / T, hi = total * (t + 1) / T, base = 0;
    for (int i = 0; i < n; base += p[i].rows, i++) {
        long a = lo > base ? lo - base : 0, b = hi - base < p[i].rows ? hi - base : p[i].rows;
        if (a < b) weight_rows(p[i].w, K, in, p[i].bias, p[i].y, a, b);
    }
}

/* out = x / sqrt(mean(x^2) + eps) * w, mx.fast.rms_norm's arithmetic. */
VECTOR_CLONES static void rms_norm(const float *x, const float *w, float eps, float *out, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    float r = 1.0f / sqrtf(sum / n + eps);
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

VECTOR_CLONES static void add_into(float *x, const float *y, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) x[i] += y[i];
}

/* acc[d] += p * v[d] for d < D. */
VECTOR_CLONES static void axpy(float *acc, float p, const float *v, int D) {
#pragma omp simd
    for (int d = 0; d < D; d++) acc[d] += p * v[d];
}

/* What a thread keeps of one query head's attention over its key range. */
typedef struct {
    float max, sum;
} running;

typedef struct {
    const step_model *m;
    const float *x_in, *cos, *sin;
    const int *partner;
    int past, threads;
    float *new_k, *new_v, *logits;
    float *qkv, *o, *gate_up, *down; /* products shared by the threads */
    running *partial;                /* (threads, n_q) */
    float *partial_pv;               /* (threads, n_q, head_dim) */
    spin_barrier barrier;
    atomic_int go;
} step_job;

/* Scores of `group` query heads (rows of D floats) against n keys (`row` floats apart):
   scores[i * stride + j] = q_i . K_j. */
static void group_scores_c(const float *K, long row, long n, const float *q, int group, int D, float *scores,
                           long stride) {
    for (int i = 0; i < group; i++) dot_rows(K, D, row, q + i * D, scores + i * stride, 0, n);
}

/* out_i += sum_j p[i * stride + j] V_j for the group's heads (rows of D floats, `row` floats apart). */
static void group_pv_c(const float *V, long row, long n, const float *p, long stride, int group, int D,
                       float *out) {
    for (int i = 0; i < group; i++)
        for (long j = 0; j < n; j++) axpy(out + i * D, p[i * stride + j], V + j * row, D);
}

#ifdef HAVE_X86_ROWS
/* s[k] = the sum of a[k]'s 16 floats, for 16 vectors at once: pairs of vectors, then quads, then 128-bit lanes
   added into one another (45 instructions for what 16 horizontal sums take ~130 for). */
static inline __attribute__((always_inline, target("avx512f"))) __m512 sums_of_16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: (x0 + x2, y0 + y2, x1 + x3, y1 + y3) of a[2i] = x, a[2i+1] = y */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per lane: that lane's sums of a[4i .. 4i+3] */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++) /* lanes 0+1 and 2+3 of c[2i], then of c[2i+1] */
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The same for D = 64, sixteen keys at a time, each key row read once for the whole group (from L1 after the
   first head). */
__attribute__((target("avx512f"))) static void group_scores_64(const float *K, long row, long n, const float *q,
                                                                int group, int D, float *scores, long stride) {
    long j = 0;
    for (; j + 16 <= n; j += 16)
        for (int i = 0; i < group; i++) {
            const float *qi = q + i * 64, *k = K + j * row;
            __m512 q0 = _mm512_loadu_ps(qi), q1 = _mm512_loadu_ps(qi + 16), q2 = _mm512_loadu_ps(qi + 32),
                   q3 = _mm512_loadu_ps(qi + 48), a[16];
            for (int r = 0; r < 16; r++, k += row) {
                a[r] = _mm512_mul_ps(q0, _mm512_loadu_ps(k));
                a[r] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(k + 16), a[r]);
                a[r] = _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32), a[r]);
                a[r] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(k + 48), a[r]);
            }
            _mm512_storeu_ps(scores + i * stride + j, sums_of_16(a));
        }
    if (j < n)
        for (int i = 0; i < group; i++) dot_rows(K, D, row, q + i * D, scores + i * stride, j, n);
}

/* Up to four heads at a time, their sums in registers (m is a constant where this is inlined). */
static inline __attribute__((always_inline, target("avx512f"))) void pv_64(const float *V, long row, long n,
                                                                          const float *p, long stride, int m,
                                                                          float *out) {
    __m512 acc[4][4];
    for (int i = 0; i < m; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = _mm512_loadu_ps(out + i * 64 + c * 16);
    for (long j = 0; j < n; j++) {
        const float *v = V + j * row;
        __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), v2 = _mm512_loadu_ps(v + 32),
               v3 = _mm512_loadu_ps(v + 48);
        for (int i = 0; i < m; i++) {
            __m512 w = _mm512_set1_ps(p[i * stride + j]);
            acc[i][0] = _mm512_fmadd_ps(w, v0, acc[i][0]), acc[i][1] = _mm512_fmadd_ps(w, v1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(w, v2, acc[i][2]), acc[i][3] = _mm512_fmadd_ps(w, v3, acc[i][3]);
        }
    }
    for (int i = 0; i < m; i++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(out + i * 64 + c * 16, acc[i][c]);
}

__attribute__((target("avx512f"))) static void group_pv_64(const float *V, long row, long n, const float *p,
                                                            long stride, int group, int D, float *out) {
    (void)D;
    for (int i = 0; i < group; i += 4) {
        switch (group - i < 4 ? group - i : 4) {
        case 1: pv_64(V, row, n, p + i * stride, stride, 1, out + i * 64); break;
        case 2: pv_64(V, row, n, p + i * stride, stride, 2, out + i * 64); break;
        case 3: pv_64(V, row, n, p + i * stride, stride, 3, out + i * 64); break;
        default: pv_64(V, row, n, p + i * stride, stride, 4, out + i * 64);
        }
    }
}
#endif

typedef void (*group_scores_fn)(const float *, long, long, const float *, int, int, float *, long);
typedef void (*group_pv_fn)(const float *, long, long, const float *, long, int, int, float *);

/* Thread t's part of attention for one layer: query heads `q` (scaled, roped) over keys [lo, hi) of the cache's
   `past` and the new key and value (position `past`); writes each head's running max and sum and its P V. */
static void attention_share(step_job *j, const step_layer *L, const float *q, const float *k_new,
                            const float *v_new, long lo, long hi, float *scores, int t) {
    const step_model *m = j->m;
    int D = m->head_dim, group = m->n_q / m->n_kv;
    long cached = (hi < j->past ? hi : j->past) - lo, n = hi - lo; /* cached: keys in [lo, hi) before the new one */
    group_scores_fn scores_of = group_scores_c;
    group_pv_fn pv_of = group_pv_c;
#ifdef HAVE_X86_ROWS
    if (D == 64 && isa == 2) scores_of = group_scores_64, pv_of = group_pv_64;
#endif
    for (int g = 0; g < m->n_kv; g++) {
        const float *K = L->keys + g * L->k_head + lo * L->k_row, *V = L->values + g * L->v_head + lo * L->v_row;
        const float *qg = q + g * group * D;
        running *r = &j->partial[t * m->n_q + g * group];
        float *pv = j->partial_pv + ((long)t * m->n_q + g * group) * D;
        memset(pv, 0, sizeof(float) * group * D);
        if (n <= 0) {
            for (int i = 0; i < group; i++) r[i].max = -INFINITY, r[i].sum = 0.0f;
            continue;
        }
        if (cached > 0) scores_of(K, L->k_row, cached, qg, group, D, scores, n);
        if (n > cached) group_scores_c(k_new + g * D, D, 1, qg, group, D, scores + cached, n);
        for (int i = 0; i < group; i++) {
            r[i].max = row_max(scores + i * n, (int)n);
            r[i].sum = exp_shifted_sum(scores + i * n, (int)n, r[i].max);
        }
        if (cached > 0) pv_of(V, L->v_row, cached, scores, n, group, D, pv);
        if (n > cached) group_pv_c(v_new + g * D, D, 1, scores + cached, n, group, D, pv);
    }
}

/* The step as thread t of j->threads runs it; x, h, qk, attn, act and scores are its own scratch. */
static void step_thread(step_job *j, int t, float *scratch) {
    const step_model *m = j->m;
    int T = j->threads, D = m->head_dim, n_q = m->n_q, n_kv = m->n_kv, dim = m->dim, hidden = m->hidden;
    int n_qk = (n_q + n_kv) * D, wide = dim > n_q * D ? dim : n_q * D;
    float *x = scratch, *h = x + dim, *qk = h + wide, *normed = qk + n_qk, *attn = normed + n_qk;
    float *act = attn + n_q * D, *scores = act + hidden, *paired = scores + (j->past + 1) * (n_q / n_kv);
    int widest = wide > hidden ? wide : hidden;
    product_input normed_in = {h, paired, paired + widest}, attn_in = {attn, paired, paired + widest},
                  act_in = {act, paired, paired + widest};
    long total = j->past + 1, lo = total * t / T, hi = total * (t + 1) / T;
    memcpy(x, j->x_in, sizeof(float) * dim);
    for (int l = 0; l < m->n_layers; l++) {
        const step_layer *L = &m->layers[l];
        rms_norm(x, L->input_norm, m->eps, h, dim);
        product qkv[3] = {{&L->q, L->q_bias, j->qkv, (long)n_q * D},
                          {&L->k, L->k_bias, j->qkv + n_q * D, (long)n_kv * D},
                          {&L->v, L->v_bias, j->qkv + n_qk, (long)n_kv * D}};
        products_share(qkv, 3, dim, &normed_in, t, T);
        barrier_wait(&j->barrier);
        const float *qk_in = j->qkv;
        if (L->q_norm) { /* qwen3 */
            for (int i = 0; i < n_q + n_kv; i++)
                rms_norm(j->qkv + i * D, i < n_q ? L->q_norm : L->k_norm, m->qk_eps, normed + i * D, D);
            qk_in = normed;
        }
        for (int i = 0; i < n_qk; i++) qk[i] = qk_in[i] * j->cos[i] + qk_in[j->partner[i]] * j->sin[i];
        if (t == 0) {
            memcpy(j->new_k + (long)l * n_kv * D, qk + n_q * D, sizeof(float) * n_kv * D);
            memcpy(j->new_v + (long)l * n_kv * D, j->qkv + n_qk, sizeof(float) * n_kv * D);
        }
        attention_share(j, L, qk, qk + n_q * D, j->qkv + n_qk, lo, hi, scores, t);
        barrier_wait(&j->barrier);
        for (int i = 0; i < n_q; i++) { /* merge the threads' parts of head i */
            float top = -INFINITY, sum = 0.0f;
            for (int s = 0; s < T; s++) top = fmaxf(top, j->partial[s * n_q + i].max);
            float *out = attn + i * D;
            memset(out, 0, sizeof(float) * D);
            for (int s = 0; s < T; s++) {
                const running *r = &j->partial[s * n_q + i];
                if (r->sum == 0.0f) continue;
                float w = expf(r->max - top);
                sum += w * r->sum;
                axpy(out, w, j->partial_pv + ((long)s * n_q + i) * D, D);
            }
            for (int d = 0; d < D; d++) out[d] /= sum;
        }
        product o = {&L->o, L->o_bias, j->o, dim};
        products_share(&o, 1, n_q * D, &attn_in, t, T);
        barrier_wait(&j->barrier);
        add_into(x, j->o, dim);
        rms_norm(x, L->post_norm, m->eps, h, dim);
        product gate_up[2] = {{&L->gate, L->gate_bias, j->gate_up, hidden},
                              {&L->up, L->up_bias, j->gate_up + hidden, hidden}};
        products_share(gate_up, 2, dim, &normed_in, t, T);
        barrier_wait(&j->barrier);
        for (int i = 0; i < hidden; i++) act[i] = silu_times(j->gate_up[i], j->gate_up[hidden + i]);
        product down = {&L->down, L->down_bias, j->down, dim};
        products_share(&down, 1, hidden, &act_in, t, T);
        barrier_wait(&j->barrier);
        add_into(x, j->down, dim);
    }
    rms_norm(x, m->final_norm, m->eps, h, dim);
    product head = {&m->head, NULL, j->logits, m->vocab};
    products_share(&head, 1, dim, &normed_in, t, T);
}

static long scratch_floats(const step_model *m, long keys) {
    int n_qk = (m->n_q + m->n_kv) * m->head_dim, wide = m->dim > m->n_q * m->head_dim ? m->dim : m->n_q * m->head_dim;
    long widest = wide > m->hidden ? wide : m->hidden; /* the widest product input, paired (and its sums) */
    return m->dim + wide + 2L * n_qk + (long)m->n_q * m->head_dim + m->hidden + keys * (m->n_q / m->n_kv) +
           widest + widest / 32 + 1;
}

typedef struct {
    step_job *job;
    int index;
    float *scratch;
} worker_arg;

static void *step_worker(void *p) {
    worker_arg *a = p;
    while (!atomic_load_explicit(&a->job->go, memory_order_acquire)) sched_yield();
    step_thread(a->job, a->index, a->scratch);
    return NULL;
}

/* One decode step: x_in the token's embedding (dim), `past` cached positions, cos and sin the RoPE tables of the
   q and k heads at position `past` ((n_q + n_kv) * head_dim, the attention's scale folded into q's), partner the
   rotation's partner of each entry (mlx_kvpred.rope_layout). Writes the new keys and values ((n_layers, n_kv,
   head_dim) each) and the logits (vocab). 0 on success, 1 if scratch memory was not had, 2 for quantized weights
   where decode_quantized_supported() is 0 (nothing written either way). */
int decode_step(const step_model *m, const float *x_in, int past, const float *cos, const float *sin,
                const int *partner, float *new_k, float *new_v, float *logits) {
    decode_isa(-1);
    int quantized = !m->head.w;
    for (int l = 0; l < m->n_layers; l++) {
        const step_layer *L = &m->layers[l];
        quantized |= !L->q.w || !L->k.w || !L->v.w || !L->o.w || !L->gate.w || !L->up.w || !L->down.w;
    }
    if (quantized && !quantized_supported()) return 2;
    int threads = max_threads();
    long shared = (m->n_q + 2L * m->n_kv) * m->head_dim + 2L * m->dim + 2L * m->hidden +
                  (long)threads * m->n_q * m->head_dim, own = scratch_floats(m, past + 1L);
    float *buffer = malloc(sizeof(float) * (shared + threads * own));
    running *partial = malloc(sizeof(running) * threads * m->n_q);
    if (!buffer || !partial) {
        free(buffer), free(partial);
        return 1;
    }
    step_job j = {m, x_in, cos, sin, partner, past, threads, new_k, new_v, logits};
    j.qkv = buffer;
    j.o = j.qkv + (m->n_q + 2L * m->n_kv) * m->head_dim;
    j.gate_up = j.o + m->dim;
    j.down = j.gate_up + 2L * m->hidden;
    j.partial_pv = j.down + m->dim;
    j.partial = partial;
    atomic_init(&j.go, 0);
    worker_arg args[64];
    for (int i = 1; i < threads; i++) args[i - 1] = (worker_arg){&j, i, buffer + shared + i * own};
    worker_threads w;
    int started = start_workers(&w, threads, step_worker, args, sizeof(worker_arg));
    j.threads = started + 1;
    j.barrier = (spin_barrier){.threads = j.threads};
    atomic_init(&j.barrier.arrived, 0);
    atomic_init(&j.barrier.generation, 0);
    atomic_store_explicit(&j.go, 1, memory_order_release);
    step_thread(&j, 0, buffer + shared);
    join_workers(&w);
    free(buffer), free(partial);
    return 0;
}
