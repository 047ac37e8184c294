/* bf16 storage (src/backend/backend_bf16.c; issue 10, model spec §4): activation buffers of a
 * bf16-mode backend hold 2 bytes an element, and give the same bits as fp32 storage of bf16
 * values (the layout before typed storage, kept as SY_BF16_STORAGE=f32).
 *   - storage: alloc_act of n elements takes 2n bytes (4n with fp32 storage), freed to 0; a
 *     bf16-mode model's activations and working weights take exactly half of fp32 storage's;
 *   - conversions: the CPU's vectorised narrowing, widening and rounding equal base/bf16.h's
 *     scalar ones for every sign, exponent and top fraction, NaNs included;
 *   - traffic: upload into an activation buffer rounds (RNE) each value, download widens
 *     exactly, copy converts both ways and copies between activation buffers, zero and handle
 *     offsets address elements, host_view is NULL; bf16 wire rows are the stored bytes;
 *   - same bits: a Switch model's losses, gradients and logits over micro-batches with router
 *     jitter and expert dropout (and the bf16-router ablation) are bit-identical between bf16
 *     and fp32 storage, on the CPU and the emulation backend, and differ from fp32 mode (so
 *     rounding happened);
 *   - traffic of plain buffers from another thread while ops run (the peer-replica thread
 *     downloads the masters and moments so) leaves the results unchanged. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/backend_cpu_internal.h"
#include "base/bf16.h"
#include "base/config.h"
#include "base/rng.h"
#include "model/model.h"

#define SY_TEST_SEED 0xbf16570aULL
#include "sy_test.h"

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* inner: "cpu" or "emu"; es: 2 (bf16 storage) or 4 (fp32 storage) */
static sy_backend_t *new_bf16(const char *inner, int es) {
    sy_backend_t *in = NULL, *be = NULL;
    if (!strcmp(inner, "cpu"))
        assert_int_equal(sy_backend_cpu_new_plain(2, false, &in), SY_OK);
    else
        assert_int_equal(sy_backend_emu_new_threads(2, false, &in), SY_OK);
    assert_int_equal(sy_backend_bf16_wrap(in, es, &be), SY_OK);
    assert_true(be->bf16);
    return be;
}

static int setup(void **state) {
    (void)state;
    /* the suite may run with these set: this file picks its backends itself */
    unsetenv("SY_BACKEND_POISON");
    unsetenv("SY_BACKEND");
    unsetenv("SY_BF16_STORAGE");
    return 0;
}

/* ---------------------------------------------------------------- storage */

static void test_storage_bytes(void **state) {
    (void)state;
    for (int es = 2; es <= 4; es += 2) {
        sy_backend_t *be = new_bf16("cpu", es);
        assert_int_equal(sy_backend_bf16_storage_bytes(be), 0);
        float *a = sy_alloc_act(be, 1000), *b = sy_alloc_act(be, 24);
        assert_non_null(a), assert_non_null(b);
        assert_int_equal(sy_backend_bf16_storage_bytes(be), (size_t)es * 1024);
        float *p = be->alloc(be, 4096); /* a plain buffer is not activation storage */
        assert_int_equal(sy_backend_bf16_storage_bytes(be), (size_t)es * 1024);
        be->free(be, a);
        assert_int_equal(sy_backend_bf16_storage_bytes(be), (size_t)es * 24);
        be->free(be, b), be->free(be, p);
        assert_int_equal(sy_backend_bf16_storage_bytes(be), 0);
        sy_backend_destroy(&be);
    }
    /* the environment picks the storage of a bf16-mode CPU backend; a bad value is refused */
    sy_backend_t *be = NULL;
    assert_int_equal(sy_backend_cpu_new(1, true, &be), SY_OK);
    float *a = sy_alloc_act(be, 10);
    assert_int_equal(sy_backend_bf16_storage_bytes(be), 20);
    be->free(be, a);
    sy_backend_destroy(&be);
    setenv("SY_BF16_STORAGE", "f32", 1);
    assert_int_equal(sy_backend_cpu_new(1, true, &be), SY_OK);
    a = sy_alloc_act(be, 10);
    assert_int_equal(sy_backend_bf16_storage_bytes(be), 40);
    be->free(be, a);
    sy_backend_destroy(&be);
    setenv("SY_BF16_STORAGE", "fp8", 1);
    assert_int_equal(sy_backend_cpu_new(1, true, &be), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "SY_BF16_STORAGE=fp8"));
    unsetenv("SY_BF16_STORAGE");
    /* fp32 mode: no wrap, alloc_act is plain fp32 */
    assert_int_equal(sy_backend_cpu_new(1, false, &be), SY_OK);
    assert_null(be->alloc_act);
    assert_false(be->bf16);
    sy_backend_destroy(&be);
}

/* ---------------------------------------------------------------- traffic */

static void check_traffic(sy_backend_t *be) {
    enum { N = 300 };
    static float x[N], y[N], z[N];
    for (int i = 0; i < N; i++) x[i] = (float)((urand() - 0.5) * pow(2.0, (int)(urand() * 40) - 20));
    int unrounded = 0;
    for (int i = 0; i < N; i++) unrounded += bits_of(x[i]) != bits_of(sy_round_bf16(x[i]));
    assert_true(unrounded > N / 2);

    float *a = sy_alloc_act(be, N), *b = sy_alloc_act(be, N), *p = be->alloc(be, N * sizeof(float));
    assert_null(be->host_view(be, a));
    assert_non_null(be->host_view(be, p)); /* the CPU's plain buffers are host memory */
    /* upload rounds, download widens */
    be->upload(be, a, x, sizeof x);
    be->download(be, y, a, sizeof y);
    for (int i = 0; i < N; i++) assert_int_equal(bits_of(y[i]), bits_of(sy_round_bf16(x[i])));
    /* plain -> activation rounds; activation -> plain is exact; activation -> activation */
    be->upload(be, p, x, sizeof x);
    be->copy(be, b, p, sizeof x);
    be->download(be, z, b, sizeof z);
    assert_memory_equal(z, y, sizeof z);
    be->zero(be, p, sizeof x);
    be->copy(be, p, a, sizeof x);
    be->download(be, z, p, sizeof z);
    assert_memory_equal(z, y, sizeof z);
    be->zero(be, b, sizeof x);
    be->copy(be, b + 10, a + 20, 50 * sizeof(float)); /* handle offsets are in elements */
    be->download(be, z, b, sizeof z);
    for (int i = 0; i < N; i++)
        assert_int_equal(bits_of(z[i]), i >= 10 && i < 60 ? bits_of(y[i + 10]) : 0u);
    /* zero of a sub-range; upload into a sub-range */
    be->copy(be, b, a, sizeof x);
    be->zero(be, b + 100, 7 * sizeof(float));
    be->upload(be, b + 200, x, 3 * sizeof(float));
    be->download(be, z, b, sizeof z);
    for (int i = 0; i < N; i++) {
        float want = i >= 100 && i < 107 ? 0.0f : i >= 200 && i < 203 ? sy_round_bf16(x[i - 200]) : y[i];
        assert_int_equal(bits_of(z[i]), bits_of(want));
    }
    /* wire: bf16 rows are the stored elements (RNE of the values), fp32 rows the widened ones */
    char *wire = be->alloc(be, N * sizeof(float));
    uint16_t h16[N];
    be->wire_put(be, wire + 2, a + 5, 100, 2);
    be->download(be, h16, wire + 2, 100 * sizeof(uint16_t));
    for (int i = 0; i < 100; i++) assert_int_equal(h16[i], sy_f32_to_bf16(x[i + 5]));
    be->zero(be, b, sizeof x);
    be->wire_get(be, b + 1, wire + 2, 100, 2);
    be->download(be, z, b, sizeof z);
    for (int i = 0; i < N; i++) assert_int_equal(bits_of(z[i]), i >= 1 && i < 101 ? bits_of(y[i + 4]) : 0u);
    be->wire_put(be, wire, a, 50, 4);
    be->download(be, z, wire, 50 * sizeof(float));
    assert_memory_equal(z, y, 50 * sizeof(float));
    be->free(be, wire);
    be->free(be, a), be->free(be, b), be->free(be, p);
}

static void test_traffic(void **state) {
    (void)state;
    const char *inner[] = {"cpu", "emu"};
    for (int k = 0; k < 2; k++)
        for (int es = 2; es <= 4; es += 2) {
            sy_backend_t *be = new_bf16(inner[k], es);
            check_traffic(be);
            sy_backend_destroy(&be);
        }
}

/* ---------------------------------------------------------------- conversions, every pattern */

/* The CPU backend's vectorised conversions (wire_put / wire_get with es 2, round_bf16: what the
 * wrap narrows, widens and rounds with) against base/bf16.h's scalar ones: every sign, exponent
 * and top fraction (all 65,536 upper halves) with lower halves at and around the rounding ties,
 * NaN payloads included; threaded (more than one chunk). */
static void test_conversions_all_patterns(void **state) {
    (void)state;
    static const uint16_t lows[] = {0x0000, 0x0001, 0x3fff, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff};
    enum { NL = sizeof lows / sizeof lows[0], NP = 65536 * NL };
    sy_backend_t *be = NULL;
    assert_int_equal(sy_backend_cpu_new_plain(2, true, &be), SY_OK); /* bf16 set: round_bf16 rounds */
    float *x = malloc(sizeof(float) * NP), *y = malloc(sizeof(float) * NP);
    uint16_t *h = malloc(sizeof(uint16_t) * NP);
    assert_non_null(x), assert_non_null(y), assert_non_null(h);
    for (uint32_t hi = 0; hi < 65536; hi++)
        for (int k = 0; k < NL; k++) {
            const uint32_t u = hi << 16 | lows[k];
            memcpy(&x[hi * NL + (uint32_t)k], &u, sizeof u);
        }
    float *bx = sy_test_upload_new(be, x, sizeof(float) * NP);
    uint16_t *bh = sy_test_upload_new(be, NULL, sizeof(uint16_t) * NP);
    be->wire_put(be, bh, bx, NP, 2);
    be->download(be, h, bh, sizeof(uint16_t) * NP);
    int bad = 0;
    for (size_t i = 0; i < NP; i++) bad += h[i] != sy_f32_to_bf16(x[i]);
    assert_int_equal(bad, 0);
    be->round_bf16(be, bx, NP);
    be->download(be, y, bx, sizeof(float) * NP);
    for (size_t i = 0; i < NP; i++) bad += bits_of(y[i]) != bits_of(sy_round_bf16(x[i]));
    assert_int_equal(bad, 0);
    for (uint32_t i = 0; i < NP; i++) h[i] = (uint16_t)(i % 65536u); /* every bf16 pattern */
    be->upload(be, bh, h, sizeof(uint16_t) * NP);
    be->wire_get(be, bx, bh, NP, 2);
    be->download(be, y, bx, sizeof(float) * NP);
    for (size_t i = 0; i < NP; i++) bad += bits_of(y[i]) != bits_of(sy_bf16_to_f32(h[i]));
    assert_int_equal(bad, 0);
    be->free(be, bx), be->free(be, bh);
    free(x), free(y), free(h);
    sy_backend_destroy(&be);
}

/* ---------------------------------------------------------------- same bits */

typedef struct {
    double loss[3];
    float *grads, *logits;
    size_t act_bytes, P, L; /* activation storage; parameters; logits */
} model_run;

enum { M_B = 4, M_T = 8 };

static model_run run_model(sy_backend_t *be, bool router_bf16) {
    sy_config_t cfg;
    assert_int_equal(sy_config_defaults(&cfg), SY_OK);
    cfg.model.vocab_size = 61;
    cfg.model.seq_len = M_T;
    cfg.model.d_model = 32;
    cfg.model.n_heads = 4;
    cfg.model.d_ff = 48;
    cfg.model.n_experts = 4;
    cfg.model.n_layers = 2;
    cfg.model.switch_every = 2;
    cfg.model.router_jitter = 0.05;
    cfg.model.expert_dropout = 0.2;
    cfg.model.capacity_factor = 1.0; /* drops some tokens */
    cfg.model.router_precision = router_bf16 ? SY_PREC_BF16 : SY_PREC_FP32;
    cfg.train.micro_batch_seqs = M_B;
    sy_model_dims d = sy_model_dims_from_config(&cfg);
    sy_config_free(&cfg);
    sy_model_t *m = NULL;
    assert_int_equal(sy_model_new(&d, be, &m), SY_OK);
    model_run r = {.act_bytes = sy_backend_bf16_storage_bytes(be)};
    sy_model_init(m, 7);
    sy_rng_t g = sy_rng_key(11, "bf16 storage test tokens", 0, 0, 0);
    int32_t tok[M_B * (M_T + 1)];
    sy_model_zero_grads(m);
    for (int micro = 0; micro < 3; micro++) {
        for (int i = 0; i < M_B * (M_T + 1); i++) tok[i] = (int32_t)sy_rng_below(&g, (uint64_t)d.V);
        sy_losses l;
        assert_int_equal(sy_model_fwd_bwd(m, tok, 3, (sy_draw_key){5, 2, micro}, &l), SY_OK);
        r.loss[micro] = l.ce + l.aux + l.z;
    }
    const size_t P = sy_model_numel(m);
    r.P = P, r.L = (size_t)M_B * M_T * d.V;
    r.grads = sy_test_download_new(be, sy_model_grads(m), P * sizeof(float));
    sy_losses l;
    assert_int_equal(sy_model_forward_eval(m, tok, 1, &l), SY_OK);
    r.logits = malloc(sizeof(float) * M_B * M_T * d.V);
    assert_int_equal(sy_model_logits(m, 0, M_B * M_T, r.logits), SY_OK);
    sy_model_destroy(&m);
    return r;
}

static void same_run(const model_run *a, const model_run *b, size_t P, size_t L) {
    for (int i = 0; i < 3; i++) assert_int_equal(bits_of((float)a->loss[i]), bits_of((float)b->loss[i]));
    assert_memory_equal(a->loss, b->loss, sizeof a->loss);
    assert_memory_equal(a->grads, b->grads, P * sizeof(float));
    assert_memory_equal(a->logits, b->logits, L * sizeof(float));
}

static void test_same_bits(void **state) {
    (void)state;
    for (int r16 = 0; r16 <= 1; r16++) {
        sy_backend_t *b2 = new_bf16("cpu", 2), *b4 = new_bf16("cpu", 4), *e2 = new_bf16("emu", 2);
        sy_backend_t *fp = NULL;
        assert_int_equal(sy_backend_cpu_new_plain(2, false, &fp), SY_OK);
        model_run x2 = run_model(b2, r16), x4 = run_model(b4, r16), y2 = run_model(e2, r16),
                  f = run_model(fp, r16);
        const size_t P = f.P, L = f.L;
        fprintf(stderr, "router %s: losses bf16 %.9f %.9f %.9f, fp32 %.9f; activation storage %zu / %zu bytes\n",
                r16 ? "bf16" : "fp32", x2.loss[0], x2.loss[1], x2.loss[2], f.loss[0], x2.act_bytes,
                x4.act_bytes);
        same_run(&x2, &x4, P, L); /* bf16 storage == fp32 storage of bf16 values */
        same_run(&x2, &y2, P, L); /* == the emulation backend's kernel bodies */
        for (int i = 0; i < 3; i++) assert_true(x2.loss[i] != f.loss[i]); /* rounding happened */
        assert_true(fabs(x2.loss[0] - f.loss[0]) < 5e-2);
        assert_true(x2.act_bytes > 0 && x4.act_bytes == 2 * x2.act_bytes);
        assert_int_equal(f.act_bytes, 0);
        free(x2.grads), free(x4.grads), free(y2.grads), free(f.grads);
        free(x2.logits), free(x4.logits), free(y2.logits), free(f.logits);
        sy_backend_destroy(&b2), sy_backend_destroy(&b4), sy_backend_destroy(&e2), sy_backend_destroy(&fp);
    }
}

/* ---------------------------------------------------------------- another thread's traffic */

typedef struct {
    sy_backend_t *be;
    atomic_int stop;
    atomic_long rounds;
} downloader;

static void *download_loop(void *arg) {
    downloader *d = arg;
    enum { K = 1 << 16 };
    float *p = d->be->alloc(d->be, K * sizeof(float)), *q = d->be->alloc(d->be, K * sizeof(float));
    float *h = malloc(K * sizeof(float));
    assert_non_null(p), assert_non_null(q), assert_non_null(h);
    while (!atomic_load(&d->stop)) {
        d->be->download(d->be, h, p, K * sizeof(float));
        d->be->upload(d->be, q, h, K * sizeof(float));
        d->be->copy(d->be, p, q, K * sizeof(float));
        d->be->zero(d->be, q, K * sizeof(float));
        atomic_fetch_add(&d->rounds, 1);
    }
    d->be->free(d->be, p), d->be->free(d->be, q);
    free(h);
    return NULL;
}

static void test_plain_traffic_from_another_thread(void **state) {
    (void)state;
    sy_backend_t *b1 = new_bf16("cpu", 2), *b2 = new_bf16("cpu", 2);
    model_run alone = run_model(b1, false);
    downloader d = {.be = b2};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, download_loop, &d), 0);
    while (atomic_load(&d.rounds) == 0) sched_yield(); /* the thread is at work */
    /* runs until some of the thread's traffic fell inside a run (on 2 busy cores a short run
     * may see none), each run equal to the one without the thread */
    long during = 0;
    int runs = 0;
    for (; runs < 50 && during < 20; runs++) {
        const long before = atomic_load(&d.rounds);
        model_run busy = run_model(b2, false);
        during += atomic_load(&d.rounds) - before;
        same_run(&alone, &busy, alone.P, alone.L);
        free(busy.grads), free(busy.logits);
    }
    atomic_store(&d.stop, 1);
    pthread_join(th, NULL);
    fprintf(stderr, "plain traffic on another thread: %ld rounds during %d runs\n", during, runs);
    assert_true(during > 0);
    free(alone.grads), free(alone.logits);
    sy_backend_destroy(&b1), sy_backend_destroy(&b2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_storage_bytes),
        cmocka_unit_test(test_traffic),
        cmocka_unit_test(test_conversions_all_patterns),
        cmocka_unit_test(test_same_bits),
        cmocka_unit_test(test_plain_traffic_from_another_thread),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
