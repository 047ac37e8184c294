#include "gemm_cpu.h"

#include <cblas.h>

#include "bf16.h"

/* Tile bounds (elements of C along one dimension): at most about four tiles per dimension for
 * mid-sized outputs, never narrower than SY_GEMM_TILE_MIN (OpenBLAS's per-call packing then
 * costs little against the tile's arithmetic) nor wider than SY_GEMM_TILE_MAX (large GEMMs
 * still yield enough tiles to share out). Multiples of SY_GEMM_TILE_ALIGN keep tile edges on
 * the kernels' register-block boundaries. */
#define SY_GEMM_TILE_MIN 64
#define SY_GEMM_TILE_MAX 512
#define SY_GEMM_TILE_ALIGN 32
#define SY_GEMM_TILES_PER_DIM 4

static int tile_len(int n) {
    if (n <= SY_GEMM_TILE_MIN) return n > 0 ? n : 1;
    int t = (n + SY_GEMM_TILES_PER_DIM - 1) / SY_GEMM_TILES_PER_DIM;
    t = (t + SY_GEMM_TILE_ALIGN - 1) / SY_GEMM_TILE_ALIGN * SY_GEMM_TILE_ALIGN;
    if (t < SY_GEMM_TILE_MIN) t = SY_GEMM_TILE_MIN;
    if (t > SY_GEMM_TILE_MAX) t = SY_GEMM_TILE_MAX;
    return t;
}

sy_gemm_tiles sy_sgemm_tiling(int M, int N, int K) {
    (void)K;
    return (sy_gemm_tiles){.mt = tile_len(M), .nt = tile_len(N)};
}

void sy_sgemm(bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc, bool round_bf16) {
    if (M <= 0 || N <= 0) return;
    const sy_gemm_tiles tl = sy_sgemm_tiling(M, N, K);
    const int tm = (M + tl.mt - 1) / tl.mt, tn = (N + tl.nt - 1) / tl.nt;
    const int ntiles = tm * tn;
    /* OpenBLAS (OpenMP build) runs single-threaded inside an active parallel region, or when
     * the OpenMP thread count is 1: every tile below is one single-threaded call. */
#pragma omp parallel for schedule(static)
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
        if (round_bf16)
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                    c[(size_t)i * ldc + j] = sy_round_bf16(c[(size_t)i * ldc + j]);
    }
}
