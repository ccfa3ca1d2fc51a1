"""Reading training rows from caches: whole chunks, seeded class-balanced sampling."""

from __future__ import annotations

import numpy as np
import zarr

from stages.runs.cachedata import CacheData


def test_chunked_read_equals_row_reads_in_the_asked_order(learn_set):
    _, cache = learn_set
    data = CacheData([str(cache)])
    rows = data.rows("train")
    perm = np.random.default_rng(0).permutation(len(rows))[:20]
    picked = type(rows)(rows.source[perm], rows.row[perm], rows.label[perm])
    crops, maps = data.load(picked, progress=False)
    group = zarr.open_group(str(cache), mode="r")
    src = data.sources[0]
    for k, r in enumerate(picked.row):
        assert np.array_equal(crops[k], group[f"{src.pixels}/crops"][int(r)])
        assert np.array_equal(maps[k], group[f"{src.lare}/maps"][int(r)].astype(np.float32))


def test_sampling_is_class_balanced_seeded_and_from_the_train_split(learn_set):
    _, cache = learn_set
    data = CacheData([str(cache)])
    rows = data.rows("train")
    assert set(data.sources[0].columns["split"][rows.row]) == {"train"}
    a = data.sample(rows, 5, seed=0)
    assert np.bincount(a.label).tolist() == [5, 5] and len(set(a.row.tolist())) == 10
    assert np.array_equal(a.row, data.sample(rows, 5, seed=0).row)
    assert not np.array_equal(a.row, data.sample(rows, 5, seed=1).row)
    assert data.aligned()  # extracted with --preprocess crop at the pixel size


def test_read_spans_cover_whole_chunks_and_merge_dense_ones():
    from stages.runs.cachedata import read_spans

    assert read_spans(np.array([0, 1, 5, 9]), chunk=4, shard=16) == [(0, 12)]  # 3 of 3 chunks: one read
    assert read_spans(np.array([0, 61]), chunk=4, shard=64) == [(0, 4), (60, 64)]  # sparse: chunk by chunk
    assert read_spans(np.array([3, 17]), chunk=4, shard=16) == [(0, 4), (16, 20)]  # never across shards
