/* Token shards in S3 (system spec §7: `data.train` / `data.val` entries may be s3:// URLs).
 *
 * An entry "s3://BUCKET/KEY-PATTERN" names one object or, with * ? [...] in the key, every object
 * of the bucket whose key matches the pattern as glob(3) would match a path (fnmatch with
 * FNM_PATHNAME: '*' stops at '/'), in key order. Keys outside the store's key alphabet
 * ([A-Za-z0-9._/-], store.h) are skipped by the listing with a warning naming them. Credentials, region and endpoint come from the
 * AWS_* variables, as for an s3:// checkpoint store (store_s3.h); path-style addressing when
 * AWS_ENDPOINT_URL is set.
 *
 * Two ways to read a shard. Streaming (data.stream, the default): at open only the 1 KiB header
 * is read, by one ranged GET that also pins the object (its size and ETag); later reads are
 * ranged GETs of the windows a worker uses, each checked against the pin, so an object that
 * changed, shrank or disappeared mid-run is an error naming its URL, never other tokens. Whole
 * (data.stream = false): sy_data_s3_fetch reads the object into memory once per sy_data_open.
 *
 * Ownership: paths appended to *paths and buffers from sy_data_s3_fetch are malloc'ed for the
 * caller. Thread: any. */
#ifndef SY_DATA_S3_H
#define SY_DATA_S3_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "storage/store.h"

/* 1 if `pattern` is an s3:// URL. */
int sy_data_is_s3(const char *pattern);

/* The full URLs of the objects `pattern` names, in key order: *urls (free with
 * sy_store_keys_free(*urls, *n)). SY_ENOTFOUND naming the pattern if it matches nothing. */
sy_status sy_data_s3_expand(const char *pattern, char ***urls, size_t *n);

/* Reads the object at `url` ("s3://BUCKET/KEY") into a malloc'ed buffer. */
sy_status sy_data_s3_fetch(const char *url, void **buf, size_t *len);

/* The stores of one sy_data_t: one per bucket, opened on first use, so shards of a bucket share
 * its connections. _get is for the opening thread only; the stores it returns may then be used
 * by any thread (store.h). */
typedef struct sy_data_s3_stores sy_data_s3_stores_t;
sy_status sy_data_s3_stores_new(sy_data_s3_stores_t **out);
void sy_data_s3_stores_destroy(sy_data_s3_stores_t **self_p);
/* The store of url's bucket (owned by `s`) and the object key (a pointer into url). */
sy_status sy_data_s3_stores_get(sy_data_s3_stores_t *s, const char *url, sy_store_t **store, const char **key);

/* Reads the first `len` bytes of the object (its header) and pins it: *obj gets its size and
 * ETag from the same reply. An object shorter than len is SY_EFORMAT naming the URL and size. */
sy_status sy_data_s3_read_head(sy_store_t *store, const char *url, const char *key, void *buf, size_t len,
                               sy_store_obj *obj);
/* Reads [off, off + len) of the object pinned as *pin; SY_EIO naming the URL when the object is
 * no longer that one (another ETag or size, shorter, gone). Retries are the store's. */
sy_status sy_data_s3_read_pinned(sy_store_t *store, const char *url, const char *key, const sy_store_obj *pin,
                                 uint64_t off, size_t len, void *buf);

#endif
