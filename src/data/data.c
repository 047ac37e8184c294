/* Token shards and the sample order (model spec §6). See data.h.
 *
 * Shards are read and written in the host's byte order, which must be little-endian (llm.c's
 * files are little-endian; every target of this project is x86-64 or aarch64 LE). */
#include "data/data.h"
#include "base/fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "data/data_cache.h"
#include "data/data_crew.h"
#include "data_internal.h"
#include "data/data_prefetch.h"
#include "data/data_s3.h"
#include "base/log.h"
#include "base/rng.h"
#include "storage/store.h"

#define SY_SHARD_HEADER_BYTES (SY_SHARD_HEADER_INTS * 4)
#define SY_DATA_PERM_TAG "data.perm"   /* fisher-yates */
#define SY_DATA_ORDER_TAG "data.order" /* feistel */
#define SY_DATA_PERM_SLOTS 2 /* a batch can straddle one epoch boundary */

#define SY_DATA_READ_CHUNK (1u << 20) /* validation reads of fd shards */

/* ------------------------------------------------------------------------------------------ */
/* Shard mapping and validation                                                                */

/* A shard is in memory (heap: s3:// objects with data.stream=false, and `data prepare`'s
 * inputs), read with pread from an open descriptor (local training and eval shards), or remote
 * (streamed s3:// objects, read by ranged GETs checked against the pin taken at open). Local
 * shards are not memory-mapped: a file truncated under a mapping kills the process with SIGBUS
 * on the next read of a lost page; pread returns a short count instead, which is an error naming
 * the file. Before every read of a local shard its identity (inode, size, mtime) is checked
 * against the file opened, so a truncated, rewritten or replaced shard stops training with a
 * clear error instead of feeding it other tokens. */
typedef struct {
    char *path;
    int remote;           /* an s3:// object read by ranges (streaming) */
    sy_store_t *store;    /* remote: its bucket's store (owned by sy_data's stores) */
    const char *key;      /* remote: the object key (points into path) */
    sy_store_obj pin;     /* remote: size and ETag when opened */
    void *map;            /* heap shards: the whole file (malloc'ed); NULL for fd shards */
    int heap;             /* in memory */
    size_t map_len;       /* file size in bytes */
    const uint16_t *tok;  /* heap shards: map + header; NULL for fd shards */
    uint64_t count;
    int fd;               /* fd shards: the open file (-1 otherwise) */
    dev_t dev;            /* fd shards: identity when opened */
    ino_t ino;
    struct timespec mtime;
} sy_shard_t;

typedef struct {
    int valid;
    uint64_t seed;
    uint64_t epoch;
    uint64_t last_use;
    void *perm; /* uint32_t[N] when N <= UINT32_MAX, else uint64_t[N]; allocated at open */
} sy_perm_slot_t;

struct sy_data {
    int n_shards;
    sy_shard_t *shards;
    uint64_t *win_start; /* [n_shards + 1]: prefix sums of windows per shard */
    uint64_t n_windows;
    int seq_len;
    int vocab_size;
    int perm_wide; /* perm entries are uint64_t */
    uint64_t use_clock;
    pthread_mutex_t perm_lock; /* the slots: the trainer's and the prefetcher's threads */
    sy_perm_slot_t slots[SY_DATA_PERM_SLOTS];
    sy_data_options opts;
    sy_data_s3_stores_t *stores;
    sy_data_cache_t *cache;      /* NULL: no data.cache_dir */
    sy_crew_t *crew;
    sy_prefetch_t *prefetch;     /* NULL: prefetch_steps 0 */
    /* counters (sy_data_stats) */
    _Atomic uint64_t header_bytes, fetched_bytes, requests, used_bytes;
};

static void sy_shard_unmap(sy_shard_t *sh) {
    if (sh->heap) free(sh->map);
    if (sh->fd >= 0) close(sh->fd);
    free(sh->path);
    memset(sh, 0, sizeof *sh);
    sh->fd = -1;
}

/* First token >= vocab_size in tok[0..n), or n. */
static int64_t sy_first_bad_token(const uint16_t *tok, int64_t n, int vocab_size) {
    int64_t bad = n;
    uint16_t vmax = vocab_size >= 65536 ? 0 : (uint16_t)vocab_size;
    if (vmax != 0) {
#pragma omp parallel for reduction(min : bad) schedule(static) if (n > (1 << 20))
        for (int64_t i = 0; i < n; i++)
            if (tok[i] >= vmax && i < bad) bad = i;
    }
    return bad;
}

/* Checks the header (sh->map_len is the file size) and sets sh->count. */
static sy_status sy_shard_check_header(const char *path, const int32_t *hdr, sy_shard_t *sh) {
    if (hdr[0] != SY_SHARD_MAGIC)
        return sy_err_set(SY_EFORMAT, "%s: bad magic %" PRId32 " (expected %d, an llm.c shard)", path, hdr[0],
                          SY_SHARD_MAGIC);
    if (hdr[1] != SY_SHARD_VERSION)
        return sy_err_set(SY_EFORMAT, "%s: unsupported version %" PRId32 " (expected %d)", path, hdr[1],
                          SY_SHARD_VERSION);
    if (hdr[2] < 0) return sy_err_set(SY_EFORMAT, "%s: negative token count %" PRId32, path, hdr[2]);
    sh->count = (uint64_t)hdr[2];
    uint64_t want = SY_SHARD_HEADER_BYTES + 2 * sh->count;
    if ((uint64_t)sh->map_len != want)
        return sy_err_set(SY_ECORRUPT,
                          "%s: size mismatch: header says %" PRIu64 " tokens (%" PRIu64
                          " bytes) but the file has %zu bytes",
                          path, sh->count, want, sh->map_len);
    return SY_OK;
}

/* Checks header, size and every token < vocab of the shard bytes in sh->map / sh->map_len. */
static sy_status sy_shard_check(const char *path, int vocab_size, sy_shard_t *sh) {
    if (sh->map_len < SY_SHARD_HEADER_BYTES)
        return sy_err_set(SY_EFORMAT, "%s: file has %zu bytes, shorter than the %d-byte header", path,
                          sh->map_len, SY_SHARD_HEADER_BYTES);
    SY_CHECK(sy_shard_check_header(path, (const int32_t *)sh->map, sh));
    sh->tok = (const uint16_t *)((const char *)sh->map + SY_SHARD_HEADER_BYTES);
    /* First offending token, if any (min index over a parallel scan). */
    const uint16_t *tok = sh->tok;
    int64_t n = (int64_t)sh->count, bad = sy_first_bad_token(tok, n, vocab_size);
    if (bad < n)
        return sy_err_set(SY_EFORMAT, "%s: token %u at index %" PRId64 " >= vocab_size %d", path,
                          (unsigned)tok[bad], bad, vocab_size);
    sh->path = strdup(path);
    if (!sh->path) return sy_err_set(SY_ENOMEM, "%s: out of memory", path);
    return SY_OK;
}

/* pread of exactly len bytes at off; SY_EIO naming the file on a short read (truncation). */
static sy_status sy_pread_all(int fd, void *buf, size_t len, off_t off, const char *path) {
    size_t got = 0;
    while (got < len) {
        ssize_t k = pread(fd, (char *)buf + got, len - got, off + (off_t)got);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return sy_err_set(SY_EIO, "%s: read at byte %lld: %s", path, (long long)(off + (off_t)got), strerror(errno));
        if (k == 0)
            return sy_err_set(SY_EIO, "%s: only %zu of %zu bytes at byte %lld: the file is shorter than when it was "
                              "opened (truncated while in use?)", path, got, len, (long long)off);
        got += (size_t)k;
    }
    return SY_OK;
}

/* Opens `path` (or reads an s3:// object into memory) and checks it: header, size, every token
 * < vocab. `whole`: keep the whole file in memory (sh->tok valid); else keep the descriptor
 * and read windows with pread (sy_shard_read). On success fills *sh (takes a copy of the path). */
/* Streaming open of an s3:// shard: its header only, by one ranged GET that pins the object. */
static sy_status sy_shard_open_remote(const char *path, sy_data_s3_stores_t *stores, sy_shard_t *sh,
                                      _Atomic uint64_t *header_bytes) {
    sy_store_t *store = NULL;
    const char *key = NULL;
    int32_t hdr[SY_SHARD_HEADER_INTS];
    SY_CHECK(sy_data_s3_stores_get(stores, path, &store, &key));
    SY_CHECK(sy_data_s3_read_head(store, path, key, hdr, sizeof hdr, &sh->pin));
    *header_bytes += sizeof hdr;
    sh->map_len = (size_t)sh->pin.size;
    SY_CHECK(sy_shard_check_header(path, hdr, sh));
    if (!(sh->path = strdup(path))) return sy_err_set(SY_ENOMEM, "%s: out of memory", path);
    sh->remote = 1;
    sh->store = store;
    sh->key = sh->path + (key - path);
    return SY_OK;
}

/* How sy_shard_map opens a local shard. */
enum {
    SY_SHARD_LAZY = 0,  /* descriptor kept; header and size checked (tokens: as windows are read) */
    SY_SHARD_SCAN = 1,  /* descriptor kept; header, size and every token checked now */
    SY_SHARD_WHOLE = 2, /* the whole file read into memory and checked (sh->tok valid) */
};

static sy_status sy_shard_map(const char *path, int vocab_size, sy_shard_t *sh, int mode) {
    const int whole = mode == SY_SHARD_WHOLE;
    sy_status st = SY_OK;
    memset(sh, 0, sizeof *sh);
    sh->fd = -1;
    if (sy_data_is_s3(path)) {
        SY_CHECK(sy_data_s3_fetch(path, &sh->map, &sh->map_len));
        sh->heap = 1;
        st = sy_shard_check(path, vocab_size, sh);
        if (st != SY_OK) sy_shard_unmap(sh);
        return st;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return sy_err_set(errno == ENOENT ? SY_ENOTFOUND : SY_EIO, "%s: cannot open: %s", path,
                          strerror(errno));
    }
    uint16_t *chunk = NULL;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = sy_err_set(SY_EIO, "%s: fstat: %s", path, strerror(errno));
        goto done;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = sy_err_set(SY_EFORMAT, "%s: not a regular file", path);
        goto done;
    }
    if (sb.st_size < SY_SHARD_HEADER_BYTES) {
        st = sy_err_set(SY_EFORMAT, "%s: file has %lld bytes, shorter than the %d-byte header",
                        path, (long long)sb.st_size, SY_SHARD_HEADER_BYTES);
        goto done;
    }
    sh->map_len = (size_t)sb.st_size;
    if (whole) {
        if (!(sh->map = malloc(sh->map_len))) {
            st = sy_err_set(SY_ENOMEM, "%s: out of memory for %zu bytes", path, sh->map_len);
            goto done;
        }
        sh->heap = 1;
        SY_CHECK_GOTO(sy_pread_all(fd, sh->map, sh->map_len, 0, path), st, done);
        st = sy_shard_check(path, vocab_size, sh);
        goto done;
    }
    int32_t hdr[SY_SHARD_HEADER_INTS];
    SY_CHECK_GOTO(sy_pread_all(fd, hdr, sizeof hdr, 0, path), st, done);
    SY_CHECK_GOTO(sy_shard_check_header(path, hdr, sh), st, done);
    /* every token < vocab, a chunk at a time (training reads check each window as it comes) */
    const size_t per = SY_DATA_READ_CHUNK / sizeof(uint16_t);
    if (mode == SY_SHARD_SCAN && !(chunk = malloc(SY_DATA_READ_CHUNK))) {
        st = sy_err_set(SY_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    for (uint64_t i = 0; mode == SY_SHARD_SCAN && i < sh->count; i += per) {
        size_t k = sh->count - i < per ? (size_t)(sh->count - i) : per;
        SY_CHECK_GOTO(sy_pread_all(fd, chunk, k * sizeof(uint16_t), SY_SHARD_HEADER_BYTES + (off_t)(i * 2), path), st,
                      done);
        int64_t bad = sy_first_bad_token(chunk, (int64_t)k, vocab_size);
        if (bad < (int64_t)k) {
            st = sy_err_set(SY_EFORMAT, "%s: token %u at index %" PRIu64 " >= vocab_size %d", path,
                            (unsigned)chunk[bad], i + (uint64_t)bad, vocab_size);
            goto done;
        }
    }
    if (!(sh->path = strdup(path))) {
        st = sy_err_set(SY_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    sh->dev = sb.st_dev;
    sh->ino = sb.st_ino;
    sh->mtime = sb.st_mtim;
    sh->fd = fd;
    fd = -1;
done:
    free(chunk);
    if (fd >= 0) close(fd);
    if (st != SY_OK) sy_shard_unmap(sh);
    return st;
}

/* The file is still the one opened: same inode at the path, same size and mtime. */
static sy_status sy_shard_same(const sy_shard_t *sh) {
    struct stat now, at;
    if (fstat(sh->fd, &now) != 0) return sy_err_set(SY_EIO, "%s: fstat: %s", sh->path, strerror(errno));
    if ((uint64_t)now.st_size != (uint64_t)sh->map_len || now.st_mtim.tv_sec != sh->mtime.tv_sec ||
        now.st_mtim.tv_nsec != sh->mtime.tv_nsec)
        return sy_err_set(SY_EIO, "%s changed while in use: %lld bytes now, %zu when opened%s; stopping instead of "
                          "reading other tokens (restore the shard, then resume)", sh->path, (long long)now.st_size,
                          sh->map_len, (uint64_t)now.st_size < sh->map_len ? " (truncated)" : " (rewritten)");
    int gone = stat(sh->path, &at) != 0;
    if (gone || at.st_dev != sh->dev || at.st_ino != sh->ino)
        return sy_err_set(SY_EIO, "%s was %s while in use; stopping instead of reading another file (restore the "
                          "shard, then resume)", sh->path, gone ? "removed" : "replaced");
    return SY_OK;
}

static int sy_has_glob_chars(const char *s) { return strpbrk(s, "*?[") != NULL; }

/* Appends the paths `pattern` names to *paths (growing it). */
/* Appends a copy of `path` to *paths (growing it). */
static sy_status sy_push_path(const char *pattern, const char *path, char ***paths, int *n, int *cap) {
    if (*n == *cap) {
        int nc = *cap ? *cap * 2 : 16;
        char **np = realloc(*paths, (size_t)nc * sizeof *np);
        if (!np) return sy_err_set(SY_ENOMEM, "%s: out of memory", pattern);
        *paths = np;
        *cap = nc;
    }
    if (!((*paths)[*n] = strdup(path))) return sy_err_set(SY_ENOMEM, "%s: out of memory", pattern);
    (*n)++;
    return SY_OK;
}

static sy_status sy_expand_pattern(const char *pattern, char ***paths, int *n, int *cap) {
    glob_t g;
    memset(&g, 0, sizeof g);
    sy_status st = SY_OK;
    if (sy_data_is_s3(pattern)) {
        char **urls = NULL;
        size_t nu = 0;
        SY_CHECK(sy_data_s3_expand(pattern, &urls, &nu));
        for (size_t i = 0; i < nu && st == SY_OK; i++) st = sy_push_path(pattern, urls[i], paths, n, cap);
        sy_store_keys_free(urls, nu);
        return st;
    }
    if (!sy_has_glob_chars(pattern)) {
        struct stat sb;
        if (stat(pattern, &sb) != 0)
            return sy_err_set(SY_ENOTFOUND, "%s: data shard not found: %s", pattern,
                              strerror(errno));
    }
    int rc = glob(pattern, GLOB_ERR, NULL, &g); /* matches come sorted */
    if (rc == GLOB_NOMATCH) {
        st = sy_err_set(SY_ENOTFOUND, "%s: pattern matches no file", pattern);
        goto done;
    }
    if (rc == GLOB_ABORTED) { /* GLOB_ERR: a folder of the pattern is missing or unreadable */
        st = sy_err_set(SY_ENOTFOUND, "%s: pattern matches no file (a folder in it does not exist "
                        "or cannot be read)", pattern);
        goto done;
    }
    if (rc != 0) {
        st = sy_err_set(rc == GLOB_NOSPACE ? SY_ENOMEM : SY_EIO, "%s: glob failed (%s)", pattern,
                        rc == GLOB_NOSPACE ? "out of memory" : "read error");
        goto done;
    }
    for (size_t i = 0; i < g.gl_pathc && st == SY_OK; i++) st = sy_push_path(pattern, g.gl_pathv[i], paths, n, cap);
done:
    globfree(&g);
    return st;
}

void sy_data_options_default(sy_data_options *o) {
    memset(o, 0, sizeof *o);
    o->stream = 1;
    o->prefetch_steps = SY_DATA_DEFAULT_PREFETCH;
    o->fetch_threads = SY_DATA_DEFAULT_FETCH_THREADS;
    o->cache_dir = NULL;
    o->cache_bytes = 0;
}

void sy_data_options_from_config(const sy_config_t *cfg, sy_data_options *o) {
    sy_data_options_default(o);
    o->stream = cfg->data.stream;
    o->prefetch_steps = cfg->data.prefetch_steps;
    o->fetch_threads = cfg->data.fetch_threads;
    o->cache_dir = cfg->data.cache_dir && cfg->data.cache_dir[0] ? cfg->data.cache_dir : NULL;
    o->cache_bytes = (uint64_t)(cfg->data.cache_gb * (double)(1ull << 30)); /* GiB */
    o->order = cfg->data.order;
}

sy_status sy_data_open(const char *const *patterns, int n_patterns, int vocab_size, int seq_len,
                       sy_data_t **out) {
    sy_data_options o;
    sy_data_options_default(&o);
    o.prefetch_steps = 0; /* no plan without a trainer: reads on the caller's thread */
    return sy_data_open_with(patterns, n_patterns, vocab_size, seq_len, &o, out);
}

/* The remote shards' headers, read in parallel on the crew. */
typedef struct {
    sy_data_t *d;
    char **paths;
    sy_status *st;
    char (*msg)[512];
} open_job;

static void open_remote_one(void *arg, size_t i) {
    open_job *j = arg;
    sy_shard_t *sh = &j->d->shards[i];
    if (!sh->remote) return; /* opened before the crew ran, or not remote */
    memset(sh, 0, sizeof *sh);
    sh->fd = -1;
    j->st[i] = sy_shard_open_remote(j->paths[i], j->d->stores, sh, &j->d->header_bytes);
    if (j->st[i] != SY_OK) snprintf(j->msg[i], sizeof j->msg[i], "%s", sy_err_msg());
}

/* Opens every shard: local ones (and whole s3:// ones) in order on this thread, streaming s3://
 * ones by their headers on the crew. On failure the message of the first shard that failed. */
static sy_status open_shards(sy_data_t *d, char **paths, int n_paths) {
    sy_status st = SY_OK;
    sy_status *sts = calloc((size_t)n_paths, sizeof *sts);
    char (*msg)[512] = calloc((size_t)n_paths, sizeof *msg);
    if (!sts || !msg) {
        st = sy_err_set(SY_ENOMEM, "data: out of memory for %d shards", n_paths);
        goto done;
    }
    for (int i = 0; i < n_paths; i++) {
        sy_shard_t *sh = &d->shards[i];
        if (d->opts.stream && sy_data_is_s3(paths[i])) {
            sy_store_t *store;
            const char *key;
            SY_CHECK_GOTO(sy_data_s3_stores_get(d->stores, paths[i], &store, &key), st, done);
            sh->remote = 1; /* opened below */
            sh->fd = -1;
        } else {
            SY_CHECK_GOTO(sy_shard_map(paths[i], d->vocab_size, sh, SY_SHARD_LAZY), st, done);
        }
        d->n_shards = i + 1;
    }
    open_job j = {d, paths, sts, msg};
    sy_crew_run(d->crew, open_remote_one, &j, (size_t)n_paths);
    for (int i = 0; i < n_paths; i++)
        if (sts[i] != SY_OK) {
            st = sy_err_set(sts[i], "%s", msg[i]);
            break;
        }
done:
    free(sts);
    free(msg);
    return st;
}

sy_status sy_data_open_with(const char *const *patterns, int n_patterns, int vocab_size, int seq_len,
                            const sy_data_options *opts, sy_data_t **out) {
    sy_status st = SY_OK;
    char **paths = NULL;
    int n_paths = 0, cap = 0;
    sy_data_t *d = NULL;
    if (!out || !opts) return sy_err_set(SY_EINVAL, "sy_data_open: NULL argument");
    *out = NULL;
    if (!patterns || n_patterns <= 0)
        return sy_err_set(SY_EINVAL, "data: no shard patterns given");
    if (vocab_size < 1 || vocab_size > 65536)
        return sy_err_set(SY_EINVAL, "data: vocab_size %d outside [1, 65536]", vocab_size);
    if (seq_len < 1) return sy_err_set(SY_EINVAL, "data: seq_len %d < 1", seq_len);
    if (opts->prefetch_steps < 0 || opts->fetch_threads < 1)
        return sy_err_set(SY_EINVAL, "data: prefetch_steps %d < 0 or fetch_threads %d < 1", opts->prefetch_steps,
                          opts->fetch_threads);

    for (int i = 0; i < n_patterns; i++) {
        if (!patterns[i] || !patterns[i][0]) {
            st = sy_err_set(SY_EINVAL, "data: shard pattern %d is empty", i);
            goto fail;
        }
        SY_CHECK_GOTO(sy_expand_pattern(patterns[i], &paths, &n_paths, &cap), st, fail);
    }
    d = calloc(1, sizeof *d);
    if (!d) {
        st = sy_err_set(SY_ENOMEM, "data: out of memory");
        goto fail;
    }
    pthread_mutex_init(&d->perm_lock, NULL);
    d->opts = *opts;
    d->opts.cache_dir = NULL; /* not kept: the cache holds its own copy */
    d->seq_len = seq_len;
    d->vocab_size = vocab_size;
    d->shards = calloc((size_t)n_paths, sizeof *d->shards);
    d->win_start = calloc((size_t)n_paths + 1, sizeof *d->win_start);
    if (!d->shards || !d->win_start) {
        st = sy_err_set(SY_ENOMEM, "data: out of memory for %d shards", n_paths);
        goto fail;
    }
    SY_CHECK_GOTO(sy_data_s3_stores_new(&d->stores), st, fail);
    SY_CHECK_GOTO(sy_crew_new(opts->fetch_threads, &d->crew), st, fail);
    int any_remote = 0;
    for (int i = 0; i < n_paths; i++) any_remote |= opts->stream && sy_data_is_s3(paths[i]);
    if (any_remote && opts->cache_dir)
        SY_CHECK_GOTO(sy_data_cache_open(opts->cache_dir, opts->cache_bytes, &d->cache), st, fail);
    SY_CHECK_GOTO(open_shards(d, paths, n_paths), st, fail);
    uint64_t longest = 0;
    for (int i = 0; i < n_paths; i++) {
        uint64_t c = d->shards[i].count, T = (uint64_t)seq_len;
        uint64_t w = c >= T + 1 ? (c - 1) / T : 0;
        d->win_start[i + 1] = d->win_start[i] + w;
        if (c > longest) longest = c;
    }
    d->n_windows = d->win_start[n_paths];
    if (d->n_windows == 0) {
        st = sy_err_set(SY_EINVAL,
                        "data: %d shard(s) (first %s) hold no window of seq_len+1 = %d tokens "
                        "(longest has %" PRIu64 " tokens)",
                        n_paths, paths[0], seq_len + 1, longest);
        goto fail;
    }
    d->perm_wide = d->n_windows > UINT32_MAX;
    size_t esz = d->perm_wide ? sizeof(uint64_t) : sizeof(uint32_t);
    if (d->n_windows > SIZE_MAX / esz) {
        st = sy_err_set(SY_ENOMEM, "data: %" PRIu64 " windows is too many", d->n_windows);
        goto fail;
    }
    for (int s = 0; s < SY_DATA_PERM_SLOTS && opts->order == SY_ORDER_FISHER_YATES; s++) {
        d->slots[s].perm = malloc((size_t)d->n_windows * esz);
        if (!d->slots[s].perm) {
            st = sy_err_set(SY_ENOMEM, "data: out of memory for a permutation of %" PRIu64
                            " windows", d->n_windows);
            goto fail;
        }
    }
    if (opts->prefetch_steps > 0) SY_CHECK_GOTO(sy_prefetch_new(d, opts->prefetch_steps, &d->prefetch), st, fail);
    *out = d;
    d = NULL;
fail:
    sy_data_destroy(&d);
    for (int i = 0; i < n_paths; i++) free(paths[i]);
    free(paths);
    return st;
}

sy_status sy_data_check_patterns(const char *const *patterns, int n_patterns) {
    char **paths = NULL;
    int n_paths = 0, cap = 0;
    sy_status st = SY_OK;
    if (!patterns || n_patterns <= 0) return sy_err_set(SY_EINVAL, "data: no shard patterns given");
    for (int i = 0; i < n_patterns && st == SY_OK; i++) {
        if (!patterns[i] || !patterns[i][0]) st = sy_err_set(SY_EINVAL, "data: shard pattern %d is empty", i);
        else st = sy_expand_pattern(patterns[i], &paths, &n_paths, &cap);
    }
    for (int i = 0; i < n_paths; i++) free(paths[i]);
    free(paths);
    return st;
}

void sy_data_get_stats(sy_data_t *d, sy_data_stats *out) {
    memset(out, 0, sizeof *out);
    out->header_bytes = d->header_bytes;
    out->fetched_bytes = d->fetched_bytes;
    out->requests = d->requests;
    out->used_bytes = d->used_bytes;
    if (d->cache) {
        sy_data_cache_stats cs;
        sy_data_cache_get_stats(d->cache, &cs);
        out->cache_hits = cs.hits;
        out->cache_misses = cs.misses;
        out->cache_bytes_read = cs.bytes_read;
        out->cache_bytes_written = cs.bytes_written;
        out->cache_rejected = cs.rejected;
        out->cache_evicted = cs.evicted;
    }
    if (d->prefetch) sy_prefetch_counts(d->prefetch, &out->prefetched, &out->prefetch_waits);
}

void sy_data_destroy(sy_data_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_data_t *d = *self_p;
    uint64_t served = 0, waited = 0;
    if (d->prefetch) sy_prefetch_counts(d->prefetch, &served, &waited);
    sy_prefetch_destroy(&d->prefetch); /* first: its thread reads the shards */
    if (d->header_bytes) {
        sy_data_stats s;
        sy_data_get_stats(d, &s);
        s.prefetched = served;
        s.prefetch_waits = waited;
        sy_info("data: fetched %" PRIu64 " bytes in %" PRIu64 " range reads (+%" PRIu64 " header bytes) for %" PRIu64
                " bytes of windows; cache: %" PRIu64 " hits, %" PRIu64 " misses, %" PRIu64 " rejected; prefetch: %"
                PRIu64 " micro-batches, %" PRIu64 " waited",
                s.fetched_bytes, s.requests, s.header_bytes, s.used_bytes, s.cache_hits, s.cache_misses,
                s.cache_rejected, s.prefetched, s.prefetch_waits);
    }
    sy_crew_destroy(&d->crew);
    for (int i = 0; i < d->n_shards; i++) sy_shard_unmap(&d->shards[i]);
    for (int s = 0; s < SY_DATA_PERM_SLOTS; s++) free(d->slots[s].perm);
    sy_data_cache_destroy(&d->cache);
    sy_data_s3_stores_destroy(&d->stores);
    pthread_mutex_destroy(&d->perm_lock);
    free(d->shards);
    free(d->win_start);
    free(d);
    *self_p = NULL;
}

uint64_t sy_data_windows(const sy_data_t *d) { return d->n_windows; }
int sy_data_shards(const sy_data_t *d) { return d->n_shards; }
int sy_data_seq_len(const sy_data_t *d) { return d->seq_len; }

const char *sy_data_shard_path(const sy_data_t *d, int i) {
    if (i < 0 || i >= d->n_shards) return NULL;
    return d->shards[i].path;
}

/* ------------------------------------------------------------------------------------------ */
/* Sample order                                                                                */

uint64_t sy_data_sample_index(int64_t step, int M, int b, int m, int j) {
    return (uint64_t)step * (uint64_t)M * (uint64_t)b + (uint64_t)m * (uint64_t)b + (uint64_t)j;
}

/* The slot holding the permutation of (seed, epoch), computing it into the least recently used
 * slot if neither holds it. */
static const sy_perm_slot_t *sy_data_perm(sy_data_t *d, uint64_t seed, uint64_t epoch) {
    sy_perm_slot_t *victim = NULL;
    for (int s = 0; s < SY_DATA_PERM_SLOTS; s++) {
        sy_perm_slot_t *sl = &d->slots[s];
        if (sl->valid && sl->seed == seed && sl->epoch == epoch) {
            sl->last_use = ++d->use_clock;
            return sl;
        }
        /* an empty slot has last_use 0, so it is taken first */
        if (!victim || sl->last_use < victim->last_use) victim = sl;
    }
    /* PINNED (data.h): Fisher–Yates from the top with sy_rng_below. */
    uint64_t N = d->n_windows;
    sy_rng_t r = sy_rng_key(seed, SY_DATA_PERM_TAG, epoch, 0, 0);
    if (d->perm_wide) {
        uint64_t *p = victim->perm;
        for (uint64_t i = 0; i < N; i++) p[i] = i;
        for (uint64_t i = N - 1; i >= 1; i--) {
            uint64_t k = sy_rng_below(&r, i + 1), t = p[i];
            p[i] = p[k];
            p[k] = t;
        }
    } else {
        uint32_t *p = victim->perm;
        for (uint64_t i = 0; i < N; i++) p[i] = (uint32_t)i;
        for (uint64_t i = N - 1; i >= 1; i--) {
            uint64_t k = sy_rng_below(&r, i + 1);
            uint32_t t = p[i];
            p[i] = p[k];
            p[k] = t;
        }
    }
    victim->valid = 1;
    victim->seed = seed;
    victim->epoch = epoch;
    victim->last_use = ++d->use_clock;
    return victim;
}

/* PINNED (data.h): the keyed Feistel permutation of [0, N) for (seed, epoch). */
void sy_data_feistel_key(sy_feistel_t *f, uint64_t N, uint64_t seed, uint64_t epoch) {
    int h = 1;
    while (h < 32 && (UINT64_C(1) << (2 * h)) < N) h++; /* the smallest 4^h >= N */
    f->N = N;
    f->half = h;
    sy_rng_t r = sy_rng_key(seed, SY_DATA_ORDER_TAG, epoch, 0, 0);
    for (int j = 0; j < SY_FEISTEL_ROUNDS; j++) f->key[j] = sy_rng_next(&r);
}

static uint64_t sy_feistel_rounds(const sy_feistel_t *f, uint64_t x) {
    const int h = f->half;
    const uint64_t mask = (UINT64_C(1) << h) - 1;
    uint64_t L = x >> h, R = x & mask;
    for (int j = 0; j < SY_FEISTEL_ROUNDS; j++) {
        uint64_t t = L ^ (sy_mix64(R ^ f->key[j]) & mask);
        L = R;
        R = t;
    }
    return (L << h) | R;
}

uint64_t sy_data_feistel(const sy_feistel_t *f, uint64_t i) {
    uint64_t x = sy_feistel_rounds(f, i);
    while (x >= f->N) x = sy_feistel_rounds(f, x); /* cycle walking: stays a bijection of [0, N) */
    return x;
}

uint64_t sy_data_window_of(sy_data_t *d, uint64_t seed, uint64_t idx) {
    uint64_t N = d->n_windows;
    if (d->opts.order == SY_ORDER_FEISTEL) {
        sy_feistel_t f;
        sy_data_feistel_key(&f, N, seed, idx / N);
        return sy_data_feistel(&f, idx % N);
    }
    pthread_mutex_lock(&d->perm_lock);
    const sy_perm_slot_t *sl = sy_data_perm(d, seed, idx / N);
    uint64_t i = idx % N;
    uint64_t w = d->perm_wide ? ((const uint64_t *)sl->perm)[i] : ((const uint32_t *)sl->perm)[i];
    pthread_mutex_unlock(&d->perm_lock);
    return w;
}

/* ------------------------------------------------------------------------------------------ */
/* Reading windows                                                                             */

/* The shard holding window w, and the index of its first token in that shard. */
static int sy_data_shard_of(const sy_data_t *d, uint64_t w, uint64_t *first) {
    int lo = 0, hi = d->n_shards - 1; /* the shard s with win_start[s] <= w < win_start[s+1] */
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if (d->win_start[mid] <= w)
            lo = mid;
        else
            hi = mid - 1;
    }
    while (d->win_start[lo + 1] <= w) lo++; /* skip shards with no windows */
    *first = (w - d->win_start[lo]) * (uint64_t)d->seq_len;
    return lo;
}

/* A window still to read: its shard, first token and row in the output. */
typedef struct {
    int shard;
    uint64_t first;
    size_t row;
} win_ref;

/* One read: tokens [first, end) of a shard, serving refs [a, b). */
typedef struct {
    int shard;
    uint64_t first, end;
    size_t a, b;
    sy_status st;
    char msg[512];
} range_t;

typedef struct {
    sy_data_t *d;
    const win_ref *refs;
    range_t *ranges;
    uint16_t *out;
} read_job;

static int ref_order(const void *x, const void *y) {
    const win_ref *a = x, *b = y;
    if (a->shard != b->shard) return a->shard < b->shard ? -1 : 1;
    if (a->first != b->first) return a->first < b->first ? -1 : 1;
    return a->row < b->row ? -1 : a->row > b->row;
}

/* Checks a window's tokens; the message names the shard. A shard's tokens are checked as its
 * windows are read, local or remote (open checks header and size only), so a bad token is
 * SY_EFORMAT here; a local file changed since open was caught before the read (sy_shard_same). */
static sy_status sy_window_check(const sy_data_t *d, const sy_shard_t *sh, const uint16_t *tok, uint64_t first) {
    int64_t bad = sy_first_bad_token(tok, d->seq_len + 1, d->vocab_size);
    if (bad > d->seq_len) return SY_OK;
    return sy_err_set(SY_EFORMAT, "%s: token %u at index %" PRIu64 " >= vocab_size %d (check the shards with "
                      "`switchyard data check`)", sh->path, (unsigned)tok[bad], first + (uint64_t)bad, d->vocab_size);
}

static sy_status read_range(sy_data_t *d, range_t *r, const win_ref *refs, uint16_t *out) {
    sy_shard_t *sh = &d->shards[r->shard];
    size_t row = (size_t)d->seq_len + 1, bytes = (size_t)(r->end - r->first) * sizeof(uint16_t);
    uint64_t off = SY_SHARD_HEADER_BYTES + r->first * sizeof(uint16_t);
    uint16_t *buf = malloc(bytes);
    if (!buf) return sy_err_set(SY_ENOMEM, "%s: out of memory for %zu bytes", sh->path, bytes);
    sy_status st = SY_OK;
    if (sh->remote) {
        st = sy_data_s3_read_pinned(sh->store, sh->path, sh->key, &sh->pin, off, bytes, buf);
        if (st == SY_OK) {
            d->fetched_bytes += bytes;
            d->requests++;
        }
    } else {
        st = sy_shard_same(sh);
        if (st == SY_OK) st = sy_pread_all(sh->fd, buf, bytes, (off_t)off, sh->path);
    }
    for (size_t k = r->a; k < r->b && st == SY_OK; k++) {
        const uint16_t *src = buf + (refs[k].first - r->first);
        st = sy_window_check(d, sh, src, refs[k].first);
        if (st != SY_OK) break;
        memcpy(out + refs[k].row * row, src, row * sizeof *src);
        if (sh->remote && d->cache && sh->pin.etag[0] && (k == r->a || refs[k].first != refs[k - 1].first))
            sy_data_cache_put(d->cache, sh->path, sh->pin.etag, SY_SHARD_HEADER_BYTES + refs[k].first * 2,
                              row * sizeof *src, src);
    }
    free(buf);
    return st;
}

static void read_range_job(void *arg, size_t i) {
    read_job *j = arg;
    range_t *r = &j->ranges[i];
    r->st = read_range(j->d, r, j->refs, j->out);
    if (r->st != SY_OK) snprintf(r->msg, sizeof r->msg, "%s", sy_err_msg());
}

sy_status sy_data_read_windows(sy_data_t *d, const uint64_t *wins, size_t n, uint16_t *out) {
    size_t row = (size_t)d->seq_len + 1, n_refs = 0, n_ranges = 0;
    sy_status st = SY_OK;
    if (n == 0) return SY_OK;
    win_ref *refs = malloc(n * sizeof *refs);
    range_t *ranges = malloc(n * sizeof *ranges);
    if (!refs || !ranges) {
        st = sy_err_set(SY_ENOMEM, "data: out of memory for %zu windows", n);
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t first;
        int s = sy_data_shard_of(d, wins[i], &first);
        const sy_shard_t *sh = &d->shards[s];
        uint16_t *dst = out + i * row;
        if (sh->tok) { /* in memory, checked at open */
            memcpy(dst, sh->tok + first, row * sizeof *dst);
            continue;
        }
        if (sh->remote && d->cache && sh->pin.etag[0] && /* no ETag, no key that tells versions apart */
            sy_data_cache_get(d->cache, sh->path, sh->pin.etag, SY_SHARD_HEADER_BYTES + first * 2,
                              row * sizeof *dst, dst)) {
            SY_CHECK_GOTO(sy_window_check(d, sh, dst, first), st, done);
            continue;
        }
        refs[n_refs++] = (win_ref){s, first, i};
    }
    /* Coalesce per shard: windows that overlap or touch (window k ends where k+1 starts) share
     * one read; a gap is never read. */
    qsort(refs, n_refs, sizeof *refs, ref_order);
    for (size_t k = 0; k < n_refs; k++) {
        range_t *r = n_ranges ? &ranges[n_ranges - 1] : NULL;
        if (r && r->shard == refs[k].shard && refs[k].first <= r->end) {
            if (refs[k].first + row > r->end) r->end = refs[k].first + row;
            r->b = k + 1;
        } else {
            ranges[n_ranges++] = (range_t){.shard = refs[k].shard, .first = refs[k].first,
                                           .end = refs[k].first + row, .a = k, .b = k + 1};
        }
    }
    read_job j = {d, refs, ranges, out};
    sy_crew_run(d->crew, read_range_job, &j, n_ranges);
    for (size_t k = 0; k < n_ranges; k++)
        if (ranges[k].st != SY_OK) {
            st = sy_err_set(ranges[k].st, "%s", ranges[k].msg);
            break;
        }
done:
    free(refs);
    free(ranges);
    return st;
}

/* Copies n windows (uint16, as read) into rows of int32 tokens. */
static void widen(const uint16_t *src, size_t count, int32_t *dst) {
    for (size_t i = 0; i < count; i++) dst[i] = src[i];
}

sy_status sy_data_plan(sy_data_t *d, uint64_t seed, int64_t step, int64_t end_step, int M, int b, int rank,
                       int world) {
    if (!d) return sy_err_set(SY_EINVAL, "sy_data_plan: NULL argument");
    if (step < 0 || M < 1 || b < 1 || world < 1 || rank < 0 || rank >= world)
        return sy_err_set(SY_EINVAL, "sy_data_plan: bad plan step=%" PRId64 " M=%d b=%d rank=%d world=%d", step, M,
                          b, rank, world);
    if (!d->prefetch) return SY_OK;
    sy_prefetch_plan_t pl = {.seed = seed, .end_step = end_step, .M = M, .b = b, .rank = rank, .world = world};
    sy_prefetch_plan(d->prefetch, &pl, step);
    return SY_OK;
}

sy_status sy_data_train_batch(sy_data_t *d, uint64_t seed, int64_t step, int M, int b, int m,
                              int32_t *tokens) {
    if (!d || !tokens) return sy_err_set(SY_EINVAL, "sy_data_train_batch: NULL argument");
    if (step < 0 || M < 1 || b < 1 || m < 0 || m >= M)
        return sy_err_set(SY_EINVAL,
                          "sy_data_train_batch: bad position step=%" PRId64 " M=%d b=%d m=%d",
                          step, M, b, m);
    size_t row = (size_t)d->seq_len + 1;
    sy_status st = SY_OK;
    if (!d->prefetch || !sy_prefetch_take(d->prefetch, seed, step, M, b, m, tokens, &st)) {
        uint64_t *wins = malloc((size_t)b * sizeof *wins);
        uint16_t *tok = malloc((size_t)b * row * sizeof *tok);
        if (!wins || !tok) {
            st = sy_err_set(SY_ENOMEM, "data: out of memory for a micro-batch");
        } else {
            for (int j = 0; j < b; j++) wins[j] = sy_data_window_of(d, seed, sy_data_sample_index(step, M, b, m, j));
            st = sy_data_read_windows(d, wins, (size_t)b, tok);
            if (st == SY_OK) widen(tok, (size_t)b * row, tokens);
        }
        free(wins);
        free(tok);
    }
    if (st == SY_OK) d->used_bytes += (uint64_t)b * row * sizeof(uint16_t);
    return st;
}

sy_status sy_data_eval_batch(sy_data_t *d, uint64_t first_window, int b, int32_t *tokens) {
    if (!d || !tokens) return sy_err_set(SY_EINVAL, "sy_data_eval_batch: NULL argument");
    if (b < 1) return sy_err_set(SY_EINVAL, "sy_data_eval_batch: b=%d < 1", b);
    size_t row = (size_t)d->seq_len + 1;
    uint64_t N = d->n_windows, w0 = first_window % N;
    uint64_t *wins = malloc((size_t)b * sizeof *wins);
    uint16_t *tok = malloc((size_t)b * row * sizeof *tok);
    sy_status st = SY_OK;
    if (!wins || !tok) {
        st = sy_err_set(SY_ENOMEM, "data: out of memory for an eval batch");
    } else {
        for (int j = 0; j < b; j++) wins[j] = (w0 + (uint64_t)j) % N;
        st = sy_data_read_windows(d, wins, (size_t)b, tok);
        if (st == SY_OK) {
            widen(tok, (size_t)b * row, tokens);
            d->used_bytes += (uint64_t)b * row * sizeof(uint16_t);
        }
    }
    free(wins);
    free(tok);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Writing                                                                                     */

sy_status sy_data_write_shard(const char *path, const uint16_t *tokens, uint64_t count) {
    if (!path || (!tokens && count > 0))
        return sy_err_set(SY_EINVAL, "sy_data_write_shard: NULL argument");
    if (count > INT32_MAX)
        return sy_err_set(SY_EINVAL, "%s: %" PRIu64 " tokens exceed a shard's int32 count",
                          path, count);
    int32_t hdr[SY_SHARD_HEADER_INTS] = {0};
    hdr[0] = SY_SHARD_MAGIC;
    hdr[1] = SY_SHARD_VERSION;
    hdr[2] = (int32_t)count;
    sy_fs_atomic w;
    sy_status st = sy_fs_atomic_open(&w, path, NULL, 0644, SY_FS_EXACT_MODE);
    if (st == SY_OK) st = sy_fs_atomic_write(&w, hdr, sizeof hdr);
    if (st == SY_OK) st = sy_fs_atomic_write(&w, tokens, (size_t)count * sizeof *tokens);
    if (st == SY_OK) st = sy_fs_atomic_commit(&w);
    sy_fs_atomic_close(&w);
    return st;
}

sy_status sy_data_shard_count(const char *path, int vocab_size, uint64_t *count) {
    if (!path || !count) return sy_err_set(SY_EINVAL, "sy_data_shard_count: NULL argument");
    sy_shard_t sh;
    SY_CHECK(sy_shard_map(path, vocab_size, &sh, SY_SHARD_SCAN));
    *count = sh.count;
    sy_shard_unmap(&sh);
    return SY_OK;
}

sy_status sy_data_validate(const char *const *patterns, int n_patterns, int vocab_size, int seq_len,
                           void (*each)(const char *path, uint64_t tokens, void *arg), void *arg,
                           sy_data_check_counts *counts) {
    if (!patterns || n_patterns <= 0 || !counts) return sy_err_set(SY_EINVAL, "data check: no shard patterns given");
    if (vocab_size < 1 || vocab_size > 65536)
        return sy_err_set(SY_EINVAL, "data: vocab_size %d outside [1, 65536]", vocab_size);
    if (seq_len < 1) return sy_err_set(SY_EINVAL, "data: seq_len %d < 1", seq_len);
    memset(counts, 0, sizeof *counts);
    char **paths = NULL;
    int n_paths = 0, cap = 0;
    sy_status st = SY_OK;
    for (int i = 0; i < n_patterns && st == SY_OK; i++) {
        if (!patterns[i] || !patterns[i][0]) st = sy_err_set(SY_EINVAL, "data: shard pattern %d is empty", i);
        else st = sy_expand_pattern(patterns[i], &paths, &n_paths, &cap);
    }
    for (int i = 0; i < n_paths && st == SY_OK; i++) {
        sy_shard_t sh;
        st = sy_shard_map(paths[i], vocab_size, &sh, sy_data_is_s3(paths[i]) ? SY_SHARD_WHOLE : SY_SHARD_SCAN);
        if (st != SY_OK) break;
        uint64_t c = sh.count, T = (uint64_t)seq_len;
        counts->shards++;
        counts->tokens += c;
        counts->windows += c >= T + 1 ? (c - 1) / T : 0;
        sy_shard_unmap(&sh);
        if (each) each(paths[i], c, arg);
    }
    for (int i = 0; i < n_paths; i++) free(paths[i]);
    free(paths);
    return st;
}

sy_status sy_data_read_shard(const char *path, int vocab_size, void **mem, const uint16_t **tokens,
                             uint64_t *count) {
    if (!path || !mem || !tokens || !count)
        return sy_err_set(SY_EINVAL, "sy_data_read_shard: NULL argument");
    sy_shard_t sh;
    SY_CHECK(sy_shard_map(path, vocab_size, &sh, SY_SHARD_WHOLE));
    *mem = sh.map; /* the caller owns it now */
    *tokens = sh.tok;
    *count = sh.count;
    sh.map = NULL;
    sh.heap = 0;
    sy_shard_unmap(&sh);
    return SY_OK;
}
