/* Replays captured kernel calls on the target CPU (fqt_compiler.cross.verify).
 *
 * Reads script.txt: the number of buffers and their sizes, then one line per call: the
 * kernel's index, the argument count and each argument ('b' buffer index and byte offset,
 * 'n' null pointer, 'i' signed and 'u' unsigned integer, 'f' float as a C99 hex literal).
 * Loads buf_<i>.bin, calls the kernels in order through call_kernel() (generated per run into
 * harness_cases.h from each kernel's ABI) and writes out_<call>_<buffer>.bin for every buffer
 * a call was given, after the call. Exit status 2: bad input files, 3: unknown kernel index.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "fqt_kernels.h"

/* int call_kernel(int sym, const uint64_t *a, const float *f): 0, or 3 for an unknown sym. */
#include "harness_cases.h"

static char *buf[1 << 16];
static long size[1 << 16];

static void dump(const char *path, const char *p, long n) {
    FILE *o = fopen(path, "wb");
    if (!o || fwrite(p, 1, n, o) != (size_t)n) { perror(path); exit(2); }
    fclose(o);
}

int main(void) {
    FILE *s = fopen("script.txt", "r");
    int nbuf;
    if (!s || fscanf(s, "%d", &nbuf) != 1) return 2;
    for (int i = 0; i < nbuf; i++) {
        char path[64];
        if (fscanf(s, "%ld", &size[i]) != 1) return 2;
        buf[i] = aligned_alloc(64, (size[i] + 64) / 64 * 64);
        snprintf(path, sizeof path, "buf_%d.bin", i);
        FILE *in = fopen(path, "rb");
        if (!in || fread(buf[i], 1, size[i], in) != (size_t)size[i]) { perror(path); return 2; }
        fclose(in);
    }
    int sym, nargs, call = 0;
    while (fscanf(s, "%d %d", &sym, &nargs) == 2) {
        uint64_t a[32] = {0};
        float f[32] = {0};
        int bi[32];
        for (int j = 0; j < nargs; j++) {
            char t, tok[64];
            bi[j] = -1;
            if (fscanf(s, " %c", &t) != 1) return 2;
            if (t == 'b') {
                long off;
                if (fscanf(s, "%d %ld", &bi[j], &off) != 2) return 2;
                a[j] = (uint64_t)(uintptr_t)(buf[bi[j]] + off);
            } else if (t == 'i') {
                long long v;
                if (fscanf(s, "%lld", &v) != 1) return 2;
                a[j] = (uint64_t)v;
            } else if (t == 'u') {
                unsigned long long v;
                if (fscanf(s, "%llu", &v) != 1) return 2;
                a[j] = v;
            } else if (t == 'f') {
                if (fscanf(s, "%63s", tok) != 1) return 2;
                f[j] = strtof(tok, NULL);
            }
        }
        if (call_kernel(sym, a, f)) return 3;
        for (int j = 0; j < nargs; j++) {
            if (bi[j] < 0) continue;
            char path[64];
            snprintf(path, sizeof path, "out_%d_%d.bin", call, bi[j]);
            dump(path, buf[bi[j]], size[bi[j]]);
        }
        call++;
    }
    printf("%d calls\n", call);
    return 0;
}
