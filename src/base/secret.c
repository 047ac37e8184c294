#include "base/secret.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

/* A printable, space-free ASCII token (it is sent as "Authorization: Bearer TOKEN"). */
static const char *token_why(const char *s) {
    if (!*s) return "it is empty";
    for (const char *p = s; *p; p++)
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f)
            return "it holds a space, a control character or a non-ASCII byte (one line of printable ASCII expected)";
    return NULL;
}

sy_status sy_secret_read_file(const char *path, const char *what, char *out, size_t n) {
    if (n) out[0] = 0;
    if (!path || !*path) return sy_err_set(SY_EINVAL, "%s: no file given", what);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        int e = errno;
        return sy_err_set(e == ENOENT ? SY_ENOTFOUND : SY_EIO, "%s = %s: cannot open: %s", what, path, strerror(e));
    }
    sy_status s = SY_OK;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        s = sy_err_set(SY_EINVAL, "%s = %s: not a regular file", what, path);
        goto out;
    }
    if (st.st_mode & 077) {
        s = sy_err_set(SY_EINVAL,
                       "%s = %s: permissions %04o are too open: a secret file must be accessible by its owner only "
                       "(chmod 600 %s)",
                       what, path, (unsigned)(st.st_mode & 07777), path);
        goto out;
    }
    if ((size_t)st.st_size >= n + 2) { /* room for the token and a "\r\n" */
        s = sy_err_set(SY_EINVAL, "%s = %s: longer than %zu bytes", what, path, n - 1);
        goto out;
    }
    size_t len = 0;
    for (;;) {
        ssize_t r = read(fd, out + len, n - 1 - len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            s = sy_err_set(SY_EIO, "%s = %s: read: %s", what, path, strerror(errno));
            goto out;
        }
        if (r == 0) break;
        len += (size_t)r;
        if (len == n - 1) {
            char extra[2];
            ssize_t more = read(fd, extra, sizeof extra);
            /* a "\n" or "\r\n" beyond the buffer is the end of the line, anything else too much */
            if (more > 0 && !((more == 1 && extra[0] == '\n') ||
                              (more == 2 && extra[0] == '\r' && extra[1] == '\n'))) {
                s = sy_err_set(SY_EINVAL, "%s = %s: longer than %zu bytes", what, path, n - 1);
                goto out;
            }
            break;
        }
    }
    out[len] = 0;
    if (len && out[len - 1] == '\n') out[--len] = 0;
    if (len && out[len - 1] == '\r') out[--len] = 0;
    const char *why = token_why(out);
    if (why) s = sy_err_set(SY_EINVAL, "%s = %s: not a token: %s", what, path, why);
out:
    close(fd);
    if (s != SY_OK && n) explicit_bzero(out, n);
    return s;
}

sy_status sy_secret_status_token(const char *token, const char *token_file, char *out, size_t n) {
    if (n) out[0] = 0;
    if (token && *token) {
        if (strlen(token) >= n) return sy_err_set(SY_EINVAL, "status.token: longer than %zu bytes", n - 1);
        const char *why = token_why(token);
        if (why) return sy_err_set(SY_EINVAL, "status.token: not a token: %s", why);
        memcpy(out, token, strlen(token) + 1);
        return SY_OK;
    }
    if (token_file && *token_file) return sy_secret_read_file(token_file, "status.token_file", out, n);
    const char *env = getenv(SY_STATUS_TOKEN_ENV);
    if (!env || !*env) return SY_OK;
    if (strlen(env) >= n) return sy_err_set(SY_EINVAL, SY_STATUS_TOKEN_ENV ": longer than %zu bytes", n - 1);
    const char *why = token_why(env);
    if (why) return sy_err_set(SY_EINVAL, SY_STATUS_TOKEN_ENV ": not a token: %s", why);
    memcpy(out, env, strlen(env) + 1);
    return SY_OK;
}

sy_status sy_secret_random_hex(char *out, size_t n_bytes) {
    uint8_t rb[64];
    if (n_bytes > sizeof rb) return sy_err_set(SY_EINVAL, "random token: at most %zu bytes", sizeof rb);
    size_t got = 0;
    while (got < n_bytes) {
        ssize_t r = getrandom(rb + got, n_bytes - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int e = r < 0 ? errno : EIO;
            explicit_bzero(rb, sizeof rb);
            return sy_err_set(SY_EIO, "cannot draw a random token: getrandom: %s (no weaker source is used)",
                              strerror(e));
        }
        got += (size_t)r;
    }
    for (size_t i = 0; i < n_bytes; i++) snprintf(out + 2 * i, 3, "%02x", rb[i]);
    explicit_bzero(rb, sizeof rb);
    return SY_OK;
}
