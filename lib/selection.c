/* Host page selection: Quest scores, group aggregation, top-K
 * (docs/design.md section 3). Scores are accumulated in double so that the
 * CPU backend is as close to the exact ranking as a reference can be. */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

typedef struct ranked_page {
    double score;
    int32_t page;
} ranked_page;

fkv_status fkvi_select_scratch_init(fkvi_select_scratch *s,
                                    const fkvi_geometry *g,
                                    const fkvi_mem *m)
{
    size_t pages = (size_t)g->max_pages;
    s->mem = m;
    s->scores = fkvi_alloc(m, (size_t)g->group * pages, sizeof *s->scores);
    s->agg = fkvi_alloc(m, pages, sizeof *s->agg);
    s->order = fkvi_alloc(m, pages, sizeof(ranked_page));
    if (!s->scores || !s->agg || !s->order) {
        fkvi_select_scratch_free(s);
        return FKV_ERR_OUT_OF_MEMORY;
    }
    return FKV_OK;
}

void fkvi_select_scratch_free(fkvi_select_scratch *s)
{
    if (s->mem) {
        fkvi_free(s->mem, s->scores);
        fkvi_free(s->mem, s->agg);
        fkvi_free(s->mem, s->order);
    }
    s->scores = s->agg = NULL;
    s->order = NULL;
}

/* Higher score first; ties to the lower page. A NaN score (NaN or Inf in
 * q or k) ranks below every number, NaNs among themselves by page, so that
 * qsort sees a total order (issue 12: NaN made this comparison
 * inconsistent, which is undefined behaviour for qsort). */
static int by_score(const void *a, const void *b)
{
    const ranked_page *x = a, *y = b;
    bool xn = isnan(x->score), yn = isnan(y->score);
    if (xn != yn)
        return xn ? 1 : -1;
    if (!xn && x->score != y->score)
        return x->score > y->score ? -1 : 1;
    return (x->page > y->page) - (x->page < y->page);
}

static int by_page(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* sh[i] = the Quest score of candidate page first + i for query qh (the
 * largest q.k its per-channel max/min allow); returns the largest. */
double fkvi_quest_scores(int32_t dim, const float *smax, const float *smin,
                         const float *qh, int32_t first, int32_t count,
                         double *sh)
{
    double top = -INFINITY;
    for (int32_t i = 0; i < count; i++) {
        const float *mx = smax + (size_t)(first + i) * dim;
        const float *mn = smin + (size_t)(first + i) * dim;
        double acc = 0.0;
        for (int32_t d = 0; d < dim; d++) {
            double a = (double)qh[d] * mx[d], b = (double)qh[d] * mn[d];
            acc += a > b ? a : b;
        }
        sh[i] = acc;
        if (acc > top)
            top = acc;
    }
    return top;
}

void fkvi_softmax(double *x, int32_t n, double scale, double top)
{
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        x[i] = exp(scale * (x[i] - top));
        sum += x[i];
    }
    for (int32_t i = 0; i < n; i++)
        x[i] /= sum;
}

int32_t fkvi_select_pages(const fkvi_geometry *g, fkv_group_score mode,
                          const float *smax, const float *smin,
                          const float *q, int32_t first, int32_t count,
                          fkvi_select_scratch *s, int32_t *selected)
{
    const int32_t k = g->select_pages;
    const int32_t dim = g->head_dim;
    if (count <= k) {
        for (int32_t i = 0; i < count; i++)
            selected[i] = first + i;
        return count;
    }

    for (int32_t h = 0; h < g->group; h++) {
        const float *qh = q + (size_t)h * dim;
        double *sh = s->scores + (size_t)h * count;
        double top = fkvi_quest_scores(dim, smax, smin, qh, first, count, sh);
        if (mode == FKV_GROUP_MEAN_SOFTMAX)
            fkvi_softmax(sh, count, g->scale, top);
    }

    ranked_page *order = s->order;
    for (int32_t i = 0; i < count; i++) {
        double a = 0.0;
        for (int32_t h = 0; h < g->group; h++)
            a += s->scores[(size_t)h * count + i];
        order[i].score = a / g->group;
        order[i].page = first + i;
    }
    qsort(order, (size_t)count, sizeof *order, by_score);
    for (int32_t i = 0; i < k; i++)
        selected[i] = order[i].page;
    qsort(selected, (size_t)k, sizeof *selected, by_page);
    return k;
}

double fkvi_group_cosine(const float *a, const float *b, int32_t group,
                         int32_t dim)
{
    double total = 0.0;
    for (int32_t h = 0; h < group; h++) {
        const float *x = a + (size_t)h * dim, *y = b + (size_t)h * dim;
        double xy = 0.0, xx = 0.0, yy = 0.0;
        for (int32_t d = 0; d < dim; d++) {
            xy += (double)x[d] * y[d];
            xx += (double)x[d] * x[d];
            yy += (double)y[d] * y[d];
        }
        if (xx > 0.0 && yy > 0.0)
            total += xy / sqrt(xx * yy);
    }
    return total / group;
}
