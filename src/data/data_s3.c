#include "data/data_s3.h"

#include <fnmatch.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage/store.h"

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

/* "STORE_URL/KEY", malloc'ed (NULL when out of memory). */
static char *join_url(const char *store_url, const char *key) {
    size_t l = strlen(store_url) + 1 + strlen(key) + 1;
    char *p = malloc(l);
    if (p) snprintf(p, l, "%s/%s", store_url, key);
    return p;
}

sy_status sy_data_s3_expand(const char *pattern, char ***urls, size_t *n) {
    *urls = NULL;
    *n = 0;
    char store_url[URL_MAX];
    const char *kp;
    SY_CHECK(split(pattern, store_url, sizeof store_url, &kp));
    sy_store_t *st = NULL;
    sy_status s = sy_store_open(store_url, &st);
    if (s != SY_OK) return sy_err_prefix(s, "%s", pattern);
    size_t lit = strcspn(kp, "*?[");
    char **keys = NULL;
    size_t nk = 0;
    if (!kp[lit]) { /* no glob characters: one object */
        uint64_t size;
        s = sy_store_head(st, kp, &size);
        if (s == SY_ENOTFOUND) s = sy_err_set(SY_ENOTFOUND, "%s: data shard not found", pattern);
        else if (s != SY_OK) s = sy_err_prefix(s, "%s", pattern);
        else if (!(keys = malloc(sizeof *keys)) || !(keys[0] = strdup(kp))) s = sy_err_set(SY_ENOMEM, "out of memory");
        else nk = 1;
    } else {
        char prefix[URL_MAX];
        snprintf(prefix, sizeof prefix, "%.*s", (int)lit, kp);
        s = sy_store_list(st, prefix, &keys, &nk); /* sorted by key */
        if (s != SY_OK) s = sy_err_prefix(s, "%s: listing", pattern);
    }
    sy_store_destroy(&st);
    /* The matching keys become URLs in place (the list is at most as long). */
    size_t m = 0;
    for (size_t i = 0; i < nk; i++) {
        char *url = NULL;
        if (s == SY_OK && fnmatch(kp, keys[i], FNM_PATHNAME) == 0 && !(url = join_url(store_url, keys[i])))
            s = sy_err_set(SY_ENOMEM, "out of memory");
        free(keys[i]);
        if (url) keys[m++] = url;
    }
    if (s == SY_OK && m == 0) s = sy_err_set(SY_ENOTFOUND, "%s: pattern matches no object", pattern);
    if (s != SY_OK) {
        sy_store_keys_free(keys, m);
        return s;
    }
    *urls = keys;
    *n = m;
    return SY_OK;
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

/* ---------------------------------------------------------------- streaming reads */

#define STORES_MAX_BUCKETS 64

struct sy_data_s3_stores {
    int n;
    char *url[STORES_MAX_BUCKETS]; /* "s3://BUCKET" */
    sy_store_t *store[STORES_MAX_BUCKETS];
};

sy_status sy_data_s3_stores_new(sy_data_s3_stores_t **out) {
    *out = calloc(1, sizeof **out);
    return *out ? SY_OK : sy_err_set(SY_ENOMEM, "data: out of memory");
}

void sy_data_s3_stores_destroy(sy_data_s3_stores_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_data_s3_stores_t *s = *self_p;
    for (int i = 0; i < s->n; i++) {
        free(s->url[i]);
        sy_store_destroy(&s->store[i]);
    }
    free(s);
    *self_p = NULL;
}

sy_status sy_data_s3_stores_get(sy_data_s3_stores_t *s, const char *url, sy_store_t **store, const char **key) {
    char store_url[URL_MAX];
    SY_CHECK(split(url, store_url, sizeof store_url, key));
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->url[i], store_url)) {
            *store = s->store[i];
            return SY_OK;
        }
    if (s->n == STORES_MAX_BUCKETS)
        return sy_err_set(SY_EINVAL, "%s: training data from more than %d buckets", url, STORES_MAX_BUCKETS);
    sy_store_t *st = NULL;
    sy_status rc = sy_store_open(store_url, &st);
    if (rc != SY_OK) return sy_err_prefix(rc, "%s", url);
    if (!(s->url[s->n] = strdup(store_url))) {
        sy_store_destroy(&st);
        return sy_err_set(SY_ENOMEM, "data: out of memory");
    }
    s->store[s->n++] = st;
    *store = st;
    return SY_OK;
}

sy_status sy_data_s3_read_head(sy_store_t *store, const char *url, const char *key, void *buf, size_t len,
                               sy_store_obj *obj) {
    sy_status s = sy_store_get_range_obj(store, key, 0, len, buf, obj);
    if (s == SY_OK) return SY_OK;
    if (s == SY_ENOTFOUND) return sy_err_set(SY_ENOTFOUND, "%s: data shard not found", url);
    if (s == SY_EINVAL) { /* shorter than the header */
        uint64_t size = 0;
        if (sy_store_head(store, key, &size) == SY_OK)
            return sy_err_set(SY_EFORMAT, "%s: file has %" PRIu64 " bytes, shorter than the %zu-byte header", url, size,
                              len);
    }
    return sy_err_prefix(s, "%s", url);
}

sy_status sy_data_s3_read_pinned(sy_store_t *store, const char *url, const char *key, const sy_store_obj *pin,
                                 uint64_t off, size_t len, void *buf) {
    sy_store_obj now;
    sy_status s = sy_store_get_range_obj(store, key, off, len, buf, &now);
    if (s == SY_ENOTFOUND)
        return sy_err_set(SY_EIO, "%s: the data shard disappeared while in use; stopping instead of training on "
                          "other data (restore the object, then resume)", url);
    if (s == SY_EINVAL)
        return sy_err_set(SY_EIO, "%s changed while in use: bytes [%" PRIu64 ", +%zu) are past its end now, it had %"
                          PRIu64 " bytes when opened (truncated); stopping instead of reading other tokens (restore "
                          "the object, then resume)", url, off, len, pin->size);
    if (s != SY_OK) return sy_err_prefix(s, "%s", url);
    if (now.size != pin->size || strcmp(now.etag, pin->etag) != 0)
        return sy_err_set(SY_EIO, "%s changed while in use: %" PRIu64 " bytes and ETag %s now, %" PRIu64 " bytes and "
                          "ETag %s when opened%s; stopping instead of reading other tokens (restore the object, then "
                          "resume)", url, now.size, now.etag[0] ? now.etag : "(none)", pin->size,
                          pin->etag[0] ? pin->etag : "(none)", now.size < pin->size ? " (truncated)" : " (rewritten)");
    return SY_OK;
}
