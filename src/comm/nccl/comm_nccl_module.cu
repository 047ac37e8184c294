// The NCCL data plane's device half (comm_nccl_internal.h has the contract; comm_nccl.c is the
// host half). Built into libsy_comm_nccl.so, linked with NCCL and the CUDA runtime only.
//
// Compiled here (nvcc, -Werror); it has never run on a GPU in this project's CI (docs/protocol.md
// "NCCL data plane" says what has run where).
//
// Every wait is a poll: after each NCCL call (a non-blocking communicator may answer
// ncclInProgress) and after enqueueing a collective, wait_ready() loops over
// ncclCommGetAsyncError, cudaStreamQuery, the caller's abort test and the deadline, sleeping
// POLL_US between looks (well under SY_COMM_ABORT_MS / 2 = 25 ms). Abort, timeout and NCCL
// errors end in ncclCommAbort on this thread (NCCL forbids tearing down from another).
#include <cuda_runtime.h>
#include <nccl.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/status.h"
#include "comm_nccl_internal.h"

#define POLL_US 1000 // one look per millisecond

struct sy_nccl_mcomm {
    ncclComm_t comm;
    cudaStream_t stream;
    int rank, world, timeout_ms;
    int (*aborted)(void *ctx);
    void *ctx;
    bool torn_down;       // ncclCommAbort done
    void *scratch;        // all-reduce: [2, world, chunk] elements
    size_t scratch_bytes;
    int *one;             // barrier: one device int
    void *stage[2];       // device copies of host buffers handed to a collective: [0] send, [1] recv
    size_t stage_bytes[2];
};

static int g_device_lost; // set once, read by the training thread only

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int fail(int st, char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(int st, char *err, size_t n, const char *fmt, ...) {
    if (err && n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, n, fmt, ap);
        va_end(ap);
    }
    return st;
}

static void tear_down(sy_nccl_mcomm *c) {
    if (c->comm && !c->torn_down) ncclCommAbort(c->comm);
    c->torn_down = true;
}

// A CUDA error: sticky by assumption (the context may be lost), the process must exit.
static int cuda_fail(sy_nccl_mcomm *c, cudaError_t e, const char *what, char *err, size_t n) {
    g_device_lost = 1;
    if (c) tear_down(c);
    return fail(SY_EINTERNAL, err, n, "nccl data plane: %s: CUDA error %s (%s); the CUDA context is taken as lost",
                what, cudaGetErrorName(e), cudaGetErrorString(e));
}

static int nccl_fail(sy_nccl_mcomm *c, ncclResult_t r, const char *what, char *err, size_t n) {
    const char *last = c && c->comm ? ncclGetLastError(c->comm) : "";
    int st = fail(r == ncclRemoteError || r == ncclSystemError ? SY_EREMOTE : SY_EINTERNAL, err, n,
                  "nccl data plane: rank %d of %d: %s: %s%s%s", c ? c->rank : -1, c ? c->world : 0, what,
                  ncclGetErrorString(r), last && last[0] ? ": " : "", last ? last : "");
    if (c) tear_down(c);
    return st;
}

// Polls until the communicator is idle (no ncclInProgress) and, with stream, the stream has
// run dry; bounded by the communicator's timeout and its abort test.
static int wait_ready(sy_nccl_mcomm *c, bool stream, const char *what, char *err, size_t n) {
    const double deadline = now_ms() + c->timeout_ms;
    for (;;) {
        ncclResult_t as = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError(c->comm, &as);
        if (r != ncclSuccess) as = r;
        if (as != ncclSuccess && as != ncclInProgress) return nccl_fail(c, as, what, err, n);
        if (as == ncclSuccess) {
            if (!stream) return SY_OK;
            cudaError_t q = cudaStreamQuery(c->stream);
            if (q == cudaSuccess) return SY_OK;
            if (q != cudaErrorNotReady) return cuda_fail(c, q, what, err, n);
        }
        if (c->aborted && c->aborted(c->ctx)) {
            tear_down(c);
            return fail(SY_EABORTED, err, n, "nccl data plane: %s: aborted", what);
        }
        if (now_ms() > deadline) {
            tear_down(c);
            return fail(SY_ETIMEOUT, err, n, "nccl data plane: rank %d of %d: %s: not done within %d ms (a peer "
                        "missing or dead)", c->rank, c->world, what, c->timeout_ms);
        }
        usleep(POLL_US);
    }
}

// The answer of an NCCL call on a non-blocking communicator: success or in progress, then
// polled until the communicator is idle.
static int issued(sy_nccl_mcomm *c, ncclResult_t r, const char *what, char *err, size_t n) {
    if (r != ncclSuccess && r != ncclInProgress) return nccl_fail(c, r, what, err, n);
    return wait_ready(c, false, what, err, n);
}

#define ISSUE(c, call, what)                                       \
    do {                                                           \
        int st_ = issued((c), (call), (what), err, err_len);       \
        if (st_ != SY_OK) return st_;                              \
    } while (0)
#define CUDA(c, call, what)                                        \
    do {                                                           \
        cudaError_t e_ = (call);                                   \
        if (e_ != cudaSuccess) return cuda_fail((c), e_, (what), err, err_len); \
    } while (0)

// ---------------------------------------------------------------- module functions

static void m_versions(char *buf, size_t len) {
    int nv = 0, rv = 0;
    ncclGetVersion(&nv);
    cudaRuntimeGetVersion(&rv);
    snprintf(buf, len, "NCCL %d.%d.%d, CUDA runtime %d.%d", nv / 10000, nv / 100 % 100, nv % 100, rv / 1000,
             rv % 1000 / 10);
}

static int m_devices(char *why, size_t why_len) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why && why_len) snprintf(why, why_len, "cudaGetDeviceCount: %s", cudaGetErrorString(e));
        return -1;
    }
    if (n == 0 && why && why_len) snprintf(why, why_len, "cudaGetDeviceCount found no device");
    return n;
}

static int m_unique_id(unsigned char id[SY_NCCL_ID_BYTES], char *err, size_t err_len) {
    static_assert(sizeof(ncclUniqueId) == SY_NCCL_ID_BYTES, "ncclUniqueId size");
    ncclUniqueId u;
    ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess) return nccl_fail(NULL, r, "ncclGetUniqueId", err, err_len);
    memcpy(id, &u, sizeof u);
    return SY_OK;
}

static void m_comm_abort(sy_nccl_mcomm *c) {
    if (!c) return;
    tear_down(c);
    if (c->stream) cudaStreamDestroy(c->stream);
    if (c->scratch) cudaFree(c->scratch);
    if (c->one) cudaFree(c->one);
    for (int i = 0; i < 2; i++)
        if (c->stage[i]) cudaFree(c->stage[i]);
    free(c);
}

static int m_comm_new(const unsigned char id[SY_NCCL_ID_BYTES], int rank, int world, int timeout_ms,
                      int (*aborted)(void *ctx), void *ctx, sy_nccl_mcomm **out, char *err, size_t err_len) {
    *out = NULL;
    sy_nccl_mcomm *c = (sy_nccl_mcomm *)calloc(1, sizeof *c);
    if (!c) return fail(SY_ENOMEM, err, err_len, "nccl data plane: allocation");
    c->rank = rank, c->world = world, c->timeout_ms = timeout_ms, c->aborted = aborted, c->ctx = ctx;
    int dev = -1, st = SY_OK;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMalloc((void **)&c->one, sizeof(int));
    if (e != cudaSuccess) {
        st = fail(SY_EINVAL, err, err_len, "nccl data plane: rank %d: no usable CUDA device (%s)", rank,
                  cudaGetErrorString(e));
        m_comm_abort(c);
        return st;
    }
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0; // every wait is ours: polled, bounded, abortable
    ncclResult_t r = ncclCommInitRankConfig(&c->comm, world, u, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
        st = nccl_fail(c, r, "ncclCommInitRankConfig", err, err_len);
    } else if (!c->comm) {
        st = fail(SY_EINTERNAL, err, err_len, "nccl data plane: ncclCommInitRankConfig gave no communicator");
    } else {
        st = wait_ready(c, false, "communicator initialization (every rank must join)", err, err_len);
    }
    if (st != SY_OK) {
        m_comm_abort(c);
        return st;
    }
    *out = c;
    return SY_OK;
}

static int m_is_device_ptr(const void *p);

// The device address of the caller's buffer p: p itself when it is device memory, else the
// stage slot (grown as needed), filled from p when copy_in. Host memory costs two copies; the
// training step hands device buffers (sy_comm_device_buffers), the rest (norm scalars, replica
// restore) is small or rare.
static int to_device(sy_nccl_mcomm *c, int slot, const void *p, size_t bytes, bool copy_in, void **dev, char *err,
                     size_t err_len) {
    *dev = (void *)p;
    if (!bytes || m_is_device_ptr(p)) return SY_OK;
    if (bytes > c->stage_bytes[slot]) {
        if (c->stage[slot]) cudaFree(c->stage[slot]);
        c->stage[slot] = NULL, c->stage_bytes[slot] = 0;
        CUDA(c, cudaMalloc(&c->stage[slot], bytes), "staging buffer");
        c->stage_bytes[slot] = bytes;
    }
    *dev = c->stage[slot];
    if (copy_in) CUDA(c, cudaMemcpyAsync(*dev, p, bytes, cudaMemcpyHostToDevice, c->stream), "staging in");
    return SY_OK;
}

// Waits for the collective; then, when the result went to a stage slot, copies it to the
// caller's host buffer (after the wait: a copy to pageable memory would block unpolled).
static int finish(sy_nccl_mcomm *c, void *host, const void *dev, size_t bytes, const char *what, char *err,
                  size_t err_len) {
    int st = wait_ready(c, true, what, err, err_len);
    if (st != SY_OK || host == dev || !bytes) return st;
    CUDA(c, cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, c->stream), "staging out");
    return wait_ready(c, true, what, err, err_len);
}

// The caller's chunks, back to back, to and from every rank: grouped send/recv per peer, our
// own chunk by a device copy.
static int m_alltoallv(sy_nccl_mcomm *c, const void *send_p, const size_t *send_bytes, void *recv_p,
                       const size_t *recv_bytes, char *err, size_t err_len) {
    size_t so = 0, ro = 0, own_s = 0, own_r = 0, st_bytes = 0, rt_bytes = 0;
    for (int q = 0; q < c->world; q++) st_bytes += send_bytes[q], rt_bytes += recv_bytes[q];
    void *send, *recv;
    int st = to_device(c, 0, send_p, st_bytes, true, &send, err, err_len);
    if (st == SY_OK) st = to_device(c, 1, recv_p, rt_bytes, false, &recv, err, err_len);
    if (st != SY_OK) return st;
    for (int q = 0; q < c->rank; q++) own_s += send_bytes[q], own_r += recv_bytes[q];
    if (send_bytes[c->rank])
        CUDA(c, cudaMemcpyAsync((char *)recv + own_r, (const char *)send + own_s, send_bytes[c->rank],
                                cudaMemcpyDeviceToDevice, c->stream), "alltoallv: own chunk");
    ISSUE(c, ncclGroupStart(), "alltoallv: ncclGroupStart");
    for (int q = 0; q < c->world; q++) {
        if (q != c->rank && send_bytes[q])
            ISSUE(c, ncclSend((const char *)send + so, send_bytes[q], ncclInt8, q, c->comm, c->stream),
                  "alltoallv: ncclSend");
        if (q != c->rank && recv_bytes[q])
            ISSUE(c, ncclRecv((char *)recv + ro, recv_bytes[q], ncclInt8, q, c->comm, c->stream),
                  "alltoallv: ncclRecv");
        so += send_bytes[q], ro += recv_bytes[q];
    }
    ISSUE(c, ncclGroupEnd(), "alltoallv: ncclGroupEnd");
    return finish(c, recv_p, recv, rt_bytes, "alltoallv", err, err_len);
}

// out[i] = in[0][i] + in[1][i] + ... in rank order, one fixed formula per element (comm.h):
// s = x_0; s += x_1; ...; the same sum as the tcp and threads data planes compute on the CPU.
template <typename T>
__global__ void ordered_sum(T *out, const T *in, size_t chunk, int world, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    T s = in[i];
    for (int r = 1; r < world; r++) s += in[(size_t)r * chunk + i];
    out[i] = s;
}

// Reduce-scatter by an all-to-all of chunks, the ordered sum of our chunk on the device, then an
// all-gather: no NCCL reduction (its order depends on the topology), so the result is the
// rank-order sum on every rank, bit-identical to tcp's.
static int m_allreduce(sy_nccl_mcomm *c, void *buf_p, size_t n, int f64, char *err, size_t err_len) {
    const size_t es = f64 ? sizeof(double) : sizeof(float);
    void *buf;
    int st = to_device(c, 0, buf_p, n * es, true, &buf, err, err_len);
    if (st != SY_OK) return st;
    const int W = c->world;
    const size_t chunk = (n + W - 1) / W;
    const size_t need = 2 * (size_t)W * chunk * es;
    if (need > c->scratch_bytes) {
        if (c->scratch) cudaFree(c->scratch);
        c->scratch = NULL, c->scratch_bytes = 0;
        CUDA(c, cudaMalloc(&c->scratch, need), "allreduce: scratch");
        c->scratch_bytes = need;
    }
    char *parts = (char *)c->scratch;                 // [W, chunk]: rank r's part of our chunk
    char *gath = parts + (size_t)W * chunk * es;      // [W, chunk]: the summed chunks
    auto count = [&](int r) -> size_t {
        size_t lo = (size_t)r * chunk;
        return lo >= n ? 0 : (n - lo < chunk ? n - lo : chunk);
    };
    const size_t mine = count(c->rank);
    ISSUE(c, ncclGroupStart(), "allreduce: ncclGroupStart");
    for (int q = 0; q < W; q++) {
        if (q == c->rank) continue;
        if (count(q))
            ISSUE(c, ncclSend((const char *)buf + (size_t)q * chunk * es, count(q) * es, ncclInt8, q, c->comm,
                              c->stream), "allreduce: ncclSend");
        if (mine)
            ISSUE(c, ncclRecv(parts + (size_t)q * chunk * es, mine * es, ncclInt8, q, c->comm, c->stream),
                  "allreduce: ncclRecv");
    }
    ISSUE(c, ncclGroupEnd(), "allreduce: ncclGroupEnd");
    if (mine)
        CUDA(c, cudaMemcpyAsync(parts + (size_t)c->rank * chunk * es, (const char *)buf + (size_t)c->rank * chunk * es,
                                mine * es, cudaMemcpyDeviceToDevice, c->stream), "allreduce: own part");
    if (mine) {
        const unsigned threads = 256;
        const unsigned blocks = (unsigned)((mine + threads - 1) / threads);
        if (f64)
            ordered_sum<double><<<blocks, threads, 0, c->stream>>>((double *)(gath + (size_t)c->rank * chunk * es),
                                                                   (const double *)parts, chunk, W, mine);
        else
            ordered_sum<float><<<blocks, threads, 0, c->stream>>>((float *)(gath + (size_t)c->rank * chunk * es),
                                                                  (const float *)parts, chunk, W, mine);
        CUDA(c, cudaGetLastError(), "allreduce: ordered sum kernel");
    }
    // in place: sendbuff == recvbuff + rank * count
    ISSUE(c, ncclAllGather(gath + (size_t)c->rank * chunk * es, gath, chunk * es, ncclInt8, c->comm, c->stream),
          "allreduce: ncclAllGather");
    if (n) CUDA(c, cudaMemcpyAsync(buf, gath, n * es, cudaMemcpyDeviceToDevice, c->stream), "allreduce: result");
    return finish(c, buf_p, buf, n * es, "allreduce", err, err_len);
}

static int m_broadcast(sy_nccl_mcomm *c, void *buf_p, size_t bytes, int root, char *err, size_t err_len) {
    void *buf;
    int st = to_device(c, 0, buf_p, bytes, c->rank == root, &buf, err, err_len);
    if (st != SY_OK) return st;
    if (bytes) ISSUE(c, ncclBroadcast(buf, buf, bytes, ncclInt8, root, c->comm, c->stream), "broadcast");
    return finish(c, buf_p, buf, bytes, "broadcast", err, err_len);
}

static int m_barrier(sy_nccl_mcomm *c, char *err, size_t err_len) {
    ISSUE(c, ncclAllReduce(c->one, c->one, 1, ncclInt32, ncclMax, c->comm, c->stream), "barrier");
    return wait_ready(c, true, "barrier", err, err_len);
}

static int m_is_device_ptr(const void *p) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError(); // not sticky: clear it
        return 0;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

static int m_device_lost(void) { return g_device_lost; }

static const sy_nccl_module_api g_api = {
    SY_NCCL_MODULE_ABI, m_versions, m_devices, m_unique_id, m_comm_new, m_comm_abort,
    m_alltoallv, m_allreduce, m_broadcast, m_barrier, m_is_device_ptr, m_device_lost,
};

extern "C" __attribute__((visibility("default"))) const sy_nccl_module_api *sy_nccl_module(void) { return &g_api; }
