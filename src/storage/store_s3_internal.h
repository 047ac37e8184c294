/* The parsers of store_s3.c for what an S3 server answers, exposed for its tests and fuzz
 * harnesses (tests/fuzz/fuzz_s3.c) only: nothing else includes this header. Every input is the
 * server's and may be anything; none of these functions reads outside [p, p + len).
 * Thread: any. */
#ifndef SY_STORE_S3_INTERNAL_H
#define SY_STORE_S3_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

/* Content of the first <tag>...</tag> in xml[0, len) (XML entities decoded), malloc'ed; NULL if
 * absent. *after (when not NULL) is set to the byte after the closing tag. */
char *sy_s3_xml_tag(const char *xml, size_t len, const char *tag, const char **after);

/* One response header line of `len` bytes (not NUL-terminated, as curl hands it over): a status
 * line sets *status and resets *clen, *total (-1) and etag (""); Content-Range sets *total,
 * Content-Length *clen, ETag etag (cut at 255 bytes). Other lines change nothing. */
void sy_s3_parse_header(const char *p, size_t len, long *status, int64_t *clen, int64_t *total, char etag[256]);

/* A ListObjectsV2 page body: appends every <Key> under `full` (the bucket-level prefix listed)
 * to *keys (growing *cap; *n entries), with the first `strip` bytes (the store prefix and its
 * '/') removed; keys that are not valid store keys (store.h) are skipped with a warning. *token
 * (the continuation token this page was asked with, or NULL) is freed and replaced by the next
 * page's token, or NULL after the last page. SY_EREMOTE when the page says it is truncated but
 * gives no next token, or gives the same token again (a listing that would never end). */
sy_status sy_s3_parse_list(const char *body, size_t len, const char *full, size_t strip, char ***keys, size_t *n,
                           size_t *cap, char **token);

#endif
