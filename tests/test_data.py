"""minigrace.data: loading and validating real files on disk, the held-out split, the batch stream."""
import json
import warnings

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigrace.data import DataError, Example, PromptBatches, load_examples, split_heldout

SUP = {"query": "what is a cat", "positive": "A cat is a small feline.", "negative": "Dogs bark."}
GOOD = json.dumps(SUP).encode()


def write(path, lines):
    """Write lines (str or bytes) joined by newlines, with a final newline, as raw bytes."""
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return path


# -----------------------------------------------------------------------------
# Good inputs, every format


def test_jsonl_supervised(tmp_path):
    rows = [SUP, {"query": "q2", "positive": "p2", "negative": None, "source": "msmarco"}, {"query": "q3", "positive": "p3"}]
    path = write(tmp_path / "data.jsonl", [json.dumps(r) for r in rows])
    examples, mode = load_examples(str(path))
    assert mode == "supervised"
    assert examples == [
        Example(text=SUP["positive"], query=SUP["query"], negative=SUP["negative"]),
        Example(text="p2", query="q2"),
        Example(text="p3", query="q3"),
    ]


def test_empty_negative_means_no_negative(tmp_path):
    path = write(tmp_path / "data.jsonl", ['{"query": "q", "positive": "p", "negative": "  "}'])
    assert load_examples(path)[0] == [Example(text="p", query="q", negative=None)]


def test_crlf_bom_and_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n   \n')
    assert load_examples(path) == ([Example("a"), Example("b")], "unsupervised")


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([SUP, {"query": "q", "positive": "p"}], indent=2))
    examples, mode = load_examples(path)
    assert mode == "supervised" and [e.text for e in examples] == [SUP["positive"], "p"]


def test_json_file_as_json_lines(tmp_path):
    path = write(tmp_path / "data.json", ['{"text": "a"}', '{"text": "b"}'])
    assert load_examples(path) == ([Example("a"), Example("b")], "unsupervised")


def test_parquet_supervised_and_unsupervised(tmp_path):
    sup = tmp_path / "sup.parquet"
    pd.DataFrame({"query": ["q1", "q2"], "positive": ["p1", "p2"], "negative": ["n1", None]}).to_parquet(sup)
    assert load_examples(sup) == ([Example("p1", "q1", "n1"), Example("p2", "q2", None)], "supervised")
    unsup = tmp_path / "unsup.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), unsup)
    assert load_examples(unsup) == ([Example("a"), Example("b"), Example("c")], "unsupervised")


def test_txt_one_text_per_line_blank_lines_skipped(tmp_path, caplog):
    path = write(tmp_path / "wiki.txt", ["first sentence.", "", "  ", "second sentence."])
    with caplog.at_level("INFO", logger="minigrace.data"):
        assert load_examples(path) == ([Example("first sentence."), Example("second sentence.")], "unsupervised")
    assert "skipped 2 blank lines" in caplog.text
    assert load_examples(write(tmp_path / "x.text", ["t"]))[0] == [Example("t")]


def test_datasets_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_examples(str(tmp_path / "ds")) == ([Example("a"), Example("b")], "unsupervised")

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"query": "q", "positive": "p", "negative": "n"}]),
        test=datasets.Dataset.from_list([{"query": "tq", "positive": "tp", "negative": "tn"}]),
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd") == ([Example("p", "q", "n")], "supervised")

    datasets.DatasetDict(test=splits["test"]).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match=r"no_train.*splits \['test'\] but no 'train' split"):
        load_examples(tmp_path / "no_train")


def test_list_of_dicts(tmp_path):
    assert load_examples([{"text": "a"}, {"text": "b", "id": 3}]) == ([Example("a"), Example("b")], "unsupervised")


# -----------------------------------------------------------------------------
# Bad rows: each case puts one bad line between two good ones


BAD_LINES = [
    ("truncated_json", b'{"query": "q", "positive": "p', "malformed JSON (Unterminated string"),
    ("missing_field", b'{"query": "q"}', "field 'positive': missing"),
    ("number", b'{"query": 3, "positive": "p"}', "field 'query': expected a string, got number"),
    ("list", b'{"query": "q", "positive": ["p"]}', "field 'positive': expected a string, got list"),
    ("null", b'{"query": null, "positive": "p"}', "field 'query': null"),
    ("empty_string", b'{"query": "", "positive": "p"}', "field 'query': empty"),
    ("whitespace_only", b'{"query": "q", "positive": " \\t\\n "}', "field 'positive': whitespace only"),
    ("invalid_utf8", b'{"query": "q\xff\xfe", "positive": "p"}', "invalid UTF-8 (byte 0xff at byte 13"),
    ("binary_garbage", bytes(range(128, 256)), "invalid UTF-8"),
    ("row_is_list", b'["q", "p"]', "expected a JSON object, got list"),
    ("row_is_number", b"42", "expected a JSON object, got number"),
    ("row_is_string", b'"just text"', "expected a JSON object, got string"),
    ("bad_negative", b'{"query": "q", "positive": "p", "negative": 7}', "field 'negative': expected a string, got number"),
    ("two_problems", b'{"positive": false}', "field 'query': missing; field 'positive': expected a string, got boolean"),
    ("lone_surrogate", b'{"query": "\\ud800", "positive": "p"}', "field 'query': not valid Unicode"),
    ("mixed_modes", b'{"text": "an unsupervised row"}', "mixed modes: this row has columns ['text'], but the file is supervised (decided by"),
]


@pytest.mark.parametrize("line,reason", [case[1:] for case in BAD_LINES], ids=[case[0] for case in BAD_LINES])
def test_bad_row_is_reported_with_file_line_and_reason(tmp_path, line, reason):
    path = write(tmp_path / "data.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as error:
        load_examples(str(path))
    message = str(error.value)
    assert f"{path}:2: {reason}" in message
    assert "1 of 3 rows are bad" in message
    assert "--skip-bad-rows" in message


def test_errors_are_collected_over_the_whole_file(tmp_path):
    lines = [GOOD] + [b'{"query": "q"}'] * 8 + [GOOD]
    with pytest.raises(DataError) as error:
        load_examples(write(tmp_path / "data.jsonl", lines))
    message = str(error.value)
    assert "8 of 10 rows are bad" in message
    assert all(f"data.jsonl:{n}: field 'positive': missing" in message for n in range(2, 7))
    assert "data.jsonl:7:" not in message and "... and 3 more" in message
    assert "train on the other 2 rows" in message


def test_huge_row_is_truncated_with_a_warning(tmp_path):
    path = write(tmp_path / "data.jsonl", [json.dumps({"text": "x" * 5000}), '{"text": "short"}'])
    with pytest.warns(UserWarning, match=r"data.jsonl: 1 rows had a text longer than max_chars=1000"):
        examples, _ = load_examples(path, max_chars=1000)
    assert [len(e.text) for e in examples] == [1000, 5]


def test_bad_rows_in_parquet_and_lists_are_0_based_rows(tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"query": ["q0", None, "q2"], "positive": ["p0", "p1", ""]}).to_parquet(path)
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert f"{path}: row 1: field 'query': null" in str(error.value)
    assert f"{path}: row 2: field 'positive': empty" in str(error.value)

    with pytest.raises(DataError, match=r"<rows>: row 1: field 'text': expected a string, got list"):
        load_examples([{"text": "a"}, {"text": ["b"]}])


def test_text_file_with_invalid_utf8_line(tmp_path):
    path = write(tmp_path / "wiki.txt", [b"fine", b"caf\xe9 au lait", b"also fine"])
    with pytest.raises(DataError, match=r"wiki.txt:2: invalid UTF-8 \(byte 0xe9"):
        load_examples(path)


def test_bad_json_array_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    with pytest.raises(DataError, match=r"data.json:4: malformed JSON"):
        load_examples(path)
    path.write_text(json.dumps([{"text": "a"}, {"text": 5}]))
    with pytest.raises(DataError, match=r"data.json: row 1: field 'text': expected a string"):
        load_examples(path)


# -----------------------------------------------------------------------------
# Files that are not training data at all


def test_empty_and_blank_only_files(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jsonl: no training data \(no rows at all\)"):
        load_examples(tmp_path / "empty.jsonl")
    for name in ("blank.jsonl", "blank.txt"):
        with pytest.raises(DataError, match=rf"{name}: no training data \(only 3 blank lines\)"):
            load_examples(write(tmp_path / name, ["", "   ", "\t"]))
    with pytest.raises(DataError, match=r"<rows>: no training data"):
        load_examples([])


def test_unknown_extension_missing_path_plain_directory(tmp_path):
    with pytest.raises(DataError, match=r"data.csv: unknown file type '.csv'; expected .*\.jsonl.*\.parquet.*\.txt"):
        load_examples(write(tmp_path / "data.csv", ["query,positive"]))
    with pytest.raises(DataError, match=r"nope.jsonl: no such file or directory"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a directory, but not one saved by datasets' save_to_disk"):
        load_examples(tmp_path / "plain")
    with pytest.raises(DataError, match=r"cannot load training data from a int"):
        load_examples(3)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"data.parquet: not a readable parquet file"):
        load_examples(path)


# -----------------------------------------------------------------------------
# Modes


def test_mode_inferred_from_first_usable_row(tmp_path):
    # The first row is bad (no 'positive'); the second decides "supervised"; the first is reported.
    path = write(tmp_path / "data.jsonl", ['{"query": "q"}', GOOD])
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'positive': missing"):
        load_examples(path)


def test_mode_cannot_be_inferred(tmp_path):
    path = write(tmp_path / "data.jsonl", ['{"question": "q", "answer": "a"}', '{"sentence": "s"}'])
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert "columns seen: ['answer', 'question', 'sentence']" in str(error.value)
    assert "expected 'query' and 'positive' (supervised) or 'text' (unsupervised)" in str(error.value)
    with pytest.raises(DataError, match=r"<rows>: no row has the columns .* columns seen: \[\]"):
        load_examples([{}, {}])


def test_mode_mismatch(tmp_path):
    path = write(tmp_path / "data.jsonl", ['{"text": "a"}'])
    with pytest.raises(DataError, match=r"data.jsonl:1: mode='supervised' needs 'query' and 'positive'.*\['text'\]"):
        load_examples(path, mode="supervised")
    with pytest.raises(DataError, match=r"wiki.txt: a text file holds one unsupervised text per line"):
        load_examples(write(tmp_path / "wiki.txt", ["a"]), mode="supervised")
    with pytest.raises(DataError, match=r"unknown data mode 'sup'"):
        load_examples(path, mode="sup")


def test_unsupervised_mode_on_a_supervised_file_uses_positives(tmp_path):
    path = write(tmp_path / "data.jsonl", [GOOD, '{"query": "q", "positive": "p"}'])
    assert load_examples(path, mode="unsupervised") == ([Example(SUP["positive"]), Example("p")], "unsupervised")


def test_mixed_modes_in_an_unsupervised_file(tmp_path):
    path = write(tmp_path / "data.jsonl", ['{"text": "a"}', '{"text": "b"}', GOOD])
    with pytest.raises(DataError, match=r"data.jsonl:3: mixed modes.*unsupervised \(decided by .*data.jsonl:1\)"):
        load_examples(path)


# -----------------------------------------------------------------------------
# skip_bad_rows


def test_skip_bad_rows_writes_rejects(tmp_path):
    long_bad = json.dumps({"query": "q" * 2000})
    lines = [GOOD, b'{"query": "q", "positive": "p', GOOD, b"\xff\xfe garbage", long_bad.encode(), b"", GOOD]
    rejects = tmp_path / "out" / "rejects.jsonl"
    with pytest.warns(UserWarning, match=r"data.jsonl: skipped 3 bad rows \(of 6\); wrote them to .*rejects.jsonl"):
        examples, mode = load_examples(write(tmp_path / "data.jsonl", lines), skip_bad_rows=True, rejects_path=str(rejects))
    assert mode == "supervised" and len(examples) == 3
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["line"] for r in records] == [2, 4, 5]
    assert records[0]["reason"].startswith("malformed JSON") and records[0]["raw"] == '{"query": "q", "positive": "p'
    assert records[1]["reason"].startswith("invalid UTF-8") and records[1]["raw"] == "\\xff\\xfe garbage"
    assert records[2]["reason"] == "field 'positive': missing" and records[2]["raw"] == long_bad[:500]


def test_skip_bad_rows_keys_rows_for_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    rejects = tmp_path / "rejects.jsonl"
    with pytest.warns(UserWarning, match=r"skipped 1 bad rows \(of 3\)"):
        assert load_examples(path, skip_bad_rows=True, rejects_path=rejects)[0] == [Example("a"), Example("c")]
    assert json.loads(rejects.read_text()) == {"row": 1, "reason": "field 'text': null", "raw": '{"text": null}'}


def test_skip_bad_rows_with_nothing_left_is_still_an_error(tmp_path):
    rejects = tmp_path / "rejects.jsonl"
    path = write(tmp_path / "data.jsonl", ['{"text": ""}', '{"text": 1}'])
    with pytest.raises(DataError, match=r"data.jsonl: all 2 rows are bad, nothing to train on"):
        load_examples(path, skip_bad_rows=True, rejects_path=rejects)
    assert len(rejects.read_text().splitlines()) == 2


def test_skip_bad_rows_with_no_bad_rows_is_silent(tmp_path):
    rejects = tmp_path / "rejects.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_examples(write(tmp_path / "data.jsonl", [GOOD]), skip_bad_rows=True, rejects_path=rejects)
    assert rejects.read_text() == ""


# -----------------------------------------------------------------------------
# split_heldout


EXAMPLES = [Example(f"text {i}") for i in range(100)]


def test_split_heldout_sizes_disjoint_deterministic():
    train, heldout = split_heldout(EXAMPLES, 0.1, seed=0)
    assert (len(train), len(heldout)) == (90, 10)
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(EXAMPLES)
    assert train == sorted(train, key=EXAMPLES.index)  # original order kept
    assert split_heldout(EXAMPLES, 0.1, seed=0) == (train, heldout)
    assert split_heldout(EXAMPLES, 0.1, seed=1)[1] != heldout
    assert len(split_heldout(EXAMPLES, 0.5, seed=0, max_heldout=7)[1]) == 7
    assert len(split_heldout(EXAMPLES, 0.001, seed=0)[1]) == 1
    assert split_heldout(EXAMPLES, 0.0, seed=0) == (EXAMPLES, [])
    with pytest.raises(DataError):
        split_heldout(EXAMPLES, 1.0, seed=0)
    with pytest.raises(DataError, match="cannot hold out 1 of 1"):
        split_heldout(EXAMPLES[:1], 0.5, seed=0)


# -----------------------------------------------------------------------------
# PromptBatches


def take(batches, n):
    return [next(batches) for _ in range(n)]


def test_each_epoch_visits_every_example_once_in_full_batches():
    batches = PromptBatches(EXAMPLES[:12], batch_size=4, seed=0)
    assert batches.steps_per_epoch == 3
    epochs = [take(batches, 3) for _ in range(3)]
    for epoch in epochs:
        assert all(len(batch) == 4 for batch in epoch)
        assert sorted(e.text for batch in epoch for e in batch) == sorted(e.text for e in EXAMPLES[:12])
    assert batches.epoch == 2
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch


def test_last_incomplete_batch_is_dropped():
    batches = PromptBatches(EXAMPLES[:10], batch_size=3, seed=0)
    epoch = take(batches, 3)
    assert all(len(batch) == 3 for batch in epoch) and len({e for batch in epoch for e in batch}) == 9
    assert batches.epoch == 0
    next(batches)
    assert batches.epoch == 1


def test_same_seed_same_stream_other_seed_other_stream():
    assert take(PromptBatches(EXAMPLES, 8, seed=3), 30) == take(PromptBatches(EXAMPLES, 8, seed=3), 30)
    assert take(PromptBatches(EXAMPLES, 8, seed=3), 30) != take(PromptBatches(EXAMPLES, 8, seed=4), 30)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_resume_continues_with_the_identical_next_batches(n, data):
    batch_size = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**31))
    stop = data.draw(st.integers(0, 3 * (n // batch_size) + 2))
    uninterrupted = PromptBatches(EXAMPLES[:n], batch_size, seed)
    expected = take(uninterrupted, stop + 10)[stop:]

    first = PromptBatches(EXAMPLES[:n], batch_size, seed)
    take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = PromptBatches(EXAMPLES[:n], batch_size, seed)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    assert take(resumed, 10) == expected


def test_batch_errors():
    with pytest.raises(DataError, match=r"batch_size=11 is larger than the 10 training examples"):
        PromptBatches(EXAMPLES[:10], batch_size=11, seed=0)
    with pytest.raises(DataError):
        PromptBatches(EXAMPLES[:10], batch_size=0, seed=0)
    state = PromptBatches(EXAMPLES[:10], batch_size=2, seed=0).state_dict()
    with pytest.raises(DataError, match=r"checkpoint has num_examples=10, this run 9"):
        PromptBatches(EXAMPLES[:9], batch_size=2, seed=0).load_state_dict(state)
