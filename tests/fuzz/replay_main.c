/* Regression driver for the fuzz harnesses without libFuzzer: runs LLVMFuzzerTestOneInput over
 * every regular file of the directories given as arguments (sorted by name). A crash or abort
 * ends the process with a signal, which is the failure this test reports; otherwise it exits 0.
 * Exit 2 when an argument cannot be read (a wrong path would otherwise pass silently). */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? 2 * cap : 4096;
            uint8_t *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return -1;
            }
            buf = nb;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (!err) {
        /* an exact-size copy, as libFuzzer hands it over */
        uint8_t *exact = malloc(len ? len : 1);
        if (!exact) err = 1;
        else {
            if (len) memcpy(exact, buf, len);
            LLVMFuzzerTestOneInput(exact, len);
            free(exact);
        }
    }
    free(buf);
    return err ? -1 : 0;
}

static int by_name(const struct dirent **a, const struct dirent **b) { return strcmp((*a)->d_name, (*b)->d_name); }

int main(int argc, char **argv) {
    int n_files = 0;
    for (int i = 1; i < argc; i++) {
        struct dirent **ents = NULL;
        int n = scandir(argv[i], &ents, NULL, by_name);
        if (n < 0) {
            fprintf(stderr, "replay: cannot read folder %s\n", argv[i]);
            return 2;
        }
        int bad = 0;
        for (int k = 0; k < n; k++) {
            char path[4096];
            struct stat sb;
            snprintf(path, sizeof path, "%s/%s", argv[i], ents[k]->d_name);
            if (!bad && stat(path, &sb) == 0 && S_ISREG(sb.st_mode)) {
                if (replay_file(path) != 0) {
                    fprintf(stderr, "replay: cannot read %s\n", path);
                    bad = 1;
                }
                n_files++;
            }
            free(ents[k]);
        }
        free(ents);
        if (bad) return 2;
    }
    printf("replay: %d inputs, no crash\n", n_files);
    return 0;
}
