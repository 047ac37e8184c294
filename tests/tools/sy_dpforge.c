/* sy_dpforge: a stranger on a worker's data port, to test what the data plane takes from it
 * (tests/test_comm_curve.c covers the library; tests/py/test_dataplane_auth.py drives this tool
 * against real workers; issue 12 #2).
 *
 *   sy_dpforge --endpoint tcp://HOST:PORT --gen-from G --gen-to H [--seqs N] [--malformed]
 *              [--server-key Z85 [--key FILE]] [--hold-ms N]
 *
 * Opens a PUSH socket to the endpoint and sends, for every generation g in G..H and every round
 * sequence number s in 1..N (default 50), one well-formed data-plane message: the 32-byte header
 * of src/comm/comm_tcp.c (magic "SYDP", version 1, op reduce-scatter, source rank 0, chunk 0,
 * seq s, generation g, total 64) and 64 bytes of 0x7f (a float of 3.4e38: a loss it reached
 * would show). --malformed sends frames that are not data-plane messages instead (a 5-byte frame,
 * a header with a bad magic). With --server-key it handshakes as a CURVE client with the
 * server's public key: with a fresh key pair of its own (a stranger), or with the pair in --key
 * (a .key file: a member's key used by someone else). It then keeps the socket open for --hold-ms
 * (default 3000) and prints "sent N" and, from the socket monitor, "handshake ok" or
 * "handshake refused" lines; exit 0. A test tool: it never waits longer than --hold-ms + 1 s. */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "proto/curve.h"

typedef struct { /* the header of comm_tcp.c: keep in step with it */
    uint32_t magic;
    uint8_t version, op;
    uint16_t src;
    uint32_t chunk, seq;
    uint64_t gen, total;
} hdr;
_Static_assert(sizeof(hdr) == 32, "data-plane header is 32 bytes");

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    const char *ep = NULL, *server_key = NULL, *key_file = NULL;
    long gen_from = 1, gen_to = 1, seqs = 50, hold_ms = 3000;
    int malformed = 0;
    static const struct option lo[] = {{"endpoint", required_argument, 0, 'e'},
                                       {"gen-from", required_argument, 0, 'f'},
                                       {"gen-to", required_argument, 0, 't'},
                                       {"seqs", required_argument, 0, 's'},
                                       {"malformed", no_argument, 0, 'm'},
                                       {"server-key", required_argument, 0, 'k'},
                                       {"key", required_argument, 0, 'K'},
                                       {"hold-ms", required_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'e': ep = optarg; break;
        case 'f': gen_from = atol(optarg); break;
        case 't': gen_to = atol(optarg); break;
        case 's': seqs = atol(optarg); break;
        case 'm': malformed = 1; break;
        case 'k': server_key = optarg; break;
        case 'K': key_file = optarg; break;
        case 'h': hold_ms = atol(optarg); break;
        default: fprintf(stderr, "sy_dpforge: bad usage\n"); return 2;
        }
    }
    if (!ep || gen_from < 0 || gen_to < gen_from || seqs < 1 || hold_ms < 0 || (key_file && !server_key)) {
        fprintf(stderr, "sy_dpforge: --endpoint and a valid generation range are required\n");
        return 2;
    }
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_PUSH);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero);
    if (server_key) {
        char pub[41], sec[41];
        if (key_file) {
            sy_curve_key k;
            if (sy_curve_load_key(key_file, true, &k) != SY_OK) {
                fprintf(stderr, "sy_dpforge: --key: %s\n", sy_err_msg());
                return 2;
            }
            memcpy(pub, k.public_z85, 41);
            memcpy(sec, k.secret_z85, 41);
        } else {
            zmq_curve_keypair(pub, sec);
        }
        if (zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, server_key, 41) || zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, pub, 41) ||
            zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, sec, 41)) {
            fprintf(stderr, "sy_dpforge: CURVE options: %s\n", zmq_strerror(zmq_errno()));
            return 2;
        }
        printf("client key %s\n", pub);
    }
    zmq_socket_monitor(s, "inproc://dpforge-mon", ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                                                      ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                                      ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_DISCONNECTED);
    void *mon = zmq_socket(ctx, ZMQ_PAIR);
    zmq_setsockopt(mon, ZMQ_LINGER, &zero, sizeof zero);
    zmq_connect(mon, "inproc://dpforge-mon");
    if (zmq_connect(s, ep) != 0) {
        fprintf(stderr, "sy_dpforge: connect %s: %s\n", ep, zmq_strerror(zmq_errno()));
        return 2;
    }
    unsigned char payload[64];
    memset(payload, 0x7f, sizeof payload);
    long sent = 0;
    for (long g = gen_from; g <= gen_to; g++) {
        for (long q = 1; q <= seqs; q++) {
            hdr h = {.magic = 0x50445953u, .version = 1, .op = 2, .src = 0, .chunk = 0,
                     .seq = (uint32_t)q, .gen = (uint64_t)g, .total = sizeof payload};
            if (malformed) {
                if (q % 2) {
                    zmq_send(s, "SYDP!", 5, ZMQ_DONTWAIT);
                } else {
                    h.magic = 0xdeadbeefu;
                    zmq_send(s, &h, sizeof h, ZMQ_SNDMORE | ZMQ_DONTWAIT);
                    zmq_send(s, payload, sizeof payload, ZMQ_DONTWAIT);
                }
            } else {
                zmq_send(s, &h, sizeof h, ZMQ_SNDMORE | ZMQ_DONTWAIT);
                zmq_send(s, payload, sizeof payload, ZMQ_DONTWAIT);
            }
            sent++;
        }
    }
    printf("sent %ld\n", sent);
    fflush(stdout);
    int64_t end = now_ms() + hold_ms;
    while (now_ms() < end) {
        zmq_pollitem_t it = {.socket = mon, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, (long)(end - now_ms())) <= 0) continue;
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, mon, 0) < 0) break;
        uint16_t ev = 0;
        if (zmq_msg_size(&m) >= 2) memcpy(&ev, zmq_msg_data(&m), 2);
        zmq_msg_close(&m);
        zmq_msg_init(&m);
        zmq_msg_recv(&m, mon, 0); /* the endpoint frame */
        zmq_msg_close(&m);
        if (ev == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) printf("handshake ok\n");
        else if (ev == ZMQ_EVENT_DISCONNECTED) printf("disconnected\n");
        else printf("handshake refused (event %u)\n", ev);
        fflush(stdout);
    }
    zmq_close(mon);
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(s);
    zmq_ctx_term(ctx);
    return 0;
}
