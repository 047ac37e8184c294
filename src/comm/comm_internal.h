/* What a data-plane implementation provides (comm.h has the contract each must keep).
 *
 * comm.c owns the generic part: the name -> implementation table, argument checks, world 1
 * (no implementation involved), the abort flag, the failed state and the counters' home. An
 * implementation embeds sy_dataplane / sy_comm as the first member of its own structs and fills
 * one sy_comm_ops; its functions are static, so implementations link side by side.
 *
 * Calls into an implementation: every op runs on the thread driving the communicator
 * (comm.h "Threads"). Collective ops are called only with valid arguments on a communicator
 * that is neither failed nor aborted, with world > 1; they poll sy_comm_aborted() between wait
 * slices of at most SY_COMM_ABORT_MS / 2 and return SY_EABORTED when it is set. Any error a
 * collective op returns fails the communicator: comm.c records it and calls ops->fail once,
 * which must drop everything in flight so that no reference to the caller's buffers remains
 * when it returns (bounded), and every later collective returns the same status. */
#ifndef SY_COMM_INTERNAL_H
#define SY_COMM_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>

#include "comm/comm.h"

/* Element types of all-reduce. */
typedef enum { SY_COMM_F32, SY_COMM_F64 } sy_comm_dtype;

typedef struct sy_comm_ops {
    const char *name;
    /* public_z85/secret_z85: NULL for plaintext, else both set (CURVE). */
    sy_status (*dp_new)(const char *bind_addr, const char *public_z85, const char *secret_z85,
                        sy_dataplane_t **out);
    /* Also detaches an open communicator (whose later collectives then fail). */
    void (*dp_destroy)(sy_dataplane_t *dp);
    const char *(*dp_endpoint)(const sy_dataplane_t *dp);
    uint64_t (*dp_dropped)(const sy_dataplane_t *dp);
    uint64_t (*dp_refused)(const sy_dataplane_t *dp); /* NULL: never refuses */
    /* Moves the data plane's own threads to SCHED_IDLE or back (base/bgsched.h): 0 or an errno;
     * NULL: it has none. */
    int (*dp_background)(sy_dataplane_t *dp, int on);
    /* Restricts those threads to these CPUs (base/bgsched.h sy_affinity_set): 0 or an errno;
     * NULL: it has none. */
    int (*dp_pin)(sy_dataplane_t *dp, const cpu_set_t *cpus);
    /* CURVE: admit exactly these n keys (Z85) from now on; NULL without CURVE */
    sy_status (*dp_authorize)(sy_dataplane_t *dp, const char *const *keys, int n, int hold_ms);
    /* world > 1, arguments checked; the base fields are filled in by comm.c afterwards. */
    /* peer_keys: NULL (plaintext) or world Z85 keys, checked by comm.c (valid Z85, dp CURVE). */
    sy_status (*comm_new)(sy_dataplane_t *dp, uint64_t gen, int rank, int world,
                          const char *const *endpoints, const char *const *peer_keys, int timeout_ms,
                          sy_comm_t **out);
    void (*comm_destroy)(sy_comm_t *c);
    void (*fail)(sy_comm_t *c);
    sy_status (*alltoallv)(sy_comm_t *c, const void *send, const size_t *send_bytes, void *recv,
                           const size_t *recv_bytes);
    sy_status (*allreduce)(sy_comm_t *c, void *buf, size_t n, sy_comm_dtype dt);
    sy_status (*broadcast)(sy_comm_t *c, void *buf, size_t bytes, int root);
    sy_status (*barrier)(sy_comm_t *c);
    /* Optional (NULL: none). on_abort: called by sy_comm_abort after the flag is set, from any
     * thread: may only set flags (async-signal-safe). device_lost: 1 when the device context is
     * lost (comm.h sy_comm_device_lost). */
    void (*on_abort)(sy_comm_t *c);
    int (*device_lost)(const sy_comm_t *c);
    bool device_buffers;       /* device memory in place (comm.h sy_comm_device_buffers) */
} sy_comm_ops;

struct sy_dataplane {
    const sy_comm_ops *ops;
    int curve;                 /* made by sy_dataplane_new_curve */
};

struct sy_comm {
    const sy_comm_ops *ops;    /* NULL: world 1 */
    uint64_t gen;
    int rank, world, timeout_ms;
    atomic_int aborted;        /* the only field another thread touches */
    sy_status failed;          /* SY_OK until a collective fails */
    char fail_msg[256];
    sy_comm_stats stats;       /* kept by the implementation, collectives by comm.c */
};

static inline bool sy_comm_aborted(const sy_comm_t *c) {
    return atomic_load_explicit(&((sy_comm_t *)c)->aborted, memory_order_relaxed) != 0;
}

extern const sy_comm_ops sy_comm_tcp_ops;
extern const sy_comm_ops sy_comm_threads_ops;
extern const sy_comm_ops sy_comm_nccl_ops;

#endif
