/* The coordinator's reactor (coord.h): its life cycle (open the store, claim the run, bind the
 * control socket, start the HTTP server), the zmq_poll loop and its cron, the intake of every
 * message (frames, envelope, run id, sender, proof of identity, incarnation, generation) and its
 * dispatch to the concern that handles it, HTTP requests, the status snapshot, events.jsonl and
 * the drop counters. The concerns live beside it, sharing coord_internal.h: coord_members.c
 * (registration, liveness, generations), coord_steps.c (StepDone aggregation),
 * coord_ckpt.c (checkpoint parts and commits) and coord_status.c (/v1/status, /metrics). */
#include "coordinator/coord.h"

#include <math.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>
#include <zmq.h>

#include "base/fsutil.h"
#include "base/log.h"
#include "base/zmq_check.h"
#include "coordinator/committer.h"
#include "proto/peers.h"
#include "coordinator/http.h"
#include "coordinator/zap.h"
#include "proto/curve.h"
#include "proto/protocol.h"
#include "storage/ckpt.h"
#include "storage/ckpt_run.h"
#include "storage/store.h"
#include "storage/store_s3.h"
#include "coord_internal.h"

/* Delay after the last registration before a generation opens, so that workers starting
 * together join the same generation: this many heartbeats, clamped to [SETTLE_MIN, SETTLE_MAX]. */
#define SETTLE_HEARTBEATS 2
#define SETTLE_MIN_MS 100
#define SETTLE_MAX_MS 1000
/* Status snapshot republished at least this often (heartbeat ages move). */
#define PUBLISH_MS 250
/* ... and, after a change, at once unless publishing would take more than 1/this of the reactor. */
#define PUBLISH_SHARE 10
/* The run history (/v1/history) is republished at most this often. */
#define HISTORY_PUBLISH_MS 1000
/* Rate limit of drop warnings: one line per reason per this many ms. */
#define DROP_LOG_MS 2000
/* Socket linger at close (ms): lets the final Stops leave. */
#define LINGER_MS 1000
/* ZAP domain of the control socket (CURVE on): requests of another domain are refused. */
#define ZAP_DOMAIN "switchyard"
/* Failed CURVE handshakes (a plaintext worker, a wrong server key) are logged at most this often. */
#define HANDSHAKE_LOG_MS 10000

const char *const sy_coord_wstate[W__COUNT] = {"idle", "active", "draining", "lost", "stopped"};
const char *const sy_coord_rstate[R_STOPPED + 1] = {"waiting", "running", "recovering", "finished", "failed", "stopped"};

static sy_status drain_socket(sy_coord_t *c);
static void on_message(sy_coord_t *c, const uint8_t *rid, size_t rid_len, const void *buf, size_t len);
static void drain_monitor(sy_coord_t *c);
static void handshake_failed(sy_coord_t *c, uint16_t event, uint32_t value);
static void cron(sy_coord_t *c);
static void on_request(sy_coord_t *c, const sy_http_cmd *cmd);
static void publish(sy_coord_t *c);
static int count_switch(const sy_config_t *cfg);
static sy_status curve_setup(sy_coord_t *c);
static sy_status bind_socket(sy_coord_t *c, const char *bind);
static sy_status curve_server(sy_coord_t *c);

/* ---------------------------------------------------------------------------------------- */
/* Life cycle                                                                               */

sy_status sy_coord_new(const sy_config_t *cfg, const sy_coord_opts *opts, sy_coord_t **out) {
    *out = NULL;
    sy_status s = SY_OK;
    sy_coord_t *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "out of memory");
    c->latest_ckpt = -1;
    c->val_loss = NAN; /* no validation yet */
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
    SY_CHECK_GOTO(sy_history_new(c->n_switch, c->E, &c->history), s, fail);
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
    if (mode[0] == 'a') sy_coord_history_reload(c, path);
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
        s = sy_err_zmq(SY_EIO, errno, "zmq socket");
        goto fail;
    }
    if (cfg->cluster.curve_server_key && cfg->cluster.curve_server_key[0]) SY_CHECK_GOTO(curve_setup(c), s, fail);
    SY_CHECK_GOTO(bind_socket(c, opts && opts->bind ? opts->bind : cfg->cluster.bind), s, fail);
    const char *saddr = opts && opts->status_addr ? opts->status_addr : cfg->status.addr;
    const sy_http_opts hopts = {.token = cfg->status.token, .auth_get = cfg->status.auth_get,
                                .tls_cert = cfg->status.tls_cert, .tls_key = cfg->status.tls_key};
    SY_CHECK_GOTO(sy_http_start(saddr, &hopts, &c->http), s, fail);
    char host[256];
    const char *colon = strrchr(saddr, ':');
    snprintf(host, sizeof host, "%.*s", (int)(colon - saddr), saddr);
    snprintf(c->status_url, sizeof c->status_url, "%s://%s:%d", sy_http_tls(c->http) ? "https" : "http", host,
             sy_http_port(c->http));
    c->settle_from = sy_mono_ms();
    char inc[24];
    snprintf(inc, sizeof inc, "%016" PRIx64, c->incarnation);
    sy_coord_event(c, "coordinator_started",
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
            s = sy_err_zmq(SY_EIO, errno, "zmq_poll");
            break;
        }
        if (rc > 0 && (it[0].revents & ZMQ_POLLIN)) SY_CHECK_GOTO(drain_socket(c), s, out);
        if (rc > 0 && (it[1].revents & ZMQ_POLLIN)) sy_coord_drain_commits(c);
        if (rc > 0 && i_zap >= 0 && (it[i_zap].revents & ZMQ_POLLIN) && sy_zap_handle(c->zap) > 0) c->dirty = true;
        if (rc > 0 && i_mon >= 0 && (it[i_mon].revents & ZMQ_POLLIN)) drain_monitor(c);
        if (stop_flag && *stop_flag && !c->done) sy_coord_finish(c, R_STOPPED, "signal");
        now = sy_mono_ms();
        if ((now >= next_cron || c->cron_now) && !c->done) {
            c->cron_now = false;
            cron(c);
            next_cron = now + SY_COORD_CRON_MS;
        }
    }
out:
    /* Stopped with a commit in flight: let it finish (its parts are durable) and record it. */
    if (sy_committer_in_flight(c->committer) > 0) {
        sy_info("waiting for %d checkpoint commit(s) in flight", sy_committer_in_flight(c->committer));
        sy_committer_wait(c->committer);
        sy_coord_drain_commits(c);
    }
    publish(c);
    *outcome = c->outcome;
    return s;
}

void sy_coord_destroy(sy_coord_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_coord_t *c = *self_p;
    sy_http_destroy(&c->http);
    /* The monitor is stopped before its PAIR is closed: libzmq's I/O thread sends each event
     * with a blocking send while it holds the socket's monitor lock, so an event (a worker
     * disconnecting after its Stop) sent to a closed PAIR would block it for good, and
     * zmq_socket_monitor(NULL) here would wait on that lock forever: a coordinator that never
     * exits (tests/test_coord_exit.c). */
    if (c->sock && c->mon) zmq_socket_monitor(c->sock, NULL, 0);
    if (c->mon) zmq_close(c->mon);
    sy_zap_destroy(&c->zap);
    if (c->sock) zmq_close(c->sock);
    if (c->zctx) zmq_ctx_term(c->zctx);
    if (c->metrics_f) fclose(c->metrics_f);
    if (c->events_f) fclose(c->events_f);
    sy_coord_clear_pending(c);
    sy_committer_destroy(&c->committer); /* finishes a commit in flight: before the store goes */
    for (int i = 0; i < c->nrec; i++) json_decref(c->rec[i].lost);
    free(c->rec);
    json_decref(c->events);
    sy_store_destroy(&c->store);
    free(c->config_json);
    free(c->members);
    sy_peers_free(c->tab_n, c->tab_ep, c->tab_key);
    free(c->placement);
    free(c->own_off), free(c->own_exp);
    free(c->load);
    sy_history_destroy(&c->history);
    free(c->ms_by_step);
    for (int i = 0; i < c->nw; i++) free(c->w[i].held_ex);
    free(c->expert_source);
    free(c->w);
    free(c->wix);
    sy_config_free(&c->cfg);
    free(c);
    *self_p = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Messages from workers                                                                    */

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
                return sy_err_zmq(SY_EIO, e, "control socket receive");
            }
            more = zmq_msg_more(&m);
            if (n < 3) parts[n++] = m;
            else {
                zmq_msg_close(&m);
                extra++;
            }
        }
        if (n != 2 || extra) {
            sy_coord_drop(c, SY_DROP_BAD_FRAME, "message of %d frames (expected 1 after the routing id)",
                          n + extra - 1);
        } else if (zmq_msg_size(&parts[1]) == 0) {
            sy_coord_drop(c, SY_DROP_BAD_FRAME, "empty frame");
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

static void on_message(sy_coord_t *c, const uint8_t *rid, size_t rid_len, const void *buf, size_t len) {
    Sy__Envelope *env = NULL;
    sy_proto_drop why = sy_proto_unpack(buf, len, &env);
    if (why != SY_DROP_NONE) {
        sy_coord_drop(c, why, "%s", sy_err_msg());
        return;
    }
    /* A worker learns the run from Welcome, so its Hello may carry an empty run id. */
    const char *run = env->run_id ? env->run_id : "";
    if (strcmp(run, c->cfg.run.name) != 0 && !(env->body_case == SY__ENVELOPE__BODY_HELLO && !run[0])) {
        sy_coord_drop(c, SY_DROP_RUN_ID, "%s with run id '%.64s', this run is '%s'",
                      sy_proto_body_name(env->body_case), run, c->cfg.run.name);
        goto out;
    }
    switch (env->body_case) {
    case SY__ENVELOPE__BODY_HELLO:
    case SY__ENVELOPE__BODY_HEARTBEAT:
    case SY__ENVELOPE__BODY_STEP_DONE:
    case SY__ENVELOPE__BODY_CHECKPOINT_PART:
    case SY__ENVELOPE__BODY_FAULT:
    case SY__ENVELOPE__BODY_HOLDINGS:
        break;
    default:
        sy_coord_drop(c, SY_DROP_UNKNOWN_MESSAGE, "message body '%s' is not one a worker sends",
                      sy_proto_body_name(env->body_case));
        goto out;
    }
    if (env->body_case == SY__ENVELOPE__BODY_HELLO) {
        sy_coord_on_hello(c, rid, rid_len, env);
        goto out;
    }
    int i = sy_coord_find_sender(c, rid, rid_len);
    if (i < 0) {
        sy_coord_drop(c, SY_DROP_UNKNOWN_WORKER, "%s from an unregistered sender", sy_proto_body_name(env->body_case));
        /* A worker we do not know (we were restarted, or forgot it): tell it at its next
         * heartbeat to register again, instead of letting it wait for its silence timeout
         * (docs/protocol.md "Re-registration"). */
        if (env->body_case == SY__ENVELOPE__BODY_HEARTBEAT) sy_coord_send_reregister(c, rid, rid_len);
        goto out;
    }
    worker *w = &c->w[i];
    if (!sy_coord_proves(c, w, env)) {
        /* The routing id names a registered worker, but the message lacks that registration's
         * secret (or key): an impostor, or a process the id no longer belongs to. Counted and
         * dropped; it changes nothing (not even liveness). */
        sy_coord_drop(c, SY_DROP_AUTH, "%s for worker '%s' without its session secret%s",
                      sy_proto_body_name(env->body_case), w->id, c->zap ? " or from another CURVE key" : "");
        goto out;
    }
    if (w->rid_len != rid_len || memcmp(w->rid, rid, rid_len) != 0) {
        /* the worker speaks from a new socket (it reopened it): answer there from now on */
        sy_debug("worker %s now speaks from another socket", w->id);
        memcpy(w->rid, rid, rid_len);
        w->rid_len = rid_len;
    }
    if (env->incarnation != c->incarnation) {
        sy_coord_drop(c, SY_DROP_INCARNATION, "%s from %s with incarnation %016" PRIx64,
                      sy_proto_body_name(env->body_case), w->id, env->incarnation);
        goto out;
    }
    if (w->state == W_STOPPED) {
        sy_coord_drop(c, SY_DROP_UNEXPECTED, "%s from %s, which was stopped", sy_proto_body_name(env->body_case),
                      w->id);
        goto out;
    }
    if (w->state == W_LOST && w->fd_closed && c->src_fd == w->closed_fd) {
        /* Sent before its connection closed, read after the disconnect event (the monitor is
         * another socket): a dead process's last words, not a return. Taken as one, it came
         * back as a spare, joined the next generation and was lost again failure_timeout_ms
         * later: a second recovery (issue 14: the 1,000-worker run's early generation 2). A
         * worker that is alive speaks again from a new connection, or registers again. */
        sy_debug("%s from %s on its closed connection: ignored", sy_proto_body_name(env->body_case), w->id);
        goto out;
    }
    sy_coord_heard_from(c, w);
    if (env->body_case == SY__ENVELOPE__BODY_HEARTBEAT) {
        sy_coord_on_heartbeat(c, w, env);
        goto out;
    }
    if (env->body_case == SY__ENVELOPE__BODY_HOLDINGS) { /* sent after leaving a generation */
        sy_coord_on_holdings(c, w, env);
        goto out;
    }
    /* Results must belong to the open generation, from one of its members. */
    if (!c->gen_open || env->generation != c->gen) {
        sy_coord_drop(c, SY_DROP_STALE_GENERATION, "%s from %s for generation %" PRIu64 " (current %" PRIu64 "%s)",
                      sy_proto_body_name(env->body_case), w->id, env->generation, c->gen,
                      c->gen_open ? "" : ", closed");
        goto out;
    }
    if (w->rank < 0) {
        sy_coord_drop(c, SY_DROP_UNEXPECTED, "%s from %s, which is not in generation %" PRIu64,
                      sy_proto_body_name(env->body_case), w->id, c->gen);
        goto out;
    }
    if (env->body_case == SY__ENVELOPE__BODY_STEP_DONE) sy_coord_on_step_done(c, w, env->step_done);
    else if (env->body_case == SY__ENVELOPE__BODY_CHECKPOINT_PART)
        sy_coord_on_checkpoint_part(c, w, env->checkpoint_part);
    else sy_coord_on_fault(c, w, env->fault);
out:
    sy_proto_free(env);
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
            if (sy_coord_live(w) && w->fd == (int)value) {
                w->fd = -1;
                w->fd_closed = true;
                w->closed_fd = (int)value;
                sy_coord_worker_lost(c, i, "its connection closed (ZeroMQ disconnect)");
                break;
            }
        }
    }
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

/* ---------------------------------------------------------------------------------------- */
/* Cron and HTTP requests                                                                   */

static void cron(sy_coord_t *c) {
    int64_t now = sy_mono_ms();
    /* Every heartbeat_ms (at most failure_timeout_ms / 3): a worker that misses
     * SY_AGENT_PAUSE_HEARTBEATS (src/worker/agent.c) of them stops stepping (issue 13 (c): the coordinator cut off). */
    int64_t keepalive_ms = c->cfg.cluster.heartbeat_ms;
    if (keepalive_ms > c->cfg.cluster.failure_timeout_ms / 3) keepalive_ms = c->cfg.cluster.failure_timeout_ms / 3;
    sy_http_cmd cmd;
    while (!c->done && sy_http_next_cmd(c->http, &cmd)) on_request(c, &cmd);
    for (int i = 0; i < c->nw && !c->done; i++) {
        worker *w = &c->w[i];
        if (!sy_coord_live(w)) continue;
        if (now - w->last_seen > c->cfg.cluster.failure_timeout_ms) {
            char why[96];
            snprintf(why, sizeof why, "no message for %" PRId64 " ms (failure_timeout_ms %d)", now - w->last_seen,
                     c->cfg.cluster.failure_timeout_ms);
            sy_coord_worker_lost(c, i, why);
        } else if (now - w->last_keepalive > keepalive_ms) {
            sy_coord_send_welcome(c, w); /* keepalive: workers re-register after failure_timeout_ms of silence */
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
            /* Nor does a membership change at a checkpoint (it waits for the Holdings only). */
            recovering = recovering || c->regroup_since;
            /* A commit in flight decides the restore point: wait for its result. */
            bool committing = sy_committer_in_flight(c->committer) > 0;
            /* The survivors' Holdings decide whether it restores from replicas (bounded wait). */
            bool holdings = sy_coord_holdings_pending(c);
            /* Everyone the launcher started is in: no need to wait for stragglers. */
            bool all_expected = !c->opened_once && c->expect_workers > 0 && idle >= c->expect_workers;
            if (!expecting && !committing && !holdings &&
                (since >= c->settle_ms || recovering || all_expected || idle >= c->cfg.cluster.max_workers)) {
                c->opened_once = true;
                sy_coord_open_generation(c);
            }
        }
    }
    /* Publishing is O(registered workers) (the status JSON lists each: ~30 ms at 10,000), so a
     * change republishes at once only if the reactor spent at most 1/PUBLISH_SHARE of the time
     * since the last one publishing (issue 14: at every 50 ms cron tick during a registration
     * storm it starved the message intake); with a few workers that is every tick, as before. */
    int64_t since_pub = now - c->last_publish, paced = PUBLISH_SHARE * c->publish_cost_ms;
    if ((c->dirty && since_pub >= paced) || since_pub >= (paced > PUBLISH_MS ? paced : PUBLISH_MS)) publish(c);
}

static void on_request(sy_coord_t *c, const sy_http_cmd *cmd) {
    if (cmd->kind == SY_HTTP_CMD_STOP) {
        sy_coord_finish(c, R_STOPPED, "stop requested over HTTP");
        return;
    }
    if (cmd->kind == SY_HTTP_CMD_CHECKPOINT) {
        /* Two steps ahead of the furthest report: no rank can have finished it yet. */
        int64_t target = c->max_reported + 2;
        if (!c->gen_open || target > c->end_step) {
            const char *why = c->gen_open ? "too close to the end" : "no generation running";
            sy_coord_event(c, "checkpoint_request_ignored", json_pack("{s:s}", "reason", why));
            return;
        }
        Sy__Envelope env;
        Sy__CheckpointNow cn = SY__CHECKPOINT_NOW__INIT;
        sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
        cn.step = (uint64_t)target;
        env.body_case = SY__ENVELOPE__BODY_CHECKPOINT_NOW;
        env.checkpoint_now = &cn;
        sy_coord_send_members(c, &env);
        sy_coord_event(c, "checkpoint_requested", json_pack("{s:I}", "step", (json_int_t)target));
        return;
    }
    if (cmd->kind == SY_HTTP_CMD_LOST) { /* the launcher saw the process exit */
        int li = sy_coord_find_worker(c, cmd->arg);
        if (li < 0 || !sy_coord_live(&c->w[li])) {
            sy_info("lost report for '%s': not a live worker; ignored", cmd->arg);
        } else if (cmd->pid && c->w[li].pid != cmd->pid) {
            sy_info("lost report for '%s' about pid %u: it is registered with pid %u; ignored", cmd->arg,
                    (unsigned)cmd->pid, (unsigned)c->w[li].pid);
        } else {
            char why[96];
            snprintf(why, sizeof why, "process %u exited (reported by the launcher)", (unsigned)c->w[li].pid);
            sy_coord_worker_lost(c, li, why);
        }
        return;
    }
    int i = sy_coord_find_worker(c, cmd->arg);
    if (i < 0 || !sy_coord_live(&c->w[i])) {
        sy_warn("drain: no live worker '%s'", cmd->arg);
        return;
    }
    worker *w = &c->w[i];
    if (w->state == W_ACTIVE) {
        w->state = W_DRAINING; /* removed at the next committed checkpoint */
        sy_coord_event(c, "worker_draining", json_pack("{s:s, s:i}", "worker", w->id, "rank", w->rank));
    } else if (w->state == W_IDLE) {
        sy_coord_send_stop(c, w, "drained");
        w->state = W_STOPPED;
        sy_coord_event(c, "worker_drained", json_pack("{s:s}", "worker", w->id));
    }
}

static void publish(sy_coord_t *c) {
    int64_t t = sy_mono_ms();
    json_t *j = sy_coord_status_json(c);
    /* the workers one string each, so that the status server can page them (http.h) */
    json_t *ws = json_incref(json_object_get(j, "workers"));
    json_object_del(j, "workers");
    size_t nw = json_array_size(ws), k = 0;
    char **wjs = nw ? calloc(nw, sizeof *wjs) : NULL;
    for (; wjs && k < nw; k++)
        if (!(wjs[k] = json_dumps(json_array_get(ws, k), JSON_COMPACT))) break;
    json_decref(ws);
    char *s = (nw == 0 || k == nw) ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s) { /* out of memory: keep the last published status */
        for (size_t i = 0; wjs && i < k; i++) free(wjs[i]);
        free(wjs);
        wjs = NULL, nw = 0;
    }
    sy_http_publish(c->http, s, wjs, s ? nw : 0, sy_coord_metrics_text(c));
    c->last_publish = sy_mono_ms();
    /* the history is the large document: rebuilt only when it changed, at most every
     * HISTORY_PUBLISH_MS (the periodic publish catches up with the last steps) */
    uint64_t hv = sy_history_version(c->history);
    if (hv != c->history_published && (c->last_publish - c->history_published_at >= HISTORY_PUBLISH_MS || c->done)) {
        char *h = sy_history_json(c->history);
        if (h) {
            sy_http_publish_history(c->http, h);
            c->history_published = hv;
            c->history_published_at = c->last_publish;
        }
    }
    c->dirty = false;
    c->publish_cost_ms = sy_mono_ms() - t;
}

/* ---------------------------------------------------------------------------------------- */
/* Events and dropped messages                                                              */

/* Appends {"time", "event", ...fields} to events.jsonl and the recent list; steals fields. */
void sy_coord_event(sy_coord_t *c, const char *name, json_t *fields) {
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

void sy_coord_drop(sy_coord_t *c, sy_proto_drop why, const char *fmt, ...) {
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

/* ---------------------------------------------------------------------------------------- */
/* Control socket                                                                           */

static int count_switch(const sy_config_t *cfg) {
    int n = 0, S = cfg->model.switch_every;
    for (int l = 0; l < cfg->model.n_layers; l++)
        if (S > 0 && cfg->model.n_experts >= 1 && l % S == S - 1) n++;
    return n;
}

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
     * heartbeats close dead (half-open) connections within failure_timeout_ms + heartbeat_ms:
     * one heartbeat later than the reactor's own silence check, so a live but silent worker
     * (stopped, starved) is always declared lost for its silence, never by a race between the
     * two clocks on a loaded machine. The PING interval is failure_timeout_ms, not heartbeat_ms
     * (issue 14): libzmq cancels a connection's PONG timer with a linear search of all its
     * I/O thread's timers (poller_base_t::cancel_timer, "we assume it is rarely used"), once
     * per answered PING, so its cost is connections^2 / interval: at 10,000 workers and a
     * 500 ms interval that alone is more than a core. A silent worker is still lost at
     * failure_timeout_ms by the reactor's own check (cron); its dead connection is closed
     * within 2 x failure_timeout_ms + heartbeat_ms. */
    int hb_ivl = c->cfg.cluster.failure_timeout_ms,
        hb_ttl = c->cfg.cluster.failure_timeout_ms + c->cfg.cluster.heartbeat_ms;
    zmq_setsockopt(c->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(c->sock, ZMQ_ROUTER_HANDOVER, &one, sizeof one);
    zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_IVL, &hb_ivl, sizeof hb_ivl);
    zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_TIMEOUT, &hb_ttl, sizeof hb_ttl);
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (c->zap) SY_CHECK(curve_server(c));
    SY_CHECK_ZMQ(zmq_bind(c->sock, ep), "cannot bind the control socket at %s", ep);
    /* A worker process that dies closes its TCP connection: the monitor reports the disconnect
     * at once, well before heartbeat silence would (issue 5: detection in seconds). */
    char mon_ep[64];
    snprintf(mon_ep, sizeof mon_ep, "inproc://sy-coord-monitor-%p", (void *)c);
    int events = ZMQ_EVENT_DISCONNECTED;
    if (c->zap) events |= ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL;
    if (zmq_socket_monitor(c->sock, mon_ep, events) == 0) {
        c->mon = zmq_socket(c->zctx, ZMQ_PAIR);
        zmq_setsockopt(c->mon, ZMQ_LINGER, &linger, sizeof linger);
        /* No high-water mark on the events' pipe: when the reactor is not reading them (it has
         * ended, or it is busy) and thousands of workers disconnect at once (after their Stop),
         * a full pipe would block libzmq's I/O thread in its event send, holding the lock that
         * stopping the monitor needs. Each event is a few dozen bytes, one per connection. */
        int unlimited = 0;
        zmq_setsockopt(c->mon, ZMQ_RCVHWM, &unlimited, sizeof unlimited);
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

/* Makes the control socket a CURVE server with the coordinator's key; ZAP checks clients. */
static sy_status curve_server(sy_coord_t *c) {
    sy_curve_key key;
    sy_status s = sy_curve_load_key(c->cfg.cluster.curve_server_key, true, &key);
    if (s != SY_OK) return sy_err_prefix(s, "cluster.curve_server_key");
    int one = 1;
    if (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, key.secret_z85, SY_CURVE_Z85_LEN + 1) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_ZAP_DOMAIN, ZAP_DOMAIN, strlen(ZAP_DOMAIN)) != 0)
        s = sy_err_zmq(SY_EIO, errno, "cluster.curve_server_key: cannot make the control socket a CURVE server");
    if (s == SY_OK)
        sy_info("control plane: CURVE on, server public key %s, %d authorized worker key(s) from %s", key.public_z85,
                sy_zap_authorized(c->zap), c->cfg.cluster.curve_authorized_keys);
    sy_curve_key_wipe(&key);
    return s;
}
