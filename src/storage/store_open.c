/* Opening a store: the one place that maps a URL to its backend (store_backends_internal.h). */
#include "storage/store.h"
#include "store_backends_internal.h"

#include <string.h>

/* Backends with a URL scheme, tried in order; a URL without "://" is a local path. */
static const sy_store_backend *const backends[] = {&sy_store_s3_backend, &sy_store_local_backend};

static sy_status open_url(const char *url, const sy_config_t *cfg, sy_store_t **out) {
    if (!out) return sy_err_set(SY_EINVAL, "store open: no output pointer");
    *out = NULL;
    if (!url || !url[0]) return sy_err_set(SY_EINVAL, "store: empty URL");
    for (size_t i = 0; i < sizeof backends / sizeof *backends; i++)
        if (!strncmp(url, backends[i]->scheme, strlen(backends[i]->scheme))) return backends[i]->open(url, cfg, out);
    if (strstr(url, "://"))
        return sy_err_set(SY_EINVAL, "store %s: unknown URL scheme (expected file://, s3:// or a path)", url);
    return sy_store_local_backend.open(url, cfg, out);
}

sy_status sy_store_open(const char *url, sy_store_t **out) { return open_url(url, NULL, out); }

sy_status sy_store_open_config(const sy_config_t *cfg, sy_store_t **out) {
    if (!cfg) return sy_err_set(SY_EINVAL, "store open: no config");
    return open_url(cfg->checkpoint.store, cfg, out);
}
