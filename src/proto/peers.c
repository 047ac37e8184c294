/* Peer tables as edits: see peers.h. */
#include "proto/peers.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static uint64_t hash_str(uint64_t h, const char *s) {
    for (; s && *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull; /* FNV-1a */
    return (h ^ 0xff) * 1099511628211ull;
}

static bool same(const char *a, const char *b) { return !strcmp(a ? a : "", b ? b : ""); }

sy_status sy_peers_edit(int base_n, const char *const *base_ep, const char *const *base_key, int n,
                        const char *const *ep, const char *const *key, uint32_t **edit, size_t *n_edit,
                        int **fresh, size_t *n_fresh) {
    *edit = NULL;
    *fresh = NULL;
    *n_edit = *n_fresh = 0;
    size_t cap = 16;
    while (cap < 2 * (size_t)(base_n > 0 ? base_n : 1)) cap *= 2;
    int *slot = malloc(sizeof(int) * cap); /* open addressing: base rank + 1, 0 empty */
    uint32_t *ed = malloc(sizeof(uint32_t) * 2 * (size_t)(n > 0 ? n : 1));
    int *fr = malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    if (!slot || !ed || !fr) {
        free(slot);
        free(ed);
        free(fr);
        return sy_err_set(SY_ENOMEM, "out of memory editing a peer table of %d entries", n);
    }
    memset(slot, 0, sizeof(int) * cap);
    for (int r = 0; r < base_n; r++) {
        size_t j = hash_str(hash_str(1469598103934665603ull, base_ep[r]), base_key ? base_key[r] : NULL) & (cap - 1);
        while (slot[j]) j = (j + 1) & (cap - 1);
        slot[j] = r + 1;
    }
    size_t ne = 0, nf = 0;
    int last = -2; /* base rank copied by the previous entry; -1: it was fresh */
    for (int r = 0; r < n; r++) {
        int from = -1;
        size_t j = hash_str(hash_str(1469598103934665603ull, ep[r]), key ? key[r] : NULL) & (cap - 1);
        for (; slot[j]; j = (j + 1) & (cap - 1)) {
            int b = slot[j] - 1;
            if (same(base_ep[b], ep[r]) && (!key || same(base_key ? base_key[b] : NULL, key[r]))) {
                from = b;
                /* a duplicate entry in the base: prefer the one that continues the run */
                if (last >= 0 && b == last + 1) break;
            }
        }
        if (from < 0) fr[nf++] = r;
        if (ne && ((from < 0 && last == -1) || (from >= 0 && last >= 0 && from == last + 1))) {
            ed[ne - 1]++; /* the run goes on */
        } else {
            ed[ne++] = from < 0 ? 0u : (uint32_t)from + 1;
            ed[ne++] = 1;
        }
        last = from;
    }
    free(slot);
    *edit = ed;
    *n_edit = ne;
    *fresh = fr;
    *n_fresh = nf;
    return SY_OK;
}

void sy_peers_free(int n, char **ep, char **key) {
    for (int r = 0; r < n; r++) {
        if (ep) free(ep[r]);
        if (key) free(key[r]);
    }
    free(ep);
    free(key);
}

sy_status sy_peers_copy(int n, const char *const *ep, const char *const *key, char ***ep_out, char ***key_out) {
    uint32_t run[2] = {0, (uint32_t)n};
    return sy_peers_apply(0, NULL, NULL, run, n > 0 ? 2 : 0, ep, key, (size_t)n, n, ep_out, key_out);
}

sy_status sy_peers_apply(int base_n, const char *const *base_ep, const char *const *base_key, const uint32_t *edit,
                         size_t n_edit, const char *const *fresh_ep, const char *const *fresh_key, size_t n_fresh,
                         int world, char ***ep_out, char ***key_out) {
    *ep_out = NULL;
    *key_out = NULL;
    if (n_edit % 2) return sy_err_set(SY_EFORMAT, "peer table edit of %zu values: (source, count) pairs", n_edit);
    bool keys = base_key || fresh_key;
    if (keys && ((base_n > 0 && !base_key) || (n_fresh > 0 && !fresh_key)))
        return sy_err_set(SY_EFORMAT, "peer table edit: data-plane keys on only one side (base %s, fresh %s)",
                          base_key ? "with" : "without", fresh_key ? "with" : "without");
    /* check it all before allocating: counts add up to world, runs inside the base */
    uint64_t total = 0, used = 0;
    for (size_t i = 0; i < n_edit; i += 2) {
        uint64_t src = edit[i], cnt = edit[i + 1];
        if (src == 0) used += cnt;
        else if (src - 1 + cnt > (uint64_t)base_n)
            return sy_err_set(SY_EFORMAT, "peer table edit: run of %llu from base rank %llu, outside a base of %d",
                              (unsigned long long)cnt, (unsigned long long)(src - 1), base_n);
        total += cnt;
    }
    if (world < 1 || total != (uint64_t)world || used != n_fresh)
        return sy_err_set(SY_EFORMAT, "peer table edit: %llu entries (%llu fresh) for a world of %d with %zu fresh",
                          (unsigned long long)total, (unsigned long long)used, world, n_fresh);
    char **ep = calloc((size_t)world, sizeof(char *));
    char **key = keys ? calloc((size_t)world, sizeof(char *)) : NULL;
    if (!ep || (keys && !key)) goto oom;
    int r = 0;
    size_t f = 0;
    for (size_t i = 0; i < n_edit; i += 2)
        for (uint32_t k = 0; k < edit[i + 1]; k++, r++) {
            const char *e = edit[i] ? base_ep[edit[i] - 1 + k] : fresh_ep[f];
            const char *y = keys ? (edit[i] ? base_key[edit[i] - 1 + k] : fresh_key[f]) : NULL;
            if (!edit[i]) f++;
            if (!(ep[r] = strdup(e ? e : ""))) goto oom;
            if (keys && !(key[r] = strdup(y ? y : ""))) goto oom;
        }
    *ep_out = ep;
    *key_out = key;
    return SY_OK;
oom:
    sy_peers_free(world, ep, key);
    return sy_err_set(SY_ENOMEM, "out of memory for a peer table of %d entries", world);
}
