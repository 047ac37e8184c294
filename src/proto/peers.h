/* Peer tables as edits (issue 14): an Assign's data-plane endpoints and CURVE keys (one entry per
 * rank) sent as an edit of a table the worker already holds, the previous generation's, so that
 * opening a generation after one loss costs O(N) bytes in all instead of N². The edit is a list
 * of runs, (source, count) pairs read in order: source 0 takes the next `count` entries of the
 * Assign's own `peers` / `peer_keys` (the fresh ones), source s >= 1 copies the base table's
 * ranks s-1 ... s-2+count (docs/protocol.md "Peer tables"). Pure functions over plain arrays.
 *
 * Ownership: arrays passed in stay the caller's; the ones returned are the caller's to free
 * (free() for the edit arrays, sy_peers_free for tables). Thread: any. */
#ifndef SY_PEERS_H
#define SY_PEERS_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

/* The edit that turns the base table (base_n entries) into the new one (n entries): `edit`
 * (2 * runs values) and `fresh` (indices of the new table's entries sent whole, in rank order).
 * An entry is copied when the base holds one with the same endpoint and, where keys are given,
 * the same key (base_key and key both NULL: no keys). SY_ENOMEM. */
sy_status sy_peers_edit(int base_n, const char *const *base_ep, const char *const *base_key, int n,
                        const char *const *ep, const char *const *key, uint32_t **edit, size_t *n_edit,
                        int **fresh, size_t *n_fresh);

/* Applies an edit to the base table: `*ep_out` (world strings) and, when the base or the fresh
 * entries carry keys, `*key_out` (world strings; else NULL). SY_EFORMAT when the edit does not
 * fit (an odd length, a run outside the base, counts that do not add up to world, fresh entries
 * left over or missing, keys on one side only); SY_ENOMEM. */
sy_status sy_peers_apply(int base_n, const char *const *base_ep, const char *const *base_key, const uint32_t *edit,
                         size_t n_edit, const char *const *fresh_ep, const char *const *fresh_key, size_t n_fresh,
                         int world, char ***ep_out, char ***key_out);

/* Copies a whole table (key NULL: no keys). SY_ENOMEM. */
sy_status sy_peers_copy(int n, const char *const *ep, const char *const *key, char ***ep_out, char ***key_out);

/* Frees a table returned above (NULL arrays are fine). */
void sy_peers_free(int n, char **ep, char **key);

#endif
