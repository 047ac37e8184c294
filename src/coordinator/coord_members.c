/* Membership of the coordinator (coord_internal.h): registration (Hello/Welcome, session
 * secrets, the worker table), liveness (heartbeats, faults, lost workers), generations (ranks,
 * placement and Assign; closing, recovery, the run's end) and the messages sent to workers.
 * Called by the reactor (coord.c) and by the step and checkpoint handlers. Thread: the
 * reactor's. */
#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>
#include <sys/random.h>
#include <unistd.h>

#include "base/log.h"
#include "proto/peers.h"
#include "proto/placement.h"
#include "proto/protocol.h"
#include "coord_internal.h"

/* Recoveries in a row without progress beyond the furthest step reached before the run fails. */
#define MAX_FRUITLESS_RECOVERIES 5
/* Registered workers kept at most: max_workers times this, plus slack for lost entries. */
#define TABLE_FACTOR 4
#define TABLE_SLACK 16
/* A Fault's accused peer is excluded only if silent for this many heartbeats too. */
#define SUSPECT_HEARTBEATS 2
/* Peer faults, in recoveries without progress, naming ranks that still answer on the control
 * plane before the most accused one is excluded (a data-plane-only partition, issue 13 (d)). */
#define ACCUSATIONS_TO_EXCLUDE 2

static bool rid_names(const uint8_t *rid, size_t rid_len, char *id, size_t cap);
static bool printable(const char *s, size_t max);
static void new_session(worker *w);
static void index_put(sy_coord_t *c, int i);
static bool index_rebuild(sy_coord_t *c);
static int cmp_seq(const void *a, const void *b, void *ctx);
static json_t *ids_of_members(sy_coord_t *c);
static void send_abort(sy_coord_t *c, worker *w, const char *reason);
static void send_abort_ea(sy_coord_t *c, worker *w, const char *reason, int64_t end_after);
static void send_stop_ea(sy_coord_t *c, worker *w, const char *reason, int64_t end_after);

/* ---------------------------------------------------------------------------------------- */
/* Registration                                                                             */

void sy_coord_on_hello(sy_coord_t *c, const uint8_t *rid, size_t rid_len, const Sy__Envelope *env) {
    const Sy__Hello *h = env->hello;
    const char *id = h->worker_id;
    if (!id || !printable(id, ID_MAX) || (h->data_endpoint && strlen(h->data_endpoint) >= EP_MAX) ||
        (h->replica_endpoint && strlen(h->replica_endpoint) >= EP_MAX)) {
        sy_coord_drop(c, SY_DROP_INVALID, "Hello with an invalid worker id or endpoint");
        return;
    }
    char named[ID_MAX];
    if (!rid_names(rid, rid_len, named, sizeof named) || strcmp(named, id) != 0) {
        sy_coord_drop(c, SY_DROP_BAD_FRAME, "Hello from worker '%s' whose ZeroMQ routing id does not name it (set "
                      "ZMQ_ROUTING_ID to the worker id, optionally followed by '/' and a nonce)", id);
        return;
    }
    int i = sy_coord_find_worker(c, id);
    int64_t now = sy_mono_ms();
    if (i >= 0 && c->zap && strcmp(c->w[i].key, c->src_key) != 0) {
        sy_coord_drop(c, SY_DROP_AUTH, "Hello for worker '%s' from CURVE key %s: that id is bound to key %s", id,
                      c->src_key, c->w[i].key);
        return;
    }
    if (i >= 0 && sy_coord_live(&c->w[i])) {
        if (!sy_coord_proves(c, &c->w[i], env)) {
            /* Only the registered process knows its session: a routing id (or a pid) alone never
             * replaces a live registration. A restarted process gets the id once the old one is
             * lost (its connection closed, or failure_timeout_ms of silence). */
            sy_coord_drop(c, SY_DROP_AUTH,
                          "Hello for live worker '%s' (pid %u) without its session secret (from pid %u): "
                          "ignored; a new process with this id is taken once the old one is lost",
                          id, (unsigned)c->w[i].pid, (unsigned)h->pid);
            return;
        }
        /* The registered process again (it lost touch with us, maybe on a new socket): refresh,
         * take its current route, welcome again. */
        c->w[i].last_seen = now;
        c->w[i].fd = c->src_fd;
        memcpy(c->w[i].rid, rid, rid_len);
        c->w[i].rid_len = rid_len;
        sy_coord_send_welcome(c, &c->w[i]);
        return;
    }
    if (i >= 0 && c->w[i].state == W_STOPPED && c->w[i].pid == h->pid) {
        /* A drained (stopped) process that lost touch before acting on its Stop: stop it again
         * rather than taking it back (a new process with the same id is welcome). */
        sy_coord_send_stop(c, &c->w[i], "drained");
        return;
    }
    uint8_t *held_ex = i >= 0 ? c->w[i].held_ex : NULL; /* an entry's buffer stays with it */
    if (i < 0) {
        int cap = c->cfg.cluster.max_workers * TABLE_FACTOR + TABLE_SLACK;
        if (c->nw >= cap) { /* forget the oldest lost/stopped entry */
            for (int j = 0; j < c->nw; j++)
                if (!sy_coord_live(&c->w[j])) {
                    free(c->w[j].held_ex);
                    memmove(&c->w[j], &c->w[j + 1], sizeof(worker) * (size_t)(c->nw - j - 1));
                    c->nw--;
                    break;
                }
            /* Member indices may have moved. */
            index_rebuild(c);
            for (int r = 0; r < c->world; r++) c->members[r] = -1;
            for (int j = 0; j < c->nw; j++)
                if (c->gen_open && c->w[j].rank >= 0) c->members[c->w[j].rank] = j;
        }
        if (c->nw >= cap) {
            sy_coord_drop(c, SY_DROP_UNEXPECTED, "Hello from '%s': worker table full (%d)", id, cap);
            return;
        }
        if (c->nw == c->capw) {
            int oc = c->capw, nc = oc ? 2 * oc : 16;
            worker *nw = realloc(c->w, sizeof(worker) * (size_t)nc);
            if (!nw) return;
            c->w = nw;
            c->capw = nc;
            if (!index_rebuild(c)) {
                c->capw = oc; /* the index covers only the old capacity: refuse instead */
                sy_coord_drop(c, SY_DROP_UNEXPECTED, "Hello from '%s': out of memory", id);
                return;
            }
        }
        i = c->nw++;
        snprintf(c->w[i].id, sizeof c->w[i].id, "%s", id);
        index_put(c, i);
    }
    worker *w = &c->w[i];
    memset(w, 0, sizeof *w);
    w->held_ex = held_ex;
    snprintf(w->id, sizeof w->id, "%s", id);
    memcpy(w->rid, rid, rid_len);
    w->rid_len = rid_len;
    snprintf(w->host, sizeof w->host, "%s", h->host ? h->host : "");
    snprintf(w->backend, sizeof w->backend, "%s", h->backend ? h->backend : "");
    snprintf(w->version, sizeof w->version, "%s", h->version ? h->version : "");
    snprintf(w->data_ep, sizeof w->data_ep, "%s", h->data_endpoint ? h->data_endpoint : "");
    snprintf(w->rep_ep, sizeof w->rep_ep, "%s", h->replica_endpoint ? h->replica_endpoint : "");
    w->table_frame = h->table_frame;
    snprintf(w->activity, sizeof w->activity, "idle");
    w->pid = h->pid;
    w->state = W_IDLE;
    w->rank = -1;
    w->last_seen = w->joined = now;
    w->fd = c->src_fd;
    w->seq = ++c->next_seq;
    new_session(w);
    snprintf(w->key, sizeof w->key, "%s", c->src_key);
    c->last_join = now;
    /* Number our generations above any this worker ran in under an earlier incarnation: the
     * data plane orders traffic by generation number, and an old incarnation's generation 1
     * must never look like a later round of ours (a restarted coordinator starts again at 1).
     * Values near the top of the range are ignored (no wrap-around from a hostile Hello). */
    if (h->last_generation > c->gen_floor && h->last_generation < SY_COORD_GEN_MAX) c->gen_floor = h->last_generation;
    sy_coord_send_welcome(c, w);
    sy_coord_event(c, "worker_joined", json_pack("{s:s, s:s, s:i, s:s, s:s}", "worker", w->id, "host", w->host, "pid",
                                                 (int)w->pid, "backend", w->backend, "data_endpoint", w->data_ep));
}

/* The registered worker a routing id names (index in c->w), or -1. */
int sy_coord_find_sender(sy_coord_t *c, const uint8_t *rid, size_t rid_len) {
    char named[ID_MAX];
    return rid_names(rid, rid_len, named, sizeof named) ? sy_coord_find_worker(c, named) : -1;
}

/* The worker table's id index (issue 14): every message names its sender by id, and a linear
 * search made each message O(registered workers): 10,000 workers heartbeating twice a second
 * were 2 x 10^8 string compares a second. Open addressing, linear probing, FNV-1a; rebuilt
 * whenever c->w grows or its entries move, so it never holds a stale index. */
static uint32_t id_hash(const char *id) {
    uint32_t h = 2166136261u;
    for (; *id; id++) h = (h ^ (uint8_t)*id) * 16777619u;
    return h;
}

static void index_put(sy_coord_t *c, int i) {
    uint32_t mask = (uint32_t)c->wix_cap - 1;
    for (uint32_t k = id_hash(c->w[i].id) & mask;; k = (k + 1) & mask)
        if (c->wix[k] < 0) {
            c->wix[k] = i;
            return;
        }
}

/* Rebuilds the index for c->capw entries; false (index unchanged) when out of memory. */
static bool index_rebuild(sy_coord_t *c) {
    int cap = c->wix_cap ? c->wix_cap : 64;
    while (cap < 2 * c->capw) cap *= 2;
    if (cap != c->wix_cap) {
        int *n = realloc(c->wix, sizeof(int) * (size_t)cap);
        if (!n) return false;
        c->wix = n;
        c->wix_cap = cap;
    }
    for (int k = 0; k < c->wix_cap; k++) c->wix[k] = -1;
    for (int i = 0; i < c->nw; i++) index_put(c, i);
    return true;
}

int sy_coord_find_worker(sy_coord_t *c, const char *id) {
    if (!c->wix) return -1;
    uint32_t mask = (uint32_t)c->wix_cap - 1;
    for (uint32_t k = id_hash(id) & mask; c->wix[k] >= 0; k = (k + 1) & mask)
        if (!strcmp(c->w[c->wix[k]].id, id)) return c->wix[k];
    return -1;
}

/* The message proves it comes from registration w: it carries w's session secret (compared in
 * constant time) and, with CURVE on, comes from the public key w's id is bound to. */
bool sy_coord_proves(const sy_coord_t *c, const worker *w, const Sy__Envelope *env) {
    if (c->zap && strcmp(w->key, c->src_key) != 0) return false;
    if (env->session.len != SY_SESSION_LEN) return false;
    uint8_t d = 0;
    for (size_t k = 0; k < SY_SESSION_LEN; k++) d |= (uint8_t)(w->session[k] ^ env->session.data[k]);
    return d == 0;
}

/* Tells the sender of a message that we do not count it as registered (docs/protocol.md
 * "Re-registration"): a Welcome with reregister set and no session, so it sends Hello now. */
void sy_coord_send_reregister(sy_coord_t *c, const uint8_t *rid, size_t rid_len) {
    char id[ID_MAX];
    if (!rid_names(rid, rid_len, id, sizeof id)) return;
    Sy__Envelope env;
    Sy__Welcome wl = SY__WELCOME__INIT;
    sy_proto_init(&env, c->cfg.run.name, c->incarnation, 0);
    wl.worker_id = id;
    wl.heartbeat_ms = (uint32_t)c->cfg.cluster.heartbeat_ms;
    wl.reregister = true;
    env.body_case = SY__ENVELOPE__BODY_WELCOME;
    env.welcome = &wl;
    if (sy_proto_send(c->sock, rid, rid_len, &env) != SY_OK) sy_debug("to %s: %s", id, sy_err_msg());
}

/* The worker id a routing id names: the part before its last '/' ("w0/3fa9c2..." names "w0":
 * switchyard-worker adds a random nonce per socket, see docs/protocol.md "Identities"), or the
 * whole routing id when it has no '/'. False when that is not a possible worker id. */
static bool rid_names(const uint8_t *rid, size_t rid_len, char *id, size_t cap) {
    size_t n = rid_len;
    while (n > 0 && rid[n - 1] != '/') n--;
    n = n > 0 ? n - 1 : rid_len;
    if (n == 0 || n >= cap) return false;
    memcpy(id, rid, n);
    id[n] = 0;
    return strlen(id) == n;
}

static bool printable(const char *s, size_t max) {
    size_t n = 0;
    for (; s[n]; n++)
        if ((unsigned char)s[n] < 0x21 || (unsigned char)s[n] > 0x7e) return false;
    return n > 0 && n < max;
}

static void new_session(worker *w) {
    if (getrandom(w->session, sizeof w->session, 0) != (ssize_t)sizeof w->session) {
        /* no entropy source: still unique per registration, though guessable */
        uint64_t x = (uint64_t)sy_mono_ms() * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)w ^ (uint64_t)getpid();
        for (size_t k = 0; k < sizeof w->session; k++, x = x * 6364136223846793005ull + 1442695040888963407ull)
            w->session[k] = (uint8_t)(x >> 56);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Liveness                                                                                 */

/* Any proven message refreshes liveness; a worker declared lost that speaks again was only
 * slow: it comes back as a spare. */
void sy_coord_heard_from(sy_coord_t *c, worker *w) {
    w->last_seen = sy_mono_ms();
    w->fd = c->src_fd;
    if (w->state == W_LOST) {
        /* Alive after all (it was only slow): back as a spare; it got an Abort when declared lost. */
        w->fd_closed = false;
        w->state = W_IDLE;
        w->rank = -1;
        w->seq = ++c->next_seq;
        c->last_join = w->last_seen;
        sy_coord_event(c, "worker_joined", json_pack("{s:s, s:b}", "worker", w->id, "returned", 1));
    }
}

/* A Heartbeat: the worker's activity; a worker busy in a generation it is not a member of
 * gets Abort; a member training again after a recovery counts towards its restore phase. */
void sy_coord_on_heartbeat(sy_coord_t *c, worker *w, const Sy__Envelope *env) {
    const Sy__Heartbeat *hb = env->heartbeat;
    snprintf(w->activity, sizeof w->activity, "%s", hb->state && printable(hb->state, 16) ? hb->state : "?");
    w->dp_dropped = hb->dataplane_dropped;
    w->dp_refused = hb->dataplane_refused;
    w->peers_held = hb->peers_held;
    bool busy = !strcmp(w->activity, "training") || !strcmp(w->activity, "restoring");
    if (busy && env->generation != 0 && (w->rank < 0 || !c->gen_open || env->generation != c->gen)) {
        /* It works in a generation it is not (or no longer) a member of: it missed the Abort. */
        Sy__Envelope ab_env;
        Sy__Abort ab = SY__ABORT__INIT;
        sy_proto_init(&ab_env, c->cfg.run.name, c->incarnation, env->generation);
        ab.reason = "not a member of this generation";
        /* a member of a generation closed at its EndAfter step, still exchanging that step's
         * replicas (its heartbeat says training): the same close, so the same end_after, which
         * leaves that exchange to finish (a 0 here would cut it short after all) */
        if (env->generation == c->closed_gen && c->closed_end_after > 0) ab.end_after = (uint64_t)c->closed_end_after;
        ab_env.body_case = SY__ENVELOPE__BODY_ABORT;
        ab_env.abort = &ab;
        sy_coord_send(c, w, &ab_env);
    }
    if (c->gen_open && env->generation == c->gen && w->rank >= 0 && !strcmp(w->activity, "training") &&
        !w->restored && c->nrec && c->rec[c->nrec - 1].duration_ms < 0) {
        w->restored = true; /* counted, not searched: one heartbeat was O(world) */
        if (++c->n_restored == c->world) c->rec[c->nrec - 1].restored = sy_mono_ms();
    }
}

/* Issue 13 (d), an asymmetric partition: two workers that cannot reach each other's data plane
 * but both answer heartbeats. Every generation over them times out (data_timeout_ms) and the
 * faults never name a silent rank, so without this the coordinator re-opened the same membership
 * until the run failed. After ACCUSATIONS_TO_EXCLUDE such faults without progress, the most
 * accused live member (ties: the one named last) is excluded; it keeps heartbeating and comes back
 * as a spare. Bound: ACCUSATIONS_TO_EXCLUDE x (data_timeout_ms + a restore). */
static void exclude_if_accused(sy_coord_t *c, int named) {
    c->w[named].accused++;
    if (++c->accusations < ACCUSATIONS_TO_EXCLUDE) return;
    int pick = named;
    for (int r = 0; r < c->world; r++) {
        int i = c->members[r];
        if (i >= 0 && sy_coord_live(&c->w[i]) && c->w[i].accused > c->w[pick].accused) pick = i;
    }
    char why[200];
    snprintf(why, sizeof why, "unreachable on the data plane: named in %d of %d peer faults in a row, "
             "though it answers on the control plane", c->w[pick].accused, c->accusations);
    c->accusations = 0;
    for (int i = 0; i < c->nw; i++) c->w[i].accused = 0;
    /* it answers heartbeats, so it is back as a spare at once: without the quarantine the
     * recovery this starts would take it straight back in */
    c->w[pick].quarantined = true;
    sy_coord_worker_lost(c, pick, why);
}

void sy_coord_on_fault(sy_coord_t *c, worker *w, const Sy__Fault *f) {
    char why[300];
    snprintf(why, sizeof why, "fault from %s (rank %d): %s%s%s", w->id, w->rank, f->kind ? f->kind : "?",
             f->detail && *f->detail ? ": " : "", f->detail ? f->detail : "");
    sy_coord_event(c, "worker_fault",
                   json_pack("{s:s, s:s, s:s, s:i, s:I}", "worker", w->id, "kind", f->kind ? f->kind : "", "detail",
                             f->detail ? f->detail : "", "peer_rank", f->peer_rank, "step", (json_int_t)f->step));
    /* The accused peer is dropped only if it is silent too: a timeout cascades through ranks
     * waiting on each other, so the first accusation is often of a healthy rank. */
    if (f->peer_rank >= 0 && f->peer_rank < c->world) {
        int pi = c->members[f->peer_rank];
        if (pi >= 0 && sy_mono_ms() - c->w[pi].last_seen > (int64_t)SUSPECT_HEARTBEATS * c->cfg.cluster.heartbeat_ms)
            sy_coord_worker_lost(c, pi, "named by a peer's fault and silent");
        else if (pi >= 0)
            exclude_if_accused(c, pi);
    }
    /* A generation restoring from replicas that fails before its first step with an internal
     * error (a plan that a member could not follow): the next one uses the checkpoint. */
    if (c->from_replicas && c->max_reported < c->start_step && f->kind && !strcmp(f->kind, "internal"))
        c->replicas_failed = true;
    sy_coord_begin_recovery(c, why, NULL);
}

void sy_coord_worker_lost(sy_coord_t *c, int i, const char *reason) {
    worker *w = &c->w[i];
    if (!sy_coord_live(w)) return;
    bool member = c->gen_open && w->rank >= 0;
    int rank = w->rank;
    wstate was = w->state;
    w->state = W_LOST;
    send_abort(c, w, reason); /* in case it is alive but slow: it must not go on */
    sy_coord_event(c, "worker_lost", json_pack("{s:s, s:s, s:i, s:I, s:s}", "worker", w->id, "reason", reason, "rank",
                                               rank, "generation", (json_int_t)c->gen, "state", sy_coord_wstate[was]));
    if (member) {
        char why[300];
        snprintf(why, sizeof why, "worker %s (rank %d) lost: %s", w->id, rank, reason);
        sy_coord_begin_recovery(c, why, w->id);
        if (c->nrec && c->rec[c->nrec - 1].duration_ms < 0) {
            recovery *r = &c->rec[c->nrec - 1];
            if (!r->last_heard || w->last_seen < r->last_heard) r->last_heard = w->last_seen;
        }
    }
    w->rank = -1;
}

/* ---------------------------------------------------------------------------------------- */
/* Generations                                                                              */

/* Opens generation g+1 over the idle live workers (join order, at most max_workers). */
void sy_coord_open_generation(sy_coord_t *c) {
    int *cand = malloc(sizeof(int) * (size_t)(c->nw ? c->nw : 1));
    int n = 0;
    if (!cand) return;
    for (int i = 0; i < c->nw; i++)
        if (c->w[i].state == W_IDLE && !c->w[i].quarantined) cand[n++] = i;
    if (n < c->cfg.cluster.min_workers) /* better a quarantined worker than no run */
        for (int i = 0; i < c->nw; i++)
            if (c->w[i].state == W_IDLE && c->w[i].quarantined) cand[n++] = i;
    qsort_r(cand, (size_t)n, sizeof(int), cmp_seq, c->w);
    if (n > c->cfg.cluster.max_workers) n = c->cfg.cluster.max_workers;
    if (n < c->cfg.cluster.min_workers) { /* e.g. everyone drained: wait for workers */
        free(cand);
        c->regroup_since = 0;
        c->state = R_WAITING;
        c->dirty = true;
        return;
    }
    if (c->latest_ckpt >= c->cfg.run.steps) {
        free(cand);
        c->regroup_since = 0;
        sy_coord_finish(c, R_FINISHED, "already complete");
        return;
    }
    /* Survivors keep their experts (the fewest moves): prev[e] = new rank of e's old owner. */
    int *prev = calloc((size_t)c->E, sizeof(int));
    int *new_rank = malloc(sizeof(int) * (size_t)(c->nw ? c->nw : 1)); /* worker index -> rank in g+1 */
    if (prev && new_rank) {
        for (int i = 0; i < c->nw; i++) new_rank[i] = -1;
        for (int r = 0; r < n; r++) new_rank[cand[r]] = r;
        for (int e = 0; e < c->E; e++) {
            prev[e] = -1;
            if (c->gen == 0 || c->prev_world <= 0 || c->placement[e] >= (uint32_t)c->prev_world) continue;
            int old_w = c->members[c->placement[e]];
            if (old_w >= 0 && old_w < c->nw) prev[e] = new_rank[old_w];
        }
    } else {
        free(prev); /* out of memory: a fresh balanced placement */
        prev = NULL;
    }
    free(new_rank);
    c->gen = (c->gen > c->gen_floor ? c->gen : c->gen_floor) + 1;
    c->world = n;
    memcpy(c->members, cand, sizeof(int) * (size_t)n);
    free(cand);
    sy_placement_sticky(c->E, n, prev, c->placement);
    free(prev);
    c->restore_step = c->latest_ckpt;
    /* A recovery restores the newest step the members hold whole in memory when that is not
     * older than the latest checkpoint (coord_replicas.c); else the checkpoint, as always. */
    bool recovering = c->nrec && c->rec[c->nrec - 1].duration_ms < 0;
    c->from_replicas = (recovering || c->regroup_since) && !c->replicas_failed && sy_coord_plan_from_replicas(c, n);
    c->regroup_since = 0;
    c->replicas_failed = false;
    if (!c->from_replicas) c->restore_step = c->latest_ckpt;
    const char *source = c->from_replicas ? "replicas" : c->restore_step >= 0 ? "checkpoint" : "init";
    if (recovering) snprintf(c->rec[c->nrec - 1].restore_source, sizeof c->rec[c->nrec - 1].restore_source, "%s", source);
    c->start_step = c->restore_step >= 0 ? c->restore_step + 1 : 1;
    c->end_step = c->cfg.run.steps;
    c->max_reported = c->start_step - 1;
    c->gen_open = true;
    c->gen_opened_at = sy_mono_ms();
    if (c->nrec && c->rec[c->nrec - 1].duration_ms < 0) {
        c->rec[c->nrec - 1].opened = c->gen_opened_at;
        c->rec[c->nrec - 1].restored = 0;
    }
    for (int i = 0; i < c->nw; i++) c->w[i].restored = false;
    c->n_restored = 0;
    if (!c->first_open) c->first_open = c->gen_opened_at;
    sy_coord_clear_pending(c);

    /* Steps after the restore point are run again: forget their records. */
    int keep = 0;
    for (int i = 0; i < c->nhist; i++)
        if (c->hist[i].step <= c->restore_step) c->hist[keep++] = c->hist[i];
    c->nhist = keep;
    for (int64_t s = c->restore_step + 1; s > 0 && s <= c->step && s < c->ms_cap; s++) {
        c->useful_ms -= c->ms_by_step[s];
        c->ms_by_step[s] = 0;
    }
    if (c->step > c->restore_step) c->step = c->restore_step > 0 ? c->restore_step : 0;

    /* The peer table, sent whole to a worker that holds no base, else as an edit of the last
     * generation's (computed once: the same for every such member). */
    char **peers = calloc((size_t)n, sizeof(char *));
    for (int r = 0; r < n && peers; r++) peers[r] = c->w[c->members[r]].data_ep;
    /* The replicas' own data plane, only when every member has one (else all replicate inline). */
    char **rpeers = calloc((size_t)n, sizeof(char *));
    for (int r = 0; r < n && rpeers; r++) rpeers[r] = c->w[c->members[r]].rep_ep;
    bool all_rep = rpeers != NULL;
    for (int r = 0; r < n && all_rep; r++) all_rep = rpeers[r][0] != 0;
    /* With CURVE on the control plane every member proved a key: the data plane admits those. */
    char **keys = c->zap ? calloc((size_t)n, sizeof(char *)) : NULL;
    for (int r = 0; r < n && keys; r++) keys[r] = c->w[c->members[r]].key;
    /* The table compared and kept as the next base: each entry "data endpoint|replica endpoint",
     * the replica part only when this Assign carries replica endpoints, so that an entry copied
     * from the base brings the replica endpoint the worker holds too. */
    char **cmp = calloc((size_t)n, sizeof(char *));
    for (int r = 0; r < n && cmp && peers && rpeers; r++)
        if (asprintf(&cmp[r], "%s|%s", peers[r], all_rep ? rpeers[r] : "") < 0) cmp[r] = NULL;
    bool have_table = peers && cmp && (!c->zap || keys);
    for (int r = 0; r < n && have_table; r++) have_table = cmp[r] != NULL;
    uint32_t *edit = NULL;
    int *fresh = NULL;
    size_t n_edit = 0, n_fresh = 0;
    char **fresh_ep = NULL, **fresh_key = NULL, **fresh_rep = NULL;
    if (have_table && c->tab_gen &&
        sy_peers_edit(c->tab_n, (const char *const *)c->tab_ep, (const char *const *)c->tab_key, n,
                      (const char *const *)cmp, (const char *const *)keys, &edit, &n_edit, &fresh,
                      &n_fresh) == SY_OK) {
        fresh_ep = calloc(n_fresh ? n_fresh : 1, sizeof(char *));
        fresh_key = calloc(n_fresh ? n_fresh : 1, sizeof(char *));
        fresh_rep = calloc(n_fresh ? n_fresh : 1, sizeof(char *));
        for (size_t f = 0; fresh_ep && fresh_key && fresh_rep && f < n_fresh; f++) {
            fresh_ep[f] = peers[fresh[f]];
            fresh_key[f] = keys ? keys[fresh[f]] : NULL;
            fresh_rep[f] = rpeers[fresh[f]];
        }
    }
    bool can_edit = fresh_ep && fresh_key && fresh_rep;
    int n_edited = 0, n_framed = 0;
    /* The whole table, packed once for the members that take it as a second frame and queued by
     * reference (a generation of whole tables: O(N) bytes here instead of N²) */
    zmq_msg_t table;
    bool have_frame = peers && sy_proto_pack_table((size_t)n, peers, keys, keys ? (size_t)n : 0, rpeers,
                                                   all_rep ? (size_t)n : 0, &table) == SY_OK;
    for (int r = 0; r < n; r++) {
        worker *w = &c->w[c->members[r]];
        w->rank = r;
        w->state = W_ACTIVE;
        Sy__Envelope env;
        Sy__Assign as = SY__ASSIGN__INIT;
        sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
        as.rank = (uint32_t)r;
        as.world = (uint32_t)n;
        /* an edit only against the table it says it holds, and no later Assign in flight to it */
        if (can_edit && w->peers_held == c->tab_gen && w->assigned_gen == c->tab_gen) {
            as.peers_base = c->tab_gen;
            as.n_peers_edit = n_edit;
            as.peers_edit = edit;
            as.n_peers = n_fresh;
            as.peers = fresh_ep;
            as.n_peer_keys = keys ? n_fresh : 0;
            as.peer_keys = keys ? fresh_key : NULL;
            as.n_replica_peers = all_rep ? n_fresh : 0;
            as.replica_peers = all_rep ? fresh_rep : NULL;
            n_edited++;
        } else if (have_frame && w->table_frame) {
            as.peers_follow = true;
            n_framed++;
        } else {
            as.n_peers = peers ? (size_t)n : 0;
            as.peers = peers;
            as.n_peer_keys = keys ? (size_t)n : 0;
            as.peer_keys = keys;
            as.n_replica_peers = all_rep ? (size_t)n : 0;
            as.replica_peers = all_rep ? rpeers : NULL;
        }
        as.n_placement = (size_t)c->E;
        as.placement = c->placement;
        as.restore_step = c->restore_step;
        as.start_step = (uint64_t)c->start_step;
        as.end_step = (uint64_t)c->end_step;
        as.config_json = c->config_json;
        as.restore_source = (char *)(c->restore_step >= 0 ? (c->from_replicas ? "replicas" : "checkpoint") : "");
        if (c->from_replicas) {
            as.dense_source = c->dense_source;
            as.n_expert_source = (size_t)c->E;
            as.expert_source = c->expert_source;
        }
        sy_coord_holdings_clear(w); /* its memory changes now */
        env.body_case = SY__ENVELOPE__BODY_ASSIGN;
        env.assign = &as;
        if (as.peers_follow) {
            if (sy_proto_send_with_table(c->sock, w->rid, w->rid_len, &env, &table) != SY_OK)
                sy_debug("to %s: %s", w->id, sy_err_msg());
        } else {
            sy_coord_send(c, w, &env);
        }
        w->assigned_gen = c->gen;
    }
    if (have_frame) zmq_msg_close(&table); /* the queued copies keep its bytes until sent */
    /* this table is the next generation's base (none if it could not be kept) */
    sy_peers_free(c->tab_n, c->tab_ep, c->tab_key);
    c->tab_ep = c->tab_key = NULL;
    c->tab_n = 0;
    c->tab_gen = 0;
    if (have_table && sy_peers_copy(n, (const char *const *)cmp, (const char *const *)keys, &c->tab_ep,
                                    &c->tab_key) == SY_OK) {
        c->tab_n = n;
        c->tab_gen = c->gen;
    }
    for (int r = 0; r < n && cmp; r++) free(cmp[r]);
    free(cmp);
    free(peers);
    free(rpeers);
    free(keys);
    free(edit);
    free(fresh);
    free(fresh_ep);
    free(fresh_key);
    free(fresh_rep);
    json_t *pl = json_array();
    for (int e = 0; e < c->E; e++) json_array_append_new(pl, json_integer(c->placement[e]));
    c->state = (c->nrec && c->rec[c->nrec - 1].duration_ms < 0) ? R_RECOVERING : R_RUNNING;
    int replicas = c->cfg.cluster.replicas < n - 1 ? c->cfg.cluster.replicas : n - 1;
    if (replicas < c->cfg.cluster.replicas && n > 1)
        sy_warn("cluster.replicas is %d but generation %" PRIu64 " has %d workers: each keeps %d replica(s) "
                "(never one on the expert's owner)", c->cfg.cluster.replicas, c->gen, n, replicas);
    json_t *ev = json_pack("{s:I, s:i, s:o, s:I, s:s, s:I, s:I, s:o, s:i}", "generation", (json_int_t)c->gen,
                           "world", n, "workers", ids_of_members(c), "restore_step", (json_int_t)c->restore_step,
                           "restore_source", source, "start_step", (json_int_t)c->start_step, "end_step",
                           (json_int_t)c->end_step, "placement", pl, "replicas", replicas);
    if (ev) { /* how the peer table went out: whole, or as an edit of the previous generation's */
        json_object_set_new(ev, "peers_edited", json_integer(n_edited));
        json_object_set_new(ev, "peers_edit_runs", json_integer((json_int_t)(can_edit ? n_edit / 2 : 0)));
        json_object_set_new(ev, "peers_framed", json_integer(n_framed));
    }
    if (c->cfg.cluster.insecure && ev) /* issue 12 #1: every line that starts a generation says so */
        json_object_set_new(ev, "warning",
                            json_string("INSECURE: cluster.insecure is true: listeners reachable from other "
                                        "machines may run without CurveZMQ authentication"));
    sy_coord_event(c, "generation_opened", ev);
}

static int cmp_seq(const void *a, const void *b, void *ctx) {
    const worker *w = ctx;
    uint64_t x = w[*(const int *)a].seq, y = w[*(const int *)b].seq;
    return x < y ? -1 : x > y;
}

static json_t *ids_of_members(sy_coord_t *c) {
    json_t *a = json_array();
    for (int r = 0; r < c->world; r++) json_array_append_new(a, json_string(c->w[c->members[r]].id));
    return a;
}

/* Ends the open generation: members go back to idle (drained ones get Stop). */
void sy_coord_close_generation(sy_coord_t *c, const char *why) {
    if (!c->gen_open) return;
    /* The close at the EndAfter step: every member has recorded it (c->step restarts at the
     * restore step of each generation); any other close (a loss, a fault) carries 0. */
    const int64_t ea = c->end_after > 0 && c->step >= c->end_after ? c->end_after : 0;
    c->closed_gen = c->gen, c->closed_end_after = ea;
    for (int r = 0; r < c->world; r++) {
        worker *w = &c->w[c->members[r]];
        w->rank = -1;
        if (w->state == W_DRAINING) {
            send_stop_ea(c, w, "drained", ea);
            w->state = W_STOPPED;
            sy_coord_event(c, "worker_drained", json_pack("{s:s}", "worker", w->id));
        } else if (w->state == W_ACTIVE) {
            send_abort_ea(c, w, why, ea);
            w->state = W_IDLE;
        }
    }
    c->gen_open = false;
    c->end_after = 0;
    c->prev_world = c->world;
    c->world = 0;
    sy_coord_clear_pending(c);
    c->settle_from = sy_mono_ms();
    c->dirty = true;
}

/* A member is gone (or the generation is broken): abort it and plan a new one. */
void sy_coord_begin_recovery(sy_coord_t *c, const char *reason, const char *lost_id) {
    if (c->done) return;
    if (!c->gen_open) {
        /* Already recovering: just note another loss. */
        if (lost_id && c->nrec && c->rec[c->nrec - 1].duration_ms < 0)
            json_array_append_new(c->rec[c->nrec - 1].lost, json_string(lost_id));
        return;
    }
    recovery *nr = realloc(c->rec, sizeof(recovery) * (size_t)(c->nrec + 1));
    if (!nr) return;
    c->rec = nr;
    recovery *r = &c->rec[c->nrec++];
    memset(r, 0, sizeof *r);
    r->generation = c->gen;
    snprintf(r->reason, sizeof r->reason, "%s", reason);
    r->lost = json_array();
    if (lost_id) json_array_append_new(r->lost, json_string(lost_id));
    r->detected = sy_mono_ms();
    r->restore_step = c->latest_ckpt;
    r->duration_ms = -1;
    sy_coord_close_generation(c, reason);
    c->state = R_RECOVERING;
    if (++c->fruitless > MAX_FRUITLESS_RECOVERIES) {
        char why[300];
        snprintf(why, sizeof why, "%d recoveries in a row without getting past step %" PRId64 " (last: %s)",
                 c->fruitless, c->furthest, reason);
        sy_error("%s", why);
        sy_coord_finish(c, R_FAILED, why);
    }
}

void sy_coord_finish(sy_coord_t *c, rstate final, const char *why) {
    for (int i = 0; i < c->nw; i++)
        if (sy_coord_live(&c->w[i])) sy_coord_send_stop(c, &c->w[i], why);
    c->gen_open = false;
    c->state = final;
    c->done = true;
    c->outcome = final == R_FINISHED ? SY_COORD_FINISHED : final == R_FAILED ? SY_COORD_FAILED : SY_COORD_STOPPED;
    double elapsed = (sy_mono_ms() - c->t0_mono) / 1e3;
    sy_coord_event(c, final == R_FINISHED ? "run_finished" : final == R_FAILED ? "run_failed" : "run_stopped",
                   json_pack("{s:s, s:I, s:I, s:o, s:f, s:I}", "reason", why, "step", (json_int_t)c->step,
                             "total_steps", (json_int_t)c->cfg.run.steps, "loss", jnum(c->loss), "elapsed_s",
                             elapsed, "generation", (json_int_t)c->gen));
}

void sy_coord_clear_pending(sy_coord_t *c) {
    for (int i = 0; i < c->npend; i++) {
        free(c->pend[i].seen);
        free(c->pend[i].counts);
        free(c->pend[i].terms);
    }
    c->npend = 0;
    for (int i = 0; i < c->nparts; i++) {
        free(c->parts[i].seen);
        json_decref(c->parts[i].files);
    }
    c->nparts = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Messages to workers                                                                      */

void sy_coord_send(sy_coord_t *c, worker *w, Sy__Envelope *env) {
    if (sy_proto_send(c->sock, w->rid, w->rid_len, env) != SY_OK)
        sy_debug("to %s: %s", w->id, sy_err_msg());
}

void sy_coord_send_members(sy_coord_t *c, Sy__Envelope *env) {
    for (int r = 0; r < c->world; r++) sy_coord_send(c, &c->w[c->members[r]], env);
}

void sy_coord_send_welcome(sy_coord_t *c, worker *w) {
    Sy__Envelope env;
    Sy__Welcome wl = SY__WELCOME__INIT;
    sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen_open && w->rank >= 0 ? c->gen : 0);
    wl.worker_id = w->id;
    wl.heartbeat_ms = (uint32_t)c->cfg.cluster.heartbeat_ms;
    wl.session.data = w->session;
    wl.session.len = SY_SESSION_LEN;
    env.body_case = SY__ENVELOPE__BODY_WELCOME;
    env.welcome = &wl;
    sy_coord_send(c, w, &env);
    w->last_keepalive = sy_mono_ms();
}

void sy_coord_send_stop(sy_coord_t *c, worker *w, const char *reason) { send_stop_ea(c, w, reason, 0); }

/* Stop / Abort with end_after: non-zero when they close the generation at its EndAfter step. */
static void send_stop_ea(sy_coord_t *c, worker *w, const char *reason, int64_t end_after) {
    Sy__Envelope env;
    Sy__Stop st = SY__STOP__INIT;
    sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
    st.reason = (char *)reason;
    st.end_after = (uint64_t)(end_after > 0 ? end_after : 0);
    env.body_case = SY__ENVELOPE__BODY_STOP;
    env.stop = &st;
    sy_coord_send(c, w, &env);
}

static void send_abort(sy_coord_t *c, worker *w, const char *reason) { send_abort_ea(c, w, reason, 0); }

static void send_abort_ea(sy_coord_t *c, worker *w, const char *reason, int64_t end_after) {
    Sy__Envelope env;
    Sy__Abort ab = SY__ABORT__INIT;
    sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
    ab.reason = (char *)reason;
    ab.end_after = (uint64_t)(end_after > 0 ? end_after : 0);
    env.body_case = SY__ENVELOPE__BODY_ABORT;
    env.abort = &ab;
    sy_coord_send(c, w, &env);
}
