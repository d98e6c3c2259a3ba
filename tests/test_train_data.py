"""Stage-2 data and schedules: store dataset vs the raw arrays, padding, resumable order, LR / lambda_kv."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers_store import write_random_store
from trainer.data.loader import ResumableSampler, StoreDataset, collate_right_pad, make_loader
from trainer.eval.greedy import generated_matches
from trainer.objective.losses import ce_sums_by_segment, masked_ce
from trainer.objective.schedules import lambda_kv_at, lr_multiplier, lr_schedule


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_random_store(tmp_path_factory.mktemp("s") / "r.zarr", num_samples=11, layers=(0, 2, 3))


def test_dataset_reads_the_selected_layers_exactly(store):
    path, train, truth = store
    ds = StoreDataset(path, "train", layers=[2, 3], components=("q", "k"))
    for i in (0, 5, 10):
        s = ds[i]
        o, n = int(train.offsets[i]), int(train.lengths[i])
        assert torch.equal(s["input_ids"], torch.from_numpy(train.input_ids[o : o + n]).long())
        assert s["q"].shape == (2, 6, n, 16) and s["k"].shape == (2, 2, n, 16) and "v" not in s
        assert torch.equal(s["q"][1].transpose(0, 1), truth[(3, "q")][o : o + n])  # (T, H, D) -> layer 3
        assert torch.equal(s["k"][0].transpose(0, 1), truth[(2, "k")][o : o + n])


def test_collate_right_pads_to_the_batch_max(store):
    path, train, _ = store
    ds = StoreDataset(path, "train", layers=[0], components=("k",))
    batch = collate_right_pad(ds.__getitems__([0, 1, 2]), pad_id=7)
    lens = [int(train.lengths[i]) for i in range(3)]
    T = max(lens)
    assert batch["input_ids"].shape == (3, T) and batch["k_t"].shape == (3, 1, 2, T, 16)
    for b, n in enumerate(lens):
        assert batch["attention_mask"][b].sum() == n
        assert (batch["input_ids"][b, n:] == 7).all() and (batch["segment_ids"][b, n:] == -1).all()
        assert (batch["k_t"][b, :, :, n:] == 0).all() and not batch["answer_mask"][b, n:].any()
        assert (batch["segment_ids"][b, :n] >= 0).all()


def test_sampler_order_is_seeded_and_resumable():
    full = list(ResumableSampler(7, seed=3, total=30))
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))  # whole epochs
    assert full[:7] != full[7:14]  # a fresh permutation each epoch
    assert list(ResumableSampler(7, seed=3, total=30, start=12)) == full[12:]
    assert list(ResumableSampler(7, seed=4, total=30)) != full


def test_loader_with_workers_resumes_mid_stream(store):
    path, _, _ = store
    ds = StoreDataset(path, "train", layers=[0], components=("v",))
    a = [b["index"].tolist() for b in make_loader(ds, 3, 0, ResumableSampler(11, 0, 24), num_workers=2)]
    b = [
        b["index"].tolist()
        for b in make_loader(ds, 3, 0, ResumableSampler(11, 0, 24, start=9), num_workers=1)
    ]
    assert b == a[3:]


def test_lr_schedule_warmup_then_cosine():
    vals = [lr_multiplier(s, 4, 20, 0.1) for s in range(21)]
    assert vals[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and vals[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))
    assert vals[20] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="train.min_lr_ratio"):
        lr_multiplier(0, 0, 10, 1.5)


@pytest.mark.parametrize(
    "warmup, total, min_ratio",
    [(0, 1, 0.0), (0, 10, 0.1), (4, 20, 0.1), (20, 300, 0.1), (3, 7, 1.0), (12, 10, 0.5), (10, 10, 0.0)],
)
def test_library_lr_schedule_equals_the_closed_form_at_every_step(warmup, total, min_ratio):
    """transformers' warmup + cosine, as `lr_schedule` sets it up, gives exactly `lr_multiplier` at every
    step, per param group; a scheduler restored from its state_dict mid-run continues identically."""
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 3e-4}, {"params": params[1:], "lr": 1e-3}])
    sched = lr_schedule(opt, warmup, total, min_ratio)
    seen, saved = [], None
    for step in range(total):
        seen.append(sched.get_last_lr())
        opt.step()
        sched.step()
        if step == total // 2:
            saved = (opt.state_dict(), sched.state_dict())
    assert seen == [
        [peak * lr_multiplier(s, warmup, total, min_ratio) for peak in (3e-4, 1e-3)] for s in range(total)
    ]
    opt2 = torch.optim.SGD([{"params": params[:1], "lr": 3e-4}, {"params": params[1:], "lr": 1e-3}])
    sched2 = lr_schedule(opt2, warmup, total, min_ratio)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    resumed = []
    for _ in range(total // 2 + 1, total):
        resumed.append(sched2.get_last_lr())
        opt2.step()
        sched2.step()
    assert resumed == seen[total // 2 + 1 :]


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.5, 1, 1, 1, 1, 1]),
        ("linear", [0.5, 1, 0.75, 0.5, 0.25, 0]),
        (
            "cosine",
            [0.5, 1, 1 - 0.5 * (1 - math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4)), 0],
        ),
    ],
)
def test_lambda_schedules(schedule, expected):
    got = [lambda_kv_at(s, 2.0, schedule, warmup_steps=1, total_steps=5) for s in range(6)]
    assert got == pytest.approx([2 * e for e in expected], abs=1e-12)
    with pytest.raises(ValueError, match="train.lambda_schedule"):
        lambda_kv_at(0, 1.0, "stair", 0, 5)
    with pytest.raises(ValueError, match="train.lambda_until=None"):  # "step" needs its end step
        lambda_kv_at(0, 1.0, "step", 0, 5)


def test_masked_ce_counts_target_segments_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    seg = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, -1, -1, -1]])
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none"
    )
    ref = ref.view(2, 5)
    keep = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)  # targets in R
    assert masked_ce(logits, ids, seg, [1]) == pytest.approx(float(ref[keep].mean()), rel=1e-6)
    sums = ce_sums_by_segment(logits, ids, seg)
    assert sums[1].tolist() == [1.0, 3.0, 3.0]  # predictions per target segment; padding excluded
    assert float(sums[0].sum() / sums[1].sum()) == pytest.approx(
        float(masked_ce(logits, ids, seg, [0, 1, 2])), rel=1e-6
    )


@pytest.mark.parametrize(
    "generated, ok",
    [
        ("The text says Leo's code is 3907.\nAnswer: 3907", True),
        ("The text says Leo's code is 3907.\nAnswer: 3907.\nMia's", True),
        ("The text says Leo's code is 3907.\nAnswer: 39071", False),
        ("The text says Leo's code is 3907.\nAnswer: 1156", False),
        ("The text says Leo's code is 3907.", False),
    ],
)
def test_exact_match_rule(generated, ok):
    assert generated_matches(generated, "Answer:", "3907") is ok


def test_exact_match_without_lead_in():
    assert generated_matches("says 3907. 3907", "", "3907")
    assert not generated_matches("says 3907. 13907", "", "3907")


@pytest.mark.parametrize(
    "split, layers, comps", [("train", [0, 3], ("q", "k", "v")), ("train", [2], ("k",)), ("eval", [], ())]
)
def test_preloaded_items_equal_store_reads_also_through_workers(store, split, layers, comps):
    path, _, _ = store
    lazy = StoreDataset(path, split, layers=layers, components=comps)
    pre = StoreDataset(path, split, layers=layers, components=comps, preload=True)
    idx = [len(lazy) - 1, 0, 1, 1]  # unsorted, repeated
    for a, b in zip(lazy.__getitems__(idx), pre.__getitems__(idx)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # forked DataLoader workers serve the parent's preloaded arrays: same batches as the lazy loader
    sampler = ResumableSampler(len(lazy), 0, 12)
    got = list(make_loader(pre, 3, 0, sampler, num_workers=2))
    ref = list(make_loader(lazy, 3, 0, sampler, num_workers=0))
    for a, b in zip(got, ref):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(IndexError, match="sample index 99"):
        pre._pre.read_samples([99])
