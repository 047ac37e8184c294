/* The data plane (system spec §4): collectives between the workers of one generation.
 *
 * Interface (device-agnostic; a GPU worker will plug in an NCCL implementation of the same
 * table): all-to-all-v (the Switch dispatch and combine), all-reduce-sum (dense gradients,
 * norms), broadcast, barrier, abort. Every wait has a deadline: a missing or dead peer becomes
 * SY_ETIMEOUT (message names the peer rank and the operation) or SY_EABORTED, never a hang.
 *
 * The `tcp` implementation (comm_tcp.c) is a ZeroMQ mesh: each worker owns one sy_dataplane_t
 * for its whole life (a socket bound at startup, whose endpoint it reports to the coordinator
 * in Hello); per generation it opens a sy_comm_t over the peers' endpoints. Every message is
 * tagged with (generation, sequence number of the collective, source rank); messages of another
 * generation are dropped, so stale traffic from an aborted generation can never be mistaken for
 * current data.
 *
 * Results are identical on every rank and do not depend on timing: all-reduce sums in rank order
 * 0..W-1 (each rank reduces one chunk in that fixed order, then the chunks are all-gathered).
 *
 * Thread: one thread drives a sy_comm_t; sy_comm_abort() may be called from any thread. */
#ifndef SY_COMM_H
#define SY_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef struct sy_dataplane sy_dataplane_t;
typedef struct sy_comm sy_comm_t;

/* Binds the data-plane socket. bind_addr: "tcp://127.0.0.1:*" style (port * = any free port).
 * The bound endpoint (with the real port) is returned by sy_dataplane_endpoint(). */
sy_status sy_dataplane_new(const char *bind_addr, sy_dataplane_t **out);
void sy_dataplane_destroy(sy_dataplane_t **self_p);
const char *sy_dataplane_endpoint(const sy_dataplane_t *dp);
/* Messages the data plane dropped: of an older generation than the communicator open when they
 * were read, or not well-formed data-plane messages. */
uint64_t sy_dataplane_dropped(const sy_dataplane_t *dp);

/* Opens the communicator of one generation: this process is `rank` of `world`; endpoints[r] is
 * rank r's data-plane endpoint (endpoints[rank] is ours). timeout_ms bounds every wait.
 * Does not wait for peers (connections are made lazily by ZeroMQ); the first collective does. */
sy_status sy_comm_new(sy_dataplane_t *dp, uint64_t generation, int rank, int world,
                      const char *const *endpoints, int timeout_ms, sy_comm_t **out);
/* Closes the generation's sockets; pending incoming messages of this generation are dropped. */
void sy_comm_destroy(sy_comm_t **self_p);

int sy_comm_rank(const sy_comm_t *c);
int sy_comm_world(const sy_comm_t *c);

/* All-to-all-v over bytes. send holds world chunks back to back, chunk r (send_bytes[r] bytes)
 * goes to rank r (the chunk for ourselves is copied locally). On return recv holds the chunks
 * received from ranks 0..world-1 back to back, recv_bytes[r] giving each size; recv_cap is the
 * capacity of recv (SY_EINVAL naming the sender if it would overflow). */
sy_status sy_comm_alltoallv(sy_comm_t *c, const void *send, const size_t *send_bytes, void *recv,
                            size_t recv_cap, size_t *recv_bytes);

/* In-place sum over ranks, identical result on every rank (fixed rank-order reduction). */
sy_status sy_comm_allreduce_f32(sy_comm_t *c, float *buf, size_t n);
sy_status sy_comm_allreduce_f64(sy_comm_t *c, double *buf, size_t n);

/* buf (bytes) from root to every rank. */
sy_status sy_comm_broadcast(sy_comm_t *c, void *buf, size_t bytes, int root);
sy_status sy_comm_barrier(sy_comm_t *c);

/* Makes every pending and future wait of this communicator return SY_EABORTED promptly
 * (within ~50 ms). Thread-safe; idempotent. */
void sy_comm_abort(sy_comm_t *c);

/* Counters for benchmarks and status: bytes sent/received, collectives run. */
typedef struct {
    uint64_t bytes_sent, bytes_received, collectives;
} sy_comm_stats;
sy_comm_stats sy_comm_get_stats(const sy_comm_t *c);

#endif
