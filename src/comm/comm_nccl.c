/* The "nccl" data plane (comm.h): the host half. GPU workers' collectives run in NCCL over
 * device buffers; the device half is the module libsy_comm_nccl.so (comm_nccl_internal.h),
 * loaded here on first use, so CPU processes never map NCCL or the CUDA runtime.
 *
 * Bootstrap (docs/protocol.md "NCCL data plane"). A nccl data plane wraps a tcp data plane: the
 * endpoint a worker reports in Hello is its tcp endpoint, and each generation's communicator opens
 * the tcp communicator over the members' endpoints first (CURVE included when the data plane has
 * it). NCCL is set up lazily by the generation's first collective: rank 0 makes the unique id
 * (ncclGetUniqueId), broadcasts its 128 bytes over that tcp communicator (tagged with the
 * generation, so an id of an aborted generation is dropped like any stale traffic), and every rank
 * calls ncclCommInitRankConfig non-blocking on its current CUDA device (the backend's), polled
 * against the deadline and the abort flag. Every later collective is NCCL's; the tcp
 * communicator stays open, idle, until the generation closes.
 *
 * Close: ncclCommAbort on every generation close (fail and destroy), then the tcp communicator.
 * Buffers: device memory in place (sy_comm_device_buffers); host memory staged by the module.
 * Threads: comm.h. */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/module.h"
#include "comm_internal.h"
#include "comm_nccl_internal.h"

#define NO_NCCL_FIX "use cluster.comm: tcp (switchyard-worker --comm tcp) where there is no GPU or no NCCL"

typedef struct {
    struct sy_dataplane base;
    sy_dataplane_t *tcp;
} nccl_dp;

typedef struct {
    struct sy_comm base;
    sy_comm_t *tcp;        /* the generation's bootstrap channel */
    sy_nccl_mcomm *m;      /* NULL until the first collective */
} nccl_comm;

/* ---------------------------------------------------------------- the module */

#ifdef SY_HAVE_NCCL
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static const sy_nccl_module_api *g_mod;
static char g_load_err[1024];

/* sy_module_load's check: the module's table is this build's ABI */
static bool accept_module(void *h, const char *path, void *ctx, char *err, size_t err_len) {
    (void)ctx;
    sy_nccl_module_fn fn = (sy_nccl_module_fn)dlsym(h, SY_NCCL_MODULE_SYMBOL);
    const sy_nccl_module_api *m = fn ? fn() : NULL;
    if (!m || m->abi != SY_NCCL_MODULE_ABI) {
        snprintf(err, err_len, "%.400s is not an NCCL module of this build (ABI %d, want %d)", path,
                 m ? m->abi : -1, SY_NCCL_MODULE_ABI);
        return false;
    }
    g_mod = m;
    return true;
}

/* Looked for as the CUDA backend module is (base/module.h): $SY_NCCL_MODULE, beside the
 * executable, one folder up, ../lib/switchyard/, the build folder. */
static void load_once(void) {
    const sy_module_spec spec = {
        .what = "the NCCL module",
        .env_var = "SY_NCCL_MODULE",
        .file = SY_NCCL_MODULE_FILE,
        .build_path = SY_NCCL_MODULE_BUILD_PATH,
        .dlopen_hint = "are NCCL and the CUDA runtime installed and on the library path?",
    };
    sy_module_load(&spec, accept_module, NULL, g_load_err, sizeof g_load_err);
}

static const sy_nccl_module_api *module(char *why, size_t why_len) {
    pthread_once(&g_once, load_once);
    if (!g_mod && why && why_len) snprintf(why, why_len, "%s", g_load_err);
    return g_mod;
}
#else
static const sy_nccl_module_api *module(char *why, size_t why_len) {
    if (why && why_len)
        snprintf(why, why_len, "this switchyard was built without NCCL (no nvcc or nccl.h when CMake configured it, "
                 "or -DSY_CUDA=OFF)");
    return NULL;
}
#endif

int sy_comm_nccl_available(char *why, size_t why_len) {
    const sy_nccl_module_api *m = module(why, why_len);
    if (!m) return -1;
    char r[256] = "";
    int n = m->devices(r, sizeof r);
    if (n <= 0) {
        if (why && why_len) snprintf(why, why_len, "no usable CUDA device: %s", r);
        return n < 0 ? -1 : 0;
    }
    if (why && why_len) m->versions(why, why_len);
    return n;
}

/* ---------------------------------------------------------------- data plane */

static sy_status dp_new(const char *bind_addr, const char *pub, const char *sec, sy_dataplane_t **out) {
    char why[1024];
    int n = sy_comm_nccl_available(why, sizeof why);
    if (n <= 0) return sy_err_set(SY_EINVAL, "data plane nccl: %s; %s", why, NO_NCCL_FIX);
    nccl_dp *d = calloc(1, sizeof *d);
    if (!d) return sy_err_set(SY_ENOMEM, "data plane nccl: allocation");
    sy_status st = pub ? sy_dataplane_new_curve("tcp", bind_addr, pub, sec, &d->tcp)
                       : sy_dataplane_new("tcp", bind_addr, &d->tcp);
    if (st != SY_OK) {
        free(d);
        return st;
    }
    *out = &d->base;
    return SY_OK;
}

static void dp_destroy(sy_dataplane_t *dp) {
    nccl_dp *d = (nccl_dp *)dp;
    sy_dataplane_destroy(&d->tcp);
    free(d);
}

static const char *dp_endpoint(const sy_dataplane_t *dp) { return sy_dataplane_endpoint(((const nccl_dp *)dp)->tcp); }
static uint64_t dp_dropped(const sy_dataplane_t *dp) { return sy_dataplane_dropped(((const nccl_dp *)dp)->tcp); }
static uint64_t dp_refused(const sy_dataplane_t *dp) { return sy_dataplane_refused(((const nccl_dp *)dp)->tcp); }

static sy_status dp_authorize(sy_dataplane_t *dp, const char *const *keys, int n, int hold_ms) {
    sy_dataplane_t *t = ((nccl_dp *)dp)->tcp;
    return t->ops->dp_authorize ? t->ops->dp_authorize(t, keys, n, hold_ms) : SY_OK;
}

/* ---------------------------------------------------------------- communicator */

static sy_status comm_new(sy_dataplane_t *dp, uint64_t gen, int rank, int world, const char *const *endpoints,
                          const char *const *peer_keys, int timeout_ms, sy_comm_t **out) {
    nccl_comm *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "comm nccl: allocation");
    sy_dataplane_t *t = ((nccl_dp *)dp)->tcp;
    sy_status st = peer_keys ? sy_comm_new_curve(t, gen, rank, world, endpoints, peer_keys, timeout_ms, &c->tcp)
                             : sy_comm_new(t, gen, rank, world, endpoints, timeout_ms, &c->tcp);
    if (st != SY_OK) {
        free(c);
        return st;
    }
    *out = &c->base;
    return SY_OK;
}

static void comm_destroy(sy_comm_t *base) {
    nccl_comm *c = (nccl_comm *)base;
    const sy_nccl_module_api *m = module(NULL, 0);
    if (m && c->m) m->comm_abort(c->m); /* ncclCommAbort on every generation close */
    sy_comm_destroy(&c->tcp);
    free(c);
}

static void comm_fail(sy_comm_t *base) {
    nccl_comm *c = (nccl_comm *)base;
    const sy_nccl_module_api *m = module(NULL, 0);
    if (m && c->m) m->comm_abort(c->m);
    c->m = NULL;
}

static void comm_on_abort(sy_comm_t *base) { sy_comm_abort(((nccl_comm *)base)->tcp); }

static int aborted_cb(void *ctx) { return sy_comm_aborted((const sy_comm_t *)ctx); }

/* The module's status and message as ours. */
static sy_status mod_status(int st, const char *err) {
    return st == SY_OK ? SY_OK : sy_err_set((sy_status)st, "%s", err[0] ? err : "nccl data plane: failed");
}

/* The generation's NCCL communicator, made by its first collective. */
static sy_status ready(nccl_comm *c, const sy_nccl_module_api **mp) {
    char err[1024] = "";
    const sy_nccl_module_api *m = module(err, sizeof err);
    if (!m) return sy_err_set(SY_EINVAL, "comm nccl: %s", err);
    *mp = m;
    if (c->m) return SY_OK;
    unsigned char id[SY_NCCL_ID_BYTES];
    memset(id, 0, sizeof id);
    if (c->base.rank == 0) SY_CHECK(mod_status(m->unique_id(id, err, sizeof err), err));
    /* the id to every member over this generation's tcp mesh */
    sy_status st = sy_comm_broadcast(c->tcp, id, sizeof id, 0);
    if (st != SY_OK) return sy_comm_aborted(&c->base) ? sy_err_set(SY_EABORTED, "comm nccl: aborted") : st;
    return mod_status(m->comm_new(id, c->base.rank, c->base.world, c->base.timeout_ms, aborted_cb, &c->base, &c->m,
                                  err, sizeof err), err);
}

static sy_status alltoallv(sy_comm_t *base, const void *send, const size_t *send_bytes, void *recv,
                           const size_t *recv_bytes) {
    nccl_comm *c = (nccl_comm *)base;
    const sy_nccl_module_api *m = NULL;
    SY_CHECK(ready(c, &m));
    char err[1024] = "";
    SY_CHECK(mod_status(m->alltoallv(c->m, send, send_bytes, recv, recv_bytes, err, sizeof err), err));
    for (int q = 0; q < base->world; q++)
        if (q != base->rank) base->stats.bytes_sent += send_bytes[q], base->stats.bytes_received += recv_bytes[q];
    return SY_OK;
}

static sy_status allreduce(sy_comm_t *base, void *buf, size_t n, sy_comm_dtype dt) {
    nccl_comm *c = (nccl_comm *)base;
    const sy_nccl_module_api *m = NULL;
    SY_CHECK(ready(c, &m));
    char err[1024] = "";
    return mod_status(m->allreduce(c->m, buf, n, dt == SY_COMM_F64, err, sizeof err), err);
}

static sy_status broadcast(sy_comm_t *base, void *buf, size_t bytes, int root) {
    nccl_comm *c = (nccl_comm *)base;
    const sy_nccl_module_api *m = NULL;
    SY_CHECK(ready(c, &m));
    char err[1024] = "";
    return mod_status(m->broadcast(c->m, buf, bytes, root, err, sizeof err), err);
}

static sy_status barrier(sy_comm_t *base) {
    nccl_comm *c = (nccl_comm *)base;
    const sy_nccl_module_api *m = NULL;
    SY_CHECK(ready(c, &m));
    char err[1024] = "";
    return mod_status(m->barrier(c->m, err, sizeof err), err);
}

static int device_lost(const sy_comm_t *c) {
    (void)c;
    const sy_nccl_module_api *m = module(NULL, 0);
    return m ? m->device_lost() : 0;
}

const sy_comm_ops sy_comm_nccl_ops = {
    .name = "nccl",
    .dp_new = dp_new,
    .dp_destroy = dp_destroy,
    .dp_endpoint = dp_endpoint,
    .dp_dropped = dp_dropped,
    .dp_refused = dp_refused,
    .dp_authorize = dp_authorize,
    .comm_new = comm_new,
    .comm_destroy = comm_destroy,
    .fail = comm_fail,
    .alltoallv = alltoallv,
    .allreduce = allreduce,
    .broadcast = broadcast,
    .barrier = barrier,
    .on_abort = comm_on_abort,
    .device_lost = device_lost,
    .device_buffers = true,
};
