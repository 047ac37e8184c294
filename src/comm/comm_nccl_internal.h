/* The boundary between the comm library and the NCCL module (comm_nccl.c loads it).
 *
 * The NCCL data plane's device half is a separate shared module, libsy_comm_nccl.so
 * (src/comm/nccl/comm_nccl_module.cu), linked with NCCL and the CUDA runtime; comm_nccl.c loads
 * it with dlopen only when a "nccl" data plane is opened. So a CPU process never maps NCCL or the
 * CUDA runtime (the same reason as the CUDA backend module, backend/cuda/cuda_module_internal.h),
 * and the module needs nothing of the project: it reports errors as text and status values.
 *
 * What the module does: one NCCL communicator per generation on the calling thread's current
 * CUDA device, non-blocking (ncclCommInitRankConfig, blocking = 0), and the collectives of
 * comm.h on device buffers, each enqueued on the module's own stream and then polled (stream
 * query, ncclCommGetAsyncError, the caller's abort test, the deadline) in slices of at most
 * SY_COMM_ABORT_MS / 2; abort, timeout or an NCCL error tear the communicator down
 * (ncclCommAbort) on the calling thread. A host buffer handed to a collective is staged through a
 * device buffer of the communicator (copied in and out); device buffers are used in place.
 * What it does not do: exchange the unique id (the host
 * half does, over the generation's tcp mesh), check arguments (comm.c does), order after the
 * caller's own stream (the caller syncs its backend first).
 *
 * Every function returns an sy_status value (base/status.h) and writes the reason to err on
 * failure. A CUDA error on the module's stream is taken as sticky (the context is lost, as the
 * CUDA backend does): device_lost() then stays 1 for the process's life and the process must
 * exit (comm.h sy_comm_device_lost).
 *
 * The module exports one symbol, sy_nccl_module (SY_NCCL_MODULE_SYMBOL), returning its table.
 * SY_NCCL_MODULE_ABI changes whenever the table does. */
#ifndef SY_COMM_NCCL_INTERNAL_H
#define SY_COMM_NCCL_INTERNAL_H

#include <stddef.h>

#define SY_NCCL_MODULE_ABI 1
#define SY_NCCL_MODULE_FILE "libsy_comm_nccl.so"
#define SY_NCCL_MODULE_SYMBOL "sy_nccl_module"
#define SY_NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId) (NCCL_UNIQUE_ID_BYTES) */

typedef struct sy_nccl_mcomm sy_nccl_mcomm;

typedef struct {
    int abi;
    /* "NCCL 2.28.9, CUDA runtime 13.0": the versions the module runs with */
    void (*versions)(char *buf, size_t len);
    /* CUDA devices visible: >= 0, or -1 when the runtime cannot start (why gets the reason) */
    int (*devices)(char *why, size_t why_len);
    /* ncclGetUniqueId (rank 0 of each generation) */
    int (*unique_id)(unsigned char id[SY_NCCL_ID_BYTES], char *err, size_t err_len);
    /* The communicator, rank of world, on the current device; polls until it is ready, the
     * deadline (timeout_ms) or aborted(ctx) != 0. */
    int (*comm_new)(const unsigned char id[SY_NCCL_ID_BYTES], int rank, int world, int timeout_ms,
                    int (*aborted)(void *ctx), void *ctx, sy_nccl_mcomm **out, char *err, size_t err_len);
    /* ncclCommAbort (when not done already) and free; NULL is fine */
    void (*comm_abort)(sy_nccl_mcomm *c);
    /* comm.h semantics on device buffers; element types: 0 fp32, 1 fp64 */
    int (*alltoallv)(sy_nccl_mcomm *c, const void *send, const size_t *send_bytes, void *recv,
                     const size_t *recv_bytes, char *err, size_t err_len);
    int (*allreduce)(sy_nccl_mcomm *c, void *buf, size_t n, int f64, char *err, size_t err_len);
    int (*broadcast)(sy_nccl_mcomm *c, void *buf, size_t bytes, int root, char *err, size_t err_len);
    int (*barrier)(sy_nccl_mcomm *c, char *err, size_t err_len);
    /* 1 when p is device (or managed) memory of the CUDA runtime, 0 otherwise */
    int (*is_device_ptr)(const void *p);
    /* 1 once a CUDA error has been seen (process-wide: the context is lost) */
    int (*device_lost)(void);
} sy_nccl_module_api;

typedef const sy_nccl_module_api *(*sy_nccl_module_fn)(void);

#endif
