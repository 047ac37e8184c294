/* Tests of src/proto/curve.c: keygen round trip, no overwrite, and every malformed key file
 * giving an error that names the file and the line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <zmq.h>

#include "proto/curve.h"

#define SY_TESTDIR_PREFIX "/tmp/sy_test_curve_"
#include "sy_test.h" /* setup_dir / teardown_dir around the group; tmpdir */

static const char *tmp_path(const char *name) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    return path;
}

/* Writes text to <tmpdir>/<name> with the given mode; returns the path (static buffer). */
static const char *write_file(const char *name, const char *text, mode_t mode) {
    const char *path = tmp_path(name);
    unlink(path);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    assert_true(fputs(text, fp) >= 0);
    assert_int_equal(fclose(fp), 0);
    assert_int_equal(chmod(path, mode), 0);
    return path;
}

static void assert_msg_has(const char *needle) {
    const char *msg = sy_err_msg();
    if (!strstr(msg, needle)) fail_msg("error message \"%s\" does not contain \"%s\"", msg, needle);
}

static int skip_without_curve(void) {
    if (zmq_has("curve")) return 0;
    fprintf(stderr, "libzmq without CURVE: skipped\n");
    return 1;
}

static void test_keygen_round_trip(void **state) {
    (void)state;
    if (skip_without_curve()) skip();
    char kp[600], pp[600];
    assert_int_equal(sy_curve_keygen(tmp_path("a"), kp, pp, sizeof kp), SY_OK);
    struct stat st;
    assert_int_equal(stat(kp, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    sy_curve_key k, p;
    if (sy_curve_load_key(kp, true, &k) != SY_OK) fail_msg("%s", sy_err_msg());
    assert_true(k.has_secret);
    assert_int_equal(strlen(k.public_z85), 40);
    assert_int_equal(strlen(k.secret_z85), 40);
    char derived[41];
    assert_int_equal(zmq_curve_public(derived, k.secret_z85), 0);
    assert_string_equal(derived, k.public_z85);
    if (sy_curve_load_key(pp, false, &p) != SY_OK) fail_msg("%s", sy_err_msg());
    assert_string_equal(p.public_z85, k.public_z85);
    assert_false(p.has_secret);
    /* the public half of a .key file, without its secret */
    assert_int_equal(sy_curve_load_key(kp, false, &p), SY_OK);
    assert_string_equal(p.public_z85, k.public_z85);
    assert_string_equal(p.secret_z85, "");
    /* a .pub where a .key is needed */
    assert_int_equal(sy_curve_load_key(pp, true, &p), SY_EFORMAT);
    assert_msg_has(pp);
    assert_msg_has("no 'secret-key = KEY' line");
    /* no overwrite, of either file */
    char before[300];
    FILE *f = fopen(kp, "r");
    size_t n = fread(before, 1, sizeof before - 1, f);
    before[n] = 0;
    fclose(f);
    assert_int_equal(sy_curve_keygen(tmp_path("a"), NULL, NULL, 0), SY_EEXIST);
    assert_msg_has("a.key exists already");
    assert_int_equal(sy_curve_load_key(kp, true, &p), SY_OK);
    assert_string_equal(p.secret_z85, k.secret_z85);
    unlink(kp);
    assert_int_equal(sy_curve_keygen(tmp_path("a"), NULL, NULL, 0), SY_EEXIST);
    assert_msg_has("a.pub exists already");
    assert_int_equal(access(kp, F_OK), -1); /* nothing written */
    sy_curve_key_wipe(&k);
    assert_string_equal(k.secret_z85, "");
}

/* Two real keys, for hand-written files. */
static char PUB[41], SEC[41], PUB2[41], SEC2[41];

static void make_keys(void) {
    assert_int_equal(zmq_curve_keypair(PUB, SEC), 0);
    assert_int_equal(zmq_curve_keypair(PUB2, SEC2), 0);
}

static void expect_bad_key(const char *name, const char *text, mode_t mode, bool need_secret, sy_status want,
                           const char *where, const char *what) {
    const char *path = write_file(name, text, mode);
    char p[512];
    snprintf(p, sizeof p, "%s", path);
    sy_curve_key k;
    sy_status s = sy_curve_load_key(p, need_secret, &k);
    if (s != want) fail_msg("%s: status %d, want %d (%s)", name, s, want, sy_err_msg());
    char loc[600];
    snprintf(loc, sizeof loc, "%s%s", p, where);
    assert_msg_has(loc);
    assert_msg_has(what);
    assert_string_equal(k.secret_z85, ""); /* nothing half-loaded */
}

static void test_malformed_key_files(void **state) {
    (void)state;
    if (skip_without_curve()) skip();
    make_keys();
    char t[600];
    snprintf(t, sizeof t, "# c\npublic-key = %s\nsecret-key = %s\n", PUB, SEC);
    const char *ok = write_file("ok.key", t, 0600);
    sy_curve_key k;
    if (sy_curve_load_key(ok, true, &k) != SY_OK) fail_msg("%s", sy_err_msg());
    assert_string_equal(k.public_z85, PUB);

    /* too short, too long */
    snprintf(t, sizeof t, "public-key = %.39s\nsecret-key = %s\n", PUB, SEC);
    expect_bad_key("short.key", t, 0600, true, SY_EFORMAT, ":1:", "a key is 40 Z85 characters, this is 39");
    snprintf(t, sizeof t, "# one\n# two\npublic-key = %s\nsecret-key = %sA\n", PUB, SEC);
    expect_bad_key("long.key", t, 0600, true, SY_EFORMAT, ":4:", "this is 41");
    /* a character outside Z85 */
    char bad[41];
    memcpy(bad, PUB, 41);
    bad[7] = '~';
    snprintf(t, sizeof t, "public-key = %s\nsecret-key = %s\n", bad, SEC);
    expect_bad_key("badchar.key", t, 0600, true, SY_EFORMAT, ":1:", "character 8 (0x7e) is not a Z85 character");
    /* the secret missing, an unknown entry, a line without '=', a repeated entry */
    snprintf(t, sizeof t, "public-key = %s\n", PUB);
    expect_bad_key("nosecret.key", t, 0600, true, SY_EFORMAT, ":", "no 'secret-key = KEY' line");
    snprintf(t, sizeof t, "public-key = %s\nsecrte-key = %s\n", PUB, SEC);
    expect_bad_key("typo.key", t, 0600, true, SY_EFORMAT, ":2:", "unknown entry 'secrte-key'");
    snprintf(t, sizeof t, "public-key %s\n", PUB);
    expect_bad_key("noeq.key", t, 0600, false, SY_EFORMAT, ":1:", "expected 'public-key = KEY'");
    snprintf(t, sizeof t, "public-key = %s\npublic-key = %s\nsecret-key = %s\n", PUB, PUB, SEC);
    expect_bad_key("twice.key", t, 0600, true, SY_EFORMAT, ":2:", "given twice (first on line 1)");
    expect_bad_key("empty.pub", "# nothing\n", 0644, false, SY_EFORMAT, ":", "no 'public-key = KEY' line");
    /* halves of two different pairs */
    snprintf(t, sizeof t, "public-key = %s\nsecret-key = %s\n", PUB2, SEC);
    expect_bad_key("mixed.key", t, 0600, true, SY_EFORMAT, ":1:", "does not belong to the secret-key on line 2");
    /* a secret key readable by others is refused; the same file for its public half is fine */
    snprintf(t, sizeof t, "public-key = %s\nsecret-key = %s\n", PUB, SEC);
    expect_bad_key("open.key", t, 0644, true, SY_EINVAL, ": permissions 0644", "chmod 600");
    expect_bad_key("group.key", t, 0640, true, SY_EINVAL, ": permissions 0640", "owner only");
    assert_int_equal(sy_curve_load_key(tmp_path("open.key"), false, &k), SY_OK);
    /* a missing file */
    assert_int_equal(sy_curve_load_key(tmp_path("nope.key"), true, &k), SY_ENOTFOUND);
    assert_msg_has("nope.key");
    /* a line too long (not a key file at all) */
    char big[2000];
    memset(big, 'x', sizeof big - 2);
    big[sizeof big - 2] = '\n';
    big[sizeof big - 1] = 0;
    expect_bad_key("big.pub", big, 0644, false, SY_EFORMAT, ":1:", "line longer than");
}

static void test_authorized_keys(void **state) {
    (void)state;
    if (skip_without_curve()) skip();
    make_keys();
    char t[800];
    snprintf(t, sizeof t,
             "# workers\n\n%s  worker one\n# switchyard CURVE public key\npublic-key = %s\n   \n%s\n", PUB, PUB2, PUB);
    const char *path = write_file("auth", t, 0644);
    sy_curve_keyset_t *set = NULL;
    if (sy_curve_keyset_load(path, &set) != SY_OK) fail_msg("%s", sy_err_msg());
    assert_int_equal(sy_curve_keyset_size(set), 2); /* the repeated key counts once */
    uint8_t raw[32], raw2[32], other[32];
    assert_true(sy_curve_z85_ok(PUB, raw));
    assert_true(sy_curve_z85_ok(PUB2, raw2));
    assert_true(sy_curve_keyset_has(set, raw));
    assert_true(sy_curve_keyset_has(set, raw2));
    char op[41], os[41];
    zmq_curve_keypair(op, os);
    assert_true(sy_curve_z85_ok(op, other));
    assert_false(sy_curve_keyset_has(set, other));
    sy_curve_keyset_destroy(&set);
    assert_null(set);
    sy_curve_keyset_destroy(&set); /* twice is fine */

    struct {
        const char *name, *line, *msg;
    } bad[] = {
        {"auth-short", "%.30s\n", ":2: not a public key: a key is 40 Z85 characters, this is 30"},
        {"auth-char", "%.39s\"\n", ":2: not a public key: character 40 (0x22)"},
        {"auth-secret", "secret-key = %s\n", ":2: a secret key"},
        {"auth-trailing", "public-key = %s extra\n", ":2: text after the key"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char line[200];
        snprintf(line, sizeof line, bad[i].line, PUB);
        snprintf(t, sizeof t, "%s\n%s", PUB2, line);
        path = write_file(bad[i].name, t, 0644);
        char p[512];
        snprintf(p, sizeof p, "%s", path);
        assert_int_equal(sy_curve_keyset_load(p, &set), SY_EFORMAT);
        assert_null(set);
        assert_msg_has(p);
        assert_msg_has(bad[i].msg);
    }
    path = write_file("auth-empty", "# nobody yet\n\n", 0644);
    assert_int_equal(sy_curve_keyset_load(path, &set), SY_EFORMAT);
    assert_msg_has("lists no public key");
    assert_int_equal(sy_curve_keyset_load(tmp_path("auth-missing"), &set), SY_ENOTFOUND);
    assert_msg_has("auth-missing");
}

static void test_z85_ok(void **state) {
    (void)state;
    if (skip_without_curve()) skip();
    make_keys();
    assert_true(sy_curve_z85_ok(PUB, NULL));
    assert_false(sy_curve_z85_ok("", NULL));
    assert_false(sy_curve_z85_ok(NULL, NULL));
    char k[42];
    snprintf(k, sizeof k, "%s", PUB);
    k[0] = ' ';
    assert_false(sy_curve_z85_ok(k, NULL));
    snprintf(k, sizeof k, "%sA", PUB);
    assert_false(sy_curve_z85_ok(k, NULL));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keygen_round_trip),
        cmocka_unit_test(test_malformed_key_files),
        cmocka_unit_test(test_authorized_keys),
        cmocka_unit_test(test_z85_ok),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
