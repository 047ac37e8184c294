/* The `tcp` data plane (comm.h): collectives over a ZeroMQ PUSH/PULL mesh, behind the ops
 * table sy_comm_tcp_ops (comm_internal.h; comm.c does argument checks, world 1, the abort flag
 * and the failed state). Buffers are read and written by the CPU (host memory).
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
 * chunk, so every round exchanges at least one message per expected pair. The receiver knows
 * every size in advance (comm.h) and checks the header's total against it. Header fields are host byte order (all workers of a
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
 * stash, the all-reduce scratch.
 *
 * Closing. A communicator destroyed after successful collectives closes its PUSH sockets with
 * LINGER = timeout_ms: bytes still in zmq's batches, which a slower peer may need to finish the
 * last collective, still go out (zmq owns them by then; sy_dataplane_destroy may wait that long
 * for them). A failed one closes with LINGER 0.
 *
 * Failure. A collective that fails (timeout, abort, protocol error, bad argument from a peer)
 * leaves the communicator failed: its PUSH sockets are closed with LINGER 0, which makes zmq
 * drop queued messages and release the caller's buffers (we wait for that, bounded), and every
 * later collective returns the same status at once (SY_EABORTED once aborted). The generation
 * is over; the owner destroys the communicator and waits for the next generation. Bad arguments
 * from our own caller (SY_EINVAL, found by comm.c before anything is sent) do not fail it.
 *
 * Abort. sy_comm_abort() (any thread) only sets the flag in comm.c's struct; the thread in the
 * collective sees it within one slice (SY_COMM_SLICE_MS = 20 ms, under SY_COMM_ABORT_MS) and
 * returns SY_EABORTED; the socket teardown (tcp_fail) then runs on that same thread.
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
 * CURVE (sy_dataplane_new_curve; docs/protocol.md "Security"). The PULL socket is a CURVE server
 * with this process's key pair and a ZAP domain; the ZAP handler (comm_zap.c, its own thread and
 * socket in this context) admits the keys sy_comm_new_curve authorizes: the open generation's
 * members. Every PUSH is a CURVE client with our pair and its peer's public key. A refused
 * stranger's messages never reach the PULL socket; an admitted connection's messages carry its
 * key as ZeroMQ User-Id, and one whose key is not its header's source rank's is dropped and
 * counted (sender_ok). The rest of the protocol is unchanged.
 *
 * One communicator per data plane at a time. */
#include "comm/comm.h"
#include "comm_internal.h"
#include "base/clock.h"

#include <dirent.h>
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

#include "base/bgsched.h"
#include "base/log.h"
#include "base/zmq_check.h"
#include "comm_zap_internal.h"

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

typedef struct tcp_comm tcp_comm;

typedef struct {
    sy_dataplane_t base;       /* first: comm.c's view */
    void *ctx, *pull;
    char endpoint[SY_COMM_EP_MAX];
    sy_msgvec stash;           /* messages of later rounds or generations, arrival order */
    _Atomic uint64_t dropped;  /* stale-generation or malformed messages (read by other threads) */
    tcp_comm *active;
    /* CURVE (sy_dataplane_new_curve): our key pair and the ZAP handler; curve false: plaintext */
    bool curve;
    char pub[41], sec[41];
    sy_dp_zap *zap;
    /* ZeroMQ names this context's threads "<serial>/ZMQbg/..." (ZMQ_THREAD_NAME_PREFIX), which is
     * how tcp_dp_background finds them; their ids once found */
    int serial;
    pid_t bg_tids[8];
    int n_bg_tids;
} tcp_dp;

/* zmq's free function needs both the per-peer counter and the eventfd; the hint points at a
 * per-peer slot holding both. */
typedef struct {
    atomic_long count;
    int efd;
} sy_peer_slot;

struct tcp_comm {
    sy_comm_t b;               /* first: comm.c's view (rank, world, gen, abort flag, stats) */
    tcp_dp *dp;                /* NULL once the data plane was destroyed */
    uint64_t seq;
    void **push;               /* [world], NULL for ourselves */
    sy_peer_slot *slots;       /* [world] zero-copy sends not yet released by zmq, per peer */
    int efd;                   /* eventfd: a zero-copy send was released */
    bool leak;                 /* zmq may still hold a pointer into us: never free */
    void *scratch;             /* all-reduce receive blocks */
    size_t scratch_cap;
    /* per-round receive bookkeeping, [world] each */
    uint64_t *r_total;
    uint32_t *r_next;
    uint8_t *r_expect, *r_done;
    char (*keys)[41];          /* [world] members' public keys (Z85) on a CURVE data plane, else NULL */
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

static sy_status tcp_dp_new(const char *bind_addr, const char *public_z85, const char *secret_z85,
                             sy_dataplane_t **out) {
    sy_status st = SY_OK;
    if (!bind_addr) return sy_err_set(SY_EINVAL, "data plane: tcp needs a bind address (tcp://host:port)");
    tcp_dp *dp = calloc(1, sizeof *dp);
    if (!dp) return sy_err_set(SY_ENOMEM, "data plane: allocation");
    dp->ctx = zmq_ctx_new();
    if (!dp->ctx) {
        st = zmq_fail("zmq_ctx_new");
        goto fail;
    }
    static atomic_int serials;
    dp->serial = atomic_fetch_add(&serials, 1) % 1000 + 1;
    (void)zmq_ctx_set(dp->ctx, ZMQ_THREAD_NAME_PREFIX, dp->serial);
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
    if (public_z85) {
        /* The ZAP handler must be bound before the first handshake can ask it. */
        dp->curve = true;
        snprintf(dp->pub, sizeof dp->pub, "%s", public_z85);
        snprintf(dp->sec, sizeof dp->sec, "%s", secret_z85);
        SY_CHECK_GOTO(sy_dp_zap_start(dp->ctx, &dp->zap), st, fail);
        int one = 1;
        if (zmq_setsockopt(dp->pull, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
            zmq_setsockopt(dp->pull, ZMQ_CURVE_SECRETKEY, dp->sec, 41) != 0 ||
            zmq_setsockopt(dp->pull, ZMQ_ZAP_DOMAIN, SY_DP_ZAP_DOMAIN, strlen(SY_DP_ZAP_DOMAIN)) != 0) {
            st = zmq_fail("PULL socket CURVE options (is libzmq built with CURVE?)");
            goto fail;
        }
    }
    SY_CHECK_ZMQ_GOTO(zmq_bind(dp->pull, bind_addr), st, fail, "data plane: bind '%s'", bind_addr);
    size_t len = sizeof dp->endpoint;
    if (zmq_getsockopt(dp->pull, ZMQ_LAST_ENDPOINT, dp->endpoint, &len) != 0) {
        st = zmq_fail("ZMQ_LAST_ENDPOINT");
        goto fail;
    }
    *out = &dp->base;
    return SY_OK;
fail:
    if (dp->pull) zmq_close(dp->pull);
    sy_dp_zap_stop(&dp->zap);
    if (dp->ctx) zmq_ctx_term(dp->ctx);
    memset(dp->sec, 0, sizeof dp->sec);
    free(dp);
    return st;
}

static void comm_close_sockets(tcp_comm *c, int linger_ms);

/* The context's threads: ZeroMQ starts them with its first socket (the PULL socket, made in
 * tcp_dp_new), one I/O thread and the reaper, named "<serial>/ZMQbg/IO/0" and
 * "<serial>/ZMQbg/Reaper" (each by itself, once it runs): 0 once found, else an errno. */
static int tcp_dp_find_threads(tcp_dp *dp) {
    /* each thread names itself once it runs: until both have, look again at every call */
    if (dp->n_bg_tids < 2) {
        dp->n_bg_tids = 0;
        char want[24];
        const int wl = snprintf(want, sizeof want, "%d/ZMQbg", dp->serial);
        DIR *d = opendir("/proc/self/task");
        if (!d) return errno;
        struct dirent *de;
        while ((de = readdir(d)) && dp->n_bg_tids < (int)(sizeof dp->bg_tids / sizeof dp->bg_tids[0])) {
            if (de->d_name[0] == '.') continue;
            char path[300], comm[32] = "";
            snprintf(path, sizeof path, "/proc/self/task/%s/comm", de->d_name);
            FILE *f = fopen(path, "r");
            if (!f) continue;
            if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
            fclose(f);
            if (!strncmp(comm, want, (size_t)wl)) dp->bg_tids[dp->n_bg_tids++] = (pid_t)atoi(de->d_name);
        }
        closedir(d);
        if (dp->n_bg_tids == 0) return ESRCH;
    }
    return 0;
}

static int tcp_dp_background(sy_dataplane_t *base, int on) {
    tcp_dp *dp = (tcp_dp *)base;
    int e = tcp_dp_find_threads(dp);
    for (int i = 0; !e && i < dp->n_bg_tids; i++) e = sy_bg_set(dp->bg_tids[i], on);
    return e;
}

static int tcp_dp_pin(sy_dataplane_t *base, const cpu_set_t *cpus) {
    tcp_dp *dp = (tcp_dp *)base;
    int e = tcp_dp_find_threads(dp);
    for (int i = 0; !e && i < dp->n_bg_tids; i++) e = sy_affinity_set(dp->bg_tids[i], cpus);
    return e;
}

static void tcp_dp_destroy(sy_dataplane_t *base) {
    tcp_dp *dp = (tcp_dp *)base;
    /* A communicator still open would keep zmq_ctx_term waiting for its sockets. */
    if (dp->active) {
        comm_close_sockets(dp->active, 0);
        dp->active->dp = NULL;
    }
    msgvec_free(&dp->stash);
    zmq_close(dp->pull);
    sy_dp_zap_stop(&dp->zap);
    zmq_ctx_term(dp->ctx);
    memset(dp->sec, 0, sizeof dp->sec);
    free(dp);
}

static const char *tcp_dp_endpoint(const sy_dataplane_t *dp) { return ((const tcp_dp *)dp)->endpoint; }

static uint64_t tcp_dp_dropped(const sy_dataplane_t *dp) { return atomic_load(&((tcp_dp *)dp)->dropped); }
static uint64_t tcp_dp_refused(const sy_dataplane_t *dp) { return sy_dp_zap_refused(((const tcp_dp *)dp)->zap); }

static sy_status tcp_dp_authorize(sy_dataplane_t *base, const char *const *keys, int n, int hold_ms) {
    tcp_dp *dp = (tcp_dp *)base;
    if (!dp->zap) return sy_err_set(SY_EINVAL, "data plane: not CURVE");
    uint8_t(*raw)[32] = calloc((size_t)(n > 0 ? n : 1), sizeof *raw);
    if (!raw) return sy_err_set(SY_ENOMEM, "data plane: keys of world %d", n);
    for (int r = 0; r < n; r++) zmq_z85_decode(raw[r], keys[r]);
    sy_status st = sy_dp_zap_authorize(dp->zap, (const uint8_t(*)[32])raw, n, hold_ms);
    free(raw);
    return st;
}

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

static long outstanding_total(const tcp_comm *c) {
    long t = 0;
    for (int r = 0; r < c->b.world; r++) t += atomic_load(&c->slots[r].count);
    return t;
}

static void comm_close_sockets(tcp_comm *c, int linger_ms) {
    if (!c->push) return;
    for (int r = 0; r < c->b.world; r++) {
        if (!c->push[r]) continue;
        zmq_setsockopt(c->push[r], ZMQ_LINGER, &linger_ms, sizeof linger_ms);
        zmq_close(c->push[r]);
        c->push[r] = NULL;
    }
}

/* comm.c checked the arguments (world > 1, endpoints present) and fills in c->b afterwards. */
static sy_status tcp_comm_new(sy_dataplane_t *base, uint64_t generation, int rank, int world,
                              const char *const *endpoints, const char *const *peer_keys, int timeout_ms,
                              sy_comm_t **out) {
    tcp_dp *dp = (tcp_dp *)base;
    sy_status st = SY_OK;
    if (dp->active)
        return sy_err_set(SY_EINVAL, "comm: the data plane already has the communicator of generation %llu open",
                          (unsigned long long)dp->active->b.gen);
    tcp_comm *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "comm: allocation");
    c->dp = dp;
    c->b.world = world; /* comm_close_sockets on the failure path below reads it */
    c->efd = -1;
    size_t W = (size_t)world;
    c->push = calloc(W, sizeof *c->push);
    c->slots = calloc(W, sizeof *c->slots);
    c->r_total = calloc(W, sizeof *c->r_total);
    c->r_next = calloc(W, sizeof *c->r_next);
    c->r_expect = calloc(W, 1);
    c->r_done = calloc(W, 1);
    if (peer_keys) c->keys = calloc(W, sizeof *c->keys);
    if (!c->push || !c->slots || !c->r_total || !c->r_next || !c->r_expect || !c->r_done ||
        (peer_keys && !c->keys)) {
        st = sy_err_set(SY_ENOMEM, "comm: allocation for world %d", world);
        goto fail;
    }
    if (peer_keys) { /* admit exactly this generation's members from now on */
        for (int r = 0; r < world; r++) snprintf(c->keys[r], sizeof c->keys[r], "%s", peer_keys[r]);
        st = tcp_dp_authorize(base, peer_keys, world, timeout_ms);
        if (st != SY_OK) goto fail;
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
        if (c->keys && (zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, c->keys[r], 41) != 0 ||
                        zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, dp->pub, 41) != 0 ||
                        zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, dp->sec, 41) != 0)) {
            st = zmq_fail("PUSH socket CURVE keys");
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
    *out = &c->b;
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
    free(c->keys);
    free(c);
    return st;
}

/* Waits (bounded) until zmq released every zero-copy send. Returns false if it did not. */
static bool wait_released(tcp_comm *c, int bound_ms) {
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

static void tcp_comm_destroy(sy_comm_t *base) {
    tcp_comm *c = (tcp_comm *)base;
    comm_close_sockets(c, c->b.failed == SY_OK ? c->b.timeout_ms : 0);
    if (!c->leak && !wait_released(c, SY_COMM_RELEASE_MS)) c->leak = true;
    tcp_dp *dp = c->dp;
    if (dp) {
        /* Pending messages of this generation are dropped; later generations stay stashed. */
        size_t keep = 0;
        for (size_t i = 0; i < dp->stash.n; i++) {
            sy_stashed *e = &dp->stash.v[i];
            if (e->h.gen <= c->b.gen) {
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
    free(c->keys);
    c->keys = NULL;
    if (c->leak) {
        /* zmq's I/O thread may still call zc_free with a pointer into the slots: keep them. */
        sy_error("comm: zmq did not release generation %llu's send buffers within %d ms; leaking its counters",
                 (unsigned long long)c->b.gen, SY_COMM_RELEASE_MS);
        return;
    }
    if (c->efd >= 0) close(c->efd);
    free(c->slots);
    free(c);
}

/* ---------------------------------------------------------------- failure */

/* After a failure or abort (comm.c recorded it): closes the send sockets so zmq drops whatever
 * is queued and releases the caller's buffers, waits for that (bounded). */
static void tcp_fail(sy_comm_t *base) {
    tcp_comm *c = (tcp_comm *)base;
    comm_close_sockets(c, 0);
    if (!wait_released(c, SY_COMM_RELEASE_MS)) c->leak = true;
}

/* Entry check of every collective op (comm.c did the generic ones). */
static sy_status comm_enter(tcp_comm *c, const char *what) {
    if (!c->dp) return sy_err_set(SY_EINVAL, "comm: %s: its data plane was destroyed", what);
    return SY_OK;
}

/* ---------------------------------------------------------------- sending */

static sy_status send_frames(tcp_comm *c, int dst, const sy_hdr *h, const void *data, size_t len) {
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
        if (sy_comm_aborted(&c->b))
            return sy_err_set(SY_EABORTED, "comm: %s #%llu aborted while sending to rank %d", op_name(h->op),
                              (unsigned long long)h->seq, dst);
        if (sy_mono_ms() - last > c->b.timeout_ms)
            return sy_err_set(SY_ETIMEOUT, "comm: %s #%llu (generation %llu): rank %d did not accept data within %d ms",
                              op_name(h->op), (unsigned long long)h->seq, (unsigned long long)c->b.gen, dst,
                              c->b.timeout_ms);
        zmq_pollitem_t it = {.socket = s, .events = ZMQ_POLLOUT};
        zmq_poll(&it, 1, SY_COMM_SLICE_MS);
    }
    return SY_OK;
}

/* Sends `len` bytes at `data` to rank dst as the stream of round `seq`. */
static sy_status send_stream(tcp_comm *c, int op, int dst, const void *data, size_t len) {
    sy_hdr h = {.magic = SY_COMM_MAGIC, .version = SY_COMM_VERSION, .op = (uint8_t)op,
                .src = (uint16_t)c->b.rank, .seq = (uint32_t)c->seq, .gen = c->b.gen, .total = len};
    uint64_t nch = nchunks_of(len);
    const char *p = data;
    for (uint64_t k = 0; k < nch; k++) {
        h.chunk = (uint32_t)k;
        size_t l = chunk_len(len, k);
        SY_CHECK(send_frames(c, dst, &h, p + k * SY_COMM_CHUNK, l));
    }
    c->b.stats.bytes_sent += len;
    return SY_OK;
}

/* Waits until zmq released all zero-copy sends (the bytes are in the kernel), with the same
 * progress deadline as receiving. */
static sy_status wait_sends(tcp_comm *c, int op) {
    int64_t last = sy_mono_ms();
    long prev = outstanding_total(c);
    while (prev > 0) {
        if (sy_comm_aborted(&c->b))
            return sy_err_set(SY_EABORTED, "comm: %s #%llu (generation %llu) aborted", op_name(op),
                              (unsigned long long)c->seq, (unsigned long long)c->b.gen);
        int64_t t = sy_mono_ms();
        if (t - last >= c->b.timeout_ms) {
            char who[200] = "";
            for (int r = 0; r < c->b.world; r++)
                if (atomic_load(&c->slots[r].count) > 0) rank_list_add(who, sizeof who, r);
            return sy_err_set(SY_ETIMEOUT,
                              "comm: %s #%llu (generation %llu): data to rank(s) %s not taken within %d ms",
                              op_name(op), (unsigned long long)c->seq, (unsigned long long)c->b.gen, who,
                              c->b.timeout_ms);
        }
        zmq_pollitem_t it = {.socket = NULL, .fd = c->efd, .events = ZMQ_POLLIN};
        long left = (long)(last + c->b.timeout_ms - t);
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
typedef sy_status (*round_fn)(tcp_comm *c, void *ctx, const sy_hdr *h, zmq_msg_t *body);

/* Starts the next round: a fresh sequence number and empty stream bookkeeping. */
static sy_status round_begin(tcp_comm *c, int op) {
    if (c->seq >= SY_COMM_SEQ_MAX)
        return sy_err_set(SY_EINVAL, "comm: %s: generation %llu used all its %u rounds; open a new generation",
                          op_name(op), (unsigned long long)c->b.gen, SY_COMM_SEQ_MAX);
    c->seq++;
    for (int r = 0; r < c->b.world; r++) {
        c->r_total[r] = 0;
        c->r_next[r] = 0;
        c->r_expect[r] = 0;
        c->r_done[r] = 0;
    }
    return SY_OK;
}

/* Validates a message of the current round against the stream bookkeeping and hands it on.
 * *progress is set when it was accepted. */
static sy_status round_accept(tcp_comm *c, int op, const sy_hdr *h, zmq_msg_t *body, round_fn fn, void *ctx,
                              int *remaining) {
    int src = (int)h->src;
    if (h->op != op)
        return sy_err_set(SY_EFORMAT, "comm: round #%llu (generation %llu): rank %d is in %s while rank %d runs %s",
                          (unsigned long long)c->seq, (unsigned long long)c->b.gen, src, op_name(h->op), c->b.rank,
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
    c->b.stats.bytes_received += zmq_msg_size(body);
    if (c->r_next[src] == nchunks_of(h->total)) {
        c->r_done[src] = 1;
        (*remaining)--;
    }
    return fn(c, ctx, h, body);
}

/* On a CURVE data plane, the connection a message came on must carry the key of the rank its
 * header names (ZeroMQ attaches the ZAP handler's User-Id, the key in Z85, to every message). */
static bool sender_ok(const tcp_comm *c, uint32_t src, zmq_msg_t *body) {
    if (!c->keys) return true;
    const char *uid = zmq_msg_gets(body, "User-Id");
    return uid && !strcmp(uid, c->keys[src]);
}

/* Reads one raw message from the PULL socket (non-blocking). 1: got one, 0: nothing, <0 error. */
static int read_raw(tcp_dp *dp, sy_hdr *h, zmq_msg_t *body, bool *valid) {
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
static sy_status round_recv(tcp_comm *c, int op, round_fn fn, void *ctx) {
    sy_status st = SY_OK;
    tcp_dp *dp = c->dp;
    int remaining = 0;
    for (int r = 0; r < c->b.world; r++) remaining += c->r_expect[r] && !c->r_done[r];

    /* Replay the stash. */
    size_t keep = 0;
    for (size_t i = 0; i < dp->stash.n; i++) {
        sy_stashed *e = &dp->stash.v[i];
        if (e->h.gen == c->b.gen && e->h.seq == c->seq && st == SY_OK) {
            if (e->h.src < (uint32_t)c->b.world && (int)e->h.src != c->b.rank && sender_ok(c, e->h.src, &e->body))
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
        if (sy_comm_aborted(&c->b)) {
            st = sy_err_set(SY_EABORTED, "comm: %s #%llu (generation %llu) aborted", op_name(op),
                            (unsigned long long)c->seq, (unsigned long long)c->b.gen);
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
            if (t - last >= c->b.timeout_ms) {
                char who[200] = "";
                for (int r = 0; r < c->b.world; r++)
                    if (c->r_expect[r] && !c->r_done[r]) rank_list_add(who, sizeof who, r);
                st = sy_err_set(SY_ETIMEOUT,
                                "comm: %s #%llu (generation %llu): no data from rank(s) %s within %d ms",
                                op_name(op), (unsigned long long)c->seq, (unsigned long long)c->b.gen, who,
                                c->b.timeout_ms);
                break;
            }
            long left = (long)(last + c->b.timeout_ms - t);
            zmq_pollitem_t it = {.socket = dp->pull, .events = ZMQ_POLLIN};
            if (zmq_poll(&it, 1, left < SY_COMM_SLICE_MS ? left : SY_COMM_SLICE_MS) < 0 && zmq_errno() != EINTR) {
                st = zmq_fail("poll");
                break;
            }
            continue;
        }
        /* Sources are checked against this world only for this generation: a later one may
         * have another world size. */
        if (!valid || h.gen < c->b.gen || (h.gen == c->b.gen && h.seq < c->seq)) {
            dp->dropped++;
            continue;
        }
        if (h.gen > c->b.gen || h.seq > c->seq) {
            st = msgvec_push(&dp->stash, &h, &body);
            if (st != SY_OK) break;
            continue;
        }
        if (h.src >= (uint32_t)c->b.world || (int)h.src == c->b.rank || !sender_ok(c, h.src, &body)) {
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

/* Every size is known before the round starts: each chunk goes straight to its place. */
typedef struct {
    char *recv;
    const size_t *recv_bytes;
    const size_t *recv_off;
} a2a_ctx;

static sy_status a2a_on_msg(tcp_comm *c, void *ctx, const sy_hdr *h, zmq_msg_t *body) {
    a2a_ctx *a = ctx;
    if (h->total != a->recv_bytes[h->src])
        return sy_err_set(SY_EFORMAT, "comm: alltoallv #%llu: rank %u sends %llu bytes, rank %d expects %zu",
                          (unsigned long long)c->seq, h->src, (unsigned long long)h->total, c->b.rank,
                          a->recv_bytes[h->src]);
    size_t len = zmq_msg_size(body);
    if (len) memcpy(a->recv + a->recv_off[h->src] + (size_t)h->chunk * SY_COMM_CHUNK, zmq_msg_data(body), len);
    return SY_OK;
}

static sy_status tcp_alltoallv(sy_comm_t *base, const void *send, const size_t *send_bytes, void *recv,
                               const size_t *recv_bytes) {
    tcp_comm *c = (tcp_comm *)base;
    SY_CHECK(comm_enter(c, "alltoallv"));
    enum { STACK_W = 64 };
    size_t stack[2 * STACK_W];
    size_t W = (size_t)c->b.world;
    size_t *send_off = W <= STACK_W ? stack : malloc(2 * W * sizeof *send_off);
    if (!send_off) return sy_err_set(SY_ENOMEM, "comm: alltoallv offsets for world %zu", W);
    size_t *recv_off = send_off + W;
    size_t so = 0, ro = 0;
    for (size_t r = 0; r < W; r++) {
        send_off[r] = so, recv_off[r] = ro;
        so += send_bytes[r], ro += recv_bytes[r];
    }
    const char *s = send;
    a2a_ctx a = {.recv = recv, .recv_bytes = recv_bytes, .recv_off = recv_off};
    sy_status st = round_begin(c, OP_A2A);
    /* Send to rank+1, rank+2, ... so the ranks do not all start on the same receiver. */
    for (int k = 1; k < c->b.world && st == SY_OK; k++) {
        int dst = (c->b.rank + k) % c->b.world;
        st = send_stream(c, OP_A2A, dst, s + send_off[dst], send_bytes[dst]);
    }
    if (st == SY_OK && send_bytes[c->b.rank])
        memcpy(a.recv + recv_off[c->b.rank], s + send_off[c->b.rank], send_bytes[c->b.rank]);
    for (int r = 0; r < c->b.world; r++) c->r_expect[r] = r != c->b.rank;
    if (st == SY_OK) st = round_recv(c, OP_A2A, a2a_on_msg, &a);
    if (st == SY_OK) st = wait_sends(c, OP_A2A);
    if (send_off != stack) free(send_off);
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

static sy_status ar_on_msg(tcp_comm *c, void *ctx, const sy_hdr *h, zmq_msg_t *body) {
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

static sy_status allreduce(tcp_comm *c, void *buf, size_t n, size_t esz,
                           void (*sum)(void *, const void *const *, int, size_t)) {
    SY_CHECK(comm_enter(c, "allreduce"));
    int W = c->b.world, me = c->b.rank;
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
    if (st != SY_OK) goto out;
    for (int r = 0; r < W; r++)
        in[r] = r == me ? (const void *)(b + boff[me])
                        : (const void *)((char *)c->scratch + (size_t)(r < me ? r : r - 1) * blen[me]);
    sum(b + boff[me], in, W, blen[me] / esz);
    /* Round 2: all-gather. */
    st = round_begin(c, OP_AG);
    if (st != SY_OK) goto out;
    for (int k = 1; k < W && st == SY_OK; k++) {
        int dst = (me + k) % W;
        st = send_stream(c, OP_AG, dst, b + boff[me], blen[me]);
    }
    for (int r = 0; r < W; r++) c->r_expect[r] = r != me;
    ar_ctx ag = {.dst_base = b, .rank = me, .by_slot = false, .block_off = boff, .block_len = blen};
    if (st == SY_OK) st = round_recv(c, OP_AG, ar_on_msg, &ag);
    if (st == SY_OK) st = wait_sends(c, OP_AG);
out:
    if (boff != stack_off) free(boff);
    if (blen != stack_len) free(blen);
    if (in != stack_in) free(in);
    return st;
}

static sy_status tcp_allreduce(sy_comm_t *base, void *buf, size_t n, sy_comm_dtype dt) {
    tcp_comm *c = (tcp_comm *)base;
    return dt == SY_COMM_F32 ? allreduce(c, buf, n, sizeof(float), sum_f32)
                             : allreduce(c, buf, n, sizeof(double), sum_f64);
}

/* ---------------------------------------------------------------- broadcast, barrier */

typedef struct {
    char *buf;
    size_t bytes;
} bc_ctx;

static sy_status bc_on_msg(tcp_comm *c, void *ctx, const sy_hdr *h, zmq_msg_t *body) {
    bc_ctx *a = ctx;
    if (h->total != a->bytes)
        return sy_err_set(SY_EINVAL, "comm: broadcast #%llu: root %u sent %llu bytes, this rank expects %zu",
                          (unsigned long long)c->seq, h->src, (unsigned long long)h->total, a->bytes);
    size_t len = zmq_msg_size(body);
    if (len) memcpy(a->buf + (size_t)h->chunk * SY_COMM_CHUNK, zmq_msg_data(body), len);
    return SY_OK;
}

static sy_status tcp_broadcast(sy_comm_t *base, void *buf, size_t bytes, int root) {
    tcp_comm *c = (tcp_comm *)base;
    SY_CHECK(comm_enter(c, "broadcast"));
    sy_status st = round_begin(c, OP_BCAST);
    if (st != SY_OK) return st;
    if (c->b.rank == root) {
        for (int k = 1; k < c->b.world && st == SY_OK; k++)
            st = send_stream(c, OP_BCAST, (root + k) % c->b.world, buf, bytes);
        if (st == SY_OK) st = wait_sends(c, OP_BCAST);
    } else {
        c->r_expect[root] = 1;
        bc_ctx a = {.buf = buf, .bytes = bytes};
        st = round_recv(c, OP_BCAST, bc_on_msg, &a);
    }
    return st;
}

static sy_status barrier_on_msg(tcp_comm *c, void *ctx, const sy_hdr *h, zmq_msg_t *body) {
    (void)ctx, (void)body;
    if (h->total != 0)
        return sy_err_set(SY_EFORMAT, "comm: barrier #%llu: rank %u sent %llu bytes", (unsigned long long)c->seq,
                          h->src,
                          (unsigned long long)h->total);
    return SY_OK;
}

static sy_status tcp_barrier(sy_comm_t *base) {
    tcp_comm *c = (tcp_comm *)base;
    SY_CHECK(comm_enter(c, "barrier"));
    sy_status st = round_begin(c, OP_BARRIER);
    if (st != SY_OK) return st;
    for (int k = 1; k < c->b.world && st == SY_OK; k++)
        st = send_stream(c, OP_BARRIER, (c->b.rank + k) % c->b.world, NULL, 0);
    for (int r = 0; r < c->b.world; r++) c->r_expect[r] = r != c->b.rank;
    if (st == SY_OK) st = round_recv(c, OP_BARRIER, barrier_on_msg, NULL);
    if (st == SY_OK) st = wait_sends(c, OP_BARRIER);
    return st;
}

const sy_comm_ops sy_comm_tcp_ops = {
    .name = "tcp",
    .dp_new = tcp_dp_new,
    .dp_destroy = tcp_dp_destroy,
    .dp_endpoint = tcp_dp_endpoint,
    .dp_dropped = tcp_dp_dropped,
    .dp_refused = tcp_dp_refused,
    .dp_background = tcp_dp_background,
    .dp_pin = tcp_dp_pin,
    .dp_authorize = tcp_dp_authorize,
    .comm_new = tcp_comm_new,
    .comm_destroy = tcp_comm_destroy,
    .fail = tcp_fail,
    .alltoallv = tcp_alltoallv,
    .allreduce = tcp_allreduce,
    .broadcast = tcp_broadcast,
    .barrier = tcp_barrier,
};
