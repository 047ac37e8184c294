/* The store backends as the opener (store_open.c) sees them: private to src/storage/. Each
 * backend file exports one descriptor; store_open.c holds the table, so the backends depend on
 * the front end (store.c: sy_store_wrap, key rules) and the opener on them, never the reverse.
 * Thread: any (the descriptors are constant). */
#ifndef SY_STORE_BACKENDS_INTERNAL_H
#define SY_STORE_BACKENDS_INTERNAL_H

#include "base/config.h"
#include "base/status.h"
#include "storage/store.h"

typedef struct {
    /* URLs starting with this go to open() */
    const char *scheme;
    /* Opens `url`; `cfg` (may be NULL) supplies the checkpoint.* fields the backend reads, NULL
     * means the backend's defaults and the environment. On failure *out stays NULL. */
    sy_status (*open)(const char *url, const sy_config_t *cfg, sy_store_t **out);
} sy_store_backend;

/* store.c: file:///abs/path, and every URL without "://" (a plain path) */
extern const sy_store_backend sy_store_local_backend;
/* store_s3.c: s3://bucket/prefix (cfg: the checkpoint.s3_* fields) */
extern const sy_store_backend sy_store_s3_backend;

#endif
