/* ZeroMQ errors translated where they enter, beside SY_CHECK (base/status.h): one message
 * shape, "<what failed>: <zmq_strerror>", for every libzmq call of the project.
 *
 * Header-only (static inline and macros) on purpose: it sits in base beside the other check
 * macros so that every layer speaking ZeroMQ shares it (proto, comm, worker, coordinator; comm
 * does not see proto), yet base itself does not link libzmq. It includes <zmq.h>, so only a
 * layer that links libzmq can include it.
 *
 * Thread: any (the message is sy_err_set's, thread-local). */
#ifndef SY_ZMQ_CHECK_H
#define SY_ZMQ_CHECK_H

#include <stdarg.h>
#include <stdio.h>
#include <zmq.h>

#include "base/status.h"

/* Records "<printf message>: <zmq_strerror(err)>" as the current error and returns st. err is
 * the errno of the failed call (errno or zmq_errno()), read before any cleanup that may
 * change it. */
static inline sy_status sy_err_zmq(sy_status st, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline sy_status sy_err_zmq(sy_status st, int err, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return sy_err_set(st, "%s: %s", msg, zmq_strerror(err));
}

/* Return-form check of a libzmq call that returns -1 on failure (zmq_bind, zmq_connect,
 * zmq_setsockopt, zmq_send, ...): returns SY_EIO with "<printf message>: <zmq error>". */
#define SY_CHECK_ZMQ(expr, ...)                                                     \
    do {                                                                            \
        if ((expr) < 0) return sy_err_zmq(SY_EIO, zmq_errno(), __VA_ARGS__);       \
    } while (0)

/* Goto-form: sets `st` to SY_EIO with the message and jumps to `label` on failure. */
#define SY_CHECK_ZMQ_GOTO(expr, st, label, ...)                                     \
    do {                                                                            \
        if ((expr) < 0) {                                                           \
            (st) = sy_err_zmq(SY_EIO, zmq_errno(), __VA_ARGS__);                    \
            goto label;                                                             \
        }                                                                           \
    } while (0)

#endif
