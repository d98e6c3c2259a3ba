"""`train.shuffle: shards`: the shard-window sample order and whole-shard cached reads (pipeline/store/shard_cache.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.store.reader import KVStore
from pipeline.store.shard_cache import ShardCache
from tests.helpers_store import write_random_store
from trainer.data.loader import ResumableSampler, StoreDataset, make_loader
from trainer.data.sample_order import shard_window_permutation


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # ~40 samples of 5-40 tokens in shards of 64 tokens: ~13 shards, many samples straddle a boundary
    return write_random_store(tmp_path_factory.mktemp("s") / "r.zarr", num_samples=40, layers=(0, 2))


def _windows_in_order(shards: list[int], window: int) -> bool:
    """True when the stream visits shards `window` at a time: once a window's shards are done, none returns."""
    order = list(dict.fromkeys(shards))  # shards in order of first appearance
    win = {s: i // window for i, s in enumerate(order)}
    return all(win[a] <= win[b] for a, b in zip(shards, shards[1:]))


@pytest.mark.parametrize("window", [1, 2, 3])
def test_shard_window_permutation_visits_windows_and_shuffles_inside(window):
    g = torch.Generator().manual_seed(0)
    groups = torch.from_numpy(np.random.default_rng(0).integers(0, 9, 100)) * 4  # sparse shard ids
    perm = shard_window_permutation(groups, window, g)
    assert sorted(perm.tolist()) == list(range(100))
    shards = groups[perm].tolist()
    assert _windows_in_order(shards, window)
    assert not _windows_in_order(groups[torch.randperm(100, generator=g)].tolist(), window)  # the check bites
    if window > 1:  # samples of a window's shards interleave (not shard after shard)
        assert len([1 for a, b in zip(shards, shards[1:]) if a != b]) > 9
    assert (
        perm.tolist() != shard_window_permutation(groups, window, torch.Generator().manual_seed(1)).tolist()
    )


def test_shard_sampler_is_seeded_resumable_and_fresh_each_epoch():
    groups = np.repeat(np.arange(6), 5)  # 6 shards x 5 samples
    full = list(ResumableSampler(30, seed=3, total=75, groups=groups, window=2))
    assert sorted(full[:30]) == list(range(30)) and sorted(full[30:60]) == list(range(30))
    assert full[:30] != full[30:60]
    assert _windows_in_order([int(groups[i]) for i in full[:30]], 2)
    assert list(ResumableSampler(30, seed=3, total=75, start=41, groups=groups, window=2)) == full[41:]
    assert full[:30] != list(ResumableSampler(30, seed=3, total=30))  # not the global order
    with pytest.raises(ValueError, match="got 5 shard ids for 30 samples"):
        ResumableSampler(30, seed=0, total=10, groups=groups[:5])


def _jobs(st: KVStore, indices, layers=(0, 2)):
    off, ln = st.offsets(), st.lengths()
    arrays = [st.array(layer, c) for layer in layers for c in "qkv"] + [st.token_array("input_ids")]
    return [(a, slice(int(off[i]), int(off[i] + ln[i]))) for i in indices for a in arrays]


def test_cached_reads_equal_plain_reads_and_fetch_each_shard_once_in_window_order(store):
    path, train, _ = store
    st = KVStore(path)
    ds = StoreDataset(path, "train", layers=[0, 2], components=("q", "k", "v"))
    cached = StoreDataset(path, "train", layers=[0, 2], components=("q", "k", "v"), shard_cache=3)
    order = list(ResumableSampler(len(ds), 0, len(ds), groups=ds.shards(), window=2))
    for i in range(0, len(order), 8):
        idx = order[i : i + 8]
        for a, b in zip(ds.__getitems__(idx), cached.__getitems__(idx)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    starts = {int(o) // st.chunk_tokens for o in train.offsets}
    fetched = cached.store.shard_cache.fetched
    # 2 layers x 3 states: each shard a sample starts in, once (a straddler's tail is read as a part); the 3
    # token arrays are one chunk each
    assert fetched == 6 * len(starts) + 3
    # the same cache under the global order fetches far more: the window order is what makes it pay
    glob = ShardCache(3)
    for i in range(0, len(order), 8):
        glob.read(st, _jobs(st, list(ResumableSampler(len(ds), 0, len(ds)))[i : i + 8]))
    assert glob.fetched > 1.2 * fetched


def test_cache_is_bounded_and_a_call_larger_than_the_cache_is_still_right(store):
    path, _, _ = store
    st = KVStore(path)
    cache = ShardCache(1)
    jobs = _jobs(st, range(40))  # every sample in one call: every shard of every array
    got = cache.read(st, jobs)
    want = [np.asarray(a[s]) for a, s in jobs]
    assert all(np.array_equal(x, y) for x, y in zip(got, want))
    assert all(len(lru) == 1 for lru in cache._lru.values()) and len(cache._lru) == len(
        {a.path for a, _ in jobs}
    )
    got[0][:] = 0  # answers are copies: writing into one leaves the cache intact
    assert np.array_equal(cache.read(st, jobs[:1])[0], want[0])
    with pytest.raises(ValueError, match="max_shards=0"):
        ShardCache(0)


def test_a_damaged_shard_read_through_the_cache_names_the_array_and_chunk(tmp_path):
    path, _, _ = write_random_store(tmp_path / "d.zarr", num_samples=12, layers=(0,))
    shard = path / "train" / "layers" / "0" / "k" / "c" / "1" / "0" / "0"
    shard.write_bytes(b"\x00" * shard.stat().st_size)
    ds = StoreDataset(path, "train", layers=[0], components=("k",), shard_cache=2)
    with pytest.raises(ValueError, match=r"array train/layers/0/k chunk 1 \(tokens 64-128"):
        list(make_loader(ds, 12, pad_id=0))


def _fetches(stream: list[int], groups: np.ndarray, n: int, readers: int, batch: int) -> int:
    """Whole-shard fetches if batch b is read by reader b % readers, each reader caching its shards for an epoch."""
    touched = set()
    for p, i in enumerate(stream):
        touched.add(((p // batch) % readers, p // n, int(groups[i])))  # (reader, epoch, shard)
    return len(touched)


@pytest.mark.parametrize("readers, batch", [(2, 3), (3, 4), (4, 2)])
def test_reader_order_deals_each_shard_to_one_reader_and_resumes(readers, batch):
    rng = np.random.default_rng(readers)
    groups = np.repeat(np.arange(0, 48, 4), rng.integers(3, 10, 12))  # 12 shards of 3-9 samples
    groups = groups[: len(groups) - (len(groups) % batch == 0)]  # n not a multiple of the batch
    n, total = len(groups), 3 * len(groups) + 5
    kw = dict(groups=groups, window=2, readers=readers, batch=batch)
    full = list(ResumableSampler(n, 0, total, **kw))
    for e in range(3):
        assert sorted(full[e * n : (e + 1) * n]) == list(range(n))  # each epoch a permutation
    assert n % batch  # epochs end mid-batch: the next epoch's first batch continues that reader's slot
    for p in (1, n - 1, n + batch + 1, 2 * n + 3):
        assert list(ResumableSampler(n, 0, total, start=p, **kw)) == full[p:]
    dealt = _fetches(full[: 3 * n], groups, n, readers, batch)
    shared = _fetches(list(ResumableSampler(n, 0, 3 * n, groups=groups, window=2)), groups, n, readers, batch)
    assert dealt <= 3 * (12 + 2 * readers)  # each shard once per epoch, plus a few at the end of an epoch
    assert shared >= 1.5 * dealt  # undealt, every reader fetches most shards


class _WorkerId(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.tensor(torch.utils.data.get_worker_info().id)


def test_batch_b_is_read_by_reader_b_mod_readers():
    """What reader_order relies on: torch hands a rank's batch j to worker j % W, accelerate global batch b to
    rank b % N (so reader b % (N * W) reads batch b)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    loader = torch.utils.data.DataLoader(_WorkerId(), batch_size=4, num_workers=2, prefetch_factor=3)
    assert [int(b[0]) for b in loader] == [j % 2 for j in range(16)]
    batches = list(BatchSampler(SequentialSampler(range(40)), 4, drop_last=False))
    for rank in range(2):
        got = list(BatchSamplerShard(BatchSampler(SequentialSampler(range(40)), 4, False), 2, rank))
        assert got == batches[rank::2]
