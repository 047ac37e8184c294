/* Expert placement: which rank owns which expert (system spec §3, issue 5). The coordinator
 * computes it when it opens a generation and sends it to every rank in Assign
 * (proto/protocol.h). Pure functions over plain arrays: no state, no allocation.
 *
 * Ownership: owner arrays are the caller's, E entries. Thread: any. */
#ifndef SY_PLACEMENT_H
#define SY_PLACEMENT_H

#include <stdint.h>

#include "base/status.h"

/* Balanced expert placement: owner[e] = rank of expert e, e in [0, E). Ranks own contiguous
 * ranges; each owns E/W experts and the first E mod W ranks one more. W > E leaves the last
 * ranks without experts. SY_EINVAL if E < 1 or W < 1. */
sy_status sy_placement_balanced(int E, int W, uint32_t *owner);
/* Placement that moves as few experts as possible (system spec §3, issue 5): prev[e] is the
 * NEW rank of expert e's previous owner, or -1 if that worker is gone (prev NULL: none). Every
 * rank gets E/W experts and E mod W ranks one more (those that held the most); each survivor
 * keeps its experts up to that count; the others go, in expert order, to the lowest ranks with
 * room. With no previous owners it equals sy_placement_balanced. */
sy_status sy_placement_sticky(int E, int W, const int *prev, uint32_t *owner);
/* First expert and count owned by `rank` under the balanced placement (no array needed). */
void sy_placement_range(int E, int W, int rank, int *first, int *count);

#endif
