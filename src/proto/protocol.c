#include "proto/protocol.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "base/zmq_check.h"

static const char *const DROP_NAMES[SY_DROP__COUNT] = {
    [SY_DROP_NONE] = "none",
    [SY_DROP_OVERSIZE] = "oversize",
    [SY_DROP_PARSE] = "parse",
    [SY_DROP_VERSION] = "version",
    [SY_DROP_RUN_ID] = "run_id",
    [SY_DROP_INCARNATION] = "incarnation",
    [SY_DROP_STALE_GENERATION] = "stale_generation",
    [SY_DROP_UNKNOWN_WORKER] = "unknown_worker",
    [SY_DROP_UNKNOWN_MESSAGE] = "unknown_message",
    [SY_DROP_UNEXPECTED] = "unexpected",
    [SY_DROP_INVALID] = "invalid",
    [SY_DROP_BAD_FRAME] = "bad_frame",
    [SY_DROP_AUTH] = "auth",
};

const char *sy_proto_drop_name(sy_proto_drop reason) {
    if ((int)reason < 0 || reason >= SY_DROP__COUNT) return "unknown";
    return DROP_NAMES[reason];
}

const char *sy_proto_body_name(Sy__Envelope__BodyCase body) {
    switch (body) {
    case SY__ENVELOPE__BODY_HELLO: return "hello";
    case SY__ENVELOPE__BODY_HEARTBEAT: return "heartbeat";
    case SY__ENVELOPE__BODY_STEP_DONE: return "step_done";
    case SY__ENVELOPE__BODY_CHECKPOINT_PART: return "checkpoint_part";
    case SY__ENVELOPE__BODY_FAULT: return "fault";
    case SY__ENVELOPE__BODY_HOLDINGS: return "holdings";
    case SY__ENVELOPE__BODY_WELCOME: return "welcome";
    case SY__ENVELOPE__BODY_ASSIGN: return "assign";
    case SY__ENVELOPE__BODY_ABORT: return "abort";
    case SY__ENVELOPE__BODY_STOP: return "stop";
    case SY__ENVELOPE__BODY_CHECKPOINT_NOW: return "checkpoint_now";
    case SY__ENVELOPE__BODY_END_AFTER: return "end_after";
    default: return "none";
    }
}

void sy_proto_init(Sy__Envelope *env, const char *run_id, uint64_t incarnation,
                   uint64_t generation) {
    sy__envelope__init(env);
    env->version = SY_PROTO_VERSION;
    env->run_id = (char *)(run_id ? run_id : "");
    env->incarnation = incarnation;
    env->generation = generation;
}

sy_status sy_proto_pack(const Sy__Envelope *env, void **buf, size_t *len) {
    *buf = NULL;
    *len = 0;
    size_t n = sy__envelope__get_packed_size(env);
    if (n > SY_PROTO_MAX_FRAME)
        return sy_err_set(SY_EINVAL, "envelope (%s) is %zu bytes, over the %zu-byte frame limit",
                          sy_proto_body_name(env->body_case), n, SY_PROTO_MAX_FRAME);
    uint8_t *b = malloc(n ? n : 1);
    if (!b) return sy_err_set(SY_ENOMEM, "out of memory packing a %zu-byte envelope", n);
    size_t w = sy__envelope__pack(env, b);
    if (w != n) {
        free(b);
        return sy_err_set(SY_EINTERNAL, "envelope packed to %zu bytes, expected %zu", w, n);
    }
    *buf = b;
    *len = n;
    return SY_OK;
}

/* Checks of a body that need no receiver state: the receiver indexes arrays with these values.
 * Sets the message and returns false when the body is invalid. */
static bool body_valid(const Sy__Envelope *env) {
    if (env->body_case == SY__ENVELOPE__BODY_ASSIGN) {
        const Sy__Assign *as = env->assign;
        /* a peer table edit (peers_base != 0) carries only the fresh entries: its runs are checked
         * against the base by the receiver (proto/peers.h), their total here */
        uint64_t fresh = as->world, total = as->world;
        if (as->peers_base) {
            if (as->n_peers_edit % 2) {
                sy_err_set(SY_EFORMAT, "assign: peers_edit of %zu values, not (source, count) pairs", as->n_peers_edit);
                return false;
            }
            fresh = total = 0;
            for (size_t i = 0; i < as->n_peers_edit; i += 2) {
                total += as->peers_edit[i + 1];
                if (!as->peers_edit[i]) fresh += as->peers_edit[i + 1];
            }
        }
        if (as->world < 1 || as->world > INT32_MAX || as->rank >= as->world || total != as->world ||
            as->n_peers != fresh) {
            sy_err_set(SY_EFORMAT, "assign: rank %u of world %u with %zu peers (%llu in the table, %llu fresh)",
                       as->rank, as->world, as->n_peers, (unsigned long long)total, (unsigned long long)fresh);
            return false;
        }
        if (as->n_peer_keys != 0 && as->n_peer_keys != as->n_peers) {
            sy_err_set(SY_EFORMAT, "assign: %zu peer keys for %zu peers", as->n_peer_keys, as->n_peers);
            return false;
        }
        for (size_t r = 0; r < as->n_peer_keys; r++)
            if (!as->peer_keys[r] || strlen(as->peer_keys[r]) != 40) {
                sy_err_set(SY_EFORMAT, "assign: peer_keys[%zu] is not a 40-character Z85 key", r);
                return false;
            }
        for (size_t e = 0; e < as->n_placement; e++)
            if (as->placement[e] >= as->world) {
                sy_err_set(SY_EFORMAT, "assign: placement[%zu] = rank %u, outside a world of %u", e,
                           as->placement[e], as->world);
                return false;
            }
    }
    return true;
}

sy_proto_drop sy_proto_unpack(const void *buf, size_t len, Sy__Envelope **out) {
    return sy_proto_unpack_frames(buf, len, NULL, 0, out);
}

/* Moves the peer table of a table frame into the Assign that announced it. */
static sy_proto_drop take_table(Sy__Envelope *env, const void *table, size_t table_len) {
    if (env->body_case != SY__ENVELOPE__BODY_ASSIGN || !env->assign->peers_follow) {
        sy_err_set(SY_EFORMAT, "a second frame after a message that announces none");
        return SY_DROP_INVALID;
    }
    Sy__Assign *as = env->assign;
    if (as->n_peers || as->n_peer_keys || as->n_replica_peers || as->peers_base) {
        sy_err_set(SY_EFORMAT, "assign: peers_follow with peers of its own");
        return SY_DROP_INVALID;
    }
    Sy__Assign *t = sy__assign__unpack(NULL, table_len, table);
    if (!t) {
        sy_err_set(SY_EFORMAT, "assign: its table frame (%zu bytes) is not a valid sy.Assign", table_len);
        return SY_DROP_PARSE;
    }
    const bool only_table = !t->rank && !t->world && !t->n_placement && !t->restore_step && !t->start_step &&
                            !t->nccl_id.len && !(t->config_json && *t->config_json) && !t->end_step &&
                            !(t->restore_source && *t->restore_source) && !t->dense_source && !t->n_expert_source &&
                            !t->peers_base && !t->n_peers_edit && !t->peers_follow;
    if (!only_table) {
        sy__assign__free_unpacked(t, NULL);
        sy_err_set(SY_EFORMAT, "assign: its table frame holds more than peers, peer_keys and replica_peers");
        return SY_DROP_INVALID;
    }
    /* both were unpacked with the default allocator: the arrays change hands */
    as->n_peers = t->n_peers, as->peers = t->peers;
    as->n_peer_keys = t->n_peer_keys, as->peer_keys = t->peer_keys;
    as->n_replica_peers = t->n_replica_peers, as->replica_peers = t->replica_peers;
    t->n_peers = t->n_peer_keys = t->n_replica_peers = 0;
    t->peers = t->peer_keys = t->replica_peers = NULL;
    sy__assign__free_unpacked(t, NULL);
    as->peers_follow = false;
    return SY_DROP_NONE;
}

sy_proto_drop sy_proto_unpack_frames(const void *buf, size_t len, const void *table, size_t table_len,
                                     Sy__Envelope **out) {
    *out = NULL;
    if (len > SY_PROTO_MAX_FRAME || table_len > SY_PROTO_MAX_FRAME - len) {
        sy_err_set(SY_EFORMAT, "message of %zu bytes is over the %zu-byte limit", len + table_len,
                   SY_PROTO_MAX_FRAME);
        return SY_DROP_OVERSIZE;
    }
    Sy__Envelope *env = sy__envelope__unpack(NULL, len, buf);
    if (!env) {
        sy_err_set(SY_EFORMAT, "frame of %zu bytes is not a valid sy.Envelope", len);
        return SY_DROP_PARSE;
    }
    if (env->version == SY_PROTO_VERSION && (table || (env->body_case == SY__ENVELOPE__BODY_ASSIGN && env->assign->peers_follow))) {
        sy_proto_drop why = table ? take_table(env, table, table_len) : SY_DROP_INVALID;
        if (!table) sy_err_set(SY_EFORMAT, "assign: peers_follow without its table frame");
        if (why != SY_DROP_NONE) {
            sy__envelope__free_unpacked(env, NULL);
            return why;
        }
    }
    if (env->version != SY_PROTO_VERSION) {
        sy_err_set(SY_EFORMAT, "envelope version %u, expected %d", env->version, SY_PROTO_VERSION);
        sy__envelope__free_unpacked(env, NULL);
        return SY_DROP_VERSION;
    }
    if (!body_valid(env)) {
        sy__envelope__free_unpacked(env, NULL);
        return SY_DROP_INVALID;
    }
    *out = env;
    return SY_DROP_NONE;
}

void sy_proto_free(Sy__Envelope *env) {
    if (env) sy__envelope__free_unpacked(env, NULL);
}

static void free_buf(void *data, void *hint) {
    (void)hint;
    free(data);
}

sy_status sy_proto_send(void *zsock, const void *routing_id, size_t routing_len,
                        const Sy__Envelope *env) {
    void *buf;
    size_t len;
    SY_CHECK(sy_proto_pack(env, &buf, &len));
    if (routing_id) {
        if (zmq_send(zsock, routing_id, routing_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
            int e = errno;
            free(buf);
            return sy_err_zmq(SY_EIO, e, "send %s: routing frame", sy_proto_body_name(env->body_case));
        }
    }
    zmq_msg_t m;
    if (zmq_msg_init_data(&m, buf, len, free_buf, NULL) != 0) {
        free(buf);
        return sy_err_zmq(SY_ENOMEM, errno, "zmq_msg_init_data");
    }
    if (zmq_msg_send(&m, zsock, ZMQ_DONTWAIT) < 0) {
        int e = errno;
        zmq_msg_close(&m);
        return sy_err_zmq(SY_EIO, e, "send %s", sy_proto_body_name(env->body_case));
    }
    return SY_OK;
}

sy_status sy_proto_pack_table(size_t n, char **peers, char **keys, size_t n_keys, char **replicas, size_t n_rep,
                              void *table) {
    Sy__Assign t = SY__ASSIGN__INIT;
    t.n_peers = n, t.peers = peers;
    t.n_peer_keys = n_keys, t.peer_keys = keys;
    t.n_replica_peers = n_rep, t.replica_peers = replicas;
    size_t len = sy__assign__get_packed_size(&t);
    if (len > SY_PROTO_MAX_FRAME) return sy_err_set(SY_EINVAL, "peer table of %zu bytes is over the frame limit", len);
    void *buf = malloc(len ? len : 1);
    if (!buf) return sy_err_set(SY_ENOMEM, "peer table: out of memory");
    sy__assign__pack(&t, buf);
    if (zmq_msg_init_data((zmq_msg_t *)table, buf, len, free_buf, NULL) != 0) {
        free(buf);
        return sy_err_zmq(SY_ENOMEM, errno, "zmq_msg_init_data");
    }
    return SY_OK;
}

sy_status sy_proto_send_with_table(void *zsock, const void *routing_id, size_t routing_len,
                                   const Sy__Envelope *env, void *table) {
    void *buf;
    size_t len;
    SY_CHECK(sy_proto_pack(env, &buf, &len));
    if (routing_id && zmq_send(zsock, routing_id, routing_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        int e = errno;
        free(buf);
        return sy_err_zmq(SY_EIO, e, "send %s: routing frame", sy_proto_body_name(env->body_case));
    }
    zmq_msg_t m, t;
    if (zmq_msg_init_data(&m, buf, len, free_buf, NULL) != 0) {
        free(buf);
        return sy_err_zmq(SY_ENOMEM, errno, "zmq_msg_init_data");
    }
    if (zmq_msg_send(&m, zsock, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        int e = errno;
        zmq_msg_close(&m);
        return sy_err_zmq(SY_EIO, e, "send %s", sy_proto_body_name(env->body_case));
    }
    zmq_msg_init(&t);
    if (zmq_msg_copy(&t, (zmq_msg_t *)table) != 0 || zmq_msg_send(&t, zsock, ZMQ_DONTWAIT) < 0) {
        int e = errno;
        zmq_msg_close(&t);
        return sy_err_zmq(SY_EIO, e, "send %s: table frame", sy_proto_body_name(env->body_case));
    }
    return SY_OK;
}

bool sy_proto_recv(void *zsock, int flags, Sy__Envelope **out, sy_proto_drop *why, size_t *bytes, int *frames) {
    zmq_msg_t part[2];
    zmq_msg_init(&part[0]);
    zmq_msg_init(&part[1]);
    *out = NULL;
    if (zmq_msg_recv(&part[0], zsock, flags) < 0) {
        int e = errno;
        zmq_msg_close(&part[0]);
        zmq_msg_close(&part[1]);
        errno = e;
        return false;
    }
    size_t total = zmq_msg_size(&part[0]);
    int n = 1; /* frames read; the parts of a message arrive together, so no waiting for them */
    bool more = zmq_msg_more(&part[0]);
    while (more) {
        zmq_msg_t x;
        zmq_msg_init(&x);
        if (zmq_msg_recv(&x, zsock, 0) < 0) {
            zmq_msg_close(&x);
            break;
        }
        total += zmq_msg_size(&x);
        more = zmq_msg_more(&x);
        if (n == 1) zmq_msg_move(&part[1], &x);
        zmq_msg_close(&x);
        n++;
    }
    if (bytes) *bytes = total;
    if (frames) *frames = n;
    if (n > 2) {
        *why = SY_DROP_INVALID;
        sy_err_set(SY_EFORMAT, "a message of %d frames (at most 2)", n);
    } else {
        *why = sy_proto_unpack_frames(zmq_msg_data(&part[0]), zmq_msg_size(&part[0]),
                                      n == 2 ? zmq_msg_data(&part[1]) : NULL, n == 2 ? zmq_msg_size(&part[1]) : 0, out);
    }
    zmq_msg_close(&part[0]);
    zmq_msg_close(&part[1]);
    return true;
}

bool sy_proto_monitor_event(void *mon, uint16_t *event, uint32_t *value) {
    zmq_msg_t ev, addr;
    zmq_msg_init(&ev);
    if (zmq_msg_recv(&ev, mon, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&ev);
        return false;
    }
    zmq_msg_init(&addr);
    if (zmq_msg_more(&ev)) zmq_msg_recv(&addr, mon, 0);
    *event = 0;
    *value = 0;
    if (zmq_msg_size(&ev) >= 6) { /* uint16 event id, uint32 value (native byte order) */
        memcpy(event, zmq_msg_data(&ev), 2);
        memcpy(value, (const char *)zmq_msg_data(&ev) + 2, 4);
    }
    zmq_msg_close(&ev);
    zmq_msg_close(&addr);
    return true;
}
