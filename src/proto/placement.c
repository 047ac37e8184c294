#include "proto/placement.h"

void sy_placement_range(int E, int W, int rank, int *first, int *count) {
    if (E < 1 || W < 1 || rank < 0 || rank >= W) {
        *first = 0;
        *count = 0;
        return;
    }
    int base = E / W, extra = E % W;
    *count = base + (rank < extra ? 1 : 0);
    *first = rank * base + (rank < extra ? rank : extra);
}

sy_status sy_placement_balanced(int E, int W, uint32_t *owner) {
    if (E < 1 || W < 1)
        return sy_err_set(SY_EINVAL, "placement: need E >= 1 and W >= 1 (E = %d, W = %d)", E, W);
    for (int r = 0; r < W; r++) {
        int first, count;
        sy_placement_range(E, W, r, &first, &count);
        for (int e = first; e < first + count; e++) owner[e] = (uint32_t)r;
    }
    return SY_OK;
}

sy_status sy_placement_sticky(int E, int W, const int *prev, uint32_t *owner) {
    if (E < 1 || W < 1) return sy_err_set(SY_EINVAL, "placement: %d experts over %d ranks", E, W);
    int held_before[W], cap[W], held[W], order[W];
    for (int r = 0; r < W; r++) held_before[r] = 0, held[r] = 0, order[r] = r;
    for (int e = 0; e < E; e++)
        if (prev && prev[e] >= 0 && prev[e] < W) held_before[prev[e]]++;
    /* the E mod W extra slots go to the ranks that held the most (ties: lower rank) */
    for (int i = 1; i < W; i++)
        for (int j = i; j > 0 && held_before[order[j]] > held_before[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    for (int r = 0; r < W; r++) cap[r] = E / W;
    for (int i = 0; i < E % W; i++) cap[order[i]]++;
    /* survivors keep what fits, the rest goes to the lowest ranks with room */
    for (int e = 0; e < E; e++) {
        int r = prev ? prev[e] : -1;
        if (r >= 0 && r < W && held[r] < cap[r]) {
            owner[e] = (uint32_t)r;
            held[r]++;
        } else {
            owner[e] = UINT32_MAX;
        }
    }
    for (int e = 0, r = 0; e < E; e++) {
        if (owner[e] != UINT32_MAX) continue;
        while (held[r] >= cap[r]) r++;
        owner[e] = (uint32_t)r;
        held[r]++;
    }
    return SY_OK;
}
