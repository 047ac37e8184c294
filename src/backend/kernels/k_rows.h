/* Kernel bodies, one row per call (row n < N, as a CUDA grid with one block per row would
 * index them): LayerNorm, cross-entropy, the router, and the Switch layer's gather/scatter.
 *
 * Reductions inside a row (LayerNorm statistics, softmax sums, dot products) are serial loops
 * in index order: that order is the pinned one (the CPU backend's). A device kernel that splits
 * a row over a block's threads and reduces in a tree gets other bits; it must either keep this
 * order (one thread per row, or a fixed-order reduction checked against these bodies) or be
 * compared with a tolerance. The router and cross-entropy stay fp32 (model spec §4); expf/logf
 * are libm's on the host and CUDA's on the device (sy_hd.h). */
#ifndef SY_K_ROWS_H
#define SY_K_ROWS_H

#include <math.h>
#include <stddef.h>

#include "backend/kernels/k_math.h"

#define SY_K_LN_EPS 1e-5f

/* Row n: y = (x - mean)·rstd·w, mean[n], rstd[n] saved; y rounded in bf16 mode */
SY_HD void sy_k_layernorm_fwd_row(int n, float *y, float *mean, float *rstd, const float *x,
                                  const float *w, int D, bool bf16) {
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
    float r = 1.0f / sqrtf(v + SY_K_LN_EPS);
    for (int i = 0; i < D; i++) yr[i] = sy_k_act((xr[i] - m) * r * w[i], bf16);
    mean[n] = m;
    rstd[n] = r;
}

/* Row n of the input gradient, rounded:
 * dx += rstd·(dy·w − mean(dy·w) − x̂·mean(dy·w·x̂)) */
SY_HD void sy_k_layernorm_bwd_dx_row(int n, float *dx, const float *dy, const float *x,
                                     const float *w, const float *mean, const float *rstd,
                                     int D, bool bf16) {
    const float *xr = x + (size_t)n * D, *dyr = dy + (size_t)n * D;
    float *dxr = dx + (size_t)n * D;
    float m = mean[n], r = rstd[n];
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = 0; i < D; i++) {
        float dn = dyr[i] * w[i];
        s1 += dn;
        s2 += dn * (xr[i] - m) * r;
    }
    s1 /= (float)D;
    s2 /= (float)D;
    for (int i = 0; i < D; i++) {
        float xh = (xr[i] - m) * r;
        dxr[i] = sy_k_act(dxr[i] + r * (dyr[i] * w[i] - s1 - xh * s2), bf16);
    }
}

/* Column i < D of the weight gradient: dw[i] += Σ_n dy[n,i]·(x[n,i] − mean[n])·rstd[n], the
 * sum over rows in row order into an fp32 partial that starts at 0 */
SY_HD void sy_k_layernorm_bwd_dw_col(int i, float *dw, const float *dy, const float *x,
                                     const float *mean, const float *rstd, int N, int D) {
    float acc = 0.0f;
    for (int n = 0; n < N; n++)
        acc += dy[(size_t)n * D + i] * (x[(size_t)n * D + i] - mean[n]) * rstd[n];
    dw[i] += acc;
}

/* Row n of cross-entropy (max-subtracted, fp32 sums in order): loss[n] = lse − l[target]
 * (fp64 per-row buffer; the caller sums rows in row order), and when d != NULL the scaled
 * softmax-minus-onehot gradient (d may be the logits themselves) */
SY_HD void sy_k_xent_row(int n, double *loss, float *d, const float *logits,
                         const int32_t *targets, int V, float scale) {
    const float *l = logits + (size_t)n * V;
    const int target = targets[n];
    float mx = -INFINITY;
    for (int v = 0; v < V; v++) mx = l[v] > mx ? l[v] : mx;
    float sum = 0.0f;
    for (int v = 0; v < V; v++) sum += expf(l[v] - mx);
    loss[n] = (double)(mx + logf(sum) - l[target]); /* before d may overwrite l */
    if (d) {
        float *dr = d + (size_t)n * V;
        float inv = 1.0f / sum;
        for (int v = 0; v < V; v++) dr[v] = expf(l[v] - mx) * inv * scale;
        dr[target] -= scale;
    }
}

/* Router row n (fp32): probs (max-subtracted softmax), expert (argmax, ties to the lowest
 * index), gate = probs[expert], lse */
SY_HD void sy_k_router_fwd_row(int n, float *probs, int32_t *expert, float *gate, float *lse,
                               const float *logits, int E) {
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

/* Router backward row n: dlogits = p ⊙ (dp − ⟨p, dp⟩) + z_scale·lse·p */
SY_HD void sy_k_router_bwd_row(int n, float *dlogits, const float *probs, const int32_t *expert,
                               const float *gamma, const float *lse, const float *f,
                               float aux_scale, float z_scale, int E) {
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

/* Element i < n·D of a row gather: dst[r] = src[idx[r]], r = i / D */
SY_HD void sy_k_gather(size_t i, float *dst, const float *src, const int32_t *idx, int D) {
    size_t r = i / (size_t)D, k = i % (size_t)D;
    dst[i] = src[(size_t)idx[r] * D + k];
}

/* Element i < n·D: dst[idx[r]] = scale[r]·src[r] (rounded) */
SY_HD void sy_k_scatter_scaled(size_t i, float *dst, const float *src, const int32_t *idx,
                               const float *scale, int D, bool bf16) {
    size_t r = i / (size_t)D, k = i % (size_t)D;
    dst[(size_t)idx[r] * D + k] = sy_k_act(scale[r] * src[i], bf16);
}

/* Element i < n·D: dst[idx[r]] += src[r] (rounded; idx distinct within a call, so no two
 * threads write one element) */
SY_HD void sy_k_scatter_add(size_t i, float *dst, const float *src, const int32_t *idx, int D,
                            bool bf16) {
    size_t r = i / (size_t)D, k = i % (size_t)D;
    float *o = dst + (size_t)idx[r] * D + k;
    *o = sy_k_act(*o + src[i], bf16);
}

/* Row r < n of the combine backward: dot[r] = ⟨a[idx[r]], b[r]⟩ (serial), out[r] =
 * scale[r]·a[idx[r]] (rounded) */
SY_HD void sy_k_gather_dot_scale_row(int r, float *dot, float *out, const float *a,
                                     const float *b, const int32_t *idx, const float *scale,
                                     int D, bool bf16) {
    const float *ar = a + (size_t)idx[r] * D, *br = b + (size_t)r * D;
    float *o = out + (size_t)r * D;
    float acc = 0.0f, g = scale[r];
    for (int k = 0; k < D; k++) {
        acc += ar[k] * br[k];
        o[k] = sy_k_act(g * ar[k], bf16);
    }
    dot[r] = acc;
}

#endif
