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

/* True when a listener on `addr` can be reached from this machine only, so that it may run
 * without authentication (issue 12 #1, docs/security.md). `addr` is a ZeroMQ endpoint
 * (tcp://HOST:PORT, ipc://PATH) or an HTTP status address (HOST:PORT). Loopback hosts:
 * 127.0.0.0/8, [::1], [::ffff:127.x.y.z] and the name "localhost" (any case, a trailing '.'
 * allowed). ipc:// is a Unix socket, local by nature: true. Everything else is false: '*',
 * 0.0.0.0, [::], a real interface address, an interface name (eth0) and any other host name,
 * even one that resolves to loopback (names are not resolved here), and anything malformed. */
bool sy_endpoint_is_loopback(const char *addr);

#endif
