/* The LSE merge on f32 rows, shared by the public merge and split-KV decode. */
#ifndef ATTN_LSE_MERGE_H
#define ATTN_LSE_MERGE_H

#include <stdint.h>

/* (o1, *l1) = (o1, *l1) ⊕ (o2, l2) for one row of dv values (natural-log LSE). */
void merge_rows(float *o1, float *l1, const float *o2, float l2, int64_t dv);

#endif
