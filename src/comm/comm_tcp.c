/* The `tcp` data plane (comm.h): collectives over a ZeroMQ PUSH/PULL mesh.
 *
 * Sockets. A sy_dataplane_t owns a zmq context and one PULL socket bound at bind_addr for the
 * whole process (RCVHWM 0 so a fast sender is never refused; ZMQ_MAXMSGSIZE caps a frame at one
 * chunk plus slack, so a stranger cannot make us allocate gigabytes). A sy_comm_t (one per
 * generation) owns one PUSH socket per peer, connected to the peer's endpoint (SNDHWM 0 so a
 * send never blocks, ZMQ_IMMEDIATE off so messages queue until the connection is up; LINGER
 * is chosen at close, see Closing). One PUSH -> PULL pipe per (generation, sender, receiver) is FIFO,
 * which the protocol relies on: a sender's chunks of one round arrive in order.
 *
 * Messages. Two frames: a 32-byte header (magic "SYDP", version, op, source rank, chunk index,
 * round sequence number, generation, total payload bytes of this (round, source -> dest)
 * stream; 32 bytes fit in a zmq message without allocation) and the payload of one chunk (at
 * most SY_COMM_CHUNK = 1 MiB, which keeps zmq's receive allocations in the reused heap rather
 * than one mmap per message, and lets the receiver copy chunk k while chunk k+1 is on the
 * wire; 256 KiB..4 MiB measured within noise, 1 MiB best). A stream of 0 bytes is one empty
 * chunk, so every round exchanges at least one message per expected pair and a receiver always
 * learns the size. Header fields are host byte order (all workers of a
 * cluster share an architecture). Every collective is one or two rounds; each round takes the
 * next sequence number, so the pair (generation, seq) names a round uniquely.
 *
 * Receiving. Messages are read only by the thread running a collective. A message of the
 * current generation and round is handled at once; one of a later round of this generation
 * (a fast peer that is already in the next collective), or of a later generation (a peer that
 * already opened the next communicator), is stashed in arrival order and replayed when its
 * round begins; one of an older generation is dropped and counted (sy_dataplane_dropped), as
 * is a frame that is not a well-formed data-plane message. A message of the current round that
 * breaks the protocol (wrong op: the ranks run different collectives; chunk out of order; size
 * mismatch) fails the collective with SY_EFORMAT/SY_EINVAL naming the rank.
 *
 * Deadlines. Each wait (incoming data of a round, our outgoing data leaving the process) polls in
 * slices of at most SY_COMM_SLICE_MS, checking the abort flag between slices; it fails with
 * SY_ETIMEOUT when timeout_ms pass without progress (no expected message arrived, no send
 * completed), naming the collective, its sequence number and the ranks that did not deliver.
 * Progress resets the clock so a large transfer on a slow link is not cut off while it moves;
 * a dead, stopped or absent peer stops progress and is reported after timeout_ms.
 *
 * Zero copy. Every payload frame is sent straight from the caller's buffer (zmq_msg_init_data);
 * zmq calls our free function from its I/O thread when it no longer needs the buffer (a large
 * frame once written to the kernel, a small one once copied into zmq's own output batch), which
 * decrements a per-peer counter and signals an eventfd when it reaches zero. A collective does
 * not return until all its payload frames were released, so the caller may reuse or free its
 * buffers at once (all-reduce relies on it between its two rounds, as it overwrites the blocks
 * it sent). Received payloads are copied once, from zmq's message into their final place (or
 * into the all-reduce scratch); nothing else is copied. Buffers reused across collectives: the
 * stash, the held-message list, the all-reduce scratch.
 *
 * Closing. A communicator destroyed after successful collectives closes its PUSH sockets with
 * LINGER = timeout_ms: bytes still in zmq's batches, which a slower peer may need to finish the
 * last collective, still go out (zmq owns them by then; sy_dataplane_destroy may wait that long
 * for them). A failed one closes with LINGER 0.
 *
 * Failure. A collective that fails (timeout, abort, protocol error, bad argument from a peer)
 * leaves the communicator failed: its PUSH sockets are closed with LINGER 0, which makes zmq
 * drop queued messages and release the caller's buffers (we wait for that, bounded), and every
 * later collective returns the same status at once (SY_EABORTED once aborted). The generation is over; the owner destroys
 * the communicator and waits for the next generation. Bad arguments detected before anything
 * was sent (SY_EINVAL from our own caller) do not fail the communicator, nor does an
 * alltoallv whose recv_cap is too small: that round still completes with every peer (the data
 * that does not fit is discarded, recv_bytes gives the sizes) and returns SY_EINVAL.
 *
 * All-reduce. n elements are split in W contiguous blocks (sizes n/W or n/W + 1, in order).
 * Round 1 (reduce-scatter): rank q receives block q of every rank and sums them in rank order
 * (s = x_0; s += x_1; ...; s += x_{W-1}, elementwise). Round 2 (all-gather): rank q sends the
 * reduced block q to all. Every element is thus summed once, by one rank, in a fixed order:
 * the result is bit-identical on all ranks and independent of timing.
 *
 * Memory: the stash is not capped (a broadcast root may legitimately run many rounds ahead);
 * frames are capped at one chunk (ZMQ_MAXMSGSIZE) so a stranger cannot send one huge frame.
 *
 * One communicator per data plane at a time. world == 1 needs no data plane (dp may be NULL).
 * sy_comm_abort() may race a collective, not sy_comm_destroy(). */
#include "comm/comm.h"
#include "base/clock.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "base/log.h"
#include "base/zmq_check.h"

#define SY_COMM_MAGIC 0x50445953u   /* "SYDP" in little-endian memory */
#define SY_COMM_SEQ_MAX 0xfffffff0u       /* rounds per generation (the header has 32 bits) */
#define SY_COMM_VERSION 1u
#define SY_COMM_CHUNK ((size_t)1 << 20)   /* payload bytes per message */
#define SY_COMM_SLICE_MS 20               /* abort is noticed within one slice */
#define SY_COMM_RELEASE_MS 2000           /* bound on zmq releasing our buffers after a failure */
#define SY_COMM_MSG_SLACK 1024            /* ZMQ_MAXMSGSIZE = chunk + slack */
#define SY_COMM_EP_MAX 256

enum { OP_A2A = 1, OP_RS = 2, OP_AG = 3, OP_BCAST = 4, OP_BARRIER = 5 };

static const char *op_name(int op) {
    switch (op) {
    case OP_A2A: return "alltoallv";
    case OP_RS: return "allreduce (reduce-scatter)";
    case OP_AG: return "allreduce (all-gather)";
    case OP_BCAST: return "broadcast";
    case OP_BARRIER: return "barrier";
    default: return "unknown-op";
    }
}

/* 32 bytes: zmq keeps messages of up to 33 bytes inline, so a header costs no allocation. */
typedef struct {
    uint32_t magic;   /* SY_COMM_MAGIC */
    uint8_t version, op;
    uint16_t src;     /* source rank (world <= 65535) */
    uint32_t chunk;   /* index of this chunk in its stream */
    uint32_t seq;     /* round sequence number within the generation (from 1) */
    uint64_t gen;     /* generation */
    uint64_t total;   /* payload bytes of the whole stream */
} sy_hdr;
_Static_assert(sizeof(sy_hdr) == 32, "data-plane header is 32 bytes");

typedef struct {
    sy_hdr h;
    zmq_msg_t body;
} sy_stashed;

/* A growable array of messages (the stash, the held list); capacity only grows. */
typedef struct {
    sy_stashed *v;
    size_t n, cap;
} sy_msgvec;

struct sy_dataplane {
    void *ctx, *pull;
    char endpoint[SY_COMM_EP_MAX];
    sy_msgvec stash;           /* messages of later rounds or generations, arrival order */
    uint64_t dropped;          /* stale-generation or malformed messages */
    sy_comm_t *active;
};

/* zmq's free function needs both the per-peer counter and the eventfd; the hint points at a
 * per-peer slot holding both. */
typedef struct {
    atomic_long count;
    int efd;
} sy_peer_slot;

struct sy_comm {
    sy_dataplane_t *dp;
    uint64_t gen, seq;
    int rank, world, timeout_ms;
    void **push;               /* [world], NULL for ourselves */
    sy_peer_slot *slots;       /* [world] zero-copy sends not yet released by zmq, per peer */
    atomic_int aborted;
    int efd;                   /* eventfd: a zero-copy send was released */
    sy_status failed;          /* SY_OK until a collective fails */
    char fail_msg[256];
    bool leak;                 /* zmq may still hold a pointer into us: never free */
    sy_msgvec held;            /* alltoallv: chunks whose destination offset is not known yet */
    void *scratch;             /* all-reduce receive blocks */
    size_t scratch_cap;
    /* per-round receive bookkeeping, [world] each */
    uint64_t *r_total;
    uint32_t *r_next;
    uint8_t *r_expect, *r_done;
    sy_comm_stats stats;
};

/* ---------------------------------------------------------------- small helpers */

/* Appends ", r" (or "r" first) to a rank list for error messages; stops quietly when full. */
static void rank_list_add(char *buf, size_t cap, int r) {
    size_t o = strlen(buf);
    if (o + 16 < cap) snprintf(buf + o, cap - o, "%s%d", o ? ", " : "", r);
}


static sy_status zmq_fail(const char *what) { return sy_err_zmq(SY_EIO, zmq_errno(), "data plane: %s", what); }

static uint64_t nchunks_of(uint64_t total) {
    return total == 0 ? 1 : (total + SY_COMM_CHUNK - 1) / SY_COMM_CHUNK;
}
static size_t chunk_len(uint64_t total, uint64_t chunk) {
    uint64_t off = chunk * SY_COMM_CHUNK;
    uint64_t left = total > off ? total - off : 0;
    return (size_t)(left < SY_COMM_CHUNK ? left : SY_COMM_CHUNK);
}

static sy_status msgvec_push(sy_msgvec *mv, const sy_hdr *h, zmq_msg_t *body) {
    if (mv->n == mv->cap) {
        size_t nc = mv->cap ? mv->cap * 2 : 64;
        sy_stashed *nv = realloc(mv->v, nc * sizeof *nv);
        if (!nv) return sy_err_set(SY_ENOMEM, "data plane: stash of %zu messages", nc);
        mv->v = nv;
        mv->cap = nc;
    }
    sy_stashed *e = &mv->v[mv->n];
    e->h = *h;
    zmq_msg_init(&e->body);
    zmq_msg_move(&e->body, body);
    mv->n++;
    return SY_OK;
}

static void msgvec_clear(sy_msgvec *mv) {
    for (size_t i = 0; i < mv->n; i++) zmq_msg_close(&mv->v[i].body);
    mv->n = 0;
}
static void msgvec_free(sy_msgvec *mv) {
    msgvec_clear(mv);
    free(mv->v);
    mv->v = NULL;
    mv->cap = 0;
}

/* ---------------------------------------------------------------- data plane */

sy_status sy_dataplane_new(const char *bind_addr, sy_dataplane_t **out) {
    sy_status st = SY_OK;
    if (!bind_addr || !out) return sy_err_set(SY_EINVAL, "data plane: NULL bind address or out");
    *out = NULL;
    sy_dataplane_t *dp = calloc(1, sizeof *dp);
    if (!dp) return sy_err_set(SY_ENOMEM, "data plane: allocation");
    dp->ctx = zmq_ctx_new();
    if (!dp->ctx) {
        st = zmq_fail("zmq_ctx_new");
        goto fail;
    }
    dp->pull = zmq_socket(dp->ctx, ZMQ_PULL);
    if (!dp->pull) {
        st = zmq_fail("PULL socket");
        goto fail;
    }
    int zero = 0;
    int64_t maxmsg = (int64_t)SY_COMM_CHUNK + SY_COMM_MSG_SLACK;
    if (zmq_setsockopt(dp->pull, ZMQ_RCVHWM, &zero, sizeof zero) != 0 ||
        zmq_setsockopt(dp->pull, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_setsockopt(dp->pull, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) != 0) {
        st = zmq_fail("PULL socket options");
        goto fail;
    }
    SY_CHECK_ZMQ_GOTO(zmq_bind(dp->pull, bind_addr), st, fail, "data plane: bind '%s'", bind_addr);
    size_t len = sizeof dp->endpoint;
    if (zmq_getsockopt(dp->pull, ZMQ_LAST_ENDPOINT, dp->endpoint, &len) != 0) {
        st = zmq_fail("ZMQ_LAST_ENDPOINT");
        goto fail;
    }
    *out = dp;
    return SY_OK;
fail:
    if (dp->pull) zmq_close(dp->pull);
    if (dp->ctx) zmq_ctx_term(dp->ctx);
    free(dp);
    return st;
}

static void comm_close_sockets(sy_comm_t *c, int linger_ms);

void sy_dataplane_destroy(sy_dataplane_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_dataplane_t *dp = *self_p;
    /* A communicator still open would keep zmq_ctx_term waiting for its sockets. */
    if (dp->active) {
        comm_close_sockets(dp->active, 0);
        dp->active->dp = NULL;
    }
    msgvec_free(&dp->stash);
    zmq_close(dp->pull);
    zmq_ctx_term(dp->ctx);
    free(dp);
    *self_p = NULL;
}

const char *sy_dataplane_endpoint(const sy_dataplane_t *dp) { return dp ? dp->endpoint : ""; }

uint64_t sy_dataplane_dropped(const sy_dataplane_t *dp) { return dp ? dp->dropped : 0; }

/* ---------------------------------------------------------------- communicator lifecycle */

/* zmq's free function for our zero-copy payloads, called by its I/O thread once the frame is
 * written to the kernel (or dropped when the socket closes). The waiter is woken when a peer's
 * count reaches zero; it also re-reads the counts every slice. */
static void zc_free(void *data, void *hint) {
    (void)data;
    sy_peer_slot *s = hint;
    if (atomic_fetch_sub(&s->count, 1) == 1) {
        uint64_t one = 1;
        ssize_t w = write(s->efd, &one, sizeof one);
        (void)w; /* a saturated eventfd is still readable: the waiter wakes either way */
    }
}

static long outstanding_total(const sy_comm_t *c) {
    long t = 0;
    for (int r = 0; r < c->world; r++) t += atomic_load(&c->slots[r].count);
    return t;
}

static void comm_close_sockets(sy_comm_t *c, int linger_ms) {
    if (!c->push) return;
    for (int r = 0; r < c->world; r++) {
        if (!c->push[r]) continue;
        zmq_setsockopt(c->push[r], ZMQ_LINGER, &linger_ms, sizeof linger_ms);
        zmq_close(c->push[r]);
        c->push[r] = NULL;
    }
}

sy_status sy_comm_new(sy_dataplane_t *dp, uint64_t generation, int rank, int world,
                      const char *const *endpoints, int timeout_ms, sy_comm_t **out) {
    sy_status st = SY_OK;
    if (!out) return sy_err_set(SY_EINVAL, "comm: NULL out");
    *out = NULL;
    if (world < 1 || world > 65535 || rank < 0 || rank >= world)
        return sy_err_set(SY_EINVAL, "comm: rank %d of world %d is not valid", rank, world);
    if (timeout_ms <= 0) return sy_err_set(SY_EINVAL, "comm: timeout_ms %d must be > 0", timeout_ms);
    if (world > 1) {
        if (!dp) return sy_err_set(SY_EINVAL, "comm: world %d needs a data plane", world);
        if (dp->active)
            return sy_err_set(SY_EINVAL, "comm: the data plane already has the communicator of generation %llu open",
                              (unsigned long long)dp->active->gen);
        if (!endpoints) return sy_err_set(SY_EINVAL, "comm: NULL endpoints");
        for (int r = 0; r < world; r++)
            if (r != rank && (!endpoints[r] || !endpoints[r][0]))
                return sy_err_set(SY_EINVAL, "comm: endpoint of rank %d is empty", r);
    }
    sy_comm_t *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "comm: allocation");
    c->dp = world > 1 ? dp : NULL;
    c->gen = generation;
    c->rank = rank;
    c->world = world;
    c->timeout_ms = timeout_ms;
    c->efd = -1;
    atomic_init(&c->aborted, 0);
    if (world == 1) {
        *out = c;
        return SY_OK;
    }
    size_t W = (size_t)world;
    c->push = calloc(W, sizeof *c->push);
    c->slots = calloc(W, sizeof *c->slots);
    c->r_total = calloc(W, sizeof *c->r_total);
    c->r_next = calloc(W, sizeof *c->r_next);
    c->r_expect = calloc(W, 1);
    c->r_done = calloc(W, 1);
    if (!c->push || !c->slots || !c->r_total || !c->r_next || !c->r_expect || !c->r_done) {
        st = sy_err_set(SY_ENOMEM, "comm: allocation for world %d", world);
        goto fail;
    }
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->efd < 0) {
        st = sy_err_set(SY_EIO, "comm: eventfd: %s", strerror(errno));
        goto fail;
    }
    for (int r = 0; r < world; r++) {
        atomic_init(&c->slots[r].count, 0);
        c->slots[r].efd = c->efd;
    }
    int zero = 0;
    for (int r = 0; r < world; r++) {
        if (r == rank) continue;
        void *s = zmq_socket(dp->ctx, ZMQ_PUSH);
        if (!s) {
            st = zmq_fail("PUSH socket");
            goto fail;
        }
        c->push[r] = s;
        if (zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero) != 0 ||
            zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
            zmq_setsockopt(s, ZMQ_IMMEDIATE, &zero, sizeof zero) != 0) {
            st = zmq_fail("PUSH socket options");
            goto fail;
        }
        if (zmq_connect(s, endpoints[r]) != 0) {
            st = sy_err_zmq(SY_EINVAL, zmq_errno(), "comm: connect to rank %d at '%s'", r, endpoints[r]);
            goto fail;
        }
    }
    /* Messages of older generations waiting in the stash are stale now. */
    size_t keep = 0;
    for (size_t i = 0; i < dp->stash.n; i++) {
        sy_stashed *e = &dp->stash.v[i];
        if (e->h.gen < generation) {
            zmq_msg_close(&e->body);
            dp->dropped++;
        } else {
            dp->stash.v[keep++] = *e;
        }
    }
    dp->stash.n = keep;
    dp->active = c;
    *out = c;
    return SY_OK;
fail:
    comm_close_sockets(c, 0);
    if (c->efd >= 0) close(c->efd);
    free(c->push);
    free(c->slots);
    free(c->r_total);
    free(c->r_next);
    free(c->r_expect);
    free(c->r_done);
    free(c);
    return st;
}

/* Waits (bounded) until zmq released every zero-copy send. Returns false if it did not. */
static bool wait_released(sy_comm_t *c, int bound_ms) {
    int64_t end = sy_mono_ms() + bound_ms;
    while (outstanding_total(c) > 0) {
        int64_t left = end - sy_mono_ms();
        if (left <= 0) return false;
        zmq_pollitem_t it = {.socket = NULL, .fd = c->efd, .events = ZMQ_POLLIN};
        zmq_poll(&it, 1, left < SY_COMM_SLICE_MS ? (long)left : SY_COMM_SLICE_MS);
        uint64_t v;
        ssize_t rd = read(c->efd, &v, sizeof v);
        (void)rd;
    }
    return true;
}

void sy_comm_destroy(sy_comm_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_comm_t *c = *self_p;
    *self_p = NULL;
    comm_close_sockets(c, c->failed == SY_OK ? c->timeout_ms : 0);
    if (c->world > 1 && !c->leak && !wait_released(c, SY_COMM_RELEASE_MS)) c->leak = true;
    msgvec_free(&c->held);
    sy_dataplane_t *dp = c->dp;
    if (dp) {
        /* Pending messages of this generation are dropped; later generations stay stashed. */
        size_t keep = 0;
        for (size_t i = 0; i < dp->stash.n; i++) {
            sy_stashed *e = &dp->stash.v[i];
            if (e->h.gen <= c->gen) {
                zmq_msg_close(&e->body);
                dp->dropped++;
            } else {
                dp->stash.v[keep++] = *e;
            }
        }
        dp->stash.n = keep;
        if (dp->active == c) dp->active = NULL;
    }
    free(c->scratch);
    free(c->r_total);
    free(c->r_next);
    free(c->r_expect);
    free(c->r_done);
    free(c->push);
    if (c->leak) {
        /* zmq's I/O thread may still call zc_free with a pointer into the slots: keep them. */
        sy_error("comm: zmq did not release generation %llu's send buffers within %d ms; leaking its counters",
                 (unsigned long long)c->gen, SY_COMM_RELEASE_MS);
        return;
    }
    if (c->efd >= 0) close(c->efd);
    free(c->slots);
    free(c);
}

int sy_comm_rank(const sy_comm_t *c) { return c ? c->rank : -1; }
int sy_comm_world(const sy_comm_t *c) { return c ? c->world : 0; }

void sy_comm_abort(sy_comm_t *c) {
    if (c) atomic_store(&c->aborted, 1);
}

sy_comm_stats sy_comm_get_stats(const sy_comm_t *c) {
    sy_comm_stats z = {0, 0, 0};
    return c ? c->stats : z;
}

/* ---------------------------------------------------------------- failure */

/* Marks the communicator failed with the current error: closes the send sockets so zmq drops
 * whatever is queued and releases the caller's buffers, waits for that (bounded). */
static sy_status comm_fail(sy_comm_t *c, sy_status st) {
    c->failed = st;
    snprintf(c->fail_msg, sizeof c->fail_msg, "%s", sy_err_msg());
    comm_close_sockets(c, 0);
    if (c->world > 1 && !wait_released(c, SY_COMM_RELEASE_MS)) c->leak = true;
    msgvec_clear(&c->held);
    return st;
}

/* Entry check of every collective. Abort wins over an earlier failure. */
static sy_status comm_enter(sy_comm_t *c, const char *what) {
    if (!c) return sy_err_set(SY_EINVAL, "comm: %s on a NULL communicator", what);
    if (atomic_load(&c->aborted)) {
        sy_err_set(SY_EABORTED, "comm: %s: communicator of generation %llu was aborted", what,
                   (unsigned long long)c->gen);
        return c->failed == SY_OK && c->world > 1 ? comm_fail(c, SY_EABORTED) : SY_EABORTED;
    }
    if (c->failed != SY_OK)
        return sy_err_set(c->failed, "comm: %s: communicator failed earlier (%s); destroy it", what, c->fail_msg);
    if (c->world > 1 && !c->dp)
        return sy_err_set(SY_EINVAL, "comm: %s: its data plane was destroyed", what);
    return SY_OK;
}

/* ---------------------------------------------------------------- sending */

static sy_status send_frames(sy_comm_t *c, int dst, const sy_hdr *h, const void *data, size_t len) {
    void *s = c->push[dst];
    int64_t last = sy_mono_ms();
    for (int part = 0; part < 2;) {
        int rc;
        zmq_msg_t m;
        if (part == 0) {
            rc = zmq_send(s, h, sizeof *h, ZMQ_SNDMORE | ZMQ_DONTWAIT);
        } else {
            sy_peer_slot *slot = &c->slots[dst];
            atomic_fetch_add(&slot->count, 1);
            zmq_msg_init_data(&m, (void *)data, len, zc_free, slot);
            rc = zmq_msg_send(&m, s, ZMQ_DONTWAIT);
            if (rc < 0) {
                int e = zmq_errno();
                zmq_msg_close(&m); /* calls zc_free: the count goes back */
                errno = e;
            }
        }
        if (rc >= 0) {
            part++;
            continue;
        }
        if (zmq_errno() != EAGAIN)
            return sy_err_zmq(SY_EIO, zmq_errno(), "comm: %s #%llu: send to rank %d", op_name(h->op),
                              (unsigned long long)h->seq, dst);
        /* SNDHWM is 0, so this is unusual; wait for room, bounded and abortable. */
        if (atomic_load(&c->aborted))
            return sy_err_set(SY_EABORTED, "comm: %s #%llu aborted while sending to rank %d", op_name(h->op),
                              (unsigned long long)h->seq, dst);
        if (sy_mono_ms() - last > c->timeout_ms)
            return sy_err_set(SY_ETIMEOUT, "comm: %s #%llu (generation %llu): rank %d did not accept data within %d ms",
                              op_name(h->op), (unsigned long long)h->seq, (unsigned long long)c->gen, dst,
                              c->timeout_ms);
        zmq_pollitem_t it = {.socket = s, .events = ZMQ_POLLOUT};
        zmq_poll(&it, 1, SY_COMM_SLICE_MS);
    }
    return SY_OK;
}

/* Sends `len` bytes at `data` to rank dst as the stream of round `seq`. */
static sy_status send_stream(sy_comm_t *c, int op, int dst, const void *data, size_t len) {
    sy_hdr h = {.magic = SY_COMM_MAGIC, .version = SY_COMM_VERSION, .op = (uint8_t)op,
                .src = (uint16_t)c->rank, .seq = (uint32_t)c->seq, .gen = c->gen, .total = len};
    uint64_t nch = nchunks_of(len);
    const char *p = data;
    for (uint64_t k = 0; k < nch; k++) {
        h.chunk = (uint32_t)k;
        size_t l = chunk_len(len, k);
        SY_CHECK(send_frames(c, dst, &h, p + k * SY_COMM_CHUNK, l));
    }
    c->stats.bytes_sent += len;
    return SY_OK;
}

/* Waits until zmq released all zero-copy sends (the bytes are in the kernel), with the same
 * progress deadline as receiving. */
static sy_status wait_sends(sy_comm_t *c, int op) {
    int64_t last = sy_mono_ms();
    long prev = outstanding_total(c);
    while (prev > 0) {
        if (atomic_load(&c->aborted))
            return sy_err_set(SY_EABORTED, "comm: %s #%llu (generation %llu) aborted", op_name(op),
                              (unsigned long long)c->seq, (unsigned long long)c->gen);
        int64_t t = sy_mono_ms();
        if (t - last >= c->timeout_ms) {
            char who[200] = "";
            for (int r = 0; r < c->world; r++)
                if (atomic_load(&c->slots[r].count) > 0) rank_list_add(who, sizeof who, r);
            return sy_err_set(SY_ETIMEOUT,
                              "comm: %s #%llu (generation %llu): data to rank(s) %s not taken within %d ms",
                              op_name(op), (unsigned long long)c->seq, (unsigned long long)c->gen, who,
                              c->timeout_ms);
        }
        zmq_pollitem_t it = {.socket = NULL, .fd = c->efd, .events = ZMQ_POLLIN};
        long left = (long)(last + c->timeout_ms - t);
        zmq_poll(&it, 1, left < SY_COMM_SLICE_MS ? left : SY_COMM_SLICE_MS);
        uint64_t v;
        ssize_t rd = read(c->efd, &v, sizeof v);
        (void)rd;
        long cur = outstanding_total(c);
        if (cur < prev) last = sy_mono_ms();
        prev = cur;
    }
    return SY_OK;
}

/* ---------------------------------------------------------------- receiving */

/* Handler of one message of the current round (already validated). It may move the body away
 * (zmq_msg_move) to keep it; otherwise the engine closes it. */
typedef sy_status (*round_fn)(sy_comm_t *c, void *ctx, const sy_hdr *h, zmq_msg_t *body);

/* Starts the next round: a fresh sequence number and empty stream bookkeeping. */
static sy_status round_begin(sy_comm_t *c, int op) {
    if (c->seq >= SY_COMM_SEQ_MAX)
        return sy_err_set(SY_EINVAL, "comm: %s: generation %llu used all its %u rounds; open a new generation",
                          op_name(op), (unsigned long long)c->gen, SY_COMM_SEQ_MAX);
    c->seq++;
    for (int r = 0; r < c->world; r++) {
        c->r_total[r] = 0;
        c->r_next[r] = 0;
        c->r_expect[r] = 0;
        c->r_done[r] = 0;
    }
    return SY_OK;
}

/* Validates a message of the current round against the stream bookkeeping and hands it on.
 * *progress is set when it was accepted. */
static sy_status round_accept(sy_comm_t *c, int op, const sy_hdr *h, zmq_msg_t *body, round_fn fn, void *ctx,
                              int *remaining) {
    int src = (int)h->src;
    if (h->op != op)
        return sy_err_set(SY_EFORMAT, "comm: round #%llu (generation %llu): rank %d is in %s while rank %d runs %s",
                          (unsigned long long)c->seq, (unsigned long long)c->gen, src, op_name(h->op), c->rank,
                          op_name(op));
    if (!c->r_expect[src] || c->r_done[src])
        return sy_err_set(SY_EFORMAT, "comm: %s #%llu: unexpected message from rank %d", op_name(op),
                          (unsigned long long)c->seq, src);
    if (h->chunk != c->r_next[src] || (h->chunk > 0 && h->total != c->r_total[src]) ||
        h->chunk >= nchunks_of(h->total) || zmq_msg_size(body) != chunk_len(h->total, h->chunk))
        return sy_err_set(SY_EFORMAT,
                          "comm: %s #%llu: rank %d sent chunk %u (%zu bytes of %llu), expected chunk %u", op_name(op),
                          (unsigned long long)c->seq, src, h->chunk, zmq_msg_size(body),
                          (unsigned long long)h->total, c->r_next[src]);
    c->r_total[src] = h->total;
    c->r_next[src]++;
    c->stats.bytes_received += zmq_msg_size(body);
    if (c->r_next[src] == nchunks_of(h->total)) {
        c->r_done[src] = 1;
        (*remaining)--;
    }
    return fn(c, ctx, h, body);
}

/* Reads one raw message from the PULL socket (non-blocking). 1: got one, 0: nothing, <0 error. */
static int read_raw(sy_dataplane_t *dp, sy_hdr *h, zmq_msg_t *body, bool *valid) {
    zmq_msg_t hm;
    zmq_msg_init(&hm);
    if (zmq_msg_recv(&hm, dp->pull, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&hm);
        return zmq_errno() == EAGAIN ? 0 : -1;
    }
    *valid = zmq_msg_size(&hm) == sizeof *h && zmq_msg_more(&hm);
    if (*valid) memcpy(h, zmq_msg_data(&hm), sizeof *h);
    bool more = zmq_msg_more(&hm);
    zmq_msg_close(&hm);
    int parts = 0;
    while (more) { /* multipart messages arrive whole: these reads do not block */
        zmq_msg_close(body);
        zmq_msg_init(body);
        if (zmq_msg_recv(body, dp->pull, 0) < 0) return -1;
        more = zmq_msg_more(body);
        parts++;
    }
    if (parts != 1) *valid = false;
    if (*valid && (h->magic != SY_COMM_MAGIC || h->version != SY_COMM_VERSION)) *valid = false;
    return 1;
}

/* Runs the receive side of the current round: every rank with expect[r] set sends one stream.
 * Stashed messages of this round are replayed first (arrival order), then the socket is read
 * until every stream is complete. */
static sy_status round_recv(sy_comm_t *c, int op, round_fn fn, void *ctx) {
    sy_status st = SY_OK;
    sy_dataplane_t *dp = c->dp;
    int remaining = 0;
    for (int r = 0; r < c->world; r++) remaining += c->r_expect[r] && !c->r_done[r];

    /* Replay the stash. */
    size_t keep = 0;
    for (size_t i = 0; i < dp->stash.n; i++) {
        sy_stashed *e = &dp->stash.v[i];
        if (e->h.gen == c->gen && e->h.seq == c->seq && st == SY_OK) {
            if (e->h.src < (uint32_t)c->world && (int)e->h.src != c->rank)
                st = round_accept(c, op, &e->h, &e->body, fn, ctx, &remaining);
            else
                dp->dropped++;
            zmq_msg_close(&e->body);
        } else {
            dp->stash.v[keep++] = *e;
        }
    }
    dp->stash.n = keep;
    if (st != SY_OK) return st;

    zmq_msg_t body;
    zmq_msg_init(&body);
    int64_t last = sy_mono_ms();
    while (remaining > 0) {
        if (atomic_load(&c->aborted)) {
            st = sy_err_set(SY_EABORTED, "comm: %s #%llu (generation %llu) aborted", op_name(op),
                            (unsigned long long)c->seq, (unsigned long long)c->gen);
            break;
        }
        sy_hdr h;
        bool valid = false;
        int got = read_raw(dp, &h, &body, &valid);
        if (got < 0) {
            st = zmq_fail("receive");
            break;
        }
        if (got == 0) {
            int64_t t = sy_mono_ms();
            if (t - last >= c->timeout_ms) {
                char who[200] = "";
                for (int r = 0; r < c->world; r++)
                    if (c->r_expect[r] && !c->r_done[r]) rank_list_add(who, sizeof who, r);
                st = sy_err_set(SY_ETIMEOUT,
                                "comm: %s #%llu (generation %llu): no data from rank(s) %s within %d ms",
                                op_name(op), (unsigned long long)c->seq, (unsigned long long)c->gen, who,
                                c->timeout_ms);
                break;
            }
            long left = (long)(last + c->timeout_ms - t);
            zmq_pollitem_t it = {.socket = dp->pull, .events = ZMQ_POLLIN};
            if (zmq_poll(&it, 1, left < SY_COMM_SLICE_MS ? left : SY_COMM_SLICE_MS) < 0 && zmq_errno() != EINTR) {
                st = zmq_fail("poll");
                break;
            }
            continue;
        }
        /* Sources are checked against this world only for this generation: a later one may
         * have another world size. */
        if (!valid || h.gen < c->gen || (h.gen == c->gen && h.seq < c->seq)) {
            dp->dropped++;
            continue;
        }
        if (h.gen > c->gen || h.seq > c->seq) {
            st = msgvec_push(&dp->stash, &h, &body);
            if (st != SY_OK) break;
            continue;
        }
        if (h.src >= (uint32_t)c->world || (int)h.src == c->rank) {
            dp->dropped++;
            continue;
        }
        st = round_accept(c, op, &h, &body, fn, ctx, &remaining);
        if (st != SY_OK) break;
        last = sy_mono_ms();
    }
    zmq_msg_close(&body);
    return st;
}

/* ---------------------------------------------------------------- all-to-all-v */

/* recv is filled back to back in rank order, but the sizes arrive in any order: the offset of
 * source r is known once the sizes of ranks 0..r-1 are (a size arrives with a stream's chunk 0).
 * Chunks whose offset is not known yet are held (the zmq message itself, no copy). */
typedef struct {
    const char *send;
    const size_t *send_bytes;
    const size_t *send_off;
    char *recv;
    size_t recv_cap;
    size_t *offset;   /* [world + 1]: offset in recv of each source's chunk, valid for r < known */
    int known;
    bool self_done;
    bool overflow;    /* recv_cap too small: the round completes, nothing more is placed */
    char overflow_msg[200];
} a2a_ctx;

static bool a2a_size_known(const sy_comm_t *c, int r) { return r == c->rank || c->r_next[r] > 0; }
static size_t a2a_size(const sy_comm_t *c, const a2a_ctx *a, int r) {
    return r == c->rank ? a->send_bytes[r] : (size_t)c->r_total[r];
}

static void a2a_place(a2a_ctx *a, const sy_hdr *h, zmq_msg_t *body) {
    size_t len = zmq_msg_size(body);
    if (len) memcpy(a->recv + a->offset[h->src] + (size_t)h->chunk * SY_COMM_CHUNK, zmq_msg_data(body), len);
}

/* Extends the known offsets as far as the known sizes allow (checking recv_cap), then places
 * the held chunks and our own chunk that became placeable. Ranks r < known - 1 have their
 * offset and their size (checked against recv_cap). */
static void a2a_advance(sy_comm_t *c, a2a_ctx *a) {
    while (!a->overflow && a->known <= c->world && a2a_size_known(c, a->known - 1)) {
        int r = a->known - 1;
        size_t sz = a2a_size(c, a, r);
        if (sz > a->recv_cap - a->offset[r]) {
            /* Our caller's mistake, not the peers': finish the round (so they complete theirs),
             * discard the data, report SY_EINVAL at the end. */
            snprintf(a->overflow_msg, sizeof a->overflow_msg,
                     "alltoallv #%llu: %zu bytes from rank %d at offset %zu overflow recv_cap %zu",
                     (unsigned long long)c->seq, sz, r, a->offset[r], a->recv_cap);
            a->overflow = true;
            msgvec_clear(&c->held);
            return;
        }
        a->offset[r + 1] = a->offset[r] + sz;
        a->known++;
    }
    if (a->overflow) return;
    size_t keep = 0;
    for (size_t i = 0; i < c->held.n; i++) {
        sy_stashed *e = &c->held.v[i];
        if ((int)e->h.src < a->known - 1) {
            a2a_place(a, &e->h, &e->body);
            zmq_msg_close(&e->body);
        } else {
            c->held.v[keep++] = *e;
        }
    }
    c->held.n = keep;
    if (!a->self_done && c->rank < a->known - 1) {
        size_t sz = a->send_bytes[c->rank];
        if (sz) memcpy(a->recv + a->offset[c->rank], a->send + a->send_off[c->rank], sz);
        a->self_done = true;
    }
}

static sy_status a2a_on_msg(sy_comm_t *c, void *ctx, const sy_hdr *h, zmq_msg_t *body) {
    a2a_ctx *a = ctx;
    if (h->chunk == 0) a2a_advance(c, a); /* a new size is known */
    if (a->overflow) return SY_OK;        /* discarded */
    if ((int)h->src < a->known - 1) {
        a2a_place(a, h, body);
        return SY_OK;
    }
    return msgvec_push(&c->held, h, body);
}

sy_status sy_comm_alltoallv(sy_comm_t *c, const void *send, const size_t *send_bytes, void *recv,
                            size_t recv_cap, size_t *recv_bytes) {
    SY_CHECK(comm_enter(c, "alltoallv"));
    if (!send_bytes || !recv_bytes) return sy_err_set(SY_EINVAL, "comm: alltoallv: NULL send_bytes or recv_bytes");
    size_t send_total = 0;
    for (int r = 0; r < c->world; r++) send_total += send_bytes[r];
    if ((send_total && !send) || (recv_cap && !recv))
        return sy_err_set(SY_EINVAL, "comm: alltoallv: NULL buffer for %zu bytes to send / %zu of capacity",
                          send_total, recv_cap);
    if (c->world == 1) {
        if (send_bytes[0] > recv_cap)
            return sy_err_set(SY_EINVAL, "comm: alltoallv: %zu bytes from rank 0 overflow recv_cap %zu", send_bytes[0],
                              recv_cap);
        if (send_bytes[0]) memmove(recv, send, send_bytes[0]);
        recv_bytes[0] = send_bytes[0];
        c->stats.collectives++;
        return SY_OK;
    }
    enum { STACK_W = 64 };
    size_t stack[2 * (STACK_W + 1)];
    size_t W = (size_t)c->world;
    size_t *offset = W <= STACK_W ? stack : malloc(2 * (W + 1) * sizeof *offset);
    if (!offset) return sy_err_set(SY_ENOMEM, "comm: alltoallv offsets for world %zu", W);
    size_t *send_off = offset + W + 1;
    size_t acc = 0;
    for (size_t r = 0; r < W; r++) {
        send_off[r] = acc;
        acc += send_bytes[r];
    }
    offset[0] = 0;
    a2a_ctx a = {.send = send, .send_bytes = send_bytes, .send_off = send_off, .recv = recv, .recv_cap = recv_cap,
                 .offset = offset, .known = 1};
    sy_status st = round_begin(c, OP_A2A);
    if (st != SY_OK) goto out;
    /* Send to rank+1, rank+2, ... so the ranks do not all start on the same receiver. */
    for (int k = 1; k < c->world && st == SY_OK; k++) {
        int dst = (c->rank + k) % c->world;
        st = send_stream(c, OP_A2A, dst, a.send + send_off[dst], send_bytes[dst]);
    }
    for (int r = 0; r < c->world; r++) c->r_expect[r] = r != c->rank;
    if (st == SY_OK) a2a_advance(c, &a);
    if (st == SY_OK) st = round_recv(c, OP_A2A, a2a_on_msg, &a);
    if (st == SY_OK && !a.overflow && (c->held.n || !a.self_done || a.known != c->world + 1))
        st = sy_err_set(SY_EINTERNAL, "comm: alltoallv #%llu: %zu chunks left unplaced", (unsigned long long)c->seq,
                        c->held.n);
    if (st == SY_OK) st = wait_sends(c, OP_A2A);
    if (st == SY_OK) {
        for (int r = 0; r < c->world; r++) recv_bytes[r] = a2a_size(c, &a, r);
        c->stats.collectives++;
        if (a.overflow) st = sy_err_set(SY_EINVAL, "comm: %s", a.overflow_msg);
    } else {
        comm_fail(c, st);
    }
out:
    if (offset != stack) free(offset);
    return st;
}

/* ---------------------------------------------------------------- all-reduce */

typedef struct {
    char *dst_base;    /* where the stream of rank src lands: dst_base + slot(src) * stride */
    size_t stride;
    int rank;
    bool by_slot;      /* reduce-scatter: slot = src minus one if above us; all-gather: per block */
    const size_t *block_off; /* all-gather: byte offset of block src in buf */
    size_t want;       /* reduce-scatter: bytes expected from each rank */
    const size_t *block_len;
} ar_ctx;

static sy_status ar_on_msg(sy_comm_t *c, void *ctx, const sy_hdr *h, zmq_msg_t *body) {
    ar_ctx *a = ctx;
    int src = (int)h->src;
    size_t want = a->by_slot ? a->want : a->block_len[src];
    if (h->total != want)
        return sy_err_set(SY_EINVAL,
                          "comm: %s #%llu: rank %d sent %llu bytes, expected %zu (different n on that rank?)",
                          op_name(h->op), (unsigned long long)c->seq, src, (unsigned long long)h->total, want);
    char *dst = a->by_slot ? a->dst_base + (size_t)(src < a->rank ? src : src - 1) * a->stride
                           : a->dst_base + a->block_off[src];
    size_t len = zmq_msg_size(body);
    if (len) memcpy(dst + (size_t)h->chunk * SY_COMM_CHUNK, zmq_msg_data(body), len);
    return SY_OK;
}

#define SY_AR_TILE 1024

static void sum_f32(void *out, const void *const *in, int world, size_t n) {
    float acc[SY_AR_TILE];
    for (size_t i0 = 0; i0 < n; i0 += SY_AR_TILE) {
        size_t m = n - i0 < SY_AR_TILE ? n - i0 : SY_AR_TILE;
        const float *x0 = (const float *)in[0] + i0;
        for (size_t i = 0; i < m; i++) acc[i] = x0[i];
        for (int r = 1; r < world; r++) {
            const float *x = (const float *)in[r] + i0;
            for (size_t i = 0; i < m; i++) acc[i] += x[i];
        }
        memcpy((float *)out + i0, acc, m * sizeof *acc);
    }
}
static void sum_f64(void *out, const void *const *in, int world, size_t n) {
    double acc[SY_AR_TILE];
    for (size_t i0 = 0; i0 < n; i0 += SY_AR_TILE) {
        size_t m = n - i0 < SY_AR_TILE ? n - i0 : SY_AR_TILE;
        const double *x0 = (const double *)in[0] + i0;
        for (size_t i = 0; i < m; i++) acc[i] = x0[i];
        for (int r = 1; r < world; r++) {
            const double *x = (const double *)in[r] + i0;
            for (size_t i = 0; i < m; i++) acc[i] += x[i];
        }
        memcpy((double *)out + i0, acc, m * sizeof *acc);
    }
}

/* Block q of n elements over W ranks: [q*(n/W) + min(q, n%W), ...), sizes differ by at most 1. */
static size_t block_lo(size_t n, int world, int q) {
    size_t base = n / (size_t)world, extra = n % (size_t)world;
    return (size_t)q * base + ((size_t)q < extra ? (size_t)q : extra);
}

static sy_status allreduce(sy_comm_t *c, void *buf, size_t n, size_t esz,
                           void (*sum)(void *, const void *const *, int, size_t)) {
    SY_CHECK(comm_enter(c, "allreduce"));
    if (n && !buf) return sy_err_set(SY_EINVAL, "comm: allreduce: NULL buffer for %zu elements", n);
    if (c->world == 1) {
        c->stats.collectives++;
        return SY_OK;
    }
    int W = c->world, me = c->rank;
    sy_status st = SY_OK;
    size_t stack_off[65], stack_len[65];
    size_t *boff = W <= 64 ? stack_off : malloc((size_t)W * sizeof *boff);
    size_t *blen = W <= 64 ? stack_len : malloc((size_t)W * sizeof *blen);
    const void *stack_in[64];
    const void **in = W <= 64 ? stack_in : malloc((size_t)W * sizeof *in);
    if (!boff || !blen || !in) {
        st = sy_err_set(SY_ENOMEM, "comm: allreduce bookkeeping for world %d", W);
        goto out;
    }
    for (int q = 0; q < W; q++) {
        boff[q] = block_lo(n, W, q) * esz;
        blen[q] = (block_lo(n, W, q + 1) - block_lo(n, W, q)) * esz;
    }
    size_t need = (size_t)(W - 1) * blen[me];
    if (need > c->scratch_cap) {
        void *ns = realloc(c->scratch, need);
        if (!ns) {
            st = sy_err_set(SY_ENOMEM, "comm: allreduce scratch of %zu bytes", need);
            goto out;
        }
        c->scratch = ns;
        c->scratch_cap = need;
    }
    char *b = buf;
    /* Round 1: reduce-scatter. */
    st = round_begin(c, OP_RS);
    if (st != SY_OK) goto out;
    for (int k = 1; k < W && st == SY_OK; k++) {
        int dst = (me + k) % W;
        st = send_stream(c, OP_RS, dst, b + boff[dst], blen[dst]);
    }
    for (int r = 0; r < W; r++) c->r_expect[r] = r != me;
    ar_ctx rs = {.dst_base = c->scratch, .stride = blen[me], .rank = me, .by_slot = true, .want = blen[me]};
    if (st == SY_OK) st = round_recv(c, OP_RS, ar_on_msg, &rs);
    /* Our sent blocks are overwritten by the all-gather: they must have left first. */
    if (st == SY_OK) st = wait_sends(c, OP_RS);
    if (st != SY_OK) goto fail;
    for (int r = 0; r < W; r++)
        in[r] = r == me ? (const void *)(b + boff[me])
                        : (const void *)((char *)c->scratch + (size_t)(r < me ? r : r - 1) * blen[me]);
    sum(b + boff[me], in, W, blen[me] / esz);
    /* Round 2: all-gather. */
    st = round_begin(c, OP_AG);
    if (st != SY_OK) goto fail;
    for (int k = 1; k < W && st == SY_OK; k++) {
        int dst = (me + k) % W;
        st = send_stream(c, OP_AG, dst, b + boff[me], blen[me]);
    }
    for (int r = 0; r < W; r++) c->r_expect[r] = r != me;
    ar_ctx ag = {.dst_base = b, .rank = me, .by_slot = false, .block_off = boff, .block_len = blen};
    if (st == SY_OK) st = round_recv(c, OP_AG, ar_on_msg, &ag);
    if (st == SY_OK) st = wait_sends(c, OP_AG);
    if (st != SY_OK) goto fail;
    c->stats.collectives++;
    goto out;
fail:
    comm_fail(c, st);
out:
    if (boff != stack_off) free(boff);
    if (blen != stack_len) free(blen);
    if (in != stack_in) free(in);
    return st;
}

sy_status sy_comm_allreduce_f32(sy_comm_t *c, float *buf, size_t n) {
    return allreduce(c, buf, n, sizeof(float), sum_f32);
}
sy_status sy_comm_allreduce_f64(sy_comm_t *c, double *buf, size_t n) {
    return allreduce(c, buf, n, sizeof(double), sum_f64);
}

/* ---------------------------------------------------------------- broadcast, barrier */

typedef struct {
    char *buf;
    size_t bytes;
} bc_ctx;

static sy_status bc_on_msg(sy_comm_t *c, void *ctx, const sy_hdr *h, zmq_msg_t *body) {
    bc_ctx *a = ctx;
    if (h->total != a->bytes)
        return sy_err_set(SY_EINVAL, "comm: broadcast #%llu: root %u sent %llu bytes, this rank expects %zu",
                          (unsigned long long)c->seq, h->src, (unsigned long long)h->total, a->bytes);
    size_t len = zmq_msg_size(body);
    if (len) memcpy(a->buf + (size_t)h->chunk * SY_COMM_CHUNK, zmq_msg_data(body), len);
    return SY_OK;
}

sy_status sy_comm_broadcast(sy_comm_t *c, void *buf, size_t bytes, int root) {
    SY_CHECK(comm_enter(c, "broadcast"));
    if (root < 0 || root >= c->world)
        return sy_err_set(SY_EINVAL, "comm: broadcast: root %d not in world %d", root, c->world);
    if (bytes && !buf) return sy_err_set(SY_EINVAL, "comm: broadcast: NULL buffer for %zu bytes", bytes);
    if (c->world == 1) {
        c->stats.collectives++;
        return SY_OK;
    }
    sy_status st = round_begin(c, OP_BCAST);
    if (st != SY_OK) return st;
    if (c->rank == root) {
        for (int k = 1; k < c->world && st == SY_OK; k++)
            st = send_stream(c, OP_BCAST, (root + k) % c->world, buf, bytes);
        if (st == SY_OK) st = wait_sends(c, OP_BCAST);
    } else {
        c->r_expect[root] = 1;
        bc_ctx a = {.buf = buf, .bytes = bytes};
        st = round_recv(c, OP_BCAST, bc_on_msg, &a);
    }
    if (st != SY_OK) return comm_fail(c, st);
    c->stats.collectives++;
    return SY_OK;
}

static sy_status barrier_on_msg(sy_comm_t *c, void *ctx, const sy_hdr *h, zmq_msg_t *body) {
    (void)ctx, (void)body;
    if (h->total != 0)
        return sy_err_set(SY_EFORMAT, "comm: barrier #%llu: rank %u sent %llu bytes", (unsigned long long)c->seq,
                          h->src,
                          (unsigned long long)h->total);
    return SY_OK;
}

sy_status sy_comm_barrier(sy_comm_t *c) {
    SY_CHECK(comm_enter(c, "barrier"));
    if (c->world == 1) {
        c->stats.collectives++;
        return SY_OK;
    }
    sy_status st = round_begin(c, OP_BARRIER);
    if (st != SY_OK) return st;
    for (int k = 1; k < c->world && st == SY_OK; k++)
        st = send_stream(c, OP_BARRIER, (c->rank + k) % c->world, NULL, 0);
    for (int r = 0; r < c->world; r++) c->r_expect[r] = r != c->rank;
    if (st == SY_OK) st = round_recv(c, OP_BARRIER, barrier_on_msg, NULL);
    if (st == SY_OK) st = wait_sends(c, OP_BARRIER);
    if (st != SY_OK) return comm_fail(c, st);
    c->stats.collectives++;
    return SY_OK;
}
