/* CPU backend: OpenBLAS sgemm for the linear layers, OpenMP loops for everything else.
 * Reductions that decide the result (LayerNorm statistics, softmax sums, cross-entropy) are
 * accumulated in fp32 per row in a fixed order, so results do not depend on the thread count.
 * Where its loop is no faster than a per-element / per-row loop, an op calls the shared kernel
 * body (kernels/, the code the emulation and CUDA backends run) with bf16 = false and rounds
 * in a separate pass; where its own loop is faster (row memcpy, column blocks, per-row draws)
 * it keeps it, and the body computes the same numbers in the same order
 * (tests/test_backend_emu.c checks that bit for bit). */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "base/log.h"
#include "backend/cpu_setup.h"
#include "base/bf16.h"
#include "backend/cpu_math.h"
#include "backend/gemm_cpu.h"
#include "backend/kernels/k_elementwise.h"
#include "backend/kernels/k_rows.h"
#include "backend_cpu_internal.h"

typedef struct {
    sy_backend_t base;
    int threads;
    float *scratch;        /* per-thread [T,T] buffers for attention backward */
    size_t scratch_floats; /* per thread */
    int scratch_threads;
} cpu_backend_t;


/* Per-thread scratch of n floats each, grown (never per step once sized). NULL on failure. */
static float *cpu_scratch(cpu_backend_t *c, size_t n) {
    int nt = omp_get_max_threads();
    if (c->scratch && c->scratch_floats >= n && c->scratch_threads >= nt) return c->scratch;
    free(c->scratch);
    c->scratch = NULL;
    if (posix_memalign((void **)&c->scratch, 64, sizeof(float) * n * (size_t)nt) != 0) {
        c->scratch = NULL;
        return NULL;
    }
    c->scratch_floats = n;
    c->scratch_threads = nt;
    return c->scratch;
}

void openblas_set_num_threads(int n);
int openblas_get_num_threads(void);

static void *cpu_alloc(sy_backend_t *be, size_t bytes) {
    (void)be;
    void *p = NULL;
    size_t sz = (bytes + 63) & ~(size_t)63;
    if (sz == 0) sz = 64;
    if (posix_memalign(&p, 64, sz) != 0) return NULL;
    memset(p, 0, sz);
    return p;
}

static void cpu_free(sy_backend_t *be, void *p) {
    (void)be;
    free(p);
}

static void cpu_round_bf16(sy_backend_t *be, float *x, size_t n) {
    if (!be->bf16) return;
    SY_CPU_CHUNKED(n, lo, hi, sy_cpu_round_range(x, lo, hi));
}

static void cpu_embed_fwd(sy_backend_t *be, float *x, const int32_t *tok, const float *wte,
                          const float *wpe, int N, int T, int D) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *e = wte + (size_t)tok[n] * D, *p = wpe + (size_t)(n % T) * D;
        float *o = x + (size_t)n * D;
        for (int i = 0; i < D; i++) o[i] = e[i] + p[i];
    }
    cpu_round_bf16(be, x, (size_t)N * D);
}

static void cpu_embed_bwd(sy_backend_t *be, float *dwte, float *dwpe, const float *dx,
                          const int32_t *tok, int N, int T, int D) {
    (void)be;
    /* Parallel over the embedding dimension so that rows hit by several tokens are summed in
     * token order, whatever the thread count. */
#pragma omp parallel for schedule(static)
    for (int i = 0; i < D; i++) sy_k_embed_bwd_col((size_t)i, dwte, dwpe, dx, tok, N, T, D);
}

static void cpu_matmul_fwd(sy_backend_t *be, float *y, const float *x, const float *W, int N,
                           int in, int out) {
    if (N == 0) return;
    sy_sgemm(false, true, N, out, in, 1.0f, x, in, W, in, 0.0f, y, out, be->bf16);
}

/* The two GEMMs of a matmul backward, as grouped-GEMM problems.
 * dx[N,in] = dy · W (beta 1: +=), rounded to bf16 in bf16 mode. */
static sy_gemm_problem dx_problem(const sy_backend_t *be, float *dx, const float *dy,
                                  const float *W, int N, int in, int out, float beta) {
    return (sy_gemm_problem){.M = N, .N = in, .K = out, .alpha = 1.0f, .beta = beta, .A = dy,
                             .lda = out, .B = W, .ldb = in, .C = dx, .ldc = in,
                             .epi.round_bf16 = be->bf16};
}

/* dW[out,in] += dyᵀ · x; with dW64: dW is scratch, dW = dyᵀ · x is added into dW64 instead. */
static sy_gemm_problem dw_problem(float *dW, double *dW64, const float *dy, const float *x, int N,
                                  int in, int out) {
    return (sy_gemm_problem){.ta = true, .M = out, .N = in, .K = N, .alpha = 1.0f,
                             .beta = dW64 ? 0.0f : 1.0f, .A = dy, .lda = out, .B = x, .ldb = in,
                             .C = dW, .ldc = in,
                             .epi = {.acc = dW64, .ldacc = in, .c_scratch = dW64 != NULL}};
}

static void cpu_matmul_bwd(sy_backend_t *be, float *dx, float *dW, const float *dy,
                           const float *x, const float *W, int N, int in, int out,
                           bool accumulate_dx) {
    if (N == 0) return;
    const sy_gemm_problem pw = dw_problem(dW, NULL, dy, x, N, in, out);
    if (dx && accumulate_dx && be->bf16) {
        /* dx = round(dx + round(dy · W)): the product is rounded before the add, as a bf16
         * GEMM output would be, so it goes through a temporary */
        float *tmp = malloc((size_t)N * in * sizeof(float));
        if (tmp) {
            const sy_gemm_problem p[2] = {dx_problem(be, tmp, dy, W, N, in, out, 0.0f), pw};
            sy_sgemm_group(p, 2);
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < (size_t)N * in; i++) dx[i] = sy_round_bf16(dx[i] + tmp[i]);
            free(tmp);
            return;
        }
        sy_sgemm_group(&pw, 1);
        return;
    }
    if (!dx) {
        sy_sgemm_group(&pw, 1);
        return;
    }
    /* dx (+)= dy · W and dW += dyᵀ · x are independent: one grouped loop over both */
    const sy_gemm_problem p[2] = {dx_problem(be, dx, dy, W, N, in, out, accumulate_dx ? 1.0f : 0.0f),
                                  pw};
    sy_sgemm_group(p, 2);
}

static void cpu_matmul_bwd_acc64(sy_backend_t *be, float *dx, float *dW, double *dW64,
                                 const float *dy, const float *x, const float *W, int N, int in,
                                 int out) {
    if (N == 0) return;
    const sy_gemm_problem p[2] = {dx_problem(be, dx, dy, W, N, in, out, 0.0f),
                                  dw_problem(dW, dW64, dy, x, N, in, out)};
    sy_sgemm_group(p, 2);
}

/* Groups larger than this run in slices (same results). */
#define SY_GROUP_MAX 64

/* matmul_fwd_group, with g NULL; else matmul_gelu_fwd_group (GELU in the tile epilogue) */
static void cpu_matmul_gelu_fwd_group(sy_backend_t *be, float *const *y, float *const *g,
                                      const float *const *x, const float *const *W,
                                      const int *N, int n, int in, int out) {
    for (int g0 = 0; g0 < n; g0 += SY_GROUP_MAX) {
        sy_gemm_problem p[SY_GROUP_MAX];
        const int k = n - g0 < SY_GROUP_MAX ? n - g0 : SY_GROUP_MAX;
        for (int i = 0; i < k; i++)
            p[i] = (sy_gemm_problem){.tb = true, .M = N[g0 + i], .N = out, .K = in, .alpha = 1.0f,
                                     .A = x[g0 + i], .lda = in, .B = W[g0 + i], .ldb = in,
                                     .C = y[g0 + i], .ldc = out,
                                     .epi = {.round_bf16 = be->bf16,
                                             .gelu_y = g ? g[g0 + i] : NULL, .ldg = out}};
        sy_sgemm_group(p, k);
    }
}

static void cpu_matmul_fwd_group(sy_backend_t *be, float *const *y, const float *const *x,
                                 const float *const *W, const int *N, int n, int in, int out) {
    cpu_matmul_gelu_fwd_group(be, y, NULL, x, W, N, n, in, out);
}

/* matmul_bwd_group, with pre NULL; else matmul_gelu_bwd_group (mask and GELU backward in the
 * epilogue of the dx tiles) */
static void cpu_matmul_gelu_bwd_group(sy_backend_t *be, float *const *dx, float *const *dW,
                                      double *const *dW64, const float *const *dy,
                                      const float *const *x, const float *const *W,
                                      const float *const *mask, const float *const *pre,
                                      float *const *dpre, const int *N, int n, int in, int out) {
    for (int g0 = 0; g0 < n; g0 += SY_GROUP_MAX) {
        sy_gemm_problem p[2 * SY_GROUP_MAX];
        const int k = n - g0 < SY_GROUP_MAX ? n - g0 : SY_GROUP_MAX;
        int np = 0;
        for (int i = g0; i < g0 + k; i++) {
            if (N[i] == 0) continue;
            sy_gemm_problem px = dx_problem(be, dx[i], dy[i], W[i], N[i], in, out, 0.0f);
            if (pre) {
                px.epi.gelu_pre = pre[i], px.epi.gelu_dx = dpre[i], px.epi.ldg = in;
                px.epi.mask = mask ? mask[i] : NULL;
            }
            p[np++] = px;
            p[np++] = dw_problem(dW[i], dW64 ? dW64[i] : NULL, dy[i], x[i], N[i], in, out);
        }
        sy_sgemm_group(p, np);
    }
}

static void cpu_matmul_bwd_group(sy_backend_t *be, float *const *dx, float *const *dW,
                                 double *const *dW64, const float *const *dy,
                                 const float *const *x, const float *const *W, const int *N,
                                 int n, int in, int out) {
    cpu_matmul_gelu_bwd_group(be, dx, dW, dW64, dy, x, W, NULL, NULL, NULL, N, n, in, out);
}

static void cpu_layernorm_fwd(sy_backend_t *be, float *y, float *mean, float *rstd,
                              const float *x, const float *w, int N, int D) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) sy_k_layernorm_fwd_row(n, y, mean, rstd, x, w, D, false);
    cpu_round_bf16(be, y, (size_t)N * D);
}

static void cpu_layernorm_bwd(sy_backend_t *be, float *dx, float *dw, const float *dy,
                              const float *x, const float *w, const float *mean,
                              const float *rstd, int N, int D) {
    /* dx: per row. dw: reduced over rows; done per column block in row order for determinism. */
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) sy_k_layernorm_bwd_dx_row(n, dx, dy, x, w, mean, rstd, D, false);
    cpu_round_bf16(be, dx, (size_t)N * D);
    /* dw[i] += Σ_n dy·xhat, each column summed over rows in row order (so the thread count
     * does not matter); columns in blocks of LN_COLS so each row's slice is one contiguous,
     * vectorisable read instead of a strided walk per column (sy_k_layernorm_bwd_dw_col is
     * the same sum, one column per call). */
    enum { LN_COLS = 32 };
    const int nb = (D + LN_COLS - 1) / LN_COLS;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nb; b++) {
        const int i0 = b * LN_COLS, w = D - i0 < LN_COLS ? D - i0 : LN_COLS;
        float acc[LN_COLS] = {0};
        for (int n = 0; n < N; n++) {
            const float *dyr = dy + (size_t)n * D + i0, *xr = x + (size_t)n * D + i0;
            const float m = mean[n], r = rstd[n];
#pragma omp simd
            for (int j = 0; j < w; j++) acc[j] += dyr[j] * (xr[j] - m) * r;
        }
        for (int j = 0; j < w; j++) dw[i0 + j] += acc[j];
    }
}

/* One (b, h) slice at a time, per thread: S = q·kᵀ·scale through sgemm straight out of the
 * strided qkv rows (OpenBLAS runs single-threaded inside a parallel region), causal softmax per
 * row, out = P·v. The upper triangle is computed and discarded: cheaper than scalar loops. */
SY_CLONES static void causal_softmax_rows(float *a, int T) {
    for (int t = 0; t < T; t++) {
        float *ar = a + (size_t)t * T;
        float mx = -INFINITY;
        for (int s = 0; s <= t; s++) mx = ar[s] > mx ? ar[s] : mx;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int s = 0; s <= t; s++) {
            ar[s] = sy_expf(ar[s] - mx);
            sum += ar[s];
        }
        float inv = 1.0f / sum;
#pragma omp simd
        for (int s = 0; s <= t; s++) ar[s] *= inv;
        for (int s = t + 1; s < T; s++) ar[s] = 0.0f;
    }
}

static void cpu_attention_fwd(sy_backend_t *be, float *out, float *att, const float *qkv, int B,
                              int T, int D, int H) {
    const int hd = D / H, C3 = 3 * D;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const float *q = qkv + (size_t)b * T * C3 + (size_t)h * hd;
            const float *k = q + D, *v = q + 2 * D;
            float *a = att + ((size_t)b * H + h) * T * T;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, scale, q, C3, k, C3,
                        0.0f, a, T);
            causal_softmax_rows(a, T);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, a, T, v, C3,
                        0.0f, out + (size_t)b * T * D + (size_t)h * hd, D);
        }
    }
    cpu_round_bf16(be, out, (size_t)B * T * D);
}

/* dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale, in place over dP */
SY_CLONES static void softmax_bwd_rows(float *dp, const float *p, int T, float scale) {
    for (int t = 0; t < T; t++) {
        float *d = dp + (size_t)t * T;
        const float *pr = p + (size_t)t * T;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int s = 0; s <= t; s++) dot += pr[s] * d[s];
#pragma omp simd
        for (int s = 0; s <= t; s++) d[s] = pr[s] * (d[s] - dot) * scale;
        for (int s = t + 1; s < T; s++) d[s] = 0.0f;
    }
}

static void cpu_attention_bwd(sy_backend_t *be, float *dqkv, const float *dout, const float *att,
                              const float *qkv, int B, int T, int D, int H) {
    cpu_backend_t *c = (cpu_backend_t *)be;
    const int hd = D / H, C3 = 3 * D;
    const float scale = 1.0f / sqrtf((float)hd);
    float *scratch = cpu_scratch(c, (size_t)T * T);
    if (!scratch) abort(); /* cannot happen after the first call sized it; allocation is tiny */
#pragma omp parallel
    {
        float *dp = scratch + (size_t)omp_get_thread_num() * c->scratch_floats;
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < H; h++) {
                const size_t base = (size_t)b * T * C3 + (size_t)h * hd;
                const float *q = qkv + base, *k = q + D, *v = q + 2 * D;
                float *dq = dqkv + base, *dk = dq + D, *dv = dq + 2 * D;
                const float *dO = dout + (size_t)b * T * D + (size_t)h * hd;
                const float *p = att + ((size_t)b * H + h) * T * T;
                /* dP = dO·vᵀ ; dv = Pᵀ·dO */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, 1.0f, dO, D, v, C3,
                            0.0f, dp, T);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1.0f, p, T, dO, D,
                            0.0f, dv, C3);
                softmax_bwd_rows(dp, p, T, scale);
                /* dq = dS·k ; dk = dSᵀ·q */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, dp, T, k, C3,
                            0.0f, dq, C3);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1.0f, dp, T, q, C3,
                            0.0f, dk, C3);
            }
        }
    }
    cpu_round_bf16(be, dqkv, (size_t)B * T * C3);
}

SY_CLONES static void gelu_fwd_range(float *y, const float *x, size_t lo, size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; i++) y[i] = sy_k_gelu(x[i]);
}

SY_CLONES static void gelu_bwd_range(float *dx, const float *dy, const float *x, size_t lo,
                                     size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; i++) dx[i] = dy[i] * sy_k_gelu_grad(x[i]);
}

#define SY_CHUNK 16384

static void cpu_gelu_fwd(sy_backend_t *be, float *y, const float *x, size_t n) {
    size_t nc = (n + SY_CHUNK - 1) / SY_CHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nc; c++)
        gelu_fwd_range(y, x, c * SY_CHUNK, (c + 1) * SY_CHUNK < n ? (c + 1) * SY_CHUNK : n);
    cpu_round_bf16(be, y, n);
}

static void cpu_gelu_bwd(sy_backend_t *be, float *dx, const float *dy, const float *x, size_t n) {
    size_t nc = (n + SY_CHUNK - 1) / SY_CHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nc; c++)
        gelu_bwd_range(dx, dy, x, c * SY_CHUNK, (c + 1) * SY_CHUNK < n ? (c + 1) * SY_CHUNK : n);
    cpu_round_bf16(be, dx, n);
}

static void cpu_add_inplace(sy_backend_t *be, float *y, const float *x, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) sy_k_add(i, y, x, false);
    cpu_round_bf16(be, y, n);
}

/* Σ_t loss_t: each block of rows in parallel into a per-row array, then summed in row order,
 * so the total does not depend on the thread count (an OpenMP reduction would). */
static double xent_sum(float *dlogits, const float *logits, const int32_t *targets, int N, int V,
                       float scale) {
    enum { ROWS = 1024 };
    double rl[ROWS], total = 0.0;
    for (int n0 = 0; n0 < N; n0 += ROWS) {
        const int k = N - n0 < ROWS ? N - n0 : ROWS;
#pragma omp parallel for schedule(static)
        for (int i = 0; i < k; i++) {
            const size_t r0 = (size_t)n0 * V; /* the block's first row */
            sy_k_xent_row(i, rl, dlogits ? dlogits + r0 : NULL, logits + r0, targets + n0, V,
                          scale);
        }
        for (int i = 0; i < k; i++) total += rl[i];
    }
    return total;
}

static double cpu_xent_fwd_bwd(sy_backend_t *be, float *dlogits, const float *logits,
                               const int32_t *targets, int N, int V, float scale) {
    (void)be;
    return xent_sum(dlogits, logits, targets, N, V, scale);
}

static double cpu_xent_fwd(sy_backend_t *be, const float *logits, const int32_t *targets, int N,
                           int V) {
    (void)be;
    return xent_sum(NULL, logits, targets, N, V, 0.0f);
}

static void cpu_gather_rows(sy_backend_t *be, float *dst, const float *src, const int32_t *idx,
                            int n, int D) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) memcpy(dst + (size_t)i * D, src + (size_t)idx[i] * D, sizeof(float) * D);
}

static void cpu_scatter_rows_scaled(sy_backend_t *be, float *dst, const float *src,
                                    const int32_t *idx, const float *scale, int n, int D) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        float *o = dst + (size_t)idx[i] * D;
        const float *s = src + (size_t)i * D;
        float g = scale[i];
        for (int k = 0; k < D; k++) o[k] = be->bf16 ? sy_round_bf16(g * s[k]) : g * s[k];
    }
}

static void cpu_scatter_add_rows(sy_backend_t *be, float *dst, const float *src,
                                 const int32_t *idx, int n, int D) {
    /* indices are distinct within one call (one row per kept token) */
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        float *o = dst + (size_t)idx[i] * D;
        const float *s = src + (size_t)i * D;
        for (int k = 0; k < D; k++) o[k] = be->bf16 ? sy_round_bf16(o[k] + s[k]) : o[k] + s[k];
    }
}

static void cpu_gather_dot_scale(sy_backend_t *be, float *dot, float *out, const float *a,
                                 const float *b, const int32_t *idx, const float *scale, int n,
                                 int D) {
    const bool bf = be->bf16;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) sy_k_gather_dot_scale_row(i, dot, out, a, b, idx, scale, D, bf);
}

static void cpu_router_fwd(sy_backend_t *be, float *probs, int32_t *expert, float *gate,
                           float *lse, const float *logits, int N, int E) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) sy_k_router_fwd_row(n, probs, expert, gate, lse, logits, E);
}

static void cpu_router_bwd(sy_backend_t *be, float *dlogits, const float *probs,
                           const int32_t *expert, const float *gamma, const float *lse,
                           const float *f, float aux_scale, float z_scale, int N, int E) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        sy_k_router_bwd_row(n, dlogits, probs, expert, gamma, lse, f, aux_scale, z_scale, E);
}

static void cpu_mul_inplace(sy_backend_t *be, float *x, const float *mask, size_t n) {
    const bool bf = be->bf16;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) sy_k_mul(i, x, mask, bf);
}

static void cpu_destroy(sy_backend_t *be) {
    free(((cpu_backend_t *)be)->scratch);
    free(be);
}

sy_status sy_backend_cpu_new_plain(int threads, bool bf16, sy_backend_t **out) {
    cpu_backend_t *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "cpu backend: out of memory");
    if (threads > 0) {
        /* OpenBLAS spins for ever when it cannot allocate a new thread's buffer: check first */
        int have = openblas_get_num_threads();
        if (threads > have && !sy_cpu_blas_room(threads - have)) {
            free(c);
            return sy_err_set(SY_ENOMEM,
                              "cpu backend: out of memory: OpenBLAS needs about %zu MiB of address space for %d more "
                              "thread(s) (a memory limit such as ulimit -v?); use fewer threads",
                              sy_cpu_blas_bytes(threads - have) >> 20, threads - have);
        }
        omp_set_num_threads(threads);
        openblas_set_num_threads(threads);
    }
    c->threads = threads;
    sy_backend_t *b = &c->base;
    b->name = "cpu";
    b->bf16 = bf16;
    b->alloc = cpu_alloc;
    b->free = cpu_free;
    b->round_bf16 = cpu_round_bf16;
    sy_cpu_step_install(b);
    sy_cpu_route_install(b);
    b->embed_fwd = cpu_embed_fwd;
    b->embed_bwd = cpu_embed_bwd;
    b->matmul_fwd = cpu_matmul_fwd;
    b->matmul_bwd = cpu_matmul_bwd;
    b->matmul_bwd_acc64 = cpu_matmul_bwd_acc64;
    b->matmul_fwd_group = cpu_matmul_fwd_group;
    b->matmul_bwd_group = cpu_matmul_bwd_group;
    /* The fused GELU GEMMs (cpu_matmul_gelu_*_group) are not installed: bit-identical to the
     * separate ops, fewer cache misses under callgrind, but slower by the clock with 2 threads
     * (bench/run.sh on an idle machine, SkylakeX: Switch forward 45.7 -> 68.4 ms, fwd+bwd
     * 149 -> 197 ms; docs/performance.md). Callers run gelu_fwd/gelu_bwd after the GEMMs. */
    (void)cpu_matmul_gelu_fwd_group;
    (void)cpu_matmul_gelu_bwd_group;
    b->layernorm_fwd = cpu_layernorm_fwd;
    b->layernorm_bwd = cpu_layernorm_bwd;
    b->attention_fwd = cpu_attention_fwd;
    b->attention_bwd = cpu_attention_bwd;
    b->gelu_fwd = cpu_gelu_fwd;
    b->gelu_bwd = cpu_gelu_bwd;
    b->add_inplace = cpu_add_inplace;
    b->xent_fwd_bwd = cpu_xent_fwd_bwd;
    b->xent_fwd = cpu_xent_fwd;
    b->gather_rows = cpu_gather_rows;
    b->scatter_rows_scaled = cpu_scatter_rows_scaled;
    b->scatter_add_rows = cpu_scatter_add_rows;
    b->gather_dot_scale = cpu_gather_dot_scale;
    b->router_fwd = cpu_router_fwd;
    b->router_bwd = cpu_router_bwd;
    b->mul_inplace = cpu_mul_inplace;
    b->destroy = cpu_destroy;
    *out = b;
    return SY_OK;
}

sy_status sy_backend_poison_maybe(sy_backend_t *inner, sy_backend_t **out) {
    const char *poison = getenv("SY_BACKEND_POISON");
    if (poison && poison[0] == '1') {
        sy_warn("SY_BACKEND_POISON=1: the poisoned-handle test backend (every host access of backend "
                "memory faults); not for production runs");
        return sy_backend_poison_wrap(inner, out); /* backend_poison.c */
    }
    *out = inner;
    return SY_OK;
}

sy_status sy_backend_cpu_new(int threads, bool bf16, sy_backend_t **out) {
    /* SY_BACKEND=emu runs any program or test that asks for the CPU backend on the emulation
     * backend instead (as SY_BACKEND_POISON does for the poisoned variant): the existing suites
     * then exercise the shared kernel bodies unedited. */
    const char *sel = getenv("SY_BACKEND");
    if (sel && strcmp(sel, "emu") == 0) {
        sy_warn("SY_BACKEND=emu: the emulation test backend (the GPU kernel bodies in host loops); not "
                "for production runs");
        return sy_backend_emu_new_threads(threads, bf16, out);
    }
    sy_backend_t *b = NULL, *t = NULL;
    SY_CHECK(sy_backend_cpu_new_plain(threads, bf16, &b));
    SY_CHECK(sy_backend_bf16_maybe(b, bf16, &t));
    return sy_backend_poison_maybe(t, out);
}

void sy_backend_destroy(sy_backend_t **self_p) {
    if (!self_p || !*self_p) return;
    (*self_p)->destroy(*self_p);
    *self_p = NULL;
}
