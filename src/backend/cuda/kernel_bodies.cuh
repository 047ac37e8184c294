// Device instantiation of the shared kernel bodies (backend/kernels/ headers), included once by
// backend_cuda.cu, which launches them: each body in a trivial __global__ wrapper over the index
// space the emulation backend (backend_emu.c) loops over, one grid thread per index. Compiled
// with --fmad=false (CMakeLists.txt): the bodies' arithmetic is the host's.
#ifndef SY_KERNEL_BODIES_CUH
#define SY_KERNEL_BODIES_CUH
#include <stddef.h>
#include <stdint.h>

#include "backend/kernels/k_elementwise.h"
#include "backend/kernels/k_route.h"
#include "backend/kernels/k_rows.h"

// The body of a 1-D wrapper: `call` (using i, this grid thread's index) when i < n.
#define SY_GRID_1D(n, call)                                             \
    do {                                                                \
        const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; \
        if (i < (size_t)(n)) call;                                      \
    } while (0)

// ---- elementwise (k_elementwise.h) ----
__global__ void sy_g_gelu_fwd(size_t n, float *y, const float *x, bool bf16) {
    SY_GRID_1D(n, sy_k_gelu_fwd(i, y, x, bf16));
}
__global__ void sy_g_gelu_bwd(size_t n, float *dx, const float *dy, const float *x, bool bf16) {
    SY_GRID_1D(n, sy_k_gelu_bwd(i, dx, dy, x, bf16));
}
__global__ void sy_g_add(size_t n, float *y, const float *x, bool bf16) {
    SY_GRID_1D(n, sy_k_add(i, y, x, bf16));
}
__global__ void sy_g_mul(size_t n, float *x, const float *mask, bool bf16) {
    SY_GRID_1D(n, sy_k_mul(i, x, mask, bf16));
}
__global__ void sy_g_scale(size_t n, float *x, float c) {
    SY_GRID_1D(n, sy_k_scale(i, x, c));
}
__global__ void sy_g_round(size_t n, float *x) {
    SY_GRID_1D(n, sy_k_round(i, x));
}
__global__ void sy_g_acc_add_f32(size_t n, double *acc, const float *g) {
    SY_GRID_1D(n, sy_k_acc_add_f32(i, acc, g));
}
__global__ void sy_g_acc_to_f32(size_t n, float *g, const double *acc) {
    SY_GRID_1D(n, sy_k_acc_to_f32(i, g, acc));
}
__global__ void sy_g_adamw(size_t n, float *p, const float *g, float *m, float *v, float decay,
                           float b1, float b2, float step_size, float inv_sqrt_bc2, float eps) {
    SY_GRID_1D(n, sy_k_adamw(i, p, g, m, v, decay, b1, b2, step_size, inv_sqrt_bc2, eps));
}
__global__ void sy_g_jitter_bwd(size_t n, float *dh, const float *g, const float *u) {
    SY_GRID_1D(n, sy_k_jitter_bwd(i, dh, g, u));
}
__global__ void sy_g_embed_fwd(size_t n, float *x, const int32_t *tok, const float *wte,
                               const float *wpe, int T, int D, bool bf16) {
    SY_GRID_1D(n, sy_k_embed_fwd(i, x, tok, wte, wpe, T, D, bf16));
}
__global__ void sy_g_embed_bwd_col(float *dwte, float *dwpe, const float *dx, const int32_t *tok,
                                   int N, int T, int D) {
    SY_GRID_1D(D, sy_k_embed_bwd_col(i, dwte, dwpe, dx, tok, N, T, D));
}
__global__ void sy_g_wire_put(size_t n, void *dst, const float *src, int es) {
    SY_GRID_1D(n, sy_k_wire_put(i, dst, src, es));
}
__global__ void sy_g_wire_get(size_t n, float *dst, const void *src, int es) {
    SY_GRID_1D(n, sy_k_wire_get(i, dst, src, es));
}

// ---- rows (k_rows.h) ----
__global__ void sy_g_layernorm_fwd_row(int N, float *y, float *mean, float *rstd, const float *x,
                                       const float *w, int D, bool bf16) {
    SY_GRID_1D(N, sy_k_layernorm_fwd_row((int)i, y, mean, rstd, x, w, D, bf16));
}
__global__ void sy_g_layernorm_bwd_dx_row(int N, float *dx, const float *dy, const float *x,
                                          const float *w, const float *mean, const float *rstd,
                                          int D, bool bf16) {
    SY_GRID_1D(N, sy_k_layernorm_bwd_dx_row((int)i, dx, dy, x, w, mean, rstd, D, bf16));
}
__global__ void sy_g_layernorm_bwd_dw_col(float *dw, const float *dy, const float *x,
                                          const float *mean, const float *rstd, int N, int D) {
    SY_GRID_1D(D, sy_k_layernorm_bwd_dw_col((int)i, dw, dy, x, mean, rstd, N, D));
}
__global__ void sy_g_xent_row(int N, double *loss, float *d, const float *logits,
                              const int32_t *targets, int V, float scale) {
    SY_GRID_1D(N, sy_k_xent_row((int)i, loss, d, logits, targets, V, scale));
}
__global__ void sy_g_router_fwd_row(int N, float *probs, int32_t *expert, float *gate, float *lse,
                                    const float *logits, int E) {
    SY_GRID_1D(N, sy_k_router_fwd_row((int)i, probs, expert, gate, lse, logits, E));
}
__global__ void sy_g_router_bwd_row(int N, float *dlogits, const float *probs,
                                    const int32_t *expert, const float *gamma, const float *lse,
                                    const float *f, float aux_scale, float z_scale, int E) {
    SY_GRID_1D(N, sy_k_router_bwd_row((int)i, dlogits, probs, expert, gamma, lse, f, aux_scale,
                                      z_scale, E));
}
__global__ void sy_g_gather(size_t n, float *dst, const float *src, const int32_t *idx, int D) {
    SY_GRID_1D(n, sy_k_gather(i, dst, src, idx, D));
}
__global__ void sy_g_scatter_scaled(size_t n, float *dst, const float *src, const int32_t *idx,
                                    const float *scale, int D, bool bf16) {
    SY_GRID_1D(n, sy_k_scatter_scaled(i, dst, src, idx, scale, D, bf16));
}
__global__ void sy_g_scatter_add(size_t n, float *dst, const float *src, const int32_t *idx, int D,
                                 bool bf16) {
    SY_GRID_1D(n, sy_k_scatter_add(i, dst, src, idx, D, bf16));
}
__global__ void sy_g_gather_dot_scale_row(int n, float *dot, float *out, const float *a,
                                          const float *b, const int32_t *idx, const float *scale,
                                          int D, bool bf16) {
    SY_GRID_1D(n, sy_k_gather_dot_scale_row((int)i, dot, out, a, b, idx, scale, D, bf16));
}

// ---- route plan and fixed-order sums (k_route.h) ----
__global__ void sy_g_jitter_fwd(size_t n, float *u, float *xr, const float *h, int D, float eps,
                                uint64_t seed, uint64_t tag_hash, int64_t step, int micro,
                                int layer) {
    SY_GRID_1D(n, sy_k_jitter_fwd(i, u, xr, h, D, eps, seed, tag_hash, step, micro, layer));
}
__global__ void sy_g_dropout_mask(size_t n, float *mask, const int32_t *tok, const int32_t *micro,
                                  int F, float keep, float inv, uint64_t seed, uint64_t tag_hash,
                                  int64_t step, int micro0, int layer) {
    SY_GRID_1D(n, sy_k_dropout_mask(i, mask, tok, micro, F, keep, inv, seed, tag_hash, step, micro0,
                                    layer));
}
__global__ void sy_g_route_count(int E, int32_t *counts, int32_t *slot, const int32_t *expert,
                                 int G) {
    SY_GRID_1D(E, sy_k_route_count((int)i, counts, slot, expert, G));
}
__global__ void sy_g_route_offsets(int32_t *kept, int32_t *offsets, const int32_t *counts, int E,
                                   int C) {
    SY_GRID_1D(1, sy_k_route_offsets(0, kept, offsets, counts, E, C));
}
__global__ void sy_g_route_slot(int G, int32_t *order, int32_t *slot, float *gk,
                                const int32_t *expert, const float *gate, const int32_t *offsets,
                                int C) {
    SY_GRID_1D(G, sy_k_route_slot((int)i, order, slot, gk, expert, gate, offsets, C));
}
__global__ void sy_g_route_prob_sum(int E, double *P, const float *probs, int G) {
    SY_GRID_1D(E, sy_k_route_prob_sum((int)i, P, probs, G, E));
}
__global__ void sy_g_route_stats_sum(double *stats, float *f, const double *P, const float *lse,
                                     const int32_t *counts, int G, int E) {
    SY_GRID_1D(1, sy_k_route_stats_sum(0, stats, f, P, lse, counts, G, E));
}
__global__ void sy_g_route_gamma(int G, float *gamma, const float *dot, const int32_t *slot) {
    SY_GRID_1D(G, sy_k_route_gamma((int)i, gamma, dot, slot));
}
__global__ void sy_g_sumsq_chunk(size_t nc, double *part, const float *x, size_t n) {
    SY_GRID_1D(nc, sy_k_sumsq_chunk(i, part, x, n));
}
__global__ void sy_g_sum_f64(double *out, const double *v, size_t n) {
    SY_GRID_1D(1, sy_k_sum_f64(0, out, v, n));
}

#endif
