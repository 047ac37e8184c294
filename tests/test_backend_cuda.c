/* src/backend/cuda: the CUDA backend against the CPU backend, op by op and on a Switch layer
 * and a tiny model, in fp32 and bf16 mode; and its own repeatability. Needs a CUDA device:
 * without one it exits 77 (ctest: skipped, never passed). SY_CUDA_DEVICE picks the device
 * (default 0). tests/gpu/device_check.sh runs it, also under compute-sanitizer.
 *
 * What must be equal bit for bit (compared with memcmp): every op whose device code is a shared
 * kernel body without libm calls, run on the same inputs: embedding, LayerNorm (sqrtf and the
 * division are correctly rounded on the device, and --fmad=false keeps the host's operations),
 * GELU (the bodies' own expf), residual add, mul, rounding, gather/scatter/combine, route plan
 * (integers), route_gamma, jitter and dropout draws (the same keyed generator), the wire format,
 * fp64 accumulation, sumsq_add (same fixed order), scaling, AdamW.
 * What is compared with a tolerance (tol_for below; each entry says why): ops that call expf /
 * logf (the device's are not glibc's: within 2 ulp, sy_hd.h), their consumers, and the GEMMs
 * (cuBLAS sums in another order than OpenBLAS; in bf16 mode an output that lies near a bf16
 * rounding boundary can then round to the neighbouring bf16 value, one bf16 ulp <= 2^-7
 * relative). Tolerances are |got − want| <= rtol·|want| + mtol·max|want| per result.
 * Repeatability: two runs of the ops, of the Switch layer forward+backward and of two model
 * steps on the device give the same bits (one stream, fixed cuBLAS workspace, no atomics).
 * SY_CUDA_TEST_STANDIN=emu runs the whole harness with the emulation backend in the device's
 * place (ctest cuda_harness_on_emu): it checks the harness, not the GPU. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "base/bf16.h"
#include "base/config.h"
#include "model/model.h"
#include "model/optim.h"
#include "model/switch.h"

#define SY_TEST_SEED 0xc0da
#include "sy_test.h"
#include "sy_ops_harness.h"

static int g_device;

/* A tolerance: kind 'f' (float) or 'd' (double) elements; rtol relative to the element,
 * mtol relative to the largest |want| of the result (sums whose terms cancel). */
typedef struct {
    const char *name;
    char kind;
    double rtol32, mtol32, rtolbf, mtolbf;
} tol_t;

#define BF_ULP (1.0 / 128) /* one bf16 ulp, relative, at most (8-bit significand) */

static const tol_t OP_TOLS[] = {
    /* libm: device expf/logf within 2 ulp of glibc's, in fp32 sums of V = 50 terms */
    {"xent dlogits", 'f', 2e-5, 1e-7, 2e-5, 1e-7},
    {"xent dlogits in place", 'f', 2e-5, 1e-7, 2e-5, 1e-7},
    {"xent losses", 'd', 1e-6, 0, 1e-6, 0},
    {"router_fwd probs", 'f', 1e-5, 1e-7, 1e-5, 1e-7},
    {"router_fwd gate", 'f', 1e-5, 1e-7, 1e-5, 1e-7},
    {"router_fwd lse", 'f', 1e-5, 1e-7, 1e-5, 1e-7},
    /* consumers of the router's probabilities: p·(dp − ⟨p, dp⟩) cancels, hence mtol */
    {"router_bwd", 'f', 1e-4, 1e-6, 1e-4, 1e-6},
    {"route_plan gk", 'f', 1e-5, 1e-7, 1e-5, 1e-7},
    {"route_stats", 'd', 1e-5, 0, 1e-5, 0},
    /* GEMMs: K = 24..4099 fp32 accumulations in cuBLAS's order (mtol 1e-5 of the largest
     * element covers K·2^-24-sized differences), plus one bf16 ulp where the output is
     * rounded (two for the accumulating dx: product and sum are rounded) */
    {"matmul_fwd", 'f', 1e-5, 1e-5, BF_ULP, 1e-5},
    {"matmul_bwd dx", 'f', 1e-5, 1e-5, 2 * BF_ULP, 1e-5},
    {"matmul_bwd dW", 'f', 1e-5, 1e-5, 1e-5, 1e-5},
    {"matmul_bwd dx =", 'f', 1e-5, 1e-5, BF_ULP, 1e-5},
    {"acc64 dx", 'f', 1e-5, 1e-5, BF_ULP, 1e-5},
    {"acc64 dW64", 'd', 1e-5, 1e-5, 1e-5, 1e-5},
    {"group y", 'f', 1e-5, 1e-5, BF_ULP, 1e-5},
    {"group y3", 'f', 1e-5, 1e-5, BF_ULP, 1e-5},
    {"group dx", 'f', 1e-5, 1e-5, BF_ULP, 1e-5},
    {"group dx2", 'f', 1e-5, 1e-5, BF_ULP, 1e-5},
    {"group dW64", 'd', 1e-5, 1e-5, 1e-5, 1e-5},
    {"group dW", 'f', 1e-5, 1e-5, 1e-5, 1e-5},
    /* attention: fp32 GEMMs (hd = 8, T = 40) and the softmax's expf (the bodies' sy_k_expf,
     * but summed serially here, vectorised on the CPU) */
    {"attention out", 'f', 1e-5, 1e-5, BF_ULP, 1e-5},
    {"attention att", 'f', 1e-5, 1e-6, 1e-5, 1e-6},
    {"attention dqkv", 'f', 1e-4, 1e-5, BF_ULP, 1e-5},
    {NULL, 0, 0, 0, 0, 0},
};

/* A Switch layer / model step: chains of the above. In bf16 mode an input one bf16 ulp apart
 * moves a result by about that much again at each rounding it passes, through two expert GEMMs
 * and GELU: 4 ulp relative, or 2 % of the largest element for sums that cancel. The routing
 * must not change (counts, offsets compared exactly: a changed top-1 would show there first);
 * fp32 mode: 1e-4 / 1e-5 for the libm and GEMM order differences. AdamW: a parameter moves by
 * at most lr per step whatever its gradient, so parameters are compared to 2·lr·steps. */
static const tol_t CHAIN_TOLS[] = {
    {"switch aux, z", 'd', 1e-5, 0, 1e-3, 0},
    {"switch out", 'f', 1e-4, 1e-5, 4 * BF_ULP, 2e-2},
    {"switch dh", 'f', 1e-4, 1e-5, 4 * BF_ULP, 2e-2},
    {"switch dWr", 'f', 1e-4, 1e-5, 2e-2, 2e-2},
    {"switch acc W1", 'd', 1e-4, 1e-5, 2e-2, 2e-2},
    {"switch acc W2", 'd', 1e-4, 1e-5, 2e-2, 2e-2},
    {"model losses", 'd', 1e-4, 0, 1e-2, 0},
    {"model grad norm", 'd', 1e-4, 0, 2e-2, 0},
    {"model eval loss", 'd', 1e-4, 0, 1e-2, 0},
    {"model adam m", 'f', 1e-3, 1e-3, 5e-2, 5e-2},
    {"model adam v", 'f', 1e-3, 1e-3, 5e-2, 5e-2},
    {NULL, 0, 0, 0, 0, 0},
};

static double g_param_atol; /* 2·lr·steps (model_run raises it) */

static const tol_t *tol_for(const tol_t *tab, const char *name) {
    for (int i = 0; tab[i].name; i++)
        if (strcmp(tab[i].name, name) == 0) return &tab[i];
    return NULL;
}

/* b (device) against a (CPU): exact where no tolerance is listed. Prints, for every result,
 * the largest difference seen. */
static void res_compare_tol(const char *what, const results *a, const results *b, const tol_t *tab,
                            bool bf16) {
    assert_int_equal(a->n, b->n);
    int bad = 0, exact = 0;
    for (int i = 0; i < a->n; i++) {
        assert_string_equal(a->name[i], b->name[i]);
        assert_int_equal(a->bytes[i], b->bytes[i]);
        const bool same = memcmp(a->data[i], b->data[i], a->bytes[i]) == 0;
        const tol_t *t = tol_for(tab, a->name[i]);
        const bool params = strcmp(a->name[i], "model params") == 0;
        if (!t && !params) {
            if (same) {
                exact++;
                continue;
            }
            bad++;
            const uint32_t *x = a->data[i], *y = b->data[i];
            for (size_t k = 0; k < a->bytes[i] / 4; k++)
                if (x[k] != y[k]) {
                    float fx, fy;
                    memcpy(&fx, &x[k], 4), memcpy(&fy, &y[k], 4);
                    fprintf(stderr, "%s: %s must be exact, differs at word %zu: cpu %08x (%g) cuda %08x (%g)\n",
                            what, a->name[i], k, x[k], fx, y[k], fy);
                    break;
                }
            continue;
        }
        const char kind = t ? t->kind : 'f';
        const size_t n = a->bytes[i] / (kind == 'd' ? 8 : 4);
        double mx = 0, worst = 0;
        size_t worst_k = 0;
        for (size_t k = 0; k < n; k++) {
            double w = kind == 'd' ? ((double *)a->data[i])[k] : ((float *)a->data[i])[k];
            if (fabs(w) > mx) mx = fabs(w);
        }
        const double rtol = t ? (bf16 ? t->rtolbf : t->rtol32) : 0;
        const double mtol = t ? (bf16 ? t->mtolbf : t->mtol32) : 0;
        int miss = 0;
        for (size_t k = 0; k < n; k++) {
            double w = kind == 'd' ? ((double *)a->data[i])[k] : ((float *)a->data[i])[k];
            double g = kind == 'd' ? ((double *)b->data[i])[k] : ((float *)b->data[i])[k];
            double lim = params ? g_param_atol : rtol * fabs(w) + mtol * mx;
            double d = fabs(g - w);
            if (!(d <= lim)) {
                if (miss++ < 3)
                    fprintf(stderr, "%s: %s[%zu]: cpu %.9g cuda %.9g (|diff| %.3g > %.3g)\n", what,
                            a->name[i], k, w, g, d, lim);
            }
            if (d > worst) worst = d, worst_k = k;
        }
        fprintf(stderr, "%s: %-24s %s; max |diff| %.3g at %zu (max |cpu| %.3g)%s\n", what, a->name[i],
                same ? "bitwise equal" : "within tolerance", worst, worst_k, mx,
                miss ? "  <-- OUT OF TOLERANCE" : "");
        if (miss) bad++;
    }
    fprintf(stderr, "%s: %d results, %d required bit for bit and equal, %d failed\n", what, a->n,
            exact, bad);
    assert_int_equal(bad, 0);
}

/* Two device runs: every result the same bits */
static void res_same(const char *what, const results *a, const results *b) {
    assert_int_equal(a->n, b->n);
    int bad = 0;
    for (int i = 0; i < a->n; i++)
        if (a->bytes[i] != b->bytes[i] || memcmp(a->data[i], b->data[i], a->bytes[i]) != 0) {
            fprintf(stderr, "%s: %s differs between two runs on the device\n", what, a->name[i]);
            bad++;
        }
    fprintf(stderr, "%s: %d results, %d differ between two runs\n", what, a->n, bad);
    assert_int_equal(bad, 0);
}

/* SY_CUDA_TEST_STANDIN=emu: the emulation backend stands in for the device (the harness's own
 * test on a machine without a GPU: ctest cuda_harness_on_emu) */
static bool g_standin;

static sy_backend_t *cuda_new(bool bf16) {
    sy_backend_t *be = NULL;
    sy_status st = g_standin ? sy_backend_emu_new(bf16, &be) : sy_backend_cuda_new(g_device, bf16, &be);
    if (st != SY_OK) fprintf(stderr, "sy_backend_cuda_new: %s\n", sy_err_msg());
    assert_int_equal(st, SY_OK);
    return be;
}

static void ops_case(bool bf16) {
    op_inputs in;
    inputs_make(&in, true);
    sy_backend_t *cpu = NULL, *gpu = cuda_new(bf16);
    assert_int_equal(sy_backend_cpu_new(0, bf16, &cpu), SY_OK);
    results rc = {0}, rg = {0}, rg2 = {0};
    run_ops(cpu, &in, &rc, true);
    run_ops(gpu, &in, &rg, true);
    run_ops(gpu, &in, &rg2, true);
    res_compare_tol(bf16 ? "ops bf16" : "ops fp32", &rc, &rg, OP_TOLS, bf16);
    res_same(bf16 ? "ops bf16 repeat" : "ops fp32 repeat", &rg, &rg2);
    res_free(&rc), res_free(&rg), res_free(&rg2);
    sy_backend_destroy(&cpu);
    sy_backend_destroy(&gpu);
    inputs_free(&in);
}

static void test_ops_fp32(void **state) {
    (void)state;
    ops_case(false);
}

static void test_ops_bf16(void **state) {
    (void)state;
    ops_case(true);
}

static void switch_case(bool bf16) {
    sy_backend_t *cpu = NULL, *gpu = cuda_new(bf16);
    assert_int_equal(sy_backend_cpu_new(0, bf16, &cpu), SY_OK);
    results rc = {0}, rg = {0}, rg2 = {0};
    switch_run(cpu, 0x5eed, &rc);
    switch_run(gpu, 0x5eed, &rg);
    switch_run(gpu, 0x5eed, &rg2);
    res_compare_tol(bf16 ? "switch layer bf16" : "switch layer fp32", &rc, &rg, CHAIN_TOLS, bf16);
    res_same(bf16 ? "switch layer bf16 repeat" : "switch layer fp32 repeat", &rg, &rg2);
    res_free(&rc), res_free(&rg), res_free(&rg2);
    sy_backend_destroy(&cpu);
    sy_backend_destroy(&gpu);
}

static void test_switch_fp32(void **state) {
    (void)state;
    switch_case(false);
}

static void test_switch_bf16(void **state) {
    (void)state;
    switch_case(true);
}

static void model_case(bool bf16) {
    sy_backend_t *cpu = NULL, *gpu = cuda_new(bf16);
    assert_int_equal(sy_backend_cpu_new(0, bf16, &cpu), SY_OK);
    results rc = {0}, rg = {0}, rg2 = {0};
    model_run(cpu, bf16, &rc, &g_param_atol);
    model_run(gpu, bf16, &rg, &g_param_atol);
    model_run(gpu, bf16, &rg2, &g_param_atol);
    res_compare_tol(bf16 ? "model steps bf16" : "model steps fp32", &rc, &rg, CHAIN_TOLS, bf16);
    res_same(bf16 ? "model steps bf16 repeat" : "model steps fp32 repeat", &rg, &rg2);
    res_free(&rc), res_free(&rg), res_free(&rg2);
    sy_backend_destroy(&cpu);
    sy_backend_destroy(&gpu);
}

static void test_model_fp32(void **state) {
    (void)state;
    model_case(false);
}

static void test_model_bf16(void **state) {
    (void)state;
    model_case(true);
}

/* Every GEMM type the backend uses at a Switch-Base shape, against an fp64 host product of the
 * same (bf16-valued) inputs. Bound: fp32 accumulation of K terms errs by at most K·2^-24·Σ|a||b|
 * (recursive summation's worst case; cuBLAS's blocked sums do better); a bf16-rounded output
 * adds 2^-8·|y| (RNE to an 8-bit significand). */
static void gemm_vs_f64(bool bf16, int M, int K, int Nn) {
    sy_backend_t *gpu = cuda_new(bf16);
    float *x = malloc(sizeof(float) * (size_t)M * K), *W = malloc(sizeof(float) * (size_t)Nn * K);
    float *y = malloc(sizeof(float) * (size_t)M * Nn);
    assert_non_null(x), assert_non_null(W), assert_non_null(y);
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = sy_round_bf16((float)frand(-2, 2));
    for (size_t i = 0; i < (size_t)Nn * K; i++) W[i] = sy_round_bf16((float)frand(-0.1, 0.1));
    float *bx = up(gpu, x, FB((size_t)M * K)), *bW = up(gpu, W, FB((size_t)Nn * K));
    float *by = up(gpu, NULL, FB((size_t)M * Nn));
    gpu->matmul_fwd(gpu, by, bx, bW, M, K, Nn);
    gpu->download(gpu, y, by, FB((size_t)M * Nn));
    int miss = 0;
    double worst = 0;
    for (int i = 0; i < M; i += 7)
        for (int j = 0; j < Nn; j++) {
            double ref = 0, mag = 0;
            for (int k = 0; k < K; k++) {
                double p = (double)x[(size_t)i * K + k] * W[(size_t)j * K + k];
                ref += p, mag += fabs(p);
            }
            double lim = K * 0x1p-24 * mag + (bf16 ? 0x1p-8 * fabs(ref) : 0);
            double d = fabs(y[(size_t)i * Nn + j] - ref);
            if (d / (lim + 1e-300) > worst) worst = d / (lim + 1e-300);
            if (!(d <= lim) && miss++ < 3)
                fprintf(stderr, "gemm %s [%d,%d]: %.9g vs fp64 %.9g (bound %.3g)\n",
                        bf16 ? "bf16" : "fp32", i, j, y[(size_t)i * Nn + j], ref, lim);
        }
    fprintf(stderr, "gemm %s %dx%dx%d vs fp64: worst error %.3f of the bound, %d misses\n",
            bf16 ? "bf16" : "fp32", M, K, Nn, worst, miss);
    assert_int_equal(miss, 0);
    gpu->free(gpu, bx), gpu->free(gpu, bW), gpu->free(gpu, by);
    free(x), free(W), free(y);
    sy_backend_destroy(&gpu);
}

static void test_gemm_vs_f64(void **state) {
    (void)state;
    gemm_vs_f64(false, 512, 768, 3072);
    gemm_vs_f64(true, 512, 768, 3072);
    gemm_vs_f64(true, 80, 3072, 768); /* an expert's second GEMM at E = 64 */
}

int main(int argc, char **argv) {
    char why[256];
    const char *standin = getenv("SY_CUDA_TEST_STANDIN");
    g_standin = standin && strcmp(standin, "emu") == 0;
    int n = g_standin ? 1 : sy_backend_cuda_devices(why, sizeof why);
    if (n <= 0) {
        fprintf(stderr, "test_backend_cuda: skipped: no CUDA device (%s)\n", why);
        return 77;
    }
    const char *dev = getenv("SY_CUDA_DEVICE");
    g_device = dev && dev[0] ? atoi(dev) : 0;
    unsetenv("SY_BACKEND"); /* the CPU side must be the CPU backend */
    if (argc > 1) cmocka_set_test_filter(argv[1]); /* e.g. "test_ops*" (device_check.sh) */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm_vs_f64),
        cmocka_unit_test(test_ops_fp32),
        cmocka_unit_test(test_ops_bf16),
        cmocka_unit_test(test_switch_fp32),
        cmocka_unit_test(test_switch_bf16),
        cmocka_unit_test(test_model_fp32),
        cmocka_unit_test(test_model_bf16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
