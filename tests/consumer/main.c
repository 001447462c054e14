/* A consumer of an installed libattn: checks the header and the library agree. */
#include <attn.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    const char *v = attn_version();
    if (!v || attn_version_number() != ATTN_VERSION_NUMBER) {
        fprintf(stderr, "header %d and library %d disagree\n", ATTN_VERSION_NUMBER,
                attn_version_number());
        return 1;
    }
    printf("libattn %s\n", v);
    return 0;
}
