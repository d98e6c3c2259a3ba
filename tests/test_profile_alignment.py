"""trainer/profile_alignment.py on tiny models: both modes side by side, NaN detection, live teacher, bad input."""

from __future__ import annotations

import pytest

from tests.helpers_train import make_tiny_store, tiny_train_config, write_config
from trainer.profile_alignment import attention_probs, main, mean_entropy


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("prof")
    store = make_tiny_store(d / "p.zarr", num_train=6, num_eval=0)
    return write_config(d, tiny_train_config(d, store))


def test_both_modes_side_by_side(config, capsys):
    assert main(["--config", str(config), "--mode", "both", "--batch_size", "2", "--seq_length", "12"]) == 0
    out = capsys.readouterr().out
    assert "[structured] layer_map=[1, 2, 3]" in out and "[flat] layer_map=[1, 2, 3]" in out
    # teacher (B, H_t, T, D_t) -> aligned (B, H_s, T, D_s) -> student, for Q and for K/V
    assert "structured: (2, 6, 12, 16)->(2, 4, 12, 8)->(2, 4, 12, 8)" in out
    assert "flat: (2, 2, 12, 16)->(2, 2, 12, 8)->(2, 2, 12, 8)" in out
    assert "KL(ali||s)" in out and "erank a" in out and out.rstrip().endswith("status: ok")


def test_live_teacher_and_two_batches(config, capsys):
    argv = ["--config", str(config), "--mode", "structured", "--batch_size", "3", "--seq_length", "8"]
    assert main([*argv, "--live-teacher", "--num_batches", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("source=live teacher") == 2 and "B=3 T=8" in out


def test_nan_in_the_store_fails(tmp_path, capsys):
    store = make_tiny_store(tmp_path / "bad.zarr", num_train=4, num_eval=0, poison=True)
    cfg = write_config(tmp_path, tiny_train_config(tmp_path, store))
    assert main(["--config", str(cfg), "--mode", "flat", "--batch_size", "2", "--seq_length", "12"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM [flat] layer 2 k: NaN/inf teacher=1" in out and "status: FAIL" in out


def test_bad_input(config, capsys):
    assert main(["--config", str(config), "--batch_size", "50"]) == 2
    assert "has 6 samples" in capsys.readouterr().err
    assert main(["--config", str(config), "kv_projection_mode=diag"]) == 2
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--mode", "diagonal"])


def test_attention_helpers():
    import torch

    q = torch.zeros(1, 2, 4, 8)
    k = torch.zeros(1, 1, 4, 8)
    mask = torch.tensor([[True, True, True, False]])
    p = attention_probs(q, k, 1.0, mask)
    assert torch.allclose(p[0, 0, 2], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert p[0, 0, 3, 3] == 0  # a padding key is never attended
    ent = mean_entropy(p, mask)  # rows 0..2 uniform over 1, 2, 3 keys
    assert ent == pytest.approx((0 + torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(3.0))).item() / 3)


def test_a_url_store_is_profiled_like_the_local_one(tmp_path, capsys):
    """`train.store` may be a URL (issue 16): memory:// holding a copy of the local store gives the same report."""
    import fsspec

    store = make_tiny_store(tmp_path / "u.zarr", num_train=6, num_eval=0)
    url = f"memory://kvmap-tests/{tmp_path.name}/u.zarr"
    fsspec.filesystem("memory").put(str(store), url.removeprefix("memory://"), recursive=True)
    argv = ["--mode", "structured", "--batch_size", "2", "--seq_length", "12"]
    (tmp_path / "local").mkdir()
    (tmp_path / "url").mkdir()
    local = write_config(tmp_path / "local", tiny_train_config(tmp_path / "local", store))
    remote = write_config(
        tmp_path / "url", tiny_train_config(tmp_path / "url", store, **{"train.store": url})
    )
    assert main(["--config", str(local), *argv]) == 0
    want = capsys.readouterr().out
    assert main(["--config", str(remote), *argv]) == 0
    got = capsys.readouterr().out
    assert got.rstrip().endswith("status: ok") and got.replace(url, str(store)) == want
