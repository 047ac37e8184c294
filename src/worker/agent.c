#include "worker/agent.h"
#include "base/clock.h"
#include "base/bgsched.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/random.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "backend/backend.h"
#include "storage/ckpt.h"
#include "comm/comm.h"
#include "base/config.h"
#include "backend/cpu_setup.h"
#include "proto/curve.h"
#include "data/data.h"
#include "worker/dist_step.h"
#include "base/log.h"
#include "base/zmq_check.h"
#include "model/memplan.h"
#include "model/model.h"
#include "model/model_ckpt.h"
#include "model/optim.h"
#include "proto/peers.h"
#include "proto/protocol.h"
#include "storage/store.h"
#include "storage/store_s3.h"
#include "model/switch_ep.h"
#include "worker/replica.h"

#define SY_AGENT_VERSION "0.1.0"
#define SY_AGENT_DEFAULT_HB_MS 500
/* Issue 13 (c): a worker stops stepping when the coordinator, which sends a keepalive every
 * heartbeat_ms (at most failure_timeout_ms / 3), has been silent for this many heartbeats (at most
 * failure_timeout_ms); it checks again every SY_AGENT_PAUSE_POLL_MS. */
#define SY_AGENT_PAUSE_HEARTBEATS 3
#define SY_AGENT_PAUSE_POLL_MS 50
#define SY_AGENT_DEFAULT_COORD_TIMEOUT_MS 6000
/* While not registered: a "still trying" line after this long, then at doubling intervals up
 * to LINK_WAIT_LOG_MAX_MS apart. */
#define LINK_WAIT_LOG_FIRST_MS 2000.0
#define LINK_WAIT_LOG_MAX_MS 60000.0
/* After SIGTERM/SIGINT the process ends within this, whatever it is doing (a step, a
 * collective, an allocation that OpenBLAS retries): the watchdog thread exits it. */
#define STOP_GRACE_MS 1000

enum { ST_IDLE = 0, ST_TRAINING, ST_RESTORING, ST_SAVING };
static const char *state_names[] = {"idle", "training", "restoring", "saving"};

static volatile sig_atomic_t g_stop = 0;
static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

/* The stop watchdog: once a signal has asked us to stop, the main thread has STOP_GRACE_MS to
 * wind down (it checks between steps and every 100 ms when idle); if it is stuck in something
 * long (a step of a big model, a collective, an allocation OpenBLAS keeps retrying), the
 * process ends here. Signal handlers only set the flag (no async-unsafe work there). */
static _Atomic int g_main_done = 0;
static void *stop_watchdog(void *arg) {
    (void)arg;
    while (!g_stop && !atomic_load(&g_main_done)) usleep(50 * 1000);
    for (int waited = 0; waited < STOP_GRACE_MS && !atomic_load(&g_main_done); waited += 50) usleep(50 * 1000);
    if (atomic_load(&g_main_done)) return NULL;
    sy_error("asked to stop (SIGTERM/SIGINT) but still busy after %d ms: exiting now", STOP_GRACE_MS);
    fflush(stdout);
    fflush(stderr);
    _exit(1);
}

/* This rank's state at one of its checkpoints: parameters, AdamW moments (full buffers; only
 * dense and the experts it owned are meaningful), the optimizer step count. */
typedef struct {
    float *p, *m, *v;
    bool *owned;
    int64_t t, step; /* step -1: empty */
} snapshot;

typedef struct {
    const sy_agent_opts *opts;
    char id[128], host[128], inproc[64];
    void *zctx;
    void *pair_main;               /* main side of the inproc pair */
    pthread_t link;
    bool link_started;
    /* shared with the link thread */
    pthread_mutex_t mu;
    char run_id[128];              /* under mu */
    uint64_t incarnation;          /* under mu */
    uint8_t session[64];           /* under mu: our registration's secret (Welcome.session), echoed */
    size_t session_len;            /* on every message (docs/protocol.md "Identities") */
    sy_comm_t *comm;               /* under mu: the link thread may sy_comm_abort it (sets a
                                    * flag only; the main thread tears the collective down) */
    sy_comm_t *rcomm;              /* under mu, as comm: the replicas' communicator (on rdp),
                                    * driven by the replica module's thread between a post and
                                    * its wait; NULL: replicas go over comm between steps */
    _Atomic uint64_t generation;
    _Atomic uint64_t gen_inc;      /* incarnation of the coordinator that assigned `generation`:
                                    * a generation is named by the pair (a restarted coordinator
                                    * counts generations from 1 again) */
    _Atomic int64_t step;          /* the last step done (stored before its StepDone goes out) */
    int64_t ea_step;               /* under mu: EndAfter step of generation ea_gen (link thread) */
    uint64_t ea_gen;
    _Atomic int state;
    _Atomic unsigned state_seq;    /* bumped on every state change: the link thread reports it */
    _Atomic int hb_ms;
    _Atomic int coord_timeout_ms;  /* silence after which the coordinator is presumed gone */
    _Atomic int64_t heard_ms;      /* mono ms of the last message received from the coordinator */
    _Atomic int link_stop;
    _Atomic int refused;           /* the link thread gave up: the coordinator refuses us */
    _Atomic int link_failed;       /* the link thread gave up: no coordinator (--connect-timeout) */
    _Atomic uint64_t peers_gen;    /* generation of the peer table held (0 none), of peers_inc's */
    _Atomic uint64_t peers_inc;    /* coordinator: what heartbeats report (Heartbeat.peers_held) */
    bool curve;                    /* CURVE keys given (immutable once the link thread runs) */
    sy_curve_key key;              /* this worker's key pair */
    char server_public[SY_CURVE_Z85_LEN + 1];
    /* main thread only */
    sy_dataplane_t *dp;
    sy_dataplane_t *rdp;           /* the replicas' data plane (NULL: none, replicate on dp) */
    sy_config_t cfg;
    bool have_cfg;
    sy_backend_t *be;
    sy_model_t *model;
    sy_model_dims dims;
    sy_adamw_t *opt;
    sy_data_t *data;
    sy_data_t *val;         /* data.val for train.eval_every (NULL: no validation) */
    double *terms;          /* [3 * M] per-micro-batch loss terms of a step (StepDone.micro_terms) */
    int val_batches;
    sy_store_t *store;
    sy_ep_t *ep;
    sy_replica_t *rep;             /* peer replicas of expert state (replica.h) */
    uint32_t *placement;           /* [E] of the current generation */
    int peers_n;                   /* the peer table of generation peers_gen (docs/protocol.md */
    char **peers_ep, **peers_key;  /* "Peer tables"): the base of the next Assign's edit */
    char **peers_rep;              /* its replica endpoints (NULL: the Assign carried none) */
    int replicas;                  /* min(cluster.replicas, world - 1) */
    int64_t kill_at;               /* test hook SY_TEST_REPLICA_KILL: SIGKILL mid-exchange of this step */
    bool bg_said;                  /* the log said why replicas cannot run in the background */
    /* cluster.replica_cpus (apply_replica_cpus): the process's CPUs at start; whether its threads
     * are pinned now, and to which CPUs the replication; the last thing the log said of it */
    cpu_set_t cpus_start;
    bool cpus_pinned;
    cpu_set_t cpus_rep;
    char cpus_said[96];
    uint64_t rep_inc;              /* the coordinator incarnation whose run the replicas are of */
    double rep_start_wait_ms;      /* of the replicas' wait_ms: the exchanges of restored (or
                                    * fresh) states before a generation's first step */
    bool *owned;
    int32_t *tokens, *counts;
    int rank, world;
    /* the in-memory copy of this rank's state at its last written checkpoint */
    snapshot snap[2];              /* two: the newest may not get committed (a failure during its
                                    * upload); the restore point is then usually the other one */
    int up_slot;                   /* the snapshot being uploaded */
    char restore_note[128];
    /* the checkpoint uploader thread: writes this rank's files from the snapshot while training
     * goes on (checkpoint.async); at most one upload in flight */
    pthread_t up_th;
    bool up_started, up_quit, up_busy, up_done;
    pthread_mutex_t up_mu;
    pthread_cond_t up_cv;
    int64_t up_step;
    uint64_t up_gen, up_inc;
    int up_rank;
    char up_run[256];   /* the run name, copied: the config may be replaced meanwhile */
    sy_status up_st;
    char up_err[512];
    json_t *up_files;
    bool fatal;                    /* a failure that a retry cannot fix (out of memory) */
    int fatal_rc;                  /* the exit code of a fatal failure (0: 1) */
    char fatal_msg[512];
    void *pending;                 /* a frame received while training, handled next */
    size_t pending_len;
} agent_t;


/* ---- link thread --------------------------------------------------------------------------- */

/* Stamps the envelope header; the body (already set) is kept. */
static void stamp(Sy__Envelope *env, const char *run_id, uint64_t incarnation, uint64_t generation) {
    env->version = SY_PROTO_VERSION;
    env->run_id = (char *)run_id;
    env->incarnation = incarnation;
    env->generation = generation;
}

static void link_send(agent_t *a, void *dealer, Sy__Envelope *env) {
    pthread_mutex_lock(&a->mu);
    /* A generation of an earlier coordinator is no generation of this one. */
    uint64_t gen = atomic_load(&a->gen_inc) == a->incarnation ? atomic_load(&a->generation) : 0;
    stamp(env, a->run_id, a->incarnation, gen);
    env->session.data = a->session;
    env->session.len = a->session_len;
    sy_status st = sy_proto_send(dealer, NULL, 0, env);
    pthread_mutex_unlock(&a->mu);
    if (st != SY_OK) sy_debug("send to coordinator failed: %s", sy_err_msg());
}

/* One event of the DEALER's monitor: a failed handshake is logged (each kind once, with what
 * to check). A refused key (ZAP) or a CURVE/plaintext mismatch ends the worker at once: libzmq
 * does not reconnect after such a protocol error, so the worker would otherwise hang silently.
 * Other failures (the coordinator closed the connection mid-handshake: a wrong server key, or
 * a crash) end it after SY_AGENT_HANDSHAKE_MAX_FAILS in a row without a success in between. */
static void link_monitor_event(agent_t *a, void *mon, int *fails, unsigned *logged) {
    uint16_t event;
    uint32_t value;
    if (!sy_proto_monitor_event(mon, &event, &value)) return;
    if (event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
        if (*fails) sy_info("handshake with the coordinator succeeded after %d failure(s)", *fails);
        *fails = 0;
        return;
    }
    const char *coord = a->opts->coordinator;
    unsigned kind = 0;
    char msg[512];
    if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        kind = 1;
        snprintf(msg, sizeof msg,
                 "the coordinator %s refused our CURVE key %s (ZAP status %u): is it listed in the "
                 "coordinator's cluster.curve_authorized_keys?",
                 coord, a->key.public_z85, value);
    } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL && value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH) {
        kind = 2;
        if (a->curve)
            snprintf(msg, sizeof msg,
                     "the coordinator %s does not use CURVE (its cluster.curve_server_key is empty) but this "
                     "worker was given --curve-key",
                     coord);
        else
            snprintf(msg, sizeof msg,
                     "the coordinator %s requires CURVE (cluster.curve_server_key is set): start the worker with "
                     "--curve-server-public FILE --curve-key FILE",
                     coord);
    } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
        kind = 3;
        snprintf(msg, sizeof msg, "handshake with the coordinator %s failed: protocol error 0x%x", coord, value);
    } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) {
        kind = 4;
        /* a plaintext peer of a CURVE server sees this or a mechanism mismatch (kind 2): which
         * one depends on which side reads the other's greeting first */
        if (a->curve)
            snprintf(msg, sizeof msg,
                     "the coordinator %s closed the connection during the CURVE handshake: is "
                     "--curve-server-public the coordinator's public key (cluster.curve_server_key)?",
                     coord);
        else
            snprintf(msg, sizeof msg,
                     "the coordinator %s closed the connection during the ZeroMQ handshake: if it requires CURVE "
                     "(cluster.curve_server_key is set), start the worker with --curve-server-public FILE "
                     "--curve-key FILE",
                     coord);
    } else {
        return;
    }
    (*fails)++;
    bool final = kind == 1 || kind == 2 || *fails >= SY_AGENT_HANDSHAKE_MAX_FAILS;
    if (!(*logged & (1u << kind))) {
        *logged |= 1u << kind;
        sy_error("%s", msg);
    }
    if (final && !atomic_load(&a->refused)) {
        sy_error("giving up: %d handshake(s) with the coordinator %s failed in a row; exiting", *fails, coord);
        atomic_store(&a->refused, 1);
    }
}

/* Opens the DEALER to the coordinator (routing id "ID/NONCE", CURVE keys when given) and its
 * handshake monitor (*mon NULL when none). `n` numbers the sockets of this process: the link
 * thread opens a fresh one whenever the coordinator has been silent (see link_main). NULL (and
 * link_failed set) when no socket can be made. */
static void *link_open(agent_t *a, unsigned n, void **mon) {
    void *dealer = zmq_socket(a->zctx, ZMQ_DEALER);
    *mon = NULL;
    if (!dealer) {
        sy_err_zmq(SY_EIO, errno, "cannot create the coordinator socket");
        sy_error("%s", sy_err_msg());
        atomic_store(&a->link_failed, 1);
        return NULL;
    }
    int linger = 0;
    int64_t maxmsg = SY_PROTO_TRANSPORT_MAX;
    zmq_setsockopt(dealer, ZMQ_LINGER, &linger, sizeof linger);
    /* routing id "ID/NONCE": a fresh random nonce per socket, so that no other peer can take
     * over our route by connecting with our id (the coordinator has ROUTER_HANDOVER on, so a
     * reconnect of this very socket takes its route back at once) */
    char rid[sizeof a->id + 20];
    uint64_t nonce = 0;
    if (getrandom(&nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce)
        nonce = (uint64_t)(sy_mono_s() * 1e9) ^ ((uint64_t)getpid() << 32) ^ n;
    snprintf(rid, sizeof rid, "%s/%016llx", a->id, (unsigned long long)nonce);
    zmq_setsockopt(dealer, ZMQ_ROUTING_ID, rid, strlen(rid));
    zmq_setsockopt(dealer, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (a->curve &&
        (zmq_setsockopt(dealer, ZMQ_CURVE_SERVERKEY, a->server_public, SY_CURVE_Z85_LEN + 1) != 0 ||
         zmq_setsockopt(dealer, ZMQ_CURVE_PUBLICKEY, a->key.public_z85, SY_CURVE_Z85_LEN + 1) != 0 ||
         zmq_setsockopt(dealer, ZMQ_CURVE_SECRETKEY, a->key.secret_z85, SY_CURVE_Z85_LEN + 1) != 0)) {
        sy_err_zmq(SY_EIO, errno, "cannot set the CURVE keys on the coordinator socket");
        sy_error("%s", sy_err_msg());
        atomic_store(&a->refused, 1);
    }
    /* Handshake failures show only in the socket monitor: libzmq reconnects after a dropped
     * connection but never after a refusal, which would otherwise look like silence. */
    char mon_ep[80];
    snprintf(mon_ep, sizeof mon_ep, "inproc://sy-agent-monitor-%p-%u", (void *)a, n);
    if (zmq_socket_monitor(dealer, mon_ep,
                           ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) == 0) {
        *mon = zmq_socket(a->zctx, ZMQ_PAIR);
        zmq_setsockopt(*mon, ZMQ_LINGER, &linger, sizeof linger);
        if (zmq_connect(*mon, mon_ep) != 0) {
            zmq_close(*mon);
            *mon = NULL;
        }
    }
    if (!*mon) sy_warn("no socket monitor: a refused connection will show only as silence");
    /* the endpoint was validated at start (sy_endpoint_check): a failure here is unexpected */
    if (zmq_connect(dealer, a->opts->coordinator) != 0) {
        sy_err_zmq(SY_EIO, errno, "cannot connect to coordinator %s", a->opts->coordinator);
        sy_error("%s", sy_err_msg());
        atomic_store(&a->link_failed, 1);
    }
    return dealer;
}

static void link_close(void **dealer, void **mon) {
    if (*mon && *dealer) {
        zmq_socket_monitor(*dealer, NULL, 0);
        zmq_close(*mon);
        *mon = NULL;
    }
    if (*dealer) zmq_close(*dealer);
    *dealer = NULL;
}

/* The link thread's own state: nothing else reads it. */
typedef struct {
    agent_t *a;
    void *pair;               /* link side of the inproc pair to the main thread */
    void *dealer, *mon;       /* the socket to the coordinator and its handshake monitor */
    unsigned nsock;           /* sockets opened so far (link_open numbers them) */
    int hs_fails;             /* handshakes failed in a row (link_monitor_event) */
    unsigned hs_logged;
    bool welcomed;            /* registered with the current coordinator */
    bool stopped;             /* got Stop: no more Hello or heartbeats */
    double last_hello, last_hb, last_rx; /* mono ms */
    double unwelcomed_since, next_wait_log, wait_log_ivl; /* mono ms / ms, -1: welcomed */
    unsigned last_seq;        /* a->state_seq last reported */
} link_t;

/* Ends the collectives in flight of this generation (both communicators). Caller holds mu. */
static void abort_comms_locked(agent_t *a) {
    if (a->comm) sy_comm_abort(a->comm);
    if (a->rcomm) sy_comm_abort(a->rcomm);
}

static void link_from_coordinator(link_t *l);
static bool link_on_reregister(link_t *l, const Sy__Envelope *env);
static bool link_on_welcome(link_t *l, const Sy__Envelope *env);
static bool link_on_order(link_t *l, const Sy__Envelope *env);
static void link_from_main(link_t *l);
static bool link_reconnect_if_silent(link_t *l, double t);
static bool link_wait_for_welcome(link_t *l, double t);
static void link_hello(link_t *l, double t, int hb);
static void link_heartbeat(link_t *l, double t, int hb);

/* The link thread: relays between the coordinator (DEALER) and the main thread (inproc PAIR),
 * registers (Hello until Welcome), sends heartbeats, and reconnects when the coordinator falls
 * silent. It ends on link_stop, or when it gives up (a->refused, a->link_failed). */
static void *link_main(void *arg) {
    link_t l = {.a = arg};
    agent_t *a = l.a;
    l.pair = zmq_socket(a->zctx, ZMQ_PAIR);
    int linger = 0;
    zmq_setsockopt(l.pair, ZMQ_LINGER, &linger, sizeof linger);
    l.dealer = link_open(a, l.nsock++, &l.mon);
    zmq_connect(l.pair, a->inproc);

    l.last_hello = -1e18, l.last_hb = -1e18, l.last_rx = (sy_mono_s() * 1e3);
    l.unwelcomed_since = -1, l.next_wait_log = LINK_WAIT_LOG_FIRST_MS, l.wait_log_ivl = LINK_WAIT_LOG_FIRST_MS;
    while (l.dealer && !atomic_load(&a->link_stop)) {
        zmq_pollitem_t items[] = {{l.dealer, 0, ZMQ_POLLIN, 0}, {l.pair, 0, ZMQ_POLLIN, 0}, {l.mon, 0, ZMQ_POLLIN, 0}};
        zmq_poll(items, l.mon ? 3 : 2, 50);
        if (l.mon && (items[2].revents & ZMQ_POLLIN)) link_monitor_event(a, l.mon, &l.hs_fails, &l.hs_logged);
        if (items[0].revents & ZMQ_POLLIN) link_from_coordinator(&l);
        if (items[1].revents & ZMQ_POLLIN) link_from_main(&l);
        double t = (sy_mono_s() * 1e3);
        int hb = atomic_load(&a->hb_ms);
        if (l.stopped) continue;
        if (!link_reconnect_if_silent(&l, t) || !link_wait_for_welcome(&l, t)) break;
        link_hello(&l, t, hb);
        link_heartbeat(&l, t, hb);
    }
    link_close(&l.dealer, &l.mon);
    zmq_close(l.pair);
    return NULL;
}

/* One message from the coordinator: Welcome is the link's business (registration); other
 * messages of our coordinator go to the main thread, and so does a Welcome that ends our
 * generation. */
static void link_from_coordinator(link_t *l) {
    Sy__Envelope *env = NULL;
    sy_proto_drop why;
    /* one frame, or an Assign and its peer table (Assign.peers_follow), put together */
    if (!sy_proto_recv(l->dealer, ZMQ_DONTWAIT, &env, &why, NULL, NULL)) return;
    l->last_rx = (sy_mono_s() * 1e3);
    atomic_store(&l->a->heard_ms, (int64_t)l->last_rx);
    bool forward = false;
    if (why != SY_DROP_NONE)
        sy_warn("dropped a message from the coordinator (%s): %s", sy_proto_drop_name(why), sy_err_msg());
    else if (env->body_case == SY__ENVELOPE__BODY_WELCOME && env->welcome->reregister)
        forward = link_on_reregister(l, env);
    else if (env->body_case == SY__ENVELOPE__BODY_WELCOME)
        forward = link_on_welcome(l, env);
    else
        forward = link_on_order(l, env);
    void *buf = NULL;
    size_t len = 0;
    if (forward && sy_proto_pack(env, &buf, &len) == SY_OK) zmq_send(l->pair, buf, len, ZMQ_DONTWAIT);
    free(buf);
    sy_proto_free(env);
}

/* The coordinator does not count us as registered (it forgot us, or was restarted): leave any
 * generation and send Hello now. Forwarded. */
static bool link_on_reregister(link_t *l, const Sy__Envelope *env) {
    agent_t *a = l->a;
    pthread_mutex_lock(&a->mu);
    bool fresh = a->incarnation != env->incarnation;
    a->incarnation = env->incarnation;
    snprintf(a->run_id, sizeof a->run_id, "%s", env->run_id ? env->run_id : "");
    /* a collective in flight would wait for peers that leave their generation
     * too: end it now (peers get their own Welcome within a heartbeat) */
    abort_comms_locked(a);
    pthread_mutex_unlock(&a->mu);
    if (l->welcomed || fresh)
        sy_info("coordinator %s does not count us as registered: registering again", a->opts->coordinator);
    l->welcomed = false;
    l->last_hello = -1e18;
    return true;
}

/* Welcome (also the coordinator's keepalive): our session secret, the run id, the heartbeat
 * period. True (forward to main) when it is a new registration, which ends our generation. */
static bool link_on_welcome(link_t *l, const Sy__Envelope *env) {
    agent_t *a = l->a;
    const ProtobufCBinaryData *ses = &env->welcome->session;
    pthread_mutex_lock(&a->mu);
    bool fresh = a->incarnation != env->incarnation;
    bool had_session = a->session_len > 0;
    bool new_session = ses->len != a->session_len || (ses->len && memcmp(ses->data, a->session, ses->len));
    a->incarnation = env->incarnation;
    snprintf(a->run_id, sizeof a->run_id, "%s", env->run_id ? env->run_id : "");
    if (ses->len <= sizeof a->session) {
        memcpy(a->session, ses->data, ses->len);
        a->session_len = ses->len;
    }
    /* a new registration ends the generation we were in (below): a collective
     * in flight would wait for peers that leave it too, so end it now */
    if (fresh || (new_session && had_session)) abort_comms_locked(a);
    pthread_mutex_unlock(&a->mu);
    if (env->welcome->heartbeat_ms > 0) atomic_store(&a->hb_ms, (int)env->welcome->heartbeat_ms);
    /* a new registration (new incarnation, or the same coordinator took us back
     * as a newcomer) ends whatever generation we were in */
    bool forward = fresh || (new_session && had_session);
    if (!fresh && new_session && had_session)
        sy_info("coordinator %s registered us anew: leaving the current generation", a->opts->coordinator);
    if (fresh && l->welcomed) {
        /* a new coordinator (restarted) greets us: it does not know us yet */
        sy_info("coordinator %s has a new incarnation %016llx: registering again",
                a->opts->coordinator, (unsigned long long)env->incarnation);
        l->welcomed = false;
        l->last_hello = -1e18;
    } else {
        if (!l->welcomed)
            sy_info("registered with coordinator %s (run %s, incarnation %016llx)",
                    a->opts->coordinator, env->run_id, (unsigned long long)env->incarnation);
        l->welcomed = true;
    }
    return forward;
}

/* Any other message (Assign, Abort, Stop, CheckpointNow): forwarded when it is of our
 * coordinator and run; Abort of our generation and Stop end a collective in flight at once. */
static bool link_on_order(link_t *l, const Sy__Envelope *env) {
    agent_t *a = l->a;
    pthread_mutex_lock(&a->mu);
    bool ours = env->incarnation == a->incarnation && l->welcomed &&
                (!env->run_id || !strcmp(env->run_id, a->run_id));
    const uint64_t gen = atomic_load(&a->generation);
    if (ours && env->body_case == SY__ENVELOPE__BODY_END_AFTER && env->generation == gen)
        a->ea_gen = gen, a->ea_step = (int64_t)env->end_after->step;
    /* The Abort (or a drained member's Stop) that closes a generation at its EndAfter step says
     * so (end_after): every member has reported that step and nobody was lost, so the exchange
     * of its replicas, in flight on the replica plane, is left to finish (the main thread waits
     * for it, bounded by the data timeout), or the Holdings would name the step before and one
     * step would run twice. Any other Abort (a loss: a peer of that exchange may be dead) ends
     * both planes at once. */
    const uint64_t msg_ea = env->body_case == SY__ENVELOPE__BODY_ABORT  ? env->abort->end_after
                            : env->body_case == SY__ENVELOPE__BODY_STOP ? env->stop->end_after
                                                                        : 0;
    const bool boundary = ours && msg_ea > 0 && env->generation == gen && a->ea_gen == gen && gen != 0 &&
                          (uint64_t)a->ea_step == msg_ea && atomic_load(&a->step) >= a->ea_step;
    /* Stop ends whatever is in flight too (a drained worker must not wait out a
     * collective its peers have left), and this process never registers again. */
    const bool stop = ours && env->body_case == SY__ENVELOPE__BODY_STOP;
    if (stop || (ours && env->body_case == SY__ENVELOPE__BODY_ABORT && env->generation == gen)) {
        if (!boundary) abort_comms_locked(a);
        else if (a->comm) sy_comm_abort(a->comm);
    }
    if (stop) l->stopped = true;
    pthread_mutex_unlock(&a->mu);
    if (!ours) sy_debug("dropped a %s of another coordinator incarnation", sy_proto_body_name(env->body_case));
    return ours;
}

/* One envelope from the main thread, sent on to the coordinator. */
static void link_from_main(link_t *l) {
    agent_t *a = l->a;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, l->pair, ZMQ_DONTWAIT) >= 0) {
        /* main's envelopes are packed without run id, and with the incarnation of the
         * coordinator that assigned their generation (0: none): stamp and resend. One
         * about a generation of an earlier incarnation keeps that incarnation, so the
         * restarted coordinator drops it instead of taking it for its own generation. */
        Sy__Envelope *env = NULL;
        if (sy_proto_unpack(zmq_msg_data(&msg), zmq_msg_size(&msg), &env) == SY_DROP_NONE) {
            char *own = env->run_id;
            pthread_mutex_lock(&a->mu);
            env->run_id = a->run_id; /* borrowed for the send below */
            if (!env->incarnation) env->incarnation = a->incarnation;
            env->session.data = a->session;
            env->session.len = a->session_len;
            sy_proto_send(l->dealer, NULL, 0, env);
            env->session.data = NULL;
            env->session.len = 0;
            env->run_id = own;
            pthread_mutex_unlock(&a->mu);
            sy_proto_free(env);
        }
    }
    zmq_msg_close(&msg);
}

/* The coordinator re-sends Welcome as a keepalive (docs/protocol.md); silence means it is gone
 * or was restarted: register again (a new incarnation answers), on a fresh socket. False when
 * no socket can be opened (the link gives up). */
static bool link_reconnect_if_silent(link_t *l, double t) {
    agent_t *a = l->a;
    if (!l->welcomed || t - l->last_rx <= atomic_load(&a->coord_timeout_ms)) return true;
    /* A fresh socket too: the old connection may be deaf in a way libzmq never reports
     * (a peer that took over our routing id at a coordinator with ROUTER_HANDOVER, a
     * half-open TCP connection), and a Hello sent into it would never arrive. */
    sy_warn("no word from the coordinator for %.0f ms: reconnecting and registering again", t - l->last_rx);
    link_close(&l->dealer, &l->mon);
    if (!(l->dealer = link_open(a, l->nsock++, &l->mon))) return false;
    l->hs_fails = 0;
    l->welcomed = false;
    l->last_rx = t;
    l->unwelcomed_since = t;
    l->next_wait_log = l->wait_log_ivl = LINK_WAIT_LOG_FIRST_MS;
    return true;
}

/* Not registered yet: logs the wait (at growing intervals) and gives up after
 * --connect-timeout (false, a->link_failed set). */
static bool link_wait_for_welcome(link_t *l, double t) {
    agent_t *a = l->a;
    if (l->welcomed) {
        l->unwelcomed_since = -1;
        return true;
    }
    if (l->unwelcomed_since < 0)
        l->unwelcomed_since = t, l->next_wait_log = l->wait_log_ivl = LINK_WAIT_LOG_FIRST_MS;
    double waited = t - l->unwelcomed_since;
    int limit_s = a->opts->connect_timeout_s;
    if (limit_s > 0 && waited >= limit_s * 1e3) {
        sy_error("no answer from the coordinator %s for %d s (--connect-timeout): giving up",
                 a->opts->coordinator, limit_s);
        atomic_store(&a->link_failed, 1);
        return false;
    }
    if (waited >= l->next_wait_log) {
        char limit[64] = "no time limit";
        if (limit_s > 0) snprintf(limit, sizeof limit, "giving up after %d s, --connect-timeout", limit_s);
        sy_warn("no answer from the coordinator %s for %.0f s: still trying (is it running and reachable at "
                "that address? %s)",
                a->opts->coordinator, waited / 1e3, limit);
        l->next_wait_log = waited + l->wait_log_ivl;
        l->wait_log_ivl = l->wait_log_ivl * 2 > LINK_WAIT_LOG_MAX_MS ? LINK_WAIT_LOG_MAX_MS : l->wait_log_ivl * 2;
    }
    return true;
}

/* Hello every heartbeat period until Welcome. */
static void link_hello(link_t *l, double t, int hb) {
    agent_t *a = l->a;
    if (l->welcomed || t - l->last_hello < hb) return;
    Sy__Envelope env;
    Sy__Hello hello = SY__HELLO__INIT;
    struct sysinfo si;
    hello.worker_id = a->id;
    hello.host = a->host;
    hello.pid = (uint32_t)getpid();
    hello.backend = (char *)(a->opts->backend ? a->opts->backend : "config");
    hello.devices = 1;
    hello.memory_bytes = sysinfo(&si) == 0 ? (uint64_t)si.totalram * si.mem_unit : 0;
    hello.version = SY_AGENT_VERSION;
    /* Reserved, always empty, ignored by the coordinator: a worker proves who it is with its
     * CURVE key (ZAP checks it against cluster.curve_authorized_keys; docs/security.md), never
     * with a shared token that every worker host would hold. */
    hello.auth_token = "";
    hello.data_endpoint = (char *)sy_dataplane_endpoint(a->dp);
    hello.replica_endpoint = (char *)(a->rdp ? sy_dataplane_endpoint(a->rdp) : "");
    hello.table_frame = true; /* an Assign's peer table may come in a second frame */
    hello.last_generation = atomic_load(&a->generation); /* whatever incarnation assigned it */
    sy__envelope__init(&env);
    env.body_case = SY__ENVELOPE__BODY_HELLO;
    env.hello = &hello;
    link_send(a, l->dealer, &env);
    l->last_hello = t;
}

/* Heartbeat every period once registered, and at once on a change of state (the coordinator
 * times recovery phases). */
static void link_heartbeat(link_t *l, double t, int hb) {
    agent_t *a = l->a;
    unsigned seq_now = atomic_load(&a->state_seq);
    if (!l->welcomed || (t - l->last_hb < hb && seq_now == l->last_seq)) return;
    l->last_seq = seq_now;
    Sy__Envelope env;
    Sy__Heartbeat h = SY__HEARTBEAT__INIT;
    h.step = (uint64_t)atomic_load(&a->step);
    h.state = (char *)state_names[atomic_load(&a->state)];
    h.dataplane_dropped = sy_dataplane_dropped(a->dp);
    h.dataplane_refused = sy_dataplane_refused(a->dp);
    /* a table of another coordinator incarnation is no base for this one's edits */
    pthread_mutex_lock(&a->mu);
    uint64_t inc = a->incarnation;
    pthread_mutex_unlock(&a->mu);
    h.peers_held = atomic_load(&a->peers_inc) == inc ? atomic_load(&a->peers_gen) : 0;
    sy__envelope__init(&env);
    env.body_case = SY__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &h;
    link_send(a, l->dealer, &env);
    l->last_hb = t;
}

/* ---- main thread ---------------------------------------------------------------------------- */

static void set_state(agent_t *a, int st) {
    if (atomic_exchange(&a->state, st) != st) atomic_fetch_add(&a->state_seq, 1u);
}

/* Sends an envelope to the coordinator through the link thread. */
static void agent_send_gen(agent_t *a, Sy__Envelope *env, uint64_t inc, uint64_t gen) {
    stamp(env, "", inc, gen);
    void *buf = NULL;
    size_t len = 0;
    if (sy_proto_pack(env, &buf, &len) == SY_OK) zmq_send(a->pair_main, buf, len, 0);
    free(buf);
}

static void agent_send(agent_t *a, Sy__Envelope *env) {
    stamp(env, "", atomic_load(&a->gen_inc), atomic_load(&a->generation));
    void *buf = NULL;
    size_t len = 0;
    if (sy_proto_pack(env, &buf, &len) == SY_OK) zmq_send(a->pair_main, buf, len, 0);
    free(buf);
}

static void send_fault_gen(agent_t *a, const char *kind, const char *detail, int peer, int64_t step,
                           uint64_t inc, uint64_t gen) {
    Sy__Envelope env;
    Sy__Fault f = SY__FAULT__INIT;
    f.kind = (char *)kind;
    f.detail = (char *)detail;
    f.peer_rank = peer;
    f.step = (uint64_t)(step > 0 ? step : 0);
    sy__envelope__init(&env);
    env.body_case = SY__ENVELOPE__BODY_FAULT;
    env.fault = &f;
    agent_send_gen(a, &env, inc, gen);
}

/* The first rank a timed-out collective heard nothing from, from the data plane's message
 * ("... no data from rank(s) 2, 0 within N ms"), -1 if none: the Fault names it so that the
 * coordinator can tell who is unreachable when nobody is silent (issue 13 (d)). */
static int first_missing_rank(const char *msg) {
    const char *p = strstr(msg, "no data from rank(s) ");
    if (!p) return -1;
    char *end;
    long r = strtol(p + strlen("no data from rank(s) "), &end, 10);
    return end != p + strlen("no data from rank(s) ") && r >= 0 && r < INT32_MAX ? (int)r : -1;
}

static void send_fault(agent_t *a, const char *kind, const char *detail, int peer, int64_t step) {
    send_fault_gen(a, kind, detail, peer, step, atomic_load(&a->gen_inc), atomic_load(&a->generation));
}

/* Receives one message from the link thread within timeout_ms (0: don't wait). */
static Sy__Envelope *agent_recv(agent_t *a, int timeout_ms) {
    if (a->pending) {
        Sy__Envelope *env = NULL;
        sy_proto_unpack(a->pending, a->pending_len, &env);
        free(a->pending);
        a->pending = NULL;
        return env;
    }
    zmq_pollitem_t it = {a->pair_main, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&it, 1, timeout_ms) <= 0) return NULL;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    Sy__Envelope *env = NULL;
    if (zmq_msg_recv(&msg, a->pair_main, ZMQ_DONTWAIT) >= 0)
        sy_proto_unpack(zmq_msg_data(&msg), zmq_msg_size(&msg), &env);
    zmq_msg_close(&msg);
    return env;
}

static void stash(agent_t *a, const Sy__Envelope *env) {
    free(a->pending);
    a->pending_len = sy__envelope__get_packed_size(env);
    a->pending = malloc(a->pending_len);
    if (a->pending) sy__envelope__pack(env, a->pending);
}

static void snapshot_drop(agent_t *a);

static void close_generation(agent_t *a) {
    /* the replica thread lets go of rcomm (an aborted one ends within SY_COMM_ABORT_MS) */
    if (a->rep && sy_replica_wait(a->rep) != SY_OK) sy_info("%s", sy_err_msg());
    if (a->comm && a->world > 1) {
        sy_comm_stats cs = sy_comm_get_stats(a->comm);
        sy_ep_stats es = a->ep ? sy_ep_get_stats(a->ep) : (sy_ep_stats){0, 0};
        sy_info("generation %llu: data plane sent %llu bytes in %llu collectives; expert exchange %llu bytes of "
                "rows (%s), %llu of counts and tokens",
                (unsigned long long)atomic_load(&a->generation), (unsigned long long)cs.bytes_sent,
                (unsigned long long)cs.collectives, (unsigned long long)es.row_bytes,
                a->be && a->be->bf16 ? "bf16" : "fp32", (unsigned long long)es.meta_bytes);
    }
    if (a->rep && a->comm && a->world > 1 && a->replicas > 0) {
        sy_replica_stats rs = sy_replica_get_stats(a->rep);
        sy_info("replicas (%d per worker): %llu exchanges, %llu bytes sent, %llu received, %.1f ms exchanging, "
                "%.1f ms copying the live state, %.1f ms of training waiting for them, %.1f ms waiting at "
                "generation starts%s (totals of this process); %llu of the exchanges sent gradients", a->replicas,
                (unsigned long long)rs.exchanges, (unsigned long long)rs.bytes_sent,
                (unsigned long long)rs.bytes_received, rs.exchange_ms, rs.keep_ms, rs.wait_ms - a->rep_start_wait_ms,
                a->rep_start_wait_ms, a->rcomm ? " (overlapped: on their own data plane)" : "",
                (unsigned long long)rs.deltas);
    }
    if (a->model) sy_model_set_ep(a->model, NULL, 0);
    sy_ep_destroy(&a->ep);
    pthread_mutex_lock(&a->mu);
    sy_comm_destroy(&a->comm);
    sy_comm_destroy(&a->rcomm);
    pthread_mutex_unlock(&a->mu);
}

/* Ends this generation's collectives at once (a failure, an abort, a stop): peers may be gone. */
static void abort_generation(agent_t *a) {
    pthread_mutex_lock(&a->mu);
    abort_comms_locked(a);
    pthread_mutex_unlock(&a->mu);
}

static bool dims_equal(const sy_model_dims *x, const sy_model_dims *y) {
    return x->V == y->V && x->T == y->T && x->D == y->D && x->L == y->L && x->H == y->H &&
           x->F == y->F && x->E == y->E && x->S == y->S && x->B == y->B &&
           x->capacity_factor == y->capacity_factor &&
           x->eval_capacity_factor == y->eval_capacity_factor && x->aux_coef == y->aux_coef &&
           x->z_coef == y->z_coef && x->jitter == y->jitter &&
           x->expert_dropout == y->expert_dropout && x->init_scale == y->init_scale;
}

/* Builds (or keeps) the model, optimizer, data and store for the Assign's config. */
static void upload_collect(agent_t *a, bool block);

/* Says a line of cluster.replica_cpus's state once, not at every Assign (what: a word for the
 * state, with the list it is of). */
static void cpus_say(agent_t *a, const char *what, bool warn, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void cpus_say(agent_t *a, const char *what, bool warn, const char *fmt, ...) {
    char key[sizeof a->cpus_said];
    snprintf(key, sizeof key, "%s %s", what, a->cfg.cluster.replica_cpus ? a->cfg.cluster.replica_cpus : "");
    if (!strcmp(a->cpus_said, key)) return;
    snprintf(a->cpus_said, sizeof a->cpus_said, "%s", key);
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (warn) sy_warn("%s", line);
    else sy_info("%s", line);
}

/* Back to the CPUs the process started with (every thread). */
static void cpus_unpin(agent_t *a) {
    if (!a->cpus_pinned) return;
    (void)sy_replica_set_cpus(a->rep, NULL);
    int e = sy_affinity_set_all(&a->cpus_start);
    if (e) sy_warn("cluster.replica_cpus: cannot give the threads their CPUs (%s) back: %s",
                   sy_cpulist_str(&a->cpus_start).s, strerror(e));
    a->cpus_pinned = false;
}

/* cluster.replica_cpus (docs/fault-tolerance.md "A core for the replication"), at every Assign:
 * the replica thread and the replica data plane's threads on those CPUs, every other thread of
 * this process on the CPUs it started with less those (threads started later inherit it from
 * their creator). A set this host cannot give (no such CPU, none left to train on) is said in the
 * log and the threads stay unpinned: it is a speed setting, and the Assign came from a config
 * checked on another machine. */
static void apply_replica_cpus(agent_t *a) {
    const char *list = a->cfg.cluster.replica_cpus ? a->cfg.cluster.replica_cpus : "";
    if (!*list || a->cfg.cluster.replicas <= 0 || !a->rdp) {
        if (*list)
            cpus_say(a, "norep", false, "cluster.replica_cpus %s: not applied (%s)", list,
                     a->rdp ? "cluster.replicas is 0" : "no replica data plane: replicas are exchanged between steps");
        cpus_unpin(a);
        return;
    }
    cpu_set_t rep, train;
    char why[300];
    if (!sy_cpulist_parse(list, &rep, why, sizeof why)) { /* the coordinator checked it; the Assign is input */
        cpus_say(a, "bad", true, "cluster.replica_cpus: %s: not applied", why);
        cpus_unpin(a);
        return;
    }
    if (a->cpus_pinned && CPU_EQUAL(&rep, &a->cpus_rep)) {
        (void)sy_replica_set_cpus(a->rep, &rep); /* a new replica module: its thread too */
        return;
    }
    cpus_unpin(a);
    CPU_ZERO(&train);
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &a->cpus_start) && !CPU_ISSET(c, &rep)) CPU_SET(c, &train);
    if (CPU_COUNT(&train) == 0) {
        cpus_say(a, "none left", true, "cluster.replica_cpus %s: leaves this worker no CPU to train on (it may use %s): "
                 "not applied", list, sy_cpulist_str(&a->cpus_start).s);
        return;
    }
    int e = sy_affinity_set_all(&train);
    sy_status st = e ? sy_err_set(SY_EIO, "the training threads to CPUs %s: %s", sy_cpulist_str(&train).s, strerror(e))
                     : sy_dataplane_pin(a->rdp, &rep);
    if (st == SY_OK && (e = sy_replica_set_cpus(a->rep, &rep)) != 0)
        st = sy_err_set(SY_EIO, "the replica thread to CPUs %s: %s", list, strerror(e));
    a->cpus_pinned = true;
    a->cpus_rep = rep;
    if (st != SY_OK) {
        cpus_say(a, "failed", true, "cluster.replica_cpus %s: %s; not applied (this host's CPUs for the worker: %s)",
                 list, sy_err_msg(), sy_cpulist_str(&a->cpus_start).s);
        cpus_unpin(a);
        return;
    }
    cpus_say(a, "on", false, "cluster.replica_cpus: the replication runs on CPUs %s, training on CPUs %s",
             sy_cpulist_str(&rep).s, sy_cpulist_str(&train).s);
}

static void replica_kill_hook(void *ctx, int64_t step, int round, int rounds);

static sy_status setup(agent_t *a, const char *config_json) {
    upload_collect(a, false);
    json_error_t jerr;
    json_t *j = json_loads(config_json ? config_json : "", 0, &jerr);
    if (!j) return sy_err_set(SY_EINVAL, "Assign: config is not JSON: %s", jerr.text);
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    sy_status st = sy_config_defaults(&cfg);
    if (st == SY_OK) st = sy_config_from_json(&cfg, j);
    json_decref(j);
    if (st == SY_OK && a->opts->threads > 0) cfg.train.threads = a->opts->threads;
    int cores = sy_cpu_count();
    if (st == SY_OK && cfg.train.threads > cores) {
        /* the run's config is written for every machine of the cluster: cap it at ours */
        sy_warn("train.threads %d is more than the %d core(s) this worker may use: using %d", cfg.train.threads,
                cores, cores);
        cfg.train.threads = cores;
    }
    if (st == SY_OK) st = sy_config_validate(&cfg);
    if (st != SY_OK) {
        sy_config_free(&cfg);
        return sy_err_prefix(st, "Assign: config");
    }
    if (a->have_cfg) sy_config_free(&a->cfg);
    a->cfg = cfg;
    a->have_cfg = true;

    sy_model_dims d = sy_model_dims_from_config(&a->cfg);
    bool bf16 = a->cfg.train.precision == SY_PREC_BF16;
    bool rebuild = !a->model || !dims_equal(&d, &a->dims) || a->be->bf16 != bf16;
    bool new_store = !a->store || strcmp(sy_store_url(a->store), a->cfg.checkpoint.store) != 0;
    /* the uploader reads the model's table, the store and the snapshot: let it finish first
     * when they are about to go (a recovery with the same model does not wait for it) */
    if (rebuild || new_store) upload_collect(a, true);
    if (rebuild) {
        snapshot_drop(a);
        sy_replica_destroy(&a->rep);
        sy_adamw_destroy(&a->opt);
        sy_model_destroy(&a->model);
        sy_backend_destroy(&a->be);
        free(a->tokens), free(a->counts), free(a->owned), free(a->placement);
        a->tokens = NULL, a->counts = NULL, a->owned = NULL, a->placement = NULL;
        /* a config too big for this machine is a clear error, not the OOM killer (memplan.h) */
        SY_CHECK(sy_memplan_check_world(&a->cfg, 1, a->world));
        const char *bk = a->opts->backend ? a->opts->backend : a->cfg.cluster.backend;
        if (bk && strcmp(bk, "cuda") == 0) {
            sy_status st = sy_backend_cuda_new(a->opts->device, bf16, &a->be);
            if (st != SY_OK)
                return sy_err_prefix(st, "%s", a->opts->backend ? "--backend cuda" : "cluster.backend: cuda");
        } else {
            SY_CHECK(sy_backend_cpu_new(a->cfg.train.threads, bf16, &a->be));
        }
        SY_CHECK(sy_model_new(&d, a->be, &a->model));
        a->dims = d;
        a->tokens = malloc(sizeof(int32_t) * (size_t)d.B * (d.T + 1));
        a->counts = calloc((size_t)(sy_model_n_switch(a->model) + 1) * d.E, sizeof(int32_t));
        a->owned = calloc((size_t)d.E, sizeof(bool));
        a->placement = calloc((size_t)d.E, sizeof(uint32_t));
        if (!a->tokens || !a->counts || !a->owned || !a->placement) return sy_err_set(SY_ENOMEM, "out of memory");
    }
    /* The same model keeps its optimizer: its moments are part of the live state, which a
     * recovery from replicas may restore from (replica.h). */
    if (a->opt) sy_adamw_configure(a->opt, &a->cfg);
    else SY_CHECK(sy_adamw_new(a->model, &a->cfg, &a->opt));
    if (!a->rep) {
        SY_CHECK(sy_replica_new(a->model, a->opt, &a->rep));
        if (a->kill_at >= 0) sy_replica_set_piece_hook(a->rep, replica_kill_hook, a);
        /* test hook (tests/py/test_replicas.py D): smaller pieces, so that an exchange of
         * gradients has several; every worker of the run gets the same value */
        const char *pb = getenv("SY_TEST_REPLICA_PIECE_BYTES");
        if (pb) sy_replica_set_piece_bytes(a->rep, (size_t)strtoull(pb, NULL, 10));
    }
    if (a->rdp && a->cfg.cluster.replicas > 0) {
        const bool bg = sy_replica_set_background(a->rep, a->cfg.cluster.replica_background ? a->rdp : NULL);
        if (a->cfg.cluster.replica_background && !bg && !a->bg_said) {
            sy_info("replicas: the exchange runs in the normal scheduling class (this process may not leave "
                    "the idle class again: it needs CAP_SYS_NICE or ulimit -e of 20 or more)");
            a->bg_said = true;
        }
    }
    apply_replica_cpus(a);
    sy_data_destroy(&a->data);
    sy_data_options dopts;
    sy_data_options_from_config(&a->cfg, &dopts);
    SY_CHECK(sy_data_open_with((const char *const *)a->cfg.data.train.items, a->cfg.data.train.n,
                               a->cfg.model.vocab_size, a->cfg.model.seq_len, &dopts, &a->data));
    sy_data_destroy(&a->val);
    SY_CHECK(sy_dist_open_val(&a->cfg, &a->val, &a->val_batches));
    free(a->terms);
    a->terms = calloc(3 * (size_t)(a->cfg.train.global_batch_seqs / a->cfg.train.micro_batch_seqs), sizeof(double));
    if (!a->terms) return sy_err_set(SY_ENOMEM, "out of memory");
    if (new_store) {
        sy_store_destroy(&a->store);
        SY_CHECK(sy_store_open_config(&a->cfg, &a->store));
    }
    return SY_OK;
}

typedef enum { RUN_DONE, RUN_ABORTED, RUN_FAILED, RUN_STOP, RUN_NEXT } run_end;

/* "0-2,5" style list of the experts set in mask. */
/* The warning every generation's log line carries when the worker runs --insecure (issue 12). */
static const char *insecure_note(const agent_t *a) {
    return a->opts->insecure && !a->curve ? " [INSECURE: --insecure, no CurveZMQ key]" : "";
}

static void experts_string(char *buf, size_t cap, const bool *mask, int E) {
    size_t n = 0;
    buf[0] = 0;
    for (int e = 0; e < E && n + 16 < cap; e++) {
        if (!mask[e]) continue;
        int f = e;
        while (e + 1 < E && mask[e + 1]) e++;
        n += (size_t)snprintf(buf + n, cap - n, "%s%d", n ? "," : "", f);
        if (e > f) n += (size_t)snprintf(buf + n, cap - n, "-%d", e);
    }
    if (!buf[0]) snprintf(buf, cap, "none");
}

/* Keeps this rank's state of a checkpoint it wrote (system spec §3: a survivor restores from
 * its in-memory copy where it holds one and fetches from the store only what it newly owns). */
static void snapshot_drop(agent_t *a) {
    for (int k = 0; k < 2; k++) {
        snapshot *sn = &a->snap[k];
        free(sn->p), free(sn->m), free(sn->v), free(sn->owned);
        memset(sn, 0, sizeof *sn);
        sn->step = -1;
    }
}

/* Copies the live state into the older snapshot slot (never the one an upload reads: callers
 * collect the upload first). Returns the slot, or -1 without memory. */
static int snapshot_take(agent_t *a, int64_t step) {
    size_t n = sy_model_numel(a->model);
    const int E = a->dims.E;
    int k = a->snap[0].step <= a->snap[1].step ? 0 : 1;
    snapshot *sn = &a->snap[k];
    if (!sn->p) {
        sn->p = malloc(sizeof(float) * n);
        sn->m = malloc(sizeof(float) * n);
        sn->v = malloc(sizeof(float) * n);
        sn->owned = calloc((size_t)E, sizeof(bool));
        if (!sn->p || !sn->m || !sn->v || !sn->owned) {
            free(sn->p), free(sn->m), free(sn->v), free(sn->owned);
            memset(sn, 0, sizeof *sn);
            sn->step = -1;
            sy_err_set(SY_ENOMEM, "no memory for the in-memory checkpoint copy");
            return -1;
        }
    }
    sy_backend_t *be = sy_model_backend(a->model); /* the live state is backend memory */
    be->download(be, sn->p, sy_model_params(a->model), sizeof(float) * n);
    be->download(be, sn->m, sy_adamw_m(a->opt), sizeof(float) * n);
    be->download(be, sn->v, sy_adamw_v(a->opt), sizeof(float) * n);
    memcpy(sn->owned, a->owned, sizeof(bool) * (size_t)E);
    sn->t = sy_adamw_t_count(a->opt);
    sn->step = step;
    return k;
}

/* Uploads parameter p of a snapshot (params and moments) into the live (backend) buffers. */
static void snapshot_copy_param(agent_t *a, const snapshot *sn, const sy_param_t *p) {
    sy_backend_t *be = sy_model_backend(a->model);
    const size_t bytes = sizeof(float) * p->numel;
    be->upload(be, sy_model_params(a->model) + p->offset, sn->p + p->offset, bytes);
    be->upload(be, sy_adamw_m(a->opt) + p->offset, sn->m + p->offset, bytes);
    be->upload(be, sy_adamw_v(a->opt) + p->offset, sn->v + p->offset, bytes);
}

/* Loads checkpoint `step` for the experts this rank owns now: from the in-memory copy what it
 * has (dense + experts it owned when it wrote that checkpoint), the rest from the store. */
static sy_status restore(agent_t *a, int64_t step) {
    const int E = a->dims.E;
    sy_replica_set_live(a->rep, -1, NULL); /* the live state is being replaced */
    const snapshot *sn = a->snap[0].step == step && a->snap[0].p   ? &a->snap[0]
                         : a->snap[1].step == step && a->snap[1].p ? &a->snap[1]
                                                                   : NULL;
    if (!sn) {
        SY_CHECK(sy_model_ckpt_load(a->store, a->cfg.run.name, step, a->model, a->opt, a->owned));
        snprintf(a->restore_note, sizeof a->restore_note, "from the store");
        return SY_OK;
    }
    bool need[E > 0 ? E : 1];
    int from_mem = 0, from_store = 0;
    for (int e = 0; e < E; e++) {
        need[e] = a->owned[e] && !sn->owned[e];
        from_store += need[e];
        from_mem += a->owned[e] && sn->owned[e];
    }
    if (from_store > 0)
        SY_CHECK(sy_model_ckpt_load_experts(a->store, a->cfg.run.name, step, a->model, a->opt, need));
    for (int i = 0; i < sy_model_n_params(a->model); i++) {
        const sy_param_t *p = sy_model_param(a->model, i);
        if (p->expert < 0 || (a->owned[p->expert] && sn->owned[p->expert])) snapshot_copy_param(a, sn, p);
    }
    sy_adamw_set_t_count(a->opt, sn->t);
    sy_model_weights_changed(a->model);
    snprintf(a->restore_note, sizeof a->restore_note, "dense and %d expert(s) from memory, %d from the store",
             from_mem, from_store);
    return SY_OK;
}

/* Writes this rank's checkpoint files of `step` from the snapshot buffers (rank 0: dense +
 * owned experts; others: owned experts). *files: the JSON list for CheckpointPart (NULL when
 * the step is already committed). Runs on the uploader thread. */
static sy_status write_part(agent_t *a, int rank, int64_t step, json_t **files) {
    sy_model_ckpt_plan plan;
    *files = NULL;
    const snapshot *sn = &a->snap[a->up_slot];
    SY_CHECK(sy_model_ckpt_plan_new(a->model, sn->p, sn->m, sn->v, sn->owned, &plan));
    int skip = rank == 0 ? 0 : 2; /* the dense files come first in the plan */
    sy_status st = SY_OK;
    if (plan.n - skip > 0)
    {
        /* objects named for the generation and rank that write them (docs/security.md "Stale
         * workers"): this writer, if it turns out stale, can only add objects no commit of a
         * newer generation lists */
        char tag[64];
        st = sy_ckpt_part_tag(tag, sizeof tag, a->up_gen, rank);
        if (st == SY_OK)
            st = sy_ckpt_write_part_tagged(a->store, a->up_run, step, tag, plan.groups + skip, plan.n - skip, files);
    }
    else
        *files = json_array(); /* a rank without experts still reports its (empty) part */
    sy_model_ckpt_plan_free(&plan);
    if (st == SY_EEXIST) { /* already committed (a re-run after a recovery): nothing to add */
        json_decref(*files);
        *files = NULL;
        return SY_OK;
    }
    return st;
}

static void *uploader_main(void *arg) {
    agent_t *a = arg;
    pthread_mutex_lock(&a->up_mu);
    for (;;) {
        while (!a->up_quit && !(a->up_busy && !a->up_done)) pthread_cond_wait(&a->up_cv, &a->up_mu);
        if (a->up_quit) break;
        int64_t step = a->up_step;
        int rank = a->up_rank;
        pthread_mutex_unlock(&a->up_mu);
        json_t *files = NULL;
        sy_status st = write_part(a, rank, step, &files);
        pthread_mutex_lock(&a->up_mu);
        a->up_st = st;
        snprintf(a->up_err, sizeof a->up_err, "%s", st == SY_OK ? "" : sy_err_msg());
        a->up_files = files;
        a->up_done = true;
        pthread_cond_broadcast(&a->up_cv);
    }
    pthread_mutex_unlock(&a->up_mu);
    return NULL;
}

/* Sends CheckpointPart(step) stamped with the generation that wrote it. */
static void send_part(agent_t *a, uint64_t inc, uint64_t gen, int64_t step, json_t *files) {
    size_t n = json_array_size(files);
    Sy__ObjectInfo *objs = calloc(n ? n : 1, sizeof *objs);
    Sy__ObjectInfo **ptrs = calloc(n ? n : 1, sizeof *ptrs);
    for (size_t i = 0; i < n && objs && ptrs; i++) {
        json_t *f = json_array_get(files, i);
        sy__object_info__init(&objs[i]);
        objs[i].name = (char *)json_string_value(json_object_get(f, "name"));
        objs[i].size = (uint64_t)json_integer_value(json_object_get(f, "size"));
        objs[i].sha256 = (char *)json_string_value(json_object_get(f, "sha256"));
        objs[i].object = (char *)json_string_value(json_object_get(f, "object"));
        ptrs[i] = &objs[i];
    }
    Sy__Envelope env;
    Sy__CheckpointPart cp = SY__CHECKPOINT_PART__INIT;
    cp.step = (uint64_t)step;
    cp.n_objects = objs && ptrs ? n : 0;
    cp.objects = ptrs;
    sy__envelope__init(&env);
    env.body_case = SY__ENVELOPE__BODY_CHECKPOINT_PART;
    env.checkpoint_part = &cp;
    agent_send_gen(a, &env, inc, gen);
    free(objs);
    free(ptrs);
}

/* Takes the result of a finished upload (waits for one in flight when `block`) and reports it:
 * CheckpointPart, or Fault(storage) so the coordinator never commits a partial checkpoint. */
static void upload_collect(agent_t *a, bool block) {
    if (!a->up_started) return;
    pthread_mutex_lock(&a->up_mu);
    if (a->up_busy && !a->up_done && block)
        while (!a->up_done) pthread_cond_wait(&a->up_cv, &a->up_mu);
    bool have = a->up_busy && a->up_done;
    int64_t step = a->up_step;
    uint64_t gen = a->up_gen, inc = a->up_inc;
    sy_status st = a->up_st;
    char err[512];
    snprintf(err, sizeof err, "%s", a->up_err);
    json_t *files = a->up_files;
    if (have) {
        a->up_busy = a->up_done = false;
        a->up_files = NULL;
    }
    pthread_mutex_unlock(&a->up_mu);
    if (!have) return;
    if (st == SY_OK && files) {
        send_part(a, inc, gen, step, files);
    } else if (st != SY_OK) {
        char detail[700];
        snprintf(detail, sizeof detail, "checkpoint step %lld: %s", (long long)step, err);
        sy_error("%s", detail);
        send_fault_gen(a, "storage", detail, -1, step, inc, gen);
    }
    json_decref(files);
}

/* Checkpoint `step`: copy the state into the snapshot (the training stall), then write the files
 * in the background (checkpoint.async) or right away. */
static bool upload_busy(agent_t *a) {
    if (!a->up_started) return false;
    pthread_mutex_lock(&a->up_mu);
    bool b = a->up_busy;
    pthread_mutex_unlock(&a->up_mu);
    return b;
}

static sy_status save_checkpoint(agent_t *a, int64_t step) {
    set_state(a, ST_SAVING);
    upload_collect(a, false);
    if (upload_busy(a) && a->cfg.checkpoint.on_busy == SY_ONBUSY_SKIP) {
        sy_warn("checkpoint step %lld skipped: the previous upload is still in flight (checkpoint.on_busy skip)",
                (long long)step);
        return SY_OK;
    }
    upload_collect(a, true); /* at most one in flight; a snapshot is about to change */
    int slot = snapshot_take(a, step);
    if (slot < 0) return SY_ENOMEM;
    if (!a->up_started) {
        if (pthread_create(&a->up_th, NULL, uploader_main, a) != 0)
            return sy_err_set(SY_EINTERNAL, "cannot start the checkpoint uploader thread");
        a->up_started = true;
    }
    pthread_mutex_lock(&a->up_mu);
    snprintf(a->up_run, sizeof a->up_run, "%s", a->cfg.run.name);
    a->up_slot = slot;
    a->up_step = step;
    a->up_gen = atomic_load(&a->generation);
    a->up_inc = atomic_load(&a->gen_inc);
    a->up_rank = a->rank;
    a->up_busy = true;
    a->up_done = false;
    pthread_cond_broadcast(&a->up_cv);
    pthread_mutex_unlock(&a->up_mu);
    if (!a->cfg.checkpoint.async) upload_collect(a, true);
    return SY_OK;
}

static void send_step_done(agent_t *a, int64_t step, const sy_step_result *r, double ms, double val_loss) {
    const int nsw = sy_model_n_switch(a->model);
    /* per layer: every expert's counts of this rank's micro-batches, or (expert parallelism) the
     * whole step's counts of the experts this rank owns (StepDone.counts_owned) */
    const int E = r->counts_owned ? sy_ep_n_owned(sy_model_ep(a->model)) : a->dims.E;
    Sy__LayerCounts *lc = calloc((size_t)(nsw ? nsw : 1), sizeof *lc);
    Sy__LayerCounts **lcp = calloc((size_t)(nsw ? nsw : 1), sizeof *lcp);
    uint32_t *vals = calloc((size_t)(nsw ? nsw : 1) * (E ? E : 1), sizeof *vals);
    for (int l = 0; l < nsw; l++) {
        sy__layer_counts__init(&lc[l]);
        for (int e = 0; e < E; e++) vals[l * E + e] = (uint32_t)r->counts[l * E + e];
        lc[l].n_counts = (size_t)E;
        lc[l].counts = vals + (size_t)l * E;
        lcp[l] = &lc[l];
    }
    Sy__Envelope env;
    Sy__StepDone sd = SY__STEP_DONE__INIT;
    sd.step = (uint64_t)step;
    sd.ce = r->ce, sd.aux = r->aux, sd.z = r->z;
    sd.tokens = (uint64_t)r->tokens;
    sd.n_expert_counts = (size_t)nsw;
    sd.expert_counts = lcp;
    sd.counts_owned = r->counts_owned;
    sd.dropped = (uint64_t)r->dropped;
    sd.routed = (uint64_t)r->routed;
    sd.step_ms = ms;
    sd.grad_norm = r->grad_norm;
    sd.lr = r->lr;
    sd.micro_batches = (uint32_t)r->micro_batches;
    if (r->terms) sd.n_micro_terms = 3 * (size_t)r->micro_batches, sd.micro_terms = r->terms;
    if (!isnan(val_loss)) sd.val_batches = (uint32_t)a->val_batches, sd.val_loss = val_loss;
    sy__envelope__init(&env);
    env.body_case = SY__ENVELOPE__BODY_STEP_DONE;
    env.step_done = &sd;
    agent_send(a, &env);
    free(lc), free(lcp), free(vals);
}

/* Test hook (SY_TEST_REPLICA_KILL=ID@STEP, tests/py/test_replicas.py): this worker dies by
 * SIGKILL once the first piece of step STEP's replicas went out, so that its buddy holds a
 * half-received replica of that step. */
static void replica_kill_hook(void *ctx, int64_t step, int round, int rounds) {
    agent_t *a = ctx;
    if (step != a->kill_at || round != 0) return;
    sy_warn("SY_TEST_REPLICA_KILL: dying after piece 1 of %d of step %lld's replicas", rounds, (long long)step);
    fflush(stdout);
    fflush(stderr);
    raise(SIGKILL);
}

/* After step L (docs/fault-tolerance.md "Overlapped exchange"): with a replica data plane, wait
 * for step L - 1's exchange (every rank then holds its replicas of L - 1), then post L's, which
 * the replica thread copies and sends while L + 1 computes; `wait` (a restore, a fresh start)
 * waits for it too, so the restored state is replicated before the first step. Without one,
 * the exchange of L runs here, over the training data plane. */
static sy_status replicate(agent_t *a, bool wait) {
    if (a->replicas <= 0 || a->world < 2) return SY_OK;
    if (!a->rcomm) return sy_replica_exchange(a->rep, a->comm, a->placement, a->replicas);
    SY_CHECK(sy_replica_wait(a->rep));
    SY_CHECK(sy_replica_post(a->rep, a->rcomm, a->placement, a->replicas));
    return wait ? sy_replica_wait(a->rep) : SY_OK;
}

/* sy_dist_ctx.before_update: the update must not run before the replica thread copied the
 * previous step's state. */
static void replica_before_update(void *arg) { sy_replica_wait_copied(arg); }

/* Holdings: what this worker can give a recovery (sent when it leaves an aborted or failed
 * generation, stamped with it). */
static void send_holdings(agent_t *a) {
    if (!a->rep) return;
    sy_replica_held h[SY_REPLICA_MAX_HELD];
    int n = sy_replica_holdings(a->rep, h);
    const int E = a->dims.E;
    Sy__StateHeld sh[SY_REPLICA_MAX_HELD], *shp[SY_REPLICA_MAX_HELD];
    uint32_t *ex = calloc((size_t)(n ? n : 1) * (size_t)(E ? E : 1), sizeof(uint32_t));
    if (!ex) return;
    for (int i = 0; i < n; i++) {
        sy__state_held__init(&sh[i]);
        sh[i].step = h[i].step;
        sh[i].dense = h[i].dense;
        sh[i].experts = ex + (size_t)i * E;
        for (int e = 0; e < E; e++)
            if (h[i].experts[e]) sh[i].experts[sh[i].n_experts++] = (uint32_t)e;
        shp[i] = &sh[i];
    }
    Sy__Envelope env;
    Sy__Holdings ho = SY__HOLDINGS__INIT;
    ho.n_held = (size_t)n;
    ho.held = shp;
    sy__envelope__init(&env);
    env.body_case = SY__ENVELOPE__BODY_HOLDINGS;
    env.holdings = &ho;
    agent_send(a, &env);
    free(ex);
}

/* The Assign's peer table, whole or as an edit of the one held (docs/protocol.md "Peer tables"),
 * becomes the table held. SY_EFORMAT when it edits a table this worker does not hold, or does not
 * fit it: the table held is then forgotten (heartbeats say none), so the next Assign is whole. */
static sy_status take_peers(agent_t *a, const Sy__Envelope *env) {
    const Sy__Assign *as = env->assign;
    char **ep = NULL, **key = NULL;
    sy_status st;
    if (!as->peers_base) {
        if ((int)as->n_peers != (int)as->world)
            return sy_err_set(SY_EFORMAT, "Assign: world %u with %zu peers", as->world, as->n_peers);
        st = sy_peers_copy((int)as->n_peers, (const char *const *)as->peers,
                           as->n_peer_keys ? (const char *const *)as->peer_keys : NULL, &ep, &key);
    } else if (as->peers_base != atomic_load(&a->peers_gen) || env->incarnation != atomic_load(&a->peers_inc)) {
        st = sy_err_set(SY_EFORMAT, "Assign: a peer table edit of generation %llu; this worker holds generation %llu's",
                        (unsigned long long)as->peers_base, (unsigned long long)atomic_load(&a->peers_gen));
    } else {
        st = sy_peers_apply(a->peers_n, (const char *const *)a->peers_ep, (const char *const *)a->peers_key,
                            as->peers_edit, as->n_peers_edit, (const char *const *)as->peers,
                            as->n_peer_keys ? (const char *const *)as->peer_keys : NULL, as->n_peers, (int)as->world,
                            &ep, &key);
    }
    /* the replica endpoints, whole or by the same edit (entries copied from the base are those
     * whose data and replica endpoints both match: the coordinator compares them together) */
    char **rep = NULL, **nokey = NULL;
    /* An edit with no fresh entry (a loss: every member's entry comes from the base) carries no
     * replica endpoint either, yet the table has them exactly when the base had them (the
     * coordinator compares "data|replica" pairs, so a base entry matches only one of the same
     * form): the base's replica table, edited by the same runs. Dropping it made this worker
     * replicate on the training plane while its peers used their replica plane (a 10 s
     * data_timeout_ms stall at the next generation start), and refuse the next edit with a fresh
     * entry (issue 18: a respawned worker joining after a kill). */
    bool rep_from_base = as->peers_base && as->n_peers == 0 && as->n_replica_peers == 0 && a->peers_rep;
    if (st == SY_OK && rep_from_base)
        st = sy_peers_apply(a->peers_n, (const char *const *)a->peers_rep, NULL, as->peers_edit, as->n_peers_edit,
                            NULL, NULL, 0, (int)as->world, &rep, &nokey);
    else if (st == SY_OK && as->n_replica_peers > 0) {
        if (!as->peers_base && as->n_replica_peers != as->world)
            st = sy_err_set(SY_EFORMAT, "Assign: world %u with %zu replica peers", as->world, as->n_replica_peers);
        else if (!as->peers_base)
            st = sy_peers_copy((int)as->world, (const char *const *)as->replica_peers, NULL, &rep, &nokey);
        else
            st = sy_peers_apply(a->peers_rep ? a->peers_n : 0, (const char *const *)a->peers_rep, NULL, as->peers_edit,
                                as->n_peers_edit, (const char *const *)as->replica_peers, NULL, as->n_replica_peers,
                                (int)as->world, &rep, &nokey);
    }
    if (st != SY_OK) { /* ep/key are NULL when the first half failed */
        sy_peers_free((int)as->world, ep, key);
        ep = key = NULL;
    }
    sy_peers_free(a->peers_n, a->peers_ep, a->peers_key);
    sy_peers_free(a->peers_n, a->peers_rep, NULL);
    a->peers_ep = ep;
    a->peers_key = key;
    a->peers_rep = rep;
    a->peers_n = st == SY_OK ? (int)as->world : 0;
    atomic_store(&a->peers_inc, env->incarnation);
    atomic_store(&a->peers_gen, st == SY_OK ? env->generation : 0);
    return st;
}

/* A generation ending after its EndAfter step `last`: the replicas of that step go out whole
 * (the exchange in flight on the replica plane is waited for), then the caller leaves. */
static void end_after_wait(agent_t *a, uint64_t gen, int64_t last, bool leaving) {
    sy_status st = a->rcomm ? sy_replica_wait(a->rep) : SY_OK;
    sy_info("generation %llu ends after step %lld (membership change%s)%s%s", (unsigned long long)gen,
            (long long)last, leaving ? "; this worker leaves" : "",
            st == SY_OK ? "" : ": its replicas' exchange was cut short: ", st == SY_OK ? "" : sy_err_msg());
}

/* Executes one Assign. */
static run_end run_assign(agent_t *a, const Sy__Envelope *env) {
    const Sy__Assign *as = env->assign;
    uint64_t gen = env->generation;
    double t_assign = sy_mono_s() * 1e3, t_setup = t_assign, t_planes = t_assign, t_restored = t_assign;
    close_generation(a);
    atomic_store(&a->gen_inc, env->incarnation);
    atomic_store(&a->generation, gen);
    set_state(a, ST_RESTORING);
    a->rank = (int)as->rank;
    a->world = (int)as->world;
    char detail[1024];
    sy_status st;
    int64_t fault_step = 0;
    if (a->world < 1 || a->rank >= a->world) {
        snprintf(detail, sizeof detail, "Assign: rank %d of world %d", a->rank, a->world);
        send_fault(a, "internal", detail, -1, 0);
        return RUN_FAILED;
    }
    if (take_peers(a, env) != SY_OK) {
        snprintf(detail, sizeof detail, "rank %d of world %d: %s", a->rank, a->world, sy_err_msg());
        send_fault(a, "internal", detail, -1, 0);
        return RUN_FAILED;
    }
    st = setup(a, as->config_json);
    if (st == SY_ENOMEM) {
        /* the next Assign of this config would fail the same way: report it and leave */
        a->fatal = true;
        snprintf(a->fatal_msg, sizeof a->fatal_msg, "%s", sy_err_msg());
    }
    if (st != SY_OK) goto fail;
    t_setup = sy_mono_s() * 1e3;
    atomic_store(&a->coord_timeout_ms, 2 * a->cfg.cluster.failure_timeout_ms);
    const int E = a->dims.E;
    if ((int)as->n_placement != E) {
        sy_err_set(SY_EINVAL, "Assign: placement has %zu entries for %d experts", as->n_placement, E);
        goto fail;
    }
    for (int e = 0; e < E; e++) a->owned[e] = (int)as->placement[e] == a->rank;
    if (a->rep_inc != env->incarnation) { /* states of another coordinator's run are not this run's */
        sy_replica_forget(a->rep);
        a->rep_inc = env->incarnation;
    }
    memcpy(a->placement, as->placement, sizeof(uint32_t) * (size_t)E);
    a->replicas = a->cfg.cluster.replicas < a->world - 1 ? a->cfg.cluster.replicas : a->world - 1;
    bool from_replicas = as->restore_source && !strcmp(as->restore_source, "replicas");
    if (from_replicas && ((int)as->n_expert_source != E || as->dense_source < 0 || as->dense_source >= a->world)) {
        sy_err_set(SY_EINVAL, "Assign: a restore from replicas with %zu expert sources for %d experts and dense "
                   "source %d", as->n_expert_source, E, as->dense_source);
        goto fail;
    }
    if (a->curve && !a->peers_key) {
        /* a CURVE data plane admits only the members' keys: without them no peer could connect */
        sy_err_set(SY_EINVAL, "Assign: no data-plane keys for a world of %d (CURVE data plane)", a->world);
        goto fail;
    }
    pthread_mutex_lock(&a->mu);
    if (a->curve)
        st = sy_comm_new_curve(a->dp, gen, a->rank, a->world, (const char *const *)a->peers_ep,
                               (const char *const *)a->peers_key, a->cfg.cluster.data_timeout_ms, &a->comm);
    else
        st = sy_comm_new(a->dp, gen, a->rank, a->world, (const char *const *)a->peers_ep,
                         a->cfg.cluster.data_timeout_ms, &a->comm);
    /* The replicas' own communicator, when every member has a replica data plane. */
    if (st == SY_OK && a->rdp && a->world > 1 && a->replicas > 0 && a->peers_rep) {
        if (a->curve)
            st = sy_comm_new_curve(a->rdp, gen, a->rank, a->world, (const char *const *)a->peers_rep,
                                   (const char *const *)a->peers_key, a->cfg.cluster.data_timeout_ms, &a->rcomm);
        else
            st = sy_comm_new(a->rdp, gen, a->rank, a->world, (const char *const *)a->peers_rep,
                             a->cfg.cluster.data_timeout_ms, &a->rcomm);
    }
    pthread_mutex_unlock(&a->mu);
    if (st != SY_OK) goto fail;
    t_planes = sy_mono_s() * 1e3;
    if (a->world > 1 && sy_model_n_switch(a->model) > 0) {
        if (sy_ep_new(a->be, a->comm, as->placement, E, a->dims.D, a->dims.F, a->dims.B * a->dims.T,
                      sy_model_n_switch(a->model), &a->ep) != SY_OK)
            goto fail;
        sy_model_set_ep(a->model, a->ep, a->rank);
    }
    char owned_s[256];
    experts_string(owned_s, sizeof owned_s, a->owned, E);
    if (as->restore_step >= 0 && from_replicas) {
        set_state(a, ST_RESTORING);
        st = sy_replica_restore(a->rep, a->world > 1 ? a->comm : NULL, a->rank, a->world, as->restore_step,
                                as->dense_source, as->expert_source, as->placement, a->restore_note,
                                sizeof a->restore_note);
        if (st == SY_EABORTED) goto aborted;
        if (st == SY_EINVAL) goto fail; /* a plan this worker cannot follow: Fault(internal) */
        if (st != SY_OK) goto step_failed; /* the data plane: a peer's fault */
        sy_info("generation %llu: rank %d/%d, restored step %lld (%s), experts %s%s",
                (unsigned long long)gen, a->rank, a->world, (long long)as->restore_step,
                a->restore_note, owned_s, insecure_note(a));
    } else if (as->restore_step >= 0) {
        if (restore(a, as->restore_step) != SY_OK) goto fail;
        sy_replica_set_live(a->rep, as->restore_step, a->owned);
        sy_info("generation %llu: rank %d/%d, restored step %lld (%s), experts %s%s",
                (unsigned long long)gen, a->rank, a->world, (long long)as->restore_step,
                a->restore_note, owned_s, insecure_note(a));
    } else {
        sy_model_init(a->model, a->cfg.run.seed);
        sy_adamw_reset(a->opt); /* the optimizer outlives generations (setup) */
        sy_replica_set_live(a->rep, 0, a->owned);
        sy_info("generation %llu: rank %d/%d, fresh start, experts %s%s", (unsigned long long)gen,
                a->rank, a->world, owned_s, insecure_note(a));
    }
    atomic_store(&a->step, as->restore_step > 0 ? as->restore_step : 0);
    pthread_mutex_lock(&a->mu);
    a->ea_gen = 0, a->ea_step = 0; /* no EndAfter yet in this generation */
    pthread_mutex_unlock(&a->mu);
    t_restored = sy_mono_s() * 1e3;
    /* The restored state goes to the buddies at once: under the new placement their replicas
     * of it may not exist yet, and the next failure may come before the first step ends. */
    double w0 = sy_replica_get_stats(a->rep).wait_ms;
    st = replicate(a, true);
    a->rep_start_wait_ms += sy_replica_get_stats(a->rep).wait_ms - w0;
    if (st == SY_EABORTED) goto aborted;
    if (st != SY_OK) goto step_failed;
    /* where a generation's start goes (issue 18: a recovery's cost, docs/fault-tolerance.md) */
    double t_ready = sy_mono_s() * 1e3;
    sy_info("generation %llu: ready %.0f ms after its Assign (setup %.0f, data planes %.0f, restore %.0f, "
            "replicas of the restored step %.0f)", (unsigned long long)gen, t_ready - t_assign, t_setup - t_assign,
            t_planes - t_setup, t_restored - t_planes, t_ready - t_restored);

    sy_dist_ctx ctx = {.cfg = &a->cfg, .model = a->model, .opt = a->opt, .data = a->data,
                       .comm = a->comm, .owned = a->owned, .tokens = a->tokens,
                       .before_update = replica_before_update, .before_arg = a->rep};
    int64_t ckpt_now = -1, end_after = 0;
    for (int64_t step = (int64_t)as->start_step; step <= (int64_t)as->end_step; step++) {
        /* control messages between steps */
        Sy__Envelope *m;
        bool paused = false;
    between_steps:
        while ((m = agent_recv(a, 0)) != NULL) {
            run_end r = RUN_DONE;
            bool leave = false;
            uint64_t msg_ea = 0; /* Abort/Stop.end_after: the close at our EndAfter step */
            switch (m->body_case) {
            case SY__ENVELOPE__BODY_ABORT:
                if (m->generation == gen) r = RUN_ABORTED, leave = true, msg_ea = m->abort->end_after;
                break;
            case SY__ENVELOPE__BODY_STOP:
                r = RUN_STOP, leave = true;
                if (m->generation == gen) msg_ea = m->stop->end_after;
                break;
            case SY__ENVELOPE__BODY_ASSIGN:
            case SY__ENVELOPE__BODY_WELCOME:
                stash(a, m);
                r = RUN_NEXT, leave = true;
                break;
            case SY__ENVELOPE__BODY_CHECKPOINT_NOW:
                ckpt_now = (int64_t)m->checkpoint_now->step;
                break;
            case SY__ENVELOPE__BODY_END_AFTER:
                if (m->generation == gen) end_after = (int64_t)m->end_after->step;
                break;
            default: break;
            }
            sy_proto_free(m);
            /* The Abort (or a drained member's Stop) that closes an EndAfter generation: the
             * coordinator sent it once every member had reported step end_after, so every
             * member is here too and the replicas of that step can go out whole (cutting them
             * short would leave the Holdings a step behind: one step run twice). */
            if (leave && msg_ea > 0 && (int64_t)msg_ea == end_after && step > end_after)
                end_after_wait(a, gen, step - 1, r == RUN_STOP);
            if (leave) {
                abort_generation(a);
                close_generation(a);
                set_state(a, ST_IDLE);
                return r;
            }
        }
        if (g_stop || atomic_load(&a->link_failed)) return RUN_STOP;
        if (end_after > 0 && step > end_after) {
            /* EndAfter (a membership change at a step boundary): the replicas of the last step
             * go out whole first (an Abort cuts them short), then leave as an Abort would; the
             * Holdings (sent by the caller) name the live state of step - 1 */
            end_after_wait(a, gen, step - 1, false);
            abort_generation(a);
            close_generation(a);
            set_state(a, ST_IDLE);
            return RUN_ABORTED;
        }
        /* Issue 13 (c), the coordinator cut off: its keepalives stop, and after
         * failure_timeout_ms it declares us lost, so steps taken meanwhile are thrown away (their
         * StepDone queue up for a coordinator that moved on). Stop stepping after
         * SY_AGENT_PAUSE_HEARTBEATS missed keepalives, until it speaks again (a message goes
         * through the loop above) or the link thread registers anew (its Welcome ends this
         * generation). */
        int64_t silent = (int64_t)(sy_mono_s() * 1e3) - atomic_load(&a->heard_ms);
        int64_t pause_ms = (int64_t)SY_AGENT_PAUSE_HEARTBEATS * a->cfg.cluster.heartbeat_ms;
        if (pause_ms > a->cfg.cluster.failure_timeout_ms) pause_ms = a->cfg.cluster.failure_timeout_ms;
        if (silent > pause_ms) {
            if (!paused)
                sy_warn("no word from the coordinator for %lld ms: pausing before step %lld",
                        (long long)silent, (long long)step);
            paused = true;
            if ((m = agent_recv(a, SY_AGENT_PAUSE_POLL_MS)) != NULL) {
                stash(a, m);
                sy_proto_free(m);
            }
            goto between_steps;
        }
        if (paused) sy_info("the coordinator is heard again: resuming at step %lld", (long long)step);
        upload_collect(a, false);
        set_state(a, ST_TRAINING);
        a->counts[0] = 0;
        sy_step_result res = {.counts = a->counts, .terms = a->terms};
        double t0 = (sy_mono_s() * 1e3);
        st = sy_dist_step(&ctx, step, &res);
        /* The update of `step` is in the live state once the step returned SY_OK (it is the
         * step's last act, after every collective). Inline, its replicas go out before StepDone:
         * a step the coordinator records has a whole replica of every expert. Overlapped, the
         * exchange of step - 1 must be whole everywhere before this StepDone (point 3 of
         * docs/fault-tolerance.md "Overlapped exchange"; its error is this step's), and this
         * step's goes out while the next one computes. */
        sy_status wst = st == SY_OK && a->rcomm ? sy_replica_wait(a->rep) : SY_OK;
        /* the update is in the live buffers even when the exchange of step - 1 failed: the
         * replicas must not offer those buffers as step - 1 (holdings, a restore) */
        if (st == SY_OK) sy_replica_stepped(a->rep, step);
        if (st == SY_OK) st = wst;
        if (st == SY_OK) st = replicate(a, false);
        double val_loss = NAN, ms = (sy_mono_s() * 1e3) - t0; /* the step's time leaves validation out */
        if (st == SY_OK && a->val && sy_dist_eval_due(&a->cfg, step))
            st = sy_dist_eval(&ctx, a->val, a->val_batches, &val_loss);
        if (st != SY_OK) {
            if (st == SY_EABORTED) {
                sy_info("generation %llu aborted during step %lld", (unsigned long long)gen, (long long)step);
                goto aborted;
            }
            fault_step = step;
            goto step_failed;
        }
        atomic_store(&a->step, step); /* before StepDone: the link thread's EndAfter boundary */
        send_step_done(a, step, &res, ms, val_loss);
        bool due = (a->cfg.checkpoint.every > 0 && step % a->cfg.checkpoint.every == 0) ||
                   step == (int64_t)as->end_step || step == ckpt_now;
        if (due && save_checkpoint(a, step) != SY_OK) {
            snprintf(detail, sizeof detail, "checkpoint step %lld: %s", (long long)step, sy_err_msg());
            sy_error("%s", detail);
            send_fault(a, "storage", detail, -1, step);
        }
    }
    set_state(a, ST_IDLE);
    return RUN_DONE;
aborted:
    abort_generation(a);
    close_generation(a);
    set_state(a, ST_IDLE);
    return RUN_ABORTED;
step_failed:
    sy_error("step %lld failed: %s", (long long)fault_step, sy_err_msg());
    if (sy_comm_device_lost(a->comm)) {
        /* a sticky CUDA error in the data plane: report it, then exit so that the process is
         * restarted with a fresh context (as the CUDA backend does) */
        send_fault(a, "device", sy_err_msg(), -1, fault_step);
        a->fatal = true;
        a->fatal_rc = SY_AGENT_EXIT_DEVICE;
        snprintf(a->fatal_msg, sizeof a->fatal_msg, "the CUDA context is lost: %s", sy_err_msg());
        close_generation(a);
        set_state(a, ST_IDLE);
        return RUN_FAILED;
    }
    send_fault(a, st == SY_ETIMEOUT ? "peer_timeout" : "peer_error", sy_err_msg(),
               st == SY_ETIMEOUT ? first_missing_rank(sy_err_msg()) : -1, fault_step);
    abort_generation(a);
    close_generation(a);
    set_state(a, ST_IDLE);
    return RUN_FAILED;
fail:
    snprintf(detail, sizeof detail, "%s", sy_err_msg());
    sy_error("generation %llu: %s", (unsigned long long)gen, detail);
    send_fault(a, "internal", detail, -1, 0);
    abort_generation(a);
    close_generation(a);
    set_state(a, ST_IDLE);
    return RUN_FAILED;
}

int sy_agent_run(const sy_agent_opts *opts) {
    agent_t a;
    memset(&a, 0, sizeof a);
    a.opts = opts;
    a.snap[0].step = a.snap[1].step = -1;
    a.kill_at = -1;
    int rc = 1;
    gethostname(a.host, sizeof a.host - 1);
    if (sched_getaffinity(0, sizeof a.cpus_start, &a.cpus_start) != 0) CPU_ZERO(&a.cpus_start); /* then never pinned */
    if (opts->id) snprintf(a.id, sizeof a.id, "%s", opts->id);
    else if (snprintf(a.id, sizeof a.id, "%.100s-%d", a.host, (int)getpid()) < 0) a.id[0] = 0;
    char role[160];
    if (snprintf(role, sizeof role, "worker %s", a.id) >= (int)sizeof role) role[sizeof role - 1] = 0;
    sy_log_set_role(role);
    const char *kill = getenv("SY_TEST_REPLICA_KILL"); /* "ID@STEP": replica_kill_hook */
    const char *at = kill ? strrchr(kill, '@') : NULL;
    if (at && (size_t)(at - kill) == strlen(a.id) && !strncmp(kill, a.id, strlen(a.id))) a.kill_at = atoll(at + 1);
    pthread_mutex_init(&a.mu, NULL);
    pthread_mutex_init(&a.up_mu, NULL);
    pthread_cond_init(&a.up_cv, NULL);
    atomic_store(&a.hb_ms, SY_AGENT_DEFAULT_HB_MS);
    atomic_store(&a.coord_timeout_ms, SY_AGENT_DEFAULT_COORD_TIMEOUT_MS);
    atomic_store(&a.heard_ms, (int64_t)(sy_mono_s() * 1e3));
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    pthread_t wd;
    if (pthread_create(&wd, NULL, stop_watchdog, NULL) == 0) pthread_detach(wd);
    else sy_warn("cannot start the stop watchdog thread: SIGTERM waits for the current step");

    if (!opts->curve_key != !opts->curve_server_public) {
        sy_error("--curve-key and --curve-server-public go together");
        rc = 2;
        goto out;
    }
    if (opts->curve_key) {
        sy_curve_key server;
        if (sy_curve_available("--curve-key") != SY_OK ||
            sy_curve_load_key(opts->curve_key, true, &a.key) != SY_OK) {
            sy_error("--curve-key: %s", sy_err_msg());
            rc = 2;
            goto out;
        }
        if (sy_curve_load_key(opts->curve_server_public, false, &server) != SY_OK) {
            sy_error("--curve-server-public: %s", sy_err_msg());
            rc = 2;
            goto out;
        }
        memcpy(a.server_public, server.public_z85, sizeof a.server_public);
        a.curve = true;
        sy_info("control plane: CURVE, our public key %s, coordinator's %s", a.key.public_z85, a.server_public);
    }
    /* With a CURVE key the data plane is CURVE too (docs/security.md "Data plane"): the PULL
     * socket is a server with our key pair and admits only the generation's members' keys. */
    const char *dp_kind = opts->comm ? opts->comm : "tcp";
    const char *dp_bind = opts->data_bind ? opts->data_bind : "tcp://127.0.0.1:*";
    if ((a.curve ? sy_dataplane_new_curve(dp_kind, dp_bind, a.key.public_z85, a.key.secret_z85, &a.dp)
                 : sy_dataplane_new(dp_kind, dp_bind, &a.dp)) != SY_OK) {
        sy_error("data plane: %s", sy_err_msg());
        goto out;
    }
    /* The replicas' data plane: same kind, host and keys, any free port. A worker without one
     * replicates between steps on the data plane above: so does one started with the benchmark
     * hook SY_TEST_REPLICA_INLINE=1 (bench/replica_cost.py's A/B), and one whose address space
     * is limited (ulimit -v): a data plane's threads (ZeroMQ's I/O and reaper threads, a CURVE
     * ZAP handler) reserve tens of MB of address space each, and ZeroMQ aborts the process when
     * it cannot start one, where the model's own memory check would have said what is missing. */
    struct rlimit as_lim;
    bool as_limited = getrlimit(RLIMIT_AS, &as_lim) == 0 && as_lim.rlim_cur != RLIM_INFINITY;
    if (as_limited)
        sy_info("address space limited (ulimit -v): no replica data plane, replicas (if any) are exchanged "
                "between steps");
    if (!as_limited && (!getenv("SY_TEST_REPLICA_INLINE") || strcmp(getenv("SY_TEST_REPLICA_INLINE"), "1") != 0)) {
        char rbind[300];
        const char *colon = strrchr(dp_bind, ':');
        snprintf(rbind, sizeof rbind, "%.*s:*", colon ? (int)(colon - dp_bind) : (int)strlen(dp_bind), dp_bind);
        if ((a.curve ? sy_dataplane_new_curve(dp_kind, rbind, a.key.public_z85, a.key.secret_z85, &a.rdp)
                     : sy_dataplane_new(dp_kind, rbind, &a.rdp)) != SY_OK) {
            sy_warn("replica data plane at %s: %s (replicas are exchanged between steps)", rbind, sy_err_msg());
            a.rdp = NULL;
        }
    }
    a.zctx = zmq_ctx_new();
    a.pair_main = zmq_socket(a.zctx, ZMQ_PAIR);
    snprintf(a.inproc, sizeof a.inproc, "inproc://sy-agent-%p", (void *)&a);
    int linger = 0;
    zmq_setsockopt(a.pair_main, ZMQ_LINGER, &linger, sizeof linger);
    zmq_bind(a.pair_main, a.inproc);
    if (pthread_create(&a.link, NULL, link_main, &a) != 0) {
        sy_error("cannot start the link thread");
        goto out;
    }
    a.link_started = true;
    sy_info("data plane at %s (%s); connecting to %s", sy_dataplane_endpoint(a.dp),
            a.curve ? "CURVE" : "plaintext", opts->coordinator);

    while (!g_stop && !atomic_load(&a.refused) && !atomic_load(&a.link_failed)) {
        Sy__Envelope *m = agent_recv(&a, 100);
        upload_collect(&a, false); /* a part finished after the last step is reported here */
        if (!m) continue;
        run_end r = RUN_DONE;
        switch (m->body_case) {
        case SY__ENVELOPE__BODY_ASSIGN:
            r = run_assign(&a, m);
            if (r == RUN_ABORTED || r == RUN_FAILED) send_holdings(&a);
            break;
        case SY__ENVELOPE__BODY_STOP: r = RUN_STOP; break;
        default: break;
        }
        if (r == RUN_STOP) {
            sy_info("stop: %s", m->body_case == SY__ENVELOPE__BODY_STOP && m->stop->reason ? m->stop->reason : "asked to stop");
            sy_proto_free(m);
            rc = atomic_load(&a.link_failed) ? 1 : 0;
            goto out;
        }
        if (r == RUN_FAILED && a.fatal) {
            sy_error("cannot go on: %s; exiting", a.fatal_msg);
            sy_proto_free(m);
            rc = a.fatal_rc ? a.fatal_rc : 1;
            goto out;
        }
        sy_proto_free(m);
    }
    /* else SIGINT/SIGTERM: a clean exit */
    rc = atomic_load(&a.refused) ? SY_AGENT_EXIT_REFUSED : atomic_load(&a.link_failed) ? 1 : 0;
out:; /* a label takes a statement, not a declaration (C11) */
    bool abandoned = false;
    if (a.up_started) {
        upload_collect(&a, false);
        /* An upload still in flight at exit belongs to a checkpoint the run no longer needs
         * (the coordinator stops workers only after the last commit): leave it as debris
         * rather than wait out the store's retries. */
        abandoned = upload_busy(&a);
        if (abandoned) sy_warn("exiting with a checkpoint upload in flight (left as uncommitted debris)");
        pthread_mutex_lock(&a.up_mu);
        a.up_quit = true;
        pthread_cond_broadcast(&a.up_cv);
        pthread_mutex_unlock(&a.up_mu);
        if (!abandoned) pthread_join(a.up_th, NULL);
    }
    if (a.link_started) {
        atomic_store(&a.link_stop, 1);
        pthread_join(a.link, NULL);
    }
    close_generation(&a);
    free(a.pending);
    sy_curve_key_wipe(&a.key);
    if (abandoned) {
        /* The uploader thread still reads the model, the store and the snapshot, and may sit in
         * a store request: end the process here, without freeing them and without the atexit
         * handlers of libraries that thread is inside (OpenSSL, libcurl). */
        fflush(stdout);
        fflush(stderr);
        _exit(rc);
    }
    snapshot_drop(&a);
    if (a.pair_main) zmq_close(a.pair_main);
    if (a.zctx) zmq_ctx_term(a.zctx);
    sy_dataplane_destroy(&a.rdp);
    sy_dataplane_destroy(&a.dp);
    sy_peers_free(a.peers_n, a.peers_ep, a.peers_key);
    sy_peers_free(a.peers_n, a.peers_rep, NULL);
    sy_adamw_destroy(&a.opt);
    sy_model_destroy(&a.model);
    sy_backend_destroy(&a.be);
    sy_data_destroy(&a.data);
    sy_data_destroy(&a.val);
    free(a.terms);
    sy_store_destroy(&a.store);
    if (a.have_cfg) sy_config_free(&a.cfg);
    sy_replica_destroy(&a.rep);
    free(a.tokens), free(a.counts), free(a.owned), free(a.placement);
    pthread_mutex_destroy(&a.mu);
    pthread_mutex_destroy(&a.up_mu);
    pthread_cond_destroy(&a.up_cv);
    atomic_store(&g_main_done, 1);
    return rc;
}
