/* An object store: flat keys → byte blobs, the place checkpoints live (system spec §5).
 *
 * URLs: `file:///abs/path` or a plain relative/absolute path is a local directory (created if
 * missing); `s3://bucket/prefix` is the S3 backend (store_s3.h: libcurl SigV4; credentials from the AWS_*
 * variables; sy_store_open_config also applies the checkpoint.s3_* config fields). Both openers
 * live in store_open.c, the one place that maps a URL scheme to its backend; the backends
 * (the local one here in store.c, store_s3.c) build on the front end and know nothing of each
 * other.
 *
 * Keys are '/'-separated relative names made of [A-Za-z0-9._/-] only, with no empty, "." or
 * ".." component and no leading or trailing '/'; anything else is SY_EINVAL. Prefixes for list
 * and delete_prefix follow the same rule except that they may be empty or end with '/'.
 * A prefix is a plain string prefix (S3 semantics): "run/ckpt/step-1" matches
 * "run/ckpt/step-10/x".
 *
 * Guarantees (local backend): put is atomic (temp file in the same folder, fsync, rename, fsync
 * of the folder): readers see the old object or the new one, never a mix. put_if_absent is
 * atomic against other writers (link(2) of a fsynced temp file): exactly one of several
 * concurrent callers wins, the others get SY_EEXIST. Temp files never show in list.
 *
 * Ownership: sy_store_get's buffer and sy_store_list's array are malloc'ed for the caller
 * (free with free() and sy_store_keys_free()). Thread: any; one sy_store_t may be shared by
 * threads (the local backend holds no mutable state). */
#ifndef SY_STORE_H
#define SY_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "base/config.h"
#include "base/status.h"

typedef struct sy_store sy_store_t;

/* Opens the store at `url` with the backend's defaults (S3: the AWS_* variables). */
sy_status sy_store_open(const char *url, sy_store_t **out);
/* Opens cfg->checkpoint.store, applying the checkpoint.s3_* fields to an s3:// URL. */
sy_status sy_store_open_config(const sy_config_t *cfg, sy_store_t **out);
void sy_store_destroy(sy_store_t **self_p);
/* The URL the store was opened with (for messages). */
const char *sy_store_url(const sy_store_t *self);

/* Writes (or replaces) an object. */
sy_status sy_store_put(sy_store_t *self, const char *key, const void *buf, size_t len);
/* Writes an object only if the key is absent; SY_EEXIST (nothing written) if it exists. */
sy_status sy_store_put_if_absent(sy_store_t *self, const char *key, const void *buf, size_t len);

/* Scatter-gather put: the object is the concatenation of parts[0..n) (each `len` bytes at
 * `base`; len 0 allowed), written without first copying them into one buffer where the backend
 * can (local: writev straight from the parts; backends without a native putv get them
 * concatenated into one buffer, then an ordinary put). Same atomicity as put / put_if_absent
 * (`if_absent` selects which; SY_EEXIST as above).
 *
 * `tap` (may be NULL) is called with every byte of the object, in order, in chunks of at most
 * SY_STORE_TAP_CHUNK bytes, each chunk before it is handed to the backend: the caller hashes the
 * exact bytes stored this way (a chunk is still in cache when it is written). A tap error aborts
 * the put: nothing is stored, the tap's status and message are returned.
 *
 * Contract: the parts must not change until the call returns (they are read twice, once by the
 * tap and once by the write). */
typedef struct {
    const void *base;
    size_t len;
} sy_store_part;

typedef struct {
    sy_status (*fn)(void *arg, const void *p, size_t n);
    void *arg;
} sy_store_tap;

#define SY_STORE_TAP_CHUNK ((size_t)256 << 10) /* fits a core's L2 beside the kernel's copy */

sy_status sy_store_putv(sy_store_t *self, const char *key, const sy_store_part *parts, size_t n, int if_absent,
                        const sy_store_tap *tap);
/* Reads a whole object into a malloc'ed buffer (*buf, *len); SY_ENOTFOUND if missing. */
sy_status sy_store_get(sy_store_t *self, const char *key, void **buf, size_t *len);
/* Reads bytes [offset, offset + len) of an object into buf; SY_EINVAL if past its end. */
sy_status sy_store_get_range(sy_store_t *self, const char *key, uint64_t offset, size_t len, void *buf);
/* What a read saw of an object: its size and a tag that changes whenever its bytes may have
 * (S3: the ETag the server sent with the bytes; local: inode, size and mtime). Two reads with
 * equal tags read the same object; an empty tag means the backend has none. */
#define SY_STORE_ETAG_MAX 256
typedef struct {
    uint64_t size;
    char etag[SY_STORE_ETAG_MAX];
} sy_store_obj;

/* sy_store_get_range that also fills *obj from the same reply (one request on S3), so a caller
 * can pin an object at its first read and notice when a later read sees another one. */
sy_status sy_store_get_range_obj(sy_store_t *self, const char *key, uint64_t offset, size_t len, void *buf,
                                 sy_store_obj *obj);
/* Size of an object; SY_ENOTFOUND if missing. */
sy_status sy_store_head(sy_store_t *self, const char *key, uint64_t *size);
/* Every key starting with `prefix` ("" = all), sorted by byte order (strcmp). *keys is
 * malloc'ed (NULL when *n == 0). */
sy_status sy_store_list(sy_store_t *self, const char *prefix, char ***keys, size_t *n);
void sy_store_keys_free(char **keys, size_t n);
/* Deletes an object; a missing one is not an error. */
sy_status sy_store_delete(sy_store_t *self, const char *key);
/* Deletes every object whose key starts with `prefix` (which must not be empty). */
sy_status sy_store_delete_prefix(sy_store_t *self, const char *prefix);

/* 1 if `key` is a valid object key (see above), else 0. */
int sy_store_key_valid(const char *key);

/* ---- Backend interface: for store backends only (store.c's local one, store_s3.c, test doubles).
 * Keys and prefixes are validated before a backend sees them. list returns unsorted keys
 * (the front end sorts); delete of a missing key returns SY_OK. */
typedef struct {
    sy_status (*put)(void *impl, const char *key, const void *buf, size_t len, int if_absent);
    sy_status (*get)(void *impl, const char *key, void **buf, size_t *len);
    sy_status (*get_range)(void *impl, const char *key, uint64_t offset, size_t len, void *buf);
    sy_status (*head)(void *impl, const char *key, uint64_t *size);
    sy_status (*list)(void *impl, const char *prefix, char ***keys, size_t *n);
    sy_status (*del)(void *impl, const char *key);
    void (*destroy)(void *impl);
    /* Optional (NULL: the front end concatenates and calls put). Parts are checked (total fits
     * size_t, no NULL base with len > 0) before a backend sees them; the backend calls the tap
     * (may be NULL) with every byte in order in chunks of at most SY_STORE_TAP_CHUNK, each
     * before writing it, and stores nothing if the tap fails. */
    sy_status (*putv)(void *impl, const char *key, const sy_store_part *parts, size_t n, int if_absent,
                      const sy_store_tap *tap);
    /* Optional (NULL: the front end asks head for the size and leaves the tag empty). len > 0. */
    sy_status (*get_range_obj)(void *impl, const char *key, uint64_t offset, size_t len, void *buf,
                               sy_store_obj *obj);
} sy_store_ops;

/* Wraps a backend into a store (takes ownership of impl: ops->destroy runs on failure too). */
sy_status sy_store_wrap(const sy_store_ops *ops, void *impl, const char *url, sy_store_t **out);

#endif
