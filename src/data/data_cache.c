/* The on-disk range cache of remote shards. See data_cache.h. */
#include "data/data_cache.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/fsutil.h"
#include "base/log.h"

#define CACHE_SUBDIR "sy-data-v1"
#define CACHE_MAGIC 0x43445953u /* "SYDC" little-endian */
#define CACHE_VERSION 1u
#define CACHE_SPAN_SHIFT 24          /* entries grouped in folders per 16 MiB of an object */
#define CACHE_LOW_WATER 0.9          /* eviction deletes down to this fraction of the bound */
#define CACHE_TMP_STALE_S 3600       /* tmp files older than this are removed by eviction */
#define CACHE_TEST_CRASH_ENV "SY_DATA_CACHE_TEST_CRASH" /* tests: SIGKILL self mid-way through put N */

typedef struct {
    uint32_t magic;
    uint32_t version;
    uint64_t key;  /* hash of (url, etag, off, len) */
    uint64_t len;  /* payload bytes */
    uint64_t sum;  /* FNV-1a-64 of the payload */
} entry_header;    /* 32 bytes, host order (the cache is local to a host) */

struct sy_data_cache {
    char *root;    /* DIR/sy-data-v1 */
    char *tmpdir;  /* root/tmp */
    uint64_t max_bytes;
    pthread_mutex_t lock; /* counters, the estimate, eviction */
    uint64_t approx;      /* bytes of entry files, as of the last walk plus own puts */
    uint64_t tmp_counter;
    long crash_at;        /* test hook: 0 off */
    int warned;
    /* eviction runs on its own thread, so a walk of a big cache never delays a read */
    pthread_t evictor;
    int evictor_started;
    pthread_cond_t evict_cv;
    int evict_due, stopping;
    sy_data_cache_stats st;
};

static void put_failed(sy_data_cache_t *c, const char *what, const char *path, int e);
static void *evictor_main(void *arg);

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}
#define FNV_INIT 0xcbf29ce484222325ull

static uint64_t object_hash(const char *url, const char *etag) {
    uint64_t h = fnv1a(FNV_INIT, url, strlen(url) + 1);
    return fnv1a(h, etag, strlen(etag) + 1);
}

static uint64_t key_hash(uint64_t obj, uint64_t off, uint64_t len) {
    uint64_t h = fnv1a(FNV_INIT, &obj, sizeof obj);
    h = fnv1a(h, &off, sizeof off);
    return fnv1a(h, &len, sizeof len);
}

/* 0 when the paths do not fit (a cache_dir near PATH_MAX): no entry then. */
static int entry_path(const sy_data_cache_t *c, uint64_t obj, uint64_t off, size_t len, char *dir, size_t dcap,
                      char *path, size_t pcap) {
    int a = snprintf(dir, dcap, "%s/%016" PRIx64 "/%" PRIx64, c->root, obj, off >> CACHE_SPAN_SHIFT);
    if (a < 0 || (size_t)a >= dcap) return 0;
    int b = snprintf(path, pcap, "%s/%" PRIx64 ".%zx", dir, off, len);
    return b >= 0 && (size_t)b < pcap;
}

/* ---------------------------------------------------------------- walking the tree */

typedef struct {
    char *path;
    uint64_t bytes;
    struct timespec mtime;
} walk_entry;

typedef struct {
    walk_entry *v;
    size_t n, cap;
    uint64_t total;
    int oom;
    const char *tmpdir;
    size_t tmplen;
} walk_state;

static walk_state *g_walk; /* nftw has no user pointer; walks are serialised by walk_lock */
static pthread_mutex_t walk_lock = PTHREAD_MUTEX_INITIALIZER;

/* A tmp file "<pid>.<n>" whose writer is gone (or that is old) can go. */
static int tmp_is_stale(const char *name, const struct stat *sb) {
    long pid = strtol(name, NULL, 10);
    if (pid > 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 1;
    return time(NULL) - sb->st_mtime > CACHE_TMP_STALE_S;
}

/* Entries sit at depth 3 (object/span/entry), tmp files at depth 2; the rest (the eviction
 * lock) is no entry. */
static int walk_one(const char *path, const struct stat *sb, int type, struct FTW *ftw) {
    walk_state *w = g_walk;
    if (type != FTW_F) return 0;
    if (!strncmp(path, w->tmpdir, w->tmplen) && path[w->tmplen] == '/') {
        if (tmp_is_stale(path + w->tmplen + 1, sb)) (void)unlink(path);
        return 0;
    }
    if (ftw->level != 3) return 0;
    uint64_t bytes = (uint64_t)sb->st_size;
    w->total += bytes;
    if (w->oom) return 0;
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 1024;
        walk_entry *v = realloc(w->v, cap * sizeof *v);
        if (!v) {
            w->oom = 1;
            return 0;
        }
        w->v = v;
        w->cap = cap;
    }
    if (!(w->v[w->n].path = strdup(path))) {
        w->oom = 1;
        return 0;
    }
    w->v[w->n].bytes = bytes;
    w->v[w->n].mtime = sb->st_mtim;
    w->n++;
    return 0;
}

static int older_first(const void *a, const void *b) {
    const walk_entry *x = a, *y = b;
    if (x->mtime.tv_sec != y->mtime.tv_sec) return x->mtime.tv_sec < y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec) return x->mtime.tv_nsec < y->mtime.tv_nsec ? -1 : 1;
    return strcmp(x->path, y->path);
}

/* Walks the cache: removes stale tmp files, and when `target` > 0 deletes the least recently used
 * entries until the total is at most target. Returns the total left. */
static uint64_t walk_and_trim(sy_data_cache_t *c, uint64_t target, uint64_t *evicted) {
    walk_state w = {.tmpdir = c->tmpdir, .tmplen = strlen(c->tmpdir)};
    pthread_mutex_lock(&walk_lock);
    g_walk = &w;
    (void)nftw(c->root, walk_one, 16, FTW_PHYS);
    g_walk = NULL;
    pthread_mutex_unlock(&walk_lock);
    if (target > 0 && w.total > target && !w.oom) {
        qsort(w.v, w.n, sizeof *w.v, older_first);
        for (size_t i = 0; i < w.n && w.total > target; i++) {
            if (unlink(w.v[i].path) == 0 || errno == ENOENT) {
                w.total -= w.v[i].bytes;
                if (evicted) (*evicted)++;
            }
        }
    }
    for (size_t i = 0; i < w.n; i++) free(w.v[i].path);
    free(w.v);
    return w.total;
}

/* ---------------------------------------------------------------- open, destroy */

sy_status sy_data_cache_open(const char *dir, uint64_t max_bytes, sy_data_cache_t **out) {
    *out = NULL;
    if (!dir || !dir[0]) return sy_err_set(SY_EINVAL, "data cache: no folder given");
    sy_data_cache_t *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "data cache: out of memory");
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->evict_cv, NULL);
    c->max_bytes = max_bytes;
    size_t l = strlen(dir) + sizeof CACHE_SUBDIR + 8;
    c->root = malloc(l);
    c->tmpdir = malloc(l);
    if (!c->root || !c->tmpdir) {
        sy_data_cache_destroy(&c);
        return sy_err_set(SY_ENOMEM, "data cache: out of memory");
    }
    snprintf(c->root, l, "%s/%s", dir, CACHE_SUBDIR);
    snprintf(c->tmpdir, l, "%s/tmp", c->root);
    sy_status st = sy_mkdir_p(c->tmpdir);
    if (st != SY_OK) {
        sy_data_cache_destroy(&c);
        return sy_err_prefix(st, "data.cache_dir %s", dir);
    }
    const char *crash = getenv(CACHE_TEST_CRASH_ENV);
    c->crash_at = crash ? strtol(crash, NULL, 10) : 0;
    c->approx = walk_and_trim(c, 0, NULL);
    if (pthread_create(&c->evictor, NULL, evictor_main, c) != 0) {
        sy_data_cache_destroy(&c);
        return sy_err_set(SY_EIO, "data cache: cannot start the eviction thread");
    }
    c->evictor_started = 1;
    *out = c;
    return SY_OK;
}

void sy_data_cache_destroy(sy_data_cache_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_data_cache_t *c = *self_p;
    if (c->evictor_started) {
        pthread_mutex_lock(&c->lock);
        c->stopping = 1;
        pthread_cond_signal(&c->evict_cv);
        pthread_mutex_unlock(&c->lock);
        pthread_join(c->evictor, NULL);
    }
    pthread_cond_destroy(&c->evict_cv);
    pthread_mutex_destroy(&c->lock);
    free(c->root);
    free(c->tmpdir);
    free(c);
    *self_p = NULL;
}

/* ---------------------------------------------------------------- get, put */

static void count(sy_data_cache_t *c, uint64_t *field, uint64_t n) {
    pthread_mutex_lock(&c->lock);
    *field += n;
    pthread_mutex_unlock(&c->lock);
}

int sy_data_cache_get(sy_data_cache_t *c, const char *url, const char *etag, uint64_t off, size_t len, void *buf) {
    char dir[PATH_MAX], path[PATH_MAX];
    uint64_t obj = object_hash(url, etag);
    int fd = entry_path(c, obj, off, len, dir, sizeof dir, path, sizeof path)
                 ? open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW) : -1;
    if (fd < 0) {
        count(c, &c->st.misses, 1);
        return 0;
    }
    entry_header h;
    struct stat sb;
    int ok = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && (uint64_t)sb.st_size == sizeof h + len &&
             pread(fd, &h, sizeof h, 0) == (ssize_t)sizeof h && h.magic == CACHE_MAGIC &&
             h.version == CACHE_VERSION && h.key == key_hash(obj, off, len) && h.len == len;
    size_t got = 0;
    while (ok && got < len) {
        ssize_t k = pread(fd, (char *)buf + got, len - got, (off_t)(sizeof h + got));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) ok = 0;
        else got += (size_t)k;
    }
    ok = ok && fnv1a(FNV_INIT, buf, len) == h.sum;
    if (ok) (void)futimens(fd, NULL); /* the LRU clock */
    close(fd);
    if (!ok) { /* torn or foreign: never served; the refetch writes a good one */
        (void)unlink(path);
        pthread_mutex_lock(&c->lock);
        c->st.rejected++;
        c->st.misses++;
        pthread_mutex_unlock(&c->lock);
        return 0;
    }
    pthread_mutex_lock(&c->lock);
    c->st.hits++;
    c->st.bytes_read += len;
    pthread_mutex_unlock(&c->lock);
    return 1;
}

static int write_all(int fd, const void *p, size_t n) {
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p = (const char *)p + k;
        n -= (size_t)k;
    }
    return 0;
}

static void put_failed(sy_data_cache_t *c, const char *what, const char *path, int e) {
    pthread_mutex_lock(&c->lock);
    c->st.put_failures++;
    int first = !c->warned;
    c->warned = 1;
    pthread_mutex_unlock(&c->lock);
    if (first) sy_warn("data cache: %s %s: %s (entries that cannot be written are skipped)", what, path, strerror(e));
}

/* Trims the folder to CACHE_LOW_WATER of the bound; one process at a time (flock). */
static void evict(sy_data_cache_t *c) {
    char lockpath[PATH_MAX];
    if (snprintf(lockpath, sizeof lockpath, "%s/evict.lock", c->root) >= (int)sizeof lockpath) return;
    int fd = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
        uint64_t evicted = 0;
        uint64_t left = walk_and_trim(c, (uint64_t)((double)c->max_bytes * CACHE_LOW_WATER), &evicted);
        pthread_mutex_lock(&c->lock);
        c->approx = left;
        c->st.evicted += evicted;
        pthread_mutex_unlock(&c->lock);
        flock(fd, LOCK_UN);
    } else { /* another process is trimming the same folder: our estimate restarts from its result later */
        pthread_mutex_lock(&c->lock);
        c->approx = c->max_bytes * CACHE_LOW_WATER;
        pthread_mutex_unlock(&c->lock);
    }
    close(fd);
}

static void *evictor_main(void *arg) {
    sy_data_cache_t *c = arg;
    pthread_setname_np(pthread_self(), "sy-cache-evict"); /* named for profilers and bench/data_stream_bench.py */
    pthread_mutex_lock(&c->lock);
    for (;;) {
        while (!c->stopping && !c->evict_due) pthread_cond_wait(&c->evict_cv, &c->lock);
        if (c->stopping) break;
        pthread_mutex_unlock(&c->lock);
        evict(c);
        pthread_mutex_lock(&c->lock);
        c->evict_due = 0;
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

void sy_data_cache_trim(sy_data_cache_t *c) {
    pthread_mutex_lock(&c->lock);
    int over = c->approx > c->max_bytes;
    pthread_mutex_unlock(&c->lock);
    if (over) evict(c);
}

void sy_data_cache_put(sy_data_cache_t *c, const char *url, const char *etag, uint64_t off, size_t len,
                       const void *buf) {
    char dir[PATH_MAX], path[PATH_MAX], tmp[PATH_MAX];
    uint64_t obj = object_hash(url, etag);
    if (!entry_path(c, obj, off, len, dir, sizeof dir, path, sizeof path)) {
        put_failed(c, "path too long under", c->root, ENAMETOOLONG);
        return;
    }
    pthread_mutex_lock(&c->lock);
    uint64_t n = ++c->tmp_counter;
    pthread_mutex_unlock(&c->lock);
    if (snprintf(tmp, sizeof tmp, "%s/%ld.%" PRIu64, c->tmpdir, (long)getpid(), n) >= (int)sizeof tmp) {
        put_failed(c, "path too long under", c->tmpdir, ENAMETOOLONG);
        return;
    }
    entry_header h = {.magic = CACHE_MAGIC, .version = CACHE_VERSION, .key = key_hash(obj, off, len), .len = len,
                      .sum = fnv1a(FNV_INIT, buf, len)};
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        put_failed(c, "create", tmp, errno);
        return;
    }
    int bad = write_all(fd, &h, sizeof h);
    if (!bad && c->crash_at > 0 && (long)n == c->crash_at) { /* test hook: killed mid-entry */
        (void)write_all(fd, buf, len / 2);
        raise(SIGKILL);
    }
    if (!bad) bad = write_all(fd, buf, len);
    int e = errno;
    if (close(fd) != 0 && !bad) {
        bad = 1;
        e = errno;
    }
    if (!bad) {
        sy_status ms = sy_mkdir_p(dir);
        if (ms != SY_OK) {
            bad = 1;
            e = EIO;
        } else if (rename(tmp, path) != 0) {
            bad = 1;
            e = errno;
        }
    }
    if (bad) {
        (void)unlink(tmp);
        put_failed(c, "write", path, e);
        return;
    }
    pthread_mutex_lock(&c->lock);
    c->st.bytes_written += len;
    c->approx += sizeof h + len;
    if (c->approx > c->max_bytes && !c->evict_due) {
        c->evict_due = 1;
        pthread_cond_signal(&c->evict_cv);
    }
    pthread_mutex_unlock(&c->lock);
}

void sy_data_cache_get_stats(sy_data_cache_t *c, sy_data_cache_stats *out) {
    pthread_mutex_lock(&c->lock);
    *out = c->st;
    pthread_mutex_unlock(&c->lock);
}

uint64_t sy_data_cache_bytes(sy_data_cache_t *c) {
    pthread_mutex_lock(&c->lock);
    uint64_t b = c->approx;
    pthread_mutex_unlock(&c->lock);
    return b;
}
