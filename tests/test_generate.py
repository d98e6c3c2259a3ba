"""Teacher-written completions (pipeline/data/generate.py, pipeline/data/completions.py) on a tiny random teacher:
batching = one prompt at a time, the R/A boundary, the answer_match filter, cuts, resume, 2 processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config.configlib import ConfigError, load_config
from pipeline.config.kvmap import SEGMENTS, DataConfig, GenerationConfig, KVMapConfig
from pipeline.data.completions import completions_dir, write_completions
from pipeline.data.generate import complete_rows, generate_continuations
from pipeline.data.samples import tokenize_sample
from pipeline.extract import run_extraction
from pipeline.models.load import load_model
from pipeline.store.reader import KVStore
from tests.helpers_store import save_tiny_teacher, write_extract_config

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)
STOP = "q"  # one character of the tiny character tokenizer
TEACHER_KEYS = [
    "data.completions=teacher",
    "data.max_new_tokens=6",
    "data.generation.answer_max_new_tokens=3",
    f"data.generation.stop_strings=[{STOP}]",
    "data.generation.batch_size=3",
    "data.generation.chunk_rows=4",
]


def char_tokenizer():
    """A character-level fast tokenizer (ids 0-2: pad, bos, eos; 97 printable characters): unlike the word
    tokenizer of helpers_store it round-trips any text, which transformers' `stop_strings` needs."""
    import string

    from tokenizers import Tokenizer, decoders
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation + " \n\t"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(tmodels.BPE(vocab, merges=[], unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_tok(teacher):
    from pipeline.config.kvmap import ModelConfig

    return load_model(ModelConfig(path=str(teacher), device="cpu"))


def _cfg(tmp_path, teacher, *overrides, num_rows=10):
    path = write_extract_config(tmp_path, teacher, num_rows=num_rows)
    return load_config(KVMapConfig, path, [*TEACHER_KEYS, *overrides])


def _texts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 12, (n,), generator=g)
    return [" ".join(f"w{int(i)}" for i in torch.randint(3, 101, (int(k),), generator=g)) for k in lens]


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(model_tok):
    model, tok = model_tok
    texts = _texts(7)
    gen = GenerationConfig(batch_size=4, stop_strings=[STOP, "x", "7"])
    got = generate_continuations(model, tok, texts, 10, gen, True)
    stops = set()
    for text, g in zip(texts, got):
        ids = torch.tensor([tok(text)["input_ids"]])
        ref = model.generate(
            ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2,
            stop_strings=[STOP, "x", "7"], tokenizer=tok,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
        ref = ref[: ref.index(2)] if 2 in ref else ref
        assert g["ids"] == ref
        assert g["text"] == re.split("q|x|7", tok.decode(ref, skip_special_tokens=True))[0]
        stops.add(g["stop"])
    assert len(stops) >= 2  # the rows really end differently (stop string / EOS / cut) inside one batch


def test_ra_boundary_is_where_answer_prefix_was_appended(model_tok):
    model, tok = model_tok
    data_cfg = DataConfig(
        reasoning_prefix=" w5 ", answer_prefix=" w99 ", max_new_tokens=6,
        generation=GenerationConfig(batch_size=3, stop_strings=[STOP], answer_max_new_tokens=4),
    )  # fmt: skip
    prompts = _texts(5, seed=1)
    recs = complete_rows(model, tok, prompts, ["w7"] * 5, data_cfg)
    read = DataConfig(reasoning_prefix="", answer_prefix=" w99 ", answer_mask_field="gold")
    for p, r in zip(prompts, recs):
        assert r["reasoning"].startswith(" w5 ")
        a_ctx = p + r["reasoning"] + " w99 "  # A was generated from exactly this text
        alone = generate_continuations(model, tok, [a_ctx], 4, data_cfg.generation, True)[0]
        assert r["answer"] == alone["text"]
        if r["kept"] is False:
            continue
        s = tokenize_sample(r, tok, read)
        enc = tok(p + r["reasoning"] + " w99 " + r["answer"], return_offsets_mapping=True)
        first_a = int((s["segment_ids"] == SEGMENTS["A"]).nonzero()[0])
        assert enc["offset_mapping"][first_a][0] >= len(p + r["reasoning"])  # the boundary char
        assert enc["offset_mapping"][first_a - 1][1] <= len(p + r["reasoning"])


def test_answer_match_keeps_exactly_the_answers_that_contain_the_gold(model_tok, monkeypatch):
    import pipeline.data.generate as g

    _, tok = model_tok
    r_texts = [" w10 w11", " w12", " w13", "  ", " w14 w7"]
    a_texts = ["w7 w8", "w70", "w8", "w7", "w9"]  # w70 is not w7 (whole words); row 3 has an empty R
    calls = iter([r_texts, a_texts])

    def fake(model, tokenizer, texts, max_new_tokens, gen, special):
        return [{"text": t, "ids": [5] * len(t.split()), "stop": "stop_string"} for t in next(calls)]

    monkeypatch.setattr(g, "generate_continuations", fake)
    data_cfg = DataConfig(reasoning_prefix=" w5", answer_prefix=" w99 ")
    recs = g.complete_rows(None, tok, ["w3"] * 5, ["w7"] * 5, data_cfg)
    assert [r["kept"] for r in recs] == [True, False, False, False, False]
    assert [r["reject_reason"] for r in recs] == [None, "no_answer_match", "no_answer_match", "empty",
                                                  "no_answer_match"]  # fmt: skip
    # filter none keeps every non-empty one
    calls = iter([r_texts, a_texts])
    recs = g.complete_rows(None, tok, ["w3"] * 5, ["w7"] * 5, DataConfig(filter="none"))
    assert [r["kept"] for r in recs] == [True, True, True, False, True]
    # the answer mask marks the gold inside generated R and A (whole words), not the whole generated A
    row = {"prompt": "w3", "reasoning": " w5 w14 w7 w70", "answer": "w7 w8", "gold": "w7"}
    s = tokenize_sample(
        row, tok, DataConfig(reasoning_prefix="", answer_prefix=" w99 ", answer_mask_field="gold")
    )
    text = "w3 w5 w14 w7 w70 w99 w7 w8"
    assert tok.decode(s["input_ids"]) == text  # one token per character
    marked = "".join(c if m else "_" for c, m in zip(text, s["answer_mask"].tolist()))
    assert marked == "__________w7_________w7___"


def test_resume_skips_finished_chunks_and_cut_rows_are_counted(tmp_path, teacher, model_tok):
    model, tok = model_tok
    # sampled: a greedy random model writes only blanks (and the chunk seed makes a rerun equal)
    cfg = _cfg(
        tmp_path,
        teacher,
        "data.generation.stop_strings=[zzz]",
        "data.filter=none",
        "data.generation.do_sample=true",
    )
    data_cfg, counts = write_completions(cfg, model, tok)
    out = completions_dir(cfg)
    assert out == tmp_path / "store.completions" and data_cfg.train_path == str(out / "train.jsonl")
    c = counts["train"]
    assert c["source_rows"] == 10 and c["chunks_generated_last_run"] == 3
    recs = [json.loads(x) for x in (out / "train.parts" / "chunk_00000.jsonl").read_text().splitlines()]
    cut = [r for r in recs if r["stop_reasoning"] == "max_new_tokens"]
    assert cut and c["cut_at_max_new_tokens"]["reasoning"] >= len(cut)  # never stops: cut and counted
    both = [r for r in cut if r["stop_answer"] == "max_new_tokens"]
    assert both and all(r["new_tokens"] == 6 + 3 for r in both)  # exactly max_new_tokens + answer's
    ref = {p.name: p.read_text() for p in (out / "train.parts").iterdir()}
    # a killed run: chunk 1 missing, a half-written temporary part; chunk 0 marked to prove it is kept
    (out / "train.parts" / "chunk_00001.jsonl").unlink()
    (out / "train.parts" / ".chunk_00001.jsonl.x").write_text('{"half')
    marked = recs[0] | {"marker": 1}
    (out / "train.parts" / "chunk_00000.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [marked, *recs[1:]])
    )
    _, counts = write_completions(cfg, model, tok)
    assert (
        counts["train"]["chunks_generated_last_run"] == 1 and counts["eval"]["chunks_generated_last_run"] == 0
    )
    assert (out / "train.parts" / "chunk_00001.jsonl").read_text() == ref["chunk_00001.jsonl"]
    assert json.loads((out / "train.parts" / "chunk_00000.jsonl").read_text().splitlines()[0])["marker"] == 1
    # other settings are refused in one line; --overwrite regenerates
    other = _cfg(
        tmp_path,
        teacher,
        "data.generation.stop_strings=[zzz]",
        "data.generation.do_sample=true",
        "data.filter=none",
        "data.max_new_tokens=5",
    )
    with pytest.raises(ValueError, match=r"other settings: pass --overwrite") as e:
        write_completions(other, model, tok)
    assert "\n" not in str(e.value)
    _, counts = write_completions(other, model, tok, overwrite=True)
    assert counts["train"]["chunks_generated_last_run"] == 3


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.completions=student", "expected one of 'dataset' | 'teacher'"),
        ("data.filter=exact", "expected one of 'none' | 'answer_match'"),
        ("data.max_new_tokens=0", "data.max_new_tokens=0: expected an int >= 1"),
        ("data.generation.top_p=0", "data.generation.top_p=0.0: expected a float in (0, 1]"),
        ("data.generation.temperature=0", "data.generation.temperature=0.0: expected a float > 0"),
        ("data.generation.batch_size=0", "data.generation.batch_size=0: expected an int >= 1"),
        ("data.generation.stop_strings=['']", "expected a list of non-empty strings"),
        ("data.reasoning_field=null", "teacher completions write R"),
    ],
)
def test_bad_values_are_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(KVMapConfig, None, ["data.completions=teacher", override])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_url_store_needs_a_local_completions_folder():
    cfg = load_config(KVMapConfig, None, ["data.completions=teacher", "extract.store=s3://b/x.zarr"])
    with pytest.raises(
        ConfigError, match="'data.generation.out_dir': null with extract.store='s3://b/x.zarr'"
    ):
        completions_dir(cfg)
    cfg.data.generation.out_dir = "gen"
    assert completions_dir(cfg) == Path("gen")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
def test_extraction_on_teacher_text_and_two_processes_equal_one(tmp_path, teacher):
    cfg_path = write_extract_config(tmp_path, teacher, num_rows=10)
    # sampled (a greedy random model writes only blanks): also checks that seeds follow chunks, not ranks
    keys = [*TEACHER_KEYS, "data.filter=none", "data.generation.do_sample=true", "data.max_length=200"]
    ref_cfg = load_config(KVMapConfig, cfg_path, keys)
    summary = run_extraction(ref_cfg)
    store = KVStore(tmp_path / "store.zarr", require_complete=True)
    c = store.attrs["dataset"]["train"]["completions"]
    assert summary["samples"]["train"]["completions"] == c
    assert store.num_samples() == c["kept"] == store.attrs["dataset"]["train"]["kept"] > 0
    assert store.attrs["completions"]["generation"]["stop_strings"] == [STOP]
    # another generation setting is another store: refused
    with pytest.raises(ValueError, match="different config|other settings"):
        run_extraction(load_config(KVMapConfig, cfg_path, [*keys, "data.generation.chunk_rows=5"]))
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd = [*launch, str(ROOT / "pipeline" / "extract.py"), "--config", str(cfg_path), *keys]
    cmd += [f"extract.store={two}.zarr"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr
    ref_dir = tmp_path / "store.completions"
    for name in ("train.jsonl", "train.rejected.jsonl", "eval.jsonl"):
        assert (Path(f"{two}.completions") / name).read_text() == (ref_dir / name).read_text(), name
    # the same store config (the full attrs differ only by where the JSONL lives)
    assert KVStore(f"{two}.zarr").attrs["config_fingerprint"] == store.attrs["config_fingerprint"]


def test_extra_default_prompts_keep_the_held_out_prompts():
    from pipeline.data.default_data import make_rows

    train, held = make_rows(50, 20)
    more, held2 = make_rows(50, 20, n_extra_train=30)
    assert held2 == held and more[:50] == train and len(more) == 80
    assert not {r["prompt"] for r in more} & {r["prompt"] for r in held}


def test_answer_exact_cuts_tails_and_drop_cut_rejects_budget_hits(model_tok, monkeypatch):
    import pipeline.data.generate as g

    _, tok = model_tok
    r_texts = [" w10", " w11", " w12", " w13"]
    a_texts = ["w7. w8 w9", "w8 w7", "w7", "w70"]  # a tail / gold not first / exact / not a whole word
    stops = ["stop_string", "stop_string", "max_new_tokens", "stop_string"]  # row 2's A hit its budget

    def fake(model, tokenizer, texts, max_new_tokens, gen, special):
        src = r_texts if not texts[0].endswith(" w99 ") else a_texts
        st = ["stop_string"] * 4 if src is r_texts else stops
        return [{"text": t, "ids": [5] * len(t.split()), "stop": s} for t, s in zip(src, st)]

    monkeypatch.setattr(g, "generate_continuations", fake)
    exact = DataConfig(reasoning_prefix=" w5", answer_prefix=" w99 ", filter="answer_exact")
    recs = g.complete_rows(None, tok, ["w3"] * 4, ["w7"] * 4, exact)
    assert [r["answer"] for r in recs] == ["w7", "w8 w7", "w7", "w70"]  # the tail after the gold is cut
    assert [r["reject_reason"] for r in recs] == [None, "no_answer_match", None, "no_answer_match"]
    dropping = DataConfig(
        reasoning_prefix=" w5", answer_prefix=" w99 ", generation=GenerationConfig(drop_cut=True)
    )
    recs = g.complete_rows(None, tok, ["w3"] * 4, ["w7"] * 4, dropping)
    assert [r["reject_reason"] for r in recs] == [None, None, "cut", "no_answer_match"]


def test_end_of_turn_stops_generation_and_old_settings_stay_valid(tmp_path, teacher):
    from transformers import AutoTokenizer

    from pipeline.data.completions import completion_settings
    from pipeline.data.generate import end_of_turn_ids
    from pipeline.models.load import resolve_path

    tok = AutoTokenizer.from_pretrained(resolve_path("builtin:smollm2-135m-instruct"))
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert end_of_turn_ids(char_tokenizer()) == []  # no chat template: nothing to add
    # drop_cut at its default leaves the settings of completions written before it existed unchanged
    cfg = _cfg(tmp_path, teacher)
    assert "drop_cut" not in completion_settings(cfg)["generation"]
    cfg = _cfg(tmp_path, teacher, "data.generation.drop_cut=true")
    assert completion_settings(cfg)["generation"]["drop_cut"] is True
