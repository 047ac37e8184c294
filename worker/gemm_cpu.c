#include "gemm_cpu.h"

#include <cblas.h>

#include "bf16.h"

/* Tiles along one dimension of C: a dimension under SY_GEMM_TILE_SPLIT is one tile; up to
 * 2·SY_GEMM_TILE_CAP it is halved (so mid-sized GEMMs still use two threads); beyond, it is cut
 * into tiles of at most SY_GEMM_TILE_CAP. Tiles are as even as the dimension allows, rounded up
 * to a multiple of SY_GEMM_TILE_ALIGN (the kernels' register blocks). Each tile is a separate
 * OpenBLAS call that packs its own (mt + nt)·K panel floats for mt·nt·K multiply-adds, so tiles
 * must stay large: the cost of invariance is that repacking (docs/performance.md). */
#ifndef SY_GEMM_TILE_CAP
#define SY_GEMM_TILE_CAP 512
#endif
#define SY_GEMM_TILE_SPLIT 256
#define SY_GEMM_TILE_ALIGN 32

static int tile_len(int n) {
    if (n < SY_GEMM_TILE_SPLIT) return n > 0 ? n : 1;
    const int k = n <= 2 * SY_GEMM_TILE_CAP ? 2 : (n + SY_GEMM_TILE_CAP - 1) / SY_GEMM_TILE_CAP;
    const int t = (n + k - 1) / k;
    return (t + SY_GEMM_TILE_ALIGN - 1) / SY_GEMM_TILE_ALIGN * SY_GEMM_TILE_ALIGN;
}

sy_gemm_tiles sy_sgemm_tiling(int M, int N, int K) {
    (void)K;
    return (sy_gemm_tiles){.mt = tile_len(M), .nt = tile_len(N)};
}

static void epilogue(float *c, int ldc, int m, int n, const sy_gemm_epilogue *epi, int i0,
                     int j0) {
    if (epi->round_bf16)
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                c[(size_t)i * ldc + j] = sy_round_bf16(c[(size_t)i * ldc + j]);
    if (epi->acc)
        for (int i = 0; i < m; i++) {
            double *a = epi->acc + (size_t)(i0 + i) * epi->ldacc + j0;
            const float *ci = c + (size_t)i * ldc;
#pragma omp simd
            for (int j = 0; j < n; j++) a[j] += ci[j];
        }
}

void sy_sgemm_ex(bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc,
                 const sy_gemm_epilogue *epi) {
    if (M <= 0 || N <= 0) return;
    const sy_gemm_tiles tl = sy_sgemm_tiling(M, N, K);
    const int tm = (M + tl.mt - 1) / tl.mt, tn = (N + tl.nt - 1) / tl.nt;
    const int ntiles = tm * tn;
    /* OpenBLAS (OpenMP build) runs single-threaded inside an active parallel region, or when
     * the OpenMP thread count is 1: every tile below is one single-threaded call. Dynamic
     * scheduling balances ragged tiles; a tile's result does not depend on its thread. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < ntiles; t++) {
        const int i0 = (t / tn) * tl.mt, j0 = (t % tn) * tl.nt;
        const int m = M - i0 < tl.mt ? M - i0 : tl.mt;
        const int n = N - j0 < tl.nt ? N - j0 : tl.nt;
        const float *a = ta ? A + i0 : A + (size_t)i0 * lda;
        const float *b = tb ? B + (size_t)j0 * ldb : B + j0;
        float *c = C + (size_t)i0 * ldc + j0;
        if (K > 0) {
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
                        tb ? CblasTrans : CblasNoTrans, m, n, K, alpha, a, lda, b, ldb, beta, c,
                        ldc);
        } else {
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                    c[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[(size_t)i * ldc + j];
        }
        if (epi) epilogue(c, ldc, m, n, epi, i0, j0);
    }
}

void sy_sgemm(bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc, bool round_bf16) {
    const sy_gemm_epilogue epi = {.round_bf16 = round_bf16};
    sy_sgemm_ex(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, round_bf16 ? &epi : NULL);
}
