/* Peer tables as edits (src/proto/peers.h, issue 14): an edit of the previous generation's table
 * rebuilds the new one exactly, entry for entry, for random changes of membership (losses,
 * newcomers, a restarted worker's new key at an old endpoint); after one loss it is two runs and
 * no fresh entry; edits that do not fit their base are refused with SY_EFORMAT.
 *
 * The table frame (Assign.peers_follow): an Assign sent with sy_proto_send_with_table over a real
 * ROUTER/DEALER pair arrives as two frames, the second the very bytes of the one packed table,
 * and sy_proto_recv puts back the Assign a single frame would have carried (same packed bytes);
 * a table frame after anything but such an Assign, peers_follow without a table, a table frame
 * holding other fields, and a message of three frames are dropped. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/peers.h"
#include "proto/protocol.h"

#include <zmq.h>

static uint64_t rng = 88172645463325252ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)rng;
}

/* A table of n entries named after ids[] (endpoint "tcp://h:ID", key "K...ID" padded to 40). */
static void make(int n, const int *ids, const int *key_ver, char **ep, char **key) {
    for (int r = 0; r < n; r++) {
        ep[r] = malloc(32);
        snprintf(ep[r], 32, "tcp://h:%d", ids[r]);
        if (key) {
            key[r] = malloc(41);
            snprintf(key[r], 41, "%020d%020d", ids[r], key_ver ? key_ver[ids[r]] : 0);
        }
    }
}

static void check_round_trip(int bn, char **bep, char **bkey, int n, char **ep, char **key) {
    uint32_t *edit;
    int *fresh;
    size_t n_edit, n_fresh;
    assert_int_equal(sy_peers_edit(bn, (const char *const *)bep, (const char *const *)bkey, n,
                                   (const char *const *)ep, (const char *const *)key, &edit, &n_edit, &fresh, &n_fresh),
                     SY_OK);
    const char **fep = calloc(n_fresh + 1, sizeof(char *)), **fkey = calloc(n_fresh + 1, sizeof(char *));
    for (size_t f = 0; f < n_fresh; f++) {
        fep[f] = ep[fresh[f]];
        fkey[f] = key ? key[fresh[f]] : NULL;
    }
    char **oep, **okey;
    assert_int_equal(sy_peers_apply(bn, (const char *const *)bep, (const char *const *)bkey, edit, n_edit, fep,
                                    key ? fkey : NULL, n_fresh, n, &oep, &okey),
                     SY_OK);
    for (int r = 0; r < n; r++) {
        assert_string_equal(oep[r], ep[r]);
        if (key) assert_string_equal(okey[r], key[r]);
    }
    if (!key) assert_null(okey);
    sy_peers_free(n, oep, okey);
    free(fep);
    free(fkey);
    free(edit);
    free(fresh);
}

static void test_random_membership_changes(void **s) {
    (void)s;
    int ver[400] = {0};
    for (int trial = 0; trial < 300; trial++) {
        bool keys = trial % 2;
        int bn = 1 + (int)(next_u32() % 60), n = 0;
        int bids[64], ids[200];
        for (int r = 0; r < bn; r++) bids[r] = r;
        char *bep[64], *bkey[64], *ep[200], *key[200];
        make(bn, bids, ver, bep, keys ? bkey : NULL);
        /* survivors in order, each lost with p 1/4, newcomers (ids 100+) mixed in */
        for (int r = 0; r < bn; r++) {
            if (next_u32() % 4) ids[n++] = r;
            if (next_u32() % 8 == 0) ids[n++] = 100 + (int)(next_u32() % 200);
        }
        if (keys && n && next_u32() % 3 == 0) ver[ids[0]]++; /* a restarted worker: same endpoint, new key */
        if (n == 0) ids[n++] = 399;
        make(n, ids, ver, ep, keys ? key : NULL);
        check_round_trip(bn, bep, keys ? bkey : NULL, n, ep, keys ? key : NULL);
        for (int r = 0; r < bn; r++) free(bep[r]), keys ? free(bkey[r]) : (void)0;
        for (int r = 0; r < n; r++) free(ep[r]), keys ? free(key[r]) : (void)0;
        if (keys && n) ver[ids[0]] = 0;
    }
}

static void test_one_loss_is_two_runs(void **s) {
    (void)s;
    enum { N = 1000 };
    int bids[N], ids[N - 1];
    for (int r = 0; r < N; r++) bids[r] = r;
    for (int r = 0, k = 0; r < N; r++)
        if (r != 500) ids[k++] = r;
    char *bep[N], *bkey[N], *ep[N], *key[N];
    make(N, bids, NULL, bep, bkey);
    make(N - 1, ids, NULL, ep, key);
    uint32_t *edit;
    int *fresh;
    size_t n_edit, n_fresh;
    assert_int_equal(sy_peers_edit(N, (const char *const *)bep, (const char *const *)bkey, N - 1,
                                   (const char *const *)ep, (const char *const *)key, &edit, &n_edit, &fresh, &n_fresh),
                     SY_OK);
    assert_int_equal(n_fresh, 0);
    assert_int_equal(n_edit, 4);
    uint32_t want[4] = {1, 500, 502, 499}; /* base ranks 0-499, then 501-999 */
    assert_memory_equal(edit, want, sizeof want);
    free(edit);
    free(fresh);
    /* a newcomer at the end: one more run of one fresh entry */
    check_round_trip(N - 1, ep, key, N, bep, bkey);
    for (int r = 0; r < N; r++) free(bep[r]), free(bkey[r]);
    for (int r = 0; r < N - 1; r++) free(ep[r]), free(key[r]);
}

static void test_bad_edits_refused(void **s) {
    (void)s;
    const char *bep[3] = {"tcp://a:1", "tcp://b:2", "tcp://c:3"};
    const char *fep[1] = {"tcp://d:4"};
    const char *fkey[1] = {"0123456789012345678901234567890123456789"};
    char **oep, **okey;
    struct {
        uint32_t edit[4];
        size_t n_edit, n_fresh;
        int world;
        const char *const *fkey;
    } bad[] = {
        {{1, 3, 0, 0}, 3, 0, 3, NULL},  /* odd length */
        {{2, 3, 0, 0}, 2, 0, 3, NULL},  /* run past the base's end */
        {{1, 2, 0, 0}, 2, 0, 3, NULL},  /* counts short of the world */
        {{1, 3, 0, 1}, 4, 0, 4, NULL},  /* a fresh entry that was not sent */
        {{1, 3, 0, 0}, 2, 1, 3, NULL},  /* a fresh entry left over */
        {{1, 3, 0, 1}, 4, 1, 4, fkey},  /* keys on the fresh side only */
        {{0, 0, 0, 0}, 0, 0, 0, NULL},  /* an empty world */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(sy_peers_apply(3, bep, NULL, bad[i].edit, bad[i].n_edit, fep, bad[i].fkey, bad[i].n_fresh,
                                        bad[i].world, &oep, &okey),
                         SY_EFORMAT);
        assert_null(oep);
    }
    uint32_t ok[4] = {1, 3, 0, 1};
    assert_int_equal(sy_peers_apply(3, bep, NULL, ok, 4, fep, NULL, 1, 4, &oep, &okey), SY_OK);
    assert_string_equal(oep[3], "tcp://d:4");
    sy_peers_free(4, oep, okey);
}

static void fill_assign(Sy__Assign *as, int n, char **ep, char **key, uint32_t *placement) {
    as->rank = 1;
    as->world = (uint32_t)n;
    as->n_placement = 4;
    as->placement = placement;
    as->start_step = 1;
    as->end_step = 10;
    as->restore_step = -1;
    as->config_json = "{}";
    as->n_peers = (size_t)n, as->peers = ep;
    as->n_peer_keys = (size_t)n, as->peer_keys = key;
}

static void test_table_frame(void **state) {
    (void)state;
    enum { N = 300 };
    int ids[N];
    for (int r = 0; r < N; r++) ids[r] = 1000 + r;
    char *ep[N], *key[N];
    make(N, ids, NULL, ep, key);
    uint32_t placement[4] = {0, 1, 2, 3};
    /* the reference: the whole table inside the Assign */
    Sy__Envelope env;
    Sy__Assign whole = SY__ASSIGN__INIT;
    sy_proto_init(&env, "run", 7, 3);
    fill_assign(&whole, N, ep, key, placement);
    env.body_case = SY__ENVELOPE__BODY_ASSIGN;
    env.assign = &whole;
    void *ref;
    size_t ref_len;
    assert_int_equal(sy_proto_pack(&env, &ref, &ref_len), SY_OK);

    void *ctx = zmq_ctx_new();
    void *router = zmq_socket(ctx, ZMQ_ROUTER), *dealer = zmq_socket(ctx, ZMQ_DEALER);
    assert_int_equal(zmq_setsockopt(dealer, ZMQ_ROUTING_ID, "w1", 2), 0);
    assert_int_equal(zmq_bind(router, "inproc://table"), 0);
    assert_int_equal(zmq_connect(dealer, "inproc://table"), 0);
    assert_int_equal(zmq_send(dealer, "hi", 2, 0), 2); /* the router learns the peer */
    char buf[8];
    assert_int_equal(zmq_recv(router, buf, sizeof buf, 0), 2);
    assert_int_equal(zmq_recv(router, buf, sizeof buf, 0), 2);

    zmq_msg_t table;
    assert_int_equal(sy_proto_pack_table(N, ep, key, N, NULL, 0, &table), SY_OK);
    const size_t table_len = zmq_msg_size(&table);
    Sy__Assign lean = SY__ASSIGN__INIT;
    fill_assign(&lean, N, ep, key, placement);
    lean.n_peers = lean.n_peer_keys = 0, lean.peers = lean.peer_keys = NULL;
    lean.peers_follow = true;
    env.assign = &lean;
    for (int k = 0; k < 3; k++) /* three receivers of the one table */
        assert_int_equal(sy_proto_send_with_table(router, "w1", 2, &env, &table), SY_OK);
    zmq_msg_close(&table); /* the queued copies keep its bytes */
    for (int k = 0; k < 3; k++) {
        Sy__Envelope *got = NULL;
        sy_proto_drop why;
        size_t bytes = 0;
        int frames = 0;
        assert_true(sy_proto_recv(dealer, 0, &got, &why, &bytes, &frames));
        assert_int_equal(why, SY_DROP_NONE);
        assert_int_equal(frames, 2);
        assert_true(bytes > table_len && table_len > 300 * 40);
        assert_false(got->assign->peers_follow);
        void *again;
        size_t again_len;
        assert_int_equal(sy_proto_pack(got, &again, &again_len), SY_OK);
        assert_int_equal(again_len, ref_len);
        assert_memory_equal(again, ref, ref_len); /* what one frame would have carried */
        free(again);
        sy_proto_free(got);
    }

    /* refusals */
    void *lean_buf, *tab_buf, *other_buf;
    size_t lean_len, tab_len, other_len;
    assert_int_equal(sy_proto_pack(&env, &lean_buf, &lean_len), SY_OK);
    Sy__Assign t = SY__ASSIGN__INIT;
    t.n_peers = N, t.peers = ep, t.n_peer_keys = N, t.peer_keys = key;
    tab_len = sy__assign__get_packed_size(&t);
    tab_buf = malloc(tab_len);
    sy__assign__pack(&t, tab_buf);
    Sy__Envelope *out = NULL;
    assert_int_equal(sy_proto_unpack_frames(lean_buf, lean_len, tab_buf, tab_len, &out), SY_DROP_NONE);
    sy_proto_free(out);
    /* peers_follow without its table */
    assert_int_equal(sy_proto_unpack_frames(lean_buf, lean_len, NULL, 0, &out), SY_DROP_INVALID);
    assert_null(out);
    /* a table after a message that announces none (the whole Assign) */
    assert_int_equal(sy_proto_unpack_frames(ref, ref_len, tab_buf, tab_len, &out), SY_DROP_INVALID);
    /* a table frame that also sets the rank */
    t.rank = 5;
    other_len = sy__assign__get_packed_size(&t);
    other_buf = malloc(other_len);
    sy__assign__pack(&t, other_buf);
    assert_int_equal(sy_proto_unpack_frames(lean_buf, lean_len, other_buf, other_len, &out), SY_DROP_INVALID);
    /* a table frame that is not an Assign */
    assert_int_equal(sy_proto_unpack_frames(lean_buf, lean_len, "\xff\xff\xff", 3, &out), SY_DROP_PARSE);
    /* together over the size limit */
    assert_int_equal(sy_proto_unpack_frames(lean_buf, lean_len, tab_buf, SY_PROTO_MAX_FRAME, &out), SY_DROP_OVERSIZE);
    /* three frames */
    zmq_send(router, "w1", 2, ZMQ_SNDMORE);
    zmq_send(router, lean_buf, lean_len, ZMQ_SNDMORE);
    zmq_send(router, tab_buf, tab_len, ZMQ_SNDMORE);
    zmq_send(router, tab_buf, tab_len, 0);
    sy_proto_drop why;
    int frames = 0;
    assert_true(sy_proto_recv(dealer, 0, &out, &why, NULL, &frames));
    assert_int_equal(why, SY_DROP_INVALID);
    assert_int_equal(frames, 3);
    assert_null(out);
    free(lean_buf), free(tab_buf), free(other_buf), free(ref);
    zmq_close(router);
    zmq_close(dealer);
    zmq_ctx_term(ctx);
    for (int r = 0; r < N; r++) free(ep[r]), free(key[r]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_membership_changes),
        cmocka_unit_test(test_one_loss_is_two_runs),
        cmocka_unit_test(test_bad_edits_refused),
        cmocka_unit_test(test_table_frame),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
