/* sy_loadgen: many simulated workers in one process, speaking docs/protocol.md to the real
 * switchyard-coordinator (issue 14: the control plane measured at scale; docs/scale.md).
 *
 *   sy_loadgen --coordinator EP --workers N [--step-ms MS] [--tokens T] [--counts owned|full|none] [--peers edit|whole] [--table-frame on|off]
 *              [--event T:kill|stop|add:K ...] [--duration S] [--report FILE] [--io-threads K]
 *              [--ckpt-threads K] [--prefix ID]
 *   sy_loadgen --placement E W     (times sy_placement_sticky: first placement, then one loss)
 *
 * Each simulated worker is one ZeroMQ DEALER (routing id "ID/NONCE", like switchyard-worker)
 * in one context (ZMQ_MAX_SOCKETS and RLIMIT_NOFILE raised), driven by one epoll loop over the
 * sockets' ZMQ_FDs: Hello until Welcome (run id learnt from it, session echoed on every later
 * message), a Heartbeat every heartbeat_ms (from Welcome), re-Hello after 3 s without a word
 * from the coordinator; on Assign it "trains" start..end, one step every --step-ms, and sends
 * StepDone with plausible values (per-rank loss shares, --tokens tokens, per-layer per-expert
 * counts that sum to the tokens: by default, as an expert-parallel worker, the counts of the
 * experts its rank owns (StepDone.counts_owned; the coordinator's sum is then the pattern itself,
 * written to the report as counts_pattern), or the full n_switch x E array a single process
 * sends (--counts full; the sum is N times the pattern), or none (--counts none)); at checkpoint steps (checkpoint.every, the last step, a CheckpointNow step)
 * it writes tiny real files with sy_ckpt_write_part_tagged into the run's store (rank 0: dense +
 * dense.optim; every rank: its experts' two files) on a writer thread, then sends
 * CheckpointPart (a checkpoint step waits for the previous upload: checkpoint.on_busy wait). Abort stops the steps
 * and is answered with an empty Holdings (a simulated worker holds no state: docs/fault-tolerance.md
 * "Peer replicas"); Stop ends the simulated worker.
 * Peer tables (docs/protocol.md "Peer tables"): heartbeats report the table held, so Assigns after
 * the first may be edits, resolved against a table per generation shared by the simulated
 * workers and cross-checked; --peers whole reports none (every Assign whole: the old protocol).
 *
 * Events (seconds after the first generation reached all its members): kill:K closes K member
 * sockets (from the middle rank on, expert owners first; a dead process: the coordinator sees the TCP close), stop:K makes K members silent
 * (a hung process: found by failure_timeout_ms), add:K starts K new workers.
 *
 * The report (JSON, to --report or stdout) holds what the coordinator's behaviour looks like
 * from the workers' side: when every worker was welcomed, each generation (world, when its
 * Assign reached the first and the last member, Assign sizes, placement balance, experts moved
 * against the previous generation and how many of those the lost workers held), the events,
 * message sizes by kind, and the wall time (CLOCK_REALTIME) of the last StepDone sent for each
 * (generation, step), to compare with metrics.jsonl's "time" (step aggregation latency).
 * Exit: 0 when every event happened and at least one generation reached all its members, 1
 * otherwise, 2 on bad usage. */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "base/config.h"
#include "proto/peers.h"
#include "proto/placement.h"
#include "proto/protocol.h"
#include "storage/ckpt.h"
#include "storage/store.h"

#define MAX_EVENTS 16
#define MAX_GENS 64
#define RELOGIN_MS 3000
#define TICK_MS 5

enum { S_OFF = 0, S_UP, S_KILLED, S_SILENT, S_STOPPED };

typedef struct {
    char id[48];
    void *sock;
    int state;
    bool welcomed;
    uint8_t session[64];
    size_t session_len;
    uint64_t inc;
    int64_t last_hb, last_hello, last_heard, welcomed_at;
    bool active, writing;
    uint64_t gen;
    int rank, world;
    int64_t cur, end, forced, next_step;
    uint64_t peers_gen, peers_inc; /* the peer table it holds (genrec's), 0: none */
} sim;

typedef struct {
    uint64_t gen;
    int world, received;
    int64_t first_ms, last_ms, restore_step;
    size_t assign_min, assign_max;
    double assign_total;
    uint32_t *placement; /* [E], from the first Assign of the generation */
    int *member;         /* [world]: sim index by rank */
    int lost_before;     /* sims killed/stopped since the previous generation */
    /* The generation's peer table (docs/protocol.md "Peer tables"), shared by this process's
     * members: the first whole table or edit received builds it, every later Assign is checked
     * against it. edited: Assigns that came as an edit; unresolved: edits of a table the
     * simulated worker did not hold, or that did not fit; mismatched: Assigns whose table
     * differs from the one built first. */
    bool tab_ok;
    char **ep, **key;
    uint32_t *edit;
    size_t n_edit;
    int edited, unresolved, mismatched, framed; /* framed: Assigns whose table came as a second frame */
} genrec;

typedef struct {
    double t;
    char kind[8];
    int k;
    bool done;
    int64_t at_ms;
    json_t *ids;
} event;

typedef struct job {
    int sim;
    uint64_t gen;
    int64_t step;
    int rank;
    json_t *files; /* result */
    char err[256];
    struct job *next;
} job;

/* ---- options and global state ---------------------------------------------------------- */
static const char *ep, *report_path, *prefix = "lg";
static int n_initial = 10, step_ms = 500, tokens = 4096, io_threads = 1, ckpt_threads = 4;
enum { COUNTS_NONE, COUNTS_FULL, COUNTS_OWNED };
static int counts_mode = COUNTS_OWNED;
static double duration_s = 30;
static int table_frame = 1; /* 0 (--table-frame off): whole peer tables inside the Assign, as older workers */
static int peers_edit = 1; /* 0 (--peers whole): heartbeats say no table held, as a worker that
                            * predates peer table edits: every Assign comes whole */
static event events[MAX_EVENTS];
static int n_events;

static void *ctx;
static sim *sims;
static int nsims, capsims;
static int epfd, evfd;
static char run_id[128];
static int hb_ms = 500;
static int64_t t0, all_in_ms = -1, first_complete_ms = -1;

/* the run config, from the first Assign's config_json */
static sy_config_t cfg;
static bool have_cfg;
static int E, n_switch;
static int64_t every;
static uint32_t *counts_pattern; /* [n_switch * E]: sums to `tokens` per layer */

static genrec gens[MAX_GENS];
static int ngens;
static int lost_since_gen;

/* bytes by message kind: count, total, max */
enum { K_HELLO, K_HB, K_STEP, K_PART, K_WELCOME, K_ASSIGN, K_OTHER_IN, K_OTHER_OUT, K__N };
static const char *kname[K__N] = {"hello", "heartbeat", "step_done", "checkpoint_part", "welcome", "assign", "other_in", "holdings"};
static struct { uint64_t n; double total; size_t max; } bytes[K__N];

static json_t *last_report; /* "gen:step" -> wall seconds of the last StepDone sent */
static int64_t parts_sent, objects_written, ckpt_errors, stops;

static pthread_mutex_t jq_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t jq_cv = PTHREAD_COND_INITIALIZER;
static job *jq_head, *jq_tail, *done_head;
static bool jq_quit;
static pthread_t writers[32];
static int n_writers;

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
static double wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}
static void count_bytes(int k, size_t n) {
    bytes[k].n++;
    bytes[k].total += (double)n;
    if (n > bytes[k].max) bytes[k].max = n;
}

/* ---- sending ----------------------------------------------------------------------------- */

static void drain(int i);
static void unwatch(int i);

static void send_env(int i, Sy__Envelope *env, int kind) {
    sim *s = &sims[i];
    env->session.data = s->session;
    env->session.len = s->session_len;
    void *buf;
    size_t len;
    if (sy_proto_pack(env, &buf, &len) != SY_OK) return;
    if (zmq_send(s->sock, buf, len, ZMQ_DONTWAIT) >= 0) count_bytes(kind, len);
    free(buf);
    /* a send may consume the ZMQ_FD edge: look for input now */
    int ev = 0;
    size_t el = sizeof ev;
    if (zmq_getsockopt(s->sock, ZMQ_EVENTS, &ev, &el) == 0 && (ev & ZMQ_POLLIN)) drain(i);
}

static void send_hello(int i) {
    sim *s = &sims[i];
    Sy__Envelope env;
    Sy__Hello h = SY__HELLO__INIT;
    sy_proto_init(&env, "", s->inc, 0);
    h.worker_id = s->id;
    h.host = "loadgen";
    h.pid = (uint32_t)getpid();
    h.backend = "sim";
    h.version = "loadgen";
    char dep[64];
    snprintf(dep, sizeof dep, "tcp://127.0.0.1:%d", 20000 + i % 40000);
    h.data_endpoint = dep;
    h.last_generation = s->gen;
    h.table_frame = table_frame;
    env.body_case = SY__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    s->last_hello = now_ms();
    send_env(i, &env, K_HELLO);
}

static void send_heartbeat(int i) {
    sim *s = &sims[i];
    Sy__Envelope env;
    Sy__Heartbeat hb = SY__HEARTBEAT__INIT;
    sy_proto_init(&env, run_id, s->inc, s->active ? s->gen : 0);
    hb.step = (uint64_t)(s->active && s->cur > 1 ? s->cur - 1 : 0);
    hb.state = s->active ? "training" : "idle";
    hb.peers_held = peers_edit && s->peers_inc == s->inc ? s->peers_gen : 0;
    env.body_case = SY__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    s->last_hb = now_ms();
    send_env(i, &env, K_HB);
}

static genrec *gen_find(uint64_t g);

static void send_step_done(int i) {
    sim *s = &sims[i];
    double share = 2.0 * (s->rank + 1) / ((double)s->world * (s->world + 1));
    Sy__Envelope env;
    Sy__StepDone sd = SY__STEP_DONE__INIT;
    sy_proto_init(&env, run_id, s->inc, s->gen);
    sd.step = (uint64_t)s->cur;
    sd.ce = share * (2.0 + 3.0 / (double)s->cur);
    sd.aux = share * 0.01;
    sd.z = share * 0.001;
    sd.tokens = (uint64_t)tokens;
    sd.routed = (uint64_t)tokens * (uint64_t)(n_switch > 0 ? n_switch : 1);
    sd.dropped = sd.routed / 50;
    sd.step_ms = step_ms;
    sd.grad_norm = 1.0 + 1.0 / (double)s->cur;
    sd.lr = 1e-3;
    sd.micro_batches = 1;
    Sy__LayerCounts lcs[n_switch > 0 ? n_switch : 1], *lp[n_switch > 0 ? n_switch : 1];
    uint32_t *owned_vals = NULL;
    if (counts_mode == COUNTS_FULL && counts_pattern) {
        for (int l = 0; l < n_switch; l++) {
            sy__layer_counts__init(&lcs[l]);
            lcs[l].n_counts = (size_t)E;
            lcs[l].counts = counts_pattern + (size_t)l * E;
            lp[l] = &lcs[l];
        }
        sd.n_expert_counts = (size_t)n_switch;
        sd.expert_counts = lp;
    }
    const genrec *g = counts_mode == COUNTS_OWNED ? gen_find(s->gen) : NULL;
    if (g && g->placement && counts_pattern && (owned_vals = malloc(sizeof(uint32_t) * (size_t)(n_switch * E + 1)))) {
        /* as an expert-parallel worker: the whole step's counts of the experts this rank owns
         * (ascending), the pattern's, so that the coordinator's sum is the pattern itself */
        int nm = 0;
        for (int e = 0; e < E; e++)
            if ((int)g->placement[e] == s->rank) nm++;
        for (int l = 0; l < n_switch; l++) {
            uint32_t *v = owned_vals + (size_t)l * nm;
            int k = 0;
            for (int e = 0; e < E; e++)
                if ((int)g->placement[e] == s->rank) v[k++] = counts_pattern[(size_t)l * E + e];
            sy__layer_counts__init(&lcs[l]);
            lcs[l].n_counts = (size_t)nm;
            lcs[l].counts = v;
            lp[l] = &lcs[l];
        }
        sd.n_expert_counts = (size_t)n_switch;
        sd.expert_counts = lp;
        sd.counts_owned = true;
    }
    env.body_case = SY__ENVELOPE__BODY_STEP_DONE;
    env.step_done = &sd;
    send_env(i, &env, K_STEP);
    free(owned_vals);
    char key[48];
    snprintf(key, sizeof key, "%" PRIu64 ":%" PRId64, s->gen, s->cur);
    json_t *prev = json_object_get(last_report, key);
    double w = wall_s();
    if (!prev || json_real_value(prev) < w) json_object_set_new(last_report, key, json_real(w));
}

static void send_part(int i, const job *j) {
    size_t nf = json_array_size(j->files);
    Sy__ObjectInfo *objs = calloc(nf + 1, sizeof *objs);
    Sy__ObjectInfo **op = calloc(nf + 1, sizeof *op);
    for (size_t k = 0; k < nf && objs && op; k++) {
        json_t *f = json_array_get(j->files, k);
        sy__object_info__init(&objs[k]);
        objs[k].name = (char *)json_string_value(json_object_get(f, "name"));
        objs[k].size = (uint64_t)json_integer_value(json_object_get(f, "size"));
        objs[k].sha256 = (char *)json_string_value(json_object_get(f, "sha256"));
        objs[k].object = (char *)json_string_value(json_object_get(f, "object"));
        op[k] = &objs[k];
    }
    Sy__Envelope env;
    Sy__CheckpointPart cp = SY__CHECKPOINT_PART__INIT;
    sy_proto_init(&env, run_id, sims[i].inc, j->gen);
    cp.step = (uint64_t)j->step;
    cp.n_objects = objs && op ? nf : 0;
    cp.objects = op;
    env.body_case = SY__ENVELOPE__BODY_CHECKPOINT_PART;
    env.checkpoint_part = &cp;
    send_env(i, &env, K_PART);
    parts_sent++;
    free(objs);
    free(op);
}

/* ---- checkpoint writer threads ------------------------------------------------------------ */

static genrec *gen_find(uint64_t g) {
    for (int k = 0; k < ngens; k++)
        if (gens[k].gen == g) return &gens[k];
    return NULL;
}

static void *writer_main(void *arg) {
    (void)arg;
    sy_store_t *st = NULL;
    if (sy_store_open_config(&cfg, &st) != SY_OK) fprintf(stderr, "loadgen: store: %s\n", sy_err_msg());
    for (;;) {
        pthread_mutex_lock(&jq_mu);
        while (!jq_head && !jq_quit) pthread_cond_wait(&jq_cv, &jq_mu);
        job *j = jq_head;
        if (!j || jq_quit) { /* quitting: pending uploads are dropped */
            pthread_mutex_unlock(&jq_mu);
            break;
        }
        jq_head = j->next;
        if (!jq_head) jq_tail = NULL;
        genrec *g = gen_find(j->gen); /* written by the main thread before the job was queued */
        pthread_mutex_unlock(&jq_mu);
        int ng = 0, cap = 2 + 2 * E;
        char(*names)[40] = calloc((size_t)cap, 40);
        float(*vals)[2] = calloc((size_t)cap, sizeof *vals);
        sy_tensor_ref *refs = calloc((size_t)cap, sizeof *refs);
        sy_ckpt_group *groups = calloc((size_t)cap, sizeof *groups);
        for (int e = -1; names && vals && refs && groups && g && e < E; e++) {
            if (e < 0 ? j->rank != 0 : (int)g->placement[e] != j->rank) continue;
            for (int optim = 0; optim < 2; optim++) {
                if (e < 0) sy_ckpt_file_dense(names[ng], 40, optim);
                else sy_ckpt_file_expert(names[ng], 40, e, optim);
                vals[ng][0] = (float)j->step;
                vals[ng][1] = (float)e;
                refs[ng] = (sy_tensor_ref){.name = "x", .ndim = 1, .shape = {2}, .data = vals[ng]};
                groups[ng] = (sy_ckpt_group){names[ng], &refs[ng], 1};
                ng++;
            }
        }
        char tag[64]; /* objects are "g<generation>-r<rank>.<file>" (stale writers are fenced off) */
        if (!st || sy_ckpt_part_tag(tag, sizeof tag, j->gen, j->rank) != SY_OK ||
            sy_ckpt_write_part_tagged(st, run_id, j->step, tag, groups, ng, &j->files) != SY_OK)
            snprintf(j->err, sizeof j->err, "%s", st ? sy_err_msg() : "no store");
        free(names), free(vals), free(refs), free(groups);
        pthread_mutex_lock(&jq_mu);
        j->next = done_head;
        done_head = j;
        pthread_mutex_unlock(&jq_mu);
        uint64_t one = 1;
        if (write(evfd, &one, sizeof one) < 0) perror("loadgen: eventfd");
    }
    sy_store_destroy(&st);
    return NULL;
}

static void queue_part(int i) {
    sim *s = &sims[i];
    job *j = calloc(1, sizeof *j);
    if (!j) return;
    *j = (job){.sim = i, .gen = s->gen, .step = s->cur, .rank = s->rank};
    s->writing = true;
    pthread_mutex_lock(&jq_mu);
    if (jq_tail) jq_tail->next = j;
    else jq_head = j;
    jq_tail = j;
    pthread_cond_signal(&jq_cv);
    pthread_mutex_unlock(&jq_mu);
}

static void collect_parts(void) {
    uint64_t v;
    if (read(evfd, &v, sizeof v) < 0 && errno != EAGAIN) perror("loadgen: eventfd");
    pthread_mutex_lock(&jq_mu);
    job *j = done_head;
    done_head = NULL;
    pthread_mutex_unlock(&jq_mu);
    while (j) {
        job *nx = j->next;
        sim *s = &sims[j->sim];
        s->writing = false;
        if (j->err[0]) {
            ckpt_errors++;
            fprintf(stderr, "loadgen %s: checkpoint %" PRId64 ": %s\n", s->id, j->step, j->err);
        } else {
            objects_written += (int64_t)json_array_size(j->files);
            if (s->state == S_UP && s->active && s->gen == j->gen) send_part(j->sim, j);
        }
        json_decref(j->files);
        free(j);
        j = nx;
    }
}

/* ---- receiving ---------------------------------------------------------------------------- */

static int count_switch_layers(const sy_config_t *c) {
    int n = 0, S = c->model.switch_every;
    for (int l = 0; l < c->model.n_layers; l++)
        if (S > 0 && c->model.n_experts >= 1 && l % S == S - 1) n++;
    return n;
}

/* The run config (first Assign): experts, layers, checkpoint cadence, the store; writer threads. */
static int take_config(const char *json) {
    if (have_cfg) return 0;
    sy_config_defaults(&cfg);
    json_t *j = json_loads(json ? json : "", 0, NULL);
    if (!j || sy_config_from_json(&cfg, j) != SY_OK) {
        fprintf(stderr, "loadgen: bad config_json in Assign: %s\n", sy_err_msg());
        json_decref(j);
        return -1;
    }
    json_decref(j);
    have_cfg = true;
    E = cfg.model.n_experts;
    n_switch = count_switch_layers(&cfg);
    every = cfg.checkpoint.every;
    /* plausible routing: a skewed spread of `tokens` over the experts (Zipf-like weights) */
    counts_pattern = calloc((size_t)(n_switch > 0 ? n_switch : 1) * (size_t)E, sizeof(uint32_t));
    for (int l = 0; l < n_switch && counts_pattern; l++) {
        double wsum = 0;
        for (int e = 0; e < E; e++) wsum += 1.0 / (1.0 + (double)((e * 7 + l) % E) / 8.0);
        int left = tokens;
        for (int e = 0; e < E; e++) {
            int c = (int)((double)tokens * (1.0 / (1.0 + (double)((e * 7 + l) % E) / 8.0)) / wsum);
            if (c > left) c = left;
            counts_pattern[(size_t)l * E + e] = (uint32_t)c;
            left -= c;
        }
        counts_pattern[(size_t)l * E] += (uint32_t)left;
    }
    for (int k = 0; k < ckpt_threads && k < 32; k++)
        if (pthread_create(&writers[n_writers], NULL, writer_main, NULL) == 0) n_writers++;
    return 0;
}

static bool same_table(int n, char **ep, char **key, char **ep2, char **key2) {
    for (int r = 0; r < n; r++)
        if (strcmp(ep[r], ep2[r]) || (!key) != (!key2) || (key && strcmp(key[r], key2[r]))) return false;
    return true;
}

/* Resolves an Assign's peer table (whole, or an edit of the base the simulated worker holds)
 * into g's shared table, or checks it against that table (docs/protocol.md "Peer tables"). */
static void take_peers(sim *s, genrec *g, const Sy__Envelope *env) {
    const Sy__Assign *as = env->assign;
    char **ep = NULL, **key = NULL;
    const char *const *pk = as->n_peer_keys ? (const char *const *)as->peer_keys : NULL;
    uint64_t held = s->peers_inc == env->incarnation ? s->peers_gen : 0;
    s->peers_gen = 0;
    s->peers_inc = env->incarnation;
    if (as->peers_base) {
        g->edited++;
        genrec *b = gen_find(as->peers_base);
        if (held != as->peers_base || !b || !b->tab_ok) {
            g->unresolved++;
            return;
        }
        if (g->tab_ok && g->n_edit == as->n_peers_edit &&
            !memcmp(g->edit, as->peers_edit, sizeof(uint32_t) * as->n_peers_edit)) {
            s->peers_gen = env->generation; /* the same edit as the one that built the table */
            return;
        }
        if (sy_peers_apply(b->world, (const char *const *)b->ep, (const char *const *)b->key, as->peers_edit,
                           as->n_peers_edit, (const char *const *)as->peers, pk, as->n_peers, (int)as->world, &ep,
                           &key) != SY_OK) {
            g->unresolved++;
            return;
        }
    } else if (sy_peers_copy((int)as->n_peers, (const char *const *)as->peers, pk, &ep, &key) != SY_OK) {
        g->unresolved++;
        return;
    }
    if (!g->tab_ok) {
        g->ep = ep;
        g->key = key;
        g->tab_ok = true;
        if (as->peers_base && (g->edit = malloc(sizeof(uint32_t) * (as->n_peers_edit + 1)))) {
            memcpy(g->edit, as->peers_edit, sizeof(uint32_t) * as->n_peers_edit);
            g->n_edit = as->n_peers_edit;
        }
    } else {
        if (!same_table(g->world, g->ep, g->key, ep, key)) g->mismatched++;
        sy_peers_free(g->world, ep, key);
    }
    s->peers_gen = env->generation;
}

static void take_assign(int i, const Sy__Envelope *env, size_t len) {
    sim *s = &sims[i];
    const Sy__Assign *as = env->assign;
    if (take_config(as->config_json) != 0) return;
    int64_t t = now_ms();
    pthread_mutex_lock(&jq_mu); /* the writer threads read gens[] */
    genrec *g = gen_find(env->generation);
    if (!g && ngens < MAX_GENS) {
        g = &gens[ngens++];
        memset(g, 0, sizeof *g);
        g->gen = env->generation;
        g->world = (int)as->world;
        g->first_ms = t - t0;
        g->restore_step = as->restore_step;
        g->assign_min = (size_t)-1;
        g->placement = calloc((size_t)E, sizeof(uint32_t));
        g->member = calloc((size_t)as->world, sizeof(int));
        for (int r = 0; g->member && r < g->world; r++) g->member[r] = -1;
        for (size_t e = 0; g->placement && e < as->n_placement && (int)e < E; e++) g->placement[e] = as->placement[e];
        g->lost_before = lost_since_gen;
        lost_since_gen = 0;
    }
    pthread_mutex_unlock(&jq_mu);
    if (g) {
        g->received++;
        g->last_ms = t - t0;
        if (len < g->assign_min) g->assign_min = len;
        if (len > g->assign_max) g->assign_max = len;
        g->assign_total += (double)len;
        if (g->member && as->rank < (uint32_t)g->world) g->member[as->rank] = i;
        take_peers(s, g, env);
        /* complete: every member has it, or (the members are shared with other load generator
         * processes) every worker of this process that is up */
        int up = 0;
        for (int k = 0; k < nsims; k++) up += sims[k].state == S_UP;
        if ((g->received == g->world || g->received == up) && first_complete_ms < 0) first_complete_ms = t - t0;
    }
    s->active = true;
    s->gen = env->generation;
    s->rank = (int)as->rank;
    s->world = (int)as->world;
    s->cur = (int64_t)as->start_step;
    s->end = (int64_t)as->end_step;
    s->forced = -1;
    s->next_step = t + step_ms;
}

static void on_env(int i, Sy__Envelope *env, size_t len, int frames) {
    sim *s = &sims[i];
    if (env->body_case == SY__ENVELOPE__BODY_WELCOME) {
        count_bytes(K_WELCOME, len);
        const Sy__Welcome *wl = env->welcome;
        if (s->welcomed && env->incarnation != s->inc) s->active = false; /* a new coordinator */
        if (wl->reregister) {
            s->welcomed = false;
            s->last_hello = 0;
            return;
        }
        if (!run_id[0]) snprintf(run_id, sizeof run_id, "%s", env->run_id);
        s->inc = env->incarnation;
        if (wl->session.len <= sizeof s->session) {
            memcpy(s->session, wl->session.data, wl->session.len);
            s->session_len = wl->session.len;
        }
        if (wl->heartbeat_ms) hb_ms = (int)wl->heartbeat_ms;
        s->last_heard = now_ms();
        if (!s->welcomed) s->welcomed_at = s->last_heard - t0;
        s->welcomed = true;
        return;
    }
    if (!s->welcomed || env->incarnation != s->inc) return;
    s->last_heard = now_ms();
    switch (env->body_case) {
    case SY__ENVELOPE__BODY_ASSIGN:
        count_bytes(K_ASSIGN, len);
        take_assign(i, env, len);
        if (frames == 2) {
            genrec *g = gen_find(env->generation);
            if (g) g->framed++;
        }
        break;
    case SY__ENVELOPE__BODY_ABORT:
        count_bytes(K_OTHER_IN, len);
        if (env->generation >= s->gen && s->active) {
            s->active = false;
            /* like a worker leaving an aborted generation: its Holdings (a simulated worker holds
             * no state), so the coordinator need not wait for them before the next generation */
            Sy__Envelope he;
            Sy__Holdings ho = SY__HOLDINGS__INIT;
            sy_proto_init(&he, run_id, s->inc, s->gen);
            he.body_case = SY__ENVELOPE__BODY_HOLDINGS;
            he.holdings = &ho;
            send_env(i, &he, K_OTHER_OUT);
        }
        break;
    case SY__ENVELOPE__BODY_CHECKPOINT_NOW:
        count_bytes(K_OTHER_IN, len);
        if (s->active && env->generation == s->gen && (int64_t)env->checkpoint_now->step >= s->cur)
            s->forced = (int64_t)env->checkpoint_now->step;
        break;
    case SY__ENVELOPE__BODY_STOP:
        count_bytes(K_OTHER_IN, len);
        s->state = S_STOPPED;
        s->active = false;
        stops++;
        unwatch(i);
        break;
    default:
        count_bytes(K_OTHER_IN, len);
        break;
    }
}

static void drain(int i) {
    sim *s = &sims[i];
    while (s->state == S_UP) {
        Sy__Envelope *env = NULL;
        sy_proto_drop why;
        size_t len = 0;
        int frames = 1;
        if (!sy_proto_recv(s->sock, ZMQ_DONTWAIT, &env, &why, &len, &frames)) return;
        if (why == SY_DROP_NONE) on_env(i, env, len, frames);
        else fprintf(stderr, "loadgen %s: undecodable message: %s\n", s->id, sy_err_msg());
        sy_proto_free(env);
    }
}

/* ---- simulated workers -------------------------------------------------------------------- */

static int add_sim(void) {
    if (nsims == capsims) {
        int nc = capsims ? 2 * capsims : 1024;
        sim *n = realloc(sims, sizeof(sim) * (size_t)nc);
        if (!n) return -1;
        sims = n;
        capsims = nc;
    }
    int i = nsims;
    sim *s = &sims[i];
    memset(s, 0, sizeof *s);
    snprintf(s->id, sizeof s->id, "%s-%05d", prefix, i);
    s->sock = zmq_socket(ctx, ZMQ_DEALER);
    if (!s->sock) {
        fprintf(stderr, "loadgen: socket %d: %s (raise ZMQ_MAX_SOCKETS / ulimit -n)\n", i, zmq_strerror(errno));
        return -1;
    }
    uint64_t nonce = 0;
    if (getrandom(&nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce) nonce = (uint64_t)now_ms() * 2654435761u + (uint64_t)i;
    char rid[80];
    int rl = snprintf(rid, sizeof rid, "%s/%016" PRIx64, s->id, nonce);
    int linger = 0;
    zmq_setsockopt(s->sock, ZMQ_ROUTING_ID, rid, (size_t)rl);
    zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(s->sock, ep) != 0) {
        fprintf(stderr, "loadgen: connect %s: %s\n", ep, zmq_strerror(errno));
        zmq_close(s->sock);
        return -1;
    }
    int fd;
    size_t fl = sizeof fd;
    zmq_getsockopt(s->sock, ZMQ_FD, &fd, &fl);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) perror("loadgen: epoll_ctl");
    s->state = S_UP;
    s->rank = -1;
    nsims++;
    send_hello(i);
    return i;
}

/* Up to k members of the newest generation held by this process, from the middle rank on. */
/* A simulated worker that no longer reads: its ZMQ_FD leaves the epoll set (it would stay
 * readable, and the loop would spin). */
static void unwatch(int i) {
    int fd;
    size_t fl = sizeof fd;
    if (sims[i].sock && zmq_getsockopt(sims[i].sock, ZMQ_FD, &fd, &fl) == 0) epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
}

/* K members to kill or stop, from the middle rank on, wrapping; members that hold experts first
 * (with more workers than experts most hold none, and a loss should move something). */
static int pick_members(int k, int *out) {
    int n = 0;
    genrec *g = ngens ? &gens[ngens - 1] : NULL;
    for (int pass = 0; pass < 2; pass++) {
        for (int q = 0; g && g->member && n < k && q < g->world; q++) {
            int r = (g->world / 2 + q) % g->world;
            int i = g->member[r];
            if (i < 0 || sims[i].state != S_UP || !sims[i].active || sims[i].gen != g->gen) continue;
            bool owner = false;
            for (int e = 0; g->placement && e < E && !owner; e++) owner = (int)g->placement[e] == r;
            bool taken = false;
            for (int t = 0; t < n && !taken; t++) taken = out[t] == i;
            if ((pass == 0) == owner && !taken) out[n++] = i;
        }
    }
    return n;
}

static void fire(event *ev) {
    int64_t t = now_ms();
    ev->done = true;
    ev->at_ms = t - t0;
    ev->ids = json_array();
    if (!strcmp(ev->kind, "add")) {
        for (int k = 0; k < ev->k; k++) {
            int i = add_sim();
            if (i >= 0) json_array_append_new(ev->ids, json_string(sims[i].id));
        }
        return;
    }
    static int pick[1024];
    int n = pick_members(ev->k < 1024 ? ev->k : 1024, pick);
    for (int k = 0; k < n; k++) {
        sim *s = &sims[pick[k]];
        json_array_append_new(ev->ids, json_string(s->id));
        lost_since_gen++;
        unwatch(pick[k]);
        if (!strcmp(ev->kind, "kill")) {
            s->state = S_KILLED;
            zmq_close(s->sock); /* linger 0: the TCP connection closes now, as when a process dies */
            s->sock = NULL;
        } else {
            s->state = S_SILENT; /* keeps its connection, never speaks or reads again */
        }
    }
    fprintf(stderr, "loadgen: t=%.1fs %s %d worker(s)\n", (t - t0) / 1e3, ev->kind, n);
}

static void tick(void) {
    int64_t t = now_ms();
    for (int i = 0; i < nsims; i++) {
        sim *s = &sims[i];
        if (s->state != S_UP) continue;
        if (!s->welcomed) {
            if (t - s->last_hello >= hb_ms) send_hello(i);
            continue;
        }
        if (s->state == S_UP && t - s->last_heard > RELOGIN_MS && t - s->last_hello > RELOGIN_MS) send_hello(i);
        if (s->state == S_UP && t - s->last_hb >= hb_ms) send_heartbeat(i);
        bool ckpt = (every > 0 && s->cur % every == 0) || s->cur == s->end || s->cur == s->forced;
        /* checkpoint.on_busy wait: a checkpoint step waits for the previous upload */
        if (s->state == S_UP && s->active && s->cur <= s->end && t >= s->next_step && !(ckpt && s->writing)) {
            send_step_done(i);
            if (ckpt) queue_part(i);
            s->cur++;
            s->next_step += step_ms;
            if (s->next_step < t) s->next_step = t + step_ms;
        }
    }
}

/* ---- report ------------------------------------------------------------------------------- */

static json_t *gen_json(int k) {
    genrec *g = &gens[k];
    json_t *j = json_pack("{s:I, s:i, s:i, s:I, s:I, s:I, s:I, s:I, s:f, s:i}", "generation", (json_int_t)g->gen,
                          "world", g->world, "received", g->received, "first_assign_ms", (json_int_t)g->first_ms,
                          "last_assign_ms", (json_int_t)g->last_ms, "restore_step", (json_int_t)g->restore_step,
                          "assign_bytes_min", (json_int_t)(g->received ? g->assign_min : 0), "assign_bytes_max",
                          (json_int_t)g->assign_max, "assign_bytes_total", g->assign_total, "lost_before",
                          g->lost_before);
    json_object_set_new(j, "assign_edited", json_integer(g->edited));
    json_object_set_new(j, "assign_framed", json_integer(g->framed));
    json_object_set_new(j, "peers_unresolved", json_integer(g->unresolved));
    json_object_set_new(j, "peers_mismatched", json_integer(g->mismatched));
    json_t *mem = json_array(), *pl = json_array();
    for (int r = 0; g->member && r < g->world; r++)
        if (g->member[r] >= 0) json_array_append_new(mem, json_pack("[i, s]", r, sims[g->member[r]].id));
    for (int e = 0; g->placement && e < E; e++) json_array_append_new(pl, json_integer(g->placement[e]));
    json_object_set_new(j, "members", mem); /* [rank, id] of this process's members */
    json_object_set_new(j, "placement", pl);
    if (!g->placement || E < 1) return j;
    int *per = calloc((size_t)g->world, sizeof(int));
    for (int e = 0; per && e < E; e++)
        if (g->placement[e] < (uint32_t)g->world) per[g->placement[e]]++;
    int mx = 0, mn = E;
    for (int r = 0; per && r < g->world; r++) {
        if (per[r] > mx) mx = per[r];
        if (per[r] < mn) mn = per[r];
    }
    free(per);
    json_object_set_new(j, "experts_per_rank_max", json_integer(mx));
    json_object_set_new(j, "experts_per_rank_min", json_integer(mn));
    if (k == 0 || !gens[k - 1].placement || !gens[k - 1].member || !g->member) return j;
    /* experts whose owner (a simulated worker, by identity) changed; and those whose previous
     * owner is no member any more (they must move: the ideal moves only these) */
    genrec *p = &gens[k - 1];
    int moved = 0, orphaned = 0;
    for (int e = 0; e < E; e++) {
        int was = p->placement[e] < (uint32_t)p->world ? p->member[p->placement[e]] : -1;
        int now = g->placement[e] < (uint32_t)g->world ? g->member[g->placement[e]] : -1;
        bool still = false;
        for (int r = 0; r < g->world && was >= 0; r++) still = still || g->member[r] == was;
        if (!still) orphaned++;
        if (was != now) moved++;
    }
    json_object_set_new(j, "experts_moved", json_integer(moved));
    json_object_set_new(j, "experts_of_departed", json_integer(orphaned));
    return j;
}

static int write_report(void) {
    json_t *r = json_object();
    int welcomed = 0, up = 0;
    int64_t last_welcome = 0;
    for (int i = 0; i < nsims; i++) {
        welcomed += sims[i].welcomed;
        up += sims[i].state == S_UP;
        if (sims[i].welcomed && sims[i].welcomed_at > last_welcome) last_welcome = sims[i].welcomed_at;
    }
    json_object_set_new(r, "workers_started", json_integer(nsims));
    json_object_set_new(r, "workers_welcomed", json_integer(welcomed));
    json_t *cp = json_array();
    for (int l = 0; l < n_switch && counts_pattern; l++) {
        json_t *row = json_array();
        for (int e = 0; e < E; e++) json_array_append_new(row, json_integer(counts_pattern[(size_t)l * E + e]));
        json_array_append_new(cp, row);
    }
    json_object_set_new(r, "counts_pattern", cp);
    json_object_set_new(r, "counts", json_string(counts_mode == COUNTS_OWNED ? "owned" : counts_mode == COUNTS_FULL ? "full" : "none"));
    json_object_set_new(r, "workers_up_at_end", json_integer(up));
    json_object_set_new(r, "all_in_ms", json_integer(all_in_ms));
    json_object_set_new(r, "t0_mono_ms", json_integer(t0)); /* CLOCK_MONOTONIC: the origin of every *_ms */
    json_object_set_new(r, "first_generation_complete_ms", json_integer(first_complete_ms));
    json_object_set_new(r, "run", json_string(run_id));
    json_object_set_new(r, "experts", json_integer(E));
    json_object_set_new(r, "switch_layers", json_integer(n_switch));
    json_t *ga = json_array();
    for (int k = 0; k < ngens; k++) json_array_append_new(ga, gen_json(k));
    json_object_set_new(r, "generations", ga);
    json_t *ea = json_array();
    for (int k = 0; k < n_events; k++)
        json_array_append_new(ea, json_pack("{s:s, s:i, s:f, s:b, s:I, s:O}", "kind", events[k].kind, "count",
                                            events[k].k, "t", events[k].t, "done", events[k].done, "at_ms",
                                            (json_int_t)events[k].at_ms, "ids",
                                            events[k].ids ? events[k].ids : json_null()));
    json_object_set_new(r, "events", ea);
    json_t *bo = json_object();
    for (int k = 0; k < K__N; k++)
        json_object_set_new(bo, kname[k], json_pack("{s:I, s:f, s:I}", "count", (json_int_t)bytes[k].n, "total",
                                                    bytes[k].total, "max", (json_int_t)bytes[k].max));
    json_object_set_new(r, "bytes", bo);
    json_object_set_new(r, "checkpoint", json_pack("{s:I, s:I, s:I}", "parts_sent", (json_int_t)parts_sent,
                                                   "objects_written", (json_int_t)objects_written, "errors",
                                                   (json_int_t)ckpt_errors));
    json_object_set_new(r, "stops_received", json_integer(stops));
    json_object_set_new(r, "last_report_wall", json_incref(last_report));
    int rc = report_path ? json_dump_file(r, report_path, JSON_INDENT(1)) : json_dumpf(r, stdout, JSON_INDENT(1));
    json_decref(r);
    int ok = first_complete_ms >= 0;
    for (int k = 0; k < n_events; k++) ok = ok && events[k].done;
    return rc == 0 && ok ? 0 : 1;
}

/* ---- placement timing --------------------------------------------------------------------- */

static int placement_bench(int e, int w) {
    uint32_t *a = calloc((size_t)e, sizeof *a), *b = calloc((size_t)e, sizeof *b);
    int *prev = calloc((size_t)e, sizeof *prev);
    if (!a || !b || !prev || w < 2) return 2;
    struct timespec x, y, z;
    clock_gettime(CLOCK_MONOTONIC, &x);
    sy_placement_sticky(e, w, NULL, a);
    clock_gettime(CLOCK_MONOTONIC, &y);
    /* rank w/2 is lost: the others shift down one rank above it */
    for (int k = 0; k < e; k++) {
        int r = (int)a[k];
        prev[k] = r == w / 2 ? -1 : r > w / 2 ? r - 1 : r;
    }
    sy_placement_sticky(e, w - 1, prev, b);
    clock_gettime(CLOCK_MONOTONIC, &z);
    int moved = 0, departed = 0;
    for (int k = 0; k < e; k++) {
        departed += prev[k] < 0;
        moved += prev[k] < 0 || (int)b[k] != prev[k];
    }
    printf("{\"experts\": %d, \"workers\": %d, \"first_ms\": %.3f, \"after_loss_ms\": %.3f, \"moved\": %d, "
           "\"of_departed\": %d}\n",
           e, w, (y.tv_sec - x.tv_sec) * 1e3 + (y.tv_nsec - x.tv_nsec) / 1e6,
           (z.tv_sec - y.tv_sec) * 1e3 + (z.tv_nsec - y.tv_nsec) / 1e6, moved, departed);
    free(a), free(b), free(prev);
    return 0;
}

/* ---- main --------------------------------------------------------------------------------- */

static int usage(void) {
    fprintf(stderr, "usage: sy_loadgen --coordinator EP --workers N [--step-ms MS] [--tokens T] [--counts owned|full|none]\n"
                    "                  [--peers edit|whole] [--table-frame on|off]\n"
                    "                  [--event T:kill|stop|add:K ...] [--duration S] [--report FILE]\n"
                    "                  [--io-threads K] [--ckpt-threads K] [--prefix ID]\n"
                    "       sy_loadgen --placement E W\n");
    return 2;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (v && !strcmp(a, "--placement") && i + 2 < argc) return placement_bench(atoi(v), atoi(argv[i + 2]));
        if (!v) return usage();
        i++;
        if (!strcmp(a, "--coordinator")) ep = v;
        else if (!strcmp(a, "--workers")) n_initial = atoi(v);
        else if (!strcmp(a, "--step-ms")) step_ms = atoi(v);
        else if (!strcmp(a, "--tokens")) tokens = atoi(v);
        else if (!strcmp(a, "--counts")) {
            if (!strcmp(v, "owned")) counts_mode = COUNTS_OWNED;
            else if (!strcmp(v, "full")) counts_mode = COUNTS_FULL;
            else if (!strcmp(v, "none")) counts_mode = COUNTS_NONE;
            else {
                fprintf(stderr, "sy_loadgen: --counts '%s': expected owned, full or none\n", v);
                return 2;
            }
        }
        else if (!strcmp(a, "--peers")) peers_edit = strcmp(v, "whole") != 0;
        else if (!strcmp(a, "--table-frame")) table_frame = strcmp(v, "off") != 0;
        else if (!strcmp(a, "--duration")) duration_s = atof(v);
        else if (!strcmp(a, "--report")) report_path = v;
        else if (!strcmp(a, "--io-threads")) io_threads = atoi(v);
        else if (!strcmp(a, "--ckpt-threads")) ckpt_threads = atoi(v);
        else if (!strcmp(a, "--prefix")) prefix = v;
        else if (!strcmp(a, "--event") && n_events < MAX_EVENTS) {
            event *ev = &events[n_events];
            char kind[16] = "";
            if (sscanf(v, "%lf:%7[a-z]:%d", &ev->t, kind, &ev->k) != 3 ||
                (strcmp(kind, "kill") && strcmp(kind, "stop") && strcmp(kind, "add")) || ev->k < 1) {
                fprintf(stderr, "sy_loadgen: --event '%s': expected SECONDS:kill|stop|add:COUNT\n", v);
                return 2;
            }
            snprintf(ev->kind, sizeof ev->kind, "%s", kind);
            n_events++;
        } else return usage();
    }
    if (!ep || n_initial < 1 || step_ms < 1) return usage();
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    ctx = zmq_ctx_new();
    zmq_ctx_set(ctx, ZMQ_MAX_SOCKETS, n_initial * 2 + 64);
    zmq_ctx_set(ctx, ZMQ_IO_THREADS, io_threads);
    epfd = epoll_create1(0);
    evfd = eventfd(0, EFD_NONBLOCK);
    struct epoll_event ee = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, evfd, &ee);
    last_report = json_object();
    t0 = now_ms();
    for (int k = 0; k < n_initial; k++)
        if (add_sim() < 0) return 1;
    fprintf(stderr, "loadgen: %d workers connecting to %s\n", n_initial, ep);
    int64_t deadline = -1, last_tick = 0;
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(epfd, evs, 256, TICK_MS);
        for (int k = 0; k < n; k++) {
            if (evs[k].data.u32 == UINT32_MAX) collect_parts();
            else if (evs[k].data.u32 < (uint32_t)nsims) drain((int)evs[k].data.u32);
        }
        int64_t t = now_ms();
        if (t - last_tick >= TICK_MS) {
            tick();
            /* a tick reads every socket: with 10,000 workers and an Assign flood it takes seconds,
             * and a stale t here put the end before the events (the kill that never fired) */
            t = now_ms();
            last_tick = t;
        }
        if (all_in_ms < 0) {
            int w = 0;
            for (int i = 0; i < nsims; i++) w += sims[i].welcomed;
            if (w >= n_initial) {
                all_in_ms = t - t0;
                fprintf(stderr, "loadgen: all %d welcomed after %.2f s\n", n_initial, all_in_ms / 1e3);
            }
        }
        if (first_complete_ms >= 0) {
            if (deadline < 0) {
                deadline = t + (int64_t)(duration_s * 1000);
                fprintf(stderr, "loadgen: t=%.1fs generation 1 at all %d of this process's workers (the last at %.1fs); "
                        "events from now on, the end at t=%.1fs\n", (t - t0) / 1e3, nsims, first_complete_ms / 1e3,
                        (deadline - t0) / 1e3);
            }
            for (int k = 0; k < n_events; k++)
                if (!events[k].done && t - t0 >= first_complete_ms + (int64_t)(events[k].t * 1000)) fire(&events[k]);
        }
        int up = 0;
        for (int i = 0; i < nsims; i++) up += sims[i].state == S_UP;
        if ((deadline >= 0 && t >= deadline) || (nsims > 0 && up == 0 && stops > 0)) break;
        if (deadline < 0 && t - t0 > 600000) break; /* never outlive a broken run by much */
    }
    int rc = write_report();
    pthread_mutex_lock(&jq_mu);
    jq_quit = true;
    pthread_cond_broadcast(&jq_cv);
    pthread_mutex_unlock(&jq_mu);
    for (int k = 0; k < n_writers; k++) pthread_join(writers[k], NULL); /* before exit() tears down */
    for (int i = 0; i < nsims; i++)
        if (sims[i].sock) zmq_close(sims[i].sock);
    zmq_ctx_term(ctx);
    return rc;
}
