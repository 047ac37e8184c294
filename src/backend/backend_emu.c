/* The CPU emulation backend ("emu"): the kernel bodies of kernels/ headers, the very functions the
 * CUDA backend's kernels will call, run in host loops over the index space a CUDA grid would
 * use (SY_EMU_LAUNCH: one body call per grid index; OpenMP spreads the indices, which is safe
 * because a body writes only its own element, row or column, as a grid thread must).
 *
 * Without a GPU this is how the GPU kernels' logic is tested: the op, Switch-layer,
 * expert-parallel and gradient tests run against it (tests/test_backend_emu.c compares it with
 * the CPU backend; SY_BACKEND=emu selects it through sy_backend_new_from_env).
 *
 * What it does not emulate: memory is host memory (a wrapped CPU backend's alloc, traffic and
 * host_view); the GEMMs and causal attention are the wrapped CPU backend's (sy_sgemm and
 * OpenBLAS), which cuBLAS replaces in the CUDA backend. Every other op runs bodies.
 * Thread: one thread drives it, as any backend. */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/kernels/k_elementwise.h"
#include "backend/kernels/k_route.h"
#include "backend/kernels/k_rows.h"
#include "backend_cpu_internal.h"
#include "base/rng.h"

/* Run the statements (using the index variable `i`) for i = 0..n-1: the host form of a launch
 * of n grid threads. Which host thread runs an index does not matter (a body writes only its
 * own outputs); launches below SY_EMU_PAR indices stay on the calling thread. */
#define SY_EMU_PAR 4096
#define SY_EMU_LAUNCH(n, i, ...)                                                   \
    do {                                                                           \
        const long long sy_emu_n_ = (long long)(n);                                \
        _Pragma("omp parallel for schedule(static) if (sy_emu_n_ > SY_EMU_PAR)")   \
        for (long long i = 0; i < sy_emu_n_; i++) { __VA_ARGS__; }                 \
    } while (0)
/* A one-thread launch (the serial bodies: scans, fixed-order sums). */
#define SY_EMU_LAUNCH1(...) \
    do {                    \
        __VA_ARGS__;        \
    } while (0)

typedef struct {
    sy_backend_t base; /* first: the table the callers see */
    sy_backend_t *cpu; /* memory, traffic, GEMMs and attention (owned) */
    double *scratch;   /* per-row losses, per-expert sums, per-chunk partial sums */
    size_t scratch_n;
    uint64_t tag_jitter, tag_dropout; /* FNV-1a of the draw tags (base/rng.h) */
} emu_backend_t;

static emu_backend_t *EMU(sy_backend_t *be) { return (emu_backend_t *)be; }

/* The wrapped CPU backend, with this backend's bf16 flag (the bf16 wrap sets it per op). */
static sy_backend_t *CPU(sy_backend_t *be) {
    sy_backend_t *c = EMU(be)->cpu;
    c->bf16 = be->bf16;
    return c;
}

/* Scratch of n doubles (grown, kept). Allocation failure is fatal: a few KiB per call, and
 * the op table has no error return. */
static double *emu_scratch(sy_backend_t *be, size_t n) {
    emu_backend_t *e = EMU(be);
    if (n > e->scratch_n) {
        free(e->scratch);
        e->scratch = malloc(sizeof(double) * n);
        if (!e->scratch) abort();
        e->scratch_n = n;
    }
    return e->scratch;
}

/* ---- memory and traffic, GEMMs, attention: the wrapped CPU backend ---- */

static void *emu_alloc(sy_backend_t *be, size_t bytes) { return CPU(be)->alloc(CPU(be), bytes); }
static void emu_free(sy_backend_t *be, void *p) { CPU(be)->free(CPU(be), p); }
static void emu_upload(sy_backend_t *be, void *dst, const void *src, size_t bytes) {
    CPU(be)->upload(CPU(be), dst, src, bytes);
}
static void emu_download(sy_backend_t *be, void *dst, const void *src, size_t bytes) {
    CPU(be)->download(CPU(be), dst, src, bytes);
}
static void emu_copy(sy_backend_t *be, void *dst, const void *src, size_t bytes) {
    CPU(be)->copy(CPU(be), dst, src, bytes);
}
static void emu_zero(sy_backend_t *be, void *p, size_t bytes) { CPU(be)->zero(CPU(be), p, bytes); }
static void emu_sync(sy_backend_t *be) { CPU(be)->sync(CPU(be)); }
static void *emu_host_view(sy_backend_t *be, void *p) { return CPU(be)->host_view(CPU(be), p); }

static void emu_matmul_fwd(sy_backend_t *be, float *y, const float *x, const float *W, int N,
                           int in, int out) {
    CPU(be)->matmul_fwd(CPU(be), y, x, W, N, in, out);
}
static void emu_matmul_bwd(sy_backend_t *be, float *dx, float *dW, const float *dy,
                           const float *x, const float *W, int N, int in, int out, bool acc) {
    CPU(be)->matmul_bwd(CPU(be), dx, dW, dy, x, W, N, in, out, acc);
}
static void emu_matmul_bwd_acc64(sy_backend_t *be, float *dx, float *dW, double *dW64,
                                 const float *dy, const float *x, const float *W, int N, int in,
                                 int out) {
    CPU(be)->matmul_bwd_acc64(CPU(be), dx, dW, dW64, dy, x, W, N, in, out);
}
static void emu_matmul_fwd_group(sy_backend_t *be, float *const *y, const float *const *x,
                                 const float *const *W, const int *N, int n, int in, int out) {
    CPU(be)->matmul_fwd_group(CPU(be), y, x, W, N, n, in, out);
}
static void emu_matmul_bwd_group(sy_backend_t *be, float *const *dx, float *const *dW,
                                 double *const *dW64, const float *const *dy,
                                 const float *const *x, const float *const *W, const int *N,
                                 int n, int in, int out) {
    CPU(be)->matmul_bwd_group(CPU(be), dx, dW, dW64, dy, x, W, N, n, in, out);
}
static void emu_attention_fwd(sy_backend_t *be, float *out, float *att, const float *qkv, int B,
                              int T, int D, int H) {
    CPU(be)->attention_fwd(CPU(be), out, att, qkv, B, T, D, H);
}
static void emu_attention_bwd(sy_backend_t *be, float *dqkv, const float *dout, const float *att,
                              const float *qkv, int B, int T, int D, int H) {
    CPU(be)->attention_bwd(CPU(be), dqkv, dout, att, qkv, B, T, D, H);
}

/* ---- the parameter / gradient / optimizer path ---- */

static void emu_acc_add_f32(sy_backend_t *be, double *acc, const float *g, size_t n) {
    (void)be;
    SY_EMU_LAUNCH(n, i, sy_k_acc_add_f32((size_t)i, acc, g));
}

static void emu_acc_to_f32(sy_backend_t *be, float *g, const double *acc, size_t n) {
    (void)be;
    SY_EMU_LAUNCH(n, i, sy_k_acc_to_f32((size_t)i, g, acc));
}

static void emu_sumsq_add(sy_backend_t *be, double *out, const float *x, size_t n) {
    const size_t nc = (n + SY_K_SUMSQ_CHUNK - 1) / SY_K_SUMSQ_CHUNK;
    double *part = emu_scratch(be, nc ? nc : 1);
    SY_EMU_LAUNCH(nc, c, sy_k_sumsq_chunk((size_t)c, part, x, n));
    SY_EMU_LAUNCH1(sy_k_sum_f64(0, out, part, nc));
}

static void emu_scale(sy_backend_t *be, float *x, size_t n, float c) {
    (void)be;
    SY_EMU_LAUNCH(n, i, sy_k_scale((size_t)i, x, c));
}

static void emu_adamw(sy_backend_t *be, float *p, const float *g, float *m, float *v, size_t n,
                      float decay, float b1, float b2, float step_size, float inv_sqrt_bc2,
                      float eps) {
    (void)be;
    SY_EMU_LAUNCH(n, i,
                  sy_k_adamw((size_t)i, p, g, m, v, decay, b1, b2, step_size, inv_sqrt_bc2, eps));
}

static void emu_round_bf16(sy_backend_t *be, float *x, size_t n) {
    if (!be->bf16) return;
    SY_EMU_LAUNCH(n, i, sy_k_round((size_t)i, x));
}

/* ---- activations ---- */

static void emu_embed_fwd(sy_backend_t *be, float *x, const int32_t *tok, const float *wte,
                          const float *wpe, int N, int T, int D) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH((size_t)N * D, i, sy_k_embed_fwd((size_t)i, x, tok, wte, wpe, T, D, bf));
}

static void emu_embed_bwd(sy_backend_t *be, float *dwte, float *dwpe, const float *dx,
                          const int32_t *tok, int N, int T, int D) {
    (void)be;
    SY_EMU_LAUNCH(D, d, sy_k_embed_bwd_col((size_t)d, dwte, dwpe, dx, tok, N, T, D));
}

static void emu_layernorm_fwd(sy_backend_t *be, float *y, float *mean, float *rstd,
                              const float *x, const float *w, int N, int D) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH(N, n, sy_k_layernorm_fwd_row((int)n, y, mean, rstd, x, w, D, bf));
}

static void emu_layernorm_bwd(sy_backend_t *be, float *dx, float *dw, const float *dy,
                              const float *x, const float *w, const float *mean,
                              const float *rstd, int N, int D) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH(N, n, sy_k_layernorm_bwd_dx_row((int)n, dx, dy, x, w, mean, rstd, D, bf));
    SY_EMU_LAUNCH(D, i, sy_k_layernorm_bwd_dw_col((int)i, dw, dy, x, mean, rstd, N, D));
}

static void emu_gelu_fwd(sy_backend_t *be, float *y, const float *x, size_t n) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH(n, i, sy_k_gelu_fwd((size_t)i, y, x, bf));
}

static void emu_gelu_bwd(sy_backend_t *be, float *dx, const float *dy, const float *x, size_t n) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH(n, i, sy_k_gelu_bwd((size_t)i, dx, dy, x, bf));
}

static void emu_add_inplace(sy_backend_t *be, float *y, const float *x, size_t n) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH(n, i, sy_k_add((size_t)i, y, x, bf));
}

static void emu_mul_inplace(sy_backend_t *be, float *x, const float *mask, size_t n) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH(n, i, sy_k_mul((size_t)i, x, mask, bf));
}

/* per-row losses, then their sum in row order (one thread) */
static double emu_xent(sy_backend_t *be, float *d, const float *logits, const int32_t *targets,
                       int N, int V, float scale) {
    double *loss = emu_scratch(be, N > 0 ? (size_t)N : 1), total = 0.0;
    SY_EMU_LAUNCH(N, n, sy_k_xent_row((int)n, loss, d, logits, targets, V, scale));
    SY_EMU_LAUNCH1(sy_k_sum_f64(0, &total, loss, (size_t)N));
    return total;
}

static double emu_xent_fwd_bwd(sy_backend_t *be, float *dlogits, const float *logits,
                               const int32_t *targets, int N, int V, float scale) {
    return emu_xent(be, dlogits, logits, targets, N, V, scale);
}

static double emu_xent_fwd(sy_backend_t *be, const float *logits, const int32_t *targets, int N,
                           int V) {
    return emu_xent(be, NULL, logits, targets, N, V, 0.0f);
}

/* ---- Switch layer: router, dispatch and combine ---- */

static void emu_gather_rows(sy_backend_t *be, float *dst, const float *src, const int32_t *idx,
                            int n, int D) {
    (void)be;
    SY_EMU_LAUNCH((size_t)n * D, i, sy_k_gather((size_t)i, dst, src, idx, D));
}

static void emu_scatter_rows_scaled(sy_backend_t *be, float *dst, const float *src,
                                    const int32_t *idx, const float *scale, int n, int D) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH((size_t)n * D, i, sy_k_scatter_scaled((size_t)i, dst, src, idx, scale, D, bf));
}

static void emu_scatter_add_rows(sy_backend_t *be, float *dst, const float *src,
                                 const int32_t *idx, int n, int D) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH((size_t)n * D, i, sy_k_scatter_add((size_t)i, dst, src, idx, D, bf));
}

static void emu_gather_dot_scale(sy_backend_t *be, float *dot, float *out, const float *a,
                                 const float *b, const int32_t *idx, const float *scale, int n,
                                 int D) {
    const bool bf = be->bf16;
    SY_EMU_LAUNCH(n, r, sy_k_gather_dot_scale_row((int)r, dot, out, a, b, idx, scale, D, bf));
}

static void emu_router_fwd(sy_backend_t *be, float *probs, int32_t *expert, float *gate,
                           float *lse, const float *logits, int N, int E) {
    (void)be;
    SY_EMU_LAUNCH(N, n, sy_k_router_fwd_row((int)n, probs, expert, gate, lse, logits, E));
}

static void emu_router_bwd(sy_backend_t *be, float *dlogits, const float *probs,
                           const int32_t *expert, const float *gamma, const float *lse,
                           const float *f, float aux_scale, float z_scale, int N, int E) {
    (void)be;
    SY_EMU_LAUNCH(N, n,
                  sy_k_router_bwd_row((int)n, dlogits, probs, expert, gamma, lse, f, aux_scale,
                                      z_scale, E));
}

/* ---- route plan ---- */

static void emu_jitter_fwd(sy_backend_t *be, float *u, float *xr, const float *h, int G, int D,
                           float eps, uint64_t seed, int64_t step, int micro, int layer) {
    const uint64_t tag = EMU(be)->tag_jitter;
    SY_EMU_LAUNCH((size_t)G * D, i,
                  sy_k_jitter_fwd((size_t)i, u, xr, h, D, eps, seed, tag, step, micro, layer));
}

static void emu_jitter_bwd(sy_backend_t *be, float *dh, const float *g, const float *u, size_t n) {
    (void)be;
    SY_EMU_LAUNCH(n, i, sy_k_jitter_bwd((size_t)i, dh, g, u));
}

static void emu_route_plan(sy_backend_t *be, int32_t *counts, int32_t *kept, int32_t *offsets,
                           int32_t *order, int32_t *slot, float *gk, const int32_t *expert,
                           const float *gate, int G, int E, int C) {
    (void)be;
    SY_EMU_LAUNCH(E, e, sy_k_route_count((int)e, counts, slot, expert, G));
    SY_EMU_LAUNCH1(sy_k_route_offsets(0, kept, offsets, counts, E, C));
    SY_EMU_LAUNCH(G, t, sy_k_route_slot((int)t, order, slot, gk, expert, gate, offsets, C));
}

static void emu_route_stats(sy_backend_t *be, double *stats, float *f, const float *probs,
                            const float *lse, const int32_t *counts, int G, int E) {
    double *P = emu_scratch(be, E > 0 ? (size_t)E : 1);
    SY_EMU_LAUNCH(E, e, sy_k_route_prob_sum((int)e, P, probs, G, E));
    SY_EMU_LAUNCH1(sy_k_route_stats_sum(0, stats, f, P, lse, counts, G, E));
}

static void emu_route_gamma(sy_backend_t *be, float *gamma, const float *dot, const int32_t *slot,
                            int G) {
    (void)be;
    SY_EMU_LAUNCH(G, t, sy_k_route_gamma((int)t, gamma, dot, slot));
}

static void emu_dropout_mask(sy_backend_t *be, float *mask, const int32_t *tok,
                             const int32_t *micro, int n, int F, float keep, float inv,
                             uint64_t seed, int64_t step, int micro0, int layer) {
    const uint64_t tag = EMU(be)->tag_dropout;
    SY_EMU_LAUNCH((size_t)n * F, i,
                  sy_k_dropout_mask((size_t)i, mask, tok, micro, F, keep, inv, seed, tag, step,
                                    micro0, layer));
}

static void emu_wire_put(sy_backend_t *be, void *dst, const float *src, size_t n, int es) {
    (void)be;
    SY_EMU_LAUNCH(n, i, sy_k_wire_put((size_t)i, dst, src, es));
}

static void emu_wire_get(sy_backend_t *be, float *dst, const void *src, size_t n, int es) {
    (void)be;
    SY_EMU_LAUNCH(n, i, sy_k_wire_get((size_t)i, dst, src, es));
}

static void emu_destroy(sy_backend_t *be) {
    emu_backend_t *e = EMU(be);
    sy_backend_destroy(&e->cpu);
    free(e->scratch);
    free(e);
}

sy_status sy_backend_emu_new_threads(int threads, bool bf16, sy_backend_t **out) {
    emu_backend_t *e = calloc(1, sizeof *e);
    if (!e) return sy_err_set(SY_ENOMEM, "emu backend: out of memory");
    sy_status st = sy_backend_cpu_new_plain(threads, bf16, &e->cpu);
    if (st != SY_OK) {
        free(e);
        return st;
    }
    e->tag_jitter = sy_fnv1a64("router.jitter");
    e->tag_dropout = sy_fnv1a64("expert.dropout");
    sy_backend_t *b = &e->base;
    b->name = "emu";
    b->bf16 = bf16;
    b->alloc = emu_alloc, b->free = emu_free;
    b->upload = emu_upload, b->download = emu_download, b->copy = emu_copy, b->zero = emu_zero;
    b->sync = emu_sync, b->host_view = emu_host_view;
    b->acc_add_f32 = emu_acc_add_f32, b->acc_to_f32 = emu_acc_to_f32, b->sumsq_add = emu_sumsq_add;
    b->scale = emu_scale, b->adamw = emu_adamw, b->round_bf16 = emu_round_bf16;
    b->embed_fwd = emu_embed_fwd, b->embed_bwd = emu_embed_bwd;
    b->matmul_fwd = emu_matmul_fwd, b->matmul_bwd = emu_matmul_bwd;
    b->matmul_bwd_acc64 = emu_matmul_bwd_acc64;
    b->matmul_fwd_group = emu_matmul_fwd_group, b->matmul_bwd_group = emu_matmul_bwd_group;
    b->layernorm_fwd = emu_layernorm_fwd, b->layernorm_bwd = emu_layernorm_bwd;
    b->attention_fwd = emu_attention_fwd, b->attention_bwd = emu_attention_bwd;
    b->gelu_fwd = emu_gelu_fwd, b->gelu_bwd = emu_gelu_bwd, b->add_inplace = emu_add_inplace;
    b->xent_fwd_bwd = emu_xent_fwd_bwd, b->xent_fwd = emu_xent_fwd;
    b->gather_rows = emu_gather_rows, b->scatter_rows_scaled = emu_scatter_rows_scaled;
    b->scatter_add_rows = emu_scatter_add_rows, b->gather_dot_scale = emu_gather_dot_scale;
    b->router_fwd = emu_router_fwd, b->router_bwd = emu_router_bwd;
    b->mul_inplace = emu_mul_inplace;
    b->jitter_fwd = emu_jitter_fwd, b->jitter_bwd = emu_jitter_bwd;
    b->route_plan = emu_route_plan, b->route_stats = emu_route_stats;
    b->route_gamma = emu_route_gamma, b->dropout_mask = emu_dropout_mask;
    b->wire_put = emu_wire_put, b->wire_get = emu_wire_get;
    b->destroy = emu_destroy;
    sy_backend_t *t = NULL;
    SY_CHECK(sy_backend_bf16_maybe(b, bf16, &t));
    return sy_backend_poison_maybe(t, out);
}

sy_status sy_backend_emu_new(bool bf16, sy_backend_t **out) {
    return sy_backend_emu_new_threads(0, bf16, out);
}

sy_status sy_backend_new_from_env(int threads, bool bf16, sy_backend_t **out) {
    const char *name = getenv("SY_BACKEND");
    if (!name || !name[0] || strcmp(name, "cpu") == 0)
        return sy_backend_cpu_new(threads, bf16, out);
    if (strcmp(name, "emu") == 0) return sy_backend_emu_new_threads(threads, bf16, out);
    if (strcmp(name, "cuda") == 0) {
        const char *dev = getenv("SY_CUDA_DEVICE");
        return sy_backend_cuda_new(dev && dev[0] ? atoi(dev) : 0, bf16, out);
    }
    return sy_err_set(SY_EINVAL, "SY_BACKEND=%s: unknown backend (cpu, emu or cuda)", name);
}
