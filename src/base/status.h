/* switchyard: one closed status enum for the whole project.
 *
 * Errors are values. Library code returns an sy_status; foreign codes (errno, curl, zmq,
 * protobuf, CUDA) are translated where they enter. A function that fails also writes a
 * human-readable message with sy_err_set() (thread-local), naming what was wrong; the caller
 * reads it with sy_err_msg() and adds context with sy_err_prefix(). */
#ifndef SY_STATUS_H
#define SY_STATUS_H

#include <stddef.h>

typedef enum {
    SY_OK = 0,
    SY_EINVAL = -1,   /* bad argument or bad input from outside (config, file, message) */
    SY_ENOMEM = -2,   /* allocation failed */
    SY_EIO = -3,      /* operating-system I/O error */
    SY_EFORMAT = -4,  /* a file or message is malformed */
    SY_ENOTFOUND = -5,/* a file, key, tensor or checkpoint does not exist */
    SY_ETIMEOUT = -6, /* a bounded wait ran out */
    SY_EEXIST = -7,   /* it exists already (put-if-absent) */
    SY_ECORRUPT = -8, /* checksum or size mismatch */
    SY_EABORTED = -9, /* the operation was aborted */
    SY_EREMOTE = -10, /* a peer or server reported an error */
    SY_EINTERNAL = -11,/* a bug: an invariant failed */
    SY_ECONFLICT = -12 /* another writer owns it (a run fenced off by a newer writer) */
} sy_status;

/* Static name of a status ("invalid argument", ...). Never NULL. */
const char *sy_strerror(sy_status st);

/* Records the message of the current error for this thread (printf-style); returns st. */
sy_status sy_err_set(sy_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prepends "context: " to the current message; returns st. */
sy_status sy_err_prefix(sy_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The current message of this thread ("" if none). Valid until the next sy_err_* call. */
const char *sy_err_msg(void);
void sy_err_clear(void);

/* Return-form check: propagate a failure unchanged. */
#define SY_CHECK(expr)                          \
    do {                                        \
        sy_status sy_check_st_ = (expr);        \
        if (sy_check_st_ != SY_OK) return sy_check_st_; \
    } while (0)

/* Goto-form check: set `st` and jump to `label` on failure. */
#define SY_CHECK_GOTO(expr, st, label)          \
    do {                                        \
        (st) = (expr);                          \
        if ((st) != SY_OK) goto label;          \
    } while (0)

#endif
