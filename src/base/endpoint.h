/* Syntax checks of ZeroMQ endpoints given on command lines and in configs (issue 16 #5), so
 * that a bad address is a usage error naming the argument, at start, instead of a zmq_connect
 * EINVAL at some later point or a silent wait for an address that can never exist.
 *
 * Accepted: tcp://HOST:PORT and ipc://PATH. HOST is a DNS name (letters, digits, '-', '.'),
 * a dotted IPv4 address with every part in 0..255, or [IPv6]; PORT is 1..65535. For a bind,
 * HOST may also be '*' and PORT '*' or 0 (any free port). Whether a name resolves, or a
 * coordinator answers, is not checked here: the worker retries those (--connect-timeout).
 *
 * Thread: any. No state. */
#ifndef SY_ENDPOINT_H
#define SY_ENDPOINT_H

#include <stdbool.h>

#include "base/status.h"

/* SY_OK, or SY_EINVAL with a message "WHAT 'EP': REASON (expected tcp://HOST:PORT ...)". */
sy_status sy_endpoint_check(const char *ep, bool bind, const char *what);

#endif
