/* src/model/switch: the Switch layer against a direct fp64 reimplementation of model spec §2 written
 * here (router softmax, top-1 with ties to the lowest index, capacity, in-order drops, gate not
 * renormalised, aux and z losses), the §2 invariants, and the backward against central finite
 * differences of L = Σ r ⊙ out + aux_coef·aux_group + z_coef·z_group (one group, n_groups = 1).
 * Jitter and expert dropout are pure functions of the key, so finite differences of the layer
 * itself (fp32 forward, fp64 accumulation of L) reproduce them.
 * The layer's buffers are treated as device memory (inputs uploaded, results and the backend
 * fields of sy_switch_info downloaded), so the file passes with SY_BACKEND_POISON=1 too. */
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
#include "model/switch.h"

#define SY_TEST_SEED 0x51c4ULL
#include "sy_test.h"

#define EMAX 8

/* ---------------------------------------------------------------- helpers */

static sy_backend_t *g_be;

static int setup(void **state) {
    (void)state;
    return sy_backend_cpu_new(1, false, &g_be) == SY_OK ? 0 : -1;
}
static int teardown(void **state) {
    (void)state;
    sy_backend_destroy(&g_be);
    return 0;
}

/* ---------------------------------------------------------------- fp64 reference of spec §2 */

typedef struct {
    int G, D, F, E;
    double cf;
    double *h;  /* [G,D] */
    double *Wr; /* [E,D] */
    double *W1; /* E x [F,D] */
    double *W2; /* E x [D,F] */
} ref_in;

typedef struct {
    double *out;   /* [G,D] */
    double *probs; /* [G,E] */
    double gate[256];
    int expert[256], keep[256], counts[EMAX];
    int C;
    double aux, z;
} ref_out;

static double gelu_d(double x) {
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

static int ref_capacity(int G, int E, double cf) {
    int c = (int)ceil(cf * G / E);
    if (c < 4) c = 4;
    return c < G ? c : G;
}

static void ref_switch(const ref_in *in, ref_out *o) {
    const int G = in->G, D = in->D, F = in->F, E = in->E;
    o->C = ref_capacity(G, E, in->cf);
    double P[EMAX] = {0}, z2 = 0.0;
    int pos[EMAX] = {0};
    for (int e = 0; e < E; e++) o->counts[e] = 0;
    for (int t = 0; t < G; t++) {
        const double *h = in->h + t * D;
        double z[EMAX], mx = -INFINITY, s = 0.0;
        for (int e = 0; e < E; e++) {
            z[e] = 0.0;
            for (int i = 0; i < D; i++) z[e] += h[i] * in->Wr[e * D + i];
            mx = fmax(mx, z[e]);
        }
        for (int e = 0; e < E; e++) s += exp(z[e] - mx);
        double lse = mx + log(s);
        int best = 0;
        for (int e = 0; e < E; e++) {
            o->probs[t * E + e] = exp(z[e] - mx) / s;
            P[e] += o->probs[t * E + e] / G;
            if (z[e] > z[best]) best = e; /* strict: ties go to the lowest index */
        }
        z2 += lse * lse / G;
        o->expert[t] = best;
        o->gate[t] = o->probs[t * E + best];
        o->counts[best]++;
        o->keep[t] = pos[best]++ < o->C; /* earlier tokens win a slot */
        double *y = o->out + t * D;
        for (int i = 0; i < D; i++) y[i] = 0.0;
        if (!o->keep[t]) continue;
        const double *W1 = in->W1 + (size_t)best * F * D, *W2 = in->W2 + (size_t)best * D * F;
        double a[64];
        for (int j = 0; j < F; j++) {
            double s1 = 0.0;
            for (int i = 0; i < D; i++) s1 += W1[j * D + i] * h[i];
            a[j] = gelu_d(s1);
        }
        for (int i = 0; i < D; i++) {
            double s2 = 0.0;
            for (int j = 0; j < F; j++) s2 += W2[i * F + j] * a[j];
            y[i] = o->gate[t] * s2;
        }
    }
    o->aux = 0.0;
    for (int e = 0; e < E; e++) o->aux += (double)o->counts[e] / G * P[e];
    o->aux *= E;
    o->z = z2;
}

/* ---------------------------------------------------------------- the layer under test */

/* The test works on host arrays (h, Wr, W1, W2, dout: inputs it sets; out, dh, dWr, dW1, dW2:
 * results it reads) and treats the backend buffers in L->b as device memory: layer_fwd and
 * layer_bwd upload the inputs before the layer runs and download its results after, and
 * layer_info downloads the backend fields of sy_switch_info into host copies. */
typedef struct {
    float *h, *Wr, *dWr, *out, *dout, *dh;
    float *W1, *W2, *dW1, *dW2; /* E consecutive [F,D] / [D,F] blocks */
} layer_bufs;

typedef struct {
    int G, D, F, E;
    sy_switch_t *sw;
    float *h, *Wr, *dWr, *out, *dout, *dh; /* host */
    float *W1, *W2, *dW1, *dW2;             /* host, E consecutive [F,D] / [D,F] blocks */
    layer_bufs b;                           /* backend copies */
    sy_expert_weights ex[EMAX];             /* over the backend copies */
    int32_t inf_expert[256], inf_order[256];
    float inf_gate[256], inf_probs[256 * EMAX];
} layer;

static float *falloc(size_t n) {
    float *p = g_be->alloc(g_be, n * sizeof(float));
    assert_non_null(p);
    return p;
}
static float *halloc(size_t n) {
    float *p = calloc(n, sizeof(float));
    assert_non_null(p);
    return p;
}

static void layer_new(layer *L, int G, int D, int F, int E) {
    memset(L, 0, sizeof *L);
    L->G = G, L->D = D, L->F = F, L->E = E;
    assert_true(G <= 256 && E <= EMAX);
    assert_int_equal(sy_switch_new(g_be, G, D, F, E, &L->sw), SY_OK);
    const size_t n[10] = {(size_t)G * D, (size_t)E * D, (size_t)E * D, (size_t)G * D,
                          (size_t)G * D, (size_t)G * D, (size_t)E * F * D, (size_t)E * D * F,
                          (size_t)E * F * D, (size_t)E * D * F};
    float **host[10] = {&L->h, &L->Wr, &L->dWr, &L->out, &L->dout, &L->dh,
                        &L->W1, &L->W2, &L->dW1, &L->dW2};
    float **dev[10] = {&L->b.h, &L->b.Wr, &L->b.dWr, &L->b.out, &L->b.dout, &L->b.dh,
                       &L->b.W1, &L->b.W2, &L->b.dW1, &L->b.dW2};
    for (int i = 0; i < 10; i++) *host[i] = halloc(n[i]), *dev[i] = falloc(n[i]);
    for (int e = 0; e < E; e++)
        L->ex[e] = (sy_expert_weights){L->b.W1 + (size_t)e * F * D, L->b.W2 + (size_t)e * D * F,
                                       L->b.dW1 + (size_t)e * F * D, L->b.dW2 + (size_t)e * D * F,
                                       NULL, NULL};
}

static void layer_free(layer *L) {
    sy_switch_destroy(&L->sw);
    float *h[] = {L->h, L->Wr, L->dWr, L->out, L->dout, L->dh, L->W1, L->W2, L->dW1, L->dW2};
    float *b[] = {L->b.h, L->b.Wr, L->b.dWr, L->b.out, L->b.dout,
                  L->b.dh, L->b.W1, L->b.W2, L->b.dW1, L->b.dW2};
    for (size_t i = 0; i < sizeof b / sizeof b[0]; i++) free(h[i]), g_be->free(g_be, b[i]);
}

static void up(float *dev, const float *host, size_t n) {
    g_be->upload(g_be, dev, host, n * sizeof(float));
}
static void down(float *host, const float *dev, size_t n) {
    sy_test_download(g_be, host, dev, n * sizeof(float));
}

/* The forward's inputs, host -> backend. */
static void layer_upload(layer *L) {
    const size_t GD = (size_t)L->G * L->D, ED = (size_t)L->E * L->D, EFD = ED * L->F;
    up(L->b.h, L->h, GD), up(L->b.Wr, L->Wr, ED), up(L->b.W1, L->W1, EFD), up(L->b.W2, L->W2, EFD);
}

/* sy_switch_get_info with expert, gate, probs and order downloaded into L (valid until the next
 * layer_info): the host fields are the layer's own. */
static sy_switch_info layer_info(layer *L) {
    sy_switch_info inf = sy_switch_get_info(L->sw);
    down(L->inf_gate, inf.gate, (size_t)inf.G);
    down(L->inf_probs, inf.probs, (size_t)inf.G * inf.E);
    sy_test_download(g_be, L->inf_expert, inf.expert, sizeof(int32_t) * inf.G);
    sy_test_download(g_be, L->inf_order, inf.order, sizeof(int32_t) * inf.n_kept);
    inf.expert = L->inf_expert, inf.gate = L->inf_gate, inf.probs = L->inf_probs;
    inf.order = L->inf_order;
    return inf;
}

static void layer_fwd(layer *L, double cf, double jitter, double dropout, sy_switch_key key) {
    layer_upload(L);
    sy_switch_route(L->sw, L->b.h, L->b.Wr, cf, jitter, key);
    sy_switch_dispatch(L->sw, L->b.h);
    sy_switch_experts(L->sw, L->ex, 0, L->E, dropout, key);
    sy_switch_combine(L->sw, L->b.out);
    down(L->out, L->b.out, (size_t)L->G * L->D);
}

/* Runs on the forward state of the last layer_fwd (whose inputs are still on the backend). */
static void layer_bwd(layer *L, double aux_coef, double z_coef) {
    const int G = L->G, D = L->D, F = L->F, E = L->E;
    float aux_scale = (float)(aux_coef * E / G), z_scale = (float)(z_coef * 2.0 / G);
    up(L->b.dout, L->dout, (size_t)G * D);
    sy_switch_combine_bwd(L->sw, L->b.dout);
    sy_switch_experts_bwd(L->sw, L->ex, 0, E);
    sy_switch_dispatch_bwd(L->sw, L->b.dh);
    sy_switch_route_bwd(L->sw, L->b.h, L->b.Wr, L->b.dWr, L->b.dh, aux_scale, z_scale);
    down(L->dh, L->b.dh, (size_t)G * D);
    down(L->dWr, L->b.dWr, (size_t)E * D);
    down(L->dW1, L->b.dW1, (size_t)E * F * D);
    down(L->dW2, L->b.dW2, (size_t)E * D * F);
}

/* Weight gradients accumulate on the backend: zero both copies. */
static void zero_grads(layer *L) {
    const size_t ED = (size_t)L->E * L->D, EFD = ED * L->F;
    g_be->zero(g_be, L->b.dWr, sizeof(float) * ED);
    g_be->zero(g_be, L->b.dW1, sizeof(float) * EFD);
    g_be->zero(g_be, L->b.dW2, sizeof(float) * EFD);
    memset(L->dWr, 0, sizeof(float) * ED);
    memset(L->dW1, 0, sizeof(float) * EFD);
    memset(L->dW2, 0, sizeof(float) * EFD);
}

/* fp64 copies of the layer's inputs, for the reference */
typedef struct {
    ref_in in;
    ref_out o;
    double *r;
    double aux_coef, z_coef;
    const int *base_expert; /* routing at the base point, to detect flips */
    int flipped;
} ref_ctx;

static void ref_ctx_new(ref_ctx *c, const layer *L, double cf) {
    const int G = L->G, D = L->D, F = L->F, E = L->E;
    memset(c, 0, sizeof *c);
    c->in = (ref_in){G, D, F, E, cf, calloc((size_t)G * D, 8), calloc((size_t)E * D, 8),
                     calloc((size_t)E * F * D, 8), calloc((size_t)E * D * F, 8)};
    for (int i = 0; i < G * D; i++) c->in.h[i] = L->h[i];
    for (int i = 0; i < E * D; i++) c->in.Wr[i] = L->Wr[i];
    for (int i = 0; i < E * F * D; i++) c->in.W1[i] = L->W1[i], c->in.W2[i] = L->W2[i];
    c->o.out = calloc((size_t)G * D, 8);
    c->o.probs = calloc((size_t)G * E, 8);
    c->r = calloc((size_t)G * D, 8);
    for (int i = 0; i < G * D; i++) c->r[i] = L->dout[i];
    assert_true(G <= 256 && E <= EMAX && F <= 64);
}

static void ref_ctx_free(ref_ctx *c) {
    free(c->in.h), free(c->in.Wr), free(c->in.W1), free(c->in.W2);
    free(c->o.out), free(c->o.probs), free(c->r);
}

static double ref_loss(ref_ctx *c) {
    ref_switch(&c->in, &c->o);
    double L = 0.0;
    for (int i = 0; i < c->in.G * c->in.D; i++) L += c->r[i] * c->o.out[i];
    if (c->base_expert)
        for (int t = 0; t < c->in.G; t++)
            if (c->o.expert[t] != c->base_expert[t]) c->flipped = 1;
    return L + c->aux_coef * c->o.aux + c->z_coef * c->o.z;
}

static void ref_fd(ref_ctx *c, double *x, size_t n, double *g) {
    const double h = 1e-6;
    for (size_t i = 0; i < n; i++) {
        double s = x[i];
        x[i] = s + h;
        double fp = ref_loss(c);
        x[i] = s - h;
        double fm = ref_loss(c);
        x[i] = s;
        g[i] = (fp - fm) / (2 * h);
    }
    assert_false(c->flipped); /* h = 1e-6 must not flip a routing decision */
}

/* Checks the layer's forward state against the reference at L's inputs. */
static void check_forward(layer *L, ref_ctx *c) {
    const int G = L->G, D = L->D, E = L->E;
    ref_loss(c);
    sy_switch_info inf = layer_info(L);
    assert_int_equal(inf.C, c->o.C);
    for (int t = 0; t < G; t++) assert_int_equal(inf.expert[t], c->o.expert[t]);
    for (int e = 0; e < E; e++) assert_int_equal(inf.counts[e], c->o.counts[e]);
    check_close("probs", inf.probs, c->o.probs, (size_t)G * E, 1e-6, 1e-6);
    check_close("gate", inf.gate, c->o.gate, G, 1e-6, 1e-6);
    check_close("out", L->out, c->o.out, (size_t)G * D, 1e-6, 1e-5);
    for (int t = 0; t < G; t++)
        if (!c->o.keep[t])
            for (int i = 0; i < D; i++) assert_true(L->out[t * D + i] == 0.0f);
    assert_true(fabs(inf.aux_group - c->o.aux) < 1e-6 * fabs(c->o.aux) + 1e-7);
    assert_true(fabs(inf.z_group - c->o.z) < 1e-6 * fabs(c->o.z) + 1e-7);
    /* Σ f = 1 and Σ P = 1 */
    int nk = 0, nc = 0;
    double Psum = 0.0;
    for (int e = 0; e < E; e++) nc += inf.counts[e], nk += inf.kept[e];
    assert_int_equal(nc, G);
    assert_int_equal(nk, inf.n_kept);
    for (int t = 0; t < G; t++) {
        double s = 0.0;
        for (int e = 0; e < E; e++) s += inf.probs[t * E + e];
        assert_true(fabs(s - 1.0) < 1e-6);
        Psum += s / G;
    }
    assert_true(fabs(Psum - 1.0) < 1e-6);
}

/* ---------------------------------------------------------------- capacity */

static void test_capacity_table(void **state) {
    (void)state;
    /* C = min(G, max(4, ceil(cf·G/E))), worked by hand */
    const struct {
        int G, E;
        double cf;
        int C;
    } cases[] = {
        {16, 4, 1.0, 4},  {16, 4, 1.25, 5},  {64, 8, 1.25, 10}, {12, 3, 1.0, 4},
        {8, 16, 1.0, 4},  {3, 2, 1.0, 3},    {100, 3, 1.0, 34}, {100, 7, 2.0, 29},
        {10, 1, 1.0, 10}, {10, 1, 2.0, 10},  {1, 1, 1.25, 1},   {48, 8, 1.5, 9},
        {12, 4, 0.5, 4},  {40, 4, 0.5, 5},   {1024, 64, 1.25, 20}, {2, 8, 2.0, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int got = sy_switch_capacity(cases[i].G, cases[i].E, cases[i].cf);
        if (got != cases[i].C)
            fprintf(stderr, "capacity(G=%d, E=%d, cf=%g) = %d, want %d\n", cases[i].G,
                    cases[i].E, cases[i].cf, got, cases[i].C);
        assert_int_equal(got, cases[i].C);
    }
}

/* ---------------------------------------------------------------- constructed routing */

/* W_r = [I_E | 0] and h_t = small noise + 3·e_target(t): token t goes to target(t). */
static void construct_routing(layer *L, const int *target) {
    const int G = L->G, D = L->D, E = L->E;
    memset(L->Wr, 0, sizeof(float) * E * D);
    for (int e = 0; e < E; e++) L->Wr[e * D + e] = 1.0f;
    fill(L->h, (size_t)G * D, -0.1, 0.1);
    for (int t = 0; t < G; t++) L->h[t * D + target[t]] += 3.0f;
}

static void test_inorder_drops(void **state) {
    (void)state;
    enum { G = 12, D = 6, F = 8, E = 3 };
    const int target[G] = {0, 1, 0, 0, 2, 0, 0, 1, 0, 0, 0, 0}; /* counts 9, 2, 1 */
    layer L;
    layer_new(&L, G, D, F, E);
    construct_routing(&L, target);
    fill(L.W1, (size_t)E * F * D, -0.5, 0.5);
    fill(L.W2, (size_t)E * D * F, -0.5, 0.5);
    sy_switch_key key = {1, 0, 0, 0};

    /* cf 1.0: C = max(4, ceil(12/3)) = 4: expert 0 keeps tokens 0, 2, 3, 5 */
    layer_fwd(&L, 1.0, 0.0, 0.0, key);
    sy_switch_info inf = layer_info(&L);
    assert_int_equal(inf.C, 4);
    const int32_t counts[E] = {9, 2, 1}, kept[E] = {4, 2, 1}, offsets[E + 1] = {0, 4, 6, 7};
    const int32_t order[7] = {0, 2, 3, 5, 1, 7, 4};
    assert_memory_equal(inf.counts, counts, sizeof counts);
    assert_memory_equal(inf.kept, kept, sizeof kept);
    assert_memory_equal(inf.offsets, offsets, sizeof offsets);
    assert_int_equal(inf.n_kept, 7);
    assert_memory_equal(inf.order, order, sizeof order);
    for (int t = 0; t < G; t++) assert_int_equal(inf.expert[t], target[t]);
    const int dropped[] = {6, 8, 9, 10, 11};
    for (size_t k = 0; k < sizeof dropped / sizeof dropped[0]; k++)
        for (int i = 0; i < D; i++) assert_true(L.out[dropped[k] * D + i] == 0.0f);
    ref_ctx c;
    ref_ctx_new(&c, &L, 1.0);
    check_forward(&L, &c);
    /* the gate is the chosen probability, not renormalised to 1 */
    for (int t = 0; t < G; t++) {
        assert_true(inf.gate[t] < 0.999f);
        assert_true(fabs(inf.gate[t] - c.o.probs[t * E + target[t]]) < 1e-6);
    }
    ref_ctx_free(&c);

    /* cf 2.0: C = 8: expert 0 keeps its first 8 (0 2 3 5 6 8 9 10), drops 11 */
    layer_fwd(&L, 2.0, 0.0, 0.0, key);
    inf = layer_info(&L);
    assert_int_equal(inf.C, 8);
    const int32_t order2[11] = {0, 2, 3, 5, 6, 8, 9, 10, 1, 7, 4};
    assert_int_equal(inf.n_kept, 11);
    assert_memory_equal(inf.order, order2, sizeof order2);
    for (int i = 0; i < D; i++) assert_true(L.out[11 * D + i] == 0.0f);
    for (int t = 0; t < 11; t++) {
        double s = 0.0;
        for (int i = 0; i < D; i++) s += fabs(L.out[t * D + i]);
        assert_true(s > 0.0);
    }
    ref_ctx_new(&c, &L, 2.0);
    check_forward(&L, &c);
    ref_ctx_free(&c);
    layer_free(&L);
}

/* ---------------------------------------------------------------- random routing, with drops */

static void random_layer(layer *L, int boost) {
    const int G = L->G, D = L->D, E = L->E;
    fill(L->h, (size_t)G * D, -1, 1);
    fill(L->Wr, (size_t)E * D, -1, 1);
    fill(L->W1, (size_t)E * L->F * D, -0.6, 0.6);
    fill(L->W2, (size_t)E * D * L->F, -0.6, 0.6);
    fill(L->dout, (size_t)G * D, -1, 1);
    if (boost) { /* most tokens prefer expert 0, so it overflows */
        for (int t = 0; t < G; t++) L->h[t * D] += 1.0f;
        L->Wr[0] += 1.2f;
    }
}

static void test_forward_vs_reference(void **state) {
    (void)state;
    enum { G = 16, D = 6, F = 8, E = 3 };
    layer L;
    layer_new(&L, G, D, F, E);
    random_layer(&L, 1);
    sy_switch_key key = {1, 0, 0, 0};
    for (int k = 0; k < 3; k++) {
        double cf = k == 0 ? 1.0 : k == 1 ? 1.25 : 2.0;
        layer_fwd(&L, cf, 0.0, 0.0, key);
        ref_ctx c;
        ref_ctx_new(&c, &L, cf);
        check_forward(&L, &c);
        if (k == 0) { /* the case is meant to drop tokens and use several experts */
            sy_switch_info inf = layer_info(&L);
            assert_true(inf.n_kept < G);
            int used = 0;
            for (int e = 0; e < E; e++) used += inf.kept[e] > 0;
            assert_true(used >= 2);
        }
        ref_ctx_free(&c);
    }
    layer_free(&L);
}

/* ---------------------------------------------------------------- invariants */

/* E = 1 is the dense MLP with the same W1/W2 (bit for bit, forward and backward), aux = 1. */
static void test_e1_is_dense(void **state) {
    (void)state;
    enum { G = 10, D = 6, F = 8 };
    layer L;
    layer_new(&L, G, D, F, 1);
    random_layer(&L, 0);
    sy_switch_key key = {1, 0, 0, 0};
    layer_fwd(&L, 1.0, 0.0, 0.0, key);
    sy_switch_info inf = layer_info(&L);
    assert_int_equal(inf.C, G);
    assert_int_equal(inf.n_kept, G);
    assert_true(inf.aux_group == 1.0);

    float *a = falloc(G * F), *g = falloc(G * F), *y = falloc(G * D);
    g_be->matmul_fwd(g_be, a, L.b.h, L.b.W1, G, D, F);
    g_be->gelu_fwd(g_be, g, a, G * F);
    g_be->matmul_fwd(g_be, y, g, L.b.W2, G, F, D);
    float *hy = sy_test_download_new(g_be, y, sizeof(float) * G * D);
    assert_memory_equal(L.out, hy, sizeof(float) * G * D);

    /* backward with z_coef = 0: the router path contributes nothing (p = 1) */
    zero_grads(&L);
    layer_bwd(&L, 0.5, 0.0);
    float *dg = falloc(G * F), *da = falloc(G * F), *dx = falloc(G * D), *dW1 = falloc(F * D),
          *dW2 = falloc(D * F);
    g_be->matmul_bwd(g_be, dg, dW2, L.b.dout, g, L.b.W2, G, F, D, false);
    g_be->gelu_bwd(g_be, da, dg, a, G * F);
    g_be->matmul_bwd(g_be, dx, dW1, da, L.b.h, L.b.W1, G, D, F, false);
    float *hdx = sy_test_download_new(g_be, dx, sizeof(float) * G * D),
          *hdW1 = sy_test_download_new(g_be, dW1, sizeof(float) * F * D),
          *hdW2 = sy_test_download_new(g_be, dW2, sizeof(float) * D * F);
    for (int i = 0; i < G * D; i++)
        assert_true(fabsf(L.dh[i] - hdx[i]) <= 1e-7f * (1 + fabsf(hdx[i])));
    assert_memory_equal(L.dW1, hdW1, sizeof(float) * F * D);
    assert_memory_equal(L.dW2, hdW2, sizeof(float) * D * F);
    free(hy), free(hdx), free(hdW1), free(hdW2);
    for (int i = 0; i < D; i++) assert_true(fabsf(L.dWr[i]) < 1e-7f);
    g_be->free(g_be, a), g_be->free(g_be, g), g_be->free(g_be, y), g_be->free(g_be, dg);
    g_be->free(g_be, da), g_be->free(g_be, dx), g_be->free(g_be, dW1), g_be->free(g_be, dW2);
    layer_free(&L);
}

/* W_r = 0: every token to expert 0, the first C kept, g = 1/E, aux = 1, z = (ln E)². */
static void test_wr_zero(void **state) {
    (void)state;
    enum { G = 12, D = 6, F = 8 };
    for (int E = 3; E <= 4; E++) {
        layer L;
        layer_new(&L, G, D, F, E);
        random_layer(&L, 0);
        memset(L.Wr, 0, sizeof(float) * E * D);
        sy_switch_key key = {1, 0, 0, 0};
        layer_fwd(&L, 1.25, 0.0, 0.0, key);
        sy_switch_info inf = layer_info(&L);
        int C = E == 4 ? 4 : 5; /* ceil(15/4) = 4; ceil(15/3) = 5 */
        assert_int_equal(inf.C, C);
        assert_int_equal(inf.counts[0], G);
        assert_int_equal(inf.kept[0], C);
        assert_int_equal(inf.n_kept, C);
        for (int t = 0; t < G; t++) {
            assert_int_equal(inf.expert[t], 0);
            assert_true(fabs(inf.gate[t] - 1.0 / E) < 1e-7);
        }
        for (int i = 0; i < C; i++) assert_int_equal(inf.order[i], i);
        for (int t = C; t < G; t++)
            for (int i = 0; i < D; i++) assert_true(L.out[t * D + i] == 0.0f);
        if (E == 4) {
            assert_true(inf.aux_group == 1.0); /* 1/4 is exact: so is the aux loss */
            assert_true(inf.gate[0] == 0.25f);
        }
        assert_true(fabs(inf.aux_group - 1.0) < 1e-6);
        const double coef = 0.01;
        assert_true(fabs(coef * inf.aux_group - coef) < 1e-8);
        assert_true(fabs(inf.z_group - log(E) * log(E)) < 1e-6);
        ref_ctx c;
        ref_ctx_new(&c, &L, 1.25);
        check_forward(&L, &c);
        ref_ctx_free(&c);
        layer_free(&L);
    }
}

/* ---------------------------------------------------------------- backward vs fp64 FD */

static void test_backward_fd(void **state) {
    (void)state;
    enum { G = 16, D = 6, F = 8, E = 3 };
    const double aux_coef = 0.7, z_coef = 0.3; /* large, so a wrong aux/z gradient shows */
    layer L;
    layer_new(&L, G, D, F, E);
    random_layer(&L, 1);
    sy_switch_key key = {1, 0, 0, 0};
    layer_fwd(&L, 1.0, 0.0, 0.0, key);
    sy_switch_info inf = layer_info(&L);
    assert_true(inf.n_kept < G); /* drops happen */
    zero_grads(&L);
    fill(L.dh, G * D, 50, 60); /* overwritten */
    layer_bwd(&L, aux_coef, z_coef);

    ref_ctx c;
    ref_ctx_new(&c, &L, 1.0);
    c.aux_coef = aux_coef, c.z_coef = z_coef;
    int base[G];
    for (int t = 0; t < G; t++) base[t] = inf.expert[t];
    c.base_expert = base;
    double *g = calloc((size_t)E * F * D, sizeof(double));
    ref_fd(&c, c.in.h, G * D, g);
    check_close("dh", L.dh, g, G * D, 1e-5, 1e-4);
    ref_fd(&c, c.in.Wr, E * D, g);
    check_close("dWr", L.dWr, g, E * D, 1e-5, 1e-4);
    ref_fd(&c, c.in.W1, (size_t)E * F * D, g);
    check_close("dW1", L.dW1, g, (size_t)E * F * D, 1e-5, 1e-4);
    ref_fd(&c, c.in.W2, (size_t)E * D * F, g);
    check_close("dW2", L.dW2, g, (size_t)E * D * F, 1e-5, 1e-4);
    /* the experts of dropped tokens got nothing from them: expert 0 is full, its gradient
     * must come from its kept tokens only, which the FD above already pins. */

    /* weight gradients accumulate (+=): a second backward doubles them */
    float *w1 = malloc(sizeof(float) * E * F * D), *wr = malloc(sizeof(float) * E * D);
    memcpy(w1, L.dW1, sizeof(float) * E * F * D);
    memcpy(wr, L.dWr, sizeof(float) * E * D);
    layer_bwd(&L, aux_coef, z_coef);
    for (int i = 0; i < E * F * D; i++) assert_true(fabsf(L.dW1[i] - 2 * w1[i]) <= 1e-6f * fabsf(w1[i]));
    for (int i = 0; i < E * D; i++) assert_true(fabsf(L.dWr[i] - 2 * wr[i]) <= 1e-6f * fabsf(wr[i]));
    free(w1), free(wr), free(g);
    ref_ctx_free(&c);
    layer_free(&L);
}

/* ---------------------------------------------------------------- FD of the layer itself */

typedef struct {
    layer *L;
    double cf, jitter, dropout, aux_coef, z_coef;
    sy_switch_key key;
} impl_ctx;

static double impl_loss(impl_ctx *c, int32_t *expert_out) {
    layer *L = c->L;
    layer_fwd(L, c->cf, c->jitter, c->dropout, c->key);
    sy_switch_info inf = layer_info(L);
    double s = 0.0;
    for (int i = 0; i < L->G * L->D; i++) s += (double)L->dout[i] * L->out[i];
    if (expert_out) memcpy(expert_out, inf.expert, sizeof(int32_t) * L->G);
    return s + c->aux_coef * inf.aux_group + c->z_coef * inf.z_group;
}

/* FD in fp32 (step h, fp64 accumulation) over x[0..n) against g; skips entries whose
 * routing flips between +h and -h and requires 90% of the entries checked. */
static void impl_fd_check(const char *what, impl_ctx *c, float *x, size_t n, const float *g,
                          double h, double atol, double rtol) {
    int32_t ep[256], em[256];
    int G = c->L->G, bad = 0, skipped = 0;
    for (size_t i = 0; i < n; i++) {
        float s = x[i];
        float xp = (float)(s + h), xm = (float)(s - h);
        x[i] = xp;
        double fp = impl_loss(c, ep);
        x[i] = xm;
        double fm = impl_loss(c, em);
        x[i] = s;
        if (memcmp(ep, em, sizeof(int32_t) * G)) {
            skipped++;
            continue;
        }
        double fd = (fp - fm) / ((double)xp - (double)xm);
        if (!(fabs(fd - g[i]) <= atol + rtol * fabs(fd))) {
            if (bad < 5)
                fprintf(stderr, "%s[%zu]: analytic %.7g fd %.7g\n", what, i, (double)g[i], fd);
            bad++;
        }
    }
    impl_loss(c, NULL); /* restore the forward state */
    if (bad) fprintf(stderr, "%s: %d of %zu entries off\n", what, bad, n);
    assert_int_equal(bad, 0);
    assert_true((size_t)skipped * 10 <= n);
}

static void fd_all(impl_ctx *c) {
    layer *L = c->L;
    const int G = L->G, D = L->D, F = L->F, E = L->E;
    layer_fwd(L, c->cf, c->jitter, c->dropout, c->key);
    zero_grads(L);
    layer_bwd(L, c->aux_coef, c->z_coef);
    float *dh = malloc(sizeof(float) * G * D), *dWr = malloc(sizeof(float) * E * D),
          *dW1 = malloc(sizeof(float) * E * F * D), *dW2 = malloc(sizeof(float) * E * D * F);
    memcpy(dh, L->dh, sizeof(float) * G * D);
    memcpy(dWr, L->dWr, sizeof(float) * E * D);
    memcpy(dW1, L->dW1, sizeof(float) * E * F * D);
    memcpy(dW2, L->dW2, sizeof(float) * E * D * F);
    const double h = 3e-3, atol = 3e-4, rtol = 3e-3;
    impl_fd_check("dh", c, L->h, (size_t)G * D, dh, h, atol, rtol);
    impl_fd_check("dWr", c, L->Wr, (size_t)E * D, dWr, h, atol, rtol);
    impl_fd_check("dW1", c, L->W1, (size_t)E * F * D, dW1, h, atol, rtol);
    impl_fd_check("dW2", c, L->W2, (size_t)E * D * F, dW2, h, atol, rtol);
    free(dh), free(dWr), free(dW1), free(dW2);
}

static void test_jitter(void **state) {
    (void)state;
    enum { G = 16, D = 6, F = 8, E = 3 };
    layer L;
    layer_new(&L, G, D, F, E);
    random_layer(&L, 1);
    sy_switch_key key = {7, 3, 1, 1};
    layer_fwd(&L, 1.0, 0.0, 0.0, key);
    float p0[G * E], p1[G * E], p2[G * E];
    memcpy(p0, layer_info(&L).probs, sizeof p0);
    layer_fwd(&L, 1.0, 0.1, 0.0, key);
    memcpy(p1, layer_info(&L).probs, sizeof p1);
    layer_fwd(&L, 1.0, 0.1, 0.0, key);
    memcpy(p2, layer_info(&L).probs, sizeof p2);
    assert_memory_equal(p1, p2, sizeof p1); /* a pure function of the key */
    double diff = 0.0;
    for (int i = 0; i < G * E; i++) diff = fmax(diff, fabs(p0[i] - p1[i]));
    assert_true(diff > 1e-3); /* jitter is applied */
    sy_switch_key key2 = key;
    key2.step = 4;
    layer_fwd(&L, 1.0, 0.1, 0.0, key2);
    assert_memory_not_equal(p1, layer_info(&L).probs, sizeof p1);

    impl_ctx c = {&L, 1.0, 0.1, 0.0, 0.7, 0.3, key};
    layer_fwd(&L, 1.0, 0.1, 0.0, key);
    assert_true(layer_info(&L).n_kept < G);
    fd_all(&c);
    layer_free(&L);
}

/* The multiplier u_t,j ~ U[1-ε, 1+ε], drawn per token (and per input feature): with
 * h_t = 2·e_j(t) and W_r = [1 … 1; 0; 0], z_t = (2·u_t,j, 0, 0) so u is recovered from p_t,0. */
static void test_jitter_distribution(void **state) {
    (void)state;
    enum { G = 64, D = 4, F = 4, E = 3 };
    layer L;
    layer_new(&L, G, D, F, E);
    memset(L.h, 0, sizeof(float) * G * D);
    memset(L.Wr, 0, sizeof(float) * E * D);
    for (int j = 0; j < D; j++) L.Wr[j] = 1.0f;
    for (int t = 0; t < G; t++) L.h[t * D + t % D] = 2.0f; /* tokens t and t+D identical */
    sy_switch_key key = {3, 9, 0, 2};
    const double eps = 0.1;
    layer_upload(&L);
    sy_switch_route(L.sw, L.b.h, L.b.Wr, 1.0, eps, key);
    sy_switch_info inf = layer_info(&L);
    double umin = 2, umax = 0, usum = 0;
    double u[G];
    for (int t = 0; t < G; t++) {
        double p0 = inf.probs[t * E];
        u[t] = log(2.0 * p0 / (1.0 - p0)) / 2.0;
        umin = fmin(umin, u[t]), umax = fmax(umax, u[t]), usum += u[t];
    }
    assert_true(umin >= 1.0 - eps - 1e-5 && umax <= 1.0 + eps + 1e-5);
    assert_true(umin < 1.0 - 0.7 * eps && umax > 1.0 + 0.7 * eps); /* spread over the range */
    assert_true(fabs(usum / G - 1.0) < 0.03);
    int same = 0; /* identical inputs, different tokens: different draws */
    for (int t = D; t < G; t++) same += fabs(u[t] - u[t - D]) < 1e-6;
    assert_int_equal(same, 0);
    layer_free(&L);
}

static void test_dropout(void **state) {
    (void)state;
    enum { G = 12, D = 6, F = 16, E = 3 };
    const int target[G] = {0, 1, 0, 0, 2, 0, 0, 1, 0, 2, 1, 0};
    layer L;
    layer_new(&L, G, D, F, E);
    construct_routing(&L, target);
    fill(L.W1, (size_t)E * F * D, -0.6, 0.6);
    fill(L.W2, (size_t)E * D * F, -0.6, 0.6);
    fill(L.dout, (size_t)G * D, -1, 1);
    sy_switch_key key = {11, 5, 2, 3};
    const double p = 0.4;
    float o0[G * D], o1[G * D], o2[G * D];
    layer_fwd(&L, 1.0, 0.0, 0.0, key);
    memcpy(o0, L.out, sizeof o0);
    layer_fwd(&L, 1.0, 0.0, p, key);
    memcpy(o1, L.out, sizeof o1);
    layer_fwd(&L, 1.0, 0.0, p, key);
    assert_memory_equal(o1, L.out, sizeof o1); /* same key: identical */
    assert_memory_not_equal(o0, o1, sizeof o0); /* dropout applied */
    sy_switch_key k2 = key;
    k2.micro = 3; /* a different micro-batch: a different mask */
    layer_fwd(&L, 1.0, 0.0, p, k2);
    assert_memory_not_equal(o1, L.out, sizeof o1);
    k2 = key, k2.layer = 4;
    layer_fwd(&L, 1.0, 0.0, p, k2);
    assert_memory_not_equal(o1, L.out, sizeof o1);
    k2 = key, k2.step = 6;
    layer_fwd(&L, 1.0, 0.0, p, k2);
    assert_memory_not_equal(o1, L.out, sizeof o1);
    k2 = key, k2.seed = 12;
    layer_fwd(&L, 1.0, 0.0, p, k2);
    assert_memory_not_equal(o1, L.out, sizeof o1);

    /* the mask of a token depends on the token index, not on its dispatch row: send token 0
     * to expert 2 instead, which moves every other expert-0 token up one row */
    memcpy(o2, o1, sizeof o2);
    for (int i = 0; i < D; i++) L.h[i] = frand(-0.1, 0.1);
    L.h[2] += 3.0f;
    layer_fwd(&L, 1.0, 0.0, p, key);
    sy_switch_info inf = layer_info(&L);
    assert_int_equal(inf.expert[0], 2);
    int compared = 0;
    for (int t = 1; t < G; t++) {
        int kept_before = 0, kept_now = 0;
        for (int i = 0; i < inf.n_kept; i++) kept_now |= inf.order[i] == t;
        /* C = 4: expert 0 had tokens 0 2 3 5 kept, now 2 3 5 6 */
        kept_before = target[t] != 0 || t == 2 || t == 3 || t == 5;
        if (!kept_before || !kept_now) continue;
        compared++;
        for (int i = 0; i < D; i++)
            assert_true(fabsf(L.out[t * D + i] - o2[t * D + i]) <= 1e-6f * (1 + fabsf(o2[t * D + i])));
    }
    assert_int_equal(compared, 8); /* tokens 1 2 3 4 5 7 9 10 */
    construct_routing(&L, target);
    impl_ctx c = {&L, 1.0, 0.0, p, 0.7, 0.3, key};
    fd_all(&c);
    layer_free(&L);
}

/* Inverted dropout on the expert hidden activation: each unit is kept with probability 1-p and
 * then scaled by 1/(1-p). With every hidden unit equal (identical W1 rows) and W2 = 1, the
 * output is a·(#kept)/(1-p), so out/out_nodrop·(1-p)·F must be a whole number of kept units. */
static void test_dropout_scaling(void **state) {
    (void)state;
    enum { G = 8, D = 4, F = 1024, E = 1 };
    layer L;
    layer_new(&L, G, D, F, E);
    fill(L.h, G * D, -1, 1);
    float w[D];
    fill(w, D, 0.5, 1.0);
    for (int j = 0; j < F; j++) memcpy(L.W1 + j * D, w, sizeof w);
    for (int i = 0; i < D * F; i++) L.W2[i] = 1.0f;
    memset(L.Wr, 0, sizeof(float) * D);
    for (int t = 0; t < G; t++) L.h[t * D] = 1.0f; /* w·h > 0: a clearly non-zero unit */
    sy_switch_key key = {21, 2, 0, 1};
    const double p = 0.25;
    float base[G * D];
    layer_fwd(&L, 1.0, 0.0, 0.0, key);
    memcpy(base, L.out, sizeof base);
    layer_fwd(&L, 1.0, 0.0, p, key);
    double frac = 0.0;
    for (int t = 0; t < G; t++) {
        double kept = L.out[t * D] / base[t * D] * (1.0 - p) * F;
        assert_true(fabs(kept - rint(kept)) < 0.05);
        for (int i = 1; i < D; i++) assert_true(L.out[t * D + i] == L.out[t * D]);
        frac += kept / F / G;
    }
    assert_true(fabs(frac - (1.0 - p)) < 0.03);
    layer_free(&L);
}

/* Running the experts in pieces (as expert parallelism does) equals running them together. */
static void test_expert_subsets(void **state) {
    (void)state;
    enum { G = 16, D = 6, F = 8, E = 3 };
    layer L;
    layer_new(&L, G, D, F, E);
    random_layer(&L, 1);
    sy_switch_key key = {1, 0, 0, 0};
    layer_fwd(&L, 1.25, 0.0, 0.0, key);
    float all[G * D];
    memcpy(all, L.out, sizeof all);
    sy_switch_route(L.sw, L.b.h, L.b.Wr, 1.25, 0.0, key);
    sy_switch_dispatch(L.sw, L.b.h);
    sy_switch_experts(L.sw, L.ex, 2, 3, 0.0, key);
    sy_switch_experts(L.sw, L.ex, 0, 2, 0.0, key);
    memset(L.out, 0xff, sizeof all); /* NaN: every entry must be written again */
    up(L.b.out, L.out, (size_t)G * D);
    sy_switch_combine(L.sw, L.b.out);
    down(L.out, L.b.out, (size_t)G * D);
    assert_memory_equal(all, L.out, sizeof all);
    layer_free(&L);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_capacity_table),
        cmocka_unit_test(test_inorder_drops),
        cmocka_unit_test(test_forward_vs_reference),
        cmocka_unit_test(test_e1_is_dense),
        cmocka_unit_test(test_wr_zero),
        cmocka_unit_test(test_backward_fd),
        cmocka_unit_test(test_jitter),
        cmocka_unit_test(test_jitter_distribution),
        cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_dropout_scaling),
        cmocka_unit_test(test_expert_subsets),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
