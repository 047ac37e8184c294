#include "data_s3.h"

#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store.h"

#define URL_MAX 2048

int sy_data_is_s3(const char *pattern) { return pattern && !strncmp(pattern, "s3://", 5); }

/* Splits "s3://BUCKET/KEY" into the store URL "s3://BUCKET" and KEY (a pointer into url). */
static sy_status split(const char *url, char *store_url, size_t cap, const char **key) {
    const char *b = url + 5, *slash = strchr(b, '/');
    if (!slash || slash == b || !slash[1])
        return sy_err_set(SY_EINVAL, "%s: expected s3://BUCKET/KEY (a bucket and an object key or pattern)", url);
    if ((size_t)(slash - url) >= cap) return sy_err_set(SY_EINVAL, "%s: bucket name too long", url);
    snprintf(store_url, cap, "%.*s", (int)(slash - url), url);
    *key = slash + 1;
    return SY_OK;
}

static sy_status append(char ***paths, int *n, int *cap, const char *store_url, const char *key) {
    if (*n == *cap) {
        int nc = *cap ? *cap * 2 : 16;
        char **np = realloc(*paths, (size_t)nc * sizeof *np);
        if (!np) return sy_err_set(SY_ENOMEM, "out of memory");
        *paths = np;
        *cap = nc;
    }
    size_t l = strlen(store_url) + 1 + strlen(key) + 1;
    char *p = malloc(l);
    if (!p) return sy_err_set(SY_ENOMEM, "out of memory");
    snprintf(p, l, "%s/%s", store_url, key);
    (*paths)[(*n)++] = p;
    return SY_OK;
}

sy_status sy_data_s3_expand(const char *pattern, char ***paths, int *n, int *cap) {
    char store_url[URL_MAX];
    const char *kp;
    SY_CHECK(split(pattern, store_url, sizeof store_url, &kp));
    sy_store_t *st = NULL;
    sy_status s = sy_store_open(store_url, &st);
    if (s != SY_OK) return sy_err_prefix(s, "%s", pattern);
    size_t lit = strcspn(kp, "*?[");
    char **keys = NULL;
    size_t nk = 0;
    int found = 0;
    if (!kp[lit]) { /* no glob characters: one object */
        uint64_t size;
        s = sy_store_head(st, kp, &size);
        if (s == SY_ENOTFOUND) s = sy_err_set(SY_ENOTFOUND, "%s: data shard not found", pattern);
        else if (s != SY_OK) s = sy_err_prefix(s, "%s", pattern);
        else if ((s = append(paths, n, cap, store_url, kp)) == SY_OK) found = 1;
        goto done;
    }
    char prefix[URL_MAX];
    snprintf(prefix, sizeof prefix, "%.*s", (int)lit, kp);
    s = sy_store_list(st, prefix, &keys, &nk); /* sorted by key */
    if (s != SY_OK) {
        s = sy_err_prefix(s, "%s: listing", pattern);
        goto done;
    }
    for (size_t i = 0; i < nk && s == SY_OK; i++) {
        if (fnmatch(kp, keys[i], FNM_PATHNAME) != 0) continue;
        s = append(paths, n, cap, store_url, keys[i]);
        found++;
    }
    if (s == SY_OK && !found) s = sy_err_set(SY_ENOTFOUND, "%s: pattern matches no object", pattern);
done:
    sy_store_keys_free(keys, nk);
    sy_store_destroy(&st);
    return s;
}

sy_status sy_data_s3_fetch(const char *url, void **buf, size_t *len) {
    *buf = NULL;
    *len = 0;
    char store_url[URL_MAX];
    const char *key;
    SY_CHECK(split(url, store_url, sizeof store_url, &key));
    sy_store_t *st = NULL;
    sy_status s = sy_store_open(store_url, &st);
    if (s == SY_OK) s = sy_store_get(st, key, buf, len);
    if (s == SY_ENOTFOUND) s = sy_err_set(SY_ENOTFOUND, "%s: data shard not found", url);
    else if (s != SY_OK) s = sy_err_prefix(s, "%s", url);
    sy_store_destroy(&st);
    return s;
}
