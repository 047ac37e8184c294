/* The coordinator's state and the functions its concerns share. One reactor (single thread),
 * one file per concern, all over this struct:
 *   coord.c          the reactor: life cycle, zmq_poll loop and cron, message intake and
 *                    dispatch, HTTP requests, events.jsonl, drop counters
 *   coord_members.c  registration, liveness, generations (Assign), recovery, the run's end
 *   coord_steps.c    StepDone aggregation into metrics.jsonl
 *   coord_ckpt.c     CheckpointPart assembly, commits through the committer thread
 *   coord_status.c   the /v1/status JSON and the Prometheus text built from the state
 * Private to coordinator/: nothing else includes it. Thread: the reactor's only. */
#ifndef SY_COORD_INTERNAL_H
#define SY_COORD_INTERNAL_H

#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "base/clock.h"
#include "coordinator/committer.h"
#include "base/config.h"
#include "coordinator/coord.h"
#include "coordinator/history.h"
#include "coordinator/http.h"
#include "proto/protocol.h"
#include "storage/store.h"
#include "coordinator/zap.h"

/* Longest worker id / host / endpoint kept (longer Hellos are refused as invalid). */
#define ID_MAX 128
#define HOST_MAX 128
#define EP_MAX 256
/* Recent losses kept for /v1/status, and recent events for the dashboard. */
#define LOSS_HISTORY 100
#define EVENT_HISTORY 50
/* Step aggregations / checkpoint steps in flight at once (ranks are within a step or two). */
#define MAX_PENDING 64
/* Bytes of a registration's session secret (random, from getrandom). */
#define SY_SESSION_LEN 16

/* States one worker's Holdings lists at most (its live state, its 2 copies of recent steps, 2
 * replica slots: SY_REPLICA_MAX_HELD). */
#define SY_COORD_MAX_HELD 5

#define SY_COORD_GEN_MAX ((uint64_t)1 << 62) /* larger Hello.last_generation values are ignored */

typedef enum { W_IDLE = 0, W_ACTIVE, W_DRAINING, W_LOST, W_STOPPED, W__COUNT } wstate;
extern const char *const sy_coord_wstate[W__COUNT]; /* names, for events and status */

typedef enum { R_WAITING = 0, R_RUNNING, R_RECOVERING, R_FINISHED, R_FAILED, R_STOPPED } rstate;
extern const char *const sy_coord_rstate[R_STOPPED + 1];

typedef struct {
    char id[ID_MAX];
    uint8_t rid[256]; /* ZeroMQ routing id of its current socket: the id, or "id/NONCE" */
    size_t rid_len;
    char host[HOST_MAX];
    char backend[16];
    char version[32];
    char data_ep[EP_MAX];
    char rep_ep[EP_MAX];           /* Hello.replica_endpoint ("": none) */
    bool table_frame;              /* Hello.table_frame: takes an Assign's peer table as a second frame */
    uint32_t pid;
    wstate state;
    int rank; /* in the open generation, else -1 */
    int64_t last_seen, joined;
    uint64_t seq; /* join order */
    int64_t step;
    double step_ms;
    uint64_t dp_dropped, dp_refused; /* its data plane's counters (last Heartbeat) */
    char activity[16];
    int64_t last_keepalive;
    bool restored; /* reported "training" in the open generation (recovery phase timing) */
    int accused;   /* peer faults naming it while it answers on the control plane, since the last progress */
    bool quarantined; /* excluded as unreachable on the data plane: back as a spare, but kept out of
                       * new generations until the run progresses (issue 13 (d)) */
    int fd;        /* socket its last message came from (ZMQ_SRCFD), -1 unknown */
    /* Lost because that socket closed (a disconnect event): messages still queued from it are
     * read after the event and must not bring it back as a spare (coord.c, on_message). */
    bool fd_closed;
    int closed_fd;
    /* Proof of identity (docs/protocol.md "Identities"): the secret this registration was given
     * in Welcome, which every later message must echo; with CURVE on, the public key (Z85) the
     * id was first registered with, which every message of the id must come from. */
    uint8_t session[SY_SESSION_LEN];
    char key[48];
    /* Its last Holdings (states in its memory, coord_replicas.c), for generation held_gen;
     * nheld 0: none known (cleared when it joins a generation: its memory changes). */
    uint64_t held_gen;
    int nheld;
    int64_t held_step[SY_COORD_MAX_HELD];
    bool held_dense[SY_COORD_MAX_HELD];
    uint8_t *held_ex; /* [SY_COORD_MAX_HELD * E]: expert e whole in entry k */
    /* Peer tables (docs/protocol.md "Peer tables"): the generation whose table its heartbeats
     * say it holds, and the last generation whose Assign it was sent (0: none since it registered). */
    uint64_t peers_held, assigned_gen;
} worker;

typedef struct {
    int64_t step;
    int got;
    uint8_t *seen; /* [world] */
    double ce, aux, z, step_ms, grad_norm, lr;
    uint64_t tokens, dropped, routed;
    uint64_t *counts; /* [n_switch * E] */
    bool counts_ok;
    double *terms;    /* [3 * M]: ce, aux, z of micro-batch m (StepDone.micro_terms) */
    int nterms;       /* micro-batches whose terms arrived; M: sum them in order */
    double val_loss;  /* NaN: none reported */
} agg;

typedef struct {
    int64_t step;
    int got;
    uint8_t *seen;  /* [world] */
    json_t *files;  /* array of {name, size, sha256} */
    int64_t first;  /* ms of the first part */
} cpart;

typedef struct {
    uint64_t generation; /* the generation that failed */
    char reason[256];
    json_t *lost;        /* array of worker ids */
    int64_t detected;    /* mono ms */
    int64_t restore_step;
    char restore_source[16]; /* "replicas" | "checkpoint" (of the generation that ended it) */
    double duration_ms;  /* < 0 while in progress */
    /* phases (mono ms; 0 = not reached): the lost worker last heard, the new generation opened,
     * every member restored (reported "training"), the first step of the new generation done */
    int64_t last_heard, opened, restored;
    double detect_ms, reconfigure_ms, restore_ms, first_step_ms;
} recovery;

struct sy_coord {
    sy_config_t cfg;
    int expect_workers;     /* first generation: wait for this many (0: no wait) */
    bool opened_once;       /* a generation was opened by this incarnation */
    int prev_world;         /* world of the last closed generation (its members stay in members[]) */
    /* The peer table of the last generation opened (copies: entries may leave the worker
     * table), the base of the next generation's Assign edits; tab_gen 0: none. */
    uint64_t tab_gen;
    int tab_n;
    char **tab_ep, **tab_key;
    sy_store_t *store;
    sy_committer_t *committer; /* commits and retention, off the reactor thread */
    void *zctx, *sock;
    void *mon;              /* ZeroMQ socket monitor of sock: disconnects (a dead peer's TCP close) */
    sy_zap_t *zap;          /* CURVE on: the ZAP handler that admits listed worker keys */
    uint64_t hs_failed;     /* CURVE handshakes that failed before ZAP (plaintext peer, wrong key) */
    int64_t hs_logged;
    int src_fd;             /* socket of the message being handled */
    const char *src_key;    /* its sender's CURVE public key (ZAP user id); "" with CURVE off */
    char endpoint[256];
    char status_url[300];
    sy_http_t *http;
    FILE *metrics_f, *events_f;
    char *config_json;
    uint64_t incarnation;
    char writer[33];        /* this coordinator's claim on the run in the store (ckpt_run.h) */
    int E, n_switch;
    int64_t settle_ms;
    int64_t t0_mono;

    worker *w;
    int nw, capw;
    int *wix;            /* open-addressing index of c->w by worker id: slot -> index, -1 empty
                          * (coord_members.c; a message's sender is found in O(1), not O(nw)) */
    int wix_cap;         /* slots: a power of two, at least 2 x capw */
    int n_restored;      /* members of the open generation with `restored` set */
    uint64_t next_seq;
    int64_t last_join;

    rstate state;
    bool gen_open;
    uint64_t gen;
    uint64_t gen_floor; /* highest generation a registering worker last ran in (any incarnation):
                         * new generations are numbered above it (coord_members.c) */
    int world;
    int *members;        /* worker index by rank */
    uint32_t *placement; /* [E] */
    /* the placement by owner (built when a StepDone with owned counts first needs it in a
     * generation): rank q's experts are own_exp[own_off[q] .. own_off[q+1]), ascending */
    int32_t *own_off, *own_exp;
    uint64_t own_gen;
    int64_t restore_step, start_step, end_step;
    bool from_replicas;     /* the open generation restores restore_step from the members' replicas */
    int32_t *expert_source; /* [E] its plan: the rank that sends expert e (Assign.expert_source) */
    int dense_source;
    bool replicas_failed;   /* a restore from replicas failed: the next generation uses the checkpoint */
    int64_t regroup_since;  /* mono ms a membership change closed the generation at a checkpoint and
                             * the next one waits for the members' Holdings (0: none; issue 18) */
    int64_t end_after;      /* the open generation ends after this step (EndAfter sent; 0: none) */
    uint64_t closed_gen;       /* the generation closed last, and the end_after its close carried: */
    int64_t closed_end_after;  /* an Abort re-sent for it (a heartbeat still says training) carries it too */
    bool cron_now;          /* run the cron at once, not at its next tick (a Holdings came in while
                             * a new generation waits for them: it opens without the tick's delay) */
    int64_t max_reported; /* highest StepDone step seen in this generation */
    int64_t gen_opened_at;
    int64_t first_open;   /* mono ms of the first generation (goodput clock) */
    int64_t settle_from;

    agg pend[MAX_PENDING];
    int npend;
    cpart parts[MAX_PENDING];
    int nparts;

    int64_t step;          /* last aggregated step */
    int64_t furthest;      /* furthest step ever aggregated */
    int fruitless;
    int accusations; /* peer faults naming a rank alive on the control plane, since the last progress */
    int64_t latest_ckpt;   /* -1: none */
    double latest_ckpt_time, ckpt_seconds;
    double loss, ce, aux, z, tps, dropped_frac, lr, grad_norm;
    double val_loss;       /* the last validation loss (NaN: none yet), at step val_step */
    int64_t val_step;
    uint64_t *load; /* [n_switch * E] of the last step */
    bool load_valid;
    int64_t load_step;
    struct { int64_t step; double loss; } hist[LOSS_HISTORY];
    int nhist;
    sy_history_t *history;   /* the dashboard's series (/v1/history) */
    uint64_t history_published; /* its version last published */
    int64_t history_published_at;
    double *ms_by_step; /* step time of the kept run of each step (goodput) */
    int64_t ms_cap;
    double useful_ms;

    recovery *rec;
    int nrec;
    json_t *events; /* recent events (array) */

    uint64_t drops[SY_DROP__COUNT];
    int64_t drop_logged[SY_DROP__COUNT];
    int64_t last_publish;
    int64_t publish_cost_ms; /* how long the last publish took (it paces the next: coord.c cron) */
    bool dirty, done;
    sy_coord_outcome outcome;
};


/* A JSON number, or null when not finite (jansson refuses NaN and inf). */
static inline json_t *jnum(double v) { return isfinite(v) ? json_real(v) : json_null(); }

/* ---- coord.c: the reactor ---- */
/* Counts a dropped message by reason and logs it (rate-limited per reason). */
void sy_coord_drop(sy_coord_t *c, sy_proto_drop why, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* A restarted coordinator (continuing a run): the steps metrics.jsonl already holds go into the
 * dashboard's history (without expert loads), so its charts start where the run did. A missing
 * file is no error; unreadable lines are skipped (and counted in one log line). */
void sy_coord_history_reload(sy_coord_t *c, const char *path);
/* Appends {"time", "event", ...fields} to events.jsonl and the recent list; steals fields. */
void sy_coord_event(sy_coord_t *c, const char *name, json_t *fields);

/* ---- coord_members.c: registration, liveness, generations ---- */
static inline bool sy_coord_live(const worker *w) { return w->state != W_LOST && w->state != W_STOPPED; }
/* Hello: registers a worker (or refreshes its registration) and answers Welcome. */
void sy_coord_on_hello(sy_coord_t *c, const uint8_t *rid, size_t rid_len, const Sy__Envelope *env);
/* Index in c->w of the worker with this id / named by this routing id, or -1. */
int sy_coord_find_worker(sy_coord_t *c, const char *id);
int sy_coord_find_sender(sy_coord_t *c, const uint8_t *rid, size_t rid_len);
/* The message proves it comes from registration w (session secret; CURVE key when on). */
bool sy_coord_proves(const sy_coord_t *c, const worker *w, const Sy__Envelope *env);
/* Welcome with reregister set: the sender is not registered and must send Hello. */
void sy_coord_send_reregister(sy_coord_t *c, const uint8_t *rid, size_t rid_len);
/* A proven message from w: refreshes its liveness; a lost worker comes back as a spare. */
void sy_coord_heard_from(sy_coord_t *c, worker *w);
void sy_coord_on_heartbeat(sy_coord_t *c, worker *w, const Sy__Envelope *env);
void sy_coord_on_fault(sy_coord_t *c, worker *w, const Sy__Fault *f);
/* Worker i is lost (silent, disconnected, reported): Abort; a member starts a recovery. */
void sy_coord_worker_lost(sy_coord_t *c, int i, const char *reason);
/* Opens generation g+1 over the idle live workers; closes the open one (members to idle). */
void sy_coord_open_generation(sy_coord_t *c);
void sy_coord_close_generation(sy_coord_t *c, const char *why);
/* A member is gone (or the generation is broken): abort it and plan a new one. */
void sy_coord_begin_recovery(sy_coord_t *c, const char *reason, const char *lost_id);
/* Ends the run: Stop to every live worker, the final state and event. */
void sy_coord_finish(sy_coord_t *c, rstate final, const char *why);
/* Frees the steps and checkpoints in flight (a generation ends, or the coordinator). */
void sy_coord_clear_pending(sy_coord_t *c);
void sy_coord_send(sy_coord_t *c, worker *w, Sy__Envelope *env);
/* Sends env to every member of the open generation (rank order). */
void sy_coord_send_members(sy_coord_t *c, Sy__Envelope *env);
void sy_coord_send_welcome(sy_coord_t *c, worker *w);
void sy_coord_send_stop(sy_coord_t *c, worker *w, const char *reason);

/* ---- coord_steps.c ---- */
void sy_coord_on_step_done(sy_coord_t *c, worker *w, const Sy__StepDone *sd);

/* ---- coord_ckpt.c ---- */
void sy_coord_on_checkpoint_part(sy_coord_t *c, worker *w, const Sy__CheckpointPart *cp);
/* Takes the committer's results (its fd is readable) and acts on each. */
void sy_coord_drain_commits(sy_coord_t *c);
/* Finishes the run once every step is done and the final checkpoint reads back as this run's. */
void sy_coord_maybe_finish(sy_coord_t *c);
/* A membership change: closes the open generation and opens the next (with replicas: once the
 * members' Holdings are in, from the newest step they hold whole). */
void sy_coord_regroup(sy_coord_t *c, const char *why);

/* ---- coord_replicas.c: restores from the members' memory (docs/fault-tolerance.md) ---- */
void sy_coord_on_holdings(sy_coord_t *c, worker *w, const Sy__Envelope *env);
/* A recovery still waits for the Holdings of survivors of the closed generation (bounded). */
bool sy_coord_holdings_pending(sy_coord_t *c);
/* Plans a restore of the generation being opened (world n, members c->members, placement
 * c->placement) from the members' Holdings: the newest step >= the latest checkpoint for which
 * dense and every expert are held whole by some member. Sets c->restore_step, dense_source and
 * expert_source; false when the replicas do not cover it (restore from the checkpoint). */
bool sy_coord_plan_from_replicas(sy_coord_t *c, int n);
/* Forget what the members of the new generation held (their memory is about to change). */
void sy_coord_holdings_clear(worker *w);

/* ---- coord_status.c ---- */
/* The /v1/status snapshot (a new reference) and the /metrics text (malloc'ed), from c's state. */
json_t *sy_coord_status_json(sy_coord_t *c);
char *sy_coord_metrics_text(sy_coord_t *c);

#endif
