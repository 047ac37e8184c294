/* Object store front end (key checks, sorting, dispatch) and the local-directory backend. */
#include "storage/store.h"
#include "base/fsutil.h"
#include "store_backends_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define PUT_RETRIES 3 /* a concurrent delete may remove an empty parent folder mid-put */
#define PUT_IOV_MAX 64 /* iovecs per writev: small tensors go out together, well under IOV_MAX */
/* Writeback of a put is started every this many bytes (sync_file_range), so the device writes
 * while the caller still hashes and copies the rest, and the final fsync has little left. */
#define PUT_WRITEBACK_STEP ((off_t)8 << 20)

struct sy_store {
    const sy_store_ops *ops;
    void *impl;
    char *url;
};

/* ------------------------------------------------------------- key rules */

static int key_char_ok(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-' || c == '/';
}

/* Valid key, or (allow_prefix) a valid prefix: may be "" or end with '/'. */
static int name_valid(const char *k, int allow_prefix) {
    if (!k) return 0;
    if (!k[0]) return allow_prefix;
    if (k[0] == '/') return 0;
    const char *comp = k;
    for (const char *p = k;; p++) {
        if (*p && !key_char_ok(*p)) return 0;
        if (*p == '/' || !*p) {
            size_t cl = (size_t)(p - comp);
            int last = !*p;
            if (cl == 0 && !(last && allow_prefix)) return 0; /* "a//b" or trailing '/' in a key */
            if ((cl == 1 && comp[0] == '.') || (cl == 2 && comp[0] == '.' && comp[1] == '.')) return 0;
            if (last) break;
            comp = p + 1;
        }
    }
    return 1;
}

int sy_store_key_valid(const char *key) { return name_valid(key, 0); }

static sy_status check_key(const sy_store_t *s, const char *key) {
    if (!name_valid(key, 0))
        return sy_err_set(SY_EINVAL, "store %s: invalid key '%s' (allowed: [A-Za-z0-9._/-], no '..', no leading '/')",
                          s ? s->url : "?", key ? key : "(null)");
    return SY_OK;
}

/* ------------------------------------------------------------- front end */

sy_status sy_store_wrap(const sy_store_ops *ops, void *impl, const char *url, sy_store_t **out) {
    sy_store_t *s = calloc(1, sizeof *s);
    if (!s || !(s->url = strdup(url))) {
        free(s);
        ops->destroy(impl);
        return sy_err_set(SY_ENOMEM, "store %s", url);
    }
    s->ops = ops;
    s->impl = impl;
    *out = s;
    return SY_OK;
}

void sy_store_destroy(sy_store_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_store_t *s = *self_p;
    s->ops->destroy(s->impl);
    free(s->url);
    free(s);
    *self_p = NULL;
}

const char *sy_store_url(const sy_store_t *self) { return self ? self->url : ""; }

sy_status sy_store_put(sy_store_t *self, const char *key, const void *buf, size_t len) {
    SY_CHECK(check_key(self, key));
    if (!buf && len) return sy_err_set(SY_EINVAL, "store put %s: no buffer", key);
    return self->ops->put(self->impl, key, buf, len, 0);
}

sy_status sy_store_put_if_absent(sy_store_t *self, const char *key, const void *buf, size_t len) {
    SY_CHECK(check_key(self, key));
    if (!buf && len) return sy_err_set(SY_EINVAL, "store put %s: no buffer", key);
    return self->ops->put(self->impl, key, buf, len, 1);
}

/* Calls the tap over buf in chunks of at most SY_STORE_TAP_CHUNK bytes. */
static sy_status tap_buffer(const sy_store_tap *tap, const char *buf, size_t len) {
    for (size_t off = 0; tap && off < len;) {
        size_t k = len - off < SY_STORE_TAP_CHUNK ? len - off : SY_STORE_TAP_CHUNK;
        SY_CHECK(tap->fn(tap->arg, buf + off, k));
        off += k;
    }
    return SY_OK;
}

sy_status sy_store_putv(sy_store_t *self, const char *key, const sy_store_part *parts, size_t n, int if_absent,
                        const sy_store_tap *tap) {
    SY_CHECK(check_key(self, key));
    if (n && !parts) return sy_err_set(SY_EINVAL, "store put %s: %zu parts, no array", key, n);
    if (tap && !tap->fn) return sy_err_set(SY_EINVAL, "store put %s: tap without a function", key);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (!parts[i].base && parts[i].len) return sy_err_set(SY_EINVAL, "store put %s: part %zu has no buffer", key, i);
        if (parts[i].len > SIZE_MAX - total)
            return sy_err_set(SY_EINVAL, "store put %s: parts total more than SIZE_MAX bytes", key);
        total += parts[i].len;
    }
    if (self->ops->putv) return self->ops->putv(self->impl, key, parts, n, if_absent, tap);

    /* No native scatter-gather (S3: SigV4 and the 412 check need the whole body): concatenate. */
    char *buf = malloc(total ? total : 1);
    if (!buf) return sy_err_set(SY_ENOMEM, "store put %s: %zu-byte buffer", key, total);
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        if (parts[i].len) memcpy(buf + off, parts[i].base, parts[i].len);
        off += parts[i].len;
    }
    sy_status st = tap_buffer(tap, buf, total);
    if (st != SY_OK)
        sy_err_prefix(st, "store put %s", key);
    else
        st = self->ops->put(self->impl, key, buf, total, if_absent);
    free(buf);
    return st;
}

sy_status sy_store_get(sy_store_t *self, const char *key, void **buf, size_t *len) {
    SY_CHECK(check_key(self, key));
    if (!buf || !len) return sy_err_set(SY_EINVAL, "store get %s: no output pointer", key);
    *buf = NULL;
    *len = 0;
    return self->ops->get(self->impl, key, buf, len);
}

sy_status sy_store_get_range(sy_store_t *self, const char *key, uint64_t offset, size_t len, void *buf) {
    SY_CHECK(check_key(self, key));
    if (!buf && len) return sy_err_set(SY_EINVAL, "store get %s: no buffer", key);
    return self->ops->get_range(self->impl, key, offset, len, buf);
}

sy_status sy_store_get_range_obj(sy_store_t *self, const char *key, uint64_t offset, size_t len, void *buf,
                                 sy_store_obj *obj) {
    SY_CHECK(check_key(self, key));
    if ((!buf && len) || !obj) return sy_err_set(SY_EINVAL, "store get %s: no buffer", key);
    memset(obj, 0, sizeof *obj);
    if (self->ops->get_range_obj && len > 0) return self->ops->get_range_obj(self->impl, key, offset, len, buf, obj);
    SY_CHECK(self->ops->head(self->impl, key, &obj->size));
    return self->ops->get_range(self->impl, key, offset, len, buf);
}

sy_status sy_store_head(sy_store_t *self, const char *key, uint64_t *size) {
    SY_CHECK(check_key(self, key));
    uint64_t dummy;
    return self->ops->head(self->impl, key, size ? size : &dummy);
}

static int cmp_key(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

sy_status sy_store_list(sy_store_t *self, const char *prefix, char ***keys, size_t *n) {
    if (!keys || !n) return sy_err_set(SY_EINVAL, "store list: no output pointer");
    *keys = NULL;
    *n = 0;
    if (!name_valid(prefix, 1))
        return sy_err_set(SY_EINVAL, "store %s: invalid prefix '%s'", self->url, prefix ? prefix : "(null)");
    SY_CHECK(self->ops->list(self->impl, prefix, keys, n));
    if (*n > 1) qsort(*keys, *n, sizeof **keys, cmp_key);
    return SY_OK;
}

void sy_store_keys_free(char **keys, size_t n) {
    if (!keys) return;
    for (size_t i = 0; i < n; i++) free(keys[i]);
    free(keys);
}

sy_status sy_store_delete(sy_store_t *self, const char *key) {
    SY_CHECK(check_key(self, key));
    return self->ops->del(self->impl, key);
}

sy_status sy_store_delete_prefix(sy_store_t *self, const char *prefix) {
    char **keys = NULL;
    size_t n = 0;
    sy_status st = SY_OK;
    if (!prefix || !prefix[0])
        return sy_err_set(SY_EINVAL, "store %s: delete_prefix needs a non-empty prefix", self->url);
    SY_CHECK(sy_store_list(self, prefix, &keys, &n));
    for (size_t i = 0; i < n && st == SY_OK; i++) st = self->ops->del(self->impl, keys[i]);
    sy_store_keys_free(keys, n);
    return st;
}

/* ------------------------------------------------------------- local backend */

typedef struct {
    char *root; /* folder path without trailing '/' */
} local_store;

static unsigned long tmp_counter;

static char *path_join(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    char *p = malloc(la + lb + 2);
    if (!p) return NULL;
    memcpy(p, a, la);
    p[la] = '/';
    memcpy(p + la + 1, b, lb + 1);
    return p;
}

static sy_status errno_status(int e) { return (e == ENOENT || e == ENOTDIR) ? SY_ENOTFOUND : SY_EIO; }

static void fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    (void)fsync(fd); /* best effort: some filesystems refuse fsync on folders */
    close(fd);
}

/* Creates every folder of `path` from byte `from` on (the part before exists or is created
 * too); fsyncs the parent of each new folder so it survives a crash. */
static sy_status mkdir_p(char *path, size_t from) {
    size_t len = strlen(path);
    for (size_t i = from + 1; i <= len; i++) {
        char *p = path + i;
        if (*p != '/' && *p) continue;
        char c = *p;
        *p = 0;
        if (mkdir(path, 0755) == 0) {
            char *slash = strrchr(path, '/');
            if (slash && slash != path) {
                *slash = 0;
                fsync_dir(path);
                *slash = '/';
            }
        } else if (errno != EEXIST) {
            int e = errno;
            sy_status st = sy_err_set(SY_EIO, "mkdir %s: %s", path, strerror(e));
            *p = c;
            return st;
        }
        *p = c;
    }
    struct stat sb;
    if (stat(path, &sb) != 0 || !S_ISDIR(sb.st_mode)) return sy_err_set(SY_EIO, "%s is not a folder", path);
    return SY_OK;
}

/* Writes the iovecs completely (writev may stop short). */
static sy_status writev_all(int fd, struct iovec *iov, int n, const char *what) {
    while (n > 0) {
        ssize_t w = writev(fd, iov, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return sy_err_set(SY_EIO, "write %s: %s", what, strerror(errno));
        size_t left = (size_t)w;
        while (n > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return SY_OK;
}

/* Writes the parts to fd straight from their buffers: batches of at most SY_STORE_TAP_CHUNK
 * bytes, each shown to the tap and then written with one writev (so the kernel copies a batch
 * the tap has just pulled into cache). Starts writeback every PUT_WRITEBACK_STEP bytes; the
 * caller's fsync is still what makes the object durable. */
static sy_status write_parts(int fd, const sy_store_part *parts, size_t n, const sy_store_tap *tap,
                             const char *what) {
    struct iovec iov[PUT_IOV_MAX];
    size_t pi = 0, po = 0; /* next byte: part pi, offset po */
    off_t pos = 0, started = 0;
    while (pi < n) {
        int k = 0;
        size_t batch = 0;
        while (pi < n && k < PUT_IOV_MAX && batch < SY_STORE_TAP_CHUNK) {
            size_t take = parts[pi].len - po;
            if (take > SY_STORE_TAP_CHUNK - batch) take = SY_STORE_TAP_CHUNK - batch;
            if (take) {
                iov[k].iov_base = (char *)parts[pi].base + po;
                iov[k++].iov_len = take;
                batch += take;
                po += take;
            }
            if (po == parts[pi].len) {
                pi++;
                po = 0;
            }
        }
        for (int j = 0; tap && j < k; j++) SY_CHECK(tap->fn(tap->arg, iov[j].iov_base, iov[j].iov_len));
        SY_CHECK(writev_all(fd, iov, k, what));
        pos += (off_t)batch;
#ifdef SYNC_FILE_RANGE_WRITE
        if (pos - started >= PUT_WRITEBACK_STEP) {
            (void)sync_file_range(fd, started, pos - started, SYNC_FILE_RANGE_WRITE); /* a hint: fsync decides */
            started = pos;
        }
#endif
    }
    (void)started;
    return SY_OK;
}

/* Writes the object through a temp file in its folder (sy_fs_atomic: fsync, rename or link
 * without replacing, folder fsync). The temp name starts with '.' and holds '#', which is not a
 * key character, so temp files never show up in list. The folders are made first; an open that
 * finds its folder gone (a concurrent delete removed an empty parent) makes them again. */
static sy_status local_putv(void *impl, const char *key, const sy_store_part *parts, size_t n, int if_absent,
                            const sy_store_tap *tap) {
    local_store *ls = impl;
    sy_status st = SY_OK;
    sy_fs_atomic w = {.fd = -1};
    char *path = path_join(ls->root, key), *tmp = NULL;
    if (!path || !(tmp = malloc(strlen(path) + 64))) {
        st = sy_err_set(SY_ENOMEM, "store put %s", key);
        goto out;
    }
    char *slash = strrchr(path, '/');
    size_t dlen = (size_t)(slash - path);
    unsigned long ctr = __atomic_fetch_add(&tmp_counter, 1, __ATOMIC_RELAXED);
    snprintf(tmp, strlen(path) + 64, "%.*s/.%s#tmp.%ld.%lu", (int)dlen, path, slash + 1, (long)getpid(), ctr);
    int flags = SY_FS_DIR_SYNC_BEST_EFFORT | (if_absent ? SY_FS_NO_REPLACE : 0);
    for (int attempt = 0;; attempt++) {
        *slash = 0;
        st = mkdir_p(path, strlen(ls->root));
        *slash = '/';
        if (st != SY_OK) goto out;
        st = sy_fs_atomic_open(&w, path, tmp, 0644, flags);
        if (st == SY_OK || w.err != ENOENT || attempt + 1 >= PUT_RETRIES) break;
    }
    if (st == SY_OK) st = write_parts(w.fd, parts, n, tap, tmp);
    if (st == SY_OK && (st = sy_fs_atomic_commit(&w)) == SY_EEXIST) {
        sy_err_set(SY_EEXIST, "store put_if_absent %s: object exists", key);
        goto out;
    }
    if (st != SY_OK) sy_err_prefix(st, "store put %s", key);
out:
    sy_fs_atomic_close(&w);
    free(tmp);
    free(path);
    return st;
}

static sy_status local_put(void *impl, const char *key, const void *buf, size_t len, int if_absent) {
    sy_store_part part = {buf, len};
    return local_putv(impl, key, &part, 1, if_absent, NULL);
}

/* Opens an object for reading: its fd and size. */
static sy_status local_open(local_store *ls, const char *key, int *fd_out, uint64_t *size) {
    sy_status st = SY_OK;
    char *path = path_join(ls->root, key);
    if (!path) return sy_err_set(SY_ENOMEM, "store get %s", key);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0) {
        st = sy_err_set(errno_status(errno), "store object %s: %s", key, strerror(errno));
    } else if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = sy_err_set(SY_ENOTFOUND, "store object %s: not a regular file", key);
        close(fd);
    } else {
        *fd_out = fd;
        *size = (uint64_t)sb.st_size;
    }
    free(path);
    return st;
}

static sy_status pread_all(int fd, void *buf, size_t len, uint64_t off, const char *key) {
    char *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            return sy_err_set(SY_EIO, "store object %s: read: %s", key, r < 0 ? strerror(errno) : "object shrank");
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return SY_OK;
}

static sy_status local_get(void *impl, const char *key, void **buf, size_t *len) {
    int fd = -1;
    uint64_t size = 0;
    SY_CHECK(local_open(impl, key, &fd, &size));
    sy_status st = SY_OK;
    void *b = malloc(size ? (size_t)size : 1);
    if (!b) st = sy_err_set(SY_ENOMEM, "store object %s: %" PRIu64 " bytes", key, size);
    if (st == SY_OK) st = pread_all(fd, b, (size_t)size, 0, key);
    close(fd);
    if (st != SY_OK) {
        free(b);
        return st;
    }
    *buf = b;
    *len = (size_t)size;
    return SY_OK;
}

static sy_status local_get_range(void *impl, const char *key, uint64_t offset, size_t len, void *buf) {
    int fd = -1;
    uint64_t size = 0;
    SY_CHECK(local_open(impl, key, &fd, &size));
    sy_status st = SY_OK;
    if (offset > size || len > size - offset)
        st = sy_err_set(SY_EINVAL, "store object %s: range [%" PRIu64 ", +%zu) past its end (%" PRIu64 " bytes)", key,
                        offset, len, size);
    else
        st = pread_all(fd, buf, len, offset, key);
    close(fd);
    return st;
}

static sy_status local_get_range_obj(void *impl, const char *key, uint64_t offset, size_t len, void *buf,
                                     sy_store_obj *obj) {
    int fd = -1;
    uint64_t size = 0;
    SY_CHECK(local_open(impl, key, &fd, &size));
    sy_status st = SY_OK;
    struct stat sb;
    if (fstat(fd, &sb) != 0)
        st = sy_err_set(SY_EIO, "store object %s: fstat: %s", key, strerror(errno));
    else if (offset > size || len > size - offset)
        st = sy_err_set(SY_EINVAL, "store object %s: range [%" PRIu64 ", +%zu) past its end (%" PRIu64 " bytes)", key,
                        offset, len, size);
    else
        st = pread_all(fd, buf, len, offset, key);
    if (st == SY_OK) {
        obj->size = size;
        snprintf(obj->etag, sizeof obj->etag, "%llx-%llx-%llx.%09ld", (unsigned long long)sb.st_ino,
                 (unsigned long long)size, (unsigned long long)sb.st_mtim.tv_sec, (long)sb.st_mtim.tv_nsec);
    }
    close(fd);
    return st;
}

static sy_status local_head(void *impl, const char *key, uint64_t *size) {
    local_store *ls = impl;
    char *path = path_join(ls->root, key);
    if (!path) return sy_err_set(SY_ENOMEM, "store head %s", key);
    struct stat sb;
    sy_status st = SY_OK;
    if (stat(path, &sb) != 0)
        st = sy_err_set(errno_status(errno), "store object %s: %s", key, strerror(errno));
    else if (!S_ISREG(sb.st_mode))
        st = sy_err_set(SY_ENOTFOUND, "store object %s: not a regular file", key);
    else
        *size = (uint64_t)sb.st_size;
    free(path);
    return st;
}

typedef struct {
    char **keys;
    size_t n, cap;
} keyvec;

static sy_status keyvec_push(keyvec *v, const char *a, const char *b) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? 2 * v->cap : 64;
        char **k = realloc(v->keys, cap * sizeof *k);
        if (!k) return sy_err_set(SY_ENOMEM, "store list: %zu keys", cap);
        v->keys = k;
        v->cap = cap;
    }
    size_t la = strlen(a), lb = strlen(b);
    char *s = malloc(la + lb + 1);
    if (!s) return sy_err_set(SY_ENOMEM, "store list");
    memcpy(s, a, la);
    memcpy(s + la, b, lb + 1);
    v->keys[v->n++] = s;
    return SY_OK;
}

static int component_ok(const char *name) {
    if (!strcmp(name, ".") || !strcmp(name, "..")) return 0;
    for (const char *p = name; *p; p++)
        if (!key_char_ok(*p) || *p == '/') return 0;
    return name[0] != 0;
}

/* Adds every regular file under folder `rel` (a key prefix ending in '/' or "") whose name
 * starts with `tail` (only at the top level: below it everything matches). */
static sy_status walk(local_store *ls, const char *rel, const char *tail, keyvec *v) {
    sy_status st = SY_OK;
    char *dirpath = rel[0] ? path_join(ls->root, rel) : strdup(ls->root);
    if (!dirpath) return sy_err_set(SY_ENOMEM, "store list");
    DIR *d = opendir(dirpath);
    if (!d) {
        if (errno != ENOENT && errno != ENOTDIR)
            st = sy_err_set(SY_EIO, "store list: opendir %s: %s", dirpath, strerror(errno));
        free(dirpath);
        return st;
    }
    size_t tl = strlen(tail);
    struct dirent *de;
    while (st == SY_OK && (errno = 0, de = readdir(d))) {
        if (!component_ok(de->d_name) || strncmp(de->d_name, tail, tl) != 0) continue;
        int type = de->d_type;
        if (type == DT_UNKNOWN) {
            struct stat sb;
            if (fstatat(dirfd(d), de->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0) continue;
            type = S_ISREG(sb.st_mode) ? DT_REG : S_ISDIR(sb.st_mode) ? DT_DIR : DT_UNKNOWN;
        }
        if (type == DT_REG) {
            st = keyvec_push(v, rel, de->d_name);
        } else if (type == DT_DIR) {
            size_t lr = strlen(rel), ln = strlen(de->d_name);
            char *sub = malloc(lr + ln + 2);
            if (!sub) {
                st = sy_err_set(SY_ENOMEM, "store list");
                break;
            }
            memcpy(sub, rel, lr);
            memcpy(sub + lr, de->d_name, ln);
            sub[lr + ln] = '/';
            sub[lr + ln + 1] = 0;
            st = walk(ls, sub, "", v);
            free(sub);
        }
    }
    if (st == SY_OK && errno != 0) st = sy_err_set(SY_EIO, "store list: readdir %s: %s", dirpath, strerror(errno));
    closedir(d);
    free(dirpath);
    return st;
}

static sy_status local_list(void *impl, const char *prefix, char ***keys, size_t *n) {
    keyvec v = {0};
    const char *slash = strrchr(prefix, '/');
    size_t dl = slash ? (size_t)(slash - prefix) + 1 : 0;
    char *rel = strndup(prefix, dl);
    if (!rel) return sy_err_set(SY_ENOMEM, "store list");
    sy_status st = walk(impl, rel, prefix + dl, &v);
    free(rel);
    if (st != SY_OK) {
        sy_store_keys_free(v.keys, v.n);
        return st;
    }
    *keys = v.keys;
    *n = v.n;
    return SY_OK;
}

static sy_status local_del(void *impl, const char *key) {
    local_store *ls = impl;
    char *path = path_join(ls->root, key);
    if (!path) return sy_err_set(SY_ENOMEM, "store delete %s", key);
    sy_status st = SY_OK;
    if (unlink(path) != 0 && errno != ENOENT && errno != ENOTDIR) {
        st = sy_err_set(SY_EIO, "store delete %s: %s", key, strerror(errno));
    } else {
        /* Remove folders left empty, up to the root (fails harmlessly on non-empty ones). */
        size_t rl = strlen(ls->root);
        char *s;
        while ((s = strrchr(path, '/')) && (size_t)(s - path) > rl) {
            *s = 0;
            if (rmdir(path) != 0) break;
        }
    }
    free(path);
    return st;
}

static void local_destroy(void *impl) {
    local_store *ls = impl;
    if (!ls) return;
    free(ls->root);
    free(ls);
}

static const sy_store_ops local_ops = {
    .put = local_put,
    .get = local_get,
    .get_range = local_get_range,
    .get_range_obj = local_get_range_obj,
    .head = local_head,
    .list = local_list,
    .del = local_del,
    .destroy = local_destroy,
    .putv = local_putv,
};

static sy_status local_open_store(const char *dir, const char *url, sy_store_t **out) {
    local_store *ls = calloc(1, sizeof *ls);
    if (!ls || !(ls->root = strdup(dir))) {
        free(ls);
        return sy_err_set(SY_ENOMEM, "store %s", url);
    }
    size_t l = strlen(ls->root);
    while (l > 1 && ls->root[l - 1] == '/') ls->root[--l] = 0;
    sy_status st = mkdir_p(ls->root, 0);
    if (st != SY_OK) {
        local_destroy(ls);
        return sy_err_prefix(st, "store %s", url);
    }
    return sy_store_wrap(&local_ops, ls, url, out);
}

/* file:///abs/path or a plain path; the local backend reads nothing from a config. */
static sy_status local_open_url(const char *url, const sy_config_t *cfg, sy_store_t **out) {
    (void)cfg;
    if (!strncmp(url, "file://", 7)) {
        const char *p = url + 7;
        if (!strncmp(p, "localhost/", 10)) p += 9;
        if (p[0] != '/')
            return sy_err_set(SY_EINVAL, "store %s: file URLs must be file:///absolute/path", url);
        return local_open_store(p, url, out);
    }
    return local_open_store(url, url, out);
}

const sy_store_backend sy_store_local_backend = {.scheme = "file://", .open = local_open_url};
