/* The generic half of the data plane (comm.h): picks the implementation by name, checks
 * arguments, runs world 1 itself, keeps the abort flag and the failed state, and calls the
 * implementation's ops (comm_internal.h) for the rest. */
#include "comm/comm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdbool.h>
#include <stdint.h>
#include <zmq.h>

#include "base/bgsched.h"
#include "comm_internal.h"

static const sy_comm_ops *const KINDS[] = {&sy_comm_tcp_ops, &sy_comm_threads_ops, &sy_comm_nccl_ops};
#define N_KINDS (sizeof KINDS / sizeof KINDS[0])

const char *const sy_comm_kinds[] = {"tcp", "threads", "nccl", NULL};

/* ---------------------------------------------------------------- data plane */

static bool z85_ok(const char *z85) {
    uint8_t raw[32];
    return z85 && strlen(z85) == 40 && zmq_z85_decode(raw, z85) != NULL;
}

static sy_status dp_open(const char *kind, const char *bind_addr, const char *pub, const char *sec,
                         sy_dataplane_t **out) {
    if (!out) return sy_err_set(SY_EINVAL, "data plane: NULL out");
    *out = NULL;
    for (size_t i = 0; i < N_KINDS; i++) {
        if (kind && !strcmp(kind, KINDS[i]->name)) {
            SY_CHECK(KINDS[i]->dp_new(bind_addr, pub, sec, out));
            (*out)->ops = KINDS[i];
            (*out)->curve = pub != NULL;
            return SY_OK;
        }
    }
    return sy_err_set(SY_EINVAL, "data plane: unknown kind '%s' (known: tcp, threads, nccl)", kind ? kind : "(null)");
}

void sy_dataplane_destroy(sy_dataplane_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_dataplane_t *dp = *self_p;
    *self_p = NULL;
    dp->ops->dp_destroy(dp);
}

sy_status sy_dataplane_new(const char *kind, const char *bind_addr, sy_dataplane_t **out) {
    return dp_open(kind, bind_addr, NULL, NULL, out);
}

sy_status sy_dataplane_new_curve(const char *kind, const char *bind_addr, const char *public_z85,
                                 const char *secret_z85, sy_dataplane_t **out) {
    if (out) *out = NULL;
    if (!z85_ok(public_z85) || !z85_ok(secret_z85))
        return sy_err_set(SY_EINVAL, "data plane: a CURVE key pair is two keys of 40 Z85 characters");
    return dp_open(kind, bind_addr, public_z85, secret_z85, out);
}

int sy_dataplane_is_curve(const sy_dataplane_t *dp) { return dp ? dp->curve : 0; }
uint64_t sy_dataplane_refused(const sy_dataplane_t *dp) {
    return dp && dp->ops->dp_refused ? dp->ops->dp_refused(dp) : 0;
}

sy_status sy_dataplane_set_background(sy_dataplane_t *dp, int on) {
    if (!dp || !dp->ops->dp_background) return SY_OK;
    int e = dp->ops->dp_background(dp, on);
    return e ? sy_err_set(SY_EIO, "data plane: threads to the %s scheduling class: %s", on ? "idle" : "normal",
                          strerror(e))
             : SY_OK;
}

sy_status sy_dataplane_pin(sy_dataplane_t *dp, const cpu_set_t *cpus) {
    if (!dp || !dp->ops->dp_pin) return SY_OK;
    int e = dp->ops->dp_pin(dp, cpus);
    return e ? sy_err_set(SY_EIO, "data plane: threads to CPUs %s: %s", sy_cpulist_str(cpus).s, strerror(e)) : SY_OK;
}

const char *sy_dataplane_kind(const sy_dataplane_t *dp) { return dp ? dp->ops->name : ""; }
const char *sy_dataplane_endpoint(const sy_dataplane_t *dp) { return dp ? dp->ops->dp_endpoint(dp) : ""; }
uint64_t sy_dataplane_dropped(const sy_dataplane_t *dp) { return dp ? dp->ops->dp_dropped(dp) : 0; }

/* ---------------------------------------------------------------- communicator */

sy_status sy_comm_new(sy_dataplane_t *dp, uint64_t generation, int rank, int world,
                      const char *const *endpoints, int timeout_ms, sy_comm_t **out) {
    if (dp && dp->curve) {
        if (out) *out = NULL;
        return sy_err_set(SY_EINVAL, "comm: a CURVE data plane needs the members' keys (sy_comm_new_curve)");
    }
    return sy_comm_new_curve(dp, generation, rank, world, endpoints, NULL, timeout_ms, out);
}

sy_status sy_comm_new_curve(sy_dataplane_t *dp, uint64_t generation, int rank, int world,
                            const char *const *endpoints, const char *const *peer_keys, int timeout_ms,
                            sy_comm_t **out) {
    if (!out) return sy_err_set(SY_EINVAL, "comm: NULL out");
    *out = NULL;
    if (world < 1 || world > 65535 || rank < 0 || rank >= world)
        return sy_err_set(SY_EINVAL, "comm: rank %d of world %d is not valid", rank, world);
    if (timeout_ms <= 0) return sy_err_set(SY_EINVAL, "comm: timeout_ms %d must be > 0", timeout_ms);
    sy_comm_t *c = NULL;
    /* world 1 runs here, without an implementation, except for one that takes device buffers
     * (nccl): it runs its own one-rank communicator, so that callers hand it the same buffers
     * at any world size */
    if (world == 1 && !(dp && dp->ops->device_buffers)) {
        /* no peers, but a CURVE data plane still admits only this generation's member (us) */
        if (dp && dp->curve && peer_keys && z85_ok(peer_keys[0]) && dp->ops->dp_authorize)
            SY_CHECK(dp->ops->dp_authorize(dp, peer_keys, 1, timeout_ms));
        c = calloc(1, sizeof *c);
        if (!c) return sy_err_set(SY_ENOMEM, "comm: allocation");
    } else {
        if (!dp) return sy_err_set(SY_EINVAL, "comm: world %d needs a data plane", world);
        if (!endpoints && world > 1) return sy_err_set(SY_EINVAL, "comm: NULL endpoints");
        for (int r = 0; r < world; r++)
            if (r != rank && (!endpoints[r] || !endpoints[r][0]))
                return sy_err_set(SY_EINVAL, "comm: endpoint of rank %d is empty", r);
        if (peer_keys && !dp->curve)
            return sy_err_set(SY_EINVAL, "comm: members' keys given for a data plane without CURVE");
        if (!peer_keys && dp->curve)
            return sy_err_set(SY_EINVAL, "comm: a CURVE data plane needs the members' keys");
        for (int r = 0; peer_keys && r < world; r++)
            if (!z85_ok(peer_keys[r]))
                return sy_err_set(SY_EINVAL, "comm: the public key of rank %d is not 40 Z85 characters", r);
        SY_CHECK(dp->ops->comm_new(dp, generation, rank, world, endpoints, peer_keys, timeout_ms, &c));
        c->ops = dp->ops;
    }
    c->gen = generation;
    c->rank = rank;
    c->world = world;
    c->timeout_ms = timeout_ms;
    c->failed = SY_OK;
    atomic_init(&c->aborted, 0);
    *out = c;
    return SY_OK;
}

void sy_comm_destroy(sy_comm_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_comm_t *c = *self_p;
    *self_p = NULL;
    if (c->ops)
        c->ops->comm_destroy(c);
    else
        free(c);
}

int sy_comm_rank(const sy_comm_t *c) { return c ? c->rank : -1; }
int sy_comm_world(const sy_comm_t *c) { return c ? c->world : 0; }

void sy_comm_abort(sy_comm_t *c) {
    if (!c) return;
    atomic_store(&c->aborted, 1);
    if (c->ops && c->ops->on_abort) c->ops->on_abort(c);
}

int sy_comm_device_buffers(const sy_comm_t *c) { return c && c->ops && c->ops->device_buffers; }

int sy_comm_device_lost(const sy_comm_t *c) { return c && c->ops && c->ops->device_lost ? c->ops->device_lost(c) : 0; }

sy_comm_stats sy_comm_get_stats(const sy_comm_t *c) {
    sy_comm_stats z = {0, 0, 0};
    return c ? c->stats : z;
}

/* Records a collective's failure and lets the implementation drop what is in flight. */
static sy_status comm_fail(sy_comm_t *c, sy_status st) {
    c->failed = st;
    snprintf(c->fail_msg, sizeof c->fail_msg, "%s", sy_err_msg());
    if (c->ops) c->ops->fail(c);
    return st;
}

/* Entry check of every collective. Abort wins over an earlier failure. */
static sy_status comm_enter(sy_comm_t *c, const char *what) {
    if (!c) return sy_err_set(SY_EINVAL, "comm: %s on a NULL communicator", what);
    if (sy_comm_aborted(c)) {
        sy_err_set(SY_EABORTED, "comm: %s: communicator of generation %llu was aborted", what,
                   (unsigned long long)c->gen);
        return c->failed == SY_OK ? comm_fail(c, SY_EABORTED) : SY_EABORTED;
    }
    if (c->failed != SY_OK)
        return sy_err_set(c->failed, "comm: %s: communicator failed earlier (%s); destroy it", what, c->fail_msg);
    return SY_OK;
}

/* The result of an implementation's collective. */
static sy_status comm_done(sy_comm_t *c, sy_status st) {
    if (st != SY_OK) return comm_fail(c, st);
    c->stats.collectives++;
    return SY_OK;
}

sy_status sy_comm_alltoallv(sy_comm_t *c, const void *send, const size_t *send_bytes, void *recv,
                            const size_t *recv_bytes) {
    SY_CHECK(comm_enter(c, "alltoallv"));
    if (!send_bytes || !recv_bytes) return sy_err_set(SY_EINVAL, "comm: alltoallv: NULL send_bytes or recv_bytes");
    size_t send_total = 0, recv_total = 0;
    for (int r = 0; r < c->world; r++) send_total += send_bytes[r], recv_total += recv_bytes[r];
    if ((send_total && !send) || (recv_total && !recv))
        return sy_err_set(SY_EINVAL, "comm: alltoallv: NULL buffer for %zu bytes to send / %zu to receive",
                          send_total, recv_total);
    if (send_bytes[c->rank] != recv_bytes[c->rank])
        return sy_err_set(SY_EINVAL, "comm: alltoallv: rank %d sends itself %zu bytes but expects %zu", c->rank,
                          send_bytes[c->rank], recv_bytes[c->rank]);
    if (send_total && recv_total) {
        const char *s = send, *r = recv;
        if (s < r + recv_total && r < s + send_total)
            return sy_err_set(SY_EINVAL, "comm: alltoallv: send and recv buffers overlap");
    }
    if (!c->ops) { /* world 1 */
        if (send_bytes[0]) memcpy(recv, send, send_bytes[0]);
        return comm_done(c, SY_OK);
    }
    return comm_done(c, c->ops->alltoallv(c, send, send_bytes, recv, recv_bytes));
}

static sy_status allreduce(sy_comm_t *c, void *buf, size_t n, sy_comm_dtype dt) {
    SY_CHECK(comm_enter(c, "allreduce"));
    if (n && !buf) return sy_err_set(SY_EINVAL, "comm: allreduce: NULL buffer for %zu elements", n);
    if (!c->ops) return comm_done(c, SY_OK); /* world 1 */
    return comm_done(c, c->ops->allreduce(c, buf, n, dt));
}

sy_status sy_comm_allreduce_f32(sy_comm_t *c, float *buf, size_t n) { return allreduce(c, buf, n, SY_COMM_F32); }
sy_status sy_comm_allreduce_f64(sy_comm_t *c, double *buf, size_t n) { return allreduce(c, buf, n, SY_COMM_F64); }

sy_status sy_comm_broadcast(sy_comm_t *c, void *buf, size_t bytes, int root) {
    SY_CHECK(comm_enter(c, "broadcast"));
    if (root < 0 || root >= c->world)
        return sy_err_set(SY_EINVAL, "comm: broadcast: root %d not in world %d", root, c->world);
    if (bytes && !buf) return sy_err_set(SY_EINVAL, "comm: broadcast: NULL buffer for %zu bytes", bytes);
    if (!c->ops) return comm_done(c, SY_OK); /* world 1 */
    return comm_done(c, c->ops->broadcast(c, buf, bytes, root));
}

sy_status sy_comm_barrier(sy_comm_t *c) {
    SY_CHECK(comm_enter(c, "barrier"));
    if (!c->ops) return comm_done(c, SY_OK); /* world 1 */
    return comm_done(c, c->ops->barrier(c));
}
