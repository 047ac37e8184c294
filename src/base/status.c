#include "base/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define SY_ERR_MAX 1024
static _Thread_local char err_buf[SY_ERR_MAX];

const char *sy_strerror(sy_status st) {
    switch (st) {
    case SY_OK: return "ok";
    case SY_EINVAL: return "invalid input";
    case SY_ENOMEM: return "out of memory";
    case SY_EIO: return "I/O error";
    case SY_EFORMAT: return "malformed data";
    case SY_ENOTFOUND: return "not found";
    case SY_ETIMEOUT: return "timed out";
    case SY_EEXIST: return "already exists";
    case SY_ECORRUPT: return "corrupt data";
    case SY_EABORTED: return "aborted";
    case SY_EREMOTE: return "remote error";
    case SY_EINTERNAL: return "internal error";
    case SY_ECONFLICT: return "owned by another writer";
    }
    return "unknown status";
}

sy_status sy_err_set(sy_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return st;
}

sy_status sy_err_prefix(sy_status st, const char *fmt, ...) {
    char head[SY_ERR_MAX], old[SY_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(head, sizeof head, fmt, ap);
    va_end(ap);
    memcpy(old, err_buf, sizeof old);
    /* a message longer than the buffer is cut, which is fine */
    const char *tail = old[0] ? old : sy_strerror(st);
    size_t hl = strnlen(head, SY_ERR_MAX - 3), tl = strnlen(tail, SY_ERR_MAX - 3 - hl);
    memcpy(err_buf, head, hl);
    memcpy(err_buf + hl, ": ", 2);
    memcpy(err_buf + hl + 2, tail, tl);
    err_buf[hl + 2 + tl] = 0;
    return st;
}

const char *sy_err_msg(void) { return err_buf; }

void sy_err_clear(void) { err_buf[0] = 0; }
