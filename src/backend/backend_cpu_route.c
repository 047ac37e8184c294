/* CPU backend, part three: the Switch layer's route plan (jitter, capacity and dispatch plan,
 * load-balancing statistics, dropout masks) and the expert-parallel wire conversion.
 * Each op does the same floating-point operations in the same order as the host loops it
 * replaced (switch.c, switch_ep.c), so results are bit-identical whatever the thread count:
 * the random draws are keyed per token / row, the sums run serially in the order backend.h
 * names. The per-element ops call the shared kernel bodies (kernels/); the draws (one key per
 * row, then draws in order) and the capacity scan (one pass over the tokens) keep their serial
 * loops, which the bodies' per-element draws and per-expert scans reproduce exactly. */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu_math.h"
#include "backend/kernels/k_elementwise.h"
#include "backend/kernels/k_route.h"
#include "backend_cpu_internal.h"
#include "base/rng.h"

#define ROWS_PAR 64 /* rows below which the keyed draws run on one thread */

static void cpu_jitter_fwd(sy_backend_t *be, float *u, float *xr, const float *h, int G, int D,
                           float eps, uint64_t seed, int64_t step, int micro, int layer) {
    (void)be;
#pragma omp parallel for schedule(static) if (G > ROWS_PAR)
    for (int t = 0; t < G; t++) {
        sy_rng_t r = sy_rng_key(seed, "router.jitter", (uint64_t)step, (uint64_t)micro,
                                ((uint64_t)layer << 32) | (uint64_t)t);
        float *ut = u + (size_t)t * D;
        float *xt = xr + (size_t)t * D;
        const float *ht = h + (size_t)t * D;
        for (int i = 0; i < D; i++) {
            ut[i] = 1.0f - eps + 2.0f * eps * sy_rng_uniform(&r);
            xt[i] = ht[i] * ut[i];
        }
    }
}

static void cpu_jitter_bwd(sy_backend_t *be, float *dh, const float *g, const float *u, size_t n) {
    (void)be;
    if (u)
        for (size_t i = 0; i < n; i++) sy_k_jitter_bwd(i, dh, g, u);
    else
        for (size_t i = 0; i < n; i++) sy_k_jitter_bwd(i, dh, g, NULL);
}

/* Serial scans in token order: one pass for the positions (sy_k_route_count, which the
 * emulation runs, is one pass per expert: the same integers), then the shared bodies. */
static void cpu_route_plan(sy_backend_t *be, int32_t *counts, int32_t *kept, int32_t *offsets,
                           int32_t *order, int32_t *slot, float *gk, const int32_t *expert,
                           const float *gate, int G, int E, int C) {
    (void)be;
    memset(counts, 0, sizeof(int32_t) * (size_t)E);
    for (int t = 0; t < G; t++) {
        int e = expert[t];
        slot[t] = counts[e]; /* pos[t], made a slot below */
        counts[e]++;
    }
    sy_k_route_offsets(0, kept, offsets, counts, E, C);
    for (int t = 0; t < G; t++) sy_k_route_slot(t, order, slot, gk, expert, gate, offsets, C);
}

static void cpu_route_stats(sy_backend_t *be, double *stats, float *f, const float *probs,
                            const float *lse, const int32_t *counts, int G, int E) {
    (void)be;
    enum { E_STACK = 256 };
    double P_stack[E_STACK], *P = E <= E_STACK ? P_stack : malloc(sizeof(double) * (size_t)E);
    if (!P) abort(); /* E > 256 experts and no memory for E doubles */
    for (int e = 0; e < E; e++) sy_k_route_prob_sum(e, P, probs, G, E);
    sy_k_route_stats_sum(0, stats, f, P, lse, counts, G, E);
    if (P != P_stack) free(P);
}

static void cpu_route_gamma(sy_backend_t *be, float *gamma, const float *dot, const int32_t *slot,
                            int G) {
    (void)be;
    for (int t = 0; t < G; t++) sy_k_route_gamma(t, gamma, dot, slot);
}

static void cpu_dropout_mask(sy_backend_t *be, float *mask, const int32_t *tok,
                             const int32_t *micro, int n, int F, float keep, float inv,
                             uint64_t seed, int64_t step, int micro0, int layer) {
    (void)be;
#pragma omp parallel for schedule(static) if (n > ROWS_PAR)
    for (int i = 0; i < n; i++) {
        sy_rng_t r = sy_rng_key(seed, "expert.dropout", (uint64_t)step,
                                (uint64_t)(micro ? micro[i] : micro0),
                                ((uint64_t)layer << 32) | (uint64_t)tok[i]);
        float *mk = mask + (size_t)i * F;
        for (int j = 0; j < F; j++) mk[j] = sy_rng_uniform(&r) < keep ? inv : 0.0f;
    }
}

/* The bf16 conversions are per element (the same bits on any thread count); the bf16 storage
 * wrap runs one for every bf16 operand of every op, so large ones are spread over threads. */
static void cpu_wire_put(sy_backend_t *be, void *dst, const float *src, size_t n, int es) {
    (void)be;
    if (es == (int)sizeof(float)) {
        if (n) memcpy(dst, src, sizeof(float) * n);
        return;
    }
    SY_CPU_CHUNKED(n, lo, hi, sy_cpu_narrow_range(dst, src, lo, hi));
}

static void cpu_wire_get(sy_backend_t *be, float *dst, const void *src, size_t n, int es) {
    (void)be;
    if (es == (int)sizeof(float)) {
        if (n) memcpy(dst, src, sizeof(float) * n);
        return;
    }
    SY_CPU_CHUNKED(n, lo, hi, sy_cpu_widen_range(dst, src, lo, hi));
}

void sy_cpu_route_install(sy_backend_t *b) {
    b->jitter_fwd = cpu_jitter_fwd;
    b->jitter_bwd = cpu_jitter_bwd;
    b->route_plan = cpu_route_plan;
    b->route_stats = cpu_route_stats;
    b->route_gamma = cpu_route_gamma;
    b->dropout_mask = cpu_dropout_mask;
    b->wire_put = cpu_wire_put;
    b->wire_get = cpu_wire_get;
}
