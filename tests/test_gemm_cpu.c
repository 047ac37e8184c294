/* src/backend/gemm_cpu: sy_sgemm equals an fp64 reference within fp32 tolerance, and gives the same
 * bits for 1, 2, 3 and 4 threads on every shape tried, including shapes whose last tile is
 * ragged in either dimension, both transpositions, beta 0 and 1, and bf16 rounding. Also the
 * backend's matmul and cross-entropy ops (what training calls) at 1-4 threads. This holds on
 * whichever OpenBLAS kernel family the machine picks: run it under OPENBLAS_CORETYPE=Haswell on
 * an AVX-512 machine to see the AVX2 kernels (never set in CI). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "backend/backend.h"
#include "backend/cpu_setup.h"
#include "backend/gemm_cpu.h"
#include "sy_test.h"

static uint64_t g_rs = 0x9e3779b97f4a7c15ULL;
static float xs_rand(void) { /* xorshift64*, uniform in [-1, 1) */
    g_rs ^= g_rs >> 12, g_rs ^= g_rs << 25, g_rs ^= g_rs >> 27;
    return (float)((double)((g_rs * 0x2545F4914F6CDD1DULL) >> 11) * 0x1.0p-52 - 1.0);
}
static float *rnd(size_t n) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = xs_rand();
    return p;
}

typedef struct {
    int M, N, K;
} shape;

/* ragged last tiles in M and N (tiles are multiples of 32, at least 64), degenerate sizes, and
 * the shapes the tiny model and the Switch benchmark use */
static const shape k_shapes[] = {
    {1, 1, 1},     {3, 5, 7},      {64, 64, 64},   {65, 63, 17},   {257, 131, 129},
    {517, 301, 96}, {1024, 384, 128}, {1024, 128, 512}, {131, 512, 128}, {512, 128, 1024},
    {300, 2048, 512}, {2050, 100, 33},
};

static void reference(bool ta, bool tb, const shape *s, float alpha, const float *A,
                      const float *B, float beta, const float *C0, double *out) {
    const int M = s->M, N = s->N, K = s->K;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) {
                double a = ta ? A[(size_t)k * M + i] : A[(size_t)i * K + k];
                double b = tb ? B[(size_t)j * K + k] : B[(size_t)k * N + j];
                acc += a * b;
            }
            out[(size_t)i * N + j] = alpha * acc + beta * C0[(size_t)i * N + j];
        }
}

static void test_sgemm_threads(void **state) {
    (void)state;
    for (size_t si = 0; si < sizeof k_shapes / sizeof k_shapes[0]; si++) {
        const shape *s = &k_shapes[si];
        const size_t nc = (size_t)s->M * s->N;
        float *A = rnd((size_t)s->M * s->K), *B = rnd((size_t)s->K * s->N), *C0 = rnd(nc);
        float *C1 = malloc(sizeof(float) * nc), *Ct = malloc(sizeof(float) * nc);
        double *ref = malloc(sizeof(double) * nc);
        assert_true(C1 && Ct && ref);
        for (int v = 0; v < 8; v++) {
            const bool ta = v & 1, tb = v & 2, bf = v & 4;
            const float beta = (v % 3 == 0) ? 0.0f : 1.0f;
            const int lda = ta ? s->M : s->K, ldb = tb ? s->K : s->N;
            for (int th = 1; th <= 4; th++) {
                omp_set_num_threads(th);
                float *C = th == 1 ? C1 : Ct;
                memcpy(C, C0, sizeof(float) * nc);
                sy_sgemm(ta, tb, s->M, s->N, s->K, 1.0f, A, lda, B, ldb, beta, C, s->N, bf);
                if (th > 1 && memcmp(C1, Ct, sizeof(float) * nc) != 0) {
                    size_t i = 0;
                    while (C1[i] == Ct[i]) i++;
                    fail_msg("sgemm %dx%dx%d ta=%d tb=%d beta=%g bf16=%d: %d threads differ from 1 at "
                             "element %zu (%.9g vs %.9g)", s->M, s->N, s->K, ta, tb, beta, bf, th, i,
                             Ct[i], C1[i]);
                }
            }
            reference(ta, tb, s, 1.0f, A, B, beta, C0, ref);
            /* fp32 accumulation over K terms of size <= 1: |err| <= K·2^-23·Σ|a·b| + rounding;
             * bf16 output rounding adds 2^-8 relative */
            const double rtol = bf ? 8e-3 : 1e-5, atol = bf ? 1e-2 : 1e-5 * (s->K + 1);
            for (size_t i = 0; i < nc; i++)
                if (!(fabs(C1[i] - ref[i]) <= atol + rtol * fabs(ref[i])))
                    fail_msg("sgemm %dx%dx%d ta=%d tb=%d bf16=%d: element %zu = %.9g, fp64 %.9g", s->M,
                             s->N, s->K, ta, tb, bf, i, C1[i], ref[i]);
        }
        free(A), free(B), free(C0), free(C1), free(Ct), free(ref);
    }
}

static void test_tiling_is_shape_only(void **state) {
    (void)state;
    /* the tiling must not change with the thread count; tiles cover C exactly */
    for (size_t si = 0; si < sizeof k_shapes / sizeof k_shapes[0]; si++) {
        const shape *s = &k_shapes[si];
        omp_set_num_threads(1);
        sy_gemm_tiles a = sy_sgemm_tiling(s->M, s->N, s->K);
        omp_set_num_threads(4);
        sy_gemm_tiles b = sy_sgemm_tiling(s->M, s->N, s->K);
        assert_int_equal(a.mt, b.mt);
        assert_int_equal(a.nt, b.nt);
        assert_true(a.mt >= 1 && a.nt >= 1);
    }
}

/* The tiles sy_sgemm uses (on SkylakeX kernels larger than the pinned ones, gemm_cpu.c) give
 * the same bits as the pinned tiling, each pinned tile one single-threaded cblas_sgemm: on
 * every kernel family, with and without the scratch-tile fp64 accumulation. The shapes are the
 * Switch benchmark's expert GEMMs (forward, backward, weight gradients) and ragged ones. */
static void test_tiles_match_pinned(void **state) {
    (void)state;
    typedef struct {
        bool ta, tb;
        int M, N, K;
        bool acc;
    } gcase;
    static const gcase k_cases[] = {
        {0, 1, 261, 2048, 512, 0}, {0, 1, 286, 512, 2048, 0}, {0, 0, 246, 2048, 512, 0},
        {0, 0, 320, 512, 2048, 0}, {1, 0, 512, 2048, 261, 1}, {1, 0, 2048, 512, 286, 1},
        {0, 1, 1000, 999, 300, 0}, {1, 1, 777, 555, 333, 1},  {0, 0, 3000, 70, 200, 0},
        {1, 0, 1030, 1500, 97, 1},
    };
    int grown = 0;
    for (size_t ci = 0; ci < sizeof k_cases / sizeof k_cases[0]; ci++) {
        const gcase *g = &k_cases[ci];
        const int M = g->M, N = g->N, K = g->K, lda = g->ta ? M : K, ldb = g->tb ? K : N;
        const size_t nc = (size_t)M * N;
        float *A = rnd((size_t)M * K), *B = rnd((size_t)K * N);
        float *Cp = calloc(nc, sizeof(float)), *Cg = calloc(nc, sizeof(float));
        double *acc = calloc(nc, sizeof(double));
        assert_true(Cp && Cg && acc);
        const sy_gemm_tiles pin = sy_sgemm_tiling_pinned(M, N, K);
        const sy_gemm_tiles use = sy_sgemm_tiling_ex(M, N, K, g->acc);
        grown += use.mt != pin.mt || use.nt != pin.nt;
        omp_set_num_threads(1);
        for (int i0 = 0; i0 < M; i0 += pin.mt)
            for (int j0 = 0; j0 < N; j0 += pin.nt) {
                const int m = M - i0 < pin.mt ? M - i0 : pin.mt, n = N - j0 < pin.nt ? N - j0 : pin.nt;
                cblas_sgemm(CblasRowMajor, g->ta ? CblasTrans : CblasNoTrans,
                            g->tb ? CblasTrans : CblasNoTrans, m, n, K, 1.0f,
                            g->ta ? A + i0 : A + (size_t)i0 * lda, lda,
                            g->tb ? B + (size_t)j0 * ldb : B + j0, ldb, 0.0f, Cp + (size_t)i0 * N + j0, N);
            }
        omp_set_num_threads(2);
        const sy_gemm_epilogue epi = {.acc = acc, .ldacc = N, .c_scratch = true};
        sy_sgemm_ex(g->ta, g->tb, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, Cg, N, g->acc ? &epi : NULL);
        for (size_t i = 0; i < nc; i++) {
            const bool same = g->acc ? acc[i] == (double)Cp[i] : memcmp(&Cg[i], &Cp[i], sizeof(float)) == 0;
            if (!same)
                fail_msg("sgemm %dx%dx%d ta=%d tb=%d acc=%d on %s kernels: tiles %dx%d differ from the "
                         "pinned %dx%d at element %zu (%.9g vs %.9g)", M, N, K, g->ta, g->tb, g->acc,
                         sy_cpu_blas_core(), use.mt, use.nt, pin.mt, pin.nt, i,
                         g->acc ? acc[i] : (double)Cg[i], (double)Cp[i]);
        }
        free(A), free(B), free(Cp), free(Cg), free(acc);
    }
    /* not vacuous where the tiles grow: the Switch shapes do on SkylakeX */
    if (strcasecmp(sy_cpu_blas_core(), "SkylakeX") == 0) assert_true(grown >= 6);
    else assert_int_equal(grown, 0);
}

/* The backend ops training runs (matmul fwd/bwd with weight-gradient accumulation, in fp32 and
 * bf16 emulation; cross-entropy with its fp64 total) are thread-count invariant too. */
static void test_backend_ops_threads(void **state) {
    (void)state;
    const int N = 517, in = 131, out = 300, V = 259;
    float *x = rnd((size_t)N * in), *W = rnd((size_t)out * in), *dy = rnd((size_t)N * out);
    float *lg = rnd((size_t)N * V);
    int32_t *tg = malloc(sizeof(int32_t) * N);
    assert_non_null(tg);
    for (int i = 0; i < N; i++) tg[i] = (i * 37) % V;
    const size_t ny = sizeof(float) * (size_t)N * out, ndx = sizeof(float) * (size_t)N * in,
                 ndW = sizeof(float) * (size_t)out * in, ndl = sizeof(float) * (size_t)N * V;
    for (int bf = 0; bf < 2; bf++) {
        /* outputs downloaded to host: [0] with 1 thread, [1] with th threads */
        float *y[2], *dx[2], *dW[2], *dl[2];
        for (int k = 0; k < 2; k++) {
            y[k] = malloc(ny), dx[k] = malloc(ndx), dW[k] = malloc(ndW), dl[k] = malloc(ndl);
            assert_true(y[k] && dx[k] && dW[k] && dl[k]);
        }
        double xe1 = 0.0;
        for (int th = 1; th <= 4; th++) {
            sy_backend_t *be = NULL;
            assert_int_equal(sy_backend_cpu_new(th, bf, &be), SY_OK);
            float *bx = sy_test_upload_new(be, x, ndx), *bW = sy_test_upload_new(be, W, ndW);
            float *bdy = sy_test_upload_new(be, dy, ny), *blg = sy_test_upload_new(be, lg, ndl);
            int32_t *btg = sy_test_upload_new(be, tg, sizeof(int32_t) * N);
            float *by = sy_test_upload_new(be, NULL, ny), *bdx = sy_test_upload_new(be, NULL, ndx);
            float *bdW = sy_test_upload_new(be, NULL, ndW), *bdl = sy_test_upload_new(be, NULL, ndl);
            be->matmul_fwd(be, by, bx, bW, N, in, out);
            be->matmul_bwd(be, bdx, bdW, bdy, bx, bW, N, in, out, false);
            be->matmul_bwd(be, bdx, bdW, bdy, bx, bW, N, in, out, true); /* += on both */
            double xe = be->xent_fwd_bwd(be, bdl, blg, btg, N, V, 1.0f / N);
            const int k = th > 1;
            sy_test_download(be, y[k], by, ny), sy_test_download(be, dx[k], bdx, ndx);
            sy_test_download(be, dW[k], bdW, ndW), sy_test_download(be, dl[k], bdl, ndl);
            void *bufs[] = {bx, bW, bdy, blg, btg, by, bdx, bdW, bdl};
            for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->free(be, bufs[i]);
            sy_backend_destroy(&be);
            if (th == 1) {
                xe1 = xe;
                continue;
            }
            if (memcmp(y[1], y[0], ny) || memcmp(dx[1], dx[0], ndx) || memcmp(dW[1], dW[0], ndW) ||
                memcmp(dl[1], dl[0], ndl) || xe != xe1)
                fail_msg("backend ops (bf16=%d) with %d threads differ from 1 thread", bf, th);
        }
        for (int k = 0; k < 2; k++) free(y[k]), free(dx[k]), free(dW[k]), free(dl[k]);
    }
    free(x), free(W), free(dy), free(lg), free(tg);
}

int main(void) {
    fprintf(stderr, "OpenBLAS kernels: %s\n", sy_cpu_blas_core());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiling_is_shape_only),
        cmocka_unit_test(test_sgemm_threads),
        cmocka_unit_test(test_tiles_match_pinned),
        cmocka_unit_test(test_backend_ops_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
