/* sy_spoof: an impostor of a worker id, to test that a routing id alone never changes the
 * coordinator's membership (tests/py/test_identity.py, issue 16 #1).
 *
 *   sy_spoof --coordinator EP --id ID --mode MODE [--run NAME] [--pid N] [--count N]
 *            [--hold-ms N] [--session HEX] [--curve-server-public FILE --curve-key FILE]
 *
 * Opens a DEALER whose ZMQ_ROUTING_ID is ID (the id of a live worker, typically) and sends,
 * --count times (default 1):
 *   garbage    one frame that is not an sy.Envelope
 *   hello      a Hello for ID with pid --pid (default: this process's pid)
 *   heartbeat  a Heartbeat of run --run with the coordinator's incarnation (learnt from the
 *              answers, else 0) and session --session (hex; default none)
 *   stepdone   a StepDone for step 1 of generation 1, same header as heartbeat
 * then keeps the connection open for --hold-ms (default 200), printing what it receives, and
 * exits 0. With the CURVE flags it connects with that key pair (an authorized key of another
 * worker, to test that an id is bound to the key it registered with). It is a test tool: it never retries and never waits longer than --hold-ms + 1 s. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "proto/curve.h"
#include "proto/protocol.h"

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static size_t unhex(const char *s, uint8_t *out, size_t cap) {
    size_t n = 0;
    for (; s[0] && s[1] && n < cap; s += 2) {
        unsigned v;
        if (sscanf(s, "%2x", &v) != 1) break;
        out[n++] = (uint8_t)v;
    }
    return n;
}

int main(int argc, char **argv) {
    const char *ep = NULL, *id = NULL, *mode = NULL, *run = "tiny", *session = NULL, *srv_pub = NULL, *key = NULL;
    long pid = (long)getpid(), count = 1, hold_ms = 200;
    static const struct option lo[] = {{"coordinator", 1, 0, 'c'}, {"id", 1, 0, 'i'}, {"mode", 1, 0, 'm'},
                                       {"run", 1, 0, 'r'},         {"pid", 1, 0, 'p'}, {"count", 1, 0, 'n'},
                                       {"hold-ms", 1, 0, 'H'},     {"session", 1, 0, 's'},
                                       {"curve-server-public", 1, 0, 'P'}, {"curve-key", 1, 0, 'K'}, {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'c': ep = optarg; break;
        case 'i': id = optarg; break;
        case 'm': mode = optarg; break;
        case 'r': run = optarg; break;
        case 'p': pid = atol(optarg); break;
        case 'n': count = atol(optarg); break;
        case 'H': hold_ms = atol(optarg); break;
        case 's': session = optarg; break;
        case 'P': srv_pub = optarg; break;
        case 'K': key = optarg; break;
        default: return 2;
        }
    }
    if (!ep || !id || !mode) {
        fprintf(stderr, "usage: sy_spoof --coordinator EP --id ID --mode garbage|hello|heartbeat|stepdone\n");
        return 2;
    }
    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 500;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_ROUTING_ID, id, strlen(id));
    if (srv_pub && key) {
        sy_curve_key server, mine;
        if (sy_curve_load_key(srv_pub, false, &server) != SY_OK || sy_curve_load_key(key, true, &mine) != SY_OK) {
            fprintf(stderr, "sy_spoof: %s\n", sy_err_msg());
            return 2;
        }
        zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server.public_z85, SY_CURVE_Z85_LEN + 1);
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, mine.public_z85, SY_CURVE_Z85_LEN + 1);
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, mine.secret_z85, SY_CURVE_Z85_LEN + 1);
    }
    if (zmq_connect(sock, ep) != 0) {
        fprintf(stderr, "sy_spoof: connect %s: %s\n", ep, zmq_strerror(zmq_errno()));
        return 1;
    }
    uint8_t sess[64];
    size_t sess_len = session ? unhex(session, sess, sizeof sess) : 0;
    uint64_t inc = 0;
    int64_t end = now_ms() + hold_ms;
    for (long k = 0; k < count; k++) {
        Sy__Envelope env;
        sy_proto_init(&env, run, inc, 1);
        env.session.data = sess;
        env.session.len = sess_len;
        Sy__Hello h = SY__HELLO__INIT;
        Sy__Heartbeat hb = SY__HEARTBEAT__INIT;
        Sy__StepDone sd = SY__STEP_DONE__INIT;
        if (!strcmp(mode, "garbage")) {
            static const char g[] = "\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x12\x99spoof";
            zmq_send(sock, g, sizeof g - 1, 0);
        } else {
            if (!strcmp(mode, "hello")) {
                env.run_id = "";
                env.generation = 0;
                h.worker_id = (char *)id;
                h.host = "impostor";
                h.pid = (uint32_t)pid;
                h.backend = "cpu";
                h.version = "spoof";
                h.data_endpoint = "tcp://127.0.0.1:1";
                env.body_case = SY__ENVELOPE__BODY_HELLO;
                env.hello = &h;
            } else if (!strcmp(mode, "heartbeat")) {
                hb.state = "idle";
                env.body_case = SY__ENVELOPE__BODY_HEARTBEAT;
                env.heartbeat = &hb;
            } else if (!strcmp(mode, "stepdone")) {
                sd.step = 1;
                env.body_case = SY__ENVELOPE__BODY_STEP_DONE;
                env.step_done = &sd;
            } else {
                fprintf(stderr, "sy_spoof: unknown --mode %s\n", mode);
                return 2;
            }
            if (sy_proto_send(sock, NULL, 0, &env) != SY_OK) fprintf(stderr, "sy_spoof: %s\n", sy_err_msg());
        }
        printf("sent %s as %s\n", mode, id);
        fflush(stdout);
        /* answers until the next send (or the end) */
        int64_t until = k + 1 < count ? now_ms() + 20 : end;
        while (now_ms() < until) {
            zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
            if (zmq_poll(&it, 1, 20) <= 0) continue;
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) >= 0) {
                Sy__Envelope *in = NULL;
                if (sy_proto_unpack(zmq_msg_data(&m), zmq_msg_size(&m), &in) == SY_DROP_NONE) {
                    bool rereg = in->body_case == SY__ENVELOPE__BODY_WELCOME && in->welcome->reregister;
                    printf("received %s%s\n", sy_proto_body_name(in->body_case), rereg ? " reregister" : "");
                    inc = in->incarnation;
                    sy_proto_free(in);
                }
            }
            zmq_msg_close(&m);
        }
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return 0;
}
