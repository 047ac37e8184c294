/* Tests of src/base/endpoint.c: which listen addresses count as reachable from this machine
 * only (sy_endpoint_is_loopback, the one place the "nothing listens off-loopback
 * unauthenticated" rule of issue 12 asks), and the endpoint syntax check. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "base/endpoint.h"

static void test_loopback_addresses(void **state) {
    (void)state;
    static const char *const yes[] = {
        "tcp://127.0.0.1:5555", "tcp://127.0.0.1:0", "tcp://127.0.0.1:*", "tcp://127.1.2.3:80",
        "tcp://127.255.255.255:1", "tcp://[::1]:5555", "tcp://[::1]:*", "tcp://[::ffff:127.0.0.1]:9",
        "tcp://localhost:5555", "tcp://LocalHost:5555", "tcp://localhost.:5555", "ipc:///tmp/sy.sock",
        "127.0.0.1:8080", "127.0.0.1:0", "localhost:8080", "[::1]:8080", "[0:0:0:0:0:0:0:1]:8080",
    };
    static const char *const no[] = {
        "tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://*:*", "tcp://[::]:5555", "tcp://10.0.0.7:5555",
        "tcp://192.168.1.2:*", "tcp://128.0.0.1:5555", "tcp://126.255.255.255:5555", "tcp://eth0:5555",
        "tcp://lo:5555", "tcp://coord.example.com:5555", "tcp://localhost.example.com:5555",
        "tcp://mylocalhost:5555", "tcp://[::2]:5555", "tcp://[::ffff:10.0.0.1]:5555", "tcp://[::1:5555",
        "0.0.0.0:8080", "*:8080", "[::]:8080", "10.1.2.3:8080", "node17:8080", "::1:8080", ":8080",
        "127.0.0.1", "udp://127.0.0.1:5555", "ipc://", "", "tcp://127.0.0.1.5:1",
    };
    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++)
        if (!sy_endpoint_is_loopback(yes[i])) fail_msg("%s: expected loopback", yes[i]);
    for (size_t i = 0; i < sizeof no / sizeof no[0]; i++)
        if (sy_endpoint_is_loopback(no[i])) fail_msg("%s: expected not loopback", no[i]);
    assert_false(sy_endpoint_is_loopback(NULL));
}

/* A host name longer than any buffer is not loopback, and does not overflow. */
static void test_loopback_long(void **state) {
    (void)state;
    char ep[1200] = "tcp://";
    memset(ep + 6, 'a', 1000);
    strcpy(ep + 1006, ":5555");
    assert_false(sy_endpoint_is_loopback(ep));
    memcpy(ep + 6, "127.0.0.1", 9); /* "127.0.0.1aaaa...": not an address */
    assert_false(sy_endpoint_is_loopback(ep));
}

static void test_check_syntax(void **state) {
    (void)state;
    assert_int_equal(sy_endpoint_check("tcp://127.0.0.1:5555", false, "x"), SY_OK);
    assert_int_equal(sy_endpoint_check("tcp://*:0", true, "x"), SY_OK);
    assert_int_equal(sy_endpoint_check("tcp://*:0", false, "x"), SY_EINVAL);
    assert_int_equal(sy_endpoint_check("tcp://[::1]:5555", false, "x"), SY_OK);
    assert_int_equal(sy_endpoint_check("tcp://300.0.0.1:5555", false, "--coordinator"), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "--coordinator 'tcp://300.0.0.1:5555'"));
    assert_int_equal(sy_endpoint_check("udp://h:1", false, "x"), SY_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loopback_addresses),
        cmocka_unit_test(test_loopback_long),
        cmocka_unit_test(test_check_syntax),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
