/* src/backend/backend_emu: the CPU emulation backend, which runs the shared host/device kernel
 * bodies (src/backend/kernels/) in host loops over a CUDA grid's index space, against the CPU
 * backend on the same inputs, in fp32 and bf16 mode:
 *   - the bodies' scalar helpers against their host twins (bf16 rounding, expf, the keyed draws);
 *   - every op of the table, one by one;
 *   - a Switch layer forward + backward (jitter, capacity drops, expert dropout);
 *   - a tiny Switch LM: forward + backward of two micro-batches, clipping and an AdamW step.
 * Tolerance: none. Both backends do the same fp32/fp64 operations in the same order (the bodies
 * copy the CPU backend's loops; GCC in C11 mode does not contract into FMAs; both call the same
 * libm expf/logf; GEMMs and attention are the same sy_sgemm/OpenBLAS calls), and every random
 * draw is a pure function of its key. So every result must be equal bit for bit; a difference
 * means a body has drifted from the CPU backend, which is what the GPU will run.
 * All traffic goes through upload/download, so this also runs with SY_BACKEND_POISON=1. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu_math.h"
#include "backend/kernels/k_elementwise.h"
#include "backend/kernels/k_math.h"
#include "base/bf16.h"
#include "base/config.h"
#include "base/rng.h"
#include "model/model.h"
#include "model/optim.h"
#include "model/switch.h"

#define SY_TEST_SEED 0xe4a1ULL
#include "sy_test.h"
#include "sy_ops_harness.h"

/* Every result equal bit for bit; prints the first float that differs */
static void res_compare(const char *what, const results *a, const results *b) {
    assert_int_equal(a->n, b->n);
    int bad = 0;
    for (int i = 0; i < a->n; i++) {
        assert_string_equal(a->name[i], b->name[i]);
        assert_int_equal(a->bytes[i], b->bytes[i]);
        if (memcmp(a->data[i], b->data[i], a->bytes[i]) == 0) continue;
        bad++;
        const uint32_t *x = a->data[i], *y = b->data[i];
        for (size_t k = 0; k < a->bytes[i] / 4; k++)
            if (x[k] != y[k]) {
                float fx, fy;
                memcpy(&fx, &x[k], 4), memcpy(&fy, &y[k], 4);
                fprintf(stderr, "%s: %s differs at word %zu: cpu %08x (%g) emu %08x (%g)\n", what,
                        a->name[i], k, x[k], fx, y[k], fy);
                break;
            }
    }
    if (!bad) fprintf(stderr, "%s: %d results equal bit for bit\n", what, a->n);
    assert_int_equal(bad, 0);
}

/* ---------------------------------------------------------------- the bodies' helpers */

static void test_helpers_match_host_twins(void **state) {
    (void)state;
    /* bf16 rounding: a stride through every bit pattern, plus ties, NaN, Inf, overflow */
    size_t checked = 0;
    for (uint64_t u = 0; u <= 0xffffffffull; u += 65521) {
        float f;
        uint32_t b = (uint32_t)u;
        memcpy(&f, &b, 4);
        assert_int_equal(sy_k_f32_to_bf16(f), sy_f32_to_bf16(f));
        checked++;
    }
    const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0x7f7fffffu, 0x7f800000u, 0xff800000u,
                                0x7fc00001u, 0xffa00000u, 0x00008000u, 0x80018000u};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) {
        float f;
        memcpy(&f, &special[i], 4);
        assert_int_equal(sy_k_f32_to_bf16(f), sy_f32_to_bf16(f));
    }
    for (uint32_t h = 0; h < 65536; h++) {
        float a = sy_k_bf16_to_f32((uint16_t)h), b = sy_bf16_to_f32((uint16_t)h);
        assert_memory_equal(&a, &b, 4);
    }
    /* expf / tanhf of the CPU backend's vector loops */
    for (int i = 0; i < 200000; i++) {
        float x = (float)frand(-100.0, 100.0), a = sy_k_expf(x), b = sy_expf(x);
        float c = sy_k_tanhf(x / 10), d = sy_tanhf(x / 10);
        assert_memory_equal(&a, &b, 4);
        assert_memory_equal(&c, &d, 4);
    }
    /* draw i of a keyed row = the (i+1)-th sy_rng_uniform after sy_rng_key */
    const char *tags[] = {"router.jitter", "expert.dropout"};
    for (int k = 0; k < 50; k++) {
        uint64_t seed = (uint64_t)(urand() * 1e18), a = k, b = 3 * k + 1;
        uint64_t c = ((uint64_t)k << 32) | 7;
        const char *tag = tags[k & 1];
        sy_rng_t r = sy_rng_key(seed, tag, a, b, c);
        uint64_t key = sy_k_rng_key(seed, sy_fnv1a64(tag), a, b, c);
        assert_true(key == r.state);
        for (uint64_t i = 0; i < 300; i++) {
            float x = sy_rng_uniform(&r), y = sy_k_rng_uniform_at(key, i);
            assert_memory_equal(&x, &y, 4);
        }
    }
    fprintf(stderr, "helpers: %zu bf16 patterns, 65536 widenings, 200000 expf/tanhf, "
                    "15000 draws equal\n", checked);
}

/* ---------------------------------------------------------------- every op */

/* the ops in the harness's fp32 inputs; GEMMs: the CPU backend's in both (checks the delegation) */
static void ops_case(bool bf16) {
    op_inputs in;
    inputs_make(&in, false);
    sy_backend_t *cpu = NULL, *emu = NULL;
    assert_int_equal(sy_backend_cpu_new(0, bf16, &cpu), SY_OK);
    assert_int_equal(sy_backend_emu_new(bf16, &emu), SY_OK);
    results rc = {0}, re = {0};
    run_ops(cpu, &in, &rc, false);
    run_ops(emu, &in, &re, false);
    res_compare(bf16 ? "ops bf16" : "ops fp32", &rc, &re);
    res_free(&rc);
    res_free(&re);
    sy_backend_destroy(&cpu);
    sy_backend_destroy(&emu);
    inputs_free(&in);
}

static void test_ops_fp32(void **state) {
    (void)state;
    ops_case(false);
}

static void test_ops_bf16(void **state) {
    (void)state;
    ops_case(true);
}

/* ---------------------------------------------------------------- a Switch layer */

static void test_switch_layer_bf16(void **state) {
    (void)state;
    sy_backend_t *cpu = NULL, *emu = NULL;
    assert_int_equal(sy_backend_cpu_new(0, true, &cpu), SY_OK);
    assert_int_equal(sy_backend_emu_new(true, &emu), SY_OK);
    results rc = {0}, re = {0};
    switch_run(cpu, 0x5eed, &rc);
    switch_run(emu, 0x5eed, &re);
    res_compare("switch layer bf16", &rc, &re);
    res_free(&rc);
    res_free(&re);
    sy_backend_destroy(&cpu);
    sy_backend_destroy(&emu);
}

/* ---------------------------------------------------------------- a tiny model step */

static void model_case(bool bf16) {
    sy_backend_t *cpu = NULL, *emu = NULL;
    assert_int_equal(sy_backend_cpu_new(0, bf16, &cpu), SY_OK);
    assert_int_equal(sy_backend_emu_new(bf16, &emu), SY_OK);
    results rc = {0}, re = {0};
    model_run(cpu, bf16, &rc, NULL);
    model_run(emu, bf16, &re, NULL);
    res_compare(bf16 ? "model steps bf16" : "model steps fp32", &rc, &re);
    res_free(&rc);
    res_free(&re);
    sy_backend_destroy(&cpu);
    sy_backend_destroy(&emu);
}

static void test_model_steps_fp32(void **state) {
    (void)state;
    model_case(false);
}

static void test_model_steps_bf16(void **state) {
    (void)state;
    model_case(true);
}

/* ---------------------------------------------------------------- the selector */

static void test_select_from_env(void **state) {
    (void)state;
    const char *saved = getenv("SY_BACKEND");
    char *keep = saved ? strdup(saved) : NULL;
    sy_backend_t *be = NULL;
    setenv("SY_BACKEND", "emu", 1);
    assert_int_equal(sy_backend_new_from_env(1, true, &be), SY_OK);
    assert_true(be->bf16);
    sy_backend_destroy(&be);
    setenv("SY_BACKEND", "cpu", 1);
    assert_int_equal(sy_backend_new_from_env(1, false, &be), SY_OK);
    sy_backend_destroy(&be);
    setenv("SY_BACKEND", "tpu", 1);
    assert_int_equal(sy_backend_new_from_env(1, false, &be), SY_EINVAL);
    assert_null(be);
    if (keep) setenv("SY_BACKEND", keep, 1);
    else unsetenv("SY_BACKEND");
    free(keep);
}

int main(void) {
    unsetenv("SY_BACKEND"); /* the CPU side must be the CPU backend */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_helpers_match_host_twins),
        cmocka_unit_test(test_ops_fp32),
        cmocka_unit_test(test_ops_bf16),
        cmocka_unit_test(test_switch_layer_bf16),
        cmocka_unit_test(test_model_steps_fp32),
        cmocka_unit_test(test_model_steps_bf16),
        cmocka_unit_test(test_select_from_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
