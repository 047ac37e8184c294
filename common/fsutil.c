#include "fsutil.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

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
