/* The op harness shared by tests/test_backend_emu.c and tests/test_backend_cuda.c: both run the
 * same ops, Switch layer and tiny model on the CPU backend and on another backend from the same
 * host inputs, and compare what they download. For those two test files only; include after
 * <cmocka.h>, "backend/backend.h", "base/bf16.h", "base/config.h", "model/model.h",
 * "model/optim.h", "model/switch.h" and "sy_test.h" (frand, urand, g_sy_test_rs).
 *
 * results: named host copies of what one backend computed, in the order they were added
 *   (res_add downloads a backend buffer, res_add_host copies a host value; res_free frees them).
 * up(be, host, bytes): a backend buffer, uploaded from `host` (NULL: left as alloc gives it);
 *   upa(be, host, bytes) the same as an activation buffer (bf16 storage in bf16 mode).
 * inputs_make(in, bf16_values): the op inputs, drawn from the test file's stream; with
 *   bf16_values every float input is rounded to a bf16 value (no draws are added or skipped).
 * run_ops(be, in, r, all_gemms): every op of the backend table, one by one, each result into r;
 *   all_gemms adds the GEMM forms beyond matmul_fwd / matmul_bwd(dx +=) (dx =, the fp64
 *   accumulating backward, the grouped GEMMs) and causal attention.
 * switch_run / model_run: a Switch layer forward + backward; two steps of a tiny Switch LM
 *   (clipping, AdamW) and an eval loss. model_run raises *param_atol (when not NULL) to
 *   2·lr·steps, the most AdamW can move a parameter in its two steps. */
#ifndef SY_OPS_HARNESS_H
#define SY_OPS_HARNESS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- results of one backend */

#define MAXRES 96

typedef struct {
    int n;
    const char *name[MAXRES];
    void *data[MAXRES];
    size_t bytes[MAXRES];
} results;

static void res_free(results *r) {
    for (int i = 0; i < r->n; i++) free(r->data[i]);
    r->n = 0;
}

/* download `bytes` of backend buffer p under `name` */
static void res_add(results *r, sy_backend_t *be, const char *name, const void *p, size_t bytes) {
    assert_true(r->n < MAXRES);
    void *h = malloc(bytes ? bytes : 1);
    assert_non_null(h);
    if (bytes) be->download(be, h, p, bytes);
    r->name[r->n] = name, r->data[r->n] = h, r->bytes[r->n] = bytes;
    r->n++;
}

static void res_add_host(results *r, const char *name, const void *h, size_t bytes) {
    assert_true(r->n < MAXRES);
    void *c = malloc(bytes);
    assert_non_null(c);
    memcpy(c, h, bytes);
    r->name[r->n] = name, r->data[r->n] = c, r->bytes[r->n] = bytes;
    r->n++;
}

static void *up(sy_backend_t *be, const void *h, size_t bytes) {
    void *p = be->alloc(be, bytes);
    assert_non_null(p);
    if (h) be->upload(be, p, h, bytes);
    return p;
}

/* an activation buffer (alloc_act: bf16 storage in bf16 mode), uploaded from `h` (NULL: zeroed):
 * for the operands model spec §4 keeps in bf16 (activations, their gradients, GEMM weights'
 * working copies); `up` gives the plain buffers of everything else */
static float *upa(sy_backend_t *be, const void *h, size_t bytes) { return sy_test_upload_act(be, h, bytes); }

static float *frand_host(size_t n, double lo, double hi) {
    float *x = malloc(n * sizeof(float));
    assert_non_null(x);
    for (size_t i = 0; i < n; i++) x[i] = (float)frand(lo, hi);
    return x;
}

/* ---------------------------------------------------------------- every op */

/* N above 4096: more than one block of the per-row launches on the device, an sumsq chunk tail,
 * and above SY_EMU_PAR (4096) so that the emulation spreads even the per-row launches over
 * threads, as it does for large activations */
enum { N = 4099, D = 24, V = 50, T = 8, E = 5, C = 600, F = 20, NS = 10001 };

typedef struct {
    float *x, *x2, *w, *wte, *wpe, *logits, *rlogits, *gamma, *fe, *big, *big2, *big3, *big4;
    int32_t tok[N], tgt[N], perm[N], micro[N];
    double acc[NS];
} op_inputs;

static void inputs_make(op_inputs *in, bool bf16_values) {
    in->x = frand_host((size_t)N * D, -3, 3);
    in->x2 = frand_host((size_t)N * D, -1, 1);
    in->w = frand_host(D, 0.5, 1.5);
    in->wte = frand_host((size_t)V * D, -1, 1);
    in->wpe = frand_host((size_t)T * D, -1, 1);
    in->logits = frand_host((size_t)N * V, -8, 8);
    in->rlogits = frand_host((size_t)N * E, -2, 2);
    /* ties: row 0 all equal (expert 0), row 1 two equal maxima (the lower index), row 2 a
     * skewed row so that expert 2 overflows its capacity */
    for (int e = 0; e < E; e++) in->rlogits[e] = 0.25f;
    in->rlogits[E + 1] = in->rlogits[E + 3] = 5.0f;
    for (int n = 3; n < N; n += 2) in->rlogits[n * E + 2] += 4.0f;
    in->gamma = frand_host(N, -1, 1);
    in->fe = frand_host(E, 0, 0.5);
    in->big = frand_host(NS, -2, 2);
    in->big2 = frand_host(NS, -1, 1);
    in->big3 = frand_host(NS, -0.1, 0.1);
    in->big4 = frand_host(NS, 0, 0.01);
    for (int n = 0; n < N; n++) {
        in->tok[n] = (int32_t)(urand() * V);
        in->tgt[n] = (int32_t)(urand() * V);
        in->perm[n] = n;
        in->micro[n] = (int32_t)(urand() * 4);
    }
    in->tok[5] = in->tok[6] = in->tok[20]; /* embedding rows hit several times */
    for (int n = N - 1; n > 0; n--) { /* a permutation: distinct scatter targets */
        int k = (int)(urand() * (n + 1));
        int32_t t = in->perm[n];
        in->perm[n] = in->perm[k], in->perm[k] = t;
    }
    for (int i = 0; i < NS; i++) in->acc[i] = frand(-10, 10);
    if (!bf16_values) return;
    /* every float input a bf16 value, as model spec §4 feeds the GEMMs in bf16 mode (the
     * device converts GEMM inputs to bf16: exact for these, so both backends multiply the same
     * numbers) */
    float *f[] = {in->x, in->x2, in->w, in->wte, in->wpe, in->logits, in->rlogits, in->gamma,
                  in->fe, in->big, in->big2, in->big3, in->big4};
    size_t fn[] = {(size_t)N * D, (size_t)N * D, D, (size_t)V * D, (size_t)T * D, (size_t)N * V,
                   (size_t)N * E, N, E, NS, NS, NS, NS};
    for (size_t k = 0; k < sizeof f / sizeof f[0]; k++)
        for (size_t i = 0; i < fn[k]; i++) f[k][i] = sy_round_bf16(f[k][i]);
}

static void inputs_free(op_inputs *in) {
    float *f[] = {in->x, in->x2, in->w, in->wte, in->wpe, in->logits, in->rlogits, in->gamma,
                  in->fe, in->big, in->big2, in->big3, in->big4};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) free(f[i]);
}

#define FB(n) ((size_t)(n) * sizeof(float))
#define IB(n) ((size_t)(n) * sizeof(int32_t))
#define DB(n) ((size_t)(n) * sizeof(double))

/* run_ops's GEMM forms past the first two, and causal attention (all_gemms) */
static void run_more_gemms(sy_backend_t *be, const op_inputs *in, results *r, const float *x,
                           const float *x2, float *y, float *y2, float *y3, const float *W,
                           float *hy, float *dW) {
    const size_t ND = (size_t)N * D;
    be->matmul_bwd(be, y, dW, hy, x, W, N, D, F, false);
    res_add(r, be, "matmul_bwd dx =", y, FB(ND));
    double *dW64 = up(be, NULL, DB(2 * F * D));
    be->matmul_bwd_acc64(be, y2, dW, dW64, hy, x, W, N, D, F);
    res_add(r, be, "acc64 dx", y2, FB(ND));
    res_add(r, be, "acc64 dW64", dW64, DB(F * D));
    {   /* two problems of different N (the experts' kept counts), one of them empty */
        float *ys[3] = {hy, hy + (size_t)1000 * F, y3};
        const float *xs[3] = {x, x + (size_t)1000 * D, x2};
        const float *Ws[3] = {W, W + F * D / 2, W};
        int Ns[3] = {1000, 0, 77};
        be->matmul_fwd_group(be, ys, xs, Ws, Ns, 3, D, F / 2);
        res_add(r, be, "group y", hy, FB(1000 * F / 2));
        res_add(r, be, "group y3", y3, FB(77 * F / 2));
        float *dxs[3] = {y, y + (size_t)2000 * D, y2};
        float *dWs[3] = {dW, dW + F * D / 2, dW + F * D / 2};
        double *d64s[3] = {dW64, dW64 + F * D, NULL}; /* problem 2: matmul_bwd (dW += ) */
        const float *dys[3] = {hy, hy, y3};
        be->zero(be, dW + F * D / 2, FB(F * D / 2));
        be->matmul_bwd_group(be, dxs, dWs, d64s, dys, xs, Ws, Ns, 3, D, F / 2);
        res_add(r, be, "group dx", y, FB(1000 * D));
        res_add(r, be, "group dx2", y2, FB(77 * D));
        res_add(r, be, "group dW64", dW64, DB(F * D));
        res_add(r, be, "group dW", dW + F * D / 2, FB(F * D / 2));
    }

    /* causal attention: B = 3 sequences of T2 = 40, D2 = 32 over H = 4 heads */
    enum { AB = 3, AT = 40, AD = 32, AH = 4 };
    float *qkv = upa(be, in->x, FB(AB * AT * 3 * AD)), *ao = upa(be, NULL, FB(AB * AT * AD));
    float *att = up(be, NULL, FB(AB * AH * AT * AT)), *dqkv = upa(be, NULL, FB(AB * AT * 3 * AD));
    float *dao = upa(be, in->x2, FB(AB * AT * AD));
    be->attention_fwd(be, ao, att, qkv, AB, AT, AD, AH);
    res_add(r, be, "attention out", ao, FB(AB * AT * AD));
    res_add(r, be, "attention att", att, FB(AB * AH * AT * AT));
    be->attention_bwd(be, dqkv, dao, att, qkv, AB, AT, AD, AH);
    res_add(r, be, "attention dqkv", dqkv, FB(AB * AT * 3 * AD));
    void *more[] = {dW64, qkv, ao, att, dqkv, dao};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++) be->free(be, more[i]);
}

/* Runs every op on `be` from the same host inputs; downloads each result into r. all_gemms: the
 * GEMM forms past matmul_fwd / matmul_bwd(dx +=) and attention too (see the top of this file). */
static void run_ops(sy_backend_t *be, const op_inputs *in, results *r, bool all_gemms) {
    const size_t ND = (size_t)N * D;
    float *x = upa(be, in->x, FB(ND)), *x2 = upa(be, in->x2, FB(ND)), *w = up(be, in->w, FB(D));
    int32_t *tok = up(be, in->tok, IB(N)), *tgt = up(be, in->tgt, IB(N));
    int32_t *perm = up(be, in->perm, IB(N)), *micro = up(be, in->micro, IB(N));
    float *y = upa(be, NULL, FB(ND)), *y2 = upa(be, NULL, FB(ND)), *y3 = upa(be, NULL, FB(ND));
    float *mean = up(be, NULL, FB(N)), *rstd = up(be, NULL, FB(N)), *sc = up(be, NULL, FB(N));

    /* embedding */
    float *wte = upa(be, in->wte, FB(V * D)), *wpe = upa(be, in->wpe, FB(T * D));
    be->embed_fwd(be, y, tok, wte, wpe, N, T, D);
    res_add(r, be, "embed_fwd", y, FB(ND));
    /* the weight gradients are plain fp32 buffers (+=: start from the weights' values) */
    float *gwte = up(be, in->wte, FB(V * D)), *gwpe = up(be, in->wpe, FB(T * D));
    be->embed_bwd(be, gwte, gwpe, x2, tok, N, T, D);
    res_add(r, be, "embed_bwd dwte", gwte, FB(V * D));
    res_add(r, be, "embed_bwd dwpe", gwpe, FB(T * D));

    /* LayerNorm */
    be->layernorm_fwd(be, y, mean, rstd, x, w, N, D);
    res_add(r, be, "layernorm_fwd y", y, FB(ND));
    res_add(r, be, "layernorm_fwd mean", mean, FB(N));
    res_add(r, be, "layernorm_fwd rstd", rstd, FB(N));
    float *dw = up(be, in->w, FB(D));
    be->copy(be, y2, x2, FB(ND));
    be->layernorm_bwd(be, y2, dw, x2, x, w, mean, rstd, N, D);
    res_add(r, be, "layernorm_bwd dx", y2, FB(ND));
    res_add(r, be, "layernorm_bwd dw", dw, FB(D));

    /* GELU, residual add, mul, round */
    be->gelu_fwd(be, y, x, ND);
    res_add(r, be, "gelu_fwd", y, FB(ND));
    be->gelu_bwd(be, y2, x2, x, ND);
    res_add(r, be, "gelu_bwd", y2, FB(ND));
    be->add_inplace(be, y, x2, ND);
    res_add(r, be, "add_inplace", y, FB(ND));
    be->copy(be, y3, x, FB(ND));
    be->mul_inplace(be, y3, x2, ND);
    res_add(r, be, "mul_inplace", y3, FB(ND));
    be->round_bf16(be, y3, ND);
    res_add(r, be, "round_bf16", y3, FB(ND));

    /* cross-entropy: separate gradient, in place, loss only */
    float *lg = up(be, in->logits, FB(N * V)), *dl = up(be, NULL, FB(N * V));
    double l1 = be->xent_fwd_bwd(be, dl, lg, tgt, N, V, 1.0f / N);
    res_add(r, be, "xent dlogits", dl, FB(N * V));
    double l2 = be->xent_fwd(be, lg, tgt, N, V);
    double l3 = be->xent_fwd_bwd(be, lg, lg, tgt, N, V, 0.5f);
    res_add(r, be, "xent dlogits in place", lg, FB(N * V));
    double ls[3] = {l1, l2, l3};
    res_add_host(r, "xent losses", ls, sizeof ls);

    /* gather / scatter / combine backward */
    be->gather_rows(be, y, x, perm, N, D);
    res_add(r, be, "gather_rows", y, FB(ND));
    be->upload(be, sc, in->gamma, FB(N));
    be->copy(be, y2, x2, FB(ND));
    be->scatter_rows_scaled(be, y2, x, perm, sc, N - 4, D);
    res_add(r, be, "scatter_rows_scaled", y2, FB(ND));
    be->scatter_add_rows(be, y2, x, perm, N - 3, D);
    res_add(r, be, "scatter_add_rows", y2, FB(ND));
    float *dot = up(be, NULL, FB(N));
    be->gather_dot_scale(be, dot, y3, x, x2, perm, sc, N, D);
    res_add(r, be, "gather_dot_scale dot", dot, FB(N));
    res_add(r, be, "gather_dot_scale out", y3, FB(ND));

    /* router */
    float *rl = up(be, in->rlogits, FB(N * E)), *probs = up(be, NULL, FB(N * E));
    int32_t *expert = up(be, NULL, IB(N));
    float *gate = up(be, NULL, FB(N)), *lse = up(be, NULL, FB(N));
    be->router_fwd(be, probs, expert, gate, lse, rl, N, E);
    res_add(r, be, "router_fwd probs", probs, FB(N * E));
    res_add(r, be, "router_fwd expert", expert, IB(N));
    res_add(r, be, "router_fwd gate", gate, FB(N));
    res_add(r, be, "router_fwd lse", lse, FB(N));
    float *fe = up(be, in->fe, FB(E)), *drl = up(be, NULL, FB(N * E));
    be->router_bwd(be, drl, probs, expert, sc, lse, fe, 0.03f, 0.002f, N, E);
    res_add(r, be, "router_bwd", drl, FB(N * E));

    /* route plan */
    int32_t *counts = up(be, NULL, IB(E)), *kept = up(be, NULL, IB(E));
    int32_t *offs = up(be, NULL, IB(E + 1));
    int32_t *order = up(be, NULL, IB(N)), *slot = up(be, NULL, IB(N));
    float *gk = up(be, NULL, FB(N));
    be->route_plan(be, counts, kept, offs, order, slot, gk, expert, gate, N, E, C);
    int32_t hk[E + 1];
    be->download(be, hk, offs, IB(E + 1));
    const int n_kept = hk[E];
    assert_true(n_kept < N); /* capacity dropped tokens */
    res_add(r, be, "route_plan counts", counts, IB(E));
    res_add(r, be, "route_plan kept", kept, IB(E));
    res_add(r, be, "route_plan offsets", offs, IB(E + 1));
    res_add(r, be, "route_plan order", order, IB(n_kept));
    res_add(r, be, "route_plan slot", slot, IB(N));
    res_add(r, be, "route_plan gk", gk, FB(n_kept));
    double *stats = up(be, NULL, DB(2));
    float *f = up(be, NULL, FB(E));
    be->route_stats(be, stats, f, probs, lse, counts, N, E);
    res_add(r, be, "route_stats", stats, DB(2));
    res_add(r, be, "route_stats f", f, FB(E));
    float *gamma = up(be, NULL, FB(N));
    be->route_gamma(be, gamma, dot, slot, N);
    res_add(r, be, "route_gamma", gamma, FB(N));

    /* jitter and dropout draws */
    float *u = up(be, NULL, FB(ND));
    be->jitter_fwd(be, u, y, x, N, D, 0.01f, 1234, 7, 2, 3);
    res_add(r, be, "jitter_fwd u", u, FB(ND));
    res_add(r, be, "jitter_fwd xr", y, FB(ND));
    be->copy(be, y2, x, FB(ND));
    be->jitter_bwd(be, y2, x2, u, ND);
    be->jitter_bwd(be, y2, x2, NULL, ND);
    res_add(r, be, "jitter_bwd", y2, FB(ND));
    float *mask = up(be, NULL, FB(N * F));
    be->dropout_mask(be, mask, tok, micro, N, F, 0.9f, 1.0f / 0.9f, 99, 5, 0, 1);
    res_add(r, be, "dropout_mask micro[]", mask, FB(N * F));
    be->dropout_mask(be, mask, perm, NULL, N, F, 0.7f, 1.0f / 0.7f, 99, 5, 3, 1);
    res_add(r, be, "dropout_mask micro0", mask, FB(N * F));

    /* wire format */
    void *wire = up(be, NULL, FB(ND));
    be->wire_put(be, wire, x, ND, 2);
    res_add(r, be, "wire_put bf16", wire, ND * 2);
    be->wire_get(be, y, wire, ND, 2);
    res_add(r, be, "wire_get bf16", y, FB(ND));
    be->wire_put(be, wire, x2, ND, 4);
    be->wire_get(be, y, wire, ND, 4);
    res_add(r, be, "wire fp32", y, FB(ND));

    /* parameter path: fp64 accumulation, norms, clipping, AdamW */
    double *acc = up(be, in->acc, DB(NS)), *sq = up(be, NULL, DB(1));
    float *g = up(be, in->big, FB(NS)), *p = up(be, in->big2, FB(NS));
    float *m = up(be, in->big3, FB(NS)), *v = up(be, in->big4, FB(NS));
    be->acc_add_f32(be, acc, g, NS);
    res_add(r, be, "acc_add_f32", acc, DB(NS));
    be->acc_to_f32(be, g, acc, NS);
    res_add(r, be, "acc_to_f32", g, FB(NS));
    be->sumsq_add(be, sq, g, NS);
    be->sumsq_add(be, sq, p, 100);
    res_add(r, be, "sumsq_add", sq, DB(1));
    be->scale(be, g, NS, 0.37f);
    res_add(r, be, "scale", g, FB(NS));
    be->adamw(be, p, g, m, v, NS, 0.999f, 0.9f, 0.95f, 3e-4f, 1.0f / sqrtf(0.0975f), 1e-8f);
    res_add(r, be, "adamw p", p, FB(NS));
    res_add(r, be, "adamw m", m, FB(NS));
    res_add(r, be, "adamw v", v, FB(NS));

    /* GEMMs (all_gemms: every form the model and the Switch layer use) */
    float *W = upa(be, in->big, FB(F * D)), *hy = upa(be, NULL, FB(N * F));
    float *dW = up(be, NULL, FB(F * D));
    be->matmul_fwd(be, hy, x, W, N, D, F);
    res_add(r, be, "matmul_fwd", hy, FB(N * F));
    be->matmul_bwd(be, y, dW, hy, x, W, N, D, F, true);
    res_add(r, be, "matmul_bwd dx", y, FB(ND));
    res_add(r, be, "matmul_bwd dW", dW, FB(F * D));
    if (all_gemms) run_more_gemms(be, in, r, x, x2, y, y2, y3, W, hy, dW);

    void *bufs[] = {x, x2, w, tok, tgt, perm, micro, y, y2, y3, mean, rstd, sc, wte, wpe, gwte, gwpe, dw, lg,
                    dl, dot, rl, probs, expert, gate, lse, fe, drl, counts, kept, offs, order,
                    slot, gk, stats, f, gamma, u, mask, wire, acc, sq, g, p, m, v, W, hy, dW};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->free(be, bufs[i]);
}

/* ---------------------------------------------------------------- a Switch layer */

enum { SG = 48, SD = 16, SF = 32, SE = 4 };

static void switch_run(sy_backend_t *be, uint64_t seed, results *r) {
    g_sy_test_rs = seed; /* the same inputs on each backend */
    float *h = frand_host((size_t)SG * SD, -1, 1), *Wr = frand_host((size_t)SE * SD, -0.5, 0.5);
    float *W1 = frand_host((size_t)SE * SF * SD, -0.3, 0.3);
    float *W2 = frand_host((size_t)SE * SD * SF, -0.3, 0.3);
    float *dout = frand_host((size_t)SG * SD, -1, 1);
    for (size_t i = 0; i < (size_t)SG * SD; i++) h[i] = sy_round_bf16(h[i]);
    sy_switch_t *sw = NULL;
    assert_int_equal(sy_switch_new(be, SG, SD, SF, SE, &sw), SY_OK);
    float *bh = upa(be, h, FB(SG * SD)), *bWr = up(be, Wr, FB(SE * SD));
    float *bW1 = upa(be, W1, FB(SE * SF * SD));
    float *bW2 = upa(be, W2, FB(SE * SD * SF)), *bdout = upa(be, dout, FB(SG * SD));
    float *out = upa(be, NULL, FB(SG * SD)), *dh = upa(be, NULL, FB(SG * SD));
    float *dWr = up(be, NULL, FB(SE * SD));
    float *dW1 = up(be, NULL, FB(SE * SF * SD)), *dW2 = up(be, NULL, FB(SE * SD * SF));
    double *acc1 = up(be, NULL, DB(SE * SF * SD)), *acc2 = up(be, NULL, DB(SE * SD * SF));
    sy_expert_weights ex[SE];
    for (int e = 0; e < SE; e++)
        ex[e] = (sy_expert_weights){bW1 + (size_t)e * SF * SD, bW2 + (size_t)e * SD * SF,
                                    dW1 + (size_t)e * SF * SD, dW2 + (size_t)e * SD * SF,
                                    acc1 + (size_t)e * SF * SD, acc2 + (size_t)e * SD * SF};
    sy_switch_key key = {77, 3, 1, 2};
    sy_switch_route(sw, bh, bWr, 1.0, 0.01, key); /* capacity 12 of 48 tokens over 4: drops */
    sy_switch_dispatch(sw, bh);
    sy_switch_experts(sw, ex, 0, SE, 0.1, key);
    sy_switch_combine(sw, out);
    sy_switch_combine_bwd(sw, bdout);
    sy_switch_experts_bwd(sw, ex, 0, SE);
    sy_switch_dispatch_bwd(sw, dh);
    sy_switch_route_bwd(sw, bh, bWr, dWr, dh, 0.01f * SE / SG, 0.001f * 2 / SG);
    sy_switch_info info = sy_switch_get_info(sw);
    assert_true(info.n_kept < SG); /* capacity dropped tokens */
    double loss[2] = {info.aux_group, info.z_group};
    res_add_host(r, "switch aux, z", loss, sizeof loss);
    res_add_host(r, "switch counts", info.counts, IB(SE));
    res_add_host(r, "switch offsets", info.offsets, IB(SE + 1));
    res_add(r, be, "switch out", out, FB(SG * SD));
    res_add(r, be, "switch dh", dh, FB(SG * SD));
    res_add(r, be, "switch dWr", dWr, FB(SE * SD));
    res_add(r, be, "switch acc W1", acc1, DB(SE * SF * SD));
    res_add(r, be, "switch acc W2", acc2, DB(SE * SD * SF));
    void *bufs[] = {bh, bWr, bW1, bW2, bdout, out, dh, dWr, dW1, dW2, acc1, acc2};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->free(be, bufs[i]);
    sy_switch_destroy(&sw);
    free(h), free(Wr), free(W1), free(W2), free(dout);
}

/* ---------------------------------------------------------------- a tiny model step */

static void model_run(sy_backend_t *be, bool bf16, results *r, double *param_atol) {
    sy_config_t cfg;
    assert_int_equal(sy_config_defaults(&cfg), SY_OK);
    cfg.model.vocab_size = 64;
    cfg.model.seq_len = 8;
    cfg.model.d_model = 32;
    cfg.model.n_heads = 4;
    cfg.model.d_ff = 64;
    cfg.model.n_experts = 4;
    cfg.model.n_layers = 2;
    cfg.model.switch_every = 2;
    cfg.model.capacity_factor = 1.0;
    cfg.model.router_jitter = 0.01;
    cfg.model.expert_dropout = 0.1;
    cfg.train.micro_batch_seqs = 4;
    cfg.train.precision = bf16 ? SY_PREC_BF16 : SY_PREC_FP32;
    sy_model_dims d = sy_model_dims_from_config(&cfg);
    sy_model_t *m = NULL;
    sy_adamw_t *opt = NULL;
    assert_int_equal(sy_model_new(&d, be, &m), SY_OK);
    assert_int_equal(sy_adamw_new(m, &cfg, &opt), SY_OK);
    sy_model_init(m, 4242);
    g_sy_test_rs = 0x70c;
    int32_t tok[2][4 * 9];
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < 4 * 9; i++) tok[k][i] = (int32_t)(urand() * d.V);
    sy_losses l[3];
    for (int step = 0; step < 2; step++) {
        sy_model_zero_grads(m);
        for (int k = 0; k < 2; k++)
            assert_int_equal(sy_model_fwd_bwd(m, tok[k], 2, (sy_draw_key){4242, step, k}, &l[k]),
                             SY_OK);
        const size_t n = sy_model_numel(m);
        double norm = sqrt(sy_grad_sqnorm(be, sy_model_grads(m), n));
        sy_clip_grads(be, sy_model_grads(m), n, norm, 0.5);
        sy_adamw_step(opt, sy_lr_at(&cfg, step));
        const double lr = sy_lr_at(&cfg, step);
        if (param_atol && 4 * lr > *param_atol) *param_atol = 4 * lr; /* 2 steps, lr each */
        sy_model_weights_changed(m);
        res_add_host(r, "model losses", l, 2 * sizeof l[0]);
        res_add_host(r, "model grad norm", &norm, sizeof norm);
    }
    assert_int_equal(sy_model_forward_eval(m, tok[0], 1, &l[2]), SY_OK);
    res_add_host(r, "model eval loss", &l[2], sizeof l[2]);
    res_add(r, be, "model params", sy_model_params(m), FB(sy_model_numel(m)));
    res_add(r, be, "model adam m", sy_adamw_m(opt), FB(sy_model_numel(m)));
    res_add(r, be, "model adam v", sy_adamw_v(opt), FB(sy_model_numel(m)));
    sy_adamw_destroy(&opt);
    sy_model_destroy(&m);
    sy_config_free(&cfg);
}

#endif /* SY_OPS_HARNESS_H */
