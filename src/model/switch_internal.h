/* The Switch layer's state, shared by switch.c and its expert-parallel exchange (switch_ep.c)
 * only. Everyone else uses the opaque sy_switch_t of switch.h. */
#ifndef SY_SWITCH_INTERNAL_H
#define SY_SWITCH_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"

struct sy_switch {
    sy_backend_t *be;
    int G, D, F, E, C;
    int n_kept;
    double aux_group, z_group;
    bool jitter;
    bool router_bf16; /* the bf16-router ablation (model.router_precision); wr [E, D] its weights */
    float *wr;
    float dropout;
    /* routing, [G, E] and [G] */
    float *logits, *probs, *gate, *lse, *gamma, *dlogits;
    int32_t *expert;
    float *u;     /* [G, D] jitter multipliers (when jitter) */
    float *xr;    /* [G, D] router input h ⊙ u (when jitter) */
    float *dxr;   /* [G, D] */
    /* dispatch plan (backend buffers). counts [E], kept [E], offsets [E+1] and stats [2]
     * (aux_group, z_group) live in one block, `plan`, so the host gets them in one download into
     * `plan_host`, mirrored by h_counts, h_kept, h_offsets (host memory). */
    void *plan, *plan_host;
    size_t plan_bytes;
    double *stats;
    int32_t *counts, *kept, *offsets;
    const int32_t *h_counts, *h_kept, *h_offsets;
    int32_t *order; /* [G] token of each dispatch row (first n_kept used) */
    int32_t *slot;  /* [G] dispatch row of each token, -1 when dropped */
    float *gk;    /* [G] gate of each dispatch row */
    float *f;     /* [E] */
    /* expert rows, [G, D] / [G, F] (at most G kept rows) */
    float *xe, *he, *ge, *mask, *ye, *dye, *dge, *dhe, *dxe;
};

#endif
