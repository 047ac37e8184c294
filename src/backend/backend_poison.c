/* The poisoned-handle variant of a backend (issue 10 item 2): proof that no code outside a
 * backend dereferences backend memory.
 *
 * It wraps another backend (the CPU backend) and hands out buffers whose addresses carry a tag
 * in bit 62: a non-canonical x86-64 / AArch64 address, so any host load or store through one
 * faults at once (SIGSEGV), while pointer arithmetic (p + offset) keeps the tag. Every op of the
 * table strips the tag from its buffer arguments and calls the wrapped op, so the numbers are
 * the wrapped backend's, bit for bit. Stripping is idempotent: an op given plain host memory
 * (tests that pass their own arrays) still works; only host code that reads or writes what
 * alloc() returned crashes. host_view() answers NULL, as a device backend does, so the callers'
 * staging paths (download / upload around the data plane) run too.
 *
 * Selected with SY_BACKEND_POISON=1 in the environment of any process that creates a CPU
 * backend (sy_backend_cpu_new): CI runs the whole test suite once more that way. Not for
 * production (a diagnostic, like a sanitizer).
 * Thread: as the wrapped backend. */
#include "backend/backend.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cpu_internal.h"

#define SY_POISON_TAG ((uintptr_t)1 << 62)

typedef struct {
    sy_backend_t pub; /* first: the table the callers see */
    sy_backend_t *in; /* the wrapped backend (owned) */
} poison_be;

static inline void *untag(const void *p) { return (void *)((uintptr_t)p & ~SY_POISON_TAG); }
#define U(p) ((__typeof__(p))untag((const void *)(p)))

/* The wrapped backend, with this backend's bf16 flag (the bf16 wrap sets it per op). */
static inline sy_backend_t *IN(sy_backend_t *be) {
    sy_backend_t *in = ((poison_be *)be)->in;
    in->bf16 = be->bf16;
    return in;
}

/* ---- memory ---------------------------------------------------------------------------- */

static void *p_alloc(sy_backend_t *be, size_t bytes) {
    void *p = IN(be)->alloc(IN(be), bytes);
    return p ? (void *)((uintptr_t)p | SY_POISON_TAG) : NULL;
}
static void *p_alloc_act(sy_backend_t *be, size_t n) {
    void *p = IN(be)->alloc_act(IN(be), n);
    return p ? (void *)((uintptr_t)p | SY_POISON_TAG) : NULL;
}
static void p_free(sy_backend_t *be, void *p) { IN(be)->free(IN(be), U(p)); }
static void p_upload(sy_backend_t *be, void *dst, const void *src_host, size_t bytes) {
    IN(be)->upload(IN(be), U(dst), src_host, bytes);
}
static void p_download(sy_backend_t *be, void *dst_host, const void *src, size_t bytes) {
    IN(be)->download(IN(be), dst_host, U(src), bytes);
}
static void p_copy(sy_backend_t *be, void *dst, const void *src, size_t bytes) {
    IN(be)->copy(IN(be), U(dst), U(src), bytes);
}
static void p_zero(sy_backend_t *be, void *p, size_t bytes) { IN(be)->zero(IN(be), U(p), bytes); }
static void p_sync(sy_backend_t *be) { IN(be)->sync(IN(be)); }

/* ---- parameter path -------------------------------------------------------------------- */

static void p_acc_add_f32(sy_backend_t *be, double *acc, const float *g, size_t n) {
    IN(be)->acc_add_f32(IN(be), U(acc), U(g), n);
}
static void p_acc_to_f32(sy_backend_t *be, float *g, const double *acc, size_t n) {
    IN(be)->acc_to_f32(IN(be), U(g), U(acc), n);
}
static void p_sumsq_add(sy_backend_t *be, double *out, const float *x, size_t n) {
    IN(be)->sumsq_add(IN(be), U(out), U(x), n);
}
static void p_scale(sy_backend_t *be, float *x, size_t n, float c) { IN(be)->scale(IN(be), U(x), n, c); }
static void p_adamw(sy_backend_t *be, float *p, const float *g, float *m, float *v, size_t n, float decay,
                    float b1, float b2, float step_size, float inv_sqrt_bc2, float eps) {
    IN(be)->adamw(IN(be), U(p), U(g), U(m), U(v), n, decay, b1, b2, step_size, inv_sqrt_bc2, eps);
}
static void p_round_bf16(sy_backend_t *be, float *x, size_t n) { IN(be)->round_bf16(IN(be), U(x), n); }

/* ---- model ops ------------------------------------------------------------------------- */

static void p_embed_fwd(sy_backend_t *be, float *x, const int32_t *tok, const float *wte, const float *wpe,
                        int N, int T, int D) {
    IN(be)->embed_fwd(IN(be), U(x), U(tok), U(wte), U(wpe), N, T, D);
}
static void p_embed_bwd(sy_backend_t *be, float *dwte, float *dwpe, const float *dx, const int32_t *tok,
                        int N, int T, int D) {
    IN(be)->embed_bwd(IN(be), U(dwte), U(dwpe), U(dx), U(tok), N, T, D);
}
static void p_matmul_fwd(sy_backend_t *be, float *y, const float *x, const float *W, int N, int in,
                         int out) {
    IN(be)->matmul_fwd(IN(be), U(y), U(x), U(W), N, in, out);
}
static void p_matmul_bwd(sy_backend_t *be, float *dx, float *dW, const float *dy, const float *x,
                         const float *W, int N, int in, int out, bool accumulate_dx) {
    IN(be)->matmul_bwd(IN(be), U(dx), U(dW), U(dy), U(x), U(W), N, in, out, accumulate_dx);
}
static void p_matmul_bwd_acc64(sy_backend_t *be, float *dx, float *dW, double *dW64, const float *dy,
                               const float *x, const float *W, int N, int in, int out) {
    IN(be)->matmul_bwd_acc64(IN(be), U(dx), U(dW), U(dW64), U(dy), U(x), U(W), N, in, out);
}

/* Pointer arrays are host memory holding backend pointers: copied with every entry stripped. */
static void **untag_all(const void *const *v, int n) {
    if (!v) return NULL;
    void **out = malloc(sizeof *out * (size_t)(n > 0 ? n : 1));
    if (!out) abort(); /* a diagnostic build: no way to report from a void op */
    for (int i = 0; i < n; i++) out[i] = untag(v[i]);
    return out;
}

static void p_matmul_fwd_group(sy_backend_t *be, float *const *y, const float *const *x,
                               const float *const *W, const int *N, int n, int in, int out) {
    void **uy = untag_all((const void *const *)y, n), **ux = untag_all((const void *const *)x, n),
         **uW = untag_all((const void *const *)W, n);
    IN(be)->matmul_fwd_group(IN(be), (float *const *)uy, (const float *const *)ux,
                             (const float *const *)uW, N, n, in, out);
    free(uy), free(ux), free(uW);
}
static void p_matmul_bwd_group(sy_backend_t *be, float *const *dx, float *const *dW, double *const *dW64,
                               const float *const *dy, const float *const *x, const float *const *W,
                               const int *N, int n, int in, int out) {
    void **udx = untag_all((const void *const *)dx, n), **udW = untag_all((const void *const *)dW, n),
         **udW64 = untag_all((const void *const *)dW64, n), **udy = untag_all((const void *const *)dy, n),
         **ux = untag_all((const void *const *)x, n), **uW = untag_all((const void *const *)W, n);
    IN(be)->matmul_bwd_group(IN(be), (float *const *)udx, (float *const *)udW, (double *const *)udW64,
                             (const float *const *)udy, (const float *const *)ux,
                             (const float *const *)uW, N, n, in, out);
    free(udx), free(udW), free(udW64), free(udy), free(ux), free(uW);
}
static void p_matmul_gelu_fwd_group(sy_backend_t *be, float *const *y, float *const *g,
                                    const float *const *x, const float *const *W, const int *N,
                                    int n, int in, int out) {
    void **uy = untag_all((const void *const *)y, n), **ug = untag_all((const void *const *)g, n),
         **ux = untag_all((const void *const *)x, n), **uW = untag_all((const void *const *)W, n);
    IN(be)->matmul_gelu_fwd_group(IN(be), (float *const *)uy, (float *const *)ug,
                                  (const float *const *)ux, (const float *const *)uW, N, n, in, out);
    free(uy), free(ug), free(ux), free(uW);
}
static void p_matmul_gelu_bwd_group(sy_backend_t *be, float *const *dx, float *const *dW,
                                    double *const *dW64, const float *const *dy,
                                    const float *const *x, const float *const *W,
                                    const float *const *mask, const float *const *pre,
                                    float *const *dpre, const int *N, int n, int in, int out) {
    void **udx = untag_all((const void *const *)dx, n), **udW = untag_all((const void *const *)dW, n),
         **udW64 = untag_all((const void *const *)dW64, n), **udy = untag_all((const void *const *)dy, n),
         **ux = untag_all((const void *const *)x, n), **uW = untag_all((const void *const *)W, n),
         **um = untag_all((const void *const *)mask, n), **upre = untag_all((const void *const *)pre, n),
         **udpre = untag_all((const void *const *)dpre, n);
    IN(be)->matmul_gelu_bwd_group(IN(be), (float *const *)udx, (float *const *)udW,
                                  (double *const *)udW64, (const float *const *)udy,
                                  (const float *const *)ux, (const float *const *)uW,
                                  (const float *const *)um, (const float *const *)upre,
                                  (float *const *)udpre, N, n, in, out);
    free(udx), free(udW), free(udW64), free(udy), free(ux), free(uW), free(um), free(upre), free(udpre);
}
static void p_layernorm_fwd(sy_backend_t *be, float *y, float *mean, float *rstd, const float *x,
                            const float *w, int N, int D) {
    IN(be)->layernorm_fwd(IN(be), U(y), U(mean), U(rstd), U(x), U(w), N, D);
}
static void p_layernorm_bwd(sy_backend_t *be, float *dx, float *dw, const float *dy, const float *x,
                            const float *w, const float *mean, const float *rstd, int N, int D) {
    IN(be)->layernorm_bwd(IN(be), U(dx), U(dw), U(dy), U(x), U(w), U(mean), U(rstd), N, D);
}
static void p_attention_fwd(sy_backend_t *be, float *out, float *att, const float *qkv, int B, int T,
                            int D, int H) {
    IN(be)->attention_fwd(IN(be), U(out), U(att), U(qkv), B, T, D, H);
}
static void p_attention_bwd(sy_backend_t *be, float *dqkv, const float *dout, const float *att,
                            const float *qkv, int B, int T, int D, int H) {
    IN(be)->attention_bwd(IN(be), U(dqkv), U(dout), U(att), U(qkv), B, T, D, H);
}
static void p_gelu_fwd(sy_backend_t *be, float *y, const float *x, size_t n) {
    IN(be)->gelu_fwd(IN(be), U(y), U(x), n);
}
static void p_gelu_bwd(sy_backend_t *be, float *dx, const float *dy, const float *x, size_t n) {
    IN(be)->gelu_bwd(IN(be), U(dx), U(dy), U(x), n);
}
static void p_add_inplace(sy_backend_t *be, float *y, const float *x, size_t n) {
    IN(be)->add_inplace(IN(be), U(y), U(x), n);
}
static double p_xent_fwd_bwd(sy_backend_t *be, float *dlogits, const float *logits, const int32_t *targets,
                             int N, int V, float scale) {
    return IN(be)->xent_fwd_bwd(IN(be), U(dlogits), U(logits), U(targets), N, V, scale);
}
static double p_xent_fwd(sy_backend_t *be, const float *logits, const int32_t *targets, int N, int V) {
    return IN(be)->xent_fwd(IN(be), U(logits), U(targets), N, V);
}
static void p_gather_rows(sy_backend_t *be, float *dst, const float *src, const int32_t *idx, int n, int D) {
    IN(be)->gather_rows(IN(be), U(dst), U(src), U(idx), n, D);
}
static void p_scatter_rows_scaled(sy_backend_t *be, float *dst, const float *src, const int32_t *idx,
                                  const float *scale, int n, int D) {
    IN(be)->scatter_rows_scaled(IN(be), U(dst), U(src), U(idx), U(scale), n, D);
}
static void p_scatter_add_rows(sy_backend_t *be, float *dst, const float *src, const int32_t *idx, int n,
                               int D) {
    IN(be)->scatter_add_rows(IN(be), U(dst), U(src), U(idx), n, D);
}
static void p_gather_dot_scale(sy_backend_t *be, float *dot, float *out, const float *a, const float *b,
                               const int32_t *idx, const float *scale, int n, int D) {
    IN(be)->gather_dot_scale(IN(be), U(dot), U(out), U(a), U(b), U(idx), U(scale), n, D);
}
static void p_router_fwd(sy_backend_t *be, float *probs, int32_t *expert, float *gate, float *lse,
                         const float *logits, int N, int E) {
    IN(be)->router_fwd(IN(be), U(probs), U(expert), U(gate), U(lse), U(logits), N, E);
}
static void p_router_bwd(sy_backend_t *be, float *dlogits, const float *probs, const int32_t *expert,
                         const float *gamma, const float *lse, const float *f, float aux_scale,
                         float z_scale, int N, int E) {
    IN(be)->router_bwd(IN(be), U(dlogits), U(probs), U(expert), U(gamma), U(lse), U(f), aux_scale, z_scale,
                       N, E);
}
static void p_mul_inplace(sy_backend_t *be, float *x, const float *mask, size_t n) {
    IN(be)->mul_inplace(IN(be), U(x), U(mask), n);
}

/* ---- route plan and wire -------------------------------------------------------------- */

static void *p_host_view(sy_backend_t *be, void *p) {
    (void)be, (void)p;
    return NULL; /* as a device backend: callers stage through download / upload */
}
static void p_jitter_fwd(sy_backend_t *be, float *u, float *xr, const float *h, int G, int D, float eps,
                         uint64_t seed, int64_t step, int micro, int layer) {
    IN(be)->jitter_fwd(IN(be), U(u), U(xr), U(h), G, D, eps, seed, step, micro, layer);
}
static void p_jitter_bwd(sy_backend_t *be, float *dh, const float *g, const float *u, size_t n) {
    IN(be)->jitter_bwd(IN(be), U(dh), U(g), U(u), n);
}
static void p_route_plan(sy_backend_t *be, int32_t *counts, int32_t *kept, int32_t *offsets, int32_t *order,
                         int32_t *slot, float *gk, const int32_t *expert, const float *gate, int G, int E,
                         int C) {
    IN(be)->route_plan(IN(be), U(counts), U(kept), U(offsets), U(order), U(slot), U(gk), U(expert), U(gate), G,
                       E, C);
}
static void p_route_stats(sy_backend_t *be, double *stats, float *f, const float *probs, const float *lse,
                          const int32_t *counts, int G, int E) {
    IN(be)->route_stats(IN(be), U(stats), U(f), U(probs), U(lse), U(counts), G, E);
}
static void p_route_gamma(sy_backend_t *be, float *gamma, const float *dot, const int32_t *slot, int G) {
    IN(be)->route_gamma(IN(be), U(gamma), U(dot), U(slot), G);
}
static void p_dropout_mask(sy_backend_t *be, float *mask, const int32_t *tok, const int32_t *micro, int n,
                           int F, float keep, float inv, uint64_t seed, int64_t step, int micro0, int layer) {
    IN(be)->dropout_mask(IN(be), U(mask), U(tok), U(micro), n, F, keep, inv, seed, step, micro0, layer);
}
static void p_wire_put(sy_backend_t *be, void *dst, const float *src, size_t n, int es) {
    IN(be)->wire_put(IN(be), U(dst), U(src), n, es);
}
static void p_wire_get(sy_backend_t *be, float *dst, const void *src, size_t n, int es) {
    IN(be)->wire_get(IN(be), U(dst), U(src), n, es);
}

static void p_destroy(sy_backend_t *be) {
    poison_be *pb = (poison_be *)be;
    sy_backend_destroy(&pb->in);
    free(pb);
}

sy_status sy_backend_poison_wrap(sy_backend_t *inner, sy_backend_t **out) {
    poison_be *pb = calloc(1, sizeof *pb);
    if (!pb) {
        sy_backend_destroy(&inner);
        return sy_err_set(SY_ENOMEM, "poisoned backend: out of memory");
    }
    pb->in = inner;
    sy_backend_t *b = &pb->pub;
    b->name = "cpu-poison";
    b->bf16 = inner->bf16;
    b->alloc = p_alloc, b->free = p_free;
    b->alloc_act = inner->alloc_act ? p_alloc_act : NULL;
    b->upload = p_upload, b->download = p_download, b->copy = p_copy, b->zero = p_zero, b->sync = p_sync;
    b->acc_add_f32 = p_acc_add_f32, b->acc_to_f32 = p_acc_to_f32, b->sumsq_add = p_sumsq_add;
    b->scale = p_scale, b->adamw = p_adamw, b->round_bf16 = p_round_bf16;
    b->embed_fwd = p_embed_fwd, b->embed_bwd = p_embed_bwd;
    b->matmul_fwd = p_matmul_fwd, b->matmul_bwd = p_matmul_bwd, b->matmul_bwd_acc64 = p_matmul_bwd_acc64;
    b->matmul_fwd_group = p_matmul_fwd_group, b->matmul_bwd_group = p_matmul_bwd_group;
    /* optional ops (backend.h): wrapped only where the wrapped backend has them (emu has not:
     * callers then run the separate ops) */
    b->matmul_gelu_fwd_group = inner->matmul_gelu_fwd_group ? p_matmul_gelu_fwd_group : NULL;
    b->matmul_gelu_bwd_group = inner->matmul_gelu_bwd_group ? p_matmul_gelu_bwd_group : NULL;
    b->layernorm_fwd = p_layernorm_fwd, b->layernorm_bwd = p_layernorm_bwd;
    b->attention_fwd = p_attention_fwd, b->attention_bwd = p_attention_bwd;
    b->gelu_fwd = p_gelu_fwd, b->gelu_bwd = p_gelu_bwd, b->add_inplace = p_add_inplace;
    b->xent_fwd_bwd = p_xent_fwd_bwd, b->xent_fwd = p_xent_fwd;
    b->gather_rows = p_gather_rows, b->scatter_rows_scaled = p_scatter_rows_scaled;
    b->scatter_add_rows = p_scatter_add_rows, b->gather_dot_scale = p_gather_dot_scale;
    b->router_fwd = p_router_fwd, b->router_bwd = p_router_bwd, b->mul_inplace = p_mul_inplace;
    b->host_view = p_host_view;
    b->jitter_fwd = p_jitter_fwd, b->jitter_bwd = p_jitter_bwd;
    b->route_plan = p_route_plan, b->route_stats = p_route_stats, b->route_gamma = p_route_gamma;
    b->dropout_mask = p_dropout_mask, b->wire_put = p_wire_put, b->wire_get = p_wire_get;
    b->destroy = p_destroy;
    /* Every op the wrapped backend has must be wrapped: the slots from alloc to destroy are all
     * function pointers. */
    typedef void (*slot_fn)(void);
    const size_t first = offsetof(sy_backend_t, alloc), last = offsetof(sy_backend_t, destroy);
    for (size_t off = first; off <= last; off += sizeof(slot_fn)) {
        slot_fn want, have;
        memcpy(&want, (const char *)inner + off, sizeof want);
        memcpy(&have, (const char *)b + off, sizeof have);
        if (want && !have) {
            sy_backend_t *self = b;
            p_destroy(self);
            return sy_err_set(SY_EINTERNAL, "poisoned backend: the op at byte %zu of the table has no wrapper",
                              off);
        }
    }
    *out = b;
    return SY_OK;
}
