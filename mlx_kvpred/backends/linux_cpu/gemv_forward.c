/* cblas_sgemm that sends one-row and one-column products to cblas_sgemv. OpenBLAS before 0.3.27 (Debian 12 has
   0.3.21) runs them as a GEMM that packs the whole weight matrix first, at half of sgemv's memory bandwidth: that
   is every matmul of a decode step. mlx_kvpred.blas loads this with RTLD_GLOBAL ahead of the real BLAS, so MLX's
   calls land here; gemv_forward_init then loads the real BLAS and takes its own functions from it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static int enabled = 1;
static long forwarded;

/* Load the real BLAS at `path` (RTLD_GLOBAL: it serves every other BLAS/LAPACK call); its symbols carry `prefix`
   ("" for a system OpenBLAS, "scipy_" for PyPI's scipy-openblas32, whose every symbol MLX would not find alone);
   0 on success. */
int gemv_forward_init(const char *path, const char *prefix) {
    char name[64];
    void *lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!lib) return 1;
    snprintf(name, sizeof name, "%scblas_sgemm", prefix);
    real_sgemm = (sgemm_fn)dlsym(lib, name);
    snprintf(name, sizeof name, "%scblas_sgemv", prefix);
    real_sgemv = (sgemv_fn)dlsym(lib, name);
    return real_sgemm && real_sgemv ? 0 : 2;
}

/* Turn forwarding on or off (1/0) for side-by-side timing; returns the previous setting. */
int gemv_forward_enable(int on) {
    int was = enabled;
    enabled = on;
    return was;
}

/* How many products went to sgemv so far. */
long gemv_forward_count(void) { return forwarded; }

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    if (!real_sgemm) real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");  /* never initialized */
    if (enabled && real_sgemv && order == RowMajor && K > 0) {
        if (M == 1 && N > 1) { /* C (1 x N) = a op(B): y = op(B)^T a, over B as stored */
            int inc_a = ta == NoTrans ? 1 : lda;
            forwarded++;
            if (tb == NoTrans) real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
            else real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
            return;
        }
        if (N == 1 && M > 1) { /* C (M x 1) = op(A) b */
            int inc_b = tb == NoTrans ? ldb : 1;
            forwarded++;
            if (ta == NoTrans) real_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
            else real_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
            return;
        }
    }
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
