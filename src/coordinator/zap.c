#include "coordinator/zap.h"
#include "base/clock.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "base/log.h"
#include "base/zmq_check.h"

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
/* Frames of a request we keep (RFC 27: 6 + credentials; CURVE has one credential). */
#define ZAP_MAX_FRAMES 8
/* Refused keys remembered for rate-limited logging, and the interval of their reminders. */
#define ZAP_LOG_KEYS 64
#define ZAP_RELOG_MS 60000
/* Requests answered per sy_zap_handle call (the reactor has other work too). */
#define ZAP_BATCH 64

typedef struct {
    uint8_t key[32];
    uint64_t count;
    int64_t logged_ms;
} refused_key;

struct sy_zap {
    void *sock;
    char domain[128];
    char keys_path[512];
    sy_curve_keyset_t *keys;
    uint64_t accepted, refused;
    refused_key seen[ZAP_LOG_KEYS];
    int nseen;
};


sy_status sy_zap_new(void *zctx, const char *domain, sy_curve_keyset_t **keys, const char *keys_path,
                     sy_zap_t **out) {
    *out = NULL;
    sy_zap_t *z = calloc(1, sizeof *z);
    if (!z) {
        sy_curve_keyset_destroy(keys);
        return sy_err_set(SY_ENOMEM, "out of memory");
    }
    z->keys = *keys;
    *keys = NULL;
    snprintf(z->domain, sizeof z->domain, "%s", domain);
    snprintf(z->keys_path, sizeof z->keys_path, "%s", keys_path ? keys_path : "");
    z->sock = zmq_socket(zctx, ZMQ_REP);
    int linger = 0;
    if (!z->sock) {
        sy_zap_destroy(&z);
        return sy_err_zmq(SY_EIO, errno, "ZAP handler socket");
    }
    zmq_setsockopt(z->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_bind(z->sock, ZAP_ENDPOINT) != 0) {
        int e = errno;
        sy_zap_destroy(&z);
        return sy_err_zmq(SY_EIO, e, "cannot bind the ZAP handler at %s", ZAP_ENDPOINT);
    }
    *out = z;
    return SY_OK;
}

void *sy_zap_socket(const sy_zap_t *self) { return self->sock; }
uint64_t sy_zap_accepted(const sy_zap_t *self) { return self ? self->accepted : 0; }
uint64_t sy_zap_refused(const sy_zap_t *self) { return self ? self->refused : 0; }
int sy_zap_authorized(const sy_zap_t *self) { return self ? sy_curve_keyset_size(self->keys) : 0; }

/* Logs a refused key: the first time, then at most every ZAP_RELOG_MS. */
static void log_refusal(sy_zap_t *z, const uint8_t *key, const char *addr, const char *why) {
    int64_t now = sy_mono_ms();
    refused_key *r = NULL;
    for (int i = 0; i < z->nseen && key; i++)
        if (!memcmp(z->seen[i].key, key, 32)) r = &z->seen[i];
    if (!r && key) {
        if (z->nseen < ZAP_LOG_KEYS) {
            r = &z->seen[z->nseen++];
        } else { /* forget the key reminded longest ago */
            r = &z->seen[0];
            for (int i = 1; i < ZAP_LOG_KEYS; i++)
                if (z->seen[i].logged_ms < r->logged_ms) r = &z->seen[i];
        }
        memset(r, 0, sizeof *r);
        memcpy(r->key, key, 32);
        r->logged_ms = now - ZAP_RELOG_MS;
    }
    if (r) {
        r->count++;
        if (now - r->logged_ms < ZAP_RELOG_MS) return;
        r->logged_ms = now;
    }
    char z85[SY_CURVE_Z85_LEN + 1] = "-";
    if (key) zmq_z85_encode(z85, key, 32);
    sy_warn("refused a CURVE client at %s with public key %s: %s (%" PRIu64 " refusal(s) of this key, %" PRIu64
            " in all)",
            addr, z85, why, r ? r->count : 1, z->refused);
}

/* Answers one request (frames already read). Returns true when it was refused. */
static bool answer(sy_zap_t *z, zmq_msg_t *fr, int n) {
    const char *status = "200", *text = "OK";
    char why[700] = "";
    char addr[64] = "?";
    const uint8_t *key = NULL;
    bool refused = true;
    if (n >= 4) {
        size_t al = zmq_msg_size(&fr[3]);
        snprintf(addr, sizeof addr, "%.*s", (int)(al < sizeof addr ? al : sizeof addr - 1),
                 (const char *)zmq_msg_data(&fr[3]));
    }
    if (n < 6 || zmq_msg_size(&fr[0]) != 3 || memcmp(zmq_msg_data(&fr[0]), "1.0", 3)) {
        status = "500", text = "malformed ZAP request";
        snprintf(why, sizeof why, "malformed ZAP request (%d frames)", n);
    } else if (zmq_msg_size(&fr[2]) != strlen(z->domain) ||
               memcmp(zmq_msg_data(&fr[2]), z->domain, strlen(z->domain))) {
        status = "400", text = "unknown domain";
        snprintf(why, sizeof why, "ZAP domain is not '%s'", z->domain);
    } else if (zmq_msg_size(&fr[5]) != 5 || memcmp(zmq_msg_data(&fr[5]), "CURVE", 5) || n != 7 ||
               zmq_msg_size(&fr[6]) != 32) {
        status = "400", text = "CURVE required";
        snprintf(why, sizeof why, "not a CURVE handshake (mechanism %.*s)",
                 (int)(zmq_msg_size(&fr[5]) < 16 ? zmq_msg_size(&fr[5]) : 16), (const char *)zmq_msg_data(&fr[5]));
    } else {
        key = zmq_msg_data(&fr[6]);
        if (sy_curve_keyset_has(z->keys, key)) {
            refused = false;
        } else {
            status = "400", text = "public key not authorized";
            snprintf(why, sizeof why, "not listed in cluster.curve_authorized_keys (%s)", z->keys_path);
        }
    }
    if (refused) z->refused++;
    else z->accepted++;
    if (refused) log_refusal(z, key, addr, why);
    else if (key) {
        char z85[SY_CURVE_Z85_LEN + 1];
        zmq_z85_encode(z85, key, 32);
        sy_debug("accepted CURVE client at %s with public key %s", addr, z85);
    }
    /* reply: version, request id, status code, status text, user id, metadata */
    const void *rid = n >= 2 ? zmq_msg_data(&fr[1]) : "";
    size_t rid_len = n >= 2 ? zmq_msg_size(&fr[1]) : 0;
    zmq_send(z->sock, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(z->sock, rid, rid_len, ZMQ_SNDMORE);
    zmq_send(z->sock, status, 3, ZMQ_SNDMORE);
    zmq_send(z->sock, text, strlen(text), ZMQ_SNDMORE);
    /* the user id of an accepted client is its public key (Z85): ZeroMQ attaches it to every
     * message of the connection ("User-Id"), and the coordinator binds worker ids to it */
    char user[SY_CURVE_Z85_LEN + 1] = "";
    if (!refused && key) zmq_z85_encode(user, key, 32);
    zmq_send(z->sock, user, strlen(user), ZMQ_SNDMORE);
    zmq_send(z->sock, "", 0, 0);
    return refused;
}

int sy_zap_handle(sy_zap_t *z) {
    int refusals = 0;
    for (int b = 0; b < ZAP_BATCH; b++) {
        zmq_msg_t fr[ZAP_MAX_FRAMES];
        int n = 0, more = 1;
        bool got = false;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, z->sock, got ? 0 : ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                for (int k = 0; k < n; k++) zmq_msg_close(&fr[k]);
                return refusals; /* EAGAIN: nothing (more) queued */
            }
            got = true;
            more = zmq_msg_more(&m);
            if (n < ZAP_MAX_FRAMES) fr[n++] = m;
            else zmq_msg_close(&m);
        }
        refusals += answer(z, fr, n);
        for (int k = 0; k < n; k++) zmq_msg_close(&fr[k]);
    }
    return refusals;
}

void sy_zap_destroy(sy_zap_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_zap_t *z = *self_p;
    if (z->sock) zmq_close(z->sock);
    sy_curve_keyset_destroy(&z->keys);
    free(z);
    *self_p = NULL;
}
