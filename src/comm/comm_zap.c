/* The data plane's ZAP handler (comm_zap_internal.h). A ROUTER socket rather than the usual REP, so that
 * requests of keys not (yet) authorized can be held while later ones are answered: libzmq's ZAP
 * client sends the REQ-style envelope (an empty delimiter frame after our routing id). */
#include "comm_zap_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "base/clock.h"
#include "base/log.h"
#include "base/zmq_check.h"

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define ZAP_FRAMES_MAX 12
#define ZAP_POLL_MS 20 /* how soon a newly authorized key releases a held request, and stop is seen */
#define ZAP_RID_MAX 256
#define ZAP_REQID_MAX 64

typedef struct {
    uint8_t rid[ZAP_RID_MAX];
    size_t rid_len;
    uint8_t reqid[ZAP_REQID_MAX];
    size_t reqid_len;
    uint8_t key[32];
    char addr[64];
    int64_t since_ms;
} held_req;

struct sy_dp_zap {
    void *sock;         /* used by the thread only once it runs */
    pthread_t th;
    bool started;
    atomic_int stop;
    pthread_mutex_t mu; /* guards keys, nkeys, hold_ms */
    uint8_t (*keys)[32];
    int nkeys, hold_ms;
    atomic_uint_fast64_t refused, accepted;
    held_req held[SY_DP_ZAP_PENDING_MAX]; /* the thread's */
    int nheld;
};

static bool key_authorized(sy_dp_zap *z, const uint8_t key[32], int *hold_ms) {
    bool ok = false;
    pthread_mutex_lock(&z->mu);
    for (int i = 0; i < z->nkeys && !ok; i++) ok = !memcmp(z->keys[i], key, 32);
    if (hold_ms) *hold_ms = z->hold_ms;
    pthread_mutex_unlock(&z->mu);
    return ok;
}

static void reply(sy_dp_zap *z, const void *rid, size_t rid_len, const void *reqid, size_t reqid_len,
                  const char *status, const char *text, const char *user) {
    zmq_send(z->sock, rid, rid_len, ZMQ_SNDMORE);
    zmq_send(z->sock, "", 0, ZMQ_SNDMORE);
    zmq_send(z->sock, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(z->sock, reqid, reqid_len, ZMQ_SNDMORE);
    zmq_send(z->sock, status, 3, ZMQ_SNDMORE);
    zmq_send(z->sock, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(z->sock, user, strlen(user), ZMQ_SNDMORE);
    zmq_send(z->sock, "", 0, 0);
}

static void accept_req(sy_dp_zap *z, const void *rid, size_t rid_len, const void *reqid, size_t reqid_len,
                       const uint8_t key[32]) {
    char user[41];
    zmq_z85_encode(user, key, 32);
    reply(z, rid, rid_len, reqid, reqid_len, "200", "OK", user);
    atomic_fetch_add(&z->accepted, 1);
}

static void refuse_req(sy_dp_zap *z, const void *rid, size_t rid_len, const void *reqid, size_t reqid_len,
                       const uint8_t *key, const char *addr, const char *why) {
    reply(z, rid, rid_len, reqid, reqid_len, "400", why, "");
    uint64_t n = atomic_fetch_add(&z->refused, 1) + 1;
    char z85[41] = "-";
    if (key) zmq_z85_encode(z85, key, 32);
    /* every refusal is a line: a stranger that gets this far costs a TCP connection and a
     * CURVE handshake per line, and the hold time paces it */
    sy_warn("data plane: refused a CURVE client at %s with public key %s: %s (%" PRIu64 " refused in all)", addr, z85,
            why, n);
}

/* Reads one request (all frames) and answers or holds it. */
static void take_request(sy_dp_zap *z) {
    zmq_msg_t fr[ZAP_FRAMES_MAX];
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, z->sock, n ? 0 : ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            break;
        }
        more = zmq_msg_more(&m);
        if (n < ZAP_FRAMES_MAX) fr[n++] = m;
        else zmq_msg_close(&m);
    }
    if (n < 4) goto out; /* no routing envelope and request id to answer to */
    const void *rid = zmq_msg_data(&fr[0]), *reqid = zmq_msg_data(&fr[3]);
    size_t rid_len = zmq_msg_size(&fr[0]), reqid_len = zmq_msg_size(&fr[3]);
    char addr[64] = "?";
    if (n >= 6) {
        size_t al = zmq_msg_size(&fr[5]);
        snprintf(addr, sizeof addr, "%.*s", (int)(al < sizeof addr ? al : sizeof addr - 1),
                 (const char *)zmq_msg_data(&fr[5]));
    }
    if (n != 9 || zmq_msg_size(&fr[7]) != 5 || memcmp(zmq_msg_data(&fr[7]), "CURVE", 5) ||
        zmq_msg_size(&fr[8]) != 32) {
        refuse_req(z, rid, rid_len, reqid, reqid_len, NULL, addr, "not a CURVE handshake");
        goto out;
    }
    const uint8_t *key = zmq_msg_data(&fr[8]);
    int hold_ms = 0;
    if (key_authorized(z, key, &hold_ms)) {
        accept_req(z, rid, rid_len, reqid, reqid_len, key);
        goto out;
    }
    if (rid_len > ZAP_RID_MAX || reqid_len > ZAP_REQID_MAX) {
        refuse_req(z, rid, rid_len, reqid, reqid_len, key, addr, "public key not a member of this generation");
        goto out;
    }
    if (z->nheld == SY_DP_ZAP_PENDING_MAX) { /* refuse the oldest to make room */
        held_req *o = &z->held[0];
        refuse_req(z, o->rid, o->rid_len, o->reqid, o->reqid_len, o->key, o->addr,
                   "public key not a member of this generation (too many held handshakes)");
        memmove(&z->held[0], &z->held[1], (size_t)(--z->nheld) * sizeof z->held[0]);
    }
    held_req *h = &z->held[z->nheld++];
    memcpy(h->rid, rid, rid_len);
    h->rid_len = rid_len;
    memcpy(h->reqid, reqid, reqid_len);
    h->reqid_len = reqid_len;
    memcpy(h->key, key, 32);
    snprintf(h->addr, sizeof h->addr, "%s", addr);
    h->since_ms = sy_mono_ms();
out:
    for (int k = 0; k < n; k++) zmq_msg_close(&fr[k]);
}

/* Answers held requests whose key was authorized meanwhile or whose hold time passed. */
static void settle_held(sy_dp_zap *z) {
    int keep = 0;
    int64_t now = sy_mono_ms();
    for (int i = 0; i < z->nheld; i++) {
        held_req *h = &z->held[i];
        int hold_ms = 0;
        if (key_authorized(z, h->key, &hold_ms)) {
            accept_req(z, h->rid, h->rid_len, h->reqid, h->reqid_len, h->key);
        } else if (now - h->since_ms >= hold_ms) {
            refuse_req(z, h->rid, h->rid_len, h->reqid, h->reqid_len, h->key, h->addr,
                       "public key not a member of this generation");
        } else {
            z->held[keep++] = *h;
        }
    }
    z->nheld = keep;
}

static void *zap_main(void *arg) {
    sy_dp_zap *z = arg;
    while (!atomic_load(&z->stop)) {
        zmq_pollitem_t it = {.socket = z->sock, .events = ZMQ_POLLIN};
        int rc = zmq_poll(&it, 1, ZAP_POLL_MS);
        if (rc > 0 && (it.revents & ZMQ_POLLIN)) take_request(z);
        else if (rc < 0 && zmq_errno() == ETERM) break;
        settle_held(z);
    }
    zmq_close(z->sock);
    z->sock = NULL;
    return NULL;
}

sy_status sy_dp_zap_start(void *zctx, sy_dp_zap **out) {
    *out = NULL;
    sy_dp_zap *z = calloc(1, sizeof *z);
    if (!z) return sy_err_set(SY_ENOMEM, "data plane: ZAP handler");
    pthread_mutex_init(&z->mu, NULL);
    z->hold_ms = SY_DP_ZAP_HOLD_DEFAULT_MS;
    z->sock = zmq_socket(zctx, ZMQ_ROUTER);
    int zero = 0;
    if (!z->sock) {
        sy_status st = sy_err_zmq(SY_EIO, zmq_errno(), "data plane: ZAP handler socket");
        sy_dp_zap_stop(&z);
        return st;
    }
    zmq_setsockopt(z->sock, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(z->sock, ZAP_ENDPOINT) != 0) {
        sy_status st = sy_err_zmq(SY_EIO, zmq_errno(), "data plane: cannot bind the ZAP handler at %s", ZAP_ENDPOINT);
        sy_dp_zap_stop(&z);
        return st;
    }
    if (pthread_create(&z->th, NULL, zap_main, z) != 0) {
        sy_dp_zap_stop(&z);
        return sy_err_set(SY_EIO, "data plane: cannot start the ZAP handler thread");
    }
    z->started = true;
    *out = z;
    return SY_OK;
}

sy_status sy_dp_zap_authorize(sy_dp_zap *z, const uint8_t (*keys)[32], int n, int hold_ms) {
    uint8_t(*copy)[32] = n > 0 ? malloc((size_t)n * sizeof *copy) : NULL;
    if (n > 0 && !copy) return sy_err_set(SY_ENOMEM, "data plane: %d authorized keys", n);
    if (n > 0) memcpy(copy, keys, (size_t)n * sizeof *copy);
    if (hold_ms <= 0 || hold_ms > SY_DP_ZAP_HOLD_MAX_MS) hold_ms = SY_DP_ZAP_HOLD_MAX_MS;
    pthread_mutex_lock(&z->mu);
    free(z->keys);
    z->keys = copy;
    z->nkeys = n;
    z->hold_ms = hold_ms;
    pthread_mutex_unlock(&z->mu);
    return SY_OK;
}

uint64_t sy_dp_zap_refused(const sy_dp_zap *z) { return z ? atomic_load(&((sy_dp_zap *)z)->refused) : 0; }
uint64_t sy_dp_zap_accepted(const sy_dp_zap *z) { return z ? atomic_load(&((sy_dp_zap *)z)->accepted) : 0; }

void sy_dp_zap_stop(sy_dp_zap **z_p) {
    if (!z_p || !*z_p) return;
    sy_dp_zap *z = *z_p;
    *z_p = NULL;
    if (z->started) {
        atomic_store(&z->stop, 1);
        pthread_join(z->th, NULL);
    } else if (z->sock) {
        zmq_close(z->sock);
    }
    pthread_mutex_destroy(&z->mu);
    free(z->keys);
    free(z);
}
