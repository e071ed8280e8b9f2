/* The BOUNDED correction criterion of FKV_POLICY_FREEKV (docs/design.md
 * section 4): at fkv_attend every KV head is scored with the current query;
 * the missing pages of the new top-K are fetched now, most mass first, only
 * until the attended set holds (1 - m) of the top-K's estimated mass and at
 * most M per head; the rest come with the next speculative recall, which
 * moves the whole top-K or, with a speculative mass, the walk continued to
 * its own target. Scores are accumulated in double, in the same order as
 * selection.c, so that the top-K is the one fkvi_select_pages gives. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct ranked_page {
    double score;
    int32_t page;
} ranked_page;

fkv_status fkvi_correction_validate(const fkv_options *o)
{
    if (o->correction_criterion != FKV_CRITERION_COSINE &&
        o->correction_criterion != FKV_CRITERION_BOUNDED)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "unknown correction_criterion %d",
                         (int)o->correction_criterion);
    if (!(o->correction_min_mass >= 0.0f && o->correction_min_mass <= 1.0f))
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "correction_min_mass is %g; it must be in [0, 1]",
                         (double)o->correction_min_mass);
    if (!(o->speculative_min_mass >= 0.0f && o->speculative_min_mass <= 1.0f))
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "speculative_min_mass is %g; it must be in [0, 1]",
                         (double)o->speculative_min_mass);
    if (o->correction_max_pages < 0)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "correction_max_pages is %d; it must be >= 0",
                         (int)o->correction_max_pages);
    return FKV_OK;
}

fkv_status fkvi_correction_scratch_init(fkvi_correction_scratch *s,
                                        const fkvi_geometry *g)
{
    size_t pages = (size_t)g->max_pages;
    s->scores = malloc((size_t)g->group * pages * sizeof *s->scores);
    s->mass = malloc(pages * sizeof *s->mass);
    s->rank = malloc(pages * sizeof *s->rank);
    s->order = malloc(2 * pages * sizeof(ranked_page));
    if (!s->scores || !s->mass || !s->rank || !s->order) {
        fkvi_correction_scratch_free(s);
        return FKV_ERR_OUT_OF_MEMORY;
    }
    return FKV_OK;
}

void fkvi_correction_scratch_free(fkvi_correction_scratch *s)
{
    free(s->scores);
    free(s->mass);
    free(s->rank);
    free(s->order);
    memset(s, 0, sizeof *s);
}

/* Higher score first; ties to the lower page. */
static int by_score_desc(const void *a, const void *b)
{
    const ranked_page *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    return (x->page > y->page) - (x->page < y->page);
}

/* Lower score first; ties to the lower page. */
static int by_score_asc(const void *a, const void *b)
{
    const ranked_page *x = a, *y = b;
    if (x->score != y->score)
        return x->score < y->score ? -1 : 1;
    return (x->page > y->page) - (x->page < y->page);
}

static int by_page(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Whether ascending list[n] holds page. */
static bool holds(const int32_t *list, int32_t n, int32_t page)
{
    int32_t lo = 0, hi = n;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (list[mid] < page)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && list[lo] == page;
}

/* mass[i] = mean over the group of softmax(scale * s[h]) of candidate i;
 * rank[i] = the group_score aggregation the top-K uses. */
static void score_candidates(const fkvi_geometry *g, fkv_group_score mode,
                             const float *smax, const float *smin,
                             const float *q, int32_t first, int32_t count,
                             fkvi_correction_scratch *s)
{
    const int32_t dim = g->head_dim;
    for (int32_t h = 0; h < g->group; h++) {
        const float *qh = q + (size_t)h * dim;
        double *sh = s->scores + (size_t)h * count;
        double top = fkvi_quest_scores(dim, smax, smin, qh, first, count, sh);
        if (mode == FKV_GROUP_MEAN_SCORE)
            for (int32_t i = 0; i < count; i++)
                s->rank[i] = (h == 0 ? 0.0 : s->rank[i]) + sh[i];
        fkvi_softmax(sh, count, g->scale, top);
    }
    for (int32_t i = 0; i < count; i++) {
        double a = 0.0;
        for (int32_t h = 0; h < g->group; h++)
            a += s->scores[(size_t)h * count + i];
        s->mass[i] = a / g->group;
        if (mode == FKV_GROUP_MEAN_SCORE)
            s->rank[i] /= g->group;
        else
            s->rank[i] = s->mass[i];
    }
}

/* The set the walk reaches after `steps` of the nmiss missing pages
 * (most mass first): active less the first steps - free_slots pages of
 * out (least mass first), plus those missing pages; ascending into set[].
 * Returns its size. */
static int32_t walked_set(const ranked_page *miss, const ranked_page *out,
                          int32_t steps, int32_t free_slots,
                          const int32_t *active, int32_t nactive,
                          int32_t *set)
{
    int32_t replace = steps - free_slots;
    if (replace < 0)
        replace = 0;
    int32_t n = 0;
    for (int32_t i = 0; i < steps; i++)
        set[n++] = miss[i].page;
    for (int32_t j = 0; j < nactive; j++) {
        bool dropped = false;
        for (int32_t i = 0; i < replace && !dropped; i++)
            dropped = out[i].page == active[j];
        if (!dropped)
            set[n++] = active[j];
    }
    qsort(set, (size_t)n, sizeof *set, by_page);
    return n;
}

int32_t fkvi_correction_bounded(const fkvi_geometry *g, const fkv_options *o,
                                const float *smax, const float *smin,
                                const float *q, int32_t first, int32_t count,
                                const int32_t *active, int32_t nactive,
                                fkvi_correction_scratch *s, int32_t *pending,
                                int32_t *npending, int32_t *attended,
                                int32_t *fetched)
{
    const int32_t K = g->select_pages;
    ranked_page *order = s->order;
    int32_t *top = pending; /* T until the speculative set replaces it */
    score_candidates(g, o->group_score, smax, smin, q, first, count, s);

    /* The top-K with the current query. */
    for (int32_t i = 0; i < count; i++) {
        order[i].score = s->rank[i];
        order[i].page = first + i;
    }
    qsort(order, (size_t)count, sizeof *order, by_score_desc);
    for (int32_t i = 0; i < K; i++)
        top[i] = order[i].page;
    qsort(top, (size_t)K, sizeof *top, by_page);

    /* Cumulative rule: fetch the missing pages of T, most mass first, until
     * the attended set's estimated mass reaches (1 - m) of T's, at most M.
     * A fetched page takes a free slot first, else replaces the resident
     * page outside T with the least mass (there are at least as many of
     * those as missing pages, since |T| = K). */
    double mass_top = 0.0, mass_att = 0.0;
    for (int32_t i = 0; i < K; i++)
        mass_top += s->mass[top[i] - first];
    for (int32_t j = 0; j < nactive; j++)
        mass_att += s->mass[active[j] - first];
    const double target = (1.0 - (double)o->correction_min_mass) * mass_top;

    int32_t nmiss = 0;
    for (int32_t i = 0; i < K; i++)
        if (!holds(active, nactive, top[i])) {
            order[nmiss].score = s->mass[top[i] - first];
            order[nmiss].page = top[i];
            nmiss++;
        }
    qsort(order, (size_t)nmiss, sizeof *order, by_score_desc);
    /* The resident pages outside T, least mass first, in the second half
     * of the scratch. */
    ranked_page *out = order + g->max_pages;
    int32_t nout = 0;
    for (int32_t j = 0; j < nactive; j++)
        if (!holds(top, K, active[j])) {
            out[nout].score = s->mass[active[j] - first];
            out[nout].page = active[j];
            nout++;
        }
    qsort(out, (size_t)nout, sizeof *out, by_score_asc);

    const int32_t M = o->correction_max_pages;
    const int32_t free_slots = K - nactive;
    int32_t nfetch = 0;
    while (nfetch < nmiss && nfetch < M && mass_att < target) {
        if (nfetch >= free_slots)
            mass_att -= out[nfetch - free_slots].score;
        mass_att += order[nfetch].score;
        nfetch++;
    }
    int32_t n = walked_set(order, out, nfetch, free_slots, active, nactive,
                           attended);
    *fetched = nfetch;

    /* The speculative set: the same walk on from the attended set, without
     * the cap, to (1 - s) of T's mass. s = 0 keeps T itself. */
    *npending = K;
    if (o->speculative_min_mass > 0.0f) {
        const double spec_target =
            (1.0 - (double)o->speculative_min_mass) * mass_top;
        int32_t nspec = nfetch;
        while (nspec < nmiss && mass_att < spec_target) {
            if (nspec >= free_slots)
                mass_att -= out[nspec - free_slots].score;
            mass_att += order[nspec].score;
            nspec++;
        }
        *npending = walked_set(order, out, nspec, free_slots, active,
                               nactive, pending);
    }
    return n;
}
