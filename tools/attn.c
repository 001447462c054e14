/* attn: the libattn command-line tool (info, bench, cab). Uses only attn.h. */
#include "cli.h"

#include <stdio.h>
#include <string.h>

static const char usage[] =
    "usage: attn <command> [options]\n"
    "\n"
    "commands:\n"
    "  info       version, CPU features, the ISA, backend and threads a default\n"
    "             context chooses, and what is supported here\n"
    "  bench      the quick benchmark suite, or one op with --op\n"
    "             (attn bench --help for its options)\n"
    "  cab        every mechanism x 4 patterns (causal/non-causal, self/cross)\n"
    "             x lengths: time, peak RSS, error, efficiency length\n"
    "  version    print the library version\n"
    "  help       this text\n"
    "\n"
    "environment: ATTN_BACKEND=cpu|ref, ATTN_ISA=scalar|avx2|avx512|neon,\n"
    "             ATTN_NUM_THREADS=N\n";

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs(usage, stderr);
        return CLI_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "info")) return cmd_info(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 2, argv + 2);
    if (!strcmp(cmd, "cab")) return cmd_cab(argc - 2, argv + 2);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("%s\n", attn_version());
        return CLI_EXIT_OK;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        fputs(usage, stdout);
        return CLI_EXIT_OK;
    }
    fprintf(stderr, "attn: unknown command '%s'\n\n%s", cmd, usage);
    return CLI_EXIT_USAGE;
}
