/* Expert placement (src/proto/placement.h): balanced ranges at start; after a change of
 * membership, survivors keep their experts and as few experts as possible move, with every rank
 * holding E/W or E/W + 1. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "base/owners.h"
#include "proto/placement.h"

static void check_balanced(const uint32_t *owner, int E, int W) {
    int cnt[64] = {0};
    for (int e = 0; e < E; e++) {
        assert_true(owner[e] < (uint32_t)W);
        cnt[owner[e]]++;
    }
    for (int r = 0; r < W; r++) assert_true(cnt[r] == E / W || cnt[r] == E / W + 1);
}

static void test_sticky_without_history_is_balanced(void **s) {
    (void)s;
    for (int E = 1; E <= 17; E++)
        for (int W = 1; W <= 9; W++) {
            uint32_t a[32], b[32];
            assert_int_equal(sy_placement_balanced(E, W, a), SY_OK);
            assert_int_equal(sy_placement_sticky(E, W, NULL, b), SY_OK);
            assert_memory_equal(a, b, sizeof(uint32_t) * (size_t)E);
            check_balanced(b, E, W);
        }
}

static void test_survivors_keep_their_experts(void **s) {
    (void)s;
    /* 8 experts on 4 ranks {0,1}{2,3}{4,5}{6,7}; old rank 1 dies; survivors become ranks 0,1,2 */
    int prev[8] = {0, 0, -1, -1, 1, 1, 2, 2};
    uint32_t owner[8];
    assert_int_equal(sy_placement_sticky(8, 3, prev, owner), SY_OK);
    check_balanced(owner, 8, 3);
    int moved = 0;
    for (int e = 0; e < 8; e++) {
        if (prev[e] >= 0) assert_int_equal(owner[e], (uint32_t)prev[e]); /* kept */
        else moved++;
    }
    assert_int_equal(moved, 2); /* only the orphans move */
    /* growth 2 -> 4: ranks 0, 1 held 4 each; the newcomers 2, 3 take 2 each, 4 moves in all */
    int prev2[8] = {0, 0, 0, 0, 1, 1, 1, 1};
    assert_int_equal(sy_placement_sticky(8, 4, prev2, owner), SY_OK);
    check_balanced(owner, 8, 4);
    int kept = 0;
    for (int e = 0; e < 8; e++) kept += (int)owner[e] == prev2[e];
    assert_int_equal(kept, 4);
    /* uneven: 8 over 3 -> the two ranks that held the most get the extra slots */
    int prev3[8] = {0, 0, 0, 1, 1, 1, 2, 2};
    assert_int_equal(sy_placement_sticky(8, 3, prev3, owner), SY_OK);
    for (int e = 0; e < 8; e++) assert_int_equal(owner[e], (uint32_t)prev3[e]); /* nothing moves */
}

static void test_bad_input(void **s) {
    (void)s;
    uint32_t owner[4];
    assert_int_equal(sy_placement_sticky(0, 2, NULL, owner), SY_EINVAL);
    assert_int_equal(sy_placement_sticky(4, 0, NULL, owner), SY_EINVAL);
    int prev[4] = {7, -3, 0, 1}; /* out-of-range previous owners are treated as gone */
    assert_int_equal(sy_placement_sticky(4, 2, prev, owner), SY_OK);
    check_balanced(owner, 4, 2);
}

/* sy_owners_group: every expert once, under its owner, ascending; a rank outside the world named */
static void test_owners_group(void **s) {
    (void)s;
    enum { E = 37, W = 5 };
    uint32_t owner[E];
    uint64_t x = 12345;
    for (int e = 0; e < E; e++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        owner[e] = (uint32_t)((x >> 33) % W);
    }
    owner[3] = 4; /* rank 4 owns something; rank 2 owns nothing */
    for (int e = 0; e < E; e++)
        if (owner[e] == 2) owner[e] = 0;
    int32_t off[W + 1], exp[E];
    assert_int_equal(sy_owners_group(owner, E, W, off, exp), -1);
    assert_int_equal(off[0], 0);
    assert_int_equal(off[W], E);
    assert_int_equal(off[2], off[3]);
    for (int q = 0; q < W; q++)
        for (int i = off[q]; i < off[q + 1]; i++) {
            assert_int_equal(owner[exp[i]], q);
            if (i > off[q]) assert_true(exp[i] > exp[i - 1]);
        }
    owner[20] = W;
    assert_int_equal(sy_owners_group(owner, E, W, off, exp), 20);
    assert_int_equal(sy_owners_group(owner, 0, W, off, exp), -1);
    assert_int_equal(off[W], 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sticky_without_history_is_balanced),
        cmocka_unit_test(test_survivors_keep_their_experts),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_owners_group),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
