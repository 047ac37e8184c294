/* Fuzzes sy_proto_unpack (a control-plane frame off the network) and, for an accepted
 * envelope, walks every field the receivers read and packs it again; the same bytes also go to
 * sy_proto_unpack_frames as two frames (an Assign and its peer table). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "proto/peers.h"
#include "proto/protocol.h"

static volatile size_t sink;

static void touch(const char *s) {
    if (s) sink += strlen(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_tmpdir(); /* quiets the log */
    Sy__Envelope *env = NULL;
    /* the same bytes as a message of two frames (an Assign and its table frame, peers_follow):
     * split in the middle, whatever they hold */
    sy_proto_drop why = sy_proto_unpack_frames(data, size / 2, data + size / 2, size - size / 2, &env);
    sink += strlen(sy_proto_drop_name(why)) + strlen(sy_err_msg());
    if (env && env->body_case == SY__ENVELOPE__BODY_ASSIGN) sink += env->assign->n_peers;
    sy_proto_free(env);
    env = NULL;
    why = sy_proto_unpack(data, size, &env);
    sink += strlen(sy_proto_drop_name(why)) + strlen(sy_err_msg());
    if (why != SY_DROP_NONE) return 0;
    touch(env->run_id);
    touch(sy_proto_body_name(env->body_case));
    switch (env->body_case) {
    case SY__ENVELOPE__BODY_HELLO:
        touch(env->hello->worker_id), touch(env->hello->host), touch(env->hello->data_endpoint);
        break;
    case SY__ENVELOPE__BODY_STEP_DONE:
        for (size_t l = 0; l < env->step_done->n_expert_counts; l++)
            for (size_t e = 0; e < env->step_done->expert_counts[l]->n_counts; e++)
                sink += env->step_done->expert_counts[l]->counts[e];
        break;
    case SY__ENVELOPE__BODY_CHECKPOINT_PART:
        for (size_t i = 0; i < env->checkpoint_part->n_objects; i++)
            touch(env->checkpoint_part->objects[i]->name), touch(env->checkpoint_part->objects[i]->sha256);
        break;
    case SY__ENVELOPE__BODY_FAULT: touch(env->fault->kind), touch(env->fault->detail); break;
    case SY__ENVELOPE__BODY_ASSIGN: {
        const Sy__Assign *as = env->assign;
        for (size_t i = 0; i < as->n_peers; i++) touch(as->peers[i]);
        /* the worker's use: the table, whole or an edit applied to a base (proto/peers.h; here
         * a base of 3 entries), then the owner rank of each expert indexes it */
        static const char *const base_ep[3] = {"tcp://a:1", "tcp://b:2", "tcp://c:3"};
        char **ep = NULL, **key = NULL;
        const char *const *pk = as->n_peer_keys ? (const char *const *)as->peer_keys : NULL;
        if (as->peers_base ? sy_peers_apply(3, base_ep, NULL, as->peers_edit, as->n_peers_edit,
                                            (const char *const *)as->peers, pk, as->n_peers, (int)as->world,
                                            &ep, &key) == SY_OK
                           : sy_peers_copy((int)as->n_peers, (const char *const *)as->peers, pk, &ep, &key) == SY_OK) {
            for (size_t e = 0; e < as->n_placement; e++) touch(ep[as->placement[e]]);
            touch(ep[as->rank]);
            if (key) touch(key[as->rank]);
            sy_peers_free((int)as->world, ep, key);
        }
        touch(as->config_json);
        break;
    }
    default: break;
    }
    void *buf = NULL;
    size_t len = 0;
    if (sy_proto_pack(env, &buf, &len) == SY_OK) {
        Sy__Envelope *again = NULL;
        /* protobuf-c keeps unknown fields and packs them back as they came, invalid ones (field
         * number 0) included, so a repacked frame may not read back: it must just not crash */
        (void)sy_proto_unpack(buf, len, &again);
        sy_proto_free(again);
    }
    free(buf);
    sy_proto_free(env);
    return 0;
}
