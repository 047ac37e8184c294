#include "base/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

sy_status sy_mkdir_p(const char *path) {
    char buf[PATH_MAX];
    if (!path || !path[0]) return sy_err_set(SY_EINVAL, "empty folder name");
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return sy_err_set(SY_EINVAL, "folder name too long: %.80s...", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return sy_err_set(SY_EIO, "cannot create folder %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
        return sy_err_set(SY_EIO, "cannot create folder %s: %s", buf, strerror(errno));
    struct stat sb;
    if (stat(buf, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return sy_err_set(SY_EINVAL, "%s exists and is not a folder", buf);
    return SY_OK;
}

static const char *kind_of(mode_t m) {
    return S_ISLNK(m) ? "a symbolic link" : S_ISDIR(m) ? "a folder" : S_ISFIFO(m) ? "a FIFO" :
           S_ISCHR(m) ? "a character device" : S_ISBLK(m) ? "a block device" : S_ISSOCK(m) ? "a socket" :
           "not a regular file";
}

sy_status sy_fs_check_replaceable(const char *path) {
    struct stat sb;
    if (!path || !path[0]) return sy_err_set(SY_EINVAL, "empty output file name");
    if (lstat(path, &sb) != 0) {
        if (errno == ENOENT) return SY_OK;
        return sy_err_set(SY_EIO, "%s: %s", path, strerror(errno));
    }
    if (!S_ISREG(sb.st_mode))
        return sy_err_set(SY_EINVAL, "%s is %s, not a regular file: refusing to replace it (remove it or choose "
                          "another output path)", path, kind_of(sb.st_mode));
    return SY_OK;
}

int sy_fs_open_regular(const char *path, int append) {
    if (!path || !path[0]) {
        sy_err_set(SY_EINVAL, "empty output file name");
        return -1;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | (append ? O_APPEND : 0), 0644);
    if (fd < 0) {
        int e = errno;
        struct stat sb;
        if ((e == ELOOP || e == ENXIO || e == EISDIR || e == EWOULDBLOCK) && lstat(path, &sb) == 0 && !S_ISREG(sb.st_mode))
            sy_err_set(SY_EINVAL, "%s is %s, not a regular file: refusing to write to it", path, kind_of(sb.st_mode));
        else
            sy_err_set(SY_EIO, "cannot open %s for writing: %s", path, strerror(e));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        sy_err_set(SY_EINVAL, "%s is %s, not a regular file: refusing to write to it", path,
                   fstat(fd, &sb) == 0 ? kind_of(sb.st_mode) : "unreadable");
        close(fd);
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if ((fl >= 0 && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) || (!append && ftruncate(fd, 0) != 0)) {
        sy_err_set(SY_EIO, "cannot prepare %s for writing: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

FILE *sy_fs_fopen_regular(const char *path, int append) {
    int fd = sy_fs_open_regular(path, append);
    if (fd < 0) return NULL;
    FILE *f = fdopen(fd, append ? "a" : "w");
    if (!f) {
        sy_err_set(SY_EIO, "cannot open %s for writing: %s", path, strerror(errno));
        close(fd);
    }
    return f;
}

/* ------------------------------------------------------------------ atomic writing */

static unsigned long atomic_counter;

sy_status sy_fs_atomic_open(sy_fs_atomic *w, const char *path, const char *tmp_name, mode_t mode, int flags) {
    memset(w, 0, sizeof *w);
    w->fd = -1;
    w->flags = flags;
    w->mode = mode;
    if (!path || !path[0]) return sy_err_set(SY_EINVAL, "empty output file name");
    if (!(flags & SY_FS_NO_REPLACE)) SY_CHECK(sy_fs_check_replaceable(path)); /* never a device, FIFO or symlink */
    size_t tl = (tmp_name ? strlen(tmp_name) : strlen(path) + 48) + 1;
    w->path = strdup(path);
    w->tmp = malloc(tl);
    if (!w->path || !w->tmp) {
        sy_fs_atomic_close(w);
        return sy_err_set(SY_ENOMEM, "%s: temp name", path);
    }
    if (tmp_name)
        memcpy(w->tmp, tmp_name, tl);
    else /* same folder: the rename is atomic */
        snprintf(w->tmp, tl, "%s.tmp.%ld.%lu", path, (long)getpid(),
                 __atomic_fetch_add(&atomic_counter, 1, __ATOMIC_RELAXED));
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
    if (w->fd < 0) {
        int e = errno;
        sy_status st = sy_err_set(SY_EIO, "%s: cannot create temporary file %s: %s", path, w->tmp, strerror(e));
        w->tmp[0] = 0; /* not ours: nothing to remove */
        sy_fs_atomic_close(w);
        w->err = e;
        return st;
    }
    if ((flags & SY_FS_EXACT_MODE) && fchmod(w->fd, mode) != 0) {
        w->err = errno;
        sy_status st = sy_err_set(SY_EIO, "%s: chmod: %s", w->tmp, strerror(w->err));
        sy_fs_atomic_close(w);
        return st;
    }
    return SY_OK;
}

sy_status sy_fs_atomic_write(sy_fs_atomic *w, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t k = write(w->fd, p, len);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
            w->err = errno;
            return sy_err_set(SY_EIO, "%s: write: %s", w->tmp, strerror(w->err));
        }
        p += k;
        len -= (size_t)k;
    }
    return SY_OK;
}

/* Links tmp to path without replacing anything; renameat2 where the filesystem has no hard links. */
static int link_noreplace(const char *tmp, const char *path) {
    if (link(tmp, path) == 0) return 0;
    if (errno != EPERM && errno != EOPNOTSUPP && errno != ENOSYS) return -1;
    return renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE);
}

static sy_status fail_errno(sy_fs_atomic *w, const char *fmt_path, const char *step) {
    w->err = errno;
    return sy_err_set(SY_EIO, "%s: %s: %s", fmt_path, step, strerror(w->err));
}

/* Puts the closed temp file at path: rename over a regular file, or link without replacing. */
static sy_status atomic_place(sy_fs_atomic *w) {
    if (w->flags & SY_FS_NO_REPLACE) {
        if (link_noreplace(w->tmp, w->path) != 0) {
            w->err = errno;
            if (w->err == EEXIST) return sy_err_set(SY_EEXIST, "%s exists already: not overwriting it", w->path);
            return sy_err_set(SY_EIO, "%s: link from %s: %s", w->path, w->tmp, strerror(w->err));
        }
        unlink(w->tmp); /* no-op when renameat2 moved it */
    } else {
        SY_CHECK(sy_fs_check_replaceable(w->path)); /* again: something may have appeared meanwhile */
        if (rename(w->tmp, w->path) != 0) {
            w->err = errno;
            return sy_err_set(SY_EIO, "%s: rename from %s: %s", w->path, w->tmp, strerror(w->err));
        }
    }
    w->tmp[0] = 0; /* nothing left to remove */
    return SY_OK;
}

/* fsyncs the folder holding w->path, so the new name survives a crash. */
static sy_status atomic_sync_dir(sy_fs_atomic *w) {
    char *slash = strrchr(w->path, '/');
    char dir[PATH_MAX];
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else
        snprintf(dir, sizeof dir, "%.*s", slash == w->path ? 1 : (int)(slash - w->path), w->path);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    sy_status st = SY_OK;
    if (dfd < 0 || fsync(dfd) != 0) {
        w->err = errno;
        if (!(w->flags & SY_FS_DIR_SYNC_BEST_EFFORT))
            st = sy_err_set(SY_EIO, "%s: fsync of its directory: %s", w->path, strerror(w->err));
    }
    if (dfd >= 0) close(dfd);
    return st;
}

sy_status sy_fs_atomic_commit(sy_fs_atomic *w) {
    if (w->fd < 0 || !w->tmp || !w->tmp[0]) return sy_err_set(SY_EINTERNAL, "atomic write: nothing open to commit");
    if (fsync(w->fd) != 0) return fail_errno(w, w->tmp, "fsync");
    int rc = close(w->fd);
    w->fd = -1;
    if (rc != 0) return fail_errno(w, w->tmp, "close");
    SY_CHECK(atomic_place(w));
    return atomic_sync_dir(w);
}

void sy_fs_atomic_close(sy_fs_atomic *w) {
    if (!w) return;
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    if (w->tmp && w->tmp[0]) unlink(w->tmp);
    free(w->tmp);
    free(w->path);
    w->tmp = w->path = NULL;
}

sy_status sy_fs_write_atomic(const char *path, const void *buf, size_t len, mode_t mode, int flags) {
    sy_fs_atomic w;
    sy_status st = sy_fs_atomic_open(&w, path, NULL, mode, flags);
    if (st == SY_OK) st = sy_fs_atomic_write(&w, buf, len);
    if (st == SY_OK) st = sy_fs_atomic_commit(&w);
    sy_fs_atomic_close(&w);
    return st;
}
