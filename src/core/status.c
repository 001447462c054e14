/* Status codes, their strings, and the thread-local last-error sentence. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[512];

const char *attn_status_str(attn_status s) {
    switch (s) {
#define ATTN_STATUS_CASE_(name, value, text) \
    case name:                               \
        return text;
        ATTN_STATUS_LIST(ATTN_STATUS_CASE_)
#undef ATTN_STATUS_CASE_
    }
    return "unknown status";
}

const char *attn_last_error(void) { return last_error; }

void attn_clear_error(void) { last_error[0] = '\0'; }

attn_status attn_err(attn_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return s;
}

const char *attn_version(void) { return "0.1.0"; }
int attn_version_number(void) { return ATTN_VERSION_NUMBER; }
