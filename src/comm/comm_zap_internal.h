/* The data plane's ZAP handler (ZeroMQ RFC 27): who may connect to a CURVE data plane.
 *
 * libzmq asks the handler bound at inproc://zeromq.zap.01 in the data plane's zmq context about
 * every CURVE handshake on the PULL socket. This one runs in its own small thread (the training
 * thread may sit in a long step) and answers from a set of authorized public keys: the members
 * of the current generation (sy_dp_zap_authorize, called when the communicator of a generation
 * opens). A key in the set is accepted at once, with its Z85 text as the ZeroMQ User-Id (so
 * every message of that connection names the key it came with). A key not in the set is held,
 * not refused at once: a member of the next generation may connect a moment before this worker
 * has opened that generation, and libzmq never reconnects after a refused handshake. A held
 * request is accepted as soon as its key is authorized, and refused (ZAP 400, counted, logged)
 * when the hold time passes without that (or when more than SY_DP_ZAP_PENDING_MAX are held: the
 * oldest is refused). A refused client's connection is closed by libzmq before any of its
 * messages reaches the PULL socket.
 *
 * Thread: sy_dp_zap_authorize and the counters from any thread; start/stop from the owner. */
#ifndef SY_COMM_ZAP_INTERNAL_H
#define SY_COMM_ZAP_INTERNAL_H

#include <stdint.h>

#include "base/status.h"

#define SY_DP_ZAP_DOMAIN "switchyard-data"
#define SY_DP_ZAP_PENDING_MAX 128
/* Hold time before any generation was opened, and the bound on every hold (libzmq closes a
 * handshake that takes longer than ZMQ_HANDSHAKE_IVL, 30 s by default). */
#define SY_DP_ZAP_HOLD_DEFAULT_MS 10000
#define SY_DP_ZAP_HOLD_MAX_MS 20000

typedef struct sy_dp_zap sy_dp_zap;

/* Binds the handler in zctx (before any CURVE socket of zctx binds) and starts its thread. */
sy_status sy_dp_zap_start(void *zctx, sy_dp_zap **out);
/* Replaces the authorized set by n raw 32-byte keys (duplicates are fine: `switchyard run` may
 * give every worker the same pair); hold_ms: the hold time from now on (capped as above). */
sy_status sy_dp_zap_authorize(sy_dp_zap *z, const uint8_t (*keys)[32], int n, int hold_ms);
uint64_t sy_dp_zap_refused(const sy_dp_zap *z);
uint64_t sy_dp_zap_accepted(const sy_dp_zap *z);
/* Stops the thread and closes its socket (before zmq_ctx_term of zctx). NULL-safe. */
void sy_dp_zap_stop(sy_dp_zap **z_p);

#endif
