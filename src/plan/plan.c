/* Explicit plans: validated and copied once, then reused across calls. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

attn_status attn_plan_create(attn_plan **out, int64_t n, int64_t m, int64_t block_q,
                             int64_t block_k, int64_t heads, const int64_t *row_offsets,
                             const attn_plan_entry *entries) {
    attn_clear_error();
    if (!out) return attn_err(ATTN_ERR_NULL, "out must not be NULL");
    *out = NULL;
    if (!row_offsets) return attn_err(ATTN_ERR_NULL, "row_offsets must not be NULL");
    if (n < 1 || m < 1) return attn_err(ATTN_ERR_ARG, "n and m must be >= 1");
    if (n > INT32_MAX || m > INT32_MAX)
        return attn_err(ATTN_ERR_OVERFLOW, "n and m must be below 2^31 for plans");
    if (block_q < 1 || block_q > 512 || block_k < 1 || block_k > 512)
        return attn_err(ATTN_ERR_ARG, "block_q and block_k must be in 1..512");
    if (heads < 1 || heads > 65536) return attn_err(ATTN_ERR_ARG, "heads must be in 1..65536");
    int64_t nqb = (n + block_q - 1) / block_q, nkb = (m + block_k - 1) / block_k;
    int64_t rows = heads * nqb;
    if (row_offsets[0] != 0) return attn_err(ATTN_ERR_ARG, "row_offsets[0] must be 0");
    for (int64_t r = 0; r < rows; r++)
        if (row_offsets[r + 1] < row_offsets[r] || row_offsets[r + 1] - row_offsets[r] > nkb)
            return attn_err(ATTN_ERR_ARG,
                            "row_offsets[%lld..%lld] must be non-decreasing with at most %lld entries per row",
                            (long long)r, (long long)(r + 1), (long long)nkb);
    int64_t total = row_offsets[rows];
    if (total > 0 && !entries) return attn_err(ATTN_ERR_NULL, "entries must not be NULL");
    double visited = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t qb = r % nqb;
        int64_t qrows = (qb + 1) * block_q > n ? n - qb * block_q : block_q;
        for (int64_t e = row_offsets[r]; e < row_offsets[r + 1]; e++) {
            const attn_plan_entry *en = &entries[e];
            if (en->key_block < 0 || en->key_block >= nkb)
                return attn_err(ATTN_ERR_ARG, "entries[%lld].key_block (%d) must be in 0..%lld",
                                (long long)e, en->key_block, (long long)(nkb - 1));
            if (e > row_offsets[r] && en->key_block <= entries[e - 1].key_block)
                return attn_err(ATTN_ERR_ARG,
                                "entries[%lld].key_block must be strictly ascending within a query block",
                                (long long)e);
            if (en->mask > ATTN_BLOCK_PARAMS)
                return attn_err(ATTN_ERR_ARG, "entries[%lld].mask (%d) is not an attn_block_mask",
                                (long long)e, en->mask);
            if (en->level > 15 || ((int64_t)1 << en->level) > block_k)
                return attn_err(ATTN_ERR_ARG,
                                "entries[%lld].level is %d; 2^level must not exceed block_k (%lld)",
                                (long long)e, en->level, (long long)block_k);
            if (en->level > 0 && en->mask != ATTN_BLOCK_FULL)
                return attn_err(ATTN_ERR_ARG,
                                "entries[%lld]: a pooled entry (level > 0) takes mask ATTN_BLOCK_FULL",
                                (long long)e);
            int64_t kcols = (en->key_block + 1) * block_k > m ? m - en->key_block * block_k : block_k;
            int64_t f = (int64_t)1 << en->level; /* pooled keys do 1/f of the work */
            visited += (double)qrows * (double)((kcols + f - 1) / f);
        }
    }
    attn_plan *p = calloc(1, sizeof *p);
    if (!p) return attn_err(ATTN_ERR_NOMEM, "out of memory allocating the plan");
    p->row_offsets = malloc((size_t)(rows + 1) * sizeof(int64_t));
    p->entries = malloc((size_t)(total > 0 ? total : 1) * sizeof(attn_plan_entry));
    if (!p->row_offsets || !p->entries) {
        attn_plan_free(p);
        return attn_err(ATTN_ERR_NOMEM, "out of memory copying the plan");
    }
    memcpy(p->row_offsets, row_offsets, (size_t)(rows + 1) * sizeof(int64_t));
    if (total > 0) memcpy(p->entries, entries, (size_t)total * sizeof(attn_plan_entry));
    p->n = n, p->m = m, p->block_q = block_q, p->block_k = block_k, p->heads = heads;
    p->n_qblocks = nqb, p->n_kblocks = nkb;
    p->density = visited / ((double)heads * (double)n * (double)m);
    *out = p;
    return ATTN_OK;
}

void attn_plan_free(attn_plan *plan) {
    if (!plan) return;
    free(plan->row_offsets);
    free(plan->entries);
    free(plan);
}

double attn_plan_density(const attn_plan *plan) { return plan ? plan->density : 0.0; }
