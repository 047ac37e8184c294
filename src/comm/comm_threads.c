/* The `threads` data plane (comm.h): ranks are threads of one process; collectives exchange
 * through shared memory. For tests and tools: it runs the callers of the data plane (expert
 * parallelism, the distributed step) with W ranks in one process, without sockets.
 *
 * Mailboxes. Each sy_dataplane_t is one mailbox: a queue of messages guarded by a mutex and a
 * condition variable, registered in a process-wide table under a number; its endpoint is
 * "threads://<number>". A send copies the payload into a new message and appends it to the
 * peer's mailbox, found by number in the table (under the table's lock, so a mailbox being
 * destroyed is never touched: a message for a destroyed one is lost, as tcp data to a dead
 * peer is, and the receiver times out). Sends never wait, and the caller's buffers are free
 * again as soon as a collective returns.
 *
 * Messages carry (generation, round sequence number, op, source rank) as tcp's headers do: a
 * receiver takes the messages of its current round, leaves those of later rounds or generations
 * queued (they are "stashed" in place) and drops older ones (sy_dataplane_dropped). Sizes and
 * ops are checked as tcp checks them (SY_EFORMAT naming the rank).
 *
 * Waits sleep on the condition variable in slices of SY_THREADS_SLICE_MS, checking the abort
 * flag between slices; no progress for timeout_ms is SY_ETIMEOUT naming the missing ranks.
 *
 * All-reduce: every rank sends its whole buffer to every other rank, and each rank sums the W
 * inputs itself in rank order (s = x_0; s += x_1; ...), the very formula of tcp's reduce-
 * scatter: results are bit-identical to tcp's, on every rank. (W times tcp's traffic: fine for
 * tests.) */
#include "comm/comm.h"
#include "comm_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/clock.h"

#define SY_THREADS_SLICE_MS 10  /* abort is noticed within one slice */
#define SY_THREADS_PREFIX "threads://"

enum { OP_A2A = 1, OP_AR = 2, OP_BCAST = 4, OP_BARRIER = 5 };

static const char *op_name(int op) {
    switch (op) {
    case OP_A2A: return "alltoallv";
    case OP_AR: return "allreduce";
    case OP_BCAST: return "broadcast";
    case OP_BARRIER: return "barrier";
    default: return "unknown-op";
    }
}

typedef struct th_msg {
    struct th_msg *next;
    uint64_t gen;
    uint32_t seq;
    int op, src;
    size_t len;
    unsigned char data[];
} th_msg;

typedef struct th_comm th_comm;

typedef struct th_dp {
    sy_dataplane_t base;
    uint64_t id;
    char endpoint[48];
    pthread_mutex_t mu;        /* guards the queue */
    pthread_cond_t cv;         /* a message arrived */
    th_msg *head, *tail;
    uint64_t dropped;          /* owner thread only */
    th_comm *active;
    struct th_dp *next_reg;    /* the process-wide table */
} th_dp;

struct th_comm {
    sy_comm_t b;
    th_dp *dp;                 /* NULL once the data plane was destroyed */
    uint64_t *peer;            /* [world] mailbox number of each rank */
    uint32_t seq;
    th_msg **got;              /* [world] this round's message from each rank */
};

/* The table of live mailboxes. Lock order: g_mu, then a mailbox's mu. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static th_dp *g_reg;
static uint64_t g_next_id = 1;

/* ---------------------------------------------------------------- data plane */

static sy_status th_dp_new(const char *bind_addr, const char *public_z85, const char *secret_z85,
                           sy_dataplane_t **out) {
    (void)secret_z85;
    if (public_z85) return sy_err_set(SY_EINVAL, "data plane: threads has no wire to authenticate (CURVE is tcp's)");
    (void)bind_addr;
    th_dp *dp = calloc(1, sizeof *dp);
    if (!dp) return sy_err_set(SY_ENOMEM, "data plane: allocation");
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&dp->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&dp->mu, NULL);
    pthread_mutex_lock(&g_mu);
    dp->id = g_next_id++;
    dp->next_reg = g_reg;
    g_reg = dp;
    pthread_mutex_unlock(&g_mu);
    snprintf(dp->endpoint, sizeof dp->endpoint, SY_THREADS_PREFIX "%" PRIu64, dp->id);
    *out = &dp->base;
    return SY_OK;
}

static void free_list(th_msg *m) {
    while (m) {
        th_msg *n = m->next;
        free(m);
        m = n;
    }
}

static void th_dp_destroy(sy_dataplane_t *base) {
    th_dp *dp = (th_dp *)base;
    pthread_mutex_lock(&g_mu);
    for (th_dp **p = &g_reg; *p; p = &(*p)->next_reg)
        if (*p == dp) {
            *p = dp->next_reg;
            break;
        }
    pthread_mutex_unlock(&g_mu);
    if (dp->active) dp->active->dp = NULL;
    free_list(dp->head);
    pthread_mutex_destroy(&dp->mu);
    pthread_cond_destroy(&dp->cv);
    free(dp);
}

static const char *th_dp_endpoint(const sy_dataplane_t *dp) { return ((const th_dp *)dp)->endpoint; }
static uint64_t th_dp_dropped(const sy_dataplane_t *dp) { return ((const th_dp *)dp)->dropped; }

/* Drops queued messages with gen < below_gen, or gen == below_gen when `inclusive`. */
static void drop_old(th_dp *dp, uint64_t gen, bool inclusive) {
    pthread_mutex_lock(&dp->mu);
    th_msg **p = &dp->head, *last = NULL;
    while (*p) {
        th_msg *m = *p;
        if (m->gen < gen || (inclusive && m->gen == gen)) {
            *p = m->next;
            free(m);
            dp->dropped++;
        } else {
            last = m;
            p = &m->next;
        }
    }
    dp->tail = last;
    pthread_mutex_unlock(&dp->mu);
}

/* ---------------------------------------------------------------- communicator */

static sy_status th_comm_new(sy_dataplane_t *base, uint64_t gen, int rank, int world,
                             const char *const *endpoints, const char *const *peer_keys, int timeout_ms,
                             sy_comm_t **out) {
    (void)timeout_ms;
    (void)peer_keys; /* comm.c refuses keys for a data plane without CURVE */
    th_dp *dp = (th_dp *)base;
    if (dp->active)
        return sy_err_set(SY_EINVAL, "comm: the data plane already has the communicator of generation %llu open",
                          (unsigned long long)dp->active->b.gen);
    th_comm *c = calloc(1, sizeof *c);
    if (c) c->peer = calloc((size_t)world, sizeof *c->peer);
    if (c && c->peer) c->got = calloc((size_t)world, sizeof *c->got);
    if (!c || !c->peer || !c->got) {
        if (c) free(c->peer);
        free(c);
        return sy_err_set(SY_ENOMEM, "comm: allocation for world %d", world);
    }
    for (int r = 0; r < world; r++) {
        if (r == rank) {
            c->peer[r] = dp->id;
            continue;
        }
        const char *ep = endpoints[r];
        char *end = NULL;
        unsigned long long id = 0;
        if (!strncmp(ep, SY_THREADS_PREFIX, strlen(SY_THREADS_PREFIX))) {
            errno = 0;
            id = strtoull(ep + strlen(SY_THREADS_PREFIX), &end, 10);
        }
        if (!end || *end || id == 0 || errno) {
            free(c->got);
            free(c->peer);
            free(c);
            return sy_err_set(SY_EINVAL, "comm: endpoint of rank %d '%s' is not a threads:// endpoint", r, ep);
        }
        c->peer[r] = id;
    }
    c->dp = dp;
    drop_old(dp, gen, false);
    dp->active = c;
    *out = &c->b;
    return SY_OK;
}

static void clear_got(th_comm *c) {
    for (int r = 0; r < c->b.world; r++) {
        free(c->got[r]);
        c->got[r] = NULL;
    }
}

static void th_comm_destroy(sy_comm_t *base) {
    th_comm *c = (th_comm *)base;
    clear_got(c);
    if (c->dp) {
        drop_old(c->dp, c->b.gen, true);
        if (c->dp->active == c) c->dp->active = NULL;
    }
    free(c->got);
    free(c->peer);
    free(c);
}

/* Nothing in flight refers to the caller's buffers (sends copy): drop this round's messages. */
static void th_fail(sy_comm_t *base) { clear_got((th_comm *)base); }

/* ---------------------------------------------------------------- rounds */

static sy_status th_send(th_comm *c, int op, int dst, const void *data, size_t len) {
    th_msg *m = malloc(sizeof *m + len);
    if (!m) return sy_err_set(SY_ENOMEM, "comm: %s: message of %zu bytes", op_name(op), len);
    *m = (th_msg){.gen = c->b.gen, .seq = c->seq, .op = op, .src = c->b.rank, .len = len};
    if (len) memcpy(m->data, data, len);
    pthread_mutex_lock(&g_mu);
    th_dp *to = g_reg;
    while (to && to->id != c->peer[dst]) to = to->next_reg;
    if (to) {
        pthread_mutex_lock(&to->mu);
        if (to->tail)
            to->tail->next = m;
        else
            to->head = m;
        to->tail = m;
        pthread_cond_signal(&to->cv);
        pthread_mutex_unlock(&to->mu);
    }
    pthread_mutex_unlock(&g_mu);
    if (!to) free(m); /* the peer is gone: like tcp data to a dead peer, it times out there */
    c->b.stats.bytes_sent += len;
    return SY_OK;
}

/* Starts a round: a fresh sequence number, no message taken yet. */
static sy_status th_round_begin(th_comm *c, int op) {
    if (c->seq == UINT32_MAX)
        return sy_err_set(SY_EINVAL, "comm: %s: generation %llu used all its rounds; open a new generation",
                          op_name(op), (unsigned long long)c->b.gen);
    c->seq++;
    clear_got(c);
    return SY_OK;
}

/* Collects this round's message from every rank r with expect[r]; checks op and size
 * (want[r], or any size when want is NULL). */
static sy_status th_round_recv(th_comm *c, int op, const bool *expect, const size_t *want) {
    th_dp *dp = c->dp;
    int remaining = 0;
    for (int r = 0; r < c->b.world; r++) remaining += expect[r];
    int64_t last = sy_mono_ms();
    sy_status st = SY_OK;
    pthread_mutex_lock(&dp->mu);
    while (remaining > 0 && st == SY_OK) {
        th_msg **p = &dp->head, *prev = NULL;
        while (*p && st == SY_OK) {
            th_msg *m = *p;
            bool old = m->gen < c->b.gen || (m->gen == c->b.gen && m->seq < c->seq);
            bool now = m->gen == c->b.gen && m->seq == c->seq;
            if (!old && !now) { /* a later round or generation: stays queued */
                prev = m;
                p = &m->next;
                continue;
            }
            *p = m->next;
            if (dp->tail == m) dp->tail = prev;
            if (old || m->src < 0 || m->src >= c->b.world || m->src == c->b.rank) {
                free(m);
                dp->dropped++;
                continue;
            }
            if (m->op != op)
                st = sy_err_set(SY_EFORMAT, "comm: round #%u (generation %llu): rank %d is in %s while rank %d runs %s",
                                c->seq, (unsigned long long)c->b.gen, m->src, op_name(m->op), c->b.rank,
                                op_name(op));
            else if (!expect[m->src] || c->got[m->src])
                st = sy_err_set(SY_EFORMAT, "comm: %s #%u: unexpected message from rank %d", op_name(op), c->seq,
                                m->src);
            else if (want && m->len != want[m->src])
                st = sy_err_set(SY_EFORMAT, "comm: %s #%u: rank %d sends %zu bytes, rank %d expects %zu",
                                op_name(op), c->seq, m->src, m->len, c->b.rank, want[m->src]);
            if (st != SY_OK) {
                free(m);
                break;
            }
            c->got[m->src] = m;
            c->b.stats.bytes_received += m->len;
            remaining--;
            last = sy_mono_ms();
        }
        if (remaining == 0 || st != SY_OK) break;
        if (sy_comm_aborted(&c->b)) {
            st = sy_err_set(SY_EABORTED, "comm: %s #%u (generation %llu) aborted", op_name(op), c->seq,
                            (unsigned long long)c->b.gen);
            break;
        }
        int64_t t = sy_mono_ms();
        if (t - last >= c->b.timeout_ms) {
            char who[200] = "";
            for (int r = 0; r < c->b.world; r++) {
                size_t o = strlen(who);
                if (expect[r] && !c->got[r] && o + 16 < sizeof who)
                    snprintf(who + o, sizeof who - o, "%s%d", o ? ", " : "", r);
            }
            st = sy_err_set(SY_ETIMEOUT, "comm: %s #%u (generation %llu): no data from rank(s) %s within %d ms",
                            op_name(op), c->seq, (unsigned long long)c->b.gen, who, c->b.timeout_ms);
            break;
        }
        int64_t left = last + c->b.timeout_ms - t;
        int64_t wait_ms = left < SY_THREADS_SLICE_MS ? left : SY_THREADS_SLICE_MS;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += (long)(wait_ms * 1000000);
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&dp->cv, &dp->mu, &ts);
    }
    pthread_mutex_unlock(&dp->mu);
    return st;
}

static sy_status th_enter(th_comm *c, const char *what) {
    if (!c->dp) return sy_err_set(SY_EINVAL, "comm: %s: its data plane was destroyed", what);
    return SY_OK;
}

/* ---------------------------------------------------------------- collectives */

static sy_status th_alltoallv(sy_comm_t *base, const void *send, const size_t *send_bytes, void *recv,
                              const size_t *recv_bytes) {
    th_comm *c = (th_comm *)base;
    SY_CHECK(th_enter(c, "alltoallv"));
    const int W = c->b.world, me = c->b.rank;
    bool expect[W];
    size_t send_off[W], recv_off[W], so = 0, ro = 0;
    for (int r = 0; r < W; r++) {
        send_off[r] = so, recv_off[r] = ro;
        so += send_bytes[r], ro += recv_bytes[r];
        expect[r] = r != me;
    }
    const char *s = send;
    char *d = recv;
    SY_CHECK(th_round_begin(c, OP_A2A));
    for (int k = 1; k < W; k++) {
        int dst = (me + k) % W;
        SY_CHECK(th_send(c, OP_A2A, dst, s + send_off[dst], send_bytes[dst]));
    }
    if (send_bytes[me]) memcpy(d + recv_off[me], s + send_off[me], send_bytes[me]);
    SY_CHECK(th_round_recv(c, OP_A2A, expect, recv_bytes));
    for (int r = 0; r < W; r++)
        if (r != me && recv_bytes[r]) memcpy(d + recv_off[r], c->got[r]->data, recv_bytes[r]);
    clear_got(c);
    return SY_OK;
}

static sy_status th_allreduce(sy_comm_t *base, void *buf, size_t n, sy_comm_dtype dt) {
    th_comm *c = (th_comm *)base;
    SY_CHECK(th_enter(c, "allreduce"));
    const int W = c->b.world, me = c->b.rank;
    const size_t esz = dt == SY_COMM_F32 ? sizeof(float) : sizeof(double);
    bool expect[W];
    size_t want[W];
    for (int r = 0; r < W; r++) expect[r] = r != me, want[r] = n * esz;
    SY_CHECK(th_round_begin(c, OP_AR));
    for (int k = 1; k < W; k++) SY_CHECK(th_send(c, OP_AR, (me + k) % W, buf, n * esz));
    SY_CHECK(th_round_recv(c, OP_AR, expect, want));
    /* s = x_0; s += x_1; ... elementwise, in the element type (tcp's formula). */
    if (dt == SY_COMM_F32) {
        const float *in[W];
        for (int r = 0; r < W; r++) in[r] = r == me ? (const float *)buf : (const float *)c->got[r]->data;
        float *out = buf;
        for (size_t i = 0; i < n; i++) {
            float acc = in[0][i];
            for (int r = 1; r < W; r++) acc += in[r][i];
            out[i] = acc;
        }
    } else {
        const double *in[W];
        for (int r = 0; r < W; r++) in[r] = r == me ? (const double *)buf : (const double *)c->got[r]->data;
        double *out = buf;
        for (size_t i = 0; i < n; i++) {
            double acc = in[0][i];
            for (int r = 1; r < W; r++) acc += in[r][i];
            out[i] = acc;
        }
    }
    clear_got(c);
    return SY_OK;
}

static sy_status th_broadcast(sy_comm_t *base, void *buf, size_t bytes, int root) {
    th_comm *c = (th_comm *)base;
    SY_CHECK(th_enter(c, "broadcast"));
    const int W = c->b.world, me = c->b.rank;
    SY_CHECK(th_round_begin(c, OP_BCAST));
    if (me == root) {
        for (int k = 1; k < W; k++) SY_CHECK(th_send(c, OP_BCAST, (root + k) % W, buf, bytes));
        return SY_OK;
    }
    bool expect[W];
    size_t want[W];
    for (int r = 0; r < W; r++) expect[r] = r == root, want[r] = bytes;
    SY_CHECK(th_round_recv(c, OP_BCAST, expect, want));
    if (bytes) memcpy(buf, c->got[root]->data, bytes);
    clear_got(c);
    return SY_OK;
}

static sy_status th_barrier(sy_comm_t *base) {
    th_comm *c = (th_comm *)base;
    SY_CHECK(th_enter(c, "barrier"));
    const int W = c->b.world, me = c->b.rank;
    bool expect[W];
    size_t want[W];
    for (int r = 0; r < W; r++) expect[r] = r != me, want[r] = 0;
    SY_CHECK(th_round_begin(c, OP_BARRIER));
    for (int k = 1; k < W; k++) SY_CHECK(th_send(c, OP_BARRIER, (me + k) % W, NULL, 0));
    SY_CHECK(th_round_recv(c, OP_BARRIER, expect, want));
    clear_got(c);
    return SY_OK;
}

const sy_comm_ops sy_comm_threads_ops = {
    .name = "threads",
    .dp_new = th_dp_new,
    .dp_destroy = th_dp_destroy,
    .dp_endpoint = th_dp_endpoint,
    .dp_dropped = th_dp_dropped,
    .comm_new = th_comm_new,
    .comm_destroy = th_comm_destroy,
    .fail = th_fail,
    .alltoallv = th_alltoallv,
    .allreduce = th_allreduce,
    .broadcast = th_broadcast,
    .barrier = th_barrier,
};
