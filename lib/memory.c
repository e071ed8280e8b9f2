/* Host memory: every host allocation of the library goes through the
 * embedder's allocator (fkv_options.host_alloc / host_free) or, when both
 * are NULL, the C library. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* fkvi_alloc blocks carry their size in front, so that host_free can be
 * told it without every caller keeping it; the header keeps malloc's
 * alignment. */
#define FKVI_HEADER 16

static void *libc_alloc(void *user, size_t size, size_t alignment)
{
    (void)user;
    if (alignment <= FKVI_HEADER)
        return malloc(size ? size : 1);
    /* aligned_alloc wants a multiple of the alignment. */
    size_t rounded = (size + alignment - 1) / alignment * alignment;
    return aligned_alloc(alignment, rounded ? rounded : alignment);
}

static void libc_free(void *user, void *ptr, size_t size)
{
    (void)user;
    (void)size;
    free(ptr);
}

void fkvi_mem_init(fkvi_mem *m, const fkv_options *o)
{
    if (o && o->host_alloc && o->host_free) {
        m->alloc = o->host_alloc;
        m->free = o->host_free;
        m->user = o->alloc_user;
    } else {
        m->alloc = libc_alloc;
        m->free = libc_free;
        m->user = NULL;
    }
}

void *fkvi_alloc_raw(const fkvi_mem *m, size_t bytes, size_t alignment)
{
    return m->alloc(m->user, bytes, alignment);
}

void fkvi_free_raw(const fkvi_mem *m, void *p, size_t bytes)
{
    if (p)
        m->free(m->user, p, bytes);
}

void *fkvi_alloc(const fkvi_mem *m, size_t n, size_t size)
{
    if (size && n > (SIZE_MAX - FKVI_HEADER) / size)
        return NULL;
    size_t bytes = n * size + FKVI_HEADER;
    unsigned char *p;
    if (m->alloc == libc_alloc) {
        /* calloc: the kernel's zero pages, touched only where used (a large
         * max_tokens_per_sequence sizes some scratch). */
        p = calloc(1, bytes);
    } else {
        p = m->alloc(m->user, bytes, FKVI_HEADER);
        if (p)
            memset(p + FKVI_HEADER, 0, bytes - FKVI_HEADER);
    }
    if (!p)
        return NULL;
    memcpy(p, &bytes, sizeof bytes);
    return p + FKVI_HEADER;
}

void fkvi_free(const fkvi_mem *m, void *p)
{
    if (!p)
        return;
    unsigned char *base = (unsigned char *)p - FKVI_HEADER;
    size_t bytes;
    memcpy(&bytes, base, sizeof bytes);
    m->free(m->user, base, bytes);
}

/* Fault injection of device allocations, for the tests only: they link
 * libfreekv.a and reach these hidden symbols; the shared library exports
 * nothing of it. */
int64_t fkvi_device_fault_countdown;
uint64_t fkvi_device_alloc_calls;

bool fkvi_device_fault(void)
{
    fkvi_device_alloc_calls++;
    return fkvi_device_fault_countdown > 0 && --fkvi_device_fault_countdown == 0;
}
