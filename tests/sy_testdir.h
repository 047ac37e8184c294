/* A fresh temporary folder for each cmocka test: setup_dir / teardown_dir as the test's setup
 * and teardown; `tmpdir` holds its path meanwhile. Define SY_TESTDIR_PREFIX (e.g.
 * "/tmp/sy-ckpt-test-") before including. Include after <cmocka.h>; for test files only. */
#ifndef SY_TESTDIR_H
#define SY_TESTDIR_H

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

static char tmpdir[256];

static int sy_testdir_rm(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}
static int setup_dir(void **state) {
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "%sXXXXXX", SY_TESTDIR_PREFIX);
    return mkdtemp(tmpdir) ? 0 : -1;
}
static int teardown_dir(void **state) {
    (void)state;
    return nftw(tmpdir, sy_testdir_rm, 16, FTW_DEPTH | FTW_PHYS);
}

#endif
