/* The control-plane wire format shared by the coordinator and the worker (docs/protocol.md):
 * one sy.Envelope (src/proto/switchyard.proto) per ZeroMQ frame.
 *
 * This module packs and unpacks envelopes with the checks every receiver applies (size limit,
 * parse, protocol version), names the reasons a message is dropped (the labels of
 * /metrics' switchyard_dropped_messages_total), and sends an envelope on a socket. Expert
 * placement (which rank owns which expert, carried in Assign) is proto/placement.h. It holds
 * no state and depends only on libzmq and protobuf-c.
 *
 * Ownership: sy_proto_pack's buffer is malloc'ed for the caller (free()); an unpacked envelope
 * is freed with sy_proto_free(). Thread: any. */
#ifndef SY_PROTOCOL_H
#define SY_PROTOCOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "proto/switchyard.pb-c.h"

/* Must equal the version comment of src/proto/switchyard.proto. */
#define SY_PROTO_VERSION 2
/* Frames larger than this are dropped unparsed (counted as "oversize"). */
#define SY_PROTO_MAX_FRAME ((size_t)16 << 20)
/* Transport guard (ZMQ_MAXMSGSIZE): libzmq disconnects a peer sending a larger frame before it
 * is ever buffered whole. Above SY_PROTO_MAX_FRAME so that moderately oversize frames still
 * reach the receiver and are counted. */
#define SY_PROTO_TRANSPORT_MAX ((int64_t)64 << 20)

/* Why a received message was dropped. SY_DROP_NONE (0) means accepted. */
typedef enum {
    SY_DROP_NONE = 0,
    SY_DROP_OVERSIZE,         /* frame > SY_PROTO_MAX_FRAME */
    SY_DROP_PARSE,            /* not a valid sy.Envelope (garbage, truncated) */
    SY_DROP_VERSION,          /* envelope.version != SY_PROTO_VERSION */
    SY_DROP_RUN_ID,           /* another run's message */
    SY_DROP_INCARNATION,      /* stamped with another coordinator incarnation */
    SY_DROP_STALE_GENERATION, /* a result (StepDone, CheckpointPart, Fault) of another generation */
    SY_DROP_UNKNOWN_WORKER,   /* from a sender that has not registered (Hello) */
    SY_DROP_UNKNOWN_MESSAGE,  /* no body, or a body this side never receives */
    SY_DROP_UNEXPECTED,       /* a valid message the receiver's state does not expect */
    SY_DROP_INVALID,          /* well-formed but with invalid contents (bad field values) */
    SY_DROP_BAD_FRAME,        /* wrong number of ZeroMQ frames, empty frame, identity mismatch */
    SY_DROP_AUTH,             /* names a registered worker but fails its proof (session secret,
                               * CURVE public key): an impostor or a stale process */
    SY_DROP__COUNT
} sy_proto_drop;

/* Label of a reason ("oversize", "parse", ...); "unknown" out of range. */
const char *sy_proto_drop_name(sy_proto_drop reason);
/* Name of a body case ("hello", "step_done", ...; "none" when unset). */
const char *sy_proto_body_name(Sy__Envelope__BodyCase body);

/* Initialises the whole of env (sy__envelope__init: the body is cleared too) with version,
 * run id (borrowed, not copied), incarnation and generation. Call it first, then set body_case
 * and the body pointer. */
void sy_proto_init(Sy__Envelope *env, const char *run_id, uint64_t incarnation,
                   uint64_t generation);

/* Serialises env into a malloc'ed buffer. SY_EINVAL if it would exceed SY_PROTO_MAX_FRAME. */
sy_status sy_proto_pack(const Sy__Envelope *env, void **buf, size_t *len);

/* Parses one frame. Returns SY_DROP_NONE and sets *out (free with sy_proto_free), or a drop
 * reason (oversize, parse, version; invalid for an Assign whose rank, peers or placement do
 * not fit its world) with *out = NULL and a message in sy_err_msg(). Run id, incarnation,
 * generation and the rest of the body are the caller's to check: they depend on its state. */
sy_proto_drop sy_proto_unpack(const void *buf, size_t len, Sy__Envelope **out);
/* The same for a message of two frames (table NULL: one frame, as sy_proto_unpack): the second
 * frame is the peer table of an Assign with peers_follow set, an Assign holding only `peers`,
 * `peer_keys` and `replica_peers`, which are moved into it before it is checked. A second frame
 * after anything else, a table frame with other fields, or peers_follow without a table frame
 * is SY_DROP_INVALID; the two frames together are subject to the size limit. */
sy_proto_drop sy_proto_unpack_frames(const void *buf, size_t len, const void *table, size_t table_len,
                                     Sy__Envelope **out);
/* Receives one message of one or two frames from a ZeroMQ socket (flags: 0 or ZMQ_DONTWAIT) and
 * unpacks it with sy_proto_unpack_frames. Returns false when nothing was received (errno from
 * zmq_msg_recv); otherwise true with *why the drop reason (SY_DROP_NONE: *out set). A message of
 * more than two frames is read whole and dropped (SY_DROP_INVALID). *bytes (may be NULL): its size
 * in all; *frames (may be NULL): how many frames it had. */
bool sy_proto_recv(void *zsock, int flags, Sy__Envelope **out, sy_proto_drop *why, size_t *bytes, int *frames);
/* Packs the peer table of an Assign (peers, peer_keys, replica_peers: n, n or 0, n or 0 entries)
 * as the second frame of Assigns with peers_follow, into *table (a zmq_msg_t the caller closes):
 * sy_proto_send_with_table sends it by reference (zmq_msg_copy), not copied per receiver. */
sy_status sy_proto_pack_table(size_t n, char **peers, char **keys, size_t n_keys, char **replicas, size_t n_rep,
                              void *table);
void sy_proto_free(Sy__Envelope *env);

/* Packs env and sends it on a ZeroMQ socket without blocking (ZMQ_DONTWAIT): when routing_id
 * is not NULL (ROUTER side) a routing frame of routing_len bytes goes first. SY_EIO when the
 * peer is unreachable or the queue is full (message not sent), SY_EINVAL if it cannot be
 * packed. */
sy_status sy_proto_send(void *zsock, const void *routing_id, size_t routing_len,
                        const Sy__Envelope *env);
/* The same, then `table` (a zmq_msg_t made by sy_proto_pack_table) as the message's last frame. */
sy_status sy_proto_send_with_table(void *zsock, const void *routing_id, size_t routing_len,
                                   const Sy__Envelope *env, void *table);

/* Takes one event from a ZeroMQ socket monitor (zmq_socket_monitor's PAIR), without waiting:
 * true with *event / *value set, false when none is queued. The address frame is consumed. */
bool sy_proto_monitor_event(void *mon, uint16_t *event, uint32_t *value);

#endif
