/* src/model/model: gradients of every parameter tensor of a tiny Switch LM (V 16, T 6, D 8, H 2,
 * F 12, E 4, L 2, S 2, B 2, capacity_factor 1.0, so tokens are dropped) against central finite
 * differences of the total loss ce + aux + z; micro-batch accumulation equals the gradient of
 * the mean loss; initialisation is a pure function of (seed, name) with the spec §3 statistics.
 *
 * The model is fp32, so finite differences use a step of 1e-2 on single entries and on a random
 * ±1 direction per tensor; an entry whose perturbation changes a routing decision (expert
 * counts or the dropped count differ between +h and -h) is skipped, and at least 90% of the
 * entries must be checked. */
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
#include "base/config.h"
#include "model/model.h"

#define SY_TEST_SEED 0x6d0de1ULL
#include "sy_test.h"

static sy_backend_t *g_be;
static int g_verbose;

static int setup(void **state) {
    (void)state;
    g_verbose = getenv("SY_TEST_VERBOSE") != NULL;
    return sy_backend_cpu_new(1, false, &g_be) == SY_OK ? 0 : -1;
}
static int teardown(void **state) {
    (void)state;
    sy_backend_destroy(&g_be);
    return 0;
}

static sy_model_dims tiny_dims(void) {
    sy_config_t cfg;
    assert_int_equal(sy_config_defaults(&cfg), SY_OK);
    cfg.model.vocab_size = 16;
    cfg.model.seq_len = 6;
    cfg.model.d_model = 8;
    cfg.model.n_heads = 2;
    cfg.model.d_ff = 12;
    cfg.model.n_experts = 4;
    cfg.model.n_layers = 2;
    cfg.model.switch_every = 2;
    cfg.train.micro_batch_seqs = 2;
    cfg.model.capacity_factor = 1.0;
    sy_model_dims d = sy_model_dims_from_config(&cfg);
    sy_config_free(&cfg);
    return d;
}

static void random_tokens(int32_t *tok, int n, int V) {
    for (int i = 0; i < n; i++) tok[i] = (int32_t)(urand() * V);
}

/* ---------------------------------------------------------------- total loss and routing */

typedef struct {
    sy_model_t *m;
    const int32_t *tok;
    sy_draw_key key;
    int32_t counts[64];
    int64_t dropped;
    int n_counts;
    float *theta;   /* the model's parameters (backend buffer) */
    float *theta_h; /* their host copy, which the checks perturb and push() uploads */
} lctx;

/* Uploads n entries of the host copy from w on into the model's parameters. */
static void push(const lctx *c, const float *w, size_t n) {
    g_be->upload(g_be, c->theta + (w - c->theta_h), w, n * sizeof(float));
}

static double total_loss(lctx *c) {
    sy_losses l;
    assert_int_equal(sy_model_fwd_bwd(c->m, c->tok, 1, c->key, &l), SY_OK);
    memcpy(c->counts, sy_model_expert_counts(c->m), sizeof(int32_t) * c->n_counts);
    c->dropped = l.dropped;
    return l.ce + l.aux + l.z;
}

typedef struct {
    int32_t counts[64];
    int64_t dropped;
} routing;

static routing routing_of(const lctx *c) {
    routing r;
    memcpy(r.counts, c->counts, sizeof r.counts);
    r.dropped = c->dropped;
    return r;
}
static int same_routing(const routing *a, const routing *b, int n) {
    return a->dropped == b->dropped && !memcmp(a->counts, b->counts, sizeof(int32_t) * n);
}

/* Central difference of the total loss in entry *w (of the host copy) with step h; NAN when
 * the perturbation changed a routing decision. */
static double fd_entry(lctx *c, const routing *base, float *w, double h) {
    float s = *w, wp = (float)(s + h), wm = (float)(s - h);
    *w = wp;
    push(c, w, 1);
    double lp = total_loss(c);
    routing rp = routing_of(c);
    *w = wm;
    push(c, w, 1);
    double lm = total_loss(c);
    routing rm = routing_of(c);
    *w = s;
    push(c, w, 1);
    if (!same_routing(&rp, base, c->n_counts) || !same_routing(&rm, base, c->n_counts))
        return NAN;
    return (lp - lm) / ((double)wp - (double)wm);
}

/* The gradient check. aux_coef/z_coef are raised above the defaults so that their gradient
 * terms are well above the finite-difference noise. */
static void test_grad_every_tensor(void **state) {
    (void)state;
    sy_model_dims d = tiny_dims();
    d.aux_coef = 0.1;
    d.z_coef = 0.01;
    sy_model_t *m = NULL;
    assert_int_equal(sy_model_new(&d, g_be, &m), SY_OK);
    assert_int_equal(sy_model_n_switch(m), 1);
    assert_true(sy_model_is_switch(m, 1) && !sy_model_is_switch(m, 0));
    int32_t tok[2 * 7];
    lctx c = {m, tok, {42, 0, 0}, {0}, 0, sy_model_n_switch(m) * d.E, NULL, NULL};

    /* a seed and batch where capacity drops tokens (deterministic search) */
    uint64_t seed = 1;
    for (;; seed++) {
        assert_true(seed < 200);
        sy_model_init(m, seed);
        random_tokens(tok, 2 * 7, d.V);
        total_loss(&c);
        if (c.dropped >= 2) break;
    }
    size_t P = sy_model_numel(m);
    c.theta = sy_model_params(m);
    c.theta_h = sy_test_download_new(g_be, c.theta, P * sizeof(float));
    float *theta = c.theta_h;
    float *g = malloc(P * sizeof(float));
    sy_model_zero_grads(m);
    double L0 = total_loss(&c);
    sy_test_download(g_be, g, sy_model_grads(m), P * sizeof(float));
    routing base = routing_of(&c);
    if (g_verbose) fprintf(stderr, "seed %llu loss %.6f dropped %lld\n",
                           (unsigned long long)seed, L0, (long long)c.dropped);
    assert_true(c.dropped > 0);

    const double atol = 5e-5, rtol = 1e-2;
    int n_checked = 0, n_skipped = 0, n_bad = 0;
    for (int pi = 0; pi < sy_model_n_params(m); pi++) {
        const sy_param_t *p = sy_model_param(m, pi);
        float *w = theta + p->offset;
        const float *gw = g + p->offset;
        double maxerr = 0.0, gmax = 0.0, worst = 0.0, rms = 0.0;
        for (size_t k = 0; k < p->numel; k++) rms += (double)w[k] * w[k];
        rms = sqrt(rms / p->numel);
        /* the step: 1e-2, or a quarter of the tensor's scale for the small embeddings */
        const double h = fmin(1e-2, 0.25 * rms);
        int checked = 0, skipped = 0;
        /* every entry */
        for (size_t k = 0; k < p->numel; k++) {
            double fd1 = fd_entry(&c, &base, w + k, h), fd2 = fd_entry(&c, &base, w + k, h / 2);
            if (isnan(fd1) || isnan(fd2)) {
                skipped++;
                continue;
            }
            /* Richardson: the O(h²) truncation error of the central difference cancels */
            double fd = (4.0 * fd2 - fd1) / 3.0, an = gw[k];
            double err = fabs(fd - an);
            gmax = fmax(gmax, fabs(an));
            maxerr = fmax(maxerr, err);
            worst = fmax(worst, err / (atol + rtol * fmax(fabs(fd), fabs(an))));
            if (!(err <= atol + rtol * fmax(fabs(fd), fabs(an)))) {
                if (n_bad < 10)
                    fprintf(stderr, "%s[%zu]: analytic %.7g fd %.7g\n", p->name, k, an, fd);
                n_bad++;
            }
            checked++;
        }
        /* a random ±1 direction: ⟨g, v⟩ against (L(θ+hv) - L(θ-hv)) / 2h */
        float *save = malloc(p->numel * sizeof(float));
        memcpy(save, w, p->numel * sizeof(float));
        double hv = 0.05 * h, gnorm = 0.0;
        signed char *v = malloc(p->numel);
        for (size_t k = 0; k < p->numel; k++) {
            v[k] = urand() < 0.5 ? -1 : 1;
            gnorm += (double)gw[k] * gw[k];
        }
        double num = 0.0;
        for (size_t k = 0; k < p->numel; k++) w[k] = (float)(save[k] + hv * v[k]);
        push(&c, w, p->numel);
        double lp = total_loss(&c);
        routing rp = routing_of(&c);
        for (size_t k = 0; k < p->numel; k++) {
            num += ((double)w[k] - save[k]) * gw[k];
        }
        for (size_t k = 0; k < p->numel; k++) w[k] = (float)(save[k] - hv * v[k]);
        push(&c, w, p->numel);
        double lm = total_loss(&c);
        routing rm = routing_of(&c);
        for (size_t k = 0; k < p->numel; k++) {
            num -= ((double)w[k] - save[k]) * gw[k];
        }
        memcpy(w, save, p->numel * sizeof(float));
        push(&c, w, p->numel);
        /* (lp - lm) ≈ ⟨g, Δθ₊ - Δθ₋⟩ with the rounded steps */
        double fd_dir = lp - lm, an_dir = num;
        if (same_routing(&rp, &base, c.n_counts) && same_routing(&rm, &base, c.n_counts)) {
            double err = fabs(fd_dir - an_dir);
            double tol = 2e-3 * fabs(an_dir) + 2e-3 * 2 * hv * sqrt(gnorm) + 2e-7;
            if (g_verbose)
                fprintf(stderr, "  dir %-36s an %.6e fd %.6e err %.2e tol %.2e\n", p->name,
                        an_dir, fd_dir, err, tol);
            if (!(err <= tol)) {
                fprintf(stderr, "%s: directional derivative analytic %.7g fd %.7g\n", p->name,
                        an_dir / (2 * hv), fd_dir / (2 * hv));
                n_bad++;
            }
        } else if (g_verbose) {
            fprintf(stderr, "  dir %s: routing changed, skipped\n", p->name);
        }
        free(save);
        free(v);
        if (g_verbose)
            fprintf(stderr, "%-40s n %4zu h %.1e checked %4d skipped %3d |g|max %.3e maxerr %.3e "
                    "err/tol %.2f\n", p->name, p->numel, h, checked, skipped, gmax, maxerr, worst);
        n_checked += checked;
        n_skipped += skipped;
    }
    if (n_bad) fprintf(stderr, "%d gradient entries off\n", n_bad);
    assert_int_equal(n_bad, 0);
    assert_true(n_checked * 10 >= (n_checked + n_skipped) * 9);
    free(g), free(c.theta_h);
    sy_model_destroy(&m);
}

/* Gradient accumulation: n_micro micro-batches accumulate the gradient of the mean loss. */
static void test_accumulation(void **state) {
    (void)state;
    sy_model_dims d = tiny_dims();
    sy_model_t *m = NULL;
    assert_int_equal(sy_model_new(&d, g_be, &m), SY_OK);
    sy_model_init(m, 5);
    size_t P = sy_model_numel(m);
    int32_t A[14], B[14];
    random_tokens(A, 14, d.V);
    random_tokens(B, 14, d.V);
    sy_draw_key ka = {5, 3, 0}, kb = {5, 3, 1};
    sy_losses la, lb, la2, lb2;
    float *gA = malloc(P * 4), *gB = malloc(P * 4), *acc = malloc(P * 4);
    sy_model_zero_grads(m);
    assert_int_equal(sy_model_fwd_bwd(m, A, 1, ka, &la), SY_OK);
    sy_test_download(g_be, gA, sy_model_grads(m), P * 4);
    sy_model_zero_grads(m);
    assert_int_equal(sy_model_fwd_bwd(m, B, 1, kb, &lb), SY_OK);
    sy_test_download(g_be, gB, sy_model_grads(m), P * 4);
    sy_model_zero_grads(m);
    assert_int_equal(sy_model_fwd_bwd(m, A, 2, ka, &la2), SY_OK);
    assert_int_equal(sy_model_fwd_bwd(m, B, 2, kb, &lb2), SY_OK); /* accumulates */
    sy_test_download(g_be, acc, sy_model_grads(m), P * 4);
    int bad = 0;
    double gmax = 0.0;
    for (size_t i = 0; i < P; i++) {
        double want = 0.5 * ((double)gA[i] + gB[i]);
        gmax = fmax(gmax, fabs(want));
        if (!(fabs(acc[i] - want) <= 1e-5 * fabs(want) + 1e-9)) {
            if (bad < 5) fprintf(stderr, "grad[%zu] %.9g want %.9g\n", i, acc[i], want);
            bad++;
        }
    }
    assert_int_equal(bad, 0);
    assert_true(gmax > 1e-3);
    /* per-micro-batch losses are already divided by n_micro */
    assert_true(fabs(la2.ce - la.ce / 2) < 1e-7 && fabs(lb2.ce - lb.ce / 2) < 1e-7);
    assert_true(fabs(la2.aux - la.aux / 2) < 1e-9 && fabs(la2.z - la.z / 2) < 1e-9);
    assert_true(la.ce > 2.0 && la.ce < 3.5); /* ≈ ln 16 at init */
    assert_true(la.aux > 0.0 && la.z > 0.0);
    assert_int_equal(la.tokens, 12);
    assert_int_equal(la.routed, 12);
    free(gA), free(gB), free(acc);
    sy_model_destroy(&m);
}

/* The model routes with capacity_factor in training and eval_capacity_factor in evaluation:
 * dropped = Σ_e max(0, counts_e − C) with C = min(G, max(4, ceil(cf·G/E))) worked here. */
static void test_capacity_in_model(void **state) {
    (void)state;
    sy_model_dims d = tiny_dims();
    d.E = 2; /* G = 12: training C = max(4, 6) = 6 at cf 1.0; eval C = min(12, 12) at cf 2.0 */
    sy_model_t *m = NULL;
    assert_int_equal(sy_model_new(&d, g_be, &m), SY_OK);
    int32_t tok[14];
    int found = 0;
    for (uint64_t seed = 1; seed < 400 && !found; seed++) {
        sy_model_init(m, seed);
        random_tokens(tok, 14, d.V);
        sy_losses l;
        assert_int_equal(sy_model_fwd_bwd(m, tok, 1, (sy_draw_key){seed, 0, 0}, &l), SY_OK);
        const int32_t *cnt = sy_model_expert_counts(m);
        int64_t want = 0;
        for (int e = 0; e < d.E; e++) want += cnt[e] > 6 ? cnt[e] - 6 : 0;
        assert_int_equal(cnt[0] + cnt[1], 12);
        assert_int_equal(l.dropped, want);
        assert_int_equal(l.routed, 12);
        if (want == 0) continue;
        found = 1;
        assert_int_equal(sy_model_forward_eval(m, tok, 1, &l), SY_OK);
        assert_int_equal(l.dropped, 0); /* eval capacity: every token fits */
    }
    assert_true(found);
    sy_model_destroy(&m);
}

/* ---------------------------------------------------------------- initialisation */

static void test_init_pure(void **state) {
    (void)state;
    sy_model_dims d = tiny_dims();
    sy_model_t *a = NULL, *b = NULL, *c = NULL;
    assert_int_equal(sy_model_new(&d, g_be, &a), SY_OK);
    assert_int_equal(sy_model_new(&d, g_be, &b), SY_OK);
    sy_model_init(a, 1234);
    sy_model_init(b, 1234);
    const size_t bytes = sy_model_numel(a) * 4;
    float *pa = sy_test_download_new(g_be, sy_model_params(a), bytes);
    float *pb = sy_test_download_new(g_be, sy_model_params(b), bytes);
    assert_memory_equal(pa, pb, bytes);
    sy_model_init(b, 1235);
    sy_test_download(g_be, pb, sy_model_params(b), bytes);
    int ia = sy_model_find(a, "wte");
    const sy_param_t *p = sy_model_param(a, ia);
    assert_memory_not_equal(pa + p->offset, pb + p->offset, p->numel * 4);

    /* a model with another depth and expert count: same-named tensors are identical */
    sy_model_dims d2 = d;
    d2.L = 4;
    d2.E = 2;
    assert_int_equal(sy_model_new(&d2, g_be, &c), SY_OK);
    sy_model_init(c, 1234);
    float *pc = sy_test_download_new(g_be, sy_model_params(c), sy_model_numel(c) * 4);
    const char *names[] = {"wte", "wpe", "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight",
                           "blocks.1.moe.experts.1.fc.weight", "blocks.0.mlp.proj.weight",
                           "ln_f.weight"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        int i1 = sy_model_find(a, names[i]), i2 = sy_model_find(c, names[i]);
        assert_true(i1 >= 0 && i2 >= 0);
        const sy_param_t *p1 = sy_model_param(a, i1), *p2 = sy_model_param(c, i2);
        assert_int_equal(p1->numel, p2->numel);
        assert_memory_equal(pa + p1->offset, pc + p2->offset, p1->numel * 4);
    }
    /* different names draw different values */
    const sy_param_t *q0 = sy_model_param(a, sy_model_find(a, "blocks.1.moe.experts.0.fc.weight"));
    const sy_param_t *q1 = sy_model_param(a, sy_model_find(a, "blocks.1.moe.experts.1.fc.weight"));
    assert_memory_not_equal(pa + q0->offset, pa + q1->offset, q0->numel * 4);
    free(pa), free(pb), free(pc);
    sy_model_destroy(&a);
    sy_model_destroy(&b);
    sy_model_destroy(&c);
}

/* Std of a standard normal truncated to [-2, 2] (redrawn beyond): sqrt(1 - 2aφ(a)/(2Φ(a)-1)). */
static double trunc_std(void) {
    double a = 2.0, phi = exp(-a * a / 2) / sqrt(2 * M_PI), Z = erf(a / sqrt(2.0));
    return sqrt(1.0 - 2.0 * a * phi / Z);
}

static void test_init_stats(void **state) {
    (void)state;
    sy_model_dims d = tiny_dims();
    d.V = 256, d.T = 64, d.D = 64, d.H = 4, d.F = 256, d.E = 2, d.L = 2, d.B = 1;
    d.init_scale = 0.1;
    sy_model_t *m = NULL;
    assert_int_equal(sy_model_new(&d, g_be, &m), SY_OK);
    sy_model_init(m, 77);
    float *w0 = sy_test_download_new(g_be, sy_model_params(m), sy_model_numel(m) * 4);
    const double ts = trunc_std();
    int n_lin = 0, n_ln = 0;
    for (int i = 0; i < sy_model_n_params(m); i++) {
        const sy_param_t *p = sy_model_param(m, i);
        const float *w = w0 + p->offset;
        if (p->ndim == 1) { /* LayerNorm weights are 1 */
            for (size_t k = 0; k < p->numel; k++) assert_true(w[k] == 1.0f);
            n_ln++;
            continue;
        }
        int emb = !strcmp(p->name, "wte") || !strcmp(p->name, "wpe");
        double sigma = emb ? 0.02 : sqrt(d.init_scale / (double)p->shape[1]); /* fan_in */
        double s = 0, s2 = 0, amax = 0;
        for (size_t k = 0; k < p->numel; k++) {
            s += w[k];
            s2 += (double)w[k] * w[k];
            amax = fmax(amax, fabs(w[k]));
        }
        double n = (double)p->numel, mean = s / n, sd = sqrt(s2 / n - mean * mean);
        double rel_se = 1.0 / sqrt(2 * n); /* standard error of a std estimate, relative */
        if (g_verbose)
            fprintf(stderr, "%-40s n %6zu sd/sigma %.4f (want %.4f) max/sigma %.4f\n", p->name,
                    p->numel, sd / sigma, ts, amax / sigma);
        assert_true(amax <= 2.0 * sigma * (1 + 1e-6)); /* truncated at 2σ */
        if (n >= 2000) {
            assert_true(amax >= 1.9 * sigma); /* and really reaches out to 2σ */
            assert_true(fabs(sd / sigma - ts) < 5 * rel_se * ts);
            assert_true(fabs(mean) < 5 * sigma / sqrt(n));
        }
        n_lin++;
    }
    assert_true(n_ln == 2 * d.L + 1);
    assert_true(n_lin > 8);
    free(w0);
    sy_model_destroy(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grad_every_tensor),
        cmocka_unit_test(test_accumulation),
        cmocka_unit_test(test_capacity_in_model),
        cmocka_unit_test(test_init_pure),
        cmocka_unit_test(test_init_stats),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
