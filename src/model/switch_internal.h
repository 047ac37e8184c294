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
    float dropout;
    /* routing, [G, E] and [G] */
    float *logits, *probs, *gate, *lse, *gamma, *dlogits;
    int32_t *expert;
    float *u;     /* [G, D] jitter multipliers (when jitter) */
    float *xr;    /* [G, D] router input h ⊙ u (when jitter) */
    float *dxr;   /* [G, D] */
    /* dispatch plan */
    int32_t *counts, *kept, *offsets, *order;
    float *gk;    /* [G] gate of each dispatch row */
    float *f;     /* [E] */
    /* expert rows, [G, D] / [G, F] (at most G kept rows) */
    float *xe, *he, *ge, *mask, *ye, *dye, *dge, *dhe, *dxe;
};

#endif
