/* The coordinator's ZAP handler (ZeroMQ RFC 27): decides which CURVE clients may connect to
 * the control socket. It answers 200 for a public key listed in cluster.curve_authorized_keys
 * and 400 for any other request; it logs a refused key once (then at most once a minute per
 * key, with its count) naming the key's Z85 and the peer address, and counts refusals.
 *
 * libzmq sends a ZAP request over "inproc://zeromq.zap.01" of the socket's context for each
 * CURVE handshake of a socket with ZMQ_ZAP_DOMAIN set, and holds the handshake until the
 * answer. The handler is a REP socket bound there; the reactor polls sy_zap_socket() and calls
 * sy_zap_handle() when it is readable, so no thread is added (docs/protocol.md "Security").
 *
 * It does not do the cryptography (libzmq does) nor load the server key (coord.c does).
 * Ownership: it takes the key set. Thread: the thread that owns the context's sockets (the
 * coordinator's reactor); one handler per context (the endpoint name is fixed by the RFC). */
#ifndef SY_ZAP_H
#define SY_ZAP_H

#include <stdint.h>

#include "proto/curve.h"
#include "base/status.h"

typedef struct sy_zap sy_zap_t;

/* Binds the handler in zctx for requests of `domain`; takes *keys (set to NULL) on success and
 * on failure. keys_path is only quoted in log lines. Must be called before the CURVE server
 * socket binds (libzmq lets a handshake through when no handler is bound). */
sy_status sy_zap_new(void *zctx, const char *domain, sy_curve_keyset_t **keys, const char *keys_path,
                     sy_zap_t **out);
/* The socket to poll for ZMQ_POLLIN. */
void *sy_zap_socket(const sy_zap_t *self);
/* Answers every queued request without blocking; returns how many it refused. */
int sy_zap_handle(sy_zap_t *self);
uint64_t sy_zap_accepted(const sy_zap_t *self);
uint64_t sy_zap_refused(const sy_zap_t *self);
int sy_zap_authorized(const sy_zap_t *self); /* keys in the set */
void sy_zap_destroy(sy_zap_t **self_p);

#endif
