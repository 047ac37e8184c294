/* Token shards in S3 (system spec §7: `data.train` / `data.val` entries may be s3:// URLs).
 *
 * An entry "s3://BUCKET/KEY-PATTERN" names one object or, with * ? [...] in the key, every object
 * of the bucket whose key matches the pattern as glob(3) would match a path (fnmatch with
 * FNM_PATHNAME: '*' stops at '/'), in key order. Keys outside the store's key alphabet
 * ([A-Za-z0-9._/-], store.h) are skipped by the listing with a warning naming them. Credentials, region and endpoint come from the
 * AWS_* variables, as for an s3:// checkpoint store (store_s3.h); path-style addressing when
 * AWS_ENDPOINT_URL is set.
 *
 * A shard is read whole into memory (the local ones are memory-mapped); every worker reads its
 * own copy. Objects are read once per sy_data_open and checked like local shards (data.h), so a
 * truncated or corrupt object is an error naming its URL, never used.
 *
 * Ownership: paths appended to *paths and buffers from sy_data_s3_fetch are malloc'ed for the
 * caller. Thread: any. */
#ifndef SY_DATA_S3_H
#define SY_DATA_S3_H

#include <stddef.h>

#include "base/status.h"

/* 1 if `pattern` is an s3:// URL. */
int sy_data_is_s3(const char *pattern);

/* The full URLs of the objects `pattern` names, in key order: *urls (free with
 * sy_store_keys_free(*urls, *n)). SY_ENOTFOUND naming the pattern if it matches nothing. */
sy_status sy_data_s3_expand(const char *pattern, char ***urls, size_t *n);

/* Reads the object at `url` ("s3://BUCKET/KEY") into a malloc'ed buffer. */
sy_status sy_data_s3_fetch(const char *url, void **buf, size_t *len);

#endif
