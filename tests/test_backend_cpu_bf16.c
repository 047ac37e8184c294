/* bf16 emulation (model spec §4): sy_round_bf16 on hand-picked bit patterns against an
 * independent value-level rounding written here; the CPU backend's bf16 mode rounds exactly the
 * activations (round-to-nearest-even of the fp32 result) and keeps LayerNorm statistics, the
 * attention softmax and the router in fp32; a bf16-mode model gives a loss close to, but not
 * bit-identical with, the fp32 model. */
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
#include "model/switch.h"

#define SY_TEST_SEED 0xbf16bf16ULL
#include "sy_test.h"

static float f_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Rounds x to 8 significant bits (bf16: fp32's exponent range, 7 stored fraction bits) by
 * value: x = q·ulp with ulp the bf16 spacing at |x|, q rounded half to even with rint() in the
 * default rounding mode; beyond the largest finite bf16 the result is ±Inf. */
static double ref_round(double x) {
    if (isnan(x) || isinf(x) || x == 0.0) return x;
    int e;
    frexp(x, &e); /* |x| = m·2^e, m ∈ [0.5, 1) */
    if (e < -125) e = -125; /* subnormal range: fixed spacing 2^-133 */
    double ulp = ldexp(1.0, e - 8);
    double r = rint(x / ulp) * ulp;
    const double maxf = ldexp(255.0, 127 - 7); /* (2 - 2^-7)·2^127 = 0x7f7f */
    if (fabs(r) > maxf) return copysign(INFINITY, x);
    return r;
}

static int is_bf16(float v) { return (bits_of(v) & 0xffffu) == 0 || isnan(v); }

static void test_round_bits(void **state) {
    (void)state;
    /* input bits → expected bits, worked by hand */
    const struct {
        uint32_t in, out;
        const char *why;
    } cases[] = {
        {0x3f800000u, 0x3f800000u, "1.0 exact"},
        {0x3f808000u, 0x3f800000u, "tie, even below: down"},
        {0x3f818000u, 0x3f820000u, "tie, odd below: up to even"},
        {0x3f808001u, 0x3f810000u, "just above half: up"},
        {0x3f807fffu, 0x3f800000u, "just below half: down"},
        {0x3f817fffu, 0x3f810000u, "just below half, odd: down"},
        {0xbf808000u, 0xbf800000u, "negative tie: to even"},
        {0xbf818000u, 0xbf820000u, "negative tie, odd: to even (away)"},
        {0xbf808001u, 0xbf810000u, "negative above half"},
        {0x3fffffffu, 0x40000000u, "carry into the exponent"},
        {0x3f7fffffu, 0x3f800000u, "just below 1: up to 1"},
        {0x7f7f7fffu, 0x7f7f0000u, "largest finite bf16"},
        {0x7f7f8000u, 0x7f800000u, "tie above the largest finite: Inf"},
        {0x7f7fffffu, 0x7f800000u, "largest finite float: Inf"},
        {0xff7fffffu, 0xff800000u, "-largest finite float: -Inf"},
        {0x7f800000u, 0x7f800000u, "Inf"},
        {0xff800000u, 0xff800000u, "-Inf"},
        {0x00000000u, 0x00000000u, "+0"},
        {0x80000000u, 0x80000000u, "-0"},
        {0x00008000u, 0x00000000u, "subnormal tie: to 0 (even)"},
        {0x00018000u, 0x00020000u, "subnormal tie, odd: up"},
        {0x00008001u, 0x00010000u, "subnormal above half"},
        {0x00007fffu, 0x00000000u, "subnormal below half"},
        {0x00000001u, 0x00000000u, "smallest subnormal"},
        {0x807fffffu, 0x80800000u, "largest negative subnormal: to the smallest normal"},
        {0x42f6e979u, 0x42f70000u, "123.456"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float x = f_of(cases[i].in);
        float got = sy_round_bf16(x);
        double want = ref_round((double)x);
        if (bits_of(got) != cases[i].out || bits_of((float)want) != cases[i].out)
            fprintf(stderr, "%s: in %08x got %08x want %08x (reference %08x)\n", cases[i].why,
                    cases[i].in, bits_of(got), cases[i].out, bits_of((float)want));
        assert_int_equal(bits_of(got), cases[i].out);
        assert_int_equal(bits_of((float)want), cases[i].out); /* the reference agrees */
        assert_int_equal(sy_f32_to_bf16(x), cases[i].out >> 16);
    }
    /* NaN stays NaN (never Inf, never a number), sign kept */
    const uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0x7f808000u, 0x7fffffffu, 0xff800001u,
                             0xffc00001u, 0xffffffffu};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        float got = sy_round_bf16(f_of(nans[i]));
        assert_true(isnan(got));
        assert_int_equal(bits_of(got) >> 31, nans[i] >> 31);
        assert_int_equal(bits_of(got) & 0xffffu, 0);
    }
    /* many random values, all magnitudes, against the reference */
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)(urand() * 4294967296.0);
        float x = f_of(u);
        if (isnan(x)) continue;
        float got = sy_round_bf16(x);
        float want = (float)ref_round((double)x);
        if (bits_of(got) != bits_of(want))
            fprintf(stderr, "in %08x got %08x want %08x\n", u, bits_of(got), bits_of(want));
        assert_int_equal(bits_of(got), bits_of(want));
    }
}

/* ---------------------------------------------------------------- backend ops in bf16 mode */

static sy_backend_t *g_fp, *g_bf;

static int setup(void **state) {
    (void)state;
    if (sy_backend_cpu_new(1, false, &g_fp) != SY_OK) return -1;
    if (sy_backend_cpu_new(1, true, &g_bf) != SY_OK) return -1;
    return 0;
}
static int teardown(void **state) {
    (void)state;
    sy_backend_destroy(&g_fp);
    sy_backend_destroy(&g_bf);
    return 0;
}

/* Op arguments: UP(be, a) (a plain buffer) and UPA(be, a) (an activation buffer) upload the host array a (its sizeof) into a new buffer of be, freed
 * at the end of the test by free_bufs(); DN(be, a, buf) downloads buf into the host array a. */
enum { MAX_BUFS = 128 };
static struct {
    sy_backend_t *be;
    void *buf;
} g_bufs[MAX_BUFS];
static int g_nbufs;
static void *up_(sy_backend_t *be, const void *host, size_t bytes, bool act) {
    assert_true(g_nbufs < MAX_BUFS);
    void *buf = act ? sy_test_upload_act(be, host, bytes) : sy_test_upload_new(be, host, bytes);
    g_bufs[g_nbufs].be = be, g_bufs[g_nbufs].buf = buf, g_nbufs++;
    return buf;
}
static void free_bufs(void) {
    while (g_nbufs > 0) g_nbufs--, g_bufs[g_nbufs].be->free(g_bufs[g_nbufs].be, g_bufs[g_nbufs].buf);
}
#define UP(be, a) up_((be), (a), sizeof(a), false)
/* an activation buffer (model spec §4 keeps it in bf16): activations, activation gradients and
 * GEMM weights' working copies */
#define UPA(be, a) up_((be), (a), sizeof(a), true)
#define DN(be, a, buf) sy_test_download((be), (a), (buf), sizeof(a))

static void round_all(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = sy_round_bf16(x[i]);
}
static void assert_all_bf16(const char *what, const float *x, size_t n) {
    int bad = 0;
    for (size_t i = 0; i < n; i++)
        if (!is_bf16(x[i])) {
            if (bad < 3) fprintf(stderr, "%s[%zu] = %.9g is not a bf16 value\n", what, i, x[i]);
            bad++;
        }
    assert_int_equal(bad, 0);
}
/* bf16-mode output == bf16 rounding of the fp32-mode output */
static void assert_rounded_of(const char *what, const float *bf, const float *fp, size_t n) {
    int bad = 0;
    for (size_t i = 0; i < n; i++)
        if (bits_of(bf[i]) != bits_of(sy_round_bf16(fp[i]))) {
            if (bad < 3)
                fprintf(stderr, "%s[%zu]: bf16 mode %.9g, round(fp32) %.9g\n", what, i, bf[i],
                        sy_round_bf16(fp[i]));
            bad++;
        }
    assert_int_equal(bad, 0);
}
static int n_not_bf16(const float *x, size_t n) {
    int c = 0;
    for (size_t i = 0; i < n; i++) c += !is_bf16(x[i]);
    return c;
}

static void test_ops_round(void **state) {
    (void)state;
    enum { B = 2, T = 5, D = 8, H = 2, F = 12, N = B * T, V = 7 };
    float x[N * D], w[D], W[F * D], y1[N * F], y2[N * F], m1[N], m2[N], r1[N], r2[N];
    fill(x, N * D, -2, 2);
    fill(w, D, 0.5, 1.5);
    fill(W, F * D, -0.5, 0.5);
    round_all(x, N * D), round_all(w, D), round_all(W, F * D); /* bf16 inputs */

    float *b1, *b2, *b3, *b4, *b5, *b6;
    g_fp->matmul_fwd(g_fp, b1 = UPA(g_fp, y1), UPA(g_fp, x), UPA(g_fp, W), N, D, F);
    g_bf->matmul_fwd(g_bf, b2 = UPA(g_bf, y2), UPA(g_bf, x), UPA(g_bf, W), N, D, F);
    DN(g_fp, y1, b1), DN(g_bf, y2, b2);
    assert_rounded_of("matmul", y2, y1, N * F);
    assert_true(n_not_bf16(y1, N * F) > 0); /* there was something to round */

    g_fp->gelu_fwd(g_fp, b1 = UPA(g_fp, y1), UPA(g_fp, y2), N * F);
    float g2[N * F];
    g_bf->gelu_fwd(g_bf, b2 = UPA(g_bf, g2), UPA(g_bf, y2), N * F);
    DN(g_fp, y1, b1), DN(g_bf, g2, b2);
    assert_rounded_of("gelu", g2, y1, N * F);

    g_fp->layernorm_fwd(g_fp, b1 = UPA(g_fp, y1), b2 = UP(g_fp, m1), b3 = UP(g_fp, r1), UPA(g_fp, x),
                        UP(g_fp, w), N, D);
    g_bf->layernorm_fwd(g_bf, b4 = UPA(g_bf, y2), b5 = UP(g_bf, m2), b6 = UP(g_bf, r2), UPA(g_bf, x),
                        UP(g_bf, w), N, D);
    DN(g_fp, y1, b1), DN(g_fp, m1, b2), DN(g_fp, r1, b3);
    DN(g_bf, y2, b4), DN(g_bf, m2, b5), DN(g_bf, r2, b6);
    assert_rounded_of("layernorm", y2, y1, N * D);
    assert_memory_equal(m1, m2, sizeof m1); /* statistics stay fp32 */
    assert_memory_equal(r1, r2, sizeof r1);
    assert_true(n_not_bf16(r2, N) > 0);

    /* attention: output rounded, saved softmax fp32 */
    float qkv[N * 3 * D], o1[N * D], o2[N * D], a1[B * H * T * T], a2[B * H * T * T];
    fill(qkv, N * 3 * D, -1.5, 1.5);
    round_all(qkv, N * 3 * D);
    g_fp->attention_fwd(g_fp, b1 = UPA(g_fp, o1), b2 = UP(g_fp, a1), UPA(g_fp, qkv), B, T, D, H);
    g_bf->attention_fwd(g_bf, b3 = UPA(g_bf, o2), b4 = UP(g_bf, a2), UPA(g_bf, qkv), B, T, D, H);
    DN(g_fp, o1, b1), DN(g_fp, a1, b2), DN(g_bf, o2, b3), DN(g_bf, a2, b4);
    assert_rounded_of("attention out", o2, o1, N * D);
    assert_memory_equal(a1, a2, sizeof a1);
    assert_true(n_not_bf16(a2, B * H * T * T) > 0);

    /* embed, add: rounded */
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = i % V;
    float wte[V * D], wpe[T * D];
    fill(wte, V * D, -0.1, 0.1), fill(wpe, T * D, -0.1, 0.1);
    round_all(wte, V * D), round_all(wpe, T * D);
    g_fp->embed_fwd(g_fp, b1 = UPA(g_fp, o1), UP(g_fp, tok), UPA(g_fp, wte), UPA(g_fp, wpe), N, T, D);
    g_bf->embed_fwd(g_bf, b2 = UPA(g_bf, o2), UP(g_bf, tok), UPA(g_bf, wte), UPA(g_bf, wpe), N, T, D);
    DN(g_fp, o1, b1), DN(g_bf, o2, b2);
    assert_rounded_of("embed", o2, o1, N * D);
    memcpy(o1, x, sizeof o1), memcpy(o2, x, sizeof o2);
    g_fp->add_inplace(g_fp, b1 = UPA(g_fp, o1), UPA(g_fp, qkv), N * D);
    g_bf->add_inplace(g_bf, b2 = UPA(g_bf, o2), UPA(g_bf, qkv), N * D);
    DN(g_fp, o1, b1), DN(g_bf, o2, b2);
    assert_rounded_of("add", o2, o1, N * D);
    /* the dropout multiply (mask values 0 or 1/keep, not bf16 numbers): rounded */
    float mk[N * D];
    for (int i = 0; i < N * D; i++) mk[i] = i % 3 ? 1.0f / 0.6f : 0.0f;
    memcpy(o1, x, sizeof o1), memcpy(o2, x, sizeof o2);
    g_fp->mul_inplace(g_fp, b1 = UPA(g_fp, o1), UP(g_fp, mk), N * D);
    g_bf->mul_inplace(g_bf, b2 = UPA(g_bf, o2), UP(g_bf, mk), N * D);
    DN(g_fp, o1, b1), DN(g_bf, o2, b2);
    assert_rounded_of("mul (dropout)", o2, o1, N * D);
    assert_true(n_not_bf16(o1, N * D) > 0); /* there was something to round */

    /* activation gradients are rounded too */
    float dy[N * F], dx[N * D], dW[F * D] = {0}, dg[N * F];
    fill(dy, N * F, -1, 1);
    round_all(dy, N * F);
    g_bf->matmul_bwd(g_bf, b1 = UPA(g_bf, dx), b2 = UP(g_bf, dW), UPA(g_bf, dy), UPA(g_bf, x),
                     UPA(g_bf, W), N, D, F, false);
    DN(g_bf, dx, b1), DN(g_bf, dW, b2);
    assert_all_bf16("matmul dx", dx, N * D);
    assert_true(n_not_bf16(dW, F * D) > 0); /* weight gradients stay fp32 */
    g_bf->matmul_bwd(g_bf, b1 = UPA(g_bf, dx), b2 = UP(g_bf, dW), UPA(g_bf, dy), UPA(g_bf, x),
                     UPA(g_bf, W), N, D, F, true);
    DN(g_bf, dx, b1), DN(g_bf, dW, b2);
    assert_all_bf16("matmul dx (+=)", dx, N * D);
    g_bf->gelu_bwd(g_bf, b1 = UPA(g_bf, dg), UPA(g_bf, dy), UPA(g_bf, y2), N * F);
    DN(g_bf, dg, b1);
    assert_all_bf16("gelu dx", dg, N * F);
    float dln[N * D] = {0}, dw[D] = {0}, dyd[N * D];
    fill(dyd, N * D, -1, 1);
    round_all(dyd, N * D);
    g_bf->layernorm_bwd(g_bf, b1 = UPA(g_bf, dln), b2 = UP(g_bf, dw), UPA(g_bf, dyd), UPA(g_bf, x),
                        UP(g_bf, w), UP(g_bf, m2), UP(g_bf, r2), N, D);
    DN(g_bf, dln, b1), DN(g_bf, dw, b2);
    assert_all_bf16("layernorm dx", dln, N * D);
    float dqkv[N * 3 * D];
    g_bf->attention_bwd(g_bf, b1 = UPA(g_bf, dqkv), UPA(g_bf, dyd), UP(g_bf, a2), UPA(g_bf, qkv), B,
                        T, D, H);
    DN(g_bf, dqkv, b1);
    assert_all_bf16("attention dqkv", dqkv, N * 3 * D);

    /* the router never rounds */
    enum { E = 5 };
    float z[N * E], p[N * E], gate[N], lse[N];
    int32_t ex[N];
    fill(z, N * E, -3, 3);
    int32_t *bex;
    g_bf->router_fwd(g_bf, b1 = UP(g_bf, p), bex = UP(g_bf, ex), b2 = UP(g_bf, gate),
                     b3 = UP(g_bf, lse), UP(g_bf, z), N, E);
    DN(g_bf, p, b1), DN(g_bf, ex, bex), DN(g_bf, gate, b2), DN(g_bf, lse, b3);
    assert_true(n_not_bf16(p, N * E) > N);
    assert_true(n_not_bf16(gate, N) > 0);
    free_bufs();
}

/* ---------------------------------------------------------------- Switch layer in bf16 mode */

static void test_switch_bf16(void **state) {
    (void)state;
    enum { G = 16, D = 8, F = 8, E = 4 };
    sy_switch_t *sw = NULL;
    assert_int_equal(sy_switch_new(g_bf, G, D, F, E, &sw), SY_OK);
    /* host arrays; the layer gets uploaded copies (names with b) */
    static float h[G * D], Wr[E * D], W1[E * F * D], W2[E * D * F], dWr[E * D], out[G * D],
        dout[G * D], dh[G * D];
    static float dW1[E * F * D], dW2[E * D * F];
    static float probs[G * E], gate[G];
    static int32_t expert[G];
    fill(h, G * D, -2, 2);
    round_all(h, G * D); /* the LN output is a bf16 activation */
    fill(Wr, E * D, -0.6, 0.6); /* fp32 router weight, not bf16-representable */
    assert_true(n_not_bf16(Wr, E * D) > E * D / 2);
    fill(W1, E * F * D, -0.5, 0.5), fill(W2, E * D * F, -0.5, 0.5);
    round_all(W1, E * F * D), round_all(W2, E * D * F); /* the bf16 working copy */
    float *hb = UPA(g_bf, h), *Wrb = UP(g_bf, Wr), *W1b = UPA(g_bf, W1), *W2b = UPA(g_bf, W2);
    float *dW1b = UP(g_bf, dW1), *dW2b = UP(g_bf, dW2), *dWrb = UP(g_bf, dWr);
    float *outb = UPA(g_bf, out), *doutb = UPA(g_bf, dout), *dhb = UPA(g_bf, dh);
    sy_expert_weights ex[E];
    for (int e = 0; e < E; e++)
        ex[e] = (sy_expert_weights){W1b + e * F * D, W2b + e * D * F, dW1b + e * F * D,
                                    dW2b + e * D * F, NULL, NULL};
    sy_switch_key key = {1, 0, 0, 1};
    sy_switch_route(sw, hb, Wrb, 1.25, 0.0, key);
    sy_switch_dispatch(sw, hb);
    sy_switch_experts(sw, ex, 0, E, 0.0, key);
    sy_switch_combine(sw, outb);
    DN(g_bf, out, outb);
    sy_switch_info inf = sy_switch_get_info(sw);
    DN(g_bf, probs, inf.probs), DN(g_bf, gate, inf.gate), DN(g_bf, expert, inf.expert);

    /* router: fp64 softmax of fp32 logits h·W_rᵀ */
    double maxdiff_bf = 0.0;
    for (int t = 0; t < G; t++) {
        double z[E], zb[E], mx = -INFINITY, mxb = -INFINITY, s = 0, sb = 0;
        for (int e = 0; e < E; e++) {
            z[e] = 0.0;
            for (int i = 0; i < D; i++) z[e] += (double)h[t * D + i] * Wr[e * D + i];
            zb[e] = sy_round_bf16((float)z[e]); /* what a bf16 router would see */
            mx = fmax(mx, z[e]), mxb = fmax(mxb, zb[e]);
        }
        for (int e = 0; e < E; e++) s += exp(z[e] - mx), sb += exp(zb[e] - mxb);
        int best = 0;
        for (int e = 0; e < E; e++) {
            double p = exp(z[e] - mx) / s, pb = exp(zb[e] - mxb) / sb;
            assert_true(fabs(probs[t * E + e] - p) < 1e-6);
            maxdiff_bf = fmax(maxdiff_bf, fabs(pb - p));
            if (z[e] > z[best]) best = e;
        }
        assert_int_equal(expert[t], best);
        assert_true(fabs(gate[t] - exp(z[best] - mx) / s) < 1e-6);
    }
    assert_true(maxdiff_bf > 1e-4); /* the 1e-6 check would catch bf16 logits */

    /* the layer output, and the gradient it passes down, are bf16 activations */
    assert_all_bf16("switch out", out, G * D);
    assert_true(inf.n_kept > 0);
    fill(dout, G * D, -1, 1);
    round_all(dout, G * D);
    g_bf->upload(g_bf, doutb, dout, sizeof dout);
    sy_switch_combine_bwd(sw, doutb);
    sy_switch_experts_bwd(sw, ex, 0, E);
    sy_switch_dispatch_bwd(sw, dhb);
    sy_switch_route_bwd(sw, hb, Wrb, dWrb, dhb, 0.01f * E / G, 0.001f * 2 / G);
    DN(g_bf, dh, dhb), DN(g_bf, dWr, dWrb);
    assert_all_bf16("switch dh", dh, G * D);
    assert_true(n_not_bf16(dWr, E * D) > 0); /* the router gradient is fp32 */

    free_bufs();
    sy_switch_destroy(&sw);
}

/* ---------------------------------------------------------------- model in bf16 mode */

static void test_model_bf16_loss(void **state) {
    (void)state;
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
    cfg.train.micro_batch_seqs = 4;
    sy_model_dims d = sy_model_dims_from_config(&cfg);
    sy_config_free(&cfg);
    sy_model_t *mf = NULL, *mb = NULL;
    assert_int_equal(sy_model_new(&d, g_fp, &mf), SY_OK);
    assert_int_equal(sy_model_new(&d, g_bf, &mb), SY_OK);
    sy_model_init(mf, 99);
    sy_model_init(mb, 99);
    const size_t P = sy_model_numel(mf), bytes = P * sizeof(float);
    float *pf = sy_test_download_new(g_fp, sy_model_params(mf), bytes);
    float *pb = sy_test_download_new(g_bf, sy_model_params(mb), bytes);
    assert_memory_equal(pf, pb, bytes);
    int32_t tok[4 * 9];
    for (int i = 0; i < 4 * 9; i++) tok[i] = (int32_t)(urand() * d.V);
    sy_draw_key key = {99, 0, 0};
    sy_losses lf, lb;
    sy_model_zero_grads(mf);
    sy_model_zero_grads(mb);
    assert_int_equal(sy_model_fwd_bwd(mf, tok, 1, key, &lf), SY_OK);
    assert_int_equal(sy_model_fwd_bwd(mb, tok, 1, key, &lb), SY_OK);
    double Lf = lf.ce + lf.aux + lf.z, Lb = lb.ce + lb.aux + lb.z;
    fprintf(stderr, "fp32 loss %.9f, bf16 loss %.9f\n", Lf, Lb);
    assert_true(isfinite(Lb));
    assert_true(fabs(Lb - Lf) < 2e-2);
    assert_true(Lb != Lf); /* rounding happened */
    /* the eval forward, too */
    assert_int_equal(sy_model_forward_eval(mf, tok, 1, &lf), SY_OK);
    assert_int_equal(sy_model_forward_eval(mb, tok, 1, &lb), SY_OK);
    assert_true(fabs(lb.ce - lf.ce) < 2e-2 && lb.ce != lf.ce);
    /* the bf16 gradient points the same way as the fp32 one */
    float *gf = sy_test_download_new(g_fp, sy_model_grads(mf), bytes);
    float *gb = sy_test_download_new(g_bf, sy_model_grads(mb), bytes);
    double dot = 0, nf = 0, nb = 0;
    for (size_t i = 0; i < P; i++) {
        dot += (double)gf[i] * gb[i];
        nf += (double)gf[i] * gf[i];
        nb += (double)gb[i] * gb[i];
    }
    double cosv = dot / sqrt(nf * nb);
    fprintf(stderr, "gradient cosine fp32 vs bf16: %.6f\n", cosv);
    assert_true(cosv > 0.99);
    /* the fp32 master weights are untouched by bf16 mode */
    sy_model_t *mc = NULL;
    assert_int_equal(sy_model_new(&d, g_fp, &mc), SY_OK);
    sy_model_init(mc, 99);
    float *pc = sy_test_download_new(g_fp, sy_model_params(mc), bytes);
    sy_test_download(g_bf, pb, sy_model_params(mb), bytes);
    assert_memory_equal(pc, pb, bytes);
    assert_true(n_not_bf16(pb, P) > 0);
    free(pf), free(pb), free(pc), free(gf), free(gb);
    sy_model_destroy(&mc);
    sy_model_destroy(&mf);
    sy_model_destroy(&mb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_bits),
        cmocka_unit_test(test_ops_round),
        cmocka_unit_test(test_switch_bf16),
        cmocka_unit_test(test_model_bf16_loss),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
