/* sy_fakeworker: speaks docs/protocol.md like switchyard-worker, without training, to test the
 * coordinator (tests/py/test_coordinator.py).
 *
 *   sy_fakeworker --coordinator EP --run NAME [--id ID] [--step-ms N] [--die-at K]
 *   sy_fakeworker --coordinator EP --run NAME --hostile [--id ID] [--linger-ms N]
 *
 * Normal mode: Hello (with an empty run id, like the real worker) until Welcome, heartbeats,
 * and on Assign "trains" steps start..end, one every --step-ms, reporting StepDone with synthetic values whose sum over the W ranks is known:
 *   ce = 1/step, aux = 0.01, z = 0.001 (rank r sends the share (r+1)/(W(W+1)/2) of each),
 *   tokens 1000 per rank, counts[layer l][expert e] = (r+1)(e+1) + l, dropped r+1 of 100 routed,
 *   grad_norm 1, lr 1e-3.
 * At checkpoint steps (checkpoint.every, the last step, a CheckpointNow step) it writes tiny
 * real files with sy_ckpt_write_part (rank 0: dense + dense.optim; every rank: its experts'
 * files) and sends CheckpointPart. --die-at K: goes silent (no messages at all) instead of
 * running step K, and hangs until killed. Exits 0 on Stop.
 *
 * Hostile mode: sends garbage, a truncated Hello, a wrong version, a wrong run id, a result
 * from an unregistered sender, coordinator-only and empty bodies, an oversize frame, a
 * two-frame message, an empty frame, a duplicate Hello, a wrong incarnation and a stale
 * generation; then heartbeats for --linger-ms and exits 0. It prints one line per message. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "storage/ckpt.h"
#include "base/config.h"
#include "proto/protocol.h"
#include "storage/store.h"

static const char *ep, *run_id = "tiny", *wid;
static int step_ms = 50, die_at = -1, hostile, linger_ms = 1500;
static void *ctx, *sock;
static uint64_t incarnation;
static int heartbeat_ms = 100;

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The session secret of our registration (Welcome.session): echoed on every message. */
static uint8_t session[64];
static size_t session_len;

static void take_session(const Sy__Envelope *env) {
    const ProtobufCBinaryData *ses = &env->welcome->session;
    if (env->welcome->reregister || ses->len > sizeof session) return;
    memcpy(session, ses->data, ses->len);
    session_len = ses->len;
}

static void send_env(Sy__Envelope *env) {
    env->session.data = session;
    env->session.len = session_len;
    if (sy_proto_send(sock, NULL, 0, env) != SY_OK) fprintf(stderr, "fakeworker %s: %s\n", wid, sy_err_msg());
}

static void send_raw(const void *buf, size_t len, int more) {
    zmq_send(sock, buf, len, more ? ZMQ_SNDMORE : 0);
}

/* Like switchyard-worker, the Hello carries no run id: the worker learns it from Welcome. */
static void hello(uint64_t inc) {
    char host[64];
    gethostname(host, sizeof host);
    Sy__Envelope env;
    Sy__Hello h = SY__HELLO__INIT;
    sy_proto_init(&env, "", inc, 0);
    h.worker_id = (char *)wid;
    h.host = host;
    h.pid = (uint32_t)getpid();
    h.backend = "fake";
    h.version = "fake";
    h.data_endpoint = "tcp://127.0.0.1:1";
    env.body_case = SY__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    send_env(&env);
}

static void heartbeat(uint64_t gen, int64_t step, const char *state) {
    Sy__Envelope env;
    Sy__Heartbeat hb = SY__HEARTBEAT__INIT;
    sy_proto_init(&env, run_id, incarnation, gen);
    hb.step = (uint64_t)(step > 0 ? step : 0);
    hb.state = (char *)state;
    env.body_case = SY__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    send_env(&env);
}

/* Receives one envelope within timeout ms (NULL if none or invalid). */
static Sy__Envelope *recv_env(int timeout) {
    zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&it, 1, timeout) <= 0) return NULL;
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return NULL;
    }
    Sy__Envelope *env = NULL;
    sy_proto_drop d = sy_proto_unpack(zmq_msg_data(&m), zmq_msg_size(&m), &env);
    zmq_msg_close(&m);
    if (d != SY_DROP_NONE) fprintf(stderr, "fakeworker %s: dropped (%s)\n", wid, sy_proto_drop_name(d));
    return env;
}

/* ---- normal mode -------------------------------------------------------------------------- */

typedef struct {
    int active;
    uint64_t gen;
    int rank, world, E, n_switch;
    uint32_t *placement;
    int64_t cur, end, every, forced;
    sy_store_t *store;
    char run[128];
} assignment;

static void assignment_clear(assignment *a) {
    free(a->placement);
    sy_store_destroy(&a->store);
    memset(a, 0, sizeof *a);
}

static int take_assign(assignment *a, const Sy__Envelope *env) {
    const Sy__Assign *as = env->assign;
    sy_config_t cfg;
    sy_config_defaults(&cfg);
    json_t *j = json_loads(as->config_json ? as->config_json : "", 0, NULL);
    if (!j || sy_config_from_json(&cfg, j) != SY_OK) {
        fprintf(stderr, "fakeworker %s: bad config_json: %s\n", wid, sy_err_msg());
        json_decref(j);
        sy_config_free(&cfg);
        return -1;
    }
    json_decref(j);
    assignment_clear(a);
    a->gen = env->generation;
    a->rank = (int)as->rank;
    a->world = (int)as->world;
    a->E = cfg.model.n_experts;
    for (int l = 0; l < cfg.model.n_layers; l++)
        if (cfg.model.switch_every > 0 && l % cfg.model.switch_every == cfg.model.switch_every - 1) a->n_switch++;
    a->placement = calloc((size_t)a->E, sizeof(uint32_t));
    for (size_t e = 0; e < as->n_placement && (int)e < a->E; e++) a->placement[e] = as->placement[e];
    a->cur = (int64_t)as->start_step;
    a->end = (int64_t)as->end_step;
    a->every = cfg.checkpoint.every;
    a->forced = -1;
    snprintf(a->run, sizeof a->run, "%s", cfg.run.name);
    if (sy_store_open(cfg.checkpoint.store, &a->store) != SY_OK) {
        fprintf(stderr, "fakeworker %s: store: %s\n", wid, sy_err_msg());
        sy_config_free(&cfg);
        return -1;
    }
    sy_config_free(&cfg);
    a->active = 1;
    fprintf(stderr, "fakeworker %s: generation %llu rank %d/%d steps %lld..%lld restore %lld\n", wid,
            (unsigned long long)a->gen, a->rank, a->world, (long long)a->cur, (long long)a->end,
            (long long)as->restore_step);
    return 0;
}

static void step_done(assignment *a, int64_t step) {
    double share = (double)(a->rank + 1) / (a->world * (a->world + 1) / 2.0);
    Sy__Envelope env;
    Sy__StepDone sd = SY__STEP_DONE__INIT;
    sy_proto_init(&env, run_id, incarnation, a->gen);
    sd.step = (uint64_t)step;
    sd.ce = share / (double)step;
    sd.aux = share * 0.01;
    sd.z = share * 0.001;
    sd.tokens = 1000;
    sd.dropped = (uint64_t)a->rank + 1;
    sd.routed = 100;
    sd.step_ms = step_ms;
    sd.grad_norm = 1.0;
    sd.lr = 1e-3;
    sd.micro_batches = 1;
    Sy__LayerCounts *lcs = calloc((size_t)a->n_switch + 1, sizeof *lcs);
    Sy__LayerCounts **lp = calloc((size_t)a->n_switch + 1, sizeof *lp);
    uint32_t *counts = calloc((size_t)(a->n_switch * a->E) + 1, sizeof(uint32_t));
    for (int l = 0; l < a->n_switch; l++) {
        sy__layer_counts__init(&lcs[l]);
        for (int e = 0; e < a->E; e++) counts[l * a->E + e] = (uint32_t)((a->rank + 1) * (e + 1) + l);
        lcs[l].n_counts = (size_t)a->E;
        lcs[l].counts = counts + l * a->E;
        lp[l] = &lcs[l];
    }
    sd.n_expert_counts = (size_t)a->n_switch;
    sd.expert_counts = lp;
    env.body_case = SY__ENVELOPE__BODY_STEP_DONE;
    env.step_done = &sd;
    send_env(&env);
    free(lcs);
    free(lp);
    free(counts);
}

static void checkpoint_part(assignment *a, int64_t step) {
    char names[64][40];
    float vals[64][2];
    sy_tensor_ref refs[64];
    sy_ckpt_group groups[64];
    int n = 0;
    for (int e = -1; e < a->E && n + 2 <= 64; e++) {
        if (e < 0 ? a->rank != 0 : (int)a->placement[e] != a->rank) continue;
        for (int optim = 0; optim < 2; optim++) {
            if (e < 0) sy_ckpt_file_dense(names[n], sizeof names[n], optim);
            else sy_ckpt_file_expert(names[n], sizeof names[n], e, optim);
            vals[n][0] = (float)step;
            vals[n][1] = (float)e;
            refs[n] = (sy_tensor_ref){.name = "x", .ndim = 1, .shape = {2}, .data = vals[n]};
            groups[n] = (sy_ckpt_group){names[n], &refs[n], 1};
            n++;
        }
    }
    json_t *files = NULL;
    char tag[64];
    sy_status s = sy_ckpt_part_tag(tag, sizeof tag, a->gen, a->rank);
    if (s == SY_OK) s = sy_ckpt_write_part_tagged(a->store, a->run, step, tag, groups, n, &files);
    if (s != SY_OK) {
        fprintf(stderr, "fakeworker %s: checkpoint %lld: %s\n", wid, (long long)step, sy_err_msg());
        return;
    }
    size_t nf = json_array_size(files);
    Sy__ObjectInfo *objs = calloc(nf + 1, sizeof *objs);
    Sy__ObjectInfo **op = calloc(nf + 1, sizeof *op);
    for (size_t i = 0; i < nf; i++) {
        json_t *f = json_array_get(files, i);
        sy__object_info__init(&objs[i]);
        objs[i].name = (char *)json_string_value(json_object_get(f, "name"));
        objs[i].size = (uint64_t)json_integer_value(json_object_get(f, "size"));
        objs[i].sha256 = (char *)json_string_value(json_object_get(f, "sha256"));
        objs[i].object = (char *)json_string_value(json_object_get(f, "object"));
        op[i] = &objs[i];
    }
    Sy__Envelope env;
    Sy__CheckpointPart cp = SY__CHECKPOINT_PART__INIT;
    sy_proto_init(&env, run_id, incarnation, a->gen);
    cp.step = (uint64_t)step;
    cp.n_objects = nf;
    cp.objects = op;
    env.body_case = SY__ENVELOPE__BODY_CHECKPOINT_PART;
    env.checkpoint_part = &cp;
    send_env(&env);
    free(objs);
    free(op);
    json_decref(files);
}

static int run_normal(void) {
    assignment a = {0};
    int welcomed = 0, code = 1;
    int64_t last_hb = 0, last_hello = 0, last_heard = now_ms(), next_step = 0;
    const int64_t deadline = now_ms() + 300000; /* never outlive a broken test by much */
    while (now_ms() < deadline) {
        int64_t t = now_ms();
        if (!welcomed && t - last_hello >= heartbeat_ms) {
            hello(incarnation);
            last_hello = t;
        }
        if (welcomed && t - last_heard > 3000 && t - last_hello > 3000) {
            hello(incarnation); /* lost touch: register again */
            last_hello = t;
        }
        if (welcomed && t - last_hb >= heartbeat_ms) {
            heartbeat(a.active ? a.gen : 0, a.active ? a.cur - 1 : 0, a.active ? "training" : "idle");
            last_hb = t;
        }
        if (a.active && a.cur <= a.end && t >= next_step) {
            if (a.cur == die_at) {
                fprintf(stderr, "fakeworker %s: going silent at step %d\n", wid, die_at);
                while (now_ms() < deadline) sleep(1);
                break;
            }
            step_done(&a, a.cur);
            if ((a.every > 0 && a.cur % a.every == 0) || a.cur == a.end || a.cur == a.forced)
                checkpoint_part(&a, a.cur);
            a.cur++;
            next_step = t + step_ms;
        }
        Sy__Envelope *env = recv_env(5);
        if (!env) continue;
        if (strcmp(env->run_id, run_id) != 0) {
            fprintf(stderr, "fakeworker %s: message of run '%s', expected '%s'\n", wid, env->run_id, run_id);
            goto next;
        }
        if (env->body_case == SY__ENVELOPE__BODY_WELCOME) {
            if (welcomed && env->incarnation != incarnation) {
                fprintf(stderr, "fakeworker %s: new coordinator incarnation; dropping work\n", wid);
                assignment_clear(&a);
            }
            if (env->welcome->reregister) {
                fprintf(stderr, "fakeworker %s: told to register again\n", wid);
                welcomed = 0;
                last_hello = 0;
                goto next;
            }
            incarnation = env->incarnation;
            take_session(env);
            if (env->welcome->heartbeat_ms) heartbeat_ms = (int)env->welcome->heartbeat_ms;
            welcomed = 1;
            last_heard = now_ms();
            goto next;
        }
        if (!welcomed || env->incarnation != incarnation) goto next;
        last_heard = now_ms();
        switch (env->body_case) {
        case SY__ENVELOPE__BODY_ASSIGN:
            if (take_assign(&a, env) == 0) next_step = now_ms() + step_ms;
            break;
        case SY__ENVELOPE__BODY_ABORT:
            /* an Abort of an older generation is stale (docs/protocol.md): the coordinator answers
             * a heartbeat of generation g sent before our Assign(g+1) arrived with Abort(g) */
            if (a.active && env->generation < a.gen) break;
            if (a.active) fprintf(stderr, "fakeworker %s: abort (%s)\n", wid, env->abort->reason);
            a.active = 0;
            break;
        case SY__ENVELOPE__BODY_CHECKPOINT_NOW:
            if (a.active && env->generation == a.gen && (int64_t)env->checkpoint_now->step >= a.cur)
                a.forced = (int64_t)env->checkpoint_now->step;
            break;
        case SY__ENVELOPE__BODY_STOP:
            fprintf(stderr, "fakeworker %s: stop (%s)\n", wid, env->stop->reason);
            sy_proto_free(env);
            code = 0;
            goto out;
        default:
            break;
        }
    next:
        sy_proto_free(env);
    }
out:
    assignment_clear(&a);
    return code;
}

/* ---- hostile mode ------------------------------------------------------------------------- */

static void say(const char *what) {
    printf("hostile: %s\n", what);
    fflush(stdout);
}

static void send_packed(Sy__Envelope *env, size_t cut) {
    void *buf;
    size_t len;
    env->session.data = session;
    env->session.len = session_len;
    if (sy_proto_pack(env, &buf, &len) != SY_OK) return;
    send_raw(buf, cut && cut < len ? cut : len, 0);
    free(buf);
}

static int run_hostile(void) {
    static const char garbage[] = "\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x12\x99garbage!";
    send_raw(garbage, sizeof garbage - 1, 0);
    say("garbage");

    char host[64] = "h", longep[200];
    memset(longep, 'x', sizeof longep - 1);
    longep[sizeof longep - 1] = 0;
    Sy__Envelope env;
    Sy__Hello h = SY__HELLO__INIT;
    h.worker_id = (char *)wid;
    h.host = host;
    h.pid = (uint32_t)getpid();
    h.data_endpoint = longep;
    sy_proto_init(&env, run_id, 0, 0);
    env.body_case = SY__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    send_packed(&env, sy__envelope__get_packed_size(&env) - 50);
    say("truncated hello");

    env.version = 99;
    send_packed(&env, 0);
    say("wrong version");
    env.version = SY_PROTO_VERSION;

    env.run_id = "another-run";
    send_packed(&env, 0);
    say("wrong run id");
    env.run_id = (char *)run_id;

    Sy__Envelope sd_env;
    Sy__StepDone sd = SY__STEP_DONE__INIT;
    sy_proto_init(&sd_env, run_id, 0, 1);
    sd.step = 1;
    sd_env.body_case = SY__ENVELOPE__BODY_STEP_DONE;
    sd_env.step_done = &sd;
    send_packed(&sd_env, 0);
    say("step_done from an unregistered sender");

    Sy__Envelope wl_env;
    Sy__Welcome wl = SY__WELCOME__INIT;
    sy_proto_init(&wl_env, run_id, 0, 0);
    wl.worker_id = (char *)wid;
    wl_env.body_case = SY__ENVELOPE__BODY_WELCOME;
    wl_env.welcome = &wl;
    send_packed(&wl_env, 0);
    say("welcome (a coordinator-only message)");

    Sy__Envelope empty;
    sy_proto_init(&empty, run_id, 0, 0);
    send_packed(&empty, 0);
    say("envelope without a body");

    /* An unknown field number (a newer sender's body): parses, but no body we know. */
    {
        static const uint8_t field111[] = {0xfa, 0x06, 0x02, 0x08, 0x01};
        void *buf;
        size_t len;
        if (sy_proto_pack(&empty, &buf, &len) == SY_OK) {
            uint8_t *b2 = malloc(len + sizeof field111);
            if (b2) {
                memcpy(b2, buf, len);
                memcpy(b2 + len, field111, sizeof field111);
                send_raw(b2, len + sizeof field111, 0);
                free(b2);
                say("unknown message (field 111)");
            }
            free(buf);
        }
    }

    size_t big = SY_PROTO_MAX_FRAME + 1024;
    char *huge = calloc(1, big);
    if (huge) {
        send_raw(huge, big, 0);
        free(huge);
        say("oversize frame");
    }

    send_raw("a", 1, 1);
    send_raw("b", 1, 0);
    say("two-frame message");
    send_raw("", 0, 0);
    say("empty frame");

    send_packed(&env, 0);
    send_packed(&env, 0);
    say("hello twice (duplicate registration)");
    int64_t until = now_ms() + 5000;
    while (!incarnation && now_ms() < until) {
        Sy__Envelope *r = recv_env(100);
        if (r && r->body_case == SY__ENVELOPE__BODY_WELCOME) incarnation = r->incarnation, take_session(r);
        sy_proto_free(r);
    }
    say(incarnation ? "welcomed" : "no welcome");

    Sy__Envelope hb_env;
    Sy__Heartbeat hb = SY__HEARTBEAT__INIT;
    sy_proto_init(&hb_env, run_id, incarnation ^ 0x5a5a5a5a5a5a5a5aull, 0);
    hb.state = "idle";
    hb_env.body_case = SY__ENVELOPE__BODY_HEARTBEAT;
    hb_env.heartbeat = &hb;
    send_packed(&hb_env, 0);
    say("heartbeat with a wrong incarnation");

    sd_env.incarnation = incarnation;
    sd_env.generation = 12345;
    send_packed(&sd_env, 0);
    say("step_done of a stale generation");

    until = now_ms() + linger_ms;
    while (now_ms() < until) {
        heartbeat(0, 0, "idle");
        Sy__Envelope *r = recv_env(heartbeat_ms);
        sy_proto_free(r);
    }
    say("done");
    return incarnation ? 0 : 1;
}

int main(int argc, char **argv) {
    char idbuf[64];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--hostile")) hostile = 1;
        else if (v && !strcmp(a, "--coordinator")) ep = v, i++;
        else if (v && !strcmp(a, "--run")) run_id = v, i++;
        else if (v && !strcmp(a, "--id")) wid = v, i++;
        else if (v && !strcmp(a, "--step-ms")) step_ms = atoi(v), i++;
        else if (v && !strcmp(a, "--die-at")) die_at = atoi(v), i++;
        else if (v && !strcmp(a, "--linger-ms")) linger_ms = atoi(v), i++;
        else {
            fprintf(stderr, "usage: sy_fakeworker --coordinator EP --run NAME [--id ID] [--step-ms N] "
                            "[--die-at K] [--hostile [--linger-ms N]]\n");
            return 2;
        }
    }
    if (!ep) {
        fprintf(stderr, "sy_fakeworker: --coordinator is required\n");
        return 2;
    }
    if (!wid) {
        snprintf(idbuf, sizeof idbuf, "fake-%d", (int)getpid());
        wid = idbuf;
    }
    ctx = zmq_ctx_new();
    sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 500;
    zmq_setsockopt(sock, ZMQ_ROUTING_ID, wid, strlen(wid));
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(sock, ep) != 0) {
        fprintf(stderr, "sy_fakeworker: connect %s: %s\n", ep, zmq_strerror(errno));
        return 1;
    }
    int code = hostile ? run_hostile() : run_normal();
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return code;
}
