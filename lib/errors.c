/* Status strings, versions and the per-handle error message. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define FKV_STR2(x) #x
#define FKV_STR(x) FKV_STR2(x)

/* Calls that have no handle (fkv_create, a NULL cache) report here; one
 * buffer per thread, so concurrent creators do not see each other's. */
static _Thread_local char thread_error[FKV_ERROR_LEN];

int fkv_version_number(void)
{
    return FKV_VERSION_NUMBER;
}

const char *fkv_version_string(void)
{
    return FKV_STR(FKV_VERSION_MAJOR) "." FKV_STR(FKV_VERSION_MINOR) "."
        FKV_STR(FKV_VERSION_PATCH);
}

const char *fkv_status_string(fkv_status status)
{
    switch (status) {
    case FKV_OK: return "ok";
    case FKV_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FKV_ERR_OUT_OF_RANGE: return "index out of range";
    case FKV_ERR_UNKNOWN_SEQUENCE: return "unknown or closed sequence";
    case FKV_ERR_CAPACITY: return "capacity exceeded";
    case FKV_ERR_INVALID_STATE: return "call out of order";
    case FKV_ERR_UNSUPPORTED: return "not supported";
    case FKV_ERR_VERSION_MISMATCH: return "struct size not understood";
    case FKV_ERR_OUT_OF_MEMORY: return "out of memory";
    case FKV_ERR_DEVICE: return "device error";
    case FKV_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

fkv_status fkvi_fail(fkv_cache *c, fkv_status st, const char *fmt, ...)
{
    char *buf = c ? c->error : thread_error;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, FKV_ERROR_LEN, fmt, ap);
    va_end(ap);
    return st;
}

void fkvi_clear_error(fkv_cache *c)
{
    (c ? c->error : thread_error)[0] = '\0';
}

size_t fkv_last_error(const fkv_cache *cache, char *buf, size_t len)
{
    const char *msg = cache ? cache->error : thread_error;
    size_t n = strlen(msg);
    if (buf && len > 0) {
        size_t k = n < len - 1 ? n : len - 1;
        memcpy(buf, msg, k);
        buf[k] = '\0';
    }
    return n;
}
