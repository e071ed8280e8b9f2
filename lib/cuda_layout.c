/* The CUDA backend's device memory layout: the geometry and array offsets
 * of one (sequence, layer) region (kernels/kernels.h's fkv_dev_geometry),
 * computed from the resolved options and the derived geometry alone, so
 * that code outside the backend (bench/recall) lays out a region exactly as
 * the backend does. */
#include <string.h>

#include "internal.h"

uint64_t fkvi_cuda_align_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) / a * a;
}

uint64_t fkvi_cuda_place(uint64_t *off, uint64_t n, uint64_t size)
{
    uint64_t at = fkvi_cuda_align_up(*off, size >= 16 ? 16 : size);
    *off = at + n * size;
    return at;
}

void fkvi_cuda_layout(const fkv_options *o, const fkvi_geometry *g,
                      fkv_dev_geometry *d)
{
    const fkv_policy policy = o->policy;
    memset(d, 0, sizeof *d);
    d->layers = g->layers;
    d->q_heads = g->q_heads;
    d->kv_heads = g->kv_heads;
    d->group = g->group;
    d->head_dim = g->head_dim;
    d->page = g->page;
    d->sink_pages = g->sink_pages;
    d->window_pages = g->window_pages;
    d->select_pages = g->select_pages;
    d->ring_pages = g->ring_pages;
    d->max_pages = g->max_pages;
    d->dtype = o->dtype;
    d->policy = policy;
    d->group_score = o->group_score;
    d->store = policy == FKV_POLICY_RESIDENT || policy == FKV_POLICY_DENSE;
    d->max_tokens = (int32_t)g->max_tokens;
    d->scale = g->scale;
    d->threshold = o->correction_threshold;
    /* Only FREEKV corrects: other policies see COSINE (no BOUNDED path). */
    d->criterion = policy == FKV_POLICY_FREEKV ? o->correction_criterion
                                               : FKV_CRITERION_COSINE;
    d->min_mass = o->correction_min_mass;
    d->max_fetch = o->correction_max_pages;
    d->spec_min_mass = d->criterion == FKV_CRITERION_BOUNDED
                           ? o->speculative_min_mass
                           : 0.0f;
    d->unit_bytes = g->unit_bytes;

    const uint64_t H = (uint64_t)g->kv_heads, K = (uint64_t)g->select_pages;
    const uint64_t QD = (uint64_t)g->q_heads * g->head_dim;
    uint64_t off = 0;
    /* The arrays that start at -1 come first, in one range. */
    d->neg_begin = off;
    d->off_slot_page = fkvi_cuda_place(&off, H * K, 4);
    d->off_active_count = fkvi_cuda_place(&off, H, 4);
    d->off_fix_count = fkvi_cuda_place(&off, H, 4);
    d->neg_bytes = off - d->neg_begin;
    d->off_active_pages = fkvi_cuda_place(&off, H * K, 4);
    d->off_active_slot = fkvi_cuda_place(&off, H * K, 4);
    d->off_pending_pages = fkvi_cuda_place(&off, H * K, 4);
    d->off_pending_count = fkvi_cuda_place(&off, H, 4);
    d->off_pending_valid = fkvi_cuda_place(&off, H, 4);
    d->off_fix_pages = fkvi_cuda_place(&off, H * K, 4);
    d->off_used_pages = fkvi_cuda_place(&off, H * K, 4);
    d->off_used_count = fkvi_cuda_place(&off, H, 4);
    d->off_snap_len = fkvi_cuda_place(&off, 1, 4);
    d->off_pending_attend = fkvi_cuda_place(&off, 1, 4);
    d->off_active_q = fkvi_cuda_place(&off, QD, 4);
    d->off_pending_q = fkvi_cuda_place(&off, QD, 4);
    off = fkvi_cuda_align_up(off, 256);
    d->meta_bytes = off;

    const uint64_t unit = g->unit_bytes;
    if (d->store) {
        d->off_store = fkvi_cuda_place(&off, H * (uint64_t)g->max_pages, unit);
    } else {
        d->off_sink = fkvi_cuda_place(&off, H * (uint64_t)g->sink_pages, unit);
        d->off_ring = fkvi_cuda_place(&off, H * (uint64_t)g->ring_pages, unit);
        d->off_slots = fkvi_cuda_place(&off, H * K, unit);
    }
    if (policy != FKV_POLICY_DENSE) {
        uint64_t n = H * (uint64_t)g->max_pages * g->head_dim;
        d->off_smax = fkvi_cuda_place(&off, n, g->elem_bytes);
        d->off_smin = fkvi_cuda_place(&off, n, g->elem_bytes);
    }
    d->layer_bytes = fkvi_cuda_align_up(off, 256);
}
