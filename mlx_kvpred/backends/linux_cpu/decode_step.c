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

/* Where new keys or values go: head h's row r at out + h * head_stride + r * head_dim. predict_kv_rows RoPEs keys
   on the way with the tables ((rows, head_dim) cos and sin, partner (head_dim), as rope_row takes them; NULL for
   values: copied); decode_rows' are RoPE'd already (tables unread). */
typedef struct {
    float *out;
    long head_stride;
    const float *cos, *sin;
    const int *partner;
} kv_target;

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
        /* the next four rows, fetched a slice per group while these four are computed: without it the loads wait on
           memory (gemma3's 262k-row head: 2.9 -> 5.2 GB/s on the AVX2 EPYC, docs/gemma.md) */
        const char *ahead = (const char *)(Q + (r + n) * row_bytes);
        long next_rows = hi - r - n < 4 ? hi - r - n : 4, ahead_lines = next_rows > 0 ? (next_rows * row_bytes + 63) / 64 : 0;
        for (int g = 0; g < G; g++) {
            const float *xg = (W->bits == 4 ? in->paired : in->x) + g * 32;
            for (long line = ahead_lines * g / G; line < ahead_lines * (g + 1) / G; line++)
                _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
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

/* Several rows at once (a prompt's last tokens, a short chat turn): Y[r][n] = W[n] . X[r] for r < R, with X given
   transposed, Xt (K, ldx) (columns past R not read), so that one weight value times a vector of 16 rows' inputs is one
   FMA (a broadcast operand). Weights are read in place, BLOCK_ROWS rows at a time, and each block is used for
   all R rows before the next, which is prefetched meanwhile; quantized blocks are first unpacked to float32 scratch.
   No packing of the weight, which is what makes OpenBLAS's sgemm slow at a few rows (docs/performance.md). */
#define BLOCK_ROWS 12

/* Y[r * ldy + i] = w[i] . X[r] for i < nb (rows ldw floats apart), r < R; portable C. */
VECTOR_CLONES static void block_product_c(const float *w, long ldw, int nb, int K, const float *Xt, int ldx, int R,
                                          float *Y, long ldy, const char *next, long next_bytes) {
    (void)next, (void)next_bytes;
    for (int i = 0; i < nb; i++)
        for (int r0 = 0; r0 < R; r0 += 16) {
            float acc[16] = {0.0f};
            int n = R - r0 < 16 ? R - r0 : 16;
            for (int k = 0; k < K; k++) {
                float a = w[i * ldw + k];
                const float *x = Xt + (long)k * ldx + r0;
#pragma omp simd
                for (int r = 0; r < n; r++) acc[r] += a * x[r];
            }
            for (int r = r0; r < R && r < r0 + 16; r++) Y[r * ldy + i] = acc[r - r0];
        }
}

#ifdef HAVE_X86_ROWS
/* One step k of block_product_avx512 over two vectors of inputs: a[i] += w[off[i] + k] * (x0, x1). */
static inline __attribute__((always_inline, target("avx512f"))) void block_step_2(__m512 a[BLOCK_ROWS][2],
                                                                                   const float *w, const long *off,
                                                                                   int k, __m512 x0, __m512 x1) {
    for (int i = 0; i < BLOCK_ROWS; i++) {
        __m512 b = _mm512_set1_ps(w[off[i] + k]);
        a[i][0] = _mm512_fmadd_ps(b, x0, a[i][0]), a[i][1] = _mm512_fmadd_ps(b, x1, a[i][1]);
    }
}

/* The same with AVX-512: BLOCK_ROWS x 32 rows of sums in registers (24 of 32), one broadcast weight value and two
   vectors of inputs a step. `next` (next_bytes: the next block) is prefetched a line a step, on the first pass. */
__attribute__((target("avx512f"))) static void block_product_avx512(const float *w, long ldw, int nb, int K,
                                                                     const float *Xt, int ldx, int R, float *Y,
                                                                     long ldy, const char *next, long next_bytes) {
    long off[BLOCK_ROWS];
    for (int i = 0; i < BLOCK_ROWS; i++) off[i] = (i < nb ? i : 0) * ldw; /* rows past nb: row 0 again, unstored */
    for (int v0 = 0; v0 < R; v0 += 32) {
        __m512 a[BLOCK_ROWS][2];
        for (int i = 0; i < BLOCK_ROWS; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
        const float *x = Xt + v0;
        long prefetch = v0 == 0 && next ? next_bytes : 0;
        int left = R - v0; /* columns past R are not read (masked): padding need not hold numbers */
        if (left >= 32)
            for (int k = 0; k < K; k++, x += ldx) {
                if ((long)k * 64 < prefetch) _mm_prefetch(next + (long)k * 64, _MM_HINT_T0);
                block_step_2(a, w, off, k, _mm512_loadu_ps(x), _mm512_loadu_ps(x + 16));
            }
        else if (left > 16) { /* the last block: masked loads (slower in every block, docs/performance.md) */
            __mmask16 m1 = (__mmask16)((1u << (left - 16)) - 1);
            for (int k = 0; k < K; k++, x += ldx) {
                if ((long)k * 64 < prefetch) _mm_prefetch(next + (long)k * 64, _MM_HINT_T0);
                block_step_2(a, w, off, k, _mm512_loadu_ps(x), _mm512_maskz_loadu_ps(m1, x + 16));
            }
        } else {
            __mmask16 m0 = left == 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            for (int k = 0; k < K; k++, x += ldx) {
                if ((long)k * 64 < prefetch) _mm_prefetch(next + (long)k * 64, _MM_HINT_T0);
                __m512 x0 = _mm512_maskz_loadu_ps(m0, x);
                for (int i = 0; i < BLOCK_ROWS; i++) a[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(w[off[i] + k]), x0, a[i][0]);
            }
        }
        float t[32];
        for (int i = 0; i < nb; i++) {
            _mm512_storeu_ps(t, a[i][0]), _mm512_storeu_ps(t + 16, a[i][1]);
            for (int r = v0; r < R && r < v0 + 32; r++) Y[r * ldy + i] = t[r - v0];
        }
    }
}

/* The same with AVX2 (16 registers of 8): the block's rows in two halves of 6, each 6 x 16 rows of sums in registers
   (12), one broadcast weight value and two vectors of inputs a step; the last vectors' columns past R are not read. */
#define HALF_ROWS 6
__attribute__((target("avx2,fma"))) static void block_product_avx2(const float *w, long ldw, int nb, int K,
                                                                   const float *Xt, int ldx, int R, float *Y,
                                                                   long ldy, const char *next, long next_bytes) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int h = 0; h < nb; h += HALF_ROWS) {
        int hb = nb - h < HALF_ROWS ? nb - h : HALF_ROWS;
        long off[HALF_ROWS];
        for (int i = 0; i < HALF_ROWS; i++) off[i] = (h + (i < hb ? i : 0)) * ldw; /* past hb: row h again, unstored */
        for (int v0 = 0; v0 < R; v0 += 16) {
            __m256 a[HALF_ROWS][2];
            for (int i = 0; i < HALF_ROWS; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
            const float *x = Xt + v0;
            long prefetch = v0 == 0 && h == 0 && next ? next_bytes : 0;
            int left = R - v0;
            __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes);
            __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(left - 8), lanes);
            for (int k = 0; k < K; k++, x += ldx) {
                if ((long)k * 64 < prefetch) _mm_prefetch(next + (long)k * 64, _MM_HINT_T0);
                __m256 x0, x1;
                if (left >= 16) x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
                else x0 = _mm256_maskload_ps(x, m0), x1 = _mm256_maskload_ps(x + 8, m1);
                for (int i = 0; i < HALF_ROWS; i++) {
                    __m256 b = _mm256_broadcast_ss(w + off[i] + k);
                    a[i][0] = _mm256_fmadd_ps(b, x0, a[i][0]), a[i][1] = _mm256_fmadd_ps(b, x1, a[i][1]);
                }
            }
            float t[16];
            for (int i = 0; i < hb; i++) {
                _mm256_storeu_ps(t, a[i][0]), _mm256_storeu_ps(t + 8, a[i][1]);
                for (int r = v0; r < R && r < v0 + 16; r++) Y[r * ldy + h + i] = t[r - v0];
            }
        }
    }
}

/* Rows [r0, r0 + nb) of a quantized weight of K columns as float32 rows of K (scale * q + bias, in order). */
__attribute__((target("avx512f,f16c"))) static void unpack_rows_avx512(const weight *W, int K, long r0, int nb,
                                                                        float *out) {
    int G = K / 32;
    long row_bytes = (long)K * W->bits / 8;
    const uint8_t *Q = (const uint8_t *)W->packed;
    for (int i = 0; i < nb; i++)
        for (int g = 0; g < G; g++) {
            __m128i a, b;
            unpack_group(Q + (r0 + i) * row_bytes + (long)g * 4 * W->bits, W->bits, &a, &b);
            if (W->bits == 4) { /* even and odd values back in order */
                __m128i lo = _mm_unpacklo_epi8(a, b);
                b = _mm_unpackhi_epi8(a, b), a = lo;
            }
            long at = (r0 + i) * G + g;
            __m512 scale = _mm512_set1_ps(_cvtsh_ss(W->scales[at])), bias = _mm512_set1_ps(_cvtsh_ss(W->biases[at]));
            float *o = out + (long)i * K + g * 32;
            _mm512_storeu_ps(o, _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(a)), bias));
            _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), bias));
        }
}

/* The same with AVX2: a group's 32 values as four vectors of 8. */
__attribute__((target("avx2,fma,f16c"))) static void unpack_rows_avx2(const weight *W, int K, long r0, int nb,
                                                                      float *out) {
    int G = K / 32;
    long row_bytes = (long)K * W->bits / 8;
    const uint8_t *Q = (const uint8_t *)W->packed;
    for (int i = 0; i < nb; i++)
        for (int g = 0; g < G; g++) {
            __m128i a, b;
            unpack_group(Q + (r0 + i) * row_bytes + (long)g * 4 * W->bits, W->bits, &a, &b);
            if (W->bits == 4) { /* even and odd values back in order */
                __m128i lo = _mm_unpacklo_epi8(a, b);
                b = _mm_unpackhi_epi8(a, b), a = lo;
            }
            long at = (r0 + i) * G + g;
            __m256 scale = _mm256_set1_ps(_cvtsh_ss(W->scales[at])), bias = _mm256_set1_ps(_cvtsh_ss(W->biases[at]));
            float *o = out + (long)i * K + g * 32;
            __m128i parts[4] = {a, _mm_srli_si128(a, 8), b, _mm_srli_si128(b, 8)};
            for (int v = 0; v < 4; v++)
                _mm256_storeu_ps(o + 8 * v, _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[v])),
                                                            bias));
        }
}
#endif

/* An IEEE half's value (F16C's conversion, in portable C). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    float f;
    if (exp == 0) { /* zero or subnormal: man * 2**-24 */
        f = (float)man * (1.0f / 16777216.0f);
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    } else if (exp == 31)
        bits = sign | 0x7F800000u | (man << 13);
    else
        bits = sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The same, one value at a time (uint32 words, low bits first). */
static void unpack_rows_c(const weight *W, int K, long r0, int nb, float *out) {
    int G = K / 32, per_word = 32 / W->bits;
    uint32_t mask = (1u << W->bits) - 1;
    for (int i = 0; i < nb; i++)
        for (int k = 0; k < K; k++) {
            long r = r0 + i, at = r * G + k / 32;
            uint32_t word = W->packed[(r * K + k) / per_word];
            float q = (float)((word >> (W->bits * (k % per_word))) & mask);
            out[(long)i * K + k] = half_to_float(W->scales[at]) * q + half_to_float(W->biases[at]);
        }
}

typedef void (*block_fn)(const float *, long, int, int, const float *, int, int, float *, long, const char *, long);

static block_fn block_kernel(void) {
#ifdef HAVE_X86_ROWS
    if (isa == 2) return block_product_avx512;
    if (isa == 1) return block_product_avx2;
#endif
    return block_product_c;
}

/* Y[c * ldy + i] = W[i] . (column c of Xt) for W's n rows (ldw floats apart, K of each read), c < cols: BLOCK_ROWS
   rows at a time, each block prefetching the next. */
static void rows_times_columns(const float *W, long ldw, long n, int K, const float *Xt, int ldx, int cols, float *Y,
                               long ldy) {
    block_fn block = block_kernel();
    for (long n0 = 0; n0 < n; n0 += BLOCK_ROWS) {
        int nb = n - n0 < BLOCK_ROWS ? (int)(n - n0) : BLOCK_ROWS;
        long next = n - n0 - nb < BLOCK_ROWS ? n - n0 - nb : BLOCK_ROWS;
        block(W + n0 * ldw, ldw, nb, K, Xt, ldx, cols, Y + n0, ldy, (const char *)(W + (n0 + nb) * ldw), next * ldw * 4);
    }
}

/* Y[r * ldy + n] = W[n] . X[r] (+ bias[n]) for rows [lo, hi) of W (K columns), r < R; `scratch` holds
   BLOCK_ROWS x K floats (a quantized block unpacked). */
static void weight_rows_multi(const weight *W, int K, const float *Xt, int ldx, int R, const float *bias, float *Y,
                              long ldy, long lo, long hi, float *scratch) {
    if (W->w)
        rows_times_columns(W->w + lo * K, K, hi - lo, K, Xt, ldx, R, Y + lo, ldy);
    else {
        block_fn block = block_kernel();
        long row_bytes = (long)K * W->bits / 8;
        for (long n0 = lo; n0 < hi; n0 += BLOCK_ROWS) {
            int nb = hi - n0 < BLOCK_ROWS ? (int)(hi - n0) : BLOCK_ROWS;
#ifdef HAVE_X86_ROWS
            if (isa == 2) unpack_rows_avx512(W, K, n0, nb, scratch);
            else if (isa == 1) unpack_rows_avx2(W, K, n0, nb, scratch);
            else
#endif
                unpack_rows_c(W, K, n0, nb, scratch);
            long next = hi - n0 - nb < BLOCK_ROWS ? hi - n0 - nb : BLOCK_ROWS;
            block(scratch, K, nb, K, Xt, ldx, R, Y + n0, ldy, (const char *)W->packed + (n0 + nb) * row_bytes,
                  next * row_bytes);
        }
    }
    if (bias)
        for (int r = 0; r < R; r++)
            for (long n = lo; n < hi; n++) Y[r * ldy + n] += bias[n];
}

/* Products with one input stacked in rows: thread t of T takes its share of all of them. For several input rows,
   row r of product i is written at y + r * ldy. */
typedef struct {
    const weight *w;
    const float *bias;
    float *y;
    long rows, ldy;
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

/* products_share for R input rows, given transposed (Xt: K x ldx). */
static void products_share_multi(const product *p, int n, int K, const float *Xt, int ldx, int R, float *scratch,
                                 int t, int T) {
    long total = 0;
    for (int i = 0; i < n; i++) total += p[i].rows;
    long lo = total * t / T, hi = total * (t + 1) / T, base = 0;
    for (int i = 0; i < n; base += p[i].rows, i++) {
        long a = lo > base ? lo - base : 0, b = hi - base < p[i].rows ? hi - base : p[i].rows;
        if (a < b) weight_rows_multi(p[i].w, K, Xt, ldx, R, p[i].bias, p[i].y, p[i].ldy, a, b, scratch);
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

VECTOR_CLONES static void swiglu_row(const float *gate, const float *up, float *out, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = silu_times(gate[i], up[i]);
}

/* out[i] = in[i] cos[i] + in[partner[i]] sin[i]: the step's RoPE of q and k (rope_layout). */
VECTOR_CLONES static void rope_row(const float *in, const float *cos, const float *sin, const int *partner,
                                   float *out, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = in[i] * cos[i] + in[partner[i]] * sin[i];
}

/* What a thread keeps of one query head's attention over its key range. */
typedef struct {
    float max, sum;
} running;

typedef struct {
    const step_model *m;
    const float *x_in, *cos, *sin;
    const int *partner;
    int past, threads, rows, ldx; /* rows: positions past .. past + rows - 1; ldx: their transposed inputs' width */
    const int *positions;    /* or, where not NULL, row r at positions[r] (sorted, < past) of a cache holding all */
    const kv_target *kv_out; /* layer l's new keys at kv_out[2 l], its values at kv_out[2 l + 1], ... */
    long kv_at;              /* ... from row kv_at of each target on (with positions: at their positions) */
    float *logits, *stream_out; /* NULL for none */
    float *queries_out;         /* NULL, or each layer's rotated queries (n_layers, rows, n_q * head_dim) */
    float *qkv, *o, *gate_up, *down; /* products shared by the threads, (rows, width) */
    float *attn_rows;                /* several rows: the attention's output (rows, n_q * head_dim) */
    long ld_qkv, ld_dim, ld_gate_up, ld_attn; /* several rows: the shared buffers' row strides (row_stride) */
    running *partial;                /* (threads, n_q) */
    float *partial_pv;               /* (threads, n_q, head_dim) */
    spin_barrier barrier;
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
        rope_row(qk_in, j->cos, j->sin, j->partner, qk, n_qk);
        if (t == 0)
            for (int g = 0; g < n_kv; g++) {
                const kv_target *k_out = &j->kv_out[2 * l], *v_out = &j->kv_out[2 * l + 1];
                memcpy(k_out->out + g * k_out->head_stride + j->kv_at * D, qk + (n_q + g) * D, sizeof(float) * D);
                memcpy(v_out->out + g * v_out->head_stride + j->kv_at * D, j->qkv + n_qk + g * D, sizeof(float) * D);
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
        swiglu_row(j->gate_up, j->gate_up + hidden, act, hidden);
        product down = {&L->down, L->down_bias, j->down, dim};
        products_share(&down, 1, hidden, &act_in, t, T);
        barrier_wait(&j->barrier);
        add_into(x, j->down, dim);
    }
    if (j->stream_out && t == 0) memcpy(j->stream_out, x, sizeof(float) * dim);
    if (!j->logits) return;
    rms_norm(x, m->final_norm, m->eps, h, dim);
    product head = {&m->head, NULL, j->logits, m->vocab};
    products_share(&head, 1, dim, &normed_in, t, T);
}

#ifdef HAVE_X86_ROWS
/* A 16 x 16 block of floats transposed in registers: src's rows (ld apart) become dst's columns (rows ldd apart). */
static inline __attribute__((always_inline, target("avx512f"))) void transpose_16x16(const float *src, long ld,
                                                                                      float *dst, long ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ld);
    for (int i = 0; i < 16; i += 2) { /* per 128-bit lane: pairs of rows interleaved */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* lane j of r[i + c]: column 4j + c of rows i..i+3 */
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) { /* then the lanes: rows 0-7 and 8-15, columns c, c + 8 and c + 4, c + 12 */
        t[c] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0x88), t[c + 4] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0xDD);
        t[c + 8] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0x88);
        t[c + 12] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0xDD);
    }
    for (int c = 0; c < 8; c++) {
        _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88));
        _mm512_storeu_ps(dst + (c + 8) * ldd, _mm512_shuffle_f32x4(t[c], t[c + 8], 0xDD));
    }
}

__attribute__((target("avx512f"))) static void transpose_blocks_avx512(const float *rows, long ld, int R, int n,
                                                                       float *Xt, int ldx) {
    for (int r0 = 0; r0 + 16 <= R; r0 += 16)
        for (int k0 = 0; k0 + 16 <= n; k0 += 16) transpose_16x16(rows + r0 * ld + k0, ld, Xt + (long)k0 * ldx + r0, ldx);
}
#endif

/* rows (R, n; rows ld floats apart) written transposed into Xt (n, ldx). With AVX-512, whole 16 x 16 blocks in
   registers; the rest 16 columns at a time, so that the writes stay in a few cache lines and the reads are
   sequential streams (element by element, the writes missed L1 ~70k times a layer). */
static void transpose_into(const float *rows, long ld, int R, int n, float *Xt, int ldx) {
    int R16 = 0, n16 = 0; /* rows below R16 and columns below n16 done in blocks */
#ifdef HAVE_X86_ROWS
    if (isa == 2) {
        transpose_blocks_avx512(rows, ld, R, n, Xt, ldx);
        R16 = R / 16 * 16, n16 = n / 16 * 16;
    }
#endif
    for (int k0 = 0; k0 < n; k0 += 16) {
        int k1 = k0 + 16 < n ? k0 + 16 : n;
        for (int r = k0 < n16 ? R16 : 0; r < R; r++)
            for (int k = k0; k < k1; k++) Xt[(long)k * ldx + r] = rows[r * ld + k];
    }
}

/* The row stride of a shared buffer of rows n floats wide: whole cache lines, and off multiples of 1 KB. Rows 4 KB
   apart all fall in one L1 set, and a weight block's stores to 32 rows evicted one another (SmolLM2's gate|up rows
   of 3072 floats: 10.7 ms against 8.2 for the tail's gate and up products). */
static long row_stride(long n) {
    n = (n + 15) / 16 * 16;
    return n % 256 ? n : n + 16;
}

/* A thread's scratch for several rows, each array 64-byte aligned (the products' vector loads of split cache
   lines cost twice). */
typedef struct {
    float *x, *xt, *qk, *normed, *row, *unpacked, *rows, *scores, *paired;
    float *qt, *ot, *sums; /* attention_rows' queries (head_dim, ldq) and outputs (2, head_dim, ldq) */
} row_scratch;

/* The next n floats from base + *at, rounded up to whole cache lines (NULL where base is: only counting). */
static float *carve(float *base, long *at, long n) {
    float *p = base ? base + *at : NULL;
    *at += (n + 15) / 16 * 16;
    return p;
}

/* Carves `s` from `base` (NULL: only counts); returns the floats it takes. */
static long carve_rows_scratch(const step_model *m, long keys, int R, int ldx, float *base, row_scratch *s) {
    int n_qk = (m->n_q + m->n_kv) * m->head_dim, wide = m->dim > m->n_q * m->head_dim ? m->dim : m->n_q * m->head_dim;
    long widest = wide > m->hidden ? wide : m->hidden, at = 0;
    s->x = carve(base, &at, (long)R * m->dim), s->xt = carve(base, &at, widest * ldx);
    s->qk = carve(base, &at, (long)R * n_qk), s->normed = carve(base, &at, (long)R * n_qk);
    s->row = carve(base, &at, widest), s->unpacked = carve(base, &at, BLOCK_ROWS * widest);
    long ldq = ((long)R * (m->n_q / m->n_kv) + 15) / 16 * 16; /* query vectors of one kv head, all rows */
    s->rows = carve(base, &at, R * widest), s->scores = carve(base, &at, ldq * row_stride(keys));
    s->qt = carve(base, &at, ldq * m->head_dim), s->ot = carve(base, &at, 2 * ldq * m->head_dim);
    s->sums = carve(base, &at, ldq);
    s->paired = carve(base, &at, widest + widest / 32 + 1);
    return at;
}

/* Qt (D, ldq): column (r - lo) * group + i is row r's query of head g * group + i (rows of n_qk floats in qk). */
static void group_queries(const float *qk, int n_qk, int g, int group, int D, long lo, long hi, float *Qt, int ldq) {
    for (long r = lo; r < hi; r++)
        for (int i = 0; i < group; i++) {
            const float *q = qk + r * n_qk + (g * group + i) * D;
            int c = (int)(r - lo) * group + i;
            for (int d = 0; d < D; d++) Qt[(long)d * ldq + c] = q[d];
        }
}

/* Several rows: thread t's query rows [lo, hi) of one layer (row r: position past + r) over the cache's `past` keys
   and the new rows 0..r (keys RoPE'd in qk, rows of n_qk; values in j->qkv), written into j->attn_rows. Per kv head,
   the scores of all the thread's query vectors (its rows times the group's heads) against the keys read in place, 12
   keys at a time (rows_times_columns with the queries transposed), then P V likewise with P's rows as the weight
   rows. Row by row, each query row read every key again: 32 rows after 2048 cached positions took 146 ms against 94
   this way. `a` holds the thread's queries, scores and outputs. */
static void attention_rows(step_job *j, const step_layer *L, const float *qk, long lo, long hi, const row_scratch *a) {
    const step_model *m = j->m;
    int D = m->head_dim, group = m->n_q / m->n_kv, n_qk = (m->n_q + m->n_kv) * D;
    int nq = (int)(hi - lo) * group, ldq = (nq + 15) / 16 * 16;
    long past = j->past, keys = past + hi, ls = row_stride(keys);
    float *Qt = a->qt, *S = a->scores, *OT = a->ot, *OT2 = OT + (long)D * ldq, *sums = a->sums;
    for (int g = 0; g < m->n_kv; g++) {
        group_queries(qk, n_qk, g, group, D, lo, hi, Qt, ldq);
        if (past > 0) rows_times_columns(L->keys + g * L->k_head, L->k_row, past, D, Qt, ldq, nq, S, ls);
        rows_times_columns(qk + m->n_q * D + g * D, n_qk, hi, D, Qt, ldq, nq, S + past, ls);
        for (int c = 0; c < nq; c++) { /* row lo + c / group sees keys [0, past + row] */
            float *p = S + c * ls;
            long n = past + lo + c / group + 1;
            sums[c] = exp_shifted_sum(p, (int)n, row_max(p, (int)n));
            memset(p + n, 0, sizeof(float) * (keys - n));
        }
        if (past > 0) rows_times_columns(S, ls, nq, (int)past, L->values + g * L->v_head, (int)L->v_row, D, OT, ldq);
        else memset(OT, 0, sizeof(float) * D * ldq);
        rows_times_columns(S + past, ls, nq, (int)hi, j->qkv + n_qk + g * D, (int)j->ld_qkv, D, OT2, ldq);
        for (int c = 0; c < nq; c++) {
            float *o = j->attn_rows + (lo + c / group) * j->ld_attn + (g * group + c % group) * D;
            for (int d = 0; d < D; d++) o[d] = (OT[(long)d * ldq + c] + OT2[(long)d * ldq + c]) / sums[c];
        }
    }
}

/* One pass of attention_rows_at: query rows [lo, hi) against the keys up to positions[hi - 1]. */
static void attention_rows_at_pass(step_job *j, const step_layer *L, const float *qk, long lo, long hi,
                                   const row_scratch *a) {
    const step_model *m = j->m;
    int D = m->head_dim, group = m->n_q / m->n_kv, n_qk = (m->n_q + m->n_kv) * D;
    int nq = (int)(hi - lo) * group, ldq = (nq + 15) / 16 * 16;
    if (nq == 0) return;
    long keys = j->positions[hi - 1] + 1L, ls = row_stride(keys);
    float *Qt = a->qt, *S = a->scores, *OT = a->ot, *sums = a->sums;
    for (int g = 0; g < m->n_kv; g++) {
        group_queries(qk, n_qk, g, group, D, lo, hi, Qt, ldq);
        rows_times_columns(L->keys + g * L->k_head, L->k_row, keys, D, Qt, ldq, nq, S, ls);
        for (int c = 0; c < nq; c++) {
            float *p = S + c * ls;
            long n = j->positions[lo + c / group] + 1L;
            sums[c] = exp_shifted_sum(p, (int)n, row_max(p, (int)n));
            memset(p + n, 0, sizeof(float) * (keys - n));
        }
        rows_times_columns(S, ls, nq, (int)keys, L->values + g * L->v_head, (int)L->v_row, D, OT, ldq);
        for (int c = 0; c < nq; c++) {
            float *o = j->attn_rows + (lo + c / group) * j->ld_attn + (g * group + c % group) * D;
            for (int d = 0; d < D; d++) o[d] = OT[(long)d * ldq + c] / sums[c];
        }
    }
}

#define ROWS_AT_BLOCK 32 /* attention_rows_at's query rows a pass: each pass reads the keys up to its last row's */

/* attention_rows for rows at scattered positions (j->positions) of a cache that holds every position, these rows'
   new keys and values written in already: query row r sees cached keys [0, positions[r]]. Rows [lo, hi) go in
   passes of ROWS_AT_BLOCK, so that rows at early positions do not read the keys of the late ones. */
static void attention_rows_at(step_job *j, const step_layer *L, const float *qk, long lo, long hi,
                              const row_scratch *a) {
    for (long b = lo; b < hi; b += ROWS_AT_BLOCK)
        attention_rows_at_pass(j, L, qk, b, hi - b < ROWS_AT_BLOCK ? hi : b + ROWS_AT_BLOCK, a);
}

/* The first of thread t's T shares of rows at `positions`: row r costs about positions[r] + 1 keys, and each share
   takes about a T-th of the total. */
static long attention_split_at(const int *positions, int R, int t, int T) {
    if (t <= 0) return 0;
    if (t >= T) return R;
    double total = 0.0, acc = 0.0;
    for (int r = 0; r < R; r++) total += positions[r] + 1.0;
    for (int r = 0; r < R; r++) {
        if (acc >= total * t / T) return r;
        acc += positions[r] + 1.0;
    }
    return R;
}

/* The first of thread t's T shares of R query rows after `past` cached positions. attention_rows costs a
   share of rows [lo, hi) about (hi - lo) (past + hi) (all its rows against the keys up to its last), so shares are
   made of about equal such costs: the largest cost c for which the threads, from the last one down, each take as
   many rows as fit in c, still cover all R rows (bisected). By equal rows, the last thread's share cost twice the
   first's from an empty cache. */
static long attention_split(long past, int R, int t, int T) {
    if (t <= 0) return 0;
    if (t >= T) return R;
    double lo_c = 0.0, hi_c = (double)R * (past + R);
    for (int it = 0; it < 40; it++) {
        double c = 0.5 * (lo_c + hi_c);
        long b = R;
        for (int i = T - 1; i >= 0 && b > 0; i--) b -= (long)(c / (past + b)) > 0 ? (long)(c / (past + b)) : 1;
        if (b > 0) lo_c = c;
        else hi_c = c;
    }
    long b = R; /* the boundaries at cost hi_c, from the last thread down to thread t */
    for (int i = T - 1; i >= t; i--) {
        long take = (long)(hi_c / (past + b));
        b -= take > 0 ? take : 1;
    }
    return b > 0 ? b : 0;
}

/* The step over j->rows rows as thread t runs it. Each thread keeps its own residual stream of every row and
   does the elementwise work on all rows; products share out weight rows, attention query rows. */
static void step_thread_rows(step_job *j, int t, float *scratch) {
    const step_model *m = j->m;
    int T = j->threads, D = m->head_dim, n_q = m->n_q, n_kv = m->n_kv, dim = m->dim, hidden = m->hidden;
    int R = j->rows, ldx = j->ldx, n_qk = (n_q + n_kv) * D;
    int wide = dim > n_q * D ? dim : n_q * D, widest = wide > hidden ? wide : hidden;
    row_scratch sc;
    carve_rows_scratch(m, j->past + R, R, ldx, scratch, &sc);
    float *x = sc.x, *xt = sc.xt, *qk = sc.qk, *normed = sc.normed, *row = sc.row, *unpacked = sc.unpacked;
    float *rows = sc.rows, *paired = sc.paired;
    const int *at = j->positions;
    long lo = at ? attention_split_at(at, R, t, T) : attention_split(j->past, R, t, T);
    long hi = at ? attention_split_at(at, R, t + 1, T) : attention_split(j->past, R, t + 1, T);
    memcpy(x, j->x_in, sizeof(float) * R * dim);
    for (int l = 0; l < m->n_layers; l++) {
        const step_layer *L = &m->layers[l];
        for (int r = 0; r < R; r++) rms_norm(x + (long)r * dim, L->input_norm, m->eps, rows + (long)r * dim, dim);
        transpose_into(rows, dim, R, dim, xt, ldx);
        product qkv[3] = {{&L->q, L->q_bias, j->qkv, (long)n_q * D, j->ld_qkv},
                          {&L->k, L->k_bias, j->qkv + n_q * D, (long)n_kv * D, j->ld_qkv},
                          {&L->v, L->v_bias, j->qkv + n_qk, (long)n_kv * D, j->ld_qkv}};
        products_share_multi(qkv, 3, dim, xt, ldx, R, unpacked, t, T);
        barrier_wait(&j->barrier);
        for (int r = 0; r < R; r++) {
            const float *in = j->qkv + r * j->ld_qkv, *cos = j->cos + (long)r * n_qk, *sin = j->sin + (long)r * n_qk;
            float *out = qk + (long)r * n_qk;
            if (L->q_norm) { /* qwen3 */
                for (int i = 0; i < n_q + n_kv; i++)
                    rms_norm(in + i * D, i < n_q ? L->q_norm : L->k_norm, m->qk_eps, normed + (long)r * n_qk + i * D, D);
                in = normed + (long)r * n_qk;
            }
            rope_row(in, cos, sin, j->partner, out, n_qk);
        }
        if (t == 0 && j->queries_out)
            for (int r = 0; r < R; r++)
                memcpy(j->queries_out + ((long)l * R + r) * n_q * D, qk + (long)r * n_qk, sizeof(float) * n_q * D);
        if (t == 0)
            for (int g = 0; g < n_kv; g++) {
                float *k_out = j->kv_out[2 * l].out + g * j->kv_out[2 * l].head_stride;
                float *v_out = j->kv_out[2 * l + 1].out + g * j->kv_out[2 * l + 1].head_stride;
                for (int r = 0; r < R; r++) {
                    long row = at ? at[r] : j->kv_at + r;
                    memcpy(k_out + row * D, qk + (long)r * n_qk + (n_q + g) * D, sizeof(float) * D);
                    memcpy(v_out + row * D, j->qkv + r * j->ld_qkv + n_qk + g * D, sizeof(float) * D);
                }
            }
        if (at) { /* the rows' new keys and values are in the cache the attention reads */
            barrier_wait(&j->barrier);
            attention_rows_at(j, L, qk, lo, hi, &sc);
        } else {
            attention_rows(j, L, qk, lo, hi, &sc);
        }
        barrier_wait(&j->barrier);
        transpose_into(j->attn_rows, j->ld_attn, R, n_q * D, xt, ldx);
        product o = {&L->o, L->o_bias, j->o, dim, j->ld_dim};
        products_share_multi(&o, 1, n_q * D, xt, ldx, R, unpacked, t, T);
        barrier_wait(&j->barrier);
        for (int r = 0; r < R; r++) {
            add_into(x + (long)r * dim, j->o + r * j->ld_dim, dim);
            rms_norm(x + (long)r * dim, L->post_norm, m->eps, rows + (long)r * dim, dim);
        }
        transpose_into(rows, dim, R, dim, xt, ldx);
        product gate_up[2] = {{&L->gate, L->gate_bias, j->gate_up, hidden, j->ld_gate_up},
                              {&L->up, L->up_bias, j->gate_up + hidden, hidden, j->ld_gate_up}};
        products_share_multi(gate_up, 2, dim, xt, ldx, R, unpacked, t, T);
        barrier_wait(&j->barrier);
        for (int r = 0; r < R; r++) {
            const float *gu = j->gate_up + r * j->ld_gate_up;
            swiglu_row(gu, gu + hidden, rows + (long)r * hidden, hidden);
        }
        transpose_into(rows, hidden, R, hidden, xt, ldx);
        product down = {&L->down, L->down_bias, j->down, dim, j->ld_dim};
        products_share_multi(&down, 1, hidden, xt, ldx, R, unpacked, t, T);
        barrier_wait(&j->barrier);
        for (int r = 0; r < R; r++) add_into(x + (long)r * dim, j->down + r * j->ld_dim, dim);
    }
    if (j->stream_out && t == 0) memcpy(j->stream_out, x, sizeof(float) * R * dim);
    if (!j->logits) return;
    /* logits of the last row only */
    rms_norm(x + (long)(R - 1) * dim, m->final_norm, m->eps, row, dim);
    product_input last = {row, paired, paired + widest};
    product head = {&m->head, NULL, j->logits, m->vocab};
    products_share(&head, 1, dim, &last, t, T);
}

/* A kernel's threads: body(job, t, scratch + t * own) on up to `threads` threads, the caller's as t = 0. The workers
   wait until ready(job, n) has been told how many threads run (fewer if the system gives fewer). */
typedef void (*team_body)(void *job, int t, float *scratch);
typedef struct {
    team_body body;
    void *job;
    int index;
    float *scratch;
    atomic_int *go;
} team_member;

static void *team_worker(void *p) {
    team_member *a = p;
    while (!atomic_load_explicit(a->go, memory_order_acquire)) sched_yield();
    a->body(a->job, a->index, a->scratch);
    return NULL;
}

static void run_team(team_body body, void (*ready)(void *job, int n), void *job, int threads, float *scratch,
                     long own) {
    atomic_int go;
    atomic_init(&go, 0);
    team_member members[64];
    for (int i = 1; i < threads && i < 64; i++) members[i - 1] = (team_member){body, job, i, scratch + i * own, &go};
    worker_threads w;
    ready(job, start_workers(&w, threads, team_worker, members, sizeof(team_member)) + 1);
    atomic_store_explicit(&go, 1, memory_order_release);
    body(job, 0, scratch);
    join_workers(&w);
}

static long scratch_floats(const step_model *m, long keys) {
    int n_qk = (m->n_q + m->n_kv) * m->head_dim, wide = m->dim > m->n_q * m->head_dim ? m->dim : m->n_q * m->head_dim;
    long widest = wide > m->hidden ? wide : m->hidden; /* the widest product input, paired (and its sums) */
    return m->dim + wide + 2L * n_qk + (long)m->n_q * m->head_dim + m->hidden + keys * (m->n_q / m->n_kv) +
           widest + widest / 32 + 1;
}

static void step_body(void *job, int t, float *scratch) {
    if (((step_job *)job)->rows > 1) step_thread_rows(job, t, scratch);
    else step_thread(job, t, scratch);
}

static void step_ready(void *job, int n) {
    step_job *j = job;
    j->threads = n;
    j->barrier = (spin_barrier){.threads = n};
    atomic_init(&j->barrier.arrived, 0);
    atomic_init(&j->barrier.generation, 0);
}

/* The products' buffers the threads share, carved from `base` (NULL: only counts); returns the floats they take. */
static long carve_shared(step_job *j, float *base) {
    const step_model *m = j->m;
    long at = 0, rows = j->rows, n_q = (long)m->n_q * m->head_dim;
    j->ld_qkv = row_stride(n_q + 2L * m->n_kv * m->head_dim), j->ld_dim = row_stride(m->dim);
    j->ld_gate_up = row_stride(2L * m->hidden), j->ld_attn = row_stride(n_q);
    j->qkv = carve(base, &at, rows * j->ld_qkv);
    j->o = carve(base, &at, rows * j->ld_dim), j->gate_up = carve(base, &at, rows * j->ld_gate_up);
    j->down = carve(base, &at, rows * j->ld_dim);
    j->partial_pv = j->attn_rows = carve(base, &at, rows > 1 ? rows * j->ld_attn : j->threads * n_q);
    return at;
}

/* The step over `rows` positions past .. past + rows - 1: x_in their residual streams entering m's first layer
   ((rows, dim): token embeddings, or a stream from an earlier model's layers), `past` cached positions, cos and
   sin the RoPE tables of the q and k heads at each position ((rows, (n_q + n_kv) * head_dim), the attention's scale
   folded into q's), partner the rotation's partner of each entry (mlx_kvpred.rope_layout). Writes the new keys and
   values into kv_out (2 n_layers targets: each layer's keys, then its values) from row kv_at on (e.g. a cache's
   buffers from position `past`), the last row's logits (vocab) where `logits` is not NULL, and the residual
   streams leaving the last layer ((rows, dim)) where `stream_out` is not NULL, and each layer's rotated queries
   ((n_layers, rows, n_q * head_dim), q's tables' scale in them) where `queries_out` is not NULL.
   With `positions` (rows > 1; sorted, each < past): row r is at positions[r] of layers whose caches (the layers'
   keys and values, which kv_out must point at too) hold all `past` positions; its keys and values replace what
   they hold there (kv_at unread), and it attends to positions 0 .. positions[r] (kvp's exact keep).
   0 on success, 1 if scratch memory was not had, 2 for quantized weights where decode_quantized_supported() is 0
   (nothing written either way). One row is a decode step: attention split by key range, one-row products. */
int decode_rows(const step_model *m, const float *x_in, int rows, int past, const int *positions, const float *cos,
                const float *sin, const int *partner, const kv_target *kv_out, long kv_at, float *logits,
                float *stream_out, float *queries_out) {
    decode_isa(-1);
    int quantized = logits && !m->head.w;
    for (int l = 0; l < m->n_layers; l++) {
        const step_layer *L = &m->layers[l];
        quantized |= !L->q.w || !L->k.w || !L->v.w || !L->o.w || !L->gate.w || !L->up.w || !L->down.w;
    }
    if (quantized && !quantized_supported()) return 2;
    if (rows < 1 || (positions && rows < 2)) return 1;
    int threads = max_threads(), ldx = rows == 1 ? 1 : (rows + 15) / 16 * 16;
    row_scratch counted;
    long own = rows > 1 ? carve_rows_scratch(m, past + (long)rows, rows, ldx, NULL, &counted) : scratch_floats(m, past + 1L);
    own = (own + 15) / 16 * 16;
    step_job j = {m, x_in, cos, sin, partner, past, threads, rows, ldx, positions, kv_out, kv_at, logits, stream_out,
                  queries_out};
    long shared = carve_shared(&j, NULL);
    float *buffer = aligned_alloc(64, sizeof(float) * (shared + threads * own)), *scratch = buffer + shared;
    if (!buffer) return 1;
    carve_shared(&j, buffer);
    running *partial = malloc(sizeof(running) * threads * m->n_q);
    if (!partial) {
        free(buffer);
        return 1;
    }
    j.partial = partial;
    run_team(step_body, step_ready, &j, threads, scratch, own);
    free(buffer), free(partial);
    return 0;
}

/* One decode step: decode_rows of one row (x_in the token's embedding, tables of one row). */
int decode_step(const step_model *m, const float *x_in, int past, const float *cos, const float *sin,
                const int *partner, const kv_target *kv_out, long kv_at, float *logits) {
    return decode_rows(m, x_in, 1, past, NULL, cos, sin, partner, kv_out, kv_at, logits, NULL, NULL);
}

/* KV prediction of several rows (predictor.py, input "hidden": every learned transform stacked in one weight),
   written straight into cache buffers: the aux's residual streams are normed, the previous row's normed stream
   projected (prev_dim > 0) and appended, the stacked product taken BLOCK_ROWS weight rows at a time (as the several
   rows' products above), and each head's rows stored in place, keys RoPE'd on the way. */
typedef struct {
    int dim, prev_dim, head_dim, n_kv, n_parts; /* the weight's rows: n_parts parts (a layer's keys or values) */
    float eps;
    const float *norm;      /* the aux's final RMSNorm weight (dim) */
    const float *prev_proj; /* (prev_dim, dim), or NULL for prev_dim 0 */
    const float *weight;    /* (n_parts * n_kv * head_dim, dim + prev_dim), float32 */
    const float *bias;      /* (n_parts * n_kv * head_dim) */
} kv_predictor;

typedef struct {
    const kv_predictor *p;
    const float *stream, *prev; /* (rows, dim) the aux's residual streams; (dim) the row before's normed, or NULL */
    int rows, threads, ldx;
    const kv_target *targets;
} predict_job;

#define PREDICT_UNITS 6 /* heads (of head_dim weight rows) per product: their rows of outputs stay in L2 */

/* A thread's scratch for predict_kv_rows: the rows normed (the row before first), their transposed inputs, the rows
   before transposed and their projections, and a product's outputs. */
typedef struct {
    float *normed, *xt, *shifted, *projected, *y;
} predict_scratch;

/* Carves `s` from `base` (NULL: only counts); returns the floats it takes. */
static long carve_predict_scratch(const kv_predictor *p, int R, int ldx, float *base, predict_scratch *s) {
    long at = 0;
    s->normed = carve(base, &at, (long)(R + 1) * p->dim), s->xt = carve(base, &at, (long)(p->dim + p->prev_dim) * ldx);
    s->shifted = carve(base, &at, (long)p->dim * ldx), s->projected = carve(base, &at, (long)R * p->prev_dim);
    s->y = carve(base, &at, (long)R * row_stride((long)PREDICT_UNITS * p->head_dim));
    return at;
}

/* Thread t's heads of all parts (whole heads, so that RoPE's partners are its own): every thread norms and
   transposes all rows itself (as step_thread_rows does), then takes PREDICT_UNITS heads at a time. */
static void predict_thread(void *job, int t, float *scratch) {
    const predict_job *j = job;
    const kv_predictor *p = j->p;
    int R = j->rows, dim = p->dim, D = p->head_dim, ldx = j->ldx, in = dim + p->prev_dim;
    long units = (long)p->n_parts * p->n_kv, lo = units * t / j->threads, hi = units * (t + 1) / j->threads;
    int ldy = (int)row_stride((long)PREDICT_UNITS * D);
    predict_scratch sc;
    carve_predict_scratch(p, R, ldx, scratch, &sc);
    float *normed = sc.normed, *xt = sc.xt, *y = sc.y;
    if (j->prev) memcpy(normed, j->prev, sizeof(float) * dim);
    else memset(normed, 0, sizeof(float) * dim);
    for (int r = 0; r < R; r++) rms_norm(j->stream + (long)r * dim, p->norm, p->eps, normed + (long)(r + 1) * dim, dim);
    transpose_into(normed + dim, dim, R, dim, xt, ldx);
    if (p->prev_dim) { /* the previous row's projection, below the rows' own inputs */
        transpose_into(normed, dim, R, dim, sc.shifted, ldx);
        rows_times_columns(p->prev_proj, dim, p->prev_dim, dim, sc.shifted, ldx, R, sc.projected, p->prev_dim);
        transpose_into(sc.projected, p->prev_dim, R, p->prev_dim, xt + (long)dim * ldx, ldx);
    }
    for (long u0 = lo; u0 < hi; u0 += PREDICT_UNITS) {
        long u1 = hi - u0 < PREDICT_UNITS ? hi : u0 + PREDICT_UNITS, n = (u1 - u0) * D;
        rows_times_columns(p->weight + u0 * D * in, in, n, in, xt, ldx, R, y, ldy);
        for (long u = u0; u < u1; u++) {
            const kv_target *g = &j->targets[u / p->n_kv];
            const float *bias = p->bias + u * D;
            float *out = g->out + (u % p->n_kv) * g->head_stride;
            for (int r = 0; r < R; r++) {
                float *src = y + (long)r * ldy + (u - u0) * D;
                add_into(src, bias, D);
                if (g->cos) rope_row(src, g->cos + (long)r * D, g->sin + (long)r * D, g->partner, out + (long)r * D, D);
                else memcpy(out + (long)r * D, src, sizeof(float) * D);
            }
        }
    }
}

static void predict_ready(void *job, int n) { ((predict_job *)job)->threads = n; }

/* The predicted keys and values of `rows` positions from the aux's residual streams `stream` ((rows, dim) before its
   final norm), `prev` the normed stream of the position before (NULL: none, zeros), into p->n_parts targets on all
   cores. 0 on success, 1 if scratch memory was not had. */
int predict_kv_rows(const kv_predictor *p, const float *stream, const float *prev, int rows, const kv_target *targets) {
    decode_isa(-1);
    if (rows < 1) return 1;
    int threads = max_threads(), ldx = (rows + 15) / 16 * 16;
    predict_scratch counted;
    long own = (carve_predict_scratch(p, rows, ldx, NULL, &counted) + 15) / 16 * 16;
    float *scratch = aligned_alloc(64, sizeof(float) * threads * own);
    if (!scratch) return 1;
    predict_job j = {p, stream, prev, rows, threads, ldx, targets};
    run_team(predict_thread, predict_ready, &j, threads, scratch, own);
    free(scratch);
    return 0;
}

/* One row's product with a weight the step does not otherwise read: the LM head of a model whose blocks run in MLX
   (gemma3's tied 262k x 640 embedding, kept as the GGUF's 8-bit values), its rows split over all cores. */
typedef struct {
    const weight *W;
    int K, threads;
    long n;
    product_input in;
    float *y;
} rows_job;

static void rows_thread(void *job, int t, float *scratch) {
    (void)scratch;
    const rows_job *j = job;
    long lo = j->n * t / j->threads / 4 * 4, hi = t == j->threads - 1 ? j->n : j->n * (t + 1) / j->threads / 4 * 4;
    weight_rows(j->W, j->K, &j->in, NULL, j->y, lo, hi);
}

static void rows_ready(void *job, int n) { ((rows_job *)job)->threads = n; }

/* y (n) = W x, W (n, K) float32 or quantized (K a multiple of 32), on all cores. 0 on success, 1 if scratch memory
   was not had, 2 for a quantized W where decode_quantized_supported() is 0. */
int weight_times_row(const weight *W, int K, long n, const float *x, float *y) {
    decode_isa(-1);
    if (!W->w && !quantized_supported()) return 2;
    float *paired = aligned_alloc(64, sizeof(float) * ((K + K / 32 + 15) / 16 * 16));
    if (!paired) return 1;
    rows_job j = {W, K, max_threads(), n, {x, paired, paired + K}, y};
    prepare_input(&j.in, K);
    run_team(rows_thread, rows_ready, &j, j.threads, paired, 0);
    free(paired);
    return 0;
}

/* The importance of prompt positions by the attention the last w positions pay them in each layer (kvp's exact
   keep and SpecPrefill: importance.attention_scores, which is the reference): per layer and query head, each
   query's softmax over the keys it sees, averaged over `pool` neighbouring positions (zeros past the ends), the
   maximum over layers and heads, then the mean over the w queries. */
typedef struct {
    const float *q;    /* (n_q, w, head_dim): the rotated queries of the last w of S positions */
    const float *keys; /* head g's key of position s at keys + g * k_head + s * k_row */
    long k_head, k_row;
    float scale;
    long window; /* positions a query sees, its own included (0: all before it) */
} importance_layer;

typedef struct {
    const importance_layer *layers;
    int n_layers, n_q, n_kv, head_dim, w, pool, threads;
    long S, end;
} importance_job;

/* Thread t's scratch: its running maximum M (w, end), the queries transposed, the scores, a padded row and
   its sums. */
static long importance_scratch(const importance_job *j, float *base, float **M, float **Qt, float **scores,
                               float **padded) {
    int nq = j->n_q / j->n_kv * j->w, ldq = (nq + 15) / 16 * 16;
    long at = 0;
    *M = carve(base, &at, (long)j->w * j->end), *Qt = carve(base, &at, (long)j->head_dim * ldq);
    *scores = carve(base, &at, ldq * row_stride(j->S)), *padded = carve(base, &at, 2 * (j->end + j->pool + 16));
    return at;
}

/* M[i] = max(M[i], the mean of padded[i .. i + pool - 1]) for i < end; sums (end) is scratch. */
VECTOR_CLONES static void smoothed_max(const float *padded, int pool, long end, float *sums, float *M) {
    memcpy(sums, padded, sizeof(float) * end);
    for (int k = 1; k < pool; k++) {
#pragma omp simd
        for (long i = 0; i < end; i++) sums[i] += padded[i + k];
    }
    float inv = 1.0f / pool;
#pragma omp simd
    for (long i = 0; i < end; i++) M[i] = sums[i] * inv > M[i] ? sums[i] * inv : M[i];
}

VECTOR_CLONES static void scaled_copy(const float *x, float scale, long n, float *out) {
#pragma omp simd
    for (long i = 0; i < n; i++) out[i] = x[i] * scale;
}

static void importance_thread(void *job, int t, float *scratch) {
    const importance_job *j = job;
    int D = j->head_dim, group = j->n_q / j->n_kv, w = j->w, nq = group * w, ldq = (nq + 15) / 16 * 16;
    int half = j->pool / 2;
    long S = j->S, end = j->end, ls = row_stride(S);
    float *M, *Qt, *Sc, *padded;
    importance_scratch(j, scratch, &M, &Qt, &Sc, &padded);
    memset(M, 0, sizeof(float) * w * end);
    for (int item = t; item < j->n_layers * j->n_kv; item += j->threads) {
        const importance_layer *L = &j->layers[item / j->n_kv];
        int g = item % j->n_kv;
        for (int i = 0; i < group; i++) /* column i * w + r: head g * group + i, query r */
            for (int r = 0; r < w; r++) {
                const float *q = L->q + ((long)(g * group + i) * w + r) * D;
                for (int d = 0; d < D; d++) Qt[(long)d * ldq + i * w + r] = q[d] * L->scale;
            }
        rows_times_columns(L->keys + g * L->k_head, L->k_row, S, D, Qt, ldq, nq, Sc, ls);
        for (int c = 0; c < nq; c++) {
            long own = S - w + c % w, lo = L->window && own + 1 > L->window ? own + 1 - L->window : 0;
            float *p = Sc + c * ls + lo;
            float sum = exp_shifted_sum(p, (int)(own + 1 - lo), row_max(p, (int)(own + 1 - lo)));
            long stop = own + 1 < end ? own + 1 : end; /* positions [lo, stop) have a probability below end */
            memset(padded, 0, sizeof(float) * (end + j->pool));
            if (stop > lo) scaled_copy(p, 1.0f / sum, stop - lo, padded + half + lo);
            smoothed_max(padded, j->pool, end, padded + end + j->pool + 16, M + (long)(c % w) * end);
        }
    }
}

static void importance_ready(void *job, int n) { ((importance_job *)job)->threads = n; }

/* out (end) = the importance of positions [0, end) of S (the w queries are the last w positions), from
   n_layers layers of n_q query heads over n_kv key heads of head_dim. 0 on success, 1 if scratch memory was not
   had. */
int tail_importance(const importance_layer *layers, int n_layers, int n_q, int n_kv, int head_dim, int w, long S,
                    long end, int pool, float *out) {
    decode_isa(-1);
    if (n_layers < 1 || w < 1 || end < 1 || end > S || w > S || pool < 1 || n_q % n_kv) return 1;
    importance_job j = {layers, n_layers, n_q, n_kv, head_dim, w, pool, max_threads(), S, end};
    float *M, *Qt, *Sc, *padded;
    long own = (importance_scratch(&j, NULL, &M, &Qt, &Sc, &padded) + 15) / 16 * 16;
    float *scratch = aligned_alloc(64, sizeof(float) * j.threads * own);
    if (!scratch) return 1;
    run_team(importance_thread, importance_ready, &j, j.threads, scratch, own);
    for (long s = 0; s < end; s++) { /* the maximum over the threads' shares, the mean over the queries */
        float total = 0.0f;
        for (int r = 0; r < j.w; r++) {
            float m = 0.0f;
            for (int t = 0; t < j.threads; t++) {
                float v = scratch[t * own + (long)r * end + s];
                m = v > m ? v : m;
            }
            total += m;
        }
        out[s] = total / j.w;
    }
    free(scratch);
    return 0;
}
