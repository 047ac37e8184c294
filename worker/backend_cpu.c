/* CPU backend: OpenBLAS sgemm for the linear layers, OpenMP loops for everything else.
 * Reductions that decide the result (LayerNorm statistics, softmax sums, cross-entropy) are
 * accumulated in fp32 per row in a fixed order, so results do not depend on the thread count. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_setup.h"
#include "bf16.h"
#include "cpu_math.h"

#define SY_LN_EPS 1e-5f
#define SY_GELU_C 0.7978845608028654f /* sqrt(2/pi) */
#define SY_GELU_A 0.044715f

typedef struct {
    sy_backend_t base;
    int threads;
    float *scratch;        /* per-thread [T,T] buffers for attention backward */
    size_t scratch_floats; /* per thread */
    int scratch_threads;
} cpu_backend_t;

/* Hot kernels are compiled for AVX-512 and AVX2 as well as the baseline, picked at load time. */
#define SY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

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
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) x[i] = sy_round_bf16(x[i]);
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
    for (int i = 0; i < D; i++) {
        for (int n = 0; n < N; n++) {
            float g = dx[(size_t)n * D + i];
            dwte[(size_t)tok[n] * D + i] += g;
            dwpe[(size_t)(n % T) * D + i] += g;
        }
    }
}

static void cpu_matmul_fwd(sy_backend_t *be, float *y, const float *x, const float *W, int N,
                           int in, int out) {
    if (N == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, out, in, 1.0f, x, in, W, in, 0.0f,
                y, out);
    cpu_round_bf16(be, y, (size_t)N * out);
}

static void cpu_matmul_bwd(sy_backend_t *be, float *dx, float *dW, const float *dy,
                           const float *x, const float *W, int N, int in, int out,
                           bool accumulate_dx) {
    if (N == 0) return;
    if (dx) {
        if (accumulate_dx && be->bf16) {
            /* round the product before adding, as a bf16 GEMM output would be */
            float *tmp = malloc((size_t)N * in * sizeof(float));
            if (tmp) {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, out, 1.0f, dy, out,
                            W, in, 0.0f, tmp, in);
                cpu_round_bf16(be, tmp, (size_t)N * in);
#pragma omp parallel for schedule(static)
                for (size_t i = 0; i < (size_t)N * in; i++) dx[i] = sy_round_bf16(dx[i] + tmp[i]);
                free(tmp);
            }
        } else {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, out, 1.0f, dy, out, W,
                        in, accumulate_dx ? 1.0f : 0.0f, dx, in);
            cpu_round_bf16(be, dx, (size_t)N * in);
        }
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, N, 1.0f, dy, out, x, in, 1.0f,
                dW, in);
}

static void cpu_layernorm_fwd(sy_backend_t *be, float *y, float *mean, float *rstd,
                              const float *x, const float *w, int N, int D) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D;
        float *yr = y + (size_t)n * D;
        float m = 0.0f;
        for (int i = 0; i < D; i++) m += xr[i];
        m /= (float)D;
        float v = 0.0f;
        for (int i = 0; i < D; i++) {
            float d = xr[i] - m;
            v += d * d;
        }
        v /= (float)D;
        float r = 1.0f / sqrtf(v + SY_LN_EPS);
        for (int i = 0; i < D; i++) yr[i] = (xr[i] - m) * r * w[i];
        mean[n] = m;
        rstd[n] = r;
    }
    cpu_round_bf16(be, y, (size_t)N * D);
}

static void cpu_layernorm_bwd(sy_backend_t *be, float *dx, float *dw, const float *dy,
                              const float *x, const float *w, const float *mean,
                              const float *rstd, int N, int D) {
    /* dx: per row. dw: reduced over rows; done per column block in row order for determinism. */
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D, *dyr = dy + (size_t)n * D;
        float *dxr = dx + (size_t)n * D;
        float m = mean[n], r = rstd[n];
        float s1 = 0.0f, s2 = 0.0f; /* mean of dy·w, mean of dy·w·xhat */
        for (int i = 0; i < D; i++) {
            float dn = dyr[i] * w[i];
            s1 += dn;
            s2 += dn * (xr[i] - m) * r;
        }
        s1 /= (float)D;
        s2 /= (float)D;
        for (int i = 0; i < D; i++) {
            float xh = (xr[i] - m) * r;
            dxr[i] += r * (dyr[i] * w[i] - s1 - xh * s2);
        }
    }
    cpu_round_bf16(be, dx, (size_t)N * D);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < D; i++) {
        float acc = 0.0f;
        for (int n = 0; n < N; n++)
            acc += dy[(size_t)n * D + i] * (x[(size_t)n * D + i] - mean[n]) * rstd[n];
        dw[i] += acc;
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
    for (size_t i = lo; i < hi; i++) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + sy_tanhf(SY_GELU_C * (v + SY_GELU_A * v * v * v)));
    }
}

SY_CLONES static void gelu_bwd_range(float *dx, const float *dy, const float *x, size_t lo,
                                     size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; i++) {
        float v = x[i];
        float th = sy_tanhf(SY_GELU_C * (v + SY_GELU_A * v * v * v));
        float sech2 = 1.0f - th * th;
        float g = 0.5f * (1.0f + th) + 0.5f * v * sech2 * SY_GELU_C * (1.0f + 3.0f * SY_GELU_A * v * v);
        dx[i] = dy[i] * g;
    }
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
    for (size_t i = 0; i < n; i++) y[i] += x[i];
    cpu_round_bf16(be, y, n);
}

static double cpu_xent_fwd_bwd(sy_backend_t *be, float *dlogits, const float *logits,
                               const int32_t *targets, int N, int V, float scale) {
    (void)be;
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float *d = dlogits + (size_t)n * V;
        float mx = -INFINITY;
        for (int v = 0; v < V; v++) mx = l[v] > mx ? l[v] : mx;
        float sum = 0.0f;
        for (int v = 0; v < V; v++) sum += expf(l[v] - mx);
        float lse = mx + logf(sum);
        total += (double)(lse - l[targets[n]]);
        float inv = 1.0f / sum;
        for (int v = 0; v < V; v++) d[v] = expf(l[v] - mx) * inv * scale;
        d[targets[n]] -= scale;
    }
    return total;
}

static double cpu_xent_fwd(sy_backend_t *be, const float *logits, const int32_t *targets, int N,
                           int V) {
    (void)be;
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float mx = -INFINITY;
        for (int v = 0; v < V; v++) mx = l[v] > mx ? l[v] : mx;
        float sum = 0.0f;
        for (int v = 0; v < V; v++) sum += expf(l[v] - mx);
        total += (double)(mx + logf(sum) - l[targets[n]]);
    }
    return total;
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
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const float *ar = a + (size_t)idx[i] * D, *br = b + (size_t)i * D;
        float *o = out + (size_t)i * D;
        float acc = 0.0f, g = scale[i];
        for (int k = 0; k < D; k++) {
            acc += ar[k] * br[k];
            o[k] = be->bf16 ? sy_round_bf16(g * ar[k]) : g * ar[k];
        }
        dot[i] = acc;
    }
}

static void cpu_router_fwd(sy_backend_t *be, float *probs, int32_t *expert, float *gate,
                           float *lse, const float *logits, int N, int E) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * E;
        float *p = probs + (size_t)n * E;
        float mx = -INFINITY;
        for (int i = 0; i < E; i++) mx = z[i] > mx ? z[i] : mx;
        float sum = 0.0f;
        for (int i = 0; i < E; i++) {
            p[i] = expf(z[i] - mx);
            sum += p[i];
        }
        float inv = 1.0f / sum;
        int best = 0;
        for (int i = 0; i < E; i++) {
            p[i] *= inv;
            if (p[i] > p[best]) best = i;
        }
        expert[n] = best;
        gate[n] = p[best];
        lse[n] = mx + logf(sum);
    }
}

static void cpu_router_bwd(sy_backend_t *be, float *dlogits, const float *probs,
                           const int32_t *expert, const float *gamma, const float *lse,
                           const float *f, float aux_scale, float z_scale, int N, int E) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *p = probs + (size_t)n * E;
        float *dz = dlogits + (size_t)n * E;
        float dot = 0.0f;
        for (int i = 0; i < E; i++) {
            float dp = aux_scale * f[i] + (i == expert[n] ? gamma[n] : 0.0f);
            dz[i] = dp;
            dot += p[i] * dp;
        }
        for (int i = 0; i < E; i++) dz[i] = p[i] * (dz[i] - dot) + z_scale * lse[n] * p[i];
    }
}

static void cpu_mul_inplace(sy_backend_t *be, float *x, const float *mask, size_t n) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) x[i] *= mask[i];
}

static void cpu_destroy(sy_backend_t *be) {
    free(((cpu_backend_t *)be)->scratch);
    free(be);
}

sy_status sy_backend_cpu_new(int threads, bool bf16, sy_backend_t **out) {
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
    b->embed_fwd = cpu_embed_fwd;
    b->embed_bwd = cpu_embed_bwd;
    b->matmul_fwd = cpu_matmul_fwd;
    b->matmul_bwd = cpu_matmul_bwd;
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

void sy_backend_destroy(sy_backend_t **self_p) {
    if (!self_p || !*self_p) return;
    (*self_p)->destroy(*self_p);
    *self_p = NULL;
}
