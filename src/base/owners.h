/* Experts grouped by owner rank: the index the expert exchange (model/switch_ep.c) and the
 * coordinator (the counts each owner reports, coordinator/coord_steps.c) both need from a
 * placement. Header-only. Thread: any. */
#ifndef SY_OWNERS_H
#define SY_OWNERS_H

#include <stdint.h>
#include <string.h>

/* From owner[E] (each < W): off[W + 1] and exp[E] such that owner q's experts are
 * exp[off[q] .. off[q + 1]), ascending (a counting sort, no other memory). Returns -1, or the
 * first expert whose owner is >= W (off and exp then unspecified). */
static inline int sy_owners_group(const uint32_t *owner, int E, int W, int32_t *off, int32_t *exp) {
    memset(off, 0, sizeof *off * (size_t)(W + 1));
    for (int e = 0; e < E; e++) {
        if (owner[e] >= (uint32_t)W) return e;
        off[owner[e] + 1]++;
    }
    for (int q = 0; q < W; q++) off[q + 1] += off[q];
    for (int e = 0; e < E; e++) exp[off[owner[e]]++] = e; /* off[q] ends at its old off[q + 1] */
    for (int q = W; q > 0; q--) off[q] = off[q - 1];
    off[0] = 0;
    return -1;
}

#endif
