/* src/backend/backend_cpu: every op of backend.h, forward against an independent fp64 implementation
 * written here from the model spec formulas, backward against central finite differences (in
 * fp64, h = 1e-6) of the scalar objective L = Σ r ⊙ y computed from that fp64 forward. Sizes are
 * small and the seed is fixed; tolerances are tight enough to catch a wrong sign, a missing term,
 * a wrong scale or an off-by-one in the causal mask. */
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
#include "base/rng.h"

#define SY_TEST_SEED 0x5eed1234abcdULL
#include "sy_test.h"

/* ---------------------------------------------------------------- test helpers */

static void to_d(double *d, const float *f, size_t n) {
    for (size_t i = 0; i < n; i++) d[i] = f[i];
}

static sy_backend_t *g_be;

/* Every array an op sees is a host array with a backend twin, as a test of a device backend
 * needs: falloc/ialloc make both (zeroed); the test fills and checks the host array, up(x)
 * uploads it into its twin and returns the twin (an op argument: inputs, and outputs whose old
 * contents matter or are garbage on purpose), dn(x) downloads the twin after the op. */
typedef struct {
    void *host, *buf;
    size_t bytes;
} twin_t;
enum { MAX_TWINS = 32 };
static twin_t g_tw[MAX_TWINS];

static twin_t *twin_of(const void *host) {
    for (int i = 0; i < MAX_TWINS; i++)
        if (g_tw[i].host && g_tw[i].host == host) return &g_tw[i];
    fail_msg("%p is not the start of a twinned host array", host);
    return NULL;
}
static void *twin_new(size_t bytes) {
    for (int i = 0; i < MAX_TWINS; i++)
        if (!g_tw[i].host) {
            g_tw[i].host = calloc(1, bytes);
            assert_non_null(g_tw[i].host);
            g_tw[i].buf = sy_test_upload_new(g_be, NULL, bytes);
            g_tw[i].bytes = bytes;
            return g_tw[i].host;
        }
    fail_msg("more than %d twinned arrays", MAX_TWINS);
    return NULL;
}
static float *falloc(size_t n) { return twin_new(n * sizeof(float)); }
static int32_t *ialloc(const int32_t *init, size_t n) {
    int32_t *p = twin_new(n * sizeof(int32_t));
    if (init) memcpy(p, init, n * sizeof(int32_t));
    return p;
}
static void *up(const void *host) {
    twin_t *t = twin_of(host);
    g_be->upload(g_be, t->buf, host, t->bytes);
    return t->buf;
}
static void dn(void *host) {
    twin_t *t = twin_of(host);
    sy_test_download(g_be, host, t->buf, t->bytes);
}
static double *dalloc(size_t n) {
    double *p = calloc(n ? n : 1, sizeof(double));
    assert_non_null(p);
    return p;
}
static void ffree(void *host) {
    twin_t *t = twin_of(host);
    g_be->free(g_be, t->buf);
    free(t->host);
    *t = (twin_t){0};
}

/* Central finite differences of f over x[0..n): g[i] = (f(x+h e_i) - f(x-h e_i)) / 2h. */
typedef double (*obj_fn)(void *ctx);
static void fd_grad(obj_fn f, void *ctx, double *x, size_t n, double h, double *g) {
    for (size_t i = 0; i < n; i++) {
        double s = x[i];
        x[i] = s + h;
        double fp = f(ctx);
        x[i] = s - h;
        double fm = f(ctx);
        x[i] = s;
        g[i] = (fp - fm) / (2.0 * h);
    }
}
#define FD_H 1e-6

static int setup(void **state) {
    (void)state;
    return sy_backend_cpu_new(1, false, &g_be) == SY_OK ? 0 : -1;
}
static int teardown(void **state) {
    (void)state;
    sy_backend_destroy(&g_be);
    return 0;
}

/* ---------------------------------------------------------------- embed */

typedef struct {
    int N, T, D;
    const int32_t *tok;
    double *wte, *wpe, *r;
} embed_ctx;

static double embed_obj(void *p) {
    embed_ctx *c = p;
    double L = 0.0;
    for (int n = 0; n < c->N; n++)
        for (int i = 0; i < c->D; i++)
            L += c->r[n * c->D + i] *
                 (c->wte[c->tok[n] * c->D + i] + c->wpe[(n % c->T) * c->D + i]);
    return L;
}

static void test_embed(void **state) {
    (void)state;
    enum { N = 10, T = 4, D = 5, V = 7 };
    const int32_t tok_v[N] = {3, 0, 6, 3, 3, 1, 6, 2, 0, 5}; /* repeats: rows hit several times */
    int32_t *tok = ialloc(tok_v, N);
    float *wte = falloc(V * D), *wpe = falloc(T * D), *x = falloc(N * D);
    float *dwte = falloc(V * D), *dwpe = falloc(T * D), *dx = falloc(N * D);
    fill(wte, V * D, -1, 1);
    fill(wpe, T * D, -1, 1);
    g_be->embed_fwd(g_be, up(x), up(tok), up(wte), up(wpe), N, T, D);
    dn(x);
    double want[N * D];
    for (int n = 0; n < N; n++)
        for (int i = 0; i < D; i++)
            want[n * D + i] = (double)wte[tok[n] * D + i] + (double)wpe[(n % T) * D + i];
    check_close("embed y", x, want, N * D, 1e-7, 1e-7);

    /* backward: weight gradients accumulate onto what is there */
    fill(dx, N * D, -1, 1);
    fill(dwte, V * D, -1, 1);
    fill(dwpe, T * D, -1, 1);
    double dwte0[V * D], dwpe0[T * D];
    to_d(dwte0, dwte, V * D);
    to_d(dwpe0, dwpe, T * D);
    g_be->embed_bwd(g_be, up(dwte), up(dwpe), up(dx), up(tok), N, T, D);
    dn(dwte), dn(dwpe);
    double *Wte = dalloc(V * D), *Wpe = dalloc(T * D), *R = dalloc(N * D);
    to_d(Wte, wte, V * D);
    to_d(Wpe, wpe, T * D);
    to_d(R, dx, N * D);
    embed_ctx c = {N, T, D, tok, Wte, Wpe, R};
    double gte[V * D], gpe[T * D];
    fd_grad(embed_obj, &c, Wte, V * D, FD_H, gte);
    fd_grad(embed_obj, &c, Wpe, T * D, FD_H, gpe);
    for (int i = 0; i < V * D; i++) gte[i] += dwte0[i];
    for (int i = 0; i < T * D; i++) gpe[i] += dwpe0[i];
    check_close("embed dwte", dwte, gte, V * D, 1e-5, 1e-5);
    check_close("embed dwpe", dwpe, gpe, T * D, 1e-5, 1e-5);
    free(Wte), free(Wpe), free(R);
    ffree(wte), ffree(wpe), ffree(x), ffree(dwte), ffree(dwpe), ffree(dx), ffree(tok);
}

/* ---------------------------------------------------------------- matmul */

typedef struct {
    int N, in, out;
    double *x, *W, *r;
} mm_ctx;

static void mm_ref(double *y, const double *x, const double *W, int N, int in, int out) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < out; o++) {
            double s = 0.0;
            for (int i = 0; i < in; i++) s += x[n * in + i] * W[o * in + i];
            y[n * out + o] = s;
        }
}

static double mm_obj(void *p) {
    mm_ctx *c = p;
    double *y = dalloc((size_t)c->N * c->out), L = 0.0;
    mm_ref(y, c->x, c->W, c->N, c->in, c->out);
    for (int i = 0; i < c->N * c->out; i++) L += c->r[i] * y[i];
    free(y);
    return L;
}

static void test_matmul(void **state) {
    (void)state;
    enum { N = 7, IN = 5, OUT = 6 };
    float *x = falloc(N * IN), *W = falloc(OUT * IN), *y = falloc(N * OUT);
    float *dy = falloc(N * OUT), *dx = falloc(N * IN), *dW = falloc(OUT * IN);
    fill(x, N * IN, -1, 1);
    fill(W, OUT * IN, -1, 1);
    g_be->matmul_fwd(g_be, up(y), up(x), up(W), N, IN, OUT);
    dn(y);
    double X[N * IN], Wd[OUT * IN], Y[N * OUT], R[N * OUT];
    to_d(X, x, N * IN);
    to_d(Wd, W, OUT * IN);
    mm_ref(Y, X, Wd, N, IN, OUT);
    check_close("matmul y", y, Y, N * OUT, 1e-6, 1e-6);

    fill(dy, N * OUT, -1, 1);
    to_d(R, dy, N * OUT);
    mm_ctx c = {N, IN, OUT, X, Wd, R};
    double gx[N * IN], gW[OUT * IN];
    fd_grad(mm_obj, &c, X, N * IN, FD_H, gx);
    fd_grad(mm_obj, &c, Wd, OUT * IN, FD_H, gW);

    /* dx overwritten (garbage in it), dW accumulated */
    fill(dx, N * IN, 50, 60);
    fill(dW, OUT * IN, -1, 1);
    double dW0[OUT * IN], want[OUT * IN > N * IN ? OUT * IN : N * IN];
    to_d(dW0, dW, OUT * IN);
    g_be->matmul_bwd(g_be, up(dx), up(dW), up(dy), up(x), up(W), N, IN, OUT, false);
    dn(dx), dn(dW);
    check_close("matmul dx (overwrite)", dx, gx, N * IN, 1e-5, 1e-5);
    for (int i = 0; i < OUT * IN; i++) want[i] = dW0[i] + gW[i];
    check_close("matmul dW (+=)", dW, want, OUT * IN, 1e-5, 1e-5);

    /* accumulate_dx: dx += dy·W; dx NULL: only dW */
    double dx0[N * IN];
    fill(dx, N * IN, -1, 1);
    to_d(dx0, dx, N * IN);
    g_be->matmul_bwd(g_be, up(dx), up(dW), up(dy), up(x), up(W), N, IN, OUT, true);
    dn(dx), dn(dW);
    for (int i = 0; i < N * IN; i++) want[i] = dx0[i] + gx[i];
    check_close("matmul dx (+=)", dx, want, N * IN, 1e-5, 1e-5);
    for (int i = 0; i < OUT * IN; i++) want[i] = dW0[i] + 2.0 * gW[i];
    check_close("matmul dW (second +=)", dW, want, OUT * IN, 1e-5, 1e-5);
    g_be->matmul_bwd(g_be, NULL, up(dW), up(dy), up(x), up(W), N, IN, OUT, false);
    dn(dW);
    for (int i = 0; i < OUT * IN; i++) want[i] = dW0[i] + 3.0 * gW[i];
    check_close("matmul dW (dx NULL)", dW, want, OUT * IN, 1e-5, 1e-5);
    ffree(x), ffree(W), ffree(y), ffree(dy), ffree(dx), ffree(dW);
}

/* ---------------------------------------------------------------- layernorm */

#define LN_EPS 1e-5

typedef struct {
    int N, D;
    double *x, *w, *r;
} ln_ctx;

static void ln_ref(double *y, double *mean, double *rstd, const double *x, const double *w, int N,
                   int D) {
    for (int n = 0; n < N; n++) {
        double m = 0.0, v = 0.0;
        for (int i = 0; i < D; i++) m += x[n * D + i];
        m /= D;
        for (int i = 0; i < D; i++) v += (x[n * D + i] - m) * (x[n * D + i] - m);
        v /= D; /* biased variance, as torch.nn.LayerNorm */
        double r = 1.0 / sqrt(v + LN_EPS);
        for (int i = 0; i < D; i++) y[n * D + i] = (x[n * D + i] - m) * r * w[i];
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = r;
    }
}

static double ln_obj(void *p) {
    ln_ctx *c = p;
    double *y = dalloc((size_t)c->N * c->D), L = 0.0;
    ln_ref(y, NULL, NULL, c->x, c->w, c->N, c->D);
    for (int i = 0; i < c->N * c->D; i++) L += c->r[i] * y[i];
    free(y);
    return L;
}

static void test_layernorm(void **state) {
    (void)state;
    enum { N = 6, D = 9 };
    float *x = falloc(N * D), *w = falloc(D), *y = falloc(N * D), *mean = falloc(N),
          *rstd = falloc(N), *dy = falloc(N * D), *dx = falloc(N * D), *dw = falloc(D);
    fill(x, N * D, -2, 2);
    /* row 0 has a variance (~3e-7) far below eps, so eps = 1e-5 decides its scale */
    for (int i = 0; i < D; i++) x[i] = frand(-1e-3, 1e-3) + 0.5f;
    /* row 1 has a large offset: the mean must be subtracted */
    for (int i = 0; i < D; i++) x[D + i] = frand(-1, 1) + 7.0f;
    fill(w, D, 0.5, 1.5);
    g_be->layernorm_fwd(g_be, up(y), up(mean), up(rstd), up(x), up(w), N, D);
    dn(y), dn(mean), dn(rstd);
    double X[N * D], Wd[D], Y[N * D], M[N], RS[N];
    to_d(X, x, N * D);
    to_d(Wd, w, D);
    ln_ref(Y, M, RS, X, Wd, N, D);
    check_close("layernorm y", y, Y, N * D, 1e-5, 1e-5);
    check_close("layernorm mean", mean, M, N, 1e-6, 1e-6);
    check_close("layernorm rstd", rstd, RS, N, 1e-6, 1e-5);
    /* the small-variance row: eps = 1e-6 or 0 would give a scale 3x or more larger */
    assert_true(fabs(rstd[0] - 1.0 / sqrt(1e-5)) < 0.05 / sqrt(1e-5));

    fill(dy, N * D, -1, 1);
    fill(dx, N * D, -1, 1);
    fill(dw, D, -1, 1);
    double R[N * D], dx0[N * D], dw0[D], gx[N * D], gw[D];
    to_d(R, dy, N * D);
    to_d(dx0, dx, N * D);
    to_d(dw0, dw, D);
    g_be->layernorm_bwd(g_be, up(dx), up(dw), up(dy), up(x), up(w), up(mean), up(rstd), N, D);
    dn(dx), dn(dw);
    ln_ctx c = {N, D, X, Wd, R};
    fd_grad(ln_obj, &c, X, N * D, FD_H, gx);
    fd_grad(ln_obj, &c, Wd, D, FD_H, gw);
    for (int i = 0; i < N * D; i++) gx[i] += dx0[i];
    for (int i = 0; i < D; i++) gw[i] += dw0[i];
    /* row 0's dx is ~rstd = 316 times larger: relative tolerance carries it */
    check_close("layernorm dx (+=)", dx, gx, N * D, 1e-4, 1e-4);
    check_close("layernorm dw (+=)", dw, gw, D, 1e-4, 1e-4);
    ffree(x), ffree(w), ffree(y), ffree(mean), ffree(rstd), ffree(dy), ffree(dx), ffree(dw);
}

/* ---------------------------------------------------------------- attention */

typedef struct {
    int B, T, D, H;
    double *qkv, *r;
} att_ctx;

static void att_ref(double *out, double *att, const double *qkv, int B, int T, int D, int H) {
    int hd = D / H, C3 = 3 * D;
    double sc = 1.0 / sqrt((double)hd);
    double *s = dalloc((size_t)T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const double *q = qkv + (b * T + t) * C3 + h * hd;
                double mx = -INFINITY, sum = 0.0;
                for (int u = 0; u <= t; u++) { /* causal: keys 0..t */
                    const double *k = qkv + (b * T + u) * C3 + D + h * hd;
                    double d = 0.0;
                    for (int i = 0; i < hd; i++) d += q[i] * k[i];
                    s[u] = d * sc;
                    if (s[u] > mx) mx = s[u];
                }
                for (int u = 0; u <= t; u++) sum += exp(s[u] - mx);
                double *o = out + (b * T + t) * D + h * hd;
                for (int i = 0; i < hd; i++) o[i] = 0.0;
                for (int u = 0; u < T; u++) {
                    double p = u <= t ? exp(s[u] - mx) / sum : 0.0;
                    if (att) att[((b * H + h) * T + t) * T + u] = p;
                    if (u > t) continue;
                    const double *v = qkv + (b * T + u) * C3 + 2 * D + h * hd;
                    for (int i = 0; i < hd; i++) o[i] += p * v[i];
                }
            }
    free(s);
}

static double att_obj(void *p) {
    att_ctx *c = p;
    size_t n = (size_t)c->B * c->T * c->D;
    double *o = dalloc(n), L = 0.0;
    att_ref(o, NULL, c->qkv, c->B, c->T, c->D, c->H);
    for (size_t i = 0; i < n; i++) L += c->r[i] * o[i];
    free(o);
    return L;
}

static void test_attention(void **state) {
    (void)state;
    enum { B = 2, T = 5, D = 8, H = 2, NQ = B * T * 3 * D, NO = B * T * D, NA = B * H * T * T };
    float *qkv = falloc(NQ), *out = falloc(NO), *att = falloc(NA), *dout = falloc(NO),
          *dqkv = falloc(NQ);
    fill(qkv, NQ, -1.5, 1.5);
    fill(att, NA, 5, 6); /* garbage: the op must write every entry, zeros above the diagonal */
    g_be->attention_fwd(g_be, up(out), up(att), up(qkv), B, T, D, H);
    dn(out), dn(att);
    double Q[NQ], O[NO], A[NA], R[NO], g[NQ];
    to_d(Q, qkv, NQ);
    att_ref(O, A, Q, B, T, D, H);
    check_close("attention out", out, O, NO, 1e-5, 1e-5);
    check_close("attention att", att, A, NA, 1e-6, 1e-5);

    fill(dout, NO, -1, 1);
    fill(dqkv, NQ, 50, 60); /* overwritten */
    to_d(R, dout, NO);
    g_be->attention_bwd(g_be, up(dqkv), up(dout), up(att), up(qkv), B, T, D, H);
    dn(dqkv);
    att_ctx c = {B, T, D, H, Q, R};
    fd_grad(att_obj, &c, Q, NQ, FD_H, g);
    check_close("attention dqkv", dqkv, g, NQ, 1e-5, 1e-4);
    ffree(qkv), ffree(out), ffree(att), ffree(dout), ffree(dqkv);
}

/* Output at position t depends on tokens 0..t only (including t itself), and on nothing of the
 * other sequences. */
static void test_attention_causal(void **state) {
    (void)state;
    enum { B = 2, T = 6, D = 8, H = 2, C3 = 3 * D, NQ = B * T * C3, NO = B * T * D };
    float *qkv = falloc(NQ), *q2 = falloc(NQ), *o1 = falloc(NO), *o2 = falloc(NO),
          *att = falloc(B * H * T * T);
    fill(qkv, NQ, -1.5, 1.5);
    g_be->attention_fwd(g_be, up(o1), up(att), up(qkv), B, T, D, H);
    dn(o1);
    for (int t0 = 0; t0 < T; t0++) {
        /* change q, k, v of every token after t0 in sequence 0 */
        memcpy(q2, qkv, NQ * sizeof(float));
        for (int t = t0 + 1; t < T; t++)
            for (int i = 0; i < C3; i++) q2[t * C3 + i] += frand(0.5, 1.5);
        g_be->attention_fwd(g_be, up(o2), up(att), up(q2), B, T, D, H);
        dn(o2);
        assert_memory_equal(o1, o2, (size_t)(t0 + 1) * D * sizeof(float)); /* rows 0..t0 */
        assert_memory_equal(o1 + T * D, o2 + T * D, (size_t)T * D * sizeof(float)); /* seq 1 */
        if (t0 + 1 < T) { /* row t0+1 sees its own k, v: it must change */
            double diff = 0.0;
            for (int i = 0; i < D; i++) diff += fabs(o1[(t0 + 1) * D + i] - o2[(t0 + 1) * D + i]);
            assert_true(diff > 1e-3);
        }
        /* changing only the k and v of token t0 changes row t0 (the diagonal is attended) */
        if (t0 > 0) {
            memcpy(q2, qkv, NQ * sizeof(float));
            for (int i = D; i < C3; i++) q2[t0 * C3 + i] += 1.0f;
            g_be->attention_fwd(g_be, up(o2), up(att), up(q2), B, T, D, H);
            dn(o2);
            assert_memory_equal(o1, o2, (size_t)t0 * D * sizeof(float));
            double diff = 0.0;
            for (int i = 0; i < D; i++) diff += fabs(o1[t0 * D + i] - o2[t0 * D + i]);
            assert_true(diff > 1e-3);
        }
    }
    ffree(qkv), ffree(q2), ffree(o1), ffree(o2), ffree(att);
}

/* ---------------------------------------------------------------- gelu */

static double gelu_ref(double x) {
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

typedef struct {
    size_t n;
    double *x, *r;
} gelu_ctx;

static double gelu_obj(void *p) {
    gelu_ctx *c = p;
    double L = 0.0;
    for (size_t i = 0; i < c->n; i++) L += c->r[i] * gelu_ref(c->x[i]);
    return L;
}

static void test_gelu(void **state) {
    (void)state;
    enum { N = 61 };
    float *x = falloc(N), *y = falloc(N), *dy = falloc(N), *dx = falloc(N);
    for (int i = 0; i < 41; i++) x[i] = -5.0f + 0.25f * (float)i;
    fill(x + 41, N - 41, -4, 4);
    g_be->gelu_fwd(g_be, up(y), up(x), N);
    dn(y);
    double X[N], Y[N], R[N], g[N], erf_gap = 0.0;
    to_d(X, x, N);
    for (int i = 0; i < N; i++) {
        Y[i] = gelu_ref(X[i]);
        double exact = 0.5 * X[i] * (1.0 + erf(X[i] / sqrt(2.0)));
        if (fabs(exact - Y[i]) > erf_gap) erf_gap = fabs(exact - Y[i]);
    }
    /* the tolerance is far below the tanh-vs-erf gap, so the constants are pinned */
    assert_true(erf_gap > 1e-4);
    check_close("gelu y", y, Y, N, 1e-6, 1e-6);

    fill(dy, N, -1, 1);
    to_d(R, dy, N);
    g_be->gelu_bwd(g_be, up(dx), up(dy), up(x), N);
    dn(dx);
    gelu_ctx c = {N, X, R};
    fd_grad(gelu_obj, &c, X, N, FD_H, g);
    check_close("gelu dx", dx, g, N, 1e-6, 1e-5);
    ffree(x), ffree(y), ffree(dy), ffree(dx);
}

/* ---------------------------------------------------------------- add, mul, round */

static void test_add_mul_round(void **state) {
    (void)state;
    enum { N = 37 };
    float *y = falloc(N), *x = falloc(N), *m = falloc(N);
    fill(y, N, -3, 3);
    fill(x, N, -3, 3);
    fill(m, N, -2, 2);
    double want[N];
    for (int i = 0; i < N; i++) want[i] = (double)y[i] + (double)x[i];
    g_be->add_inplace(g_be, up(y), up(x), N);
    dn(y);
    check_close("add y", y, want, N, 0, 1e-7);
    for (int i = 0; i < N; i++) want[i] = (double)y[i] * (double)m[i];
    g_be->mul_inplace(g_be, up(y), up(m), N);
    dn(y);
    check_close("mul y", y, want, N, 0, 1e-7);
    float before[N];
    memcpy(before, y, sizeof before);
    g_be->round_bf16(g_be, up(y), N); /* fp32 backend: no-op */
    dn(y);
    assert_memory_equal(before, y, sizeof before);
    ffree(y), ffree(x), ffree(m);
}

/* ---------------------------------------------------------------- cross-entropy */

typedef struct {
    int N, V;
    const int32_t *tgt;
    double *l;
    double scale;
} xent_ctx;

static double xent_ref(const double *l, const int32_t *tgt, int N, int V) {
    double tot = 0.0;
    for (int n = 0; n < N; n++) {
        double mx = -INFINITY, s = 0.0;
        for (int v = 0; v < V; v++) mx = fmax(mx, l[n * V + v]);
        for (int v = 0; v < V; v++) s += exp(l[n * V + v] - mx);
        tot += mx + log(s) - l[n * V + tgt[n]];
    }
    return tot;
}

static double xent_obj(void *p) {
    xent_ctx *c = p;
    return c->scale * xent_ref(c->l, c->tgt, c->N, c->V);
}

static void test_xent(void **state) {
    (void)state;
    enum { N = 6, V = 7 };
    const int32_t tgt_v[N] = {0, 6, 3, 3, 1, 5};
    int32_t *tgt = ialloc(tgt_v, N);
    float *l = falloc(N * V), *d = falloc(N * V), *l2 = falloc(N * V);
    fill(l, N * V, -3, 3);
    for (int v = 0; v < V; v++) l[5 * V + v] += 100.0f; /* large logits: must not overflow */
    const float scale = 0.37f;
    double Ld[N * V], g[N * V];
    to_d(Ld, l, N * V);
    double want = xent_ref(Ld, tgt, N, V);
    double got = g_be->xent_fwd_bwd(g_be, up(d), up(l), up(tgt), N, V, scale);
    dn(d);
    assert_true(isfinite(got));
    assert_true(fabs(got - want) < 1e-5 * (1.0 + fabs(want)));
    double got2 = g_be->xent_fwd(g_be, up(l), up(tgt), N, V);
    assert_true(fabs(got2 - want) < 1e-5 * (1.0 + fabs(want)));

    xent_ctx c = {N, V, tgt, Ld, scale};
    fd_grad(xent_obj, &c, Ld, N * V, FD_H, g);
    check_close("xent dlogits", d, g, N * V, 1e-6, 1e-5);

    /* in place over the logits */
    memcpy(l2, l, N * V * sizeof(float));
    float *l2_buf = up(l2);
    double got3 = g_be->xent_fwd_bwd(g_be, l2_buf, l2_buf, up(tgt), N, V, scale);
    dn(l2);
    assert_true(fabs(got3 - want) < 1e-5 * (1.0 + fabs(want)));
    check_close("xent dlogits in place", l2, g, N * V, 1e-6, 1e-5);
    ffree(l), ffree(d), ffree(l2), ffree(tgt);
}

/* ---------------------------------------------------------------- gather / scatter */

typedef struct {
    int n, D;
    const int32_t *idx;
    double *src, *scale, *r;
    int rows; /* rows of dst */
} sc_ctx;

/* L = Σ r ⊙ dst with dst[idx[i]] = scale[i]·src[i] (scatter_rows_scaled), other rows 0 */
static double scatter_obj(void *p) {
    sc_ctx *c = p;
    double L = 0.0;
    for (int i = 0; i < c->n; i++)
        for (int k = 0; k < c->D; k++)
            L += c->r[c->idx[i] * c->D + k] * c->scale[i] * c->src[i * c->D + k];
    return L;
}
/* L = Σ r ⊙ dst with dst[i] = src[idx[i]] (gather_rows) */
static double gather_obj(void *p) {
    sc_ctx *c = p;
    double L = 0.0;
    for (int i = 0; i < c->n; i++)
        for (int k = 0; k < c->D; k++) L += c->r[i * c->D + k] * c->src[c->idx[i] * c->D + k];
    return L;
}

static void test_gather_scatter(void **state) {
    (void)state;
    enum { ROWS = 9, n = 5, D = 6 };
    const int32_t idx_v[n] = {7, 2, 0, 5, 3}; /* distinct, as in the Switch dispatch */
    int32_t *idx = ialloc(idx_v, n);
    float *src = falloc(ROWS * D), *dst = falloc(ROWS * D), *rows = falloc(n * D),
          *scale = falloc(n), *dot = falloc(n), *out = falloc(n * D);
    fill(src, ROWS * D, -2, 2);
    fill(scale, n, 0.1, 0.9);

    /* gather: dst[i] = src[idx[i]] exactly */
    g_be->gather_rows(g_be, up(rows), up(src), up(idx), n, D);
    dn(rows);
    for (int i = 0; i < n; i++)
        assert_memory_equal(rows + i * D, src + idx[i] * D, D * sizeof(float));

    /* scatter_rows_scaled: named rows = scale·src, others untouched */
    fill(dst, ROWS * D, 10, 11);
    float keep[ROWS * D];
    memcpy(keep, dst, sizeof keep);
    g_be->scatter_rows_scaled(g_be, up(dst), up(rows), up(idx), up(scale), n, D);
    dn(dst);
    for (int r = 0; r < ROWS; r++) {
        int i = -1;
        for (int j = 0; j < n; j++)
            if (idx[j] == r) i = j;
        for (int k = 0; k < D; k++) {
            float want = i < 0 ? keep[r * D + k] : (float)((double)scale[i] * rows[i * D + k]);
            assert_true(dst[r * D + k] == want);
        }
    }

    /* scatter_add_rows: dst[idx[i]] += src[i] */
    fill(dst, ROWS * D, -1, 1);
    memcpy(keep, dst, sizeof keep);
    g_be->scatter_add_rows(g_be, up(dst), up(rows), up(idx), n, D);
    dn(dst);
    double want[ROWS * D];
    to_d(want, keep, ROWS * D);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < D; k++) want[idx[i] * D + k] += rows[i * D + k];
    check_close("scatter_add", dst, want, ROWS * D, 0, 1e-7);

    /* gather_dot_scale(a = dL/ddst, b = src rows) is the backward of scatter_rows_scaled:
     * out = dL/dsrc, dot = dL/dscale */
    float *r = falloc(ROWS * D);
    fill(r, ROWS * D, -1, 1);
    g_be->gather_dot_scale(g_be, up(dot), up(out), up(r), up(rows), up(idx), up(scale), n, D);
    dn(dot), dn(out);
    double S[n * D], SC[n], R[ROWS * D], gsrc[n * D], gsc[n];
    to_d(S, rows, n * D);
    to_d(SC, scale, n);
    to_d(R, r, ROWS * D);
    sc_ctx c = {n, D, idx, S, SC, R, ROWS};
    fd_grad(scatter_obj, &c, S, n * D, FD_H, gsrc);
    fd_grad(scatter_obj, &c, SC, n, FD_H, gsc);
    check_close("gather_dot_scale out", out, gsrc, n * D, 1e-6, 1e-6);
    check_close("gather_dot_scale dot", dot, gsc, n, 1e-6, 1e-6);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < D; k++)
            assert_true(out[i * D + k] == (float)((double)scale[i] * r[idx[i] * D + k]));

    /* scatter_add_rows into zeros is the backward of gather_rows */
    float *g = falloc(ROWS * D), *rr = falloc(n * D);
    fill(rr, n * D, -1, 1);
    g_be->scatter_add_rows(g_be, up(g), up(rr), up(idx), n, D);
    dn(g);
    double Src[ROWS * D], RR[n * D], gg[ROWS * D];
    to_d(Src, src, ROWS * D);
    to_d(RR, rr, n * D);
    sc_ctx c2 = {n, D, idx, Src, NULL, RR, ROWS};
    fd_grad(gather_obj, &c2, Src, ROWS * D, FD_H, gg);
    check_close("gather backward", g, gg, ROWS * D, 1e-6, 1e-6);
    ffree(src), ffree(dst), ffree(rows), ffree(scale), ffree(dot), ffree(out), ffree(r), ffree(g),
        ffree(rr), ffree(idx);
}

/* ---------------------------------------------------------------- router */

static void softmax_ref(double *p, double *lse, const double *z, int E) {
    double mx = -INFINITY, s = 0.0;
    for (int i = 0; i < E; i++) mx = fmax(mx, z[i]);
    for (int i = 0; i < E; i++) s += exp(z[i] - mx);
    for (int i = 0; i < E; i++) p[i] = exp(z[i] - mx) / s;
    if (lse) *lse = mx + log(s);
}

static void test_router_fwd(void **state) {
    (void)state;
    enum { N = 9, E = 5 };
    float *z = falloc(N * E), *p = falloc(N * E), *gate = falloc(N), *lse = falloc(N);
    int32_t *ex = ialloc(NULL, N);
    fill(z, N * E, -3, 3);
    /* ties → lowest index */
    const float ties[4][E] = {{1, 3, 3, 0, -1}, {2, 2, 2, 2, 2}, {0, 5, 1, 5, 5}, {-1, -2, 4, 0, 4}};
    const int tie_want[4] = {1, 0, 1, 2};
    for (int r = 0; r < 4; r++) memcpy(z + r * E, ties[r], sizeof ties[r]);
    for (int i = 0; i < E; i++) z[4 * E + i] = 100.0f + (float)i * 0.5f; /* no overflow */
    g_be->router_fwd(g_be, up(p), up(ex), up(gate), up(lse), up(z), N, E);
    dn(p), dn(ex), dn(gate), dn(lse);
    for (int r = 0; r < 4; r++) assert_int_equal(ex[r], tie_want[r]);
    for (int n = 0; n < N; n++) {
        double Z[E], P[E], L;
        to_d(Z, z + n * E, E);
        softmax_ref(P, &L, Z, E);
        check_close("router probs", p + n * E, P, E, 1e-6, 1e-6);
        check_close("router lse", lse + n, &L, 1, 1e-6, 1e-6);
        int best = 0;
        for (int i = 1; i < E; i++)
            if (Z[i] > Z[best]) best = i;
        assert_int_equal(ex[n], best);
        assert_true(gate[n] == p[n * E + best]); /* the chosen probability, not renormalised */
        double s = 0.0;
        for (int i = 0; i < E; i++) s += p[n * E + i];
        assert_true(fabs(s - 1.0) < 1e-6);
    }
    ffree(z), ffree(p), ffree(gate), ffree(lse), ffree(ex);
}

typedef struct {
    int N, E;
    double *z;
    const int32_t *ex;
    const double *gamma, *f;
    double aux_scale, z_scale;
} rb_ctx;

/* L = Σ_t γ_t·p_t,e_t + aux_scale·Σ_i f_i·Σ_t p_t,i + (z_scale/2)·Σ_t lse_t²
 * (e, γ, f held fixed: no gradient through argmax, capacity or f; spec §2 backward) */
static double rb_obj(void *p) {
    rb_ctx *c = p;
    double L = 0.0, P[16], lse;
    for (int t = 0; t < c->N; t++) {
        softmax_ref(P, &lse, c->z + t * c->E, c->E);
        L += c->gamma[t] * P[c->ex[t]];
        for (int i = 0; i < c->E; i++) L += c->aux_scale * c->f[i] * P[i];
        L += 0.5 * c->z_scale * lse * lse;
    }
    return L;
}

static void test_router_bwd(void **state) {
    (void)state;
    enum { N = 8, E = 5 };
    float *z = falloc(N * E), *p = falloc(N * E), *gate = falloc(N), *lse = falloc(N),
          *gamma = falloc(N), *f = falloc(E), *dz = falloc(N * E);
    int32_t *ex = ialloc(NULL, N);
    fill(z, N * E, -2, 2);
    for (int i = 0; i < E; i++) z[i] += 1.5f; /* lse clearly non-zero */
    g_be->router_fwd(g_be, up(p), up(ex), up(gate), up(lse), up(z), N, E);
    dn(p), dn(ex), dn(gate), dn(lse);
    fill(gamma, N, -1, 1);
    gamma[2] = gamma[5] = 0.0f; /* dropped tokens */
    const float fv[E] = {0.5f, 0.25f, 0.125f, 0.125f, 0.0f};
    memcpy(f, fv, sizeof fv);
    /* each term alone, then all together */
    const float cases[4][3] = {{1, 0, 0}, {0, 0.3f, 0}, {0, 0, 0.2f}, {1, 0.3f, 0.2f}};
    for (int k = 0; k < 4; k++) {
        float *gm = falloc(N);
        for (int t = 0; t < N; t++) gm[t] = gamma[t] * cases[k][0];
        fill(dz, N * E, 50, 60); /* overwritten */
        g_be->router_bwd(g_be, up(dz), up(p), up(ex), up(gm), up(lse), up(f), cases[k][1],
                         cases[k][2], N, E);
        dn(dz);
        double Z[N * E], GM[N], F[E], g[N * E];
        to_d(Z, z, N * E);
        to_d(GM, gm, N);
        to_d(F, f, E);
        rb_ctx c = {N, E, Z, ex, GM, F, cases[k][1], cases[k][2]};
        fd_grad(rb_obj, &c, Z, N * E, FD_H, g);
        char what[64];
        snprintf(what, sizeof what, "router_bwd case %d dlogits", k);
        check_close(what, dz, g, N * E, 1e-6, 1e-5);
        ffree(gm);
    }
    ffree(z), ffree(p), ffree(gate), ffree(lse), ffree(gamma), ffree(f), ffree(dz), ffree(ex);
}

/* ---------------------------------------------------------------- Switch route plan */

/* route_plan against the capacity rule written directly (the first C tokens of each expert, in
 * token order, keep a slot), route_gamma against the slot map, route_stats against the fp64
 * sums in the order backend.h names (so equal exactly), jitter_fwd and dropout_mask against
 * draws made here from the same keys, wire_put/wire_get against base/bf16.h. */
static void test_route_plan(void **state) {
    (void)state;
    enum { G = 13, E = 4, C = 3 };
    const int32_t ex_h[G] = {2, 0, 2, 2, 1, 2, 0, 3, 2, 0, 0, 0, 1}; /* 2 and 0 overflow */
    int32_t *ex = ialloc(ex_h, G), *counts = ialloc(NULL, E), *kept = ialloc(NULL, E),
            *offsets = ialloc(NULL, E + 1), *order = ialloc(NULL, G), *slot = ialloc(NULL, G);
    float *gate = falloc(G), *gk = falloc(G), *dot = falloc(G), *gamma = falloc(G);
    float *probs = falloc(G * E), *lse = falloc(G), *f = falloc(E);
    double *stats = twin_new(2 * sizeof(double));
    fill(gate, G, 0, 1);
    fill(dot, G, -1, 1);
    fill(probs, G * E, 0, 1);
    fill(lse, G, 0, 3);
    g_be->route_plan(g_be, up(counts), up(kept), up(offsets), up(order), up(slot), up(gk), up(ex),
                     up(gate), G, E, C);
    dn(counts), dn(kept), dn(offsets), dn(order), dn(slot), dn(gk);
    int cnt[E] = {0}, off[E + 1] = {0}, n_kept = 0;
    for (int t = 0; t < G; t++) cnt[ex_h[t]]++;
    for (int e = 0; e < E; e++) {
        assert_int_equal(counts[e], cnt[e]);
        assert_int_equal(kept[e], cnt[e] < C ? cnt[e] : C);
        off[e + 1] = off[e] + kept[e];
        assert_int_equal(offsets[e + 1], off[e + 1]);
    }
    assert_int_equal(offsets[0], 0);
    for (int e = 0; e < E; e++) {
        int pos = 0;
        for (int t = 0; t < G; t++) {
            if (ex_h[t] != e) continue;
            if (pos < C) {
                assert_int_equal(slot[t], off[e] + pos);
                assert_int_equal(order[off[e] + pos], t);
                assert_true(gk[off[e] + pos] == gate[t]);
                n_kept++;
            } else {
                assert_int_equal(slot[t], -1);
            }
            pos++;
        }
    }
    assert_int_equal(n_kept, off[E]);
    g_be->route_gamma(g_be, up(gamma), up(dot), up(slot), G);
    dn(gamma);
    for (int t = 0; t < G; t++) assert_true(gamma[t] == (slot[t] >= 0 ? dot[slot[t]] : 0.0f));
    g_be->route_stats(g_be, up(stats), up(f), up(probs), up(lse), up(counts), G, E);
    dn(stats), dn(f);
    double aux = 0.0, z = 0.0;
    for (int e = 0; e < E; e++) {
        double P = 0.0;
        for (int t = 0; t < G; t++) P += probs[t * E + e];
        assert_true(f[e] == (float)((double)cnt[e] / G));
        aux += ((double)cnt[e] / G) * (P / G);
    }
    for (int t = 0; t < G; t++) z += (double)lse[t] * lse[t];
    assert_true(stats[0] == E * aux);
    assert_true(stats[1] == z / G);
    ffree(ex), ffree(counts), ffree(kept), ffree(offsets), ffree(order), ffree(slot);
    ffree(gate), ffree(gk), ffree(dot), ffree(gamma), ffree(probs), ffree(lse), ffree(f);
    ffree(stats);
}

static void test_route_draws_and_wire(void **state) {
    (void)state;
    enum { G = 5, D = 6, F = 7, N = 3 };
    const float eps = 0.01f;
    float *h = falloc(G * D), *u = falloc(G * D), *xr = falloc(G * D), *mask = falloc(N * F);
    float *back = falloc(G * D);
    const int32_t tok_h[N] = {4, 0, 9}, micro_h[N] = {1, 3, 2};
    int32_t *tok = ialloc(tok_h, N), *micro = ialloc(micro_h, N);
    uint16_t *wire = twin_new(G * D * sizeof(uint16_t));
    fill(h, G * D, -2, 2);
    g_be->jitter_fwd(g_be, up(u), up(xr), up(h), G, D, eps, 77, 5, 2, 3);
    dn(u), dn(xr);
    for (int t = 0; t < G; t++) {
        sy_rng_t r = sy_rng_key(77, "router.jitter", 5, 2, (3ull << 32) | (uint64_t)t);
        for (int i = 0; i < D; i++) {
            float want = 1.0f - eps + 2.0f * eps * sy_rng_uniform(&r);
            assert_true(u[t * D + i] == want);
            assert_true(xr[t * D + i] == h[t * D + i] * want);
        }
    }
    const float keep = 0.75f, inv = 1.0f / keep;
    for (int with_micro = 0; with_micro < 2; with_micro++) {
        g_be->dropout_mask(g_be, up(mask), up(tok), with_micro ? up(micro) : NULL, N, F, keep, inv,
                           77, 5, 6, 3);
        dn(mask);
        for (int i = 0; i < N; i++) {
            sy_rng_t r = sy_rng_key(77, "expert.dropout", 5, (uint64_t)(with_micro ? micro_h[i] : 6),
                                    (3ull << 32) | (uint64_t)tok_h[i]);
            for (int j = 0; j < F; j++)
                assert_true(mask[i * F + j] == (sy_rng_uniform(&r) < keep ? inv : 0.0f));
        }
    }
    g_be->wire_put(g_be, up(wire), up(h), G * D, 2);
    dn(wire);
    g_be->wire_get(g_be, up(back), up(wire), G * D, 2);
    dn(back);
    for (int i = 0; i < G * D; i++) {
        assert_int_equal(wire[i], sy_f32_to_bf16(h[i]));
        assert_true(back[i] == sy_round_bf16(h[i]));
    }
    g_be->wire_put(g_be, up(back), up(h), G * D, 4);
    dn(back);
    assert_memory_equal(back, h, sizeof(float) * G * D);
    /* the CPU backend's memory is host memory; the poisoned variant's is not */
    float *hb = up(h);
    if (strcmp(g_be->name, "cpu-poison")) assert_ptr_equal(g_be->host_view(g_be, hb), hb);
    else assert_null(g_be->host_view(g_be, hb));
    ffree(h), ffree(u), ffree(xr), ffree(mask), ffree(back), ffree(tok), ffree(micro), ffree(wire);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_embed),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_causal),
        cmocka_unit_test(test_gelu),
        cmocka_unit_test(test_add_mul_round),
        cmocka_unit_test(test_xent),
        cmocka_unit_test(test_gather_scatter),
        cmocka_unit_test(test_router_fwd),
        cmocka_unit_test(test_router_bwd),
        cmocka_unit_test(test_route_plan),
        cmocka_unit_test(test_route_draws_and_wire),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
