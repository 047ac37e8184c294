#include "base/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
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
