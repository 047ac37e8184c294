/* The data plane (system spec §4): collectives between the workers of one generation.
 *
 * One interface, several implementations chosen at run time by name (sy_dataplane_new's
 * `kind`), each behind an ops table (comm_internal.h) so that they link side by side:
 *   "tcp"      (comm_tcp.c) a ZeroMQ PUSH/PULL mesh between worker processes: the CPU workers'
 *              data plane (development, CI, tests).
 *   "threads"  (comm_threads.c) ranks are threads of one process exchanging through shared
 *              memory: tests and tools only (a worker is a process, so `switchyard run` cannot
 *              use it). Same semantics and the same rank-order reductions, so results are
 *              bit-identical to tcp.
 *   "nccl"     (comm_nccl.c) GPU workers: NCCL over device buffers, bootstrapped over a tcp
 *              data plane it wraps (its endpoint is the tcp one). Needs a CUDA device and the
 *              NCCL module (libsy_comm_nccl.so); without them sy_dataplane_new fails naming the
 *              reason and the fix. Compiled; never yet run on a GPU (docs/protocol.md).
 * Collectives: all-to-all-v (the Switch dispatch and combine), all-reduce-sum (dense gradients,
 * norms), broadcast, barrier; plus abort. Every wait has a deadline: a missing or dead peer
 * becomes SY_ETIMEOUT (message names the peer rank and the operation) or SY_EABORTED, never a
 * hang.
 *
 * Lifecycle. Each worker owns one sy_dataplane_t for its whole life (for tcp a socket bound at
 * startup, whose endpoint it reports to the coordinator in Hello); per generation it opens a
 * sy_comm_t over the peers' endpoints. Traffic is tagged with (generation, sequence number of
 * the collective, source rank); traffic of another generation is dropped, so stale data from an
 * aborted generation can never be mistaken for current data. One communicator per data plane at
 * a time. world == 1 needs no data plane (dp may be NULL) and no implementation, except nccl,
 * which runs a one-rank NCCL communicator (so its callers hand it device buffers at any world).
 *
 * Results are identical on every rank, do not depend on timing nor on the implementation:
 * all-reduce sums in rank order 0..W-1 (s = x_0; s += x_1; ...; elementwise, each element by one
 * fixed formula).
 *
 * Buffers. tcp and threads read and write the buffers given to collectives with the CPU: host
 * memory (a device backend stages through it). nccl uses device memory in place
 * (sy_comm_device_buffers) and stages host memory through a device buffer of its own (two
 * copies: for small or rare collectives); it orders nothing after the caller's own device work:
 * the caller syncs its backend first. The caller may
 * reuse or free its buffers as soon as a collective returns.
 *
 * Threads. One thread (the training thread) drives a sy_comm_t: every function here except
 * sy_comm_abort() is called from it only. sy_comm_abort() may be called from any thread at any
 * time while the communicator exists: it only sets a flag. The driving thread notices the flag
 * within SY_COMM_ABORT_MS (between wait slices), tears the collective down itself and returns
 * SY_EABORTED; so does every later collective. (NCCL forbids tearing down a communicator from
 * another thread while a collective runs: this keeps all teardown on the driving thread.)
 * sy_comm_destroy() must not race sy_comm_abort(): the owner of the pointer serializes them. */
#ifndef SY_COMM_H
#define SY_COMM_H

#include <sched.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

/* Abort (and a peer's failure seen by the threads implementation) is noticed within this. */
#define SY_COMM_ABORT_MS 50

typedef struct sy_dataplane sy_dataplane_t;
typedef struct sy_comm sy_comm_t;

/* The implementation names, NULL-terminated ("tcp", "threads", "nccl"); `kind` of
 * sy_dataplane_new. */
extern const char *const sy_comm_kinds[];

/* Opens this process's (or, for "threads", this thread's) data plane of implementation `kind`.
 * bind_addr: tcp: "tcp://127.0.0.1:*" style (port * = any free port); threads: ignored (NULL
 * is fine). The endpoint the peers connect to is sy_dataplane_endpoint(). An unknown kind is
 * SY_EINVAL naming the known ones. */
sy_status sy_dataplane_new(const char *kind, const char *bind_addr, sy_dataplane_t **out);
void sy_dataplane_destroy(sy_dataplane_t **self_p);
const char *sy_dataplane_kind(const sy_dataplane_t *dp);
const char *sy_dataplane_endpoint(const sy_dataplane_t *dp);
/* Messages the data plane dropped: of an older generation than the communicator open when they
 * were read, or not well-formed data-plane messages. */
uint64_t sy_dataplane_dropped(const sy_dataplane_t *dp);

/* CurveZMQ (tcp only; docs/security.md "Data plane"). Same as sy_dataplane_new, but the PULL
 * socket is a CURVE server with this process's key pair (Z85 text, 40 characters each) and a
 * ZAP handler (comm_zap_internal.h) admits only the public keys of the open generation's members (set by
 * sy_comm_new_curve); every other client's handshake is refused and counted
 * (sy_dataplane_refused) before any of its messages is read. "threads" has no wire: SY_EINVAL. */
sy_status sy_dataplane_new_curve(const char *kind, const char *bind_addr, const char *public_z85,
                                 const char *secret_z85, sy_dataplane_t **out);
/* True for a data plane made by sy_dataplane_new_curve. */
int sy_dataplane_is_curve(const sy_dataplane_t *dp);
/* CURVE handshakes the data plane refused (0 without CURVE). */
uint64_t sy_dataplane_refused(const sy_dataplane_t *dp);
/* Runs the data plane's own threads (tcp: ZeroMQ's I/O and reaper threads, where the CURVE
 * encryption and the socket work happen) in the background scheduling class (on) or the normal
 * one (base/bgsched.h; check sy_bg_available first). SY_OK, or SY_EIO naming the errno; a kind
 * without threads of its own: SY_OK. */
sy_status sy_dataplane_set_background(sy_dataplane_t *dp, int on);
/* Restricts the data plane's own threads to these CPUs (cluster.replica_cpus; base/bgsched.h).
 * SY_OK, or SY_EIO naming the errno (EINVAL: none of them is a CPU this process may use); a kind
 * without threads of its own: SY_OK. */
sy_status sy_dataplane_pin(sy_dataplane_t *dp, const cpu_set_t *cpus);

/* Opens the communicator of one generation: this process is `rank` of `world`; endpoints[r] is
 * rank r's data-plane endpoint (endpoints[rank] is ours). timeout_ms bounds every wait.
 * Does not wait for peers; the first collective does. */
sy_status sy_comm_new(sy_dataplane_t *dp, uint64_t generation, int rank, int world,
                      const char *const *endpoints, int timeout_ms, sy_comm_t **out);
/* Same, on a CURVE data plane: peer_keys[r] is rank r's public key (Z85). The data plane then
 * admits exactly these keys (the previous generation's are no longer admitted; connections
 * already made stay, and their old-generation traffic is dropped as before); every PUSH socket
 * is a CURVE client with our key pair and peer_keys[r] as the server's key; and a message whose
 * connection's key is not peer_keys[src] of its header's source rank is dropped and counted
 * (sy_dataplane_dropped), so a member cannot speak for another rank when keys differ. Keys may
 * repeat (one pair for every worker of a run). SY_EINVAL when the data plane is not CURVE or a
 * key is not 40 valid Z85 characters. */
sy_status sy_comm_new_curve(sy_dataplane_t *dp, uint64_t generation, int rank, int world,
                            const char *const *endpoints, const char *const *peer_keys, int timeout_ms,
                            sy_comm_t **out);
/* Closes the generation; pending incoming traffic of this generation is dropped. */
void sy_comm_destroy(sy_comm_t **self_p);

int sy_comm_rank(const sy_comm_t *c);
int sy_comm_world(const sy_comm_t *c);

/* All-to-all-v over bytes, all sizes known before it starts (as NCCL needs). send holds world
 * chunks back to back, chunk r (send_bytes[r] bytes) goes to rank r (our own is copied
 * locally). recv receives the chunks of ranks 0..world-1 back to back, recv_bytes[r] bytes from
 * rank r; the caller knows them (from the route plan's counts, or from a first exchange of
 * sizes). send and recv must not overlap. A peer that sends another size than expected fails
 * the collective (SY_EFORMAT naming the rank and both sizes). */
sy_status sy_comm_alltoallv(sy_comm_t *c, const void *send, const size_t *send_bytes, void *recv,
                            const size_t *recv_bytes);

/* In-place sum over ranks, identical result on every rank (fixed rank-order reduction). */
sy_status sy_comm_allreduce_f32(sy_comm_t *c, float *buf, size_t n);
sy_status sy_comm_allreduce_f64(sy_comm_t *c, double *buf, size_t n);

/* buf (bytes) from root to every rank. */
sy_status sy_comm_broadcast(sy_comm_t *c, void *buf, size_t bytes, int root);
sy_status sy_comm_barrier(sy_comm_t *c);

/* Sets the abort flag, nothing else: the pending and every future collective of this
 * communicator returns SY_EABORTED, the pending one within SY_COMM_ABORT_MS. Any thread;
 * idempotent; async-signal-safe. */
void sy_comm_abort(sy_comm_t *c);

/* 1 when c's collectives take device buffers in place (nccl: hand it backend buffers, no
 * staging), 0 when they read host memory (tcp, threads, and world 1 without a data plane). */
int sy_comm_device_buffers(const sy_comm_t *c);
/* 1 when a collective of c failed because the CUDA context is lost (a sticky CUDA error): the
 * process must report it (Fault) and exit, as the CUDA backend does. 0 for tcp and threads. */
int sy_comm_device_lost(const sy_comm_t *c);
/* Whether the nccl data plane can run in this process: the number of CUDA devices (> 0) with
 * the NCCL and CUDA runtime versions in why; 0 or -1 with the reason in why (built without NCCL,
 * module not loadable, no device). Loads the NCCL module; for start-up checks. */
int sy_comm_nccl_available(char *why, size_t why_len);

/* Counters for benchmarks and status: payload bytes sent to / received from other ranks (our
 * own chunk of an all-to-all is not counted), collectives run. */
typedef struct {
    uint64_t bytes_sent, bytes_received, collectives;
} sy_comm_stats;
sy_comm_stats sy_comm_get_stats(const sy_comm_t *c);

#endif
