/* Kernel bodies of the Switch layer's route plan (backend.h "route plan") and the fixed-order
 * reductions (sum of squares, sums of per-row values).
 *
 * Index spaces (what a CUDA grid thread would be): jitter and dropout one element each (the
 * draw is a pure function of its row key and column: k_math.h); the capacity scan one expert
 * each, walking tokens in order (a device backend may use a stable integer scan instead: the
 * integers are the same); offsets one thread; slots one token each; statistics one expert each
 * for P_e, then one thread for the sums in the order backend.h pins. The one-thread bodies are
 * exactly that: serial loops, no atomics, no reduction trees. */
#ifndef SY_K_ROUTE_H
#define SY_K_ROUTE_H

#include <stddef.h>

#include "backend/kernels/k_math.h"

/* Element i = t·D + j < G·D of the router jitter: u = 1 − eps + 2·eps·uniform, draw j of the
 * row key (seed, "router.jitter" (tag_hash), step, micro, layer<<32 | t); xr = h·u */
SY_HD void sy_k_jitter_fwd(size_t i, float *u, float *xr, const float *h, int D, float eps,
                           uint64_t seed, uint64_t tag_hash, int64_t step, int micro,
                           int layer) {
    size_t t = i / (size_t)D, j = i % (size_t)D;
    uint64_t key = sy_k_rng_key(seed, tag_hash, (uint64_t)step, (uint64_t)micro,
                                ((uint64_t)layer << 32) | (uint64_t)t);
    u[i] = 1.0f - eps + 2.0f * eps * sy_k_rng_uniform_at(key, j);
    xr[i] = h[i] * u[i];
}

/* Element i = r·F + j < n·F of the expert dropout mask: draw j of the row key (seed,
 * "expert.dropout", step, micro ? micro[r] : micro0, layer<<32 | tok[r]) */
SY_HD void sy_k_dropout_mask(size_t i, float *mask, const int32_t *tok, const int32_t *micro,
                             int F, float keep, float inv, uint64_t seed, uint64_t tag_hash,
                             int64_t step, int micro0, int layer) {
    size_t r = i / (size_t)F, j = i % (size_t)F;
    uint64_t key = sy_k_rng_key(seed, tag_hash, (uint64_t)step,
                                (uint64_t)(micro ? micro[r] : micro0),
                                ((uint64_t)layer << 32) | (uint64_t)tok[r]);
    mask[i] = sy_k_rng_uniform_at(key, j) < keep ? inv : 0.0f;
}

/* Expert e < E: pos[t] = #{s < t : expert[s] = e} for its tokens (written into slot[t], made
 * a slot by sy_k_route_slot), counts[e] = its tokens */
SY_HD void sy_k_route_count(int e, int32_t *counts, int32_t *slot, const int32_t *expert, int G) {
    int32_t c = 0;
    for (int t = 0; t < G; t++)
        if (expert[t] == e) slot[t] = c++;
    counts[e] = c;
}

/* One thread: kept[e] = min(counts[e], C), offsets = exclusive scan of kept (E+1 entries) */
SY_HD void sy_k_route_offsets(int zero, int32_t *kept, int32_t *offsets, const int32_t *counts,
                              int E, int C) {
    (void)zero;
    offsets[0] = 0;
    for (int e = 0; e < E; e++) {
        kept[e] = counts[e] < C ? counts[e] : C;
        offsets[e + 1] = offsets[e] + kept[e];
    }
}

/* Token t < G (slot[t] holds pos[t]): slot = offsets[expert] + pos if pos < C, else -1;
 * order[slot] = t, gk[slot] = gate[t] */
SY_HD void sy_k_route_slot(int t, int32_t *order, int32_t *slot, float *gk,
                           const int32_t *expert, const float *gate, const int32_t *offsets,
                           int C) {
    if (slot[t] < C) {
        int32_t s = offsets[expert[t]] + slot[t];
        slot[t] = s;
        order[s] = t;
        gk[s] = gate[t];
    } else {
        slot[t] = -1;
    }
}

/* Expert e < E: P[e] = Σ_{t in order} probs[t,e] (fp64) */
SY_HD void sy_k_route_prob_sum(int e, double *P, const float *probs, int G, int E) {
    double s = 0.0;
    for (int t = 0; t < G; t++) s += probs[(size_t)t * E + e];
    P[e] = s;
}

/* One thread: f[e] = counts[e]/G, aux = Σ_e f_e·(P_e/G) in e order, z = Σ_t lse[t]² in t
 * order; stats[0] = E·aux, stats[1] = z/G */
SY_HD void sy_k_route_stats_sum(int zero, double *stats, float *f, const double *P,
                                const float *lse, const int32_t *counts, int G, int E) {
    (void)zero;
    double aux = 0.0, z = 0.0;
    for (int e = 0; e < E; e++) {
        f[e] = (float)((double)counts[e] / G);
        aux += ((double)counts[e] / G) * (P[e] / G);
    }
    for (int t = 0; t < G; t++) z += (double)lse[t] * lse[t];
    stats[0] = E * aux;
    stats[1] = z / G;
}

/* Token t < G: gamma[t] = slot[t] ≥ 0 ? dot[slot[t]] : 0 */
SY_HD void sy_k_route_gamma(int t, float *gamma, const float *dot, const int32_t *slot) {
    gamma[t] = slot[t] >= 0 ? dot[slot[t]] : 0.0f;
}

#define SY_K_SUMSQ_CHUNK 4096 /* elements per partial sum of sumsq_add (backend.h) */

/* Chunk c: part[c] = Σ x² over elements [c·CHUNK, min(n, (c+1)·CHUNK)) in order, fp64 */
SY_HD void sy_k_sumsq_chunk(size_t c, double *part, const float *x, size_t n) {
    size_t lo = c * SY_K_SUMSQ_CHUNK, hi = lo + SY_K_SUMSQ_CHUNK < n ? lo + SY_K_SUMSQ_CHUNK : n;
    double s = 0.0;
    for (size_t i = lo; i < hi; i++) s += (double)x[i] * x[i];
    part[c] = s;
}

/* One thread: out[0] += Σ_k v[k] in k order (partial sums, per-row losses), from 0.0 */
SY_HD void sy_k_sum_f64(int zero, double *out, const double *v, size_t n) {
    (void)zero;
    double total = 0.0;
    for (size_t k = 0; k < n; k++) total += v[k];
    out[0] += total;
}

#endif
