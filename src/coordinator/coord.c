#include "coordinator/coord.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "storage/ckpt.h"
#include "coordinator/committer.h"
#include "storage/ckpt_run.h"
#include "proto/curve.h"
#include "coordinator/http.h"
#include "base/log.h"
#include "proto/protocol.h"
#include "base/fsutil.h"
#include "storage/store.h"
#include "storage/store_s3.h"
#include "coordinator/zap.h"
#include "coord_internal.h"

/* Delay after the last registration before a generation opens, so that workers starting
 * together join the same generation: this many heartbeats, clamped to [SETTLE_MIN, SETTLE_MAX]. */
#define SETTLE_HEARTBEATS 2
#define SETTLE_MIN_MS 100
#define SETTLE_MAX_MS 1000
/* Recoveries in a row without progress beyond the furthest step reached before the run fails. */
#define MAX_FRUITLESS_RECOVERIES 5
/* Registered workers kept at most: max_workers times this, plus slack for lost entries. */
#define TABLE_FACTOR 4
#define TABLE_SLACK 16
/* Status snapshot republished at least this often (heartbeat ages move). */
#define PUBLISH_MS 250
/* Rate limit of drop warnings: one line per reason per this many ms. */
#define DROP_LOG_MS 2000
/* Steps whose times are kept for goodput (8 bytes each). */
#define GOODPUT_MAX_STEPS ((int64_t)1 << 26)
/* Socket linger at close (ms): lets the final Stops leave. */
#define LINGER_MS 1000
/* A Fault's accused peer is excluded only if silent for this many heartbeats too. */
#define SUSPECT_HEARTBEATS 2
/* ZAP domain of the control socket (CURVE on): requests of another domain are refused. */
#define ZAP_DOMAIN "switchyard"
/* Failed CURVE handshakes (a plaintext worker, a wrong server key) are logged at most this often. */
#define HANDSHAKE_LOG_MS 10000


const char *const sy_coord_wstate[W__COUNT] = {"idle", "active", "draining", "lost", "stopped"};
const char *const sy_coord_rstate[R_STOPPED + 1] = {"waiting", "running", "recovering", "finished", "failed", "stopped"};

/* ---------------------------------------------------------------------------------------- */
/* Small helpers                                                                             */

static void drop(sy_coord_t *c, sy_proto_drop why, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void drop(sy_coord_t *c, sy_proto_drop why, const char *fmt, ...) {
    c->drops[why]++;
    c->dirty = true;
    int64_t now = sy_mono_ms();
    if (now - c->drop_logged[why] < DROP_LOG_MS && c->drops[why] > 1) return;
    c->drop_logged[why] = now;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sy_warn("dropped message (%s, %" PRIu64 " so far): %s", sy_proto_drop_name(why), c->drops[why], msg);
}

/* Appends {"time", "event", ...fields} to events.jsonl and the recent list; steals fields. */
static void event(sy_coord_t *c, const char *name, json_t *fields) {
    json_t *e = json_object();
    json_object_set_new(e, "time", json_real(sy_wall_s()));
    json_object_set_new(e, "event", json_string(name));
    if (fields) json_object_update(e, fields);
    json_decref(fields);
    char *line = json_dumps(e, JSON_COMPACT);
    if (line && c->events_f) {
        fprintf(c->events_f, "%s\n", line);
        fflush(c->events_f);
    }
    sy_info("event %s", line ? line : name);
    free(line);
    json_array_append_new(c->events, e);
    while (json_array_size(c->events) > EVENT_HISTORY) json_array_remove(c->events, 0);
    c->dirty = true;
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

static int find_worker_id(sy_coord_t *c, const char *id) {
    for (int i = 0; i < c->nw; i++)
        if (!strcmp(c->w[i].id, id)) return i;
    return -1;
}

static bool w_live(const worker *w) { return w->state != W_LOST && w->state != W_STOPPED; }

static void send_to(sy_coord_t *c, worker *w, Sy__Envelope *env) {
    if (sy_proto_send(c->sock, w->rid, w->rid_len, env) != SY_OK)
        sy_debug("to %s: %s", w->id, sy_err_msg());
}

static void send_welcome(sy_coord_t *c, worker *w) {
    Sy__Envelope env;
    Sy__Welcome wl = SY__WELCOME__INIT;
    sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen_open && w->rank >= 0 ? c->gen : 0);
    wl.worker_id = w->id;
    wl.heartbeat_ms = (uint32_t)c->cfg.cluster.heartbeat_ms;
    wl.session.data = w->session;
    wl.session.len = SY_SESSION_LEN;
    env.body_case = SY__ENVELOPE__BODY_WELCOME;
    env.welcome = &wl;
    send_to(c, w, &env);
    w->last_keepalive = sy_mono_ms();
}

/* Tells the sender of a message that we do not count it as registered (docs/protocol.md
 * "Re-registration"): a Welcome with reregister set and no session, so it sends Hello now. */
static void send_reregister(sy_coord_t *c, const uint8_t *rid, size_t rid_len) {
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

/* The message proves it comes from registration w: it carries w's session secret (compared in
 * constant time) and, with CURVE on, comes from the public key w's id is bound to. */
static bool proves(const sy_coord_t *c, const worker *w, const Sy__Envelope *env) {
    if (c->zap && strcmp(w->key, c->src_key) != 0) return false;
    if (env->session.len != SY_SESSION_LEN) return false;
    uint8_t d = 0;
    for (size_t k = 0; k < SY_SESSION_LEN; k++) d |= (uint8_t)(w->session[k] ^ env->session.data[k]);
    return d == 0;
}

static void new_session(worker *w) {
    if (getrandom(w->session, sizeof w->session, 0) != (ssize_t)sizeof w->session) {
        /* no entropy source: still unique per registration, though guessable */
        uint64_t x = (uint64_t)sy_mono_ms() * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)w ^ (uint64_t)getpid();
        for (size_t k = 0; k < sizeof w->session; k++, x = x * 6364136223846793005ull + 1442695040888963407ull)
            w->session[k] = (uint8_t)(x >> 56);
    }
}

static void send_stop(sy_coord_t *c, worker *w, const char *reason) {
    Sy__Envelope env;
    Sy__Stop st = SY__STOP__INIT;
    sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
    st.reason = (char *)reason;
    env.body_case = SY__ENVELOPE__BODY_STOP;
    env.stop = &st;
    send_to(c, w, &env);
}

static void send_abort(sy_coord_t *c, worker *w, const char *reason) {
    Sy__Envelope env;
    Sy__Abort ab = SY__ABORT__INIT;
    sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
    ab.reason = (char *)reason;
    env.body_case = SY__ENVELOPE__BODY_ABORT;
    env.abort = &ab;
    send_to(c, w, &env);
}

static void clear_pending(sy_coord_t *c) {
    for (int i = 0; i < c->npend; i++) {
        free(c->pend[i].seen);
        free(c->pend[i].counts);
    }
    c->npend = 0;
    for (int i = 0; i < c->nparts; i++) {
        free(c->parts[i].seen);
        json_decref(c->parts[i].files);
    }
    c->nparts = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Generations                                                                               */

static json_t *ids_of_members(sy_coord_t *c) {
    json_t *a = json_array();
    for (int r = 0; r < c->world; r++) json_array_append_new(a, json_string(c->w[c->members[r]].id));
    return a;
}

/* Ends the open generation: members go back to idle (drained ones get Stop). */
static void close_generation(sy_coord_t *c, const char *why) {
    if (!c->gen_open) return;
    for (int r = 0; r < c->world; r++) {
        worker *w = &c->w[c->members[r]];
        w->rank = -1;
        if (w->state == W_DRAINING) {
            send_stop(c, w, "drained");
            w->state = W_STOPPED;
            event(c, "worker_drained", json_pack("{s:s}", "worker", w->id));
        } else if (w->state == W_ACTIVE) {
            send_abort(c, w, why);
            w->state = W_IDLE;
        }
    }
    c->gen_open = false;
    c->prev_world = c->world;
    c->world = 0;
    clear_pending(c);
    c->settle_from = sy_mono_ms();
    c->dirty = true;
}

static void finish(sy_coord_t *c, rstate final, const char *why) {
    for (int i = 0; i < c->nw; i++)
        if (w_live(&c->w[i])) send_stop(c, &c->w[i], why);
    c->gen_open = false;
    c->state = final;
    c->done = true;
    c->outcome = final == R_FINISHED ? SY_COORD_FINISHED : final == R_FAILED ? SY_COORD_FAILED : SY_COORD_STOPPED;
    double elapsed = (sy_mono_ms() - c->t0_mono) / 1e3;
    event(c, final == R_FINISHED ? "run_finished" : final == R_FAILED ? "run_failed" : "run_stopped",
          json_pack("{s:s, s:I, s:I, s:o, s:f, s:I}", "reason", why, "step", (json_int_t)c->step,
                    "total_steps", (json_int_t)c->cfg.run.steps, "loss", jnum(c->loss), "elapsed_s",
                    elapsed, "generation", (json_int_t)c->gen));
}

static int cmp_seq(const void *a, const void *b, void *ctx) {
    const worker *w = ctx;
    uint64_t x = w[*(const int *)a].seq, y = w[*(const int *)b].seq;
    return x < y ? -1 : x > y;
}

/* Opens generation g+1 over the idle live workers (join order, at most max_workers). */
static void open_generation(sy_coord_t *c) {
    int *cand = malloc(sizeof(int) * (size_t)(c->nw ? c->nw : 1));
    int n = 0;
    if (!cand) return;
    for (int i = 0; i < c->nw; i++)
        if (c->w[i].state == W_IDLE) cand[n++] = i;
    qsort_r(cand, (size_t)n, sizeof(int), cmp_seq, c->w);
    if (n > c->cfg.cluster.max_workers) n = c->cfg.cluster.max_workers;
    if (n < c->cfg.cluster.min_workers) { /* e.g. everyone drained: wait for workers */
        free(cand);
        c->state = R_WAITING;
        c->dirty = true;
        return;
    }
    if (c->latest_ckpt >= c->cfg.run.steps) {
        free(cand);
        finish(c, R_FINISHED, "already complete");
        return;
    }
    /* Survivors keep their experts (the fewest moves): prev[e] = new rank of e's old owner. */
    int *prev = calloc((size_t)c->E, sizeof(int));
    if (prev) {
        for (int e = 0; e < c->E; e++) {
            prev[e] = -1;
            if (c->gen == 0 || c->prev_world <= 0 || c->placement[e] >= (uint32_t)c->prev_world) continue;
            int old_w = c->members[c->placement[e]];
            for (int r = 0; r < n; r++)
                if (cand[r] == old_w) prev[e] = r;
        }
    }
    c->gen++;
    c->world = n;
    memcpy(c->members, cand, sizeof(int) * (size_t)n);
    free(cand);
    sy_placement_sticky(c->E, n, prev, c->placement);
    free(prev);
    c->restore_step = c->latest_ckpt;
    c->start_step = c->latest_ckpt >= 0 ? c->latest_ckpt + 1 : 1;
    c->end_step = c->cfg.run.steps;
    c->max_reported = c->start_step - 1;
    c->gen_open = true;
    c->gen_opened_at = sy_mono_ms();
    if (c->nrec && c->rec[c->nrec - 1].duration_ms < 0) {
        c->rec[c->nrec - 1].opened = c->gen_opened_at;
        c->rec[c->nrec - 1].restored = 0;
    }
    for (int i = 0; i < c->nw; i++) c->w[i].restored = false;
    if (!c->first_open) c->first_open = c->gen_opened_at;
    clear_pending(c);

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

    char **peers = calloc((size_t)n, sizeof(char *));
    for (int r = 0; r < n && peers; r++) peers[r] = c->w[c->members[r]].data_ep;
    for (int r = 0; r < n; r++) {
        worker *w = &c->w[c->members[r]];
        w->rank = r;
        w->state = W_ACTIVE;
        Sy__Envelope env;
        Sy__Assign as = SY__ASSIGN__INIT;
        sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
        as.rank = (uint32_t)r;
        as.world = (uint32_t)n;
        as.n_peers = peers ? (size_t)n : 0;
        as.peers = peers;
        as.n_placement = (size_t)c->E;
        as.placement = c->placement;
        as.restore_step = c->restore_step;
        as.start_step = (uint64_t)c->start_step;
        as.end_step = (uint64_t)c->end_step;
        as.config_json = c->config_json;
        env.body_case = SY__ENVELOPE__BODY_ASSIGN;
        env.assign = &as;
        send_to(c, w, &env);
    }
    free(peers);
    json_t *pl = json_array();
    for (int e = 0; e < c->E; e++) json_array_append_new(pl, json_integer(c->placement[e]));
    c->state = (c->nrec && c->rec[c->nrec - 1].duration_ms < 0) ? R_RECOVERING : R_RUNNING;
    event(c, "generation_opened",
          json_pack("{s:I, s:i, s:o, s:I, s:I, s:I, s:o}", "generation", (json_int_t)c->gen, "world", n,
                    "workers", ids_of_members(c), "restore_step", (json_int_t)c->restore_step,
                    "start_step", (json_int_t)c->start_step, "end_step", (json_int_t)c->end_step,
                    "placement", pl));
}

/* A member is gone (or the generation is broken): abort it and plan a new one. */
static void begin_recovery(sy_coord_t *c, const char *reason, const char *lost_id) {
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
    close_generation(c, reason);
    c->state = R_RECOVERING;
    if (++c->fruitless > MAX_FRUITLESS_RECOVERIES) {
        char why[300];
        snprintf(why, sizeof why, "%d recoveries in a row without getting past step %" PRId64 " (last: %s)",
                 c->fruitless, c->furthest, reason);
        sy_error("%s", why);
        finish(c, R_FAILED, why);
    }
}

static void worker_lost(sy_coord_t *c, int i, const char *reason) {
    worker *w = &c->w[i];
    if (!w_live(w)) return;
    bool member = c->gen_open && w->rank >= 0;
    int rank = w->rank;
    wstate was = w->state;
    w->state = W_LOST;
    send_abort(c, w, reason); /* in case it is alive but slow: it must not go on */
    event(c, "worker_lost", json_pack("{s:s, s:s, s:i, s:I, s:s}", "worker", w->id, "reason", reason, "rank",
                                      rank, "generation", (json_int_t)c->gen, "state", sy_coord_wstate[was]));
    if (member) {
        char why[300];
        snprintf(why, sizeof why, "worker %s (rank %d) lost: %s", w->id, rank, reason);
        begin_recovery(c, why, w->id);
        if (c->nrec && c->rec[c->nrec - 1].duration_ms < 0) {
            recovery *r = &c->rec[c->nrec - 1];
            if (!r->last_heard || w->last_seen < r->last_heard) r->last_heard = w->last_seen;
        }
    }
    w->rank = -1;
}

/* ---------------------------------------------------------------------------------------- */
/* Checkpoints                                                                               */

static json_t *manifest_extra(sy_coord_t *c, int64_t step) {
    json_t *ex = json_object();
    json_object_set_new(ex, "writer", json_string(c->writer));
    json_object_set_new(ex, "config", sy_config_to_json(&c->cfg));
    json_object_set_new(ex, "data_position",
                        json_pack("{s:I, s:I}", "next_step", (json_int_t)(step + 1), "first_sample",
                                  (json_int_t)(step * c->cfg.train.global_batch_seqs)));
    json_object_set_new(ex, "rng", json_pack("{s:s, s:I}", "kind", "splitmix64-keyed", "seed",
                                             (json_int_t)c->cfg.run.seed));
    json_object_set_new(ex, "world", json_integer(c->world));
    json_object_set_new(ex, "generation", json_integer((json_int_t)c->gen));
    json_object_set_new(ex, "optimizer_step", json_integer(step));
    json_t *pl = json_array();
    for (int e = 0; e < c->E; e++) json_array_append_new(pl, json_integer(c->placement[e]));
    json_object_set_new(ex, "placement", pl);
    return ex;
}

/* Dense and every expert's weights are among the files (optimizer files are not checked). */
static bool parts_cover(sy_coord_t *c, const json_t *files, char *missing, size_t cap) {
    char want[64];
    int n = c->n_switch > 0 ? c->E : 0;
    for (int k = -1; k < n; k++) {
        if (k < 0) sy_ckpt_file_dense(want, sizeof want, 0);
        else sy_ckpt_file_expert(want, sizeof want, k, 0);
        bool found = false;
        size_t i;
        json_t *f;
        json_array_foreach(files, i, f) {
            const char *nm = json_string_value(json_object_get(f, "name"));
            if (nm && !strcmp(nm, want)) found = true;
        }
        if (!found) {
            snprintf(missing, cap, "%s", want);
            return false;
        }
    }
    return true;
}

static void maybe_finish(sy_coord_t *c) {
    if (!c->done && c->step >= c->cfg.run.steps && c->latest_ckpt >= c->cfg.run.steps) {
        /* finished only once the final checkpoint reads back from the store as this run's */
        if (sy_run_verify_checkpoint(c->store, c->cfg.run.name, c->cfg.run.steps, c->writer) != SY_OK) {
            char why[600];
            snprintf(why, sizeof why, "final checkpoint: %s", sy_err_msg());
            sy_error("%s", why);
            finish(c, R_FAILED, why);
            return;
        }
        finish(c, R_FINISHED, "all steps done");
    }
}

static bool membership_change_due(sy_coord_t *c) {
    int idle = 0;
    for (int i = 0; i < c->nw; i++) {
        if (c->w[i].state == W_DRAINING) return true;
        if (c->w[i].state == W_IDLE) idle++;
    }
    return idle > 0 && c->world < c->cfg.cluster.max_workers;
}

/* After a commit attempt of `step` (made in generation `gen`): the run may end, a failed final
 * checkpoint is re-run, and a due membership change happens at a committed checkpoint. */
static void after_commit(sy_coord_t *c, int64_t step, uint64_t gen, bool committed) {
    bool current = c->gen_open && gen == c->gen;
    if (current && c->latest_ckpt < step && step == c->end_step) {
        /* Workers wait after their last step: without its checkpoint the run cannot end, so
         * it is re-run from the latest committed checkpoint (bounded by the recovery limit). */
        begin_recovery(c, "the final checkpoint could not be committed", NULL);
        return;
    }
    maybe_finish(c);
    /* Not while a newer commit is in flight: the new generation restores the latest one. */
    if (!c->done && current && committed && c->latest_ckpt == step && step < c->end_step &&
        sy_committer_in_flight(c->committer) == 0 && membership_change_due(c)) {
        char why[128];
        snprintf(why, sizeof why, "membership change at checkpoint %" PRId64, step);
        close_generation(c, why);
        open_generation(c);
    }
}

/* Every rank's part of checkpoint parts[k] is in: hand its commit to the committer thread. */
static void commit_part(sy_coord_t *c, int k) {
    cpart *p = &c->parts[k];
    int64_t step = p->step;
    char missing[64];
    bool submitted = false;
    if (!parts_cover(c, p->files, missing, sizeof missing)) {
        event(c, "checkpoint_failed", json_pack("{s:I, s:s}", "step", (json_int_t)step, "error",
                                                "parts of every rank arrived but do not cover the model"));
        sy_error("checkpoint step %" PRId64 ": no rank sent %s", step, missing);
    } else {
        json_t *ex = manifest_extra(c, step);
        if (sy_committer_submit(c->committer, step, c->gen, p->first, &p->files, &ex) == SY_OK) {
            submitted = true;
        } else {
            json_decref(ex);
            event(c, "checkpoint_failed", json_pack("{s:I, s:s}", "step", (json_int_t)step, "error", sy_err_msg()));
        }
    }
    /* This step and older ones are settled. */
    int keep = 0;
    for (int i = 0; i < c->nparts; i++) {
        if (c->parts[i].step <= step) {
            free(c->parts[i].seen);
            json_decref(c->parts[i].files);
        } else {
            c->parts[keep++] = c->parts[i];
        }
    }
    c->nparts = keep;
    if (!submitted) after_commit(c, step, c->gen, false);
}

static void on_commit_result(sy_coord_t *c, const sy_commit_result *r) {
    sy_status s = r->status;
    if (s == SY_EEXIST) { /* only when this coordinator's writer committed it (ckpt.h) */
        sy_warn("checkpoint step %" PRId64 " was already committed by this run; keeping it", r->step);
        s = SY_OK;
    }
    if (s != SY_OK) {
        event(c, "checkpoint_failed", json_pack("{s:I, s:s}", "step", (json_int_t)r->step, "error", r->error));
        sy_error("checkpoint step %" PRId64 ": %s", r->step, r->error);
        if (s == SY_ECONFLICT && !c->done) { /* fenced off: another writer owns the run now */
            finish(c, R_FAILED, r->error);
            return;
        }
    } else {
        if (r->step > c->latest_ckpt) c->latest_ckpt = r->step;
        c->latest_ckpt_time = sy_wall_s();
        if (r->retain_failed) sy_warn("checkpoint retention: %s", r->retain_error);
        c->ckpt_seconds = (sy_mono_ms() - r->since_ms) / 1e3;
        event(c, "checkpoint_committed",
              json_pack("{s:I, s:i, s:f, s:f, s:I}", "step", (json_int_t)r->step, "files", r->n_files,
                        "seconds", c->ckpt_seconds, "commit_ms", r->commit_ms, "generation",
                        (json_int_t)r->generation));
    }
    if (!c->done) after_commit(c, r->step, r->generation, s == SY_OK);
}

static void drain_commits(sy_coord_t *c) {
    sy_commit_result r;
    while (sy_committer_next(c->committer, &r)) on_commit_result(c, &r);
}

static void on_checkpoint_part(sy_coord_t *c, worker *w, const Sy__CheckpointPart *cp) {
    int64_t step = (int64_t)cp->step;
    if (step < 1 || step > c->end_step || step <= c->restore_step) {
        drop(c, SY_DROP_INVALID, "CheckpointPart from %s: step %" PRId64 " outside this generation", w->id, step);
        return;
    }
    if (step <= c->latest_ckpt) return; /* already committed (e.g. forced + periodic) */
    for (size_t i = 0; i < cp->n_objects; i++) {
        const Sy__ObjectInfo *o = cp->objects[i];
        const char *nm = o->name, *h = o->sha256;
        bool ok = nm && *nm && strlen(nm) < 128 && !strchr(nm, '/') && sy_store_key_valid(nm) && h &&
                  strlen(h) == 64 && strcmp(nm, SY_CKPT_MANIFEST) != 0 && o->size <= (uint64_t)INT64_MAX;
        for (const char *q = h; ok && *q; q++) ok = (*q >= '0' && *q <= '9') || (*q >= 'a' && *q <= 'f');
        if (!ok) {
            drop(c, SY_DROP_INVALID, "CheckpointPart from %s step %" PRId64 ": object %zu is not a valid "
                 "{name, size, sha256}", w->id, step, i);
            return;
        }
    }
    int k = -1;
    for (int i = 0; i < c->nparts; i++)
        if (c->parts[i].step == step) k = i;
    if (k < 0) {
        if (c->nparts == MAX_PENDING) {
            drop(c, SY_DROP_UNEXPECTED, "CheckpointPart from %s: too many checkpoints in flight", w->id);
            return;
        }
        k = c->nparts++;
        cpart *p = &c->parts[k];
        memset(p, 0, sizeof *p);
        p->step = step;
        p->seen = calloc((size_t)c->world, 1);
        p->files = json_array();
        p->first = sy_mono_ms();
    }
    cpart *p = &c->parts[k];
    if (!p->seen || p->seen[w->rank]) {
        drop(c, SY_DROP_UNEXPECTED, "CheckpointPart from %s: step %" PRId64 " reported twice", w->id, step);
        return;
    }
    for (size_t i = 0; i < cp->n_objects; i++) {
        const Sy__ObjectInfo *o = cp->objects[i];
        bool dup = false;
        size_t j;
        json_t *f;
        json_array_foreach(p->files, j, f) if (!strcmp(json_string_value(json_object_get(f, "name")), o->name)) dup = true;
        if (dup) {
            sy_warn("checkpoint step %" PRId64 ": %s listed %s again; keeping the first", step, w->id, o->name);
            continue;
        }
        json_array_append_new(p->files, json_pack("{s:s, s:I, s:s}", "name", o->name, "size",
                                                  (json_int_t)o->size, "sha256", o->sha256));
    }
    p->seen[w->rank] = 1;
    if (++p->got == c->world) commit_part(c, k);
}

/* ---------------------------------------------------------------------------------------- */
/* Steps                                                                                     */

static void record_step_ms(sy_coord_t *c, int64_t step, double ms) {
    if (step > GOODPUT_MAX_STEPS) return;
    if (step >= c->ms_cap) {
        int64_t cap = c->ms_cap ? c->ms_cap : 1024;
        while (cap <= step) cap *= 2;
        double *n = realloc(c->ms_by_step, sizeof(double) * (size_t)cap);
        if (!n) return;
        memset(n + c->ms_cap, 0, sizeof(double) * (size_t)(cap - c->ms_cap));
        c->ms_by_step = n;
        c->ms_cap = cap;
    }
    c->useful_ms += ms - c->ms_by_step[step];
    c->ms_by_step[step] = ms;
}

static void step_complete(sy_coord_t *c, agg *a) {
    double loss = a->ce + a->aux + a->z;
    double tps = a->step_ms > 0 ? a->tokens / (a->step_ms / 1e3) : 0;
    double dfrac = a->routed ? (double)a->dropped / (double)a->routed : 0;
    c->step = a->step;
    c->loss = loss, c->ce = a->ce, c->aux = a->aux, c->z = a->z, c->tps = tps, c->dropped_frac = dfrac;
    c->lr = a->lr, c->grad_norm = a->grad_norm;
    if (a->counts_ok && c->load) {
        memcpy(c->load, a->counts, sizeof(uint64_t) * (size_t)(c->n_switch * c->E));
        c->load_valid = true;
        c->load_step = a->step;
    }
    if (c->nhist == LOSS_HISTORY) {
        memmove(c->hist, c->hist + 1, sizeof c->hist[0] * (LOSS_HISTORY - 1));
        c->nhist--;
    }
    c->hist[c->nhist].step = a->step;
    c->hist[c->nhist].loss = loss;
    c->nhist++;
    record_step_ms(c, a->step, a->step_ms);
    json_t *j = json_pack("{s:I, s:o, s:o, s:o, s:o, s:o, s:o, s:f, s:f, s:i, s:I, s:f, s:f}", "step",
                          (json_int_t)a->step, "loss", jnum(loss), "ce", jnum(a->ce), "aux", jnum(a->aux), "z",
                          jnum(a->z), "lr", jnum(a->lr), "grad_norm", jnum(a->grad_norm), "tokens_per_s", tps,
                          "dropped_frac", dfrac, "world", c->world, "generation", (json_int_t)c->gen, "step_ms",
                          a->step_ms, "time", sy_wall_s());
    char *line = j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (line && c->metrics_f) {
        fprintf(c->metrics_f, "%s\n", line);
        fflush(c->metrics_f);
    }
    free(line);
    json_decref(j);
    if (c->cfg.run.log_every > 0 && (a->step % c->cfg.run.log_every == 0 || a->step == c->cfg.run.steps))
        sy_info("step %" PRId64 "/%" PRId64 " | loss %.4f | %.0f tok/s | world %d | generation %" PRIu64, a->step,
                (int64_t)c->cfg.run.steps, loss, tps, c->world, c->gen);
    if (c->state == R_RECOVERING && c->nrec && c->rec[c->nrec - 1].duration_ms < 0) {
        recovery *r = &c->rec[c->nrec - 1];
        int64_t now = sy_mono_ms();
        r->duration_ms = (double)(now - r->detected);
        r->restore_step = c->restore_step;
        /* Phases: detect = last heard from the lost worker → declared lost (an upper bound of the
         * detection delay); reconfigure = → new generation opened; restore = → every member
         * restored its state; first step = → the first step of the new generation completed. */
        int64_t restored = r->restored ? r->restored : now;
        r->detect_ms = r->last_heard ? (double)(r->detected - r->last_heard) : 0.0;
        r->reconfigure_ms = r->opened ? (double)(r->opened - r->detected) : 0.0;
        r->restore_ms = r->opened ? (double)(restored - r->opened) : 0.0;
        r->first_step_ms = (double)(now - restored);
        event(c, "restore_done",
              json_pack("{s:I, s:I, s:I, s:f, s:{s:f, s:f, s:f, s:f}}", "generation", (json_int_t)c->gen,
                        "restore_step", (json_int_t)c->restore_step, "step", (json_int_t)a->step,
                        "recovery_ms", r->duration_ms, "phases_ms", "detect", r->detect_ms,
                        "reconfigure", r->reconfigure_ms, "restore", r->restore_ms, "first_step",
                        r->first_step_ms));
    }
    c->state = R_RUNNING;
    if (a->step > c->furthest) {
        c->furthest = a->step;
        c->fruitless = 0;
    }
    c->dirty = true;
    if (!isfinite(loss)) {
        char why[128];
        snprintf(why, sizeof why, "step %" PRId64 ": loss is not finite (diverged)", a->step);
        sy_error("%s", why);
        finish(c, R_FAILED, why);
        return;
    }
    maybe_finish(c);
}

static void on_step_done(sy_coord_t *c, worker *w, const Sy__StepDone *sd) {
    int64_t step = (int64_t)sd->step;
    if (step < c->start_step || step > c->end_step) {
        drop(c, SY_DROP_INVALID, "StepDone from %s: step %" PRId64 " outside %" PRId64 "..%" PRId64, w->id, step,
             c->start_step, c->end_step);
        return;
    }
    w->step = step;
    w->step_ms = sd->step_ms;
    if (step > c->max_reported) c->max_reported = step;
    int k = -1;
    for (int i = 0; i < c->npend; i++)
        if (c->pend[i].step == step) k = i;
    if (k < 0) {
        if (step <= c->step && step >= c->start_step) {
            drop(c, SY_DROP_UNEXPECTED, "StepDone from %s: step %" PRId64 " already aggregated", w->id, step);
            return;
        }
        if (c->npend == MAX_PENDING) {
            drop(c, SY_DROP_UNEXPECTED, "StepDone from %s: too many steps in flight", w->id);
            return;
        }
        k = c->npend++;
        agg *a = &c->pend[k];
        memset(a, 0, sizeof *a);
        a->step = step;
        a->seen = calloc((size_t)c->world, 1);
        a->counts = calloc((size_t)(c->n_switch * c->E > 0 ? c->n_switch * c->E : 1), sizeof(uint64_t));
        a->counts_ok = c->n_switch > 0;
    }
    agg *a = &c->pend[k];
    if (!a->seen || !a->counts || a->seen[w->rank]) {
        drop(c, SY_DROP_UNEXPECTED, "StepDone from %s: step %" PRId64 " reported twice", w->id, step);
        return;
    }
    a->seen[w->rank] = 1;
    a->got++;
    a->ce += sd->ce, a->aux += sd->aux, a->z += sd->z;
    a->tokens += sd->tokens, a->dropped += sd->dropped, a->routed += sd->routed;
    if (sd->step_ms > a->step_ms) a->step_ms = sd->step_ms;
    a->grad_norm = sd->grad_norm, a->lr = sd->lr;
    if ((int)sd->n_expert_counts != c->n_switch) {
        a->counts_ok = false;
    } else {
        for (int l = 0; l < c->n_switch && a->counts_ok; l++) {
            const Sy__LayerCounts *lc = sd->expert_counts[l];
            if ((int)lc->n_counts != c->E) {
                a->counts_ok = false;
                break;
            }
            for (int e = 0; e < c->E; e++) a->counts[l * c->E + e] += lc->counts[e];
        }
    }
    if (a->got < c->world) return;
    agg done = *a;
    c->pend[k] = c->pend[--c->npend];
    step_complete(c, &done);
    free(done.seen);
    free(done.counts);
}

/* ---------------------------------------------------------------------------------------- */
/* Messages                                                                                  */

static bool printable(const char *s, size_t max) {
    size_t n = 0;
    for (; s[n]; n++)
        if ((unsigned char)s[n] < 0x21 || (unsigned char)s[n] > 0x7e) return false;
    return n > 0 && n < max;
}

static void on_hello(sy_coord_t *c, const uint8_t *rid, size_t rid_len, const Sy__Envelope *env) {
    const Sy__Hello *h = env->hello;
    const char *id = h->worker_id;
    if (!id || !printable(id, ID_MAX) || (h->data_endpoint && strlen(h->data_endpoint) >= EP_MAX)) {
        drop(c, SY_DROP_INVALID, "Hello with an invalid worker id or endpoint");
        return;
    }
    char named[ID_MAX];
    if (!rid_names(rid, rid_len, named, sizeof named) || strcmp(named, id) != 0) {
        drop(c, SY_DROP_BAD_FRAME, "Hello from worker '%s' whose ZeroMQ routing id does not name it (set "
             "ZMQ_ROUTING_ID to the worker id, optionally followed by '/' and a nonce)", id);
        return;
    }
    int i = find_worker_id(c, id);
    int64_t now = sy_mono_ms();
    if (i >= 0 && c->zap && strcmp(c->w[i].key, c->src_key) != 0) {
        drop(c, SY_DROP_AUTH, "Hello for worker '%s' from CURVE key %s: that id is bound to key %s", id,
             c->src_key, c->w[i].key);
        return;
    }
    if (i >= 0 && w_live(&c->w[i])) {
        if (!proves(c, &c->w[i], env)) {
            /* Only the registered process knows its session: a routing id (or a pid) alone never
             * replaces a live registration. A restarted process gets the id once the old one is
             * lost (its connection closed, or failure_timeout_ms of silence). */
            drop(c, SY_DROP_AUTH, "Hello for live worker '%s' (pid %u) without its session secret (from pid %u): "
                 "ignored; a new process with this id is taken once the old one is lost", id,
                 (unsigned)c->w[i].pid, (unsigned)h->pid);
            return;
        }
        /* The registered process again (it lost touch with us, maybe on a new socket): refresh,
         * take its current route, welcome again. */
        c->w[i].last_seen = now;
        c->w[i].fd = c->src_fd;
        memcpy(c->w[i].rid, rid, rid_len);
        c->w[i].rid_len = rid_len;
        send_welcome(c, &c->w[i]);
        return;
    }
    if (i >= 0 && c->w[i].state == W_STOPPED && c->w[i].pid == h->pid) {
        /* A drained (stopped) process that lost touch before acting on its Stop: stop it again
         * rather than taking it back (a new process with the same id is welcome). */
        send_stop(c, &c->w[i], "drained");
        return;
    }
    if (i < 0) {
        int cap = c->cfg.cluster.max_workers * TABLE_FACTOR + TABLE_SLACK;
        if (c->nw >= cap) { /* forget the oldest lost/stopped entry */
            for (int j = 0; j < c->nw; j++)
                if (!w_live(&c->w[j])) {
                    memmove(&c->w[j], &c->w[j + 1], sizeof(worker) * (size_t)(c->nw - j - 1));
                    c->nw--;
                    break;
                }
            /* Member indices may have moved. */
            for (int r = 0; r < c->world; r++) c->members[r] = -1;
            for (int j = 0; j < c->nw; j++)
                if (c->gen_open && c->w[j].rank >= 0) c->members[c->w[j].rank] = j;
        }
        if (c->nw >= cap) {
            drop(c, SY_DROP_UNEXPECTED, "Hello from '%s': worker table full (%d)", id, cap);
            return;
        }
        if (c->nw == c->capw) {
            int nc = c->capw ? 2 * c->capw : 16;
            worker *nw = realloc(c->w, sizeof(worker) * (size_t)nc);
            if (!nw) return;
            c->w = nw;
            c->capw = nc;
        }
        i = c->nw++;
    }
    worker *w = &c->w[i];
    memset(w, 0, sizeof *w);
    snprintf(w->id, sizeof w->id, "%s", id);
    memcpy(w->rid, rid, rid_len);
    w->rid_len = rid_len;
    snprintf(w->host, sizeof w->host, "%s", h->host ? h->host : "");
    snprintf(w->backend, sizeof w->backend, "%s", h->backend ? h->backend : "");
    snprintf(w->version, sizeof w->version, "%s", h->version ? h->version : "");
    snprintf(w->data_ep, sizeof w->data_ep, "%s", h->data_endpoint ? h->data_endpoint : "");
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
    send_welcome(c, w);
    event(c, "worker_joined", json_pack("{s:s, s:s, s:i, s:s, s:s}", "worker", w->id, "host", w->host, "pid",
                                        (int)w->pid, "backend", w->backend, "data_endpoint", w->data_ep));
}

static void on_fault(sy_coord_t *c, worker *w, const Sy__Fault *f) {
    char why[300];
    snprintf(why, sizeof why, "fault from %s (rank %d): %s%s%s", w->id, w->rank, f->kind ? f->kind : "?",
             f->detail && *f->detail ? ": " : "", f->detail ? f->detail : "");
    event(c, "worker_fault", json_pack("{s:s, s:s, s:s, s:i, s:I}", "worker", w->id, "kind", f->kind ? f->kind : "",
                                       "detail", f->detail ? f->detail : "", "peer_rank", f->peer_rank, "step",
                                       (json_int_t)f->step));
    /* The accused peer is dropped only if it is silent too: a timeout cascades through ranks
     * waiting on each other, so the first accusation is often of a healthy rank. */
    if (f->peer_rank >= 0 && f->peer_rank < c->world) {
        int pi = c->members[f->peer_rank];
        if (pi >= 0 && sy_mono_ms() - c->w[pi].last_seen > (int64_t)SUSPECT_HEARTBEATS * c->cfg.cluster.heartbeat_ms)
            worker_lost(c, pi, "named by a peer's fault and silent");
    }
    begin_recovery(c, why, NULL);
}

static void on_message(sy_coord_t *c, const uint8_t *rid, size_t rid_len, const void *buf, size_t len) {
    Sy__Envelope *env = NULL;
    sy_proto_drop why = sy_proto_unpack(buf, len, &env);
    if (why != SY_DROP_NONE) {
        drop(c, why, "%s", sy_err_msg());
        return;
    }
    /* A worker learns the run from Welcome, so its Hello may carry an empty run id. */
    const char *run = env->run_id ? env->run_id : "";
    if (strcmp(run, c->cfg.run.name) != 0 && !(env->body_case == SY__ENVELOPE__BODY_HELLO && !run[0])) {
        drop(c, SY_DROP_RUN_ID, "%s with run id '%.64s', this run is '%s'", sy_proto_body_name(env->body_case), run,
             c->cfg.run.name);
        goto out;
    }
    switch (env->body_case) {
    case SY__ENVELOPE__BODY_HELLO:
    case SY__ENVELOPE__BODY_HEARTBEAT:
    case SY__ENVELOPE__BODY_STEP_DONE:
    case SY__ENVELOPE__BODY_CHECKPOINT_PART:
    case SY__ENVELOPE__BODY_FAULT:
        break;
    default:
        drop(c, SY_DROP_UNKNOWN_MESSAGE, "message body '%s' is not one a worker sends",
             sy_proto_body_name(env->body_case));
        goto out;
    }
    if (env->body_case == SY__ENVELOPE__BODY_HELLO) {
        on_hello(c, rid, rid_len, env);
        goto out;
    }
    char named[ID_MAX];
    int i = rid_names(rid, rid_len, named, sizeof named) ? find_worker_id(c, named) : -1;
    if (i < 0) {
        drop(c, SY_DROP_UNKNOWN_WORKER, "%s from an unregistered sender", sy_proto_body_name(env->body_case));
        /* A worker we do not know (we were restarted, or forgot it): tell it at its next
         * heartbeat to register again, instead of letting it wait for its silence timeout
         * (docs/protocol.md "Re-registration"). */
        if (env->body_case == SY__ENVELOPE__BODY_HEARTBEAT) send_reregister(c, rid, rid_len);
        goto out;
    }
    worker *w = &c->w[i];
    if (!proves(c, w, env)) {
        /* The routing id names a registered worker, but the message lacks that registration's
         * secret (or key): an impostor, or a process the id no longer belongs to. Counted and
         * dropped; it changes nothing (not even liveness). */
        drop(c, SY_DROP_AUTH, "%s for worker '%s' without its session secret%s", sy_proto_body_name(env->body_case),
             w->id, c->zap ? " or from another CURVE key" : "");
        goto out;
    }
    if (w->rid_len != rid_len || memcmp(w->rid, rid, rid_len) != 0) {
        /* the worker speaks from a new socket (it reopened it): answer there from now on */
        sy_debug("worker %s now speaks from another socket", w->id);
        memcpy(w->rid, rid, rid_len);
        w->rid_len = rid_len;
    }
    if (env->incarnation != c->incarnation) {
        drop(c, SY_DROP_INCARNATION, "%s from %s with incarnation %016" PRIx64, sy_proto_body_name(env->body_case),
             w->id, env->incarnation);
        goto out;
    }
    if (w->state == W_STOPPED) {
        drop(c, SY_DROP_UNEXPECTED, "%s from %s, which was stopped", sy_proto_body_name(env->body_case), w->id);
        goto out;
    }
    w->last_seen = sy_mono_ms();
    w->fd = c->src_fd;
    if (w->state == W_LOST) {
        /* Alive after all (it was only slow): back as a spare; it got an Abort when declared lost. */
        w->state = W_IDLE;
        w->rank = -1;
        w->seq = ++c->next_seq;
        c->last_join = w->last_seen;
        event(c, "worker_joined", json_pack("{s:s, s:b}", "worker", w->id, "returned", 1));
    }
    if (env->body_case == SY__ENVELOPE__BODY_HEARTBEAT) {
        const Sy__Heartbeat *hb = env->heartbeat;
        snprintf(w->activity, sizeof w->activity, "%s", hb->state && printable(hb->state, 16) ? hb->state : "?");
        bool busy = !strcmp(w->activity, "training") || !strcmp(w->activity, "restoring");
        if (busy && env->generation != 0 && (w->rank < 0 || !c->gen_open || env->generation != c->gen)) {
            /* It works in a generation it is not (or no longer) a member of: it missed the Abort. */
            Sy__Envelope ab_env;
            Sy__Abort ab = SY__ABORT__INIT;
            sy_proto_init(&ab_env, c->cfg.run.name, c->incarnation, env->generation);
            ab.reason = "not a member of this generation";
            ab_env.body_case = SY__ENVELOPE__BODY_ABORT;
            ab_env.abort = &ab;
            send_to(c, w, &ab_env);
        }
        if (c->gen_open && env->generation == c->gen && w->rank >= 0 && !strcmp(w->activity, "training") &&
            !w->restored && c->nrec && c->rec[c->nrec - 1].duration_ms < 0) {
            w->restored = true;
            bool all = true;
            for (int r = 0; r < c->world; r++) all = all && c->w[c->members[r]].restored;
            if (all) c->rec[c->nrec - 1].restored = sy_mono_ms();
        }
        goto out;
    }
    /* Results must belong to the open generation, from one of its members. */
    if (!c->gen_open || env->generation != c->gen) {
        drop(c, SY_DROP_STALE_GENERATION, "%s from %s for generation %" PRIu64 " (current %" PRIu64 "%s)",
             sy_proto_body_name(env->body_case), w->id, env->generation, c->gen, c->gen_open ? "" : ", closed");
        goto out;
    }
    if (w->rank < 0) {
        drop(c, SY_DROP_UNEXPECTED, "%s from %s, which is not in generation %" PRIu64,
             sy_proto_body_name(env->body_case), w->id, c->gen);
        goto out;
    }
    if (env->body_case == SY__ENVELOPE__BODY_STEP_DONE) on_step_done(c, w, env->step_done);
    else if (env->body_case == SY__ENVELOPE__BODY_CHECKPOINT_PART) on_checkpoint_part(c, w, env->checkpoint_part);
    else on_fault(c, w, env->fault);
out:
    sy_proto_free(env);
}

/* A CURVE handshake that failed before ZAP could judge a key: the peer speaks plaintext (no
 * --curve-key), or encrypted to another server key (wrong --curve-server-public). Refusals of
 * listed-key checks are zap.c's. Counted; logged at most every HANDSHAKE_LOG_MS. */
static void handshake_failed(sy_coord_t *c, uint16_t event, uint32_t value) {
    c->hs_failed++;
    c->dirty = true;
    int64_t now = sy_mono_ms();
    if (c->hs_failed > 1 && now - c->hs_logged < HANDSHAKE_LOG_MS) return;
    c->hs_logged = now;
    const char *why = event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL
                          ? "the peer closed it: a worker without --curve-key (plaintext)?"
                      : value == ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC
                          ? "cryptographic error: a worker whose --curve-server-public is not this coordinator's key?"
                      : value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                          ? "the peer does not speak CURVE (a worker without --curve-key?)"
                          : "protocol error";
    sy_warn("refused a connection: CURVE handshake failed (%s; 0x%x) (%" PRIu64 " failed handshake(s) so far)",
            why, value, c->hs_failed);
}

/* Disconnect events of the control socket: the live worker whose last message came on that
 * socket is lost (it comes back as a spare if it was only a network blip and speaks again). */
static void drain_monitor(sy_coord_t *c) {
    for (;;) {
        uint16_t event;
        uint32_t value;
        if (!sy_proto_monitor_event(c->mon, &event, &value)) return;
        if (event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL || event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
            handshake_failed(c, event, value);
            continue;
        }
        if (event != ZMQ_EVENT_DISCONNECTED) continue;
        for (int i = 0; i < c->nw; i++) {
            worker *w = &c->w[i];
            if (w_live(w) && w->fd == (int)value) {
                w->fd = -1;
                worker_lost(c, i, "its connection closed (ZeroMQ disconnect)");
                break;
            }
        }
    }
}

/* Reads every queued message (identity frame + one payload frame each). */
static sy_status drain_socket(sy_coord_t *c) {
    for (int budget = 0; budget < 1000 && !c->done; budget++) {
        zmq_msg_t parts[3];
        int n = 0, more = 1, extra = 0;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, c->sock, n == 0 && !extra ? ZMQ_DONTWAIT : 0) < 0) {
                int e = errno;
                zmq_msg_close(&m);
                for (int k = 0; k < n; k++) zmq_msg_close(&parts[k]);
                if (e == EAGAIN) return SY_OK;
                if (e == EINTR) return SY_OK;
                return sy_err_set(SY_EIO, "control socket receive: %s", zmq_strerror(e));
            }
            more = zmq_msg_more(&m);
            if (n < 3) parts[n++] = m;
            else {
                zmq_msg_close(&m);
                extra++;
            }
        }
        if (n != 2 || extra) {
            drop(c, SY_DROP_BAD_FRAME, "message of %d frames (expected 1 after the routing id)", n + extra - 1);
        } else if (zmq_msg_size(&parts[1]) == 0) {
            drop(c, SY_DROP_BAD_FRAME, "empty frame");
        } else {
            c->src_fd = zmq_msg_get(&parts[1], ZMQ_SRCFD);
            const char *user = c->zap ? zmq_msg_gets(&parts[1], "User-Id") : NULL;
            c->src_key = user ? user : "";
            on_message(c, zmq_msg_data(&parts[0]), zmq_msg_size(&parts[0]), zmq_msg_data(&parts[1]),
                       zmq_msg_size(&parts[1]));
        }
        for (int k = 0; k < n; k++) zmq_msg_close(&parts[k]);
    }
    return SY_OK;
}

static void publish(sy_coord_t *c) {
    json_t *j = sy_coord_status_json(c);
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    sy_http_publish(c->http, s, sy_coord_metrics_text(c));
    c->last_publish = sy_mono_ms();
    c->dirty = false;
}

/* ---------------------------------------------------------------------------------------- */
/* Requests and cron                                                                         */

static void on_request(sy_coord_t *c, const sy_http_cmd *cmd) {
    if (cmd->kind == SY_HTTP_CMD_STOP) {
        finish(c, R_STOPPED, "stop requested over HTTP");
        return;
    }
    if (cmd->kind == SY_HTTP_CMD_CHECKPOINT) {
        /* Two steps ahead of the furthest report: no rank can have finished it yet. */
        int64_t target = c->max_reported + 2;
        if (!c->gen_open || target > c->end_step) {
            event(c, "checkpoint_request_ignored", json_pack("{s:s}", "reason", c->gen_open ? "too close to the end"
                                                                                         : "no generation running"));
            return;
        }
        for (int r = 0; r < c->world; r++) {
            Sy__Envelope env;
            Sy__CheckpointNow cn = SY__CHECKPOINT_NOW__INIT;
            sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
            cn.step = (uint64_t)target;
            env.body_case = SY__ENVELOPE__BODY_CHECKPOINT_NOW;
            env.checkpoint_now = &cn;
            send_to(c, &c->w[c->members[r]], &env);
        }
        event(c, "checkpoint_requested", json_pack("{s:I}", "step", (json_int_t)target));
        return;
    }
    if (cmd->kind == SY_HTTP_CMD_LOST) { /* the launcher saw the process exit */
        int li = find_worker_id(c, cmd->arg);
        if (li < 0 || !w_live(&c->w[li])) {
            sy_info("lost report for '%s': not a live worker; ignored", cmd->arg);
        } else if (cmd->pid && c->w[li].pid != cmd->pid) {
            sy_info("lost report for '%s' about pid %u: it is registered with pid %u; ignored", cmd->arg,
                    (unsigned)cmd->pid, (unsigned)c->w[li].pid);
        } else {
            char why[96];
            snprintf(why, sizeof why, "process %u exited (reported by the launcher)", (unsigned)c->w[li].pid);
            worker_lost(c, li, why);
        }
        return;
    }
    int i = find_worker_id(c, cmd->arg);
    if (i < 0 || !w_live(&c->w[i])) {
        sy_warn("drain: no live worker '%s'", cmd->arg);
        return;
    }
    worker *w = &c->w[i];
    if (w->state == W_ACTIVE) {
        w->state = W_DRAINING; /* removed at the next committed checkpoint */
        event(c, "worker_draining", json_pack("{s:s, s:i}", "worker", w->id, "rank", w->rank));
    } else if (w->state == W_IDLE) {
        send_stop(c, w, "drained");
        w->state = W_STOPPED;
        event(c, "worker_drained", json_pack("{s:s}", "worker", w->id));
    }
}

static void cron(sy_coord_t *c) {
    int64_t now = sy_mono_ms();
    sy_http_cmd cmd;
    while (!c->done && sy_http_next_cmd(c->http, &cmd)) on_request(c, &cmd);
    for (int i = 0; i < c->nw && !c->done; i++) {
        worker *w = &c->w[i];
        if (!w_live(w)) continue;
        if (now - w->last_seen > c->cfg.cluster.failure_timeout_ms) {
            char why[96];
            snprintf(why, sizeof why, "no message for %" PRId64 " ms (failure_timeout_ms %d)", now - w->last_seen,
                     c->cfg.cluster.failure_timeout_ms);
            worker_lost(c, i, why);
        } else if (now - w->last_keepalive > c->cfg.cluster.failure_timeout_ms / 3) {
            send_welcome(c, w); /* keepalive: workers re-register after failure_timeout_ms of silence */
        }
    }
    if (!c->done && !c->gen_open) {
        int idle = 0;
        for (int i = 0; i < c->nw; i++) idle += c->w[i].state == W_IDLE;
        if (idle < c->cfg.cluster.min_workers) {
            if (c->state != R_WAITING) c->dirty = true;
            c->state = R_WAITING; /* a recovery in progress stays open in c->rec */
        } else {
            int64_t since = now - (c->last_join > c->settle_from ? c->last_join : c->settle_from);
            bool expecting = !c->opened_once && c->expect_workers > 0 && idle < c->expect_workers &&
                             now - c->settle_from < SY_COORD_EXPECT_TIMEOUT_MS;
            /* A recovery does not wait for newcomers: the survivors go on at once. */
            bool recovering = c->nrec > 0 && c->rec[c->nrec - 1].duration_ms < 0;
            /* A commit in flight decides the restore point: wait for its result. */
            bool committing = sy_committer_in_flight(c->committer) > 0;
            /* Everyone the launcher started is in: no need to wait for stragglers. */
            bool all_expected = !c->opened_once && c->expect_workers > 0 && idle >= c->expect_workers;
            if (!expecting && !committing &&
                (since >= c->settle_ms || recovering || all_expected || idle >= c->cfg.cluster.max_workers)) {
                c->opened_once = true;
                open_generation(c);
            }
        }
    }
    if (c->dirty || now - c->last_publish >= PUBLISH_MS) publish(c);
}

/* ---------------------------------------------------------------------------------------- */
/* Life cycle                                                                                */

/* CURVE on (cluster.curve_server_key): loads the authorized worker keys and binds the ZAP
 * handler, which must exist before the control socket binds. */
static sy_status curve_setup(sy_coord_t *c) {
    const sy_config_t *cfg = &c->cfg;
    SY_CHECK(sy_curve_available("cluster.curve_server_key"));
    sy_curve_keyset_t *keys = NULL;
    sy_status s = sy_curve_keyset_load(cfg->cluster.curve_authorized_keys, &keys);
    if (s != SY_OK) return sy_err_prefix(s, "cluster.curve_authorized_keys");
    return sy_zap_new(c->zctx, ZAP_DOMAIN, &keys, cfg->cluster.curve_authorized_keys, &c->zap);
}

/* Makes the control socket a CURVE server with the coordinator's key; ZAP checks clients. */
static sy_status curve_server(sy_coord_t *c) {
    sy_curve_key key;
    sy_status s = sy_curve_load_key(c->cfg.cluster.curve_server_key, true, &key);
    if (s != SY_OK) return sy_err_prefix(s, "cluster.curve_server_key");
    int one = 1;
    if (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, key.secret_z85, SY_CURVE_Z85_LEN + 1) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_ZAP_DOMAIN, ZAP_DOMAIN, strlen(ZAP_DOMAIN)) != 0)
        s = sy_err_set(SY_EIO, "cluster.curve_server_key: cannot make the control socket a CURVE server: %s",
                       zmq_strerror(errno));
    if (s == SY_OK)
        sy_info("control plane: CURVE on, server public key %s, %d authorized worker key(s) from %s", key.public_z85,
                sy_zap_authorized(c->zap), c->cfg.cluster.curve_authorized_keys);
    sy_curve_key_wipe(&key);
    return s;
}

static sy_status bind_socket(sy_coord_t *c, const char *bind) {
    char ep[256];
    size_t n = strlen(bind);
    if (n >= sizeof ep) return sy_err_set(SY_EINVAL, "cluster.bind '%s' is too long", bind);
    snprintf(ep, sizeof ep, "%s", bind);
    if (n > 2 && !strcmp(ep + n - 2, ":0")) strcpy(ep + n - 2, ":*"); /* ZeroMQ's any-free-port */
    int one = 1, linger = LINGER_MS;
    int64_t maxmsg = SY_PROTO_TRANSPORT_MAX;
    /* ZMQ_ROUTER_HANDOVER: a DEALER that reconnects (same socket, same routing id) takes its
     * route over at once, even before its old connection is known to be dead. Membership never
     * follows a routing id (issue 16): switchyard-worker's routing ids carry a random nonce
     * per socket, and every message must carry its registration's session secret. ZMTP
     * heartbeats close dead connections within failure_timeout_ms. */
    int hb_ivl = c->cfg.cluster.heartbeat_ms, hb_ttl = c->cfg.cluster.failure_timeout_ms;
    zmq_setsockopt(c->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(c->sock, ZMQ_ROUTER_HANDOVER, &one, sizeof one);
    zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_IVL, &hb_ivl, sizeof hb_ivl);
    zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_TIMEOUT, &hb_ttl, sizeof hb_ttl);
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (c->zap) SY_CHECK(curve_server(c));
    if (zmq_bind(c->sock, ep) != 0)
        return sy_err_set(SY_EIO, "cannot bind the control socket at %s: %s", ep, zmq_strerror(errno));
    /* A worker process that dies closes its TCP connection: the monitor reports the disconnect
     * at once, well before heartbeat silence would (issue 5: detection in seconds). */
    char mon_ep[64];
    snprintf(mon_ep, sizeof mon_ep, "inproc://sy-coord-monitor-%p", (void *)c);
    int events = ZMQ_EVENT_DISCONNECTED;
    if (c->zap) events |= ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL;
    if (zmq_socket_monitor(c->sock, mon_ep, events) == 0) {
        c->mon = zmq_socket(c->zctx, ZMQ_PAIR);
        zmq_setsockopt(c->mon, ZMQ_LINGER, &linger, sizeof linger);
        if (zmq_connect(c->mon, mon_ep) != 0) {
            zmq_close(c->mon);
            c->mon = NULL;
        }
    }
    size_t len = sizeof c->endpoint;
    if (zmq_getsockopt(c->sock, ZMQ_LAST_ENDPOINT, c->endpoint, &len) != 0)
        snprintf(c->endpoint, sizeof c->endpoint, "%s", ep);
    return SY_OK;
}

static int count_switch(const sy_config_t *cfg) {
    int n = 0, S = cfg->model.switch_every;
    for (int l = 0; l < cfg->model.n_layers; l++)
        if (S > 0 && cfg->model.n_experts >= 1 && l % S == S - 1) n++;
    return n;
}

sy_status sy_coord_new(const sy_config_t *cfg, const sy_coord_opts *opts, sy_coord_t **out) {
    *out = NULL;
    sy_status s = SY_OK;
    sy_coord_t *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "out of memory");
    c->latest_ckpt = -1;
    c->src_key = "";
    c->expect_workers = opts ? opts->expect_workers : 0;
    c->t0_mono = sy_mono_ms();
    c->events = json_array();
    SY_CHECK_GOTO(sy_config_copy(&c->cfg, cfg), s, fail);
    c->E = cfg->model.n_experts;
    c->n_switch = count_switch(cfg);
    int64_t settle = (int64_t)SETTLE_HEARTBEATS * cfg->cluster.heartbeat_ms;
    c->settle_ms = settle < SETTLE_MIN_MS ? SETTLE_MIN_MS : settle > SETTLE_MAX_MS ? SETTLE_MAX_MS : settle;
    c->members = calloc((size_t)cfg->cluster.max_workers, sizeof(int));
    c->placement = calloc((size_t)c->E, sizeof(uint32_t));
    c->load = calloc((size_t)(c->n_switch * c->E > 0 ? c->n_switch * c->E : 1), sizeof(uint64_t));
    json_t *cj = sy_config_to_json(cfg);
    c->config_json = cj ? json_dumps(cj, JSON_COMPACT) : NULL;
    json_decref(cj);
    if (!c->members || !c->placement || !c->load || !c->config_json || !c->events) {
        s = sy_err_set(SY_ENOMEM, "out of memory");
        goto fail;
    }
    while (c->incarnation == 0)
        if (getrandom(&c->incarnation, sizeof c->incarnation, 0) != (ssize_t)sizeof c->incarnation)
            c->incarnation = (uint64_t)sy_wall_s() * 2654435761u ^ (uint64_t)getpid();

    SY_CHECK_GOTO(sy_store_open_config(cfg, &c->store), s, fail);
    /* A coordinator always continues its run (a restarted one takes over from the last
     * checkpoint); whether a run may start fresh is the launcher's question (--resume,
     * --overwrite). Claiming fences off an older coordinator of this run. */
    int64_t latest;
    s = sy_ckpt_latest(c->store, cfg->run.name, &latest);
    if (s == SY_OK) c->latest_ckpt = latest;
    else if (s != SY_ENOTFOUND) goto fail;
    if (c->latest_ckpt >= 0) { /* before the claim: a refused restart leaves the run's writer alone */
        json_t *man = NULL;
        char what[320];
        snprintf(what, sizeof what, "checkpoint %s step %" PRId64, cfg->run.name, c->latest_ckpt);
        SY_CHECK_GOTO(sy_ckpt_read_manifest(c->store, cfg->run.name, c->latest_ckpt, &man), s, fail);
        s = sy_config_check_resume(cfg, json_object_get(man, "config"), what);
        json_decref(man);
        if (s != SY_OK) goto fail;
    }
    SY_CHECK_GOTO(sy_run_claim(c->store, cfg->run.name, SY_RUN_RESUME, c->writer, NULL, 0), s, fail);
    SY_CHECK_GOTO(sy_committer_new(c->store, cfg->run.name, cfg->checkpoint.keep_last, &c->committer), s, fail);
    c->step = c->latest_ckpt > 0 ? c->latest_ckpt : 0;
    c->furthest = c->step;

    SY_CHECK_GOTO(sy_mkdir_p(cfg->run.state_dir), s, fail);
    char path[4200];
    const char *mode = c->latest_ckpt >= 0 ? "a" : "w"; /* a fresh run starts fresh logs */
    snprintf(path, sizeof path, "%s/metrics.jsonl", cfg->run.state_dir);
    if (!(c->metrics_f = sy_fs_fopen_regular(path, mode[0] == 'a'))) {
        s = SY_EIO;
        goto fail;
    }
    snprintf(path, sizeof path, "%s/events.jsonl", cfg->run.state_dir);
    if (!(c->events_f = sy_fs_fopen_regular(path, mode[0] == 'a'))) {
        s = SY_EIO;
        goto fail;
    }

    c->zctx = zmq_ctx_new();
    c->sock = c->zctx ? zmq_socket(c->zctx, ZMQ_ROUTER) : NULL;
    if (!c->sock) {
        s = sy_err_set(SY_EIO, "zmq socket: %s", zmq_strerror(errno));
        goto fail;
    }
    if (cfg->cluster.curve_server_key && cfg->cluster.curve_server_key[0]) SY_CHECK_GOTO(curve_setup(c), s, fail);
    SY_CHECK_GOTO(bind_socket(c, opts && opts->bind ? opts->bind : cfg->cluster.bind), s, fail);
    const char *saddr = opts && opts->status_addr ? opts->status_addr : cfg->status.addr;
    SY_CHECK_GOTO(sy_http_start(saddr, cfg->status.token, &c->http), s, fail);
    char host[256];
    const char *colon = strrchr(saddr, ':');
    snprintf(host, sizeof host, "%.*s", (int)(colon - saddr), saddr);
    snprintf(c->status_url, sizeof c->status_url, "http://%s:%d", host, sy_http_port(c->http));
    c->settle_from = sy_mono_ms();
    char inc[24];
    snprintf(inc, sizeof inc, "%016" PRIx64, c->incarnation);
    event(c, "coordinator_started",
          json_pack("{s:s, s:s, s:s, s:s, s:I}", "run", cfg->run.name, "incarnation", inc, "endpoint",
                    c->endpoint, "status", c->status_url, "latest_checkpoint", (json_int_t)c->latest_ckpt));
    publish(c);
    *out = c;
    return SY_OK;
fail:
    sy_coord_destroy(&c);
    return s;
}

const char *sy_coord_endpoint(const sy_coord_t *self) { return self->endpoint; }
const char *sy_coord_status_url(const sy_coord_t *self) { return self->status_url; }

sy_status sy_coord_run(sy_coord_t *c, volatile sig_atomic_t *stop_flag, sy_coord_outcome *outcome) {
    sy_status s = SY_OK;
    int64_t next_cron = sy_mono_ms();
    sy_info("run %s: %" PRId64 " steps, %d experts, %d Switch layers; waiting for %d worker(s) on %s",
            c->cfg.run.name, (int64_t)c->cfg.run.steps, c->E, c->n_switch, c->cfg.cluster.min_workers, c->endpoint);
    while (!c->done) {
        int64_t now = sy_mono_ms();
        long wait = next_cron > now ? (long)(next_cron - now) : 0;
        /* the ZAP handler is polled first: a worker's handshake waits on its answer */
        zmq_pollitem_t it[4] = {{c->sock, 0, ZMQ_POLLIN, 0}, {NULL, sy_committer_fd(c->committer), ZMQ_POLLIN, 0}};
        int n = 2, i_zap = -1, i_mon = -1;
        if (c->zap) i_zap = n, it[n++] = (zmq_pollitem_t){sy_zap_socket(c->zap), 0, ZMQ_POLLIN, 0};
        if (c->mon) i_mon = n, it[n++] = (zmq_pollitem_t){c->mon, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(it, n, wait);
        if (rc < 0 && errno != EINTR) {
            s = sy_err_set(SY_EIO, "zmq_poll: %s", zmq_strerror(errno));
            break;
        }
        if (rc > 0 && (it[0].revents & ZMQ_POLLIN)) SY_CHECK_GOTO(drain_socket(c), s, out);
        if (rc > 0 && (it[1].revents & ZMQ_POLLIN)) drain_commits(c);
        if (rc > 0 && i_zap >= 0 && (it[i_zap].revents & ZMQ_POLLIN) && sy_zap_handle(c->zap) > 0) c->dirty = true;
        if (rc > 0 && i_mon >= 0 && (it[i_mon].revents & ZMQ_POLLIN)) drain_monitor(c);
        if (stop_flag && *stop_flag && !c->done) finish(c, R_STOPPED, "signal");
        now = sy_mono_ms();
        if (now >= next_cron && !c->done) {
            cron(c);
            next_cron = now + SY_COORD_CRON_MS;
        }
    }
out:
    /* Stopped with a commit in flight: let it finish (its parts are durable) and record it. */
    if (sy_committer_in_flight(c->committer) > 0) {
        sy_info("waiting for %d checkpoint commit(s) in flight", sy_committer_in_flight(c->committer));
        sy_committer_wait(c->committer);
        drain_commits(c);
    }
    publish(c);
    *outcome = c->outcome;
    return s;
}

void sy_coord_destroy(sy_coord_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_coord_t *c = *self_p;
    sy_http_destroy(&c->http);
    if (c->mon) zmq_close(c->mon);
    sy_zap_destroy(&c->zap);
    if (c->sock) {
        zmq_socket_monitor(c->sock, NULL, 0);
        zmq_close(c->sock);
    }
    if (c->zctx) zmq_ctx_term(c->zctx);
    if (c->metrics_f) fclose(c->metrics_f);
    if (c->events_f) fclose(c->events_f);
    clear_pending(c);
    sy_committer_destroy(&c->committer); /* finishes a commit in flight: before the store goes */
    for (int i = 0; i < c->nrec; i++) json_decref(c->rec[i].lost);
    free(c->rec);
    json_decref(c->events);
    sy_store_destroy(&c->store);
    free(c->config_json);
    free(c->members);
    free(c->placement);
    free(c->load);
    free(c->ms_by_step);
    free(c->w);
    sy_config_free(&c->cfg);
    free(c);
    *self_p = NULL;
}
