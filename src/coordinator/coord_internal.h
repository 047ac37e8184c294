/* The coordinator's state, shared by its two source files: coord.c (the reactor: workers,
 * generations, steps, checkpoints, recovery) and coord_status.c (the /v1/status JSON and the
 * Prometheus text built from that state). Private to coordinator/: nothing else includes it.
 * Thread: the reactor's only. */
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
    uint32_t pid;
    wstate state;
    int rank; /* in the open generation, else -1 */
    int64_t last_seen, joined;
    uint64_t seq; /* join order */
    int64_t step;
    double step_ms;
    char activity[16];
    int64_t last_keepalive;
    bool restored; /* reported "training" in the open generation (recovery phase timing) */
    int fd;        /* socket its last message came from (ZMQ_SRCFD), -1 unknown */
    /* Proof of identity (docs/protocol.md "Identities"): the secret this registration was given
     * in Welcome, which every later message must echo; with CURVE on, the public key (Z85) the
     * id was first registered with, which every message of the id must come from. */
    uint8_t session[SY_SESSION_LEN];
    char key[48];
} worker;

typedef struct {
    int64_t step;
    int got;
    uint8_t *seen; /* [world] */
    double ce, aux, z, step_ms, grad_norm, lr;
    uint64_t tokens, dropped, routed;
    uint64_t *counts; /* [n_switch * E] */
    bool counts_ok;
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
    uint64_t next_seq;
    int64_t last_join;

    rstate state;
    bool gen_open;
    uint64_t gen;
    int world;
    int *members;        /* worker index by rank */
    uint32_t *placement; /* [E] */
    int64_t restore_step, start_step, end_step;
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
    int64_t latest_ckpt;   /* -1: none */
    double latest_ckpt_time, ckpt_seconds;
    double loss, ce, aux, z, tps, dropped_frac, lr, grad_norm;
    uint64_t *load; /* [n_switch * E] of the last step */
    bool load_valid;
    int64_t load_step;
    struct { int64_t step; double loss; } hist[LOSS_HISTORY];
    int nhist;
    double *ms_by_step; /* step time of the kept run of each step (goodput) */
    int64_t ms_cap;
    double useful_ms;

    recovery *rec;
    int nrec;
    json_t *events; /* recent events (array) */

    uint64_t drops[SY_DROP__COUNT];
    int64_t drop_logged[SY_DROP__COUNT];
    int64_t last_publish;
    bool dirty, done;
    sy_coord_outcome outcome;
};


/* A JSON number, or null when not finite (jansson refuses NaN and inf). */
static inline json_t *jnum(double v) { return isfinite(v) ? json_real(v) : json_null(); }

/* The /v1/status snapshot (a new reference) and the /metrics text (malloc'ed), from c's state. */
json_t *sy_coord_status_json(sy_coord_t *c);
char *sy_coord_metrics_text(sy_coord_t *c);

#endif
