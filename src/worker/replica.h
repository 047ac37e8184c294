/* Peer replicas of expert state (docs/fault-tolerance.md "Peer replicas", issue 18).
 *
 * A worker's state that a failure destroys is its experts: dense parameters and their moments
 * are the same on every worker. After every optimizer step each worker sends the state of the
 * experts it owns (fp32 weights, both AdamW moments) to its buddies: rank r's copy k is on rank
 * (r + k) mod W, k = 1..min(replicas, W - 1), never on r itself. A recovery then restores the
 * step that was running from the members' memory instead of the last checkpoint.
 *
 * What one worker holds (each an exact state after some optimizer step, or nothing):
 *   live      the model and optimizer buffers: dense + the experts it owns, at `live step`
 *             (-1 while a restore writes them);
 *   2 stages  host copies of dense + its own experts of the two newest steps it replicated
 *             ([dense weights | m | v][its experts, ascending, each weights m v]): the newer is
 *             what goes to the buddies (the send buffer: no second copy), the older is what
 *             lets every rank give step k - 1 again while step k's replicas are on their way
 *             (a failure may land before some ranks hold them);
 *   2 slots   the complete replicas of other workers' experts, double buffered: a step's
 *             replicas are received into the older slot, which is marked invalid first and named
 *             by its step only once every piece of every buddy has arrived. A half-received
 *             replica is never a source.
 * sy_replica_holdings lists them for the coordinator (Holdings message); sy_replica_restore
 * rebuilds the live state of step R over a new generation's data plane as the coordinator's
 * plan says (dense from one rank by broadcast, each expert from one rank to its new owner by
 * one all-to-all-v).
 *
 * Two ways to exchange. sy_replica_exchange: on the caller's thread, over the training
 * communicator, before the caller goes on. sy_replica_post / sy_replica_wait (overlapped,
 * docs/fault-tolerance.md "Overlapped exchange"): the module's own thread copies the live state
 * of step L into a stage and exchanges it over a second communicator (of the replica data
 * plane) while the caller runs step L + 1; the caller must call sy_replica_wait_copied before
 * anything writes the live buffers (the update of L + 1), and sy_replica_wait before the next
 * post and before holdings, restore, forget or set_live (which wait themselves when needed: abort
 * the communicator first to make that wait short). The exchange ends with a barrier, so a
 * successful wait means every rank holds its buddies' replicas of L.
 *
 * The module reads and writes the model's parameters and the optimizer's moments in place; it
 * keeps pointers to both (rebuild the module when either is replaced). Thread: the training
 * thread calls every function; the communicator given to sy_replica_post is driven by the
 * module's thread from the post until sy_replica_wait returns (comm.h: one driving thread). */
#ifndef SY_REPLICA_H
#define SY_REPLICA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "comm/comm.h"
#include "model/model.h"
#include "model/optim.h"

/* Bytes per piece of a replica exchange: a step's replicas go out in rounds of all-to-all-v of at
 * most this many bytes per peer (bounds the buffers of the data plane). */
#define SY_REPLICA_PIECE_BYTES ((size_t)4 << 20)
/* Entries sy_replica_holdings fills at most: live, 2 stages, 2 slots. */
#define SY_REPLICA_MAX_HELD 5

typedef struct sy_replica sy_replica_t;

typedef struct {
    int64_t step;
    bool dense;
    const bool *experts; /* [E], owned by the module; valid until its next call */
} sy_replica_held;

/* Counters (bytes this worker sent to buddies, time in exchanges) for benchmarks and logs. */
typedef struct {
    uint64_t exchanges, bytes_sent, bytes_received;
    uint64_t deltas; /* exchanges that sent gradients, not whole states */
    double exchange_ms; /* on the thread that exchanges (overlapped: not the training thread's) */
    double keep_ms;     /* copying the live state into a stage */
    double wait_ms;     /* the training thread blocked in sy_replica_wait / wait_copied */
} sy_replica_stats;

sy_status sy_replica_new(sy_model_t *m, sy_adamw_t *opt, sy_replica_t **out);
void sy_replica_destroy(sy_replica_t **self_p);

/* The live buffers now hold the state after step `step` (-1: no whole state) with these experts
 * (copied). The next exchange sends whole states. */
void sy_replica_set_live(sy_replica_t *r, int64_t step, const bool *owned);
/* The live state advanced by one optimizer step to `step` (= live step + 1; same experts): the
 * model's gradient buffer holds the clipped gradients that update consumed, and the optimizer
 * its learning rate and step count. The next exchange may then send those gradients instead of
 * whole states (a delta exchange: see sy_replica_exchange). */
void sy_replica_stepped(sy_replica_t *r, int64_t step);
/* cluster.replica_cpus: the exchange thread runs only on these CPUs from now on (NULL: leaves its
 * CPUs as they are; the caller restores them). 0, or the errno of restricting the running thread
 * (a thread started later restricts itself, unchecked: the caller checks the set on the replica
 * data plane's threads first, sy_dataplane_pin). */
int sy_replica_set_cpus(sy_replica_t *r, const cpu_set_t *cpus);
/* Test hook: bytes per piece of an exchange (0: SY_REPLICA_PIECE_BYTES); the same on every rank. */
void sy_replica_set_piece_bytes(sy_replica_t *r, size_t bytes);
int64_t sy_replica_live_step(const sy_replica_t *r);

/* Drops every state held (a new coordinator incarnation: its run may differ, e.g. a run length
 * changed on --resume changes the learning-rate schedule, so an old state of step s is not its
 * step s). */
void sy_replica_forget(sy_replica_t *r);

/* Test hook: called after each round of an exchange (round 0 = the first piece went out). */
typedef void (*sy_replica_piece_fn)(void *ctx, int64_t step, int round, int rounds);
void sy_replica_set_piece_hook(sy_replica_t *r, sy_replica_piece_fn fn, void *ctx);

/* Copies the live state into the older stage, sends its experts (placement[e] == this rank) to
 * the `replicas` buddies and receives the buddies' into the older slot, which holds live step's
 * replicas once this returns SY_OK. replicas is already min(cluster.replicas, W - 1); 0 or
 * W == 1: nothing. A delta exchange (the live state is one step past the last successful
 * exchange, sy_replica_stepped, same placement and replicas) sends each expert's clipped
 * gradients instead (4 bytes a parameter, not 12), and each buddy runs its owner's AdamW update
 * on its replicas of the step before (sy_adamw_apply_host: the same bits) into the older slot.
 * Every rank decides alike (the same history); a mismatch would fail the exchange on its sizes. */
sy_status sy_replica_exchange(sy_replica_t *r, sy_comm_t *comm, const uint32_t *placement, int replicas);

/* The same, overlapped: returns at once; the module's thread copies the live state, exchanges it
 * over comm (which it drives until sy_replica_wait returns) and ends with a barrier. A post
 * while one is pending waits for that one first (and returns its error, posting nothing).
 * Nothing to do (replicas 0, W == 1, no live state): SY_OK, nothing pending. */
sy_status sy_replica_post(sy_replica_t *r, sy_comm_t *comm, const uint32_t *placement, int replicas);
/* Waits until the pending post's copy of the live state is taken (the live buffers may then
 * change); returns at once when none is pending. */
void sy_replica_wait_copied(sy_replica_t *r);
/* Waits for the pending post to end: SY_OK when every rank holds its replicas of that step (the
 * slot is named by it), else the exchange's error (the slot stays invalid). SY_OK when none is
 * pending. */
sy_status sy_replica_wait(sy_replica_t *r);

/* The whole states held now (at most SY_REPLICA_MAX_HELD). */
int sy_replica_holdings(sy_replica_t *r, sy_replica_held *out);

/* Rebuilds the live state after step `step` for a new generation (rank of world, comm NULL
 * when world == 1): dense from rank dense_source, expert e from rank expert_source[e] to its
 * owner placement[e]. This rank's part of the plan must be in its holdings (else SY_EINVAL,
 * before any byte moves). On success the live state is `step` with the experts placement gives
 * this rank. note: a line for the log ("N expert(s) received, ..."). */
sy_status sy_replica_restore(sy_replica_t *r, sy_comm_t *comm, int rank, int world, int64_t step, int dense_source,
                             const int32_t *expert_source, const uint32_t *placement, char *note, size_t note_cap);

sy_replica_stats sy_replica_get_stats(const sy_replica_t *r);

/* Background scheduling of the overlapped exchange (docs/fault-tolerance.md "Replication in the
 * background"): from each post until the training thread has to wait for it, dp's own threads
 * (the replica data plane's, where the sealing and socket work happen) and, once it has taken
 * its copy of the live state, the module's thread run in the idle class (base/bgsched.h), so the
 * replication takes only CPU time the training does not use; a wait moves them back to the
 * normal class first, and the module's thread returns to it when the exchange ends. dp NULL: off. True when on (the
 * process can move threads to the idle class and back: sy_bg_available). */
bool sy_replica_set_background(sy_replica_t *r, sy_dataplane_t *dp);

#endif
