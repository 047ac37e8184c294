/* safetensors writer/reader and bf16 rounding: round trips, an independent rounding reference,
 * and one crafted bad file per validation rule. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/bf16.h"
#include "base/safetensors.h"

static uint64_t lcg_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd32(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(lcg_state >> 32);
}

static float bits_f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t f_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Reference float→bf16: pick the nearer of the two bf16 neighbours by exact distance in
 * double; on a tie the one with an even last mantissa bit. Returns the bf16 bits. */
static uint16_t ref_bf16(float x) {
    uint32_t u = f_bits(x);
    if (isnan(x)) return 0; /* handled by the caller */
    if (isinf(x)) return (uint16_t)(u >> 16);
    uint32_t sign = u & 0x80000000u, mag = u & 0x7fffffffu;
    uint32_t lo = mag & 0xffff0000u; /* truncation toward zero */
    if (lo == mag) return (uint16_t)((sign | lo) >> 16);
    int e = (int)(lo >> 23);
    double ulp = ldexp(1.0, (e ? e : 1) - 127 - 7);
    double lo_v = (double)bits_f(lo), hi_v = lo_v + ulp, xv = fabs((double)x);
    uint32_t hi = lo + 0x10000u; /* next magnitude up (0x7f800000 = Inf past the largest) */
    double dl = xv - lo_v, dh = hi_v - xv;
    uint32_t pick;
    if (dl < dh) pick = lo;
    else if (dh < dl) pick = hi;
    else pick = ((lo >> 16) & 1) ? hi : lo;
    return (uint16_t)((sign | pick) >> 16);
}

static void check_round(float x) {
    uint16_t got = sy_f32_to_bf16(x);
    if (isnan(x)) {
        assert_true(isnan(sy_bf16_to_f32(got)));
        assert_true(got & 0x0040u);                          /* quiet */
        assert_int_equal(got >> 15, f_bits(x) >> 31);          /* sign kept */
        return;
    }
    uint16_t want = ref_bf16(x);
    if (got != want) fail_msg("bf16(%a = 0x%08x): got 0x%04x want 0x%04x", (double)x, f_bits(x), got, want);
    assert_true(f_bits(sy_round_bf16(x)) == (uint32_t)want << 16);
}

static void test_bf16_rounding(void **state) {
    (void)state;
    /* Hand-computed cases. 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even → 1. */
    assert_true(sy_round_bf16(1.0f + 0x1p-8f) == 1.0f);
    /* 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even) → up. */
    assert_true(sy_round_bf16(1.0f + 3 * 0x1p-8f) == 1.0f + 0x1p-6f);
    assert_true(sy_round_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 1.0f + 0x1p-7f); /* just above half */
    assert_true(sy_round_bf16(-(1.0f + 3 * 0x1p-8f)) == -(1.0f + 0x1p-6f));
    assert_true(isinf(sy_round_bf16(INFINITY)) && sy_round_bf16(INFINITY) > 0);
    assert_true(isinf(sy_round_bf16(-INFINITY)) && sy_round_bf16(-INFINITY) < 0);
    assert_true(isinf(sy_round_bf16(bits_f(0x7f7fffffu))));    /* FLT_MAX rounds past bf16 max */
    assert_true(sy_round_bf16(bits_f(0x7f7f7fffu)) == bits_f(0x7f7f0000u)); /* below half: max */
    assert_true(f_bits(sy_round_bf16(-0.0f)) == 0x80000000u);
    assert_true(isnan(sy_round_bf16(NAN)));
    assert_int_equal(sy_f32_to_bf16(bits_f(0x7f800001u)), 0x7fc0); /* signalling NaN: not Inf */
    assert_int_equal(sy_f32_to_bf16(bits_f(0xff800001u)), 0xffc0);
    assert_int_equal(sy_f32_to_bf16(bits_f(0x7fffffffu)), 0x7fff);
    assert_true(sy_bf16_to_f32(0x3f80) == 1.0f && sy_bf16_to_f32(0xc000) == -2.0f);

    float special[] = {0.0f, -0.0f, 1.0f, 0.1f, -3.14159f, 1e-40f, -1e-45f, bits_f(0x00008000u), bits_f(0x00018000u),
                       bits_f(0x3f808000u), bits_f(0x3f818000u), bits_f(0x7f7f8000u), bits_f(0x7f7effffu), 65504.0f,
                       NAN, -NAN, INFINITY, -INFINITY, bits_f(0x7f800001u)};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) check_round(special[i]);
    for (int i = 0; i < 200000; i++) check_round(bits_f(rnd32()));
    /* ties exactly: low 16 bits = 0x8000 with random upper bits */
    for (int i = 0; i < 20000; i++) check_round(bits_f((rnd32() & 0xffff0000u) | 0x8000u));
}

/* ---------------------------------------------------------------- round trips */

#define NT 5
static float d_a[6], d_b[24], d_c[1], d_e[1], d_f[7];
static sy_tensor_ref make_tensors(sy_tensor_ref *t) {
    for (int i = 0; i < 6; i++) d_a[i] = (float)(i - 2) * 0.37f;
    for (int i = 0; i < 24; i++) d_b[i] = bits_f(rnd32() & 0xbfffffffu); /* finite, magnitude < 2 */
    d_c[0] = 42.5f;
    float spec[7] = {NAN, INFINITY, -INFINITY, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -0.0f, 3e38f};
    memcpy(d_f, spec, sizeof spec);
    t[0] = (sy_tensor_ref){"embed.weight", 2, {2, 3}, d_a};
    t[1] = (sy_tensor_ref){"blocks.0.attn.qkv.weight", 3, {2, 3, 4}, d_b};
    t[2] = (sy_tensor_ref){"scalar", 0, {0}, d_c};
    t[3] = (sy_tensor_ref){"empty", 2, {0, 5}, d_e};
    t[4] = (sy_tensor_ref){"special", 1, {7}, d_f};
    return t[0];
}

/* Independently re-parses the header with jansson and checks layout facts. */
static json_t *check_layout(const uint8_t *buf, size_t len, const char *dtype, int esize) {
    uint64_t n;
    memcpy(&n, buf, 8);
    assert_true(n % 8 == 0);
    assert_true(8 + n <= len);
    for (uint64_t i = 0; i < n; i++) assert_true(buf[8 + i] != 0);
    json_error_t e;
    json_t *h = json_loadb((const char *)buf + 8, n, 0, &e);
    assert_non_null(h);
    assert_string_equal(json_string_value(json_object_get(json_object_get(h, "__metadata__"), "format")), "pt");
    /* keys in the order given, after the metadata */
    const char *order[NT] = {"embed.weight", "blocks.0.attn.qkv.weight", "scalar", "empty", "special"};
    const char *k;
    json_t *v;
    int i = -1;
    uint64_t off = 0;
    json_object_foreach(h, k, v) {
        if (i < 0) {
            assert_string_equal(k, "__metadata__");
            i++;
            continue;
        }
        assert_string_equal(k, order[i]);
        assert_string_equal(json_string_value(json_object_get(v, "dtype")), dtype);
        json_t *o = json_object_get(v, "data_offsets");
        int64_t numel = 1;
        json_t *s = json_object_get(v, "shape");
        for (size_t d = 0; d < json_array_size(s); d++) numel *= json_integer_value(json_array_get(s, d));
        assert_int_equal(json_integer_value(json_array_get(o, 0)), off);
        off += (uint64_t)(numel * esize);
        assert_int_equal(json_integer_value(json_array_get(o, 1)), off);
        i++;
    }
    assert_int_equal(i, NT);
    assert_int_equal(8 + n + off, len);
    return h;
}

static void test_roundtrip_f32(void **state) {
    (void)state;
    sy_tensor_ref t[NT];
    make_tensors(t);
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(sy_st_serialize(t, NT, SY_ST_F32, &buf, &len), SY_OK);
    json_decref(check_layout(buf, len, "F32", 4));
    sy_st_file_t *f = NULL;
    assert_int_equal(sy_st_parse(buf, len, "mem", &f), SY_OK);
    free(buf);
    assert_int_equal(sy_st_count(f), NT);
    for (int i = 0; i < NT; i++) {
        assert_string_equal(sy_st_name(f, i), t[i].name);
        assert_string_equal(sy_st_dtype_name(f, i), "F32");
        int64_t sh[SY_MAX_DIMS];
        assert_int_equal(sy_st_shape(f, i, sh), t[i].ndim);
        for (int d = 0; d < t[i].ndim; d++) assert_int_equal(sh[d], t[i].shape[d]);
        int64_t numel = sy_tensor_numel(&t[i]);
        float *out = calloc((size_t)numel + 1, 4);
        sy_tensor_ref r = t[i];
        r.data = out;
        assert_int_equal(sy_st_load(f, &r), SY_OK);
        assert_memory_equal(out, t[i].data, (size_t)numel * 4); /* bit-exact, NaN included */
        free(out);
    }
    /* missing tensor, wrong shape */
    float tmp[6];
    sy_tensor_ref r = {"nope", 1, {6}, tmp};
    assert_int_equal(sy_st_load(f, &r), SY_ENOTFOUND);
    assert_non_null(strstr(sy_err_msg(), "nope"));
    r = (sy_tensor_ref){"embed.weight", 2, {3, 2}, tmp};
    assert_int_equal(sy_st_load(f, &r), SY_EFORMAT);
    assert_non_null(strstr(sy_err_msg(), "embed.weight"));
    assert_non_null(strstr(sy_err_msg(), "[2, 3]"));
    assert_non_null(strstr(sy_err_msg(), "[3, 2]"));
    assert_int_equal(sy_st_find(f, "scalar"), 2);
    sy_st_destroy(&f);
    assert_null(f);
    sy_st_destroy(&f); /* twice is safe */
}

/* sy_st_header + each tensor's own bytes (what a scatter-gather writer sends) is exactly the
 * file sy_st_serialize builds; for BF16 the head is the same prefix and data_len the rest. */
static void test_header_matches_serialize(void **state) {
    (void)state;
    sy_tensor_ref t[NT];
    make_tensors(t);
    void *buf = NULL, *head = NULL;
    size_t len = 0, hl = 0;
    uint64_t dl = 0;
    assert_int_equal(sy_st_serialize(t, NT, SY_ST_F32, &buf, &len), SY_OK);
    assert_int_equal(sy_st_header(t, NT, SY_ST_F32, &head, &hl, &dl), SY_OK);
    assert_int_equal(hl + dl, len);
    assert_int_equal(hl % 8, 0);
    uint8_t *joined = malloc(len);
    memcpy(joined, head, hl);
    size_t off = hl;
    for (int i = 0; i < NT; i++) {
        size_t b = (size_t)sy_tensor_numel(&t[i]) * 4;
        memcpy(joined + off, t[i].data, b);
        off += b;
    }
    assert_int_equal(off, len);
    assert_memory_equal(joined, buf, len);
    free(joined);
    free(head);
    free(buf);

    assert_int_equal(sy_st_serialize(t, NT, SY_ST_BF16, &buf, &len), SY_OK);
    assert_int_equal(sy_st_header(t, NT, SY_ST_BF16, &head, &hl, &dl), SY_OK);
    assert_int_equal(hl + dl, len);
    assert_memory_equal(head, buf, hl);
    free(head);
    free(buf);

    /* the same argument checks as serialise; outputs cleared on failure */
    sy_tensor_ref dup[2] = {t[0], t[0]};
    head = (void *)1;
    assert_int_equal(sy_st_header(dup, 2, SY_ST_F32, &head, &hl, &dl), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "embed.weight"));
    assert_null(head);
    assert_int_equal(hl, 0);
    assert_int_equal(sy_st_header(t, NT, (sy_st_dtype)7, &head, &hl, &dl), SY_EINVAL);
    assert_int_equal(sy_st_header(t, NT, SY_ST_F32, NULL, &hl, &dl), SY_EINVAL);
}

static void test_roundtrip_bf16(void **state) {
    (void)state;
    sy_tensor_ref t[NT];
    make_tensors(t);
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(sy_st_serialize(t, NT, SY_ST_BF16, &buf, &len), SY_OK);
    json_t *h = check_layout(buf, len, "BF16", 2);
    uint64_t n;
    memcpy(&n, buf, 8);
    const uint8_t *data = (const uint8_t *)buf + 8 + n;
    sy_st_file_t *f = NULL;
    assert_int_equal(sy_st_parse(buf, len, "mem", &f), SY_OK);
    for (int i = 0; i < NT; i++) {
        assert_string_equal(sy_st_dtype_name(f, i), "BF16");
        int64_t numel = sy_tensor_numel(&t[i]);
        int64_t off = json_integer_value(json_array_get(json_object_get(json_object_get(h, t[i].name), "data_offsets"), 0));
        float *out = calloc((size_t)numel + 1, 4);
        sy_tensor_ref r = t[i];
        r.data = out;
        assert_int_equal(sy_st_load(f, &r), SY_OK);
        for (int64_t k = 0; k < numel; k++) {
            uint16_t raw;
            memcpy(&raw, data + off + 2 * k, 2);
            float x = t[i].data[k];
            if (isnan(x)) {
                assert_true(isnan(out[k]));
                assert_true((raw & 0x7f80u) == 0x7f80u && (raw & 0x7fu));
            } else {
                uint16_t want = ref_bf16(x);
                assert_int_equal(raw, want);
                assert_true(f_bits(out[k]) == (uint32_t)want << 16);
            }
        }
        free(out);
    }
    /* the special tensor's tie cases: 1+2^-8 → 1.0, 1+3·2^-8 → 1+2^-6, 3e38 → finite 2.99e38-ish */
    float sp[7];
    sy_tensor_ref r = t[4];
    r.data = sp;
    assert_int_equal(sy_st_load(f, &r), SY_OK);
    assert_true(sp[3] == 1.0f && sp[4] == 1.0f + 0x1p-6f && isinf(sp[1]) && sp[2] < 0 && isinf(sp[2]));
    assert_true(signbit(sp[5]) && sp[5] == 0.0f && isfinite(sp[6]));
    json_decref(h);
    sy_st_destroy(&f);
    free(buf);
}

#define SY_TESTDIR_PREFIX "/tmp/sy-st-test-"
#include "sy_test.h"

static void test_write_read_file(void **state) {
    (void)state;
    sy_tensor_ref t[NT];
    make_tensors(t);
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", tmpdir);
    assert_int_equal(sy_st_write_file(path, t, NT, SY_ST_F32), SY_OK);
    sy_st_file_t *f = NULL;
    assert_int_equal(sy_st_read_file(path, &f), SY_OK);
    assert_int_equal(sy_st_count(f), NT);
    float out[24];
    sy_tensor_ref r = t[1];
    r.data = out;
    assert_int_equal(sy_st_load(f, &r), SY_OK);
    assert_memory_equal(out, d_b, sizeof out);
    sy_st_destroy(&f);
    snprintf(path, sizeof path, "%s/absent.safetensors", tmpdir);
    assert_int_equal(sy_st_read_file(path, &f), SY_ENOTFOUND);
    assert_non_null(strstr(sy_err_msg(), "absent.safetensors"));
    /* bad input to the writer */
    sy_tensor_ref dup[2] = {t[0], t[0]};
    void *buf = NULL;
    size_t len;
    assert_int_equal(sy_st_serialize(dup, 2, SY_ST_F32, &buf, &len), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "embed.weight"));
    sy_tensor_ref neg = {"neg", 1, {-1}, d_a};
    assert_int_equal(sy_st_serialize(&neg, 1, SY_ST_F32, &buf, &len), SY_EINVAL);
    assert_null(buf);
}

/* ---------------------------------------------------------------- crafted bad files */

/* Writes u64 N | header (padded to N with spaces if N > strlen) | data_len bytes of 0x11. */
static void craft(const char *path, const char *hdr, uint64_t n_field, size_t hdr_bytes, size_t data_len) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    fwrite(&n_field, 8, 1, fp);
    size_t hl = strlen(hdr);
    fwrite(hdr, 1, hl, fp);
    for (size_t i = hl; i < hdr_bytes; i++) fputc(' ', fp);
    for (size_t i = 0; i < data_len; i++) fputc(0x11, fp);
    fclose(fp);
}

typedef struct {
    const char *file;
    const char *hdr;
    int64_t n_override; /* -1: use the padded header length */
    size_t data_len;
    const char *must_contain; /* besides the file name */
} bad_case;

static void test_bad_files(void **state) {
    (void)state;
    const bad_case cases[] = {
        {"toolarge.st", "{}", 100000001, 0, "exceeds"},
        {"pastend.st", "{}", 4096, 8, "past the end"},
        {"short.st", "", -2, 0, "too short"},
        {"badjson.st", "{\"a\": {\"dtype\": \"F32\",", -1, 0, "JSON"},
        {"notobj.st", "[1, 2]", -1, 0, "not a JSON object"},
        {"gap.st",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
         -1, 20, "'b'"},
        {"overlap.st",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
         -1, 12, "overlaps"},
        {"trailing.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", -1, 12, "trailing"},
        {"wrongsize.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", -1, 8, "'a'"},
        {"truncated.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", -1, 8, "past the data"},
        {"dtype.st", "{\"wte\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", -1, 8, "I64"},
        {"nodtype.st", "{\"wte\":{\"shape\":[1],\"data_offsets\":[0,4]}}", -1, 4, "dtype"},
        {"negshape.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", -1, 4, "shape"},
        {"offsets.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", -1, 4, "'a'"},
        {"dup.st",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
         -1, 8, "JSON"},
        {"meta.st", "{\"__metadata__\":{\"format\":1}}", -1, 0, "__metadata__"},
        {"dims.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", -1, 4, "dimensions"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const bad_case *c = &cases[i];
        char path[512];
        snprintf(path, sizeof path, "%s/%s", tmpdir, c->file);
        size_t hb = (strlen(c->hdr) + 7) / 8 * 8;
        uint64_t nf = c->n_override >= 0 ? (uint64_t)c->n_override : hb;
        if (c->n_override == -2) { /* a 5-byte file */
            FILE *fp = fopen(path, "wb");
            fwrite("abcde", 1, 5, fp);
            fclose(fp);
        } else {
            craft(path, c->hdr, nf, c->n_override >= 0 ? strlen(c->hdr) : hb, c->data_len);
        }
        sy_st_file_t *f = NULL;
        sy_status st = sy_st_read_file(path, &f);
        if (st != SY_EFORMAT) fail_msg("%s: status %d (%s), want SY_EFORMAT", c->file, st, sy_err_msg());
        assert_null(f);
        if (!strstr(sy_err_msg(), path) || !strstr(sy_err_msg(), c->must_contain))
            fail_msg("%s: message '%s' lacks the path or '%s'", c->file, sy_err_msg(), c->must_contain);
    }
    /* a good crafted file with F16 and zero-sized tensors in odd order is accepted */
    char path[512];
    snprintf(path, sizeof path, "%s/f16.st", tmpdir);
    const char *hdr = "{\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[10,10]},"
                      "\"h\":{\"dtype\":\"F16\",\"shape\":[5],\"data_offsets\":[0,10]}}";
    size_t hb = (strlen(hdr) + 7) / 8 * 8;
    FILE *fp = fopen(path, "wb");
    uint64_t nf = hb;
    fwrite(&nf, 8, 1, fp);
    fwrite(hdr, 1, strlen(hdr), fp);
    for (size_t i = strlen(hdr); i < hb; i++) fputc(' ', fp);
    uint16_t h[5] = {0x3c00, 0xc000, 0x0001, 0x7c00, 0x3555};
    fwrite(h, 2, 5, fp);
    fclose(fp);
    sy_st_file_t *f = NULL;
    assert_int_equal(sy_st_read_file(path, &f), SY_OK);
    assert_string_equal(sy_st_name(f, 0), "z");
    float out[5];
    sy_tensor_ref r = {"h", 1, {5}, out};
    assert_int_equal(sy_st_load(f, &r), SY_OK);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0x1p-24f && isinf(out[3]));
    assert_true(out[4] == 0.333251953125f);
    sy_st_destroy(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_rounding),
        cmocka_unit_test(test_roundtrip_f32),
        cmocka_unit_test(test_header_matches_serialize),
        cmocka_unit_test(test_roundtrip_bf16),
        cmocka_unit_test_setup_teardown(test_write_read_file, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_bad_files, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
