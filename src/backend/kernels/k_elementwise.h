/* Kernel bodies, one element per call (index i < n, as a 1-D CUDA grid thread would run):
 * activations, the parameter/optimizer path and the wire format. backend.h states each op's
 * contract; a body computes one element of it with the CPU backend's operations in the CPU
 * backend's order, so that host and device runs of a body, and the CPU backend, give the same
 * bits (sy_hd.h: no FMA contraction). `bf16` rounds the value written (RNE) as the backend's
 * bf16 mode does for activations and activation gradients.
 * Shapes: N tokens, D model width, T sequence length; buffers are backend buffers. */
#ifndef SY_K_ELEMENTWISE_H
#define SY_K_ELEMENTWISE_H

#include <math.h>
#include <stddef.h>

#include "backend/kernels/k_math.h"

#define SY_K_GELU_C 0.7978845608028654f /* sqrt(2/pi) */
#define SY_K_GELU_A 0.044715f

/* gelu_tanh(v) and its derivative (the CPU backend's vector loops call these too) */
SY_HD float sy_k_gelu(float v) {
    return 0.5f * v * (1.0f + sy_k_tanhf(SY_K_GELU_C * (v + SY_K_GELU_A * v * v * v)));
}

SY_HD float sy_k_gelu_grad(float v) {
    float th = sy_k_tanhf(SY_K_GELU_C * (v + SY_K_GELU_A * v * v * v));
    float sech2 = 1.0f - th * th;
    return 0.5f * (1.0f + th) +
           0.5f * v * sech2 * SY_K_GELU_C * (1.0f + 3.0f * SY_K_GELU_A * v * v);
}

/* y[i] = gelu(x[i]) */
SY_HD void sy_k_gelu_fwd(size_t i, float *y, const float *x, bool bf16) {
    y[i] = sy_k_act(sy_k_gelu(x[i]), bf16);
}

/* dx[i] = dy[i] · gelu'(x[i]) */
SY_HD void sy_k_gelu_bwd(size_t i, float *dx, const float *dy, const float *x, bool bf16) {
    dx[i] = sy_k_act(dy[i] * sy_k_gelu_grad(x[i]), bf16);
}

/* y[i] += x[i] (residual) */
SY_HD void sy_k_add(size_t i, float *y, const float *x, bool bf16) {
    y[i] = sy_k_act(y[i] + x[i], bf16);
}

/* x[i] *= mask[i] (expert dropout: an activation, or an activation gradient, that the next
 * GEMM reads, so rounded in bf16 mode like every activation an op writes, model spec §4) */
SY_HD void sy_k_mul(size_t i, float *x, const float *mask, bool bf16) { x[i] = sy_k_act(x[i] * mask[i], bf16); }

/* x[i] *= c (clipping) */
SY_HD void sy_k_scale(size_t i, float *x, float c) { x[i] *= c; }

/* x[i] = round_bf16(x[i]) */
SY_HD void sy_k_round(size_t i, float *x) { x[i] = sy_k_round_bf16(x[i]); }

/* acc[i] += (double)g[i] */
SY_HD void sy_k_acc_add_f32(size_t i, double *acc, const float *g) { acc[i] += g[i]; }

/* g[i] = (float)acc[i] */
SY_HD void sy_k_acc_to_f32(size_t i, float *g, const double *acc) { g[i] = (float)acc[i]; }

/* One AdamW element, in the order backend.h pins (torch.optim.AdamW): p, m, v <- the update
 * of p0, m0, v0 by g. In place (the backend op: p == p0, m == m0, v == v0) or out of place (a
 * peer replica's update from one slot into another, sy_adamw_apply_host): each element is read
 * before it is written, so the bits are the same. */
SY_HD void sy_k_adamw_to(size_t i, float *p, float *m, float *v, const float *p0,
                         const float *m0, const float *v0, const float *g, float decay, float b1,
                         float b2, float step_size, float inv_sqrt_bc2, float eps) {
    const float gk = g[i];
    const float pk = p0[i] * decay;
    const float mk = b1 * m0[i] + (1.0f - b1) * gk;
    const float vk = b2 * v0[i] + (1.0f - b2) * gk * gk;
    m[i] = mk;
    v[i] = vk;
    p[i] = pk - step_size * mk / (sqrtf(vk) * inv_sqrt_bc2 + eps);
}

/* The same in place (the backend op) */
SY_HD void sy_k_adamw(size_t i, float *p, const float *g, float *m, float *v, float decay,
                      float b1, float b2, float step_size, float inv_sqrt_bc2, float eps) {
    sy_k_adamw_to(i, p, m, v, p, m, v, g, decay, b1, b2, step_size, inv_sqrt_bc2, eps);
}

/* dh[i] += u[i]·g[i], or dh[i] += g[i] when u is NULL (router input gradient, fp32) */
SY_HD void sy_k_jitter_bwd(size_t i, float *dh, const float *g, const float *u) {
    dh[i] += u ? u[i] * g[i] : g[i];
}

/* x[n,d] = wte[tok[n],d] + wpe[n mod T,d], i = n·D + d < N·D */
SY_HD void sy_k_embed_fwd(size_t i, float *x, const int32_t *tok, const float *wte,
                          const float *wpe, int T, int D, bool bf16) {
    size_t n = i / (size_t)D, d = i % (size_t)D;
    x[i] = sy_k_act(wte[(size_t)tok[n] * D + d] + wpe[(n % (size_t)T) * D + d], bf16);
}

/* Column d < D of the embedding backward: dwte[tok[n],d] += dx[n,d], dwpe[n mod T,d] +=
 * dx[n,d] for n = 0..N-1 in token order (rows hit by several tokens sum in token order; each
 * thread owns a column, so no two threads write one element). */
SY_HD void sy_k_embed_bwd_col(size_t d, float *dwte, float *dwpe, const float *dx,
                              const int32_t *tok, int N, int T, int D) {
    for (int n = 0; n < N; n++) {
        float g = dx[(size_t)n * D + d];
        dwte[(size_t)tok[n] * D + d] += g;
        dwpe[(size_t)(n % T) * D + d] += g;
    }
}

/* wire: bf16 (es 2) or fp32 (es 4) element i */
SY_HD void sy_k_wire_put(size_t i, void *dst, const float *src, int es) {
    if (es == 4)
        ((float *)dst)[i] = src[i];
    else
        ((uint16_t *)dst)[i] = sy_k_f32_to_bf16(src[i]);
}

SY_HD void sy_k_wire_get(size_t i, float *dst, const void *src, int es) {
    dst[i] = es == 4 ? ((const float *)src)[i] : sy_k_bf16_to_f32(((const uint16_t *)src)[i]);
}

#endif
