"""pipeline/analysis/attention_profile.py: the teacher's own attention rebuilt from a store, against a direct loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.analysis.attention_profile import attention_profile, main
from pipeline.analysis.head_scores import attention_maps
from pipeline.store.reader import KVStore
from tests.helpers_store import write_random_store


def test_maps_are_causal_rows_summing_to_one_and_uniform_for_zero_queries():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    p = attention_maps(q, k, 0.25)  # (L, H, T, T)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 6, 7))
    assert (p.triu(diagonal=1) == 0).all()
    u = attention_maps(torch.zeros_like(q), k, 0.25)
    torch.testing.assert_close(u[0, 0, 3, :4], torch.full((4,), 0.25))  # row t: uniform over t + 1 keys


def test_profile_equals_a_direct_per_row_loop(tmp_path, capsys):
    path, _, _ = write_random_store(tmp_path / "s.zarr", num_samples=5, layers=(0, 2))
    r = attention_profile(path, num_samples=3)
    store = KVStore(path)
    scale = 1.0 / math.sqrt(int(store.attrs["teacher"]["head_dim"]))
    want_sink, want_ent, count = {}, {}, {}
    for i in range(3):
        x = store.read_sample(i, components=("q", "k"))
        G = x["k"].shape[1]
        for li in range(2):
            for h in range(x["q"].shape[1]):
                for t, sid in enumerate(x["segment_ids"].tolist()):
                    logits = (x["q"][li, h, t] @ x["k"][li, h * G // x["q"].shape[1], : t + 1].T) * scale
                    p = logits.double().softmax(-1)
                    key = (sid, li)
                    want_sink[key] = want_sink.get(key, 0.0) + float(p[0])
                    want_ent[key] = want_ent.get(key, 0.0) - float((p * p.log()).sum())
                    count[key] = count.get(key, 0) + 1
    for name, sid in (("P", 0), ("R", 1), ("A", 2)):
        for li in range(2):
            if (sid, li) in count:
                assert r["sink"][name][li] == pytest.approx(want_sink[(sid, li)] / count[(sid, li)], rel=1e-5)
                assert r["entropy"][name][li] == pytest.approx(
                    want_ent[(sid, li)] / count[(sid, li)], rel=1e-4
                )
    assert main([str(path), "--samples", "2"]) == 0 and "| 2 |" in capsys.readouterr().out


def test_missing_store_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "missing.zarr")]) == 2
    assert capsys.readouterr().err.startswith("attention_profile: error: ")


def test_head_scores_equal_a_direct_loop_and_the_sidecar_is_written(tmp_path, capsys):
    from pipeline.analysis.head_scores import head_scores, prompt_answer_span, sidecar_path

    ids = torch.tensor([5, 7, 8, 9, 3, 7, 8, 4, 7, 8])
    seg = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    am = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 1, 1])
    assert prompt_answer_span(ids, seg, am).nonzero().flatten().tolist() == [
        1,
        2,
    ]  # "7 8" occurs in P at 1..2

    path, _, _ = write_random_store(tmp_path / "s.zarr", num_samples=5, layers=(0, 2))
    r = head_scores(path, num_samples=4, progress=False)
    store = KVStore(path)
    scale = 1.0 / math.sqrt(int(store.attrs["teacher"]["head_dim"]))
    want, n = torch.zeros(3, 2, 6, dtype=torch.float64), 0
    for i in range(4):
        x = store.read_sample(i, components=("q", "k"))
        t_ids, t_seg, t_am = x["input_ids"], x["segment_ids"], x["answer_mask"]
        span = prompt_answer_span(t_ids, t_seg, t_am)
        G = x["k"].shape[1]
        for t in range(1, len(t_ids)):
            if not (t_am[t] and t_seg[t] > 0):
                continue
            n += 1
            for li in range(2):
                for h in range(6):
                    z = (x["q"][li, h, t - 1] @ x["k"][li, h * G // 6, :t].T) * scale  # keys 0..t-1
                    p = z.double().softmax(-1)
                    j = int(p.argmax())
                    want[0, li, h] += float(t_seg[j] == 0 and t_ids[j] == t_ids[t])
                    want[1, li, h] += float(p[span[:t]].sum())
                    want[2, li, h] += float(p[0])
    assert r["answer_rows"] == n > 0 and r["layers"] == [0, 2] and r["split"] == "train"
    for i, name in enumerate(("retrieval", "answer_mass", "sink")):
        torch.testing.assert_close(
            torch.tensor(r[name], dtype=torch.float64), want[i] / n, rtol=1e-5, atol=1e-7
        )
    assert main([str(path), "--head-scores", "--samples", "4", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("| ") and "rank" not in line for line in out.splitlines()) == 3  # --top 3 rows
    assert json.loads(sidecar_path(path).read_text())["samples"] == 4


def test_head_scores_sidecar_of_a_url_store_sits_beside_it_and_is_read_back(tmp_path, monkeypatch, capsys):
    """A URL store (memory:// here; s3:// goes through the same fsspec calls) gets its sidecar as a sibling URL."""
    import fsspec

    from pipeline.analysis import head_scores as hs

    url = f"memory://kvmap-tests/{tmp_path.name}/s.zarr"
    write_random_store(url, num_samples=5, layers=(0, 2))
    assert hs.sidecar_path(url) == url + ".head_scores.json"
    assert main([url, "--head-scores", "--samples", "4", "--top", "3"]) == 0
    capsys.readouterr()
    fs, path = fsspec.core.url_to_fs(url + ".head_scores.json")
    written = json.loads(fs.cat_file(path))
    assert written["samples"] == 4 and written["fingerprint"] == KVStore(url).fingerprint
    assert not fs.exists(url.removeprefix("memory://") + "/s.zarr.head_scores.json")  # not inside the store
    monkeypatch.setattr(hs, "head_scores", lambda *a, **k: pytest.fail("the sidecar should have been read"))
    assert hs.load_or_compute(url, "train", 4) == written
    fs.rm(path)
    assert hs.read_sidecar(url) is None
