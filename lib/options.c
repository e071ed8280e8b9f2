/* Options: defaults, the size-first ABI check and validation. */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "internal.h"

/* The size of the first published fkv_options is FKVI_OPTIONS_SIZE_V0
 * (internal.h). A caller compiled against a later header passes a larger
 * struct; fields we do not know must then be zero (their "default"
 * meaning), as with Linux's copy_struct_from_user. A caller compiled
 * against an earlier header gets the defaults of the fields it lacks. */
#define FKV_OPTIONS_SIZE_V0 FKVI_OPTIONS_SIZE_V0

static void set_defaults(fkv_options *o)
{
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->backend = FKV_BACKEND_AUTO;
    o->device = 0;
    o->dtype = FKV_DTYPE_UNSET; /* the caller must say (issue 12) */
    o->softmax_scale = 0.0f;
    o->page_tokens = 32;
    o->budget_tokens = 2048;
    o->sink_tokens = 512;
    o->window_tokens = 512;
    o->correction_threshold = 0.9f;
    o->policy = FKV_POLICY_FREEKV;
    o->group_score = FKV_GROUP_MEAN_SOFTMAX;
    o->max_sequences = 8;
    o->max_tokens_per_sequence = 131072;
    o->host_pool_bytes = 0;
    o->correction_criterion = FKV_CRITERION_COSINE;
    o->correction_min_mass = 0.002f;
    o->correction_max_pages = 32;
}

fkv_status fkv_options_init(fkv_options *opts, size_t opts_size)
{
    if (!opts)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_options_init: opts is NULL");
    if (opts_size < FKV_OPTIONS_SIZE_V0)
        return fkvi_fail(NULL, FKV_ERR_VERSION_MISMATCH,
                         "fkv_options_init: opts_size %zu is smaller than "
                         "the first fkv_options (%zu bytes)",
                         opts_size, (size_t)FKV_OPTIONS_SIZE_V0);
    fkv_options d;
    set_defaults(&d);
    /* A newer caller's fields beyond ours keep their zero default; an older
     * caller's struct ends before ours. */
    memset(opts, 0, opts_size);
    memcpy(opts, &d, opts_size < sizeof d ? opts_size : sizeof d);
    opts->struct_size = opts_size;
    fkvi_clear_error(NULL);
    return FKV_OK;
}

static bool is_multiple(int32_t v, int32_t of)
{
    return v >= 0 && v % of == 0;
}

fkv_status fkvi_options_load(const fkv_options *user, fkv_options *o)
{
    if (!user)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT, "opts is NULL");
    fkv_status st;
    size_t size = user->struct_size;
    if (size < FKV_OPTIONS_SIZE_V0)
        return fkvi_fail(NULL, FKV_ERR_VERSION_MISMATCH,
                         "opts->struct_size is %zu, smaller than the first "
                         "fkv_options (%zu bytes); call fkv_options_init",
                         size, (size_t)FKV_OPTIONS_SIZE_V0);
    if (size > sizeof *o) {
        const unsigned char *extra = (const unsigned char *)user + sizeof *o;
        for (size_t i = 0; i < size - sizeof *o; i++)
            if (extra[i])
                return fkvi_fail(NULL, FKV_ERR_VERSION_MISMATCH,
                                 "opts->struct_size is %zu and sets fields "
                                 "this library (%s, %zu bytes) does not know",
                                 size, fkv_version_string(), sizeof *o);
    }
    /* An older caller's struct ends early: the rest keeps the defaults. */
    set_defaults(o);
    memcpy(o, user, size < sizeof *o ? size : sizeof *o);
    o->struct_size = sizeof *o;

#define REQUIRE(cond, st, ...) \
    do { if (!(cond)) return fkvi_fail(NULL, st, __VA_ARGS__); } while (0)

    REQUIRE(o->backend >= FKV_BACKEND_AUTO && o->backend <= FKV_BACKEND_CUDA,
            FKV_ERR_INVALID_ARGUMENT, "unknown backend %d", (int)o->backend);
    REQUIRE(o->device >= 0, FKV_ERR_INVALID_ARGUMENT,
            "device %d is negative", o->device);
    REQUIRE(o->num_layers >= 1, FKV_ERR_INVALID_ARGUMENT,
            "num_layers is %d; it must be >= 1", o->num_layers);
    REQUIRE(o->num_kv_heads >= 1, FKV_ERR_INVALID_ARGUMENT,
            "num_kv_heads is %d; it must be >= 1", o->num_kv_heads);
    REQUIRE(o->num_q_heads >= 1 && o->num_q_heads % o->num_kv_heads == 0,
            FKV_ERR_INVALID_ARGUMENT,
            "num_q_heads (%d) must be a positive multiple of num_kv_heads "
            "(%d)", o->num_q_heads, o->num_kv_heads);
    REQUIRE(o->head_dim == 64 || o->head_dim == 128 || o->head_dim == 256,
            FKV_ERR_UNSUPPORTED,
            "head_dim %d is not supported (64, 128 or 256)", o->head_dim);
    REQUIRE(o->dtype != FKV_DTYPE_UNSET, FKV_ERR_INVALID_ARGUMENT,
            "opts.dtype is not set; say which dtype the tensors hold "
            "(FKV_DTYPE_F32, FKV_DTYPE_F16 or FKV_DTYPE_BF16)");
    REQUIRE(o->dtype == FKV_DTYPE_F32 || o->dtype == FKV_DTYPE_F16 ||
                o->dtype == FKV_DTYPE_BF16,
            FKV_ERR_UNSUPPORTED, "dtype %d is not supported (f32, f16, bf16)",
            (int)o->dtype);
    REQUIRE(isfinite(o->softmax_scale) && o->softmax_scale >= 0.0f,
            FKV_ERR_INVALID_ARGUMENT,
            "softmax_scale must be finite and >= 0 (0: 1/sqrt(head_dim))");
    REQUIRE(o->page_tokens >= 1 && o->page_tokens <= 1024,
            FKV_ERR_INVALID_ARGUMENT,
            "page_tokens is %d; it must be in [1, 1024]", o->page_tokens);
    REQUIRE(is_multiple(o->sink_tokens, o->page_tokens) &&
                is_multiple(o->window_tokens, o->page_tokens) &&
                is_multiple(o->budget_tokens, o->page_tokens),
            FKV_ERR_INVALID_ARGUMENT,
            "sink_tokens (%d), window_tokens (%d) and budget_tokens (%d) must "
            "be non-negative multiples of page_tokens (%d)",
            o->sink_tokens, o->window_tokens, o->budget_tokens,
            o->page_tokens);
    REQUIRE((int64_t)o->sink_tokens + o->window_tokens <= o->budget_tokens,
            FKV_ERR_INVALID_ARGUMENT,
            "sink_tokens + window_tokens (%lld) exceed budget_tokens (%d)",
            (long long)o->sink_tokens + o->window_tokens, o->budget_tokens);
    REQUIRE(isfinite(o->correction_threshold), FKV_ERR_INVALID_ARGUMENT,
            "correction_threshold must be finite");
    REQUIRE(o->policy >= FKV_POLICY_FREEKV &&
                o->policy <= FKV_POLICY_EXTERNAL,
            FKV_ERR_INVALID_ARGUMENT, "unknown policy %d", (int)o->policy);
    REQUIRE(o->group_score == FKV_GROUP_MEAN_SOFTMAX ||
                o->group_score == FKV_GROUP_MEAN_SCORE,
            FKV_ERR_INVALID_ARGUMENT, "unknown group_score %d",
            (int)o->group_score);
    REQUIRE(o->max_sequences >= 1 && o->max_sequences <= (1 << 20),
            FKV_ERR_INVALID_ARGUMENT,
            "max_sequences is %d; it must be in [1, 2^20]", o->max_sequences);
    REQUIRE(o->max_tokens_per_sequence >= 1 &&
                o->max_tokens_per_sequence / o->page_tokens < INT32_MAX / 2,
            FKV_ERR_INVALID_ARGUMENT,
            "max_tokens_per_sequence %lld is out of range",
            (long long)o->max_tokens_per_sequence);
    REQUIRE((o->host_alloc == NULL) == (o->host_free == NULL),
            FKV_ERR_INVALID_ARGUMENT,
            "opts.host_alloc and opts.host_free must be set together (both "
            "NULL: the C library's allocator)");
    /* dense_layers is read (num_layers flags) and copied by fkv_create;
     * any flag values are allowed, every layer dense included. */
    st = fkvi_correction_validate(o);
    if (st != FKV_OK)
        return st;
#undef REQUIRE

    if (o->softmax_scale == 0.0f)
        o->softmax_scale = 1.0f / sqrtf((float)o->head_dim);
    return FKV_OK;
}

void fkvi_geometry_init(const fkv_options *o, fkvi_geometry *g)
{
    memset(g, 0, sizeof *g);
    g->layers = o->num_layers;
    g->q_heads = o->num_q_heads;
    g->kv_heads = o->num_kv_heads;
    g->group = o->num_q_heads / o->num_kv_heads;
    g->head_dim = o->head_dim;
    g->page = o->page_tokens;
    g->sink_pages = o->sink_tokens / o->page_tokens;
    g->window_pages = o->window_tokens / o->page_tokens;
    g->select_pages =
        (o->budget_tokens - o->sink_tokens - o->window_tokens) / o->page_tokens;
    g->max_pages =
        (int32_t)((o->max_tokens_per_sequence + o->page_tokens - 1) /
                  o->page_tokens);
    /* No sequence can have more candidates than max_pages - S - W, so
     * recall slots beyond that would never be used (issue 12: a budget far
     * above max_tokens_per_sequence must not size the slots). */
    int64_t most = (int64_t)g->max_pages - g->sink_pages - g->window_pages;
    if (most < 0)
        most = 0;
    if (g->select_pages > most)
        g->select_pages = (int32_t)most;
    g->ring_pages = g->window_pages + 1;
    g->max_tokens = o->max_tokens_per_sequence;
    g->elem_bytes = fkvi_dtype_size(o->dtype);
    g->unit_elems = 2 * (size_t)o->page_tokens * (size_t)o->head_dim;
    g->unit_bytes = g->unit_elems * g->elem_bytes;
    g->block_bytes = g->unit_bytes * (size_t)o->num_kv_heads;
    g->scale = o->softmax_scale;
}

void fkvi_page_ranges(const fkvi_geometry *g, int64_t n, fkvi_pages *r)
{
    r->sealed = (int32_t)(n / g->page);
    r->partial = (int32_t)(n % g->page);
    r->sink_end = r->sealed < g->sink_pages ? r->sealed : g->sink_pages;
    int32_t window_first = r->sealed - g->window_pages;
    if (window_first < g->sink_pages)
        window_first = r->sink_end;
    r->window_first = window_first;
    r->cand_first = g->sink_pages;
    r->cand_count = window_first - g->sink_pages;
    if (r->cand_count < 0)
        r->cand_count = 0;
}
