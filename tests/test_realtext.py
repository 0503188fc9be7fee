"""Realtext: the shipped files (minigrace's loader, split hygiene, hard negatives, metadata), the builder on
real Debian stanzas (tests/fixtures/realtext: Packages and Translation-en stanzas copied verbatim from
Debian 12) and real stdlib modules and reference topics, and the three held-out mteb tasks, built offline."""
import dataclasses
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

from minigrace.data import load_examples
from minigrace.worlds import realtext
from minigrace.worlds.realtext import (HELDOUT_PATH, MAX_CHARS, META_PATH, REALTEXT_TASKS, TEXTS_PATH, TRAIN_PATH,
                                       Plan, build, debian_items, drop_boilerplate, norm, realtext_rows,
                                       realtext_sts_pairs, sentences, split_items, stdlib_items, topic_items)

FIXTURES = Path(__file__).parent / "fixtures" / "realtext"
STDLIB_MODULES = ("bisect.py", "graphlib.py", "queue.py", "textwrap.py")  # real docstrings, copied at test time
TOPICS = ("assert", "del", "for", "lambda", "truth", "while", "with", "pass", "return", "break")
CATMANDU = "Catmandu provides a suite of Perl modules to ease the import, storage, retrieval, export and " \
           "transformation of metadata records."


def sentence_set(*texts: str) -> set[str]:
    return {norm(s) for text in texts for s in sentences(text)}


# -----------------------------------------------------------------------------
# The shipped files


def test_shipped_files_load_and_match_their_metadata():
    meta = json.loads(Path(META_PATH).read_text(encoding="utf-8"))
    train, mode = load_examples(TRAIN_PATH)
    assert mode == "supervised" and len(train) == meta["rows"]["train"]["total"] >= 3000
    assert all(ex.negative and ex.query for ex in train)
    texts, mode = load_examples(TEXTS_PATH)
    assert mode == "unsupervised" and len(texts) == meta["rows"]["texts"]["total"] >= 1000
    heldout, _ = load_examples(HELDOUT_PATH, "supervised")
    assert len(heldout) == meta["rows"]["heldout"]["total"] >= 250
    total = 0
    for path in (TRAIN_PATH, TEXTS_PATH, HELDOUT_PATH):
        data = Path(path).read_bytes()
        recorded = meta["files"][os.path.basename(path)]
        assert len(data) == recorded["bytes"] and hashlib.sha256(data).hexdigest() == recorded["sha256"]
        total += len(data)
    assert total < 4_000_000  # "a few MB at most"
    for ex in train + heldout:  # short texts for a 135M model on CPU, cut at a sentence end
        assert len(ex.text) <= MAX_CHARS and len(ex.negative) <= MAX_CHARS and len(ex.query) <= 160
        assert ex.text.rstrip("\"')]").endswith((".", "!", "?"))
    assert {r["source"] for r in realtext_rows("train")} == {"debian", "python"}
    assert set(meta["licenses"]) == {"debian", "python"}


def test_train_and_heldout_share_no_item_module_topic_query_or_sentence():
    train, texts, heldout = realtext_rows("train"), realtext_rows("texts"), realtext_rows("heldout")
    train_items = {r["item"] for r in train + texts} | {r["negative_item"] for r in train}
    assert not train_items & {r["item"] for r in heldout}
    # Python's split units are whole modules and whole reference topics.
    def units(rows):
        return {r["item"].split(":")[1] if r["section"] == "reference" else r["section"]
                for r in rows if r["source"] == "python"}
    assert units(heldout) and not units(train + texts) & units(heldout)
    train_sentences = sentence_set(*[r[k] for r in train for k in ("query", "positive", "negative")],
                                   *[r["text"] for r in texts])
    heldout_sentences = sentence_set(*[r[k] for r in heldout for k in ("query", "positive")])
    assert len(heldout_sentences) > 1000 and not train_sentences & heldout_sentences


def test_hard_negatives_are_other_items_of_the_same_section():
    for split in ("train", "heldout"):
        rows = realtext_rows(split)
        section = {r["item"]: (r["source"], r["section"]) for name in ("train", "texts", "heldout")
                   for r in realtext_rows(name)}
        checked = 0
        for r in rows:
            assert r["negative_item"] != r["item"] and r["negative"] != r["positive"]
            assert not sentence_set(r["negative"]) & sentence_set(r["positive"])
            if r["negative_item"] in section:
                assert section[r["negative_item"]] == (r["source"], r["section"])
                checked += 1
        assert checked > len(rows) // 2
    heldout = realtext_rows("heldout")  # held-out negatives come from the held-out rows themselves
    positive = {r["item"]: r["positive"] for r in heldout}
    assert all(positive[r["negative_item"]] == r["negative"] for r in heldout)


def test_task_data_is_graded_from_the_structure():
    rows = realtext_rows("heldout")
    of = {r["positive"]: r for r in rows}
    item_of_query = {r["query"]: r for r in rows}
    assert len(of) == len(item_of_query) == len(rows)  # unique texts: every pair's grade is well defined
    sections = {(r["source"], r["section"]) for r in rows}
    assert {(r["source"], r["section"]) for r in rows[:len(sections)]} == sections  # rows come in rounds
    pairs = realtext_sts_pairs(rows)
    assert len(pairs) == 3 * len(rows) and sorted({s for _, _, s in pairs}) == [0, 1, 2]
    for query, text, score in pairs:
        a, b = item_of_query[query], of[text]
        assert score == (2 if a is b else 1 if (a["source"], a["section"]) == (b["source"], b["section"]) else 0)
        assert a["source"] == b["source"]


# -----------------------------------------------------------------------------
# The builder, on real Debian stanzas and real Python documentation


def fixture_inputs(tmp_path: Path, reverse: bool = False):
    """(debian items, python items) from the fixture stanzas and a few real stdlib modules / topics;
    reverse=True feeds every input in the opposite order."""
    from pydoc_data.topics import topics

    packages = (FIXTURES / "Packages").read_text(encoding="utf-8").split("\n\n")
    translations = (FIXTURES / "Translation-en").read_text(encoding="utf-8").split("\n\n")
    if reverse:
        packages, translations = packages[::-1], translations[::-1]
    stdlib = tmp_path / ("stdlib-reversed" if reverse else "stdlib")
    stdlib.mkdir(exist_ok=True)
    for name in STDLIB_MODULES:
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), stdlib / name)
    keys = TOPICS[::-1] if reverse else TOPICS
    python = stdlib_items(str(stdlib)) + topic_items({k: topics[k] for k in keys})
    debian = debian_items("\n\n".join(packages), "\n\n".join(translations))
    return (debian[::-1], python[::-1]) if reverse else (debian, python)


def test_debian_items_from_real_stanzas(tmp_path):
    debian, _ = fixture_inputs(tmp_path)
    items = {i.item: i for i in debian}
    # One item per source package: bc (not dc, from the same source), ax25-tools (not ax25-xtools);
    # 0ad-data's two binaries are -data / -common packages, so that source gives none.
    assert len(items) == 28 and {"bc", "ax25-tools", "0ad"} <= set(items)
    assert not {"dc", "ax25-xtools", "0ad-data", "0ad-data-common"} & set(items)
    bc = items["bc"]
    assert (bc.section, bc.unit, bc.query) == ("math", "bc", "GNU bc arbitrary precision calculator language")
    assert items["0ad"].text.startswith('0 A.D. (pronounced "zero ey-dee") is a free, open-source, '
                                        "cross-platform real-time strategy (RTS) game of ancient warfare. In short,")
    assert {items[k].section for k in items if "catmandu" in k} == {"perl"}
    # The Catmandu sentence is in 5 packages' descriptions: boilerplate, removed; one text is then too short.
    assert sum(CATMANDU in i.text for i in debian) == 5
    kept = {i.item: i for i in drop_boilerplate(debian)}
    assert set(items) - set(kept) == {"libcatmandu-ldap-perl"}
    assert not any(CATMANDU in i.text for i in kept.values())
    assert kept["libcatmandu-alephx-perl"].text == items["libcatmandu-alephx-perl"].text  # never had it
    assert all(len(i.text) <= MAX_CHARS and i.text.endswith((".", "!", "?", '."', ".)")) for i in kept.values())


def test_a_train_item_that_repeats_a_heldout_sentence_is_dropped(tmp_path):
    debian = {i.item: i for i in fixture_inputs(tmp_path)[0]}
    bc, abe = debian["bc"], debian["abe"]  # seed 0, fraction 0.3: bc is held out, abe is not
    copycat = dataclasses.replace(abe, text=abe.text + " " + sentences(bc.text)[0])
    items = [bc, copycat, debian["acm"]]
    train, heldout, dropped = split_items(items, seed=0, heldout_fraction={"debian": 0.3})
    assert [i.item for i in heldout] == ["bc"] and [i.item for i in train] == ["acm"] and dropped == 1
    train, heldout, dropped = split_items([bc, abe, debian["acm"]], seed=0, heldout_fraction={"debian": 0.3})
    assert [i.item for i in train] == ["abe", "acm"] and dropped == 0


def test_builder_is_deterministic_and_splits_by_item(tmp_path):
    plan = Plan(heldout_debian=0.3, heldout_python=0.3, train_debian=12, train_python=10, texts_debian=4,
                texts_python=4, heldout_per_section=2, heldout_min_per_section=2, cluster_sections=1,
                cluster_per_section=3)
    debian, python = fixture_inputs(tmp_path)
    meta = build(str(tmp_path / "a"), debian, python, seed=0, plan=plan)
    build(str(tmp_path / "b"), *fixture_inputs(tmp_path, reverse=True), seed=0, plan=plan)
    for name in realtext.FILES.values():  # byte-identical whatever the input order
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    build(str(tmp_path / "c"), debian, python, seed=1, plan=plan)
    train_file = realtext.FILES["train"]
    assert (tmp_path / "a" / train_file).read_bytes() != (tmp_path / "c" / train_file).read_bytes()

    rows = {split: realtext_rows(split, str(tmp_path / "a")) for split in ("train", "texts", "heldout")}
    assert meta["rows"]["train"]["debian"] == 12 and meta["rows"]["heldout"]["total"] == len(rows["heldout"]) > 0
    clustered = {(r["source"], r["section"]) for r in rows["heldout"] if r["cluster"]}
    assert len(clustered) == 1 and sum(r["cluster"] for r in rows["heldout"]) == 3
    # seed 0 holds out these fixture source packages (a sha256 of the name: any machine, any input order)
    held_debian = {r["item"] for r in rows["heldout"] if r["source"] == "debian"}
    assert held_debian <= {"0ad", "2048", "a2jmidid", "abx", "aeolus", "aldo", "ax25-tools", "axiom", "bc",
                           "libcatmandu-alephx-perl", "libcatmandu-filestore-perl"}
    train_rows = rows["train"] + rows["texts"]
    assert not {r["item"] for r in train_rows} & {r["item"] for r in rows["heldout"]}
    train_texts = [r.get("positive", r.get("text")) for r in train_rows] + [r["negative"] for r in rows["train"]]
    assert not sentence_set(*train_texts) & sentence_set(*[r["positive"] for r in rows["heldout"]])
    every = {i.item: i for i in drop_boilerplate(debian + python)}
    for r in rows["train"] + rows["heldout"]:
        negative = every[r["negative_item"]]
        assert negative.item != r["item"] and (negative.source, negative.section) == (r["source"], r["section"])
        assert negative.text == r["negative"]
    for r in rows["train"]:  # the training negatives come from the train split
        assert every[r["negative_item"]].unit not in {every[h["item"]].unit for h in rows["heldout"]}


def test_command_line_builds_from_files_and_explains_missing_translations(tmp_path, monkeypatch, capsys):
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], "queue.py"), stdlib / "queue.py")
    out = tmp_path / "out"
    assert realtext.main(["--out", str(out), "--packages", str(FIXTURES / "Packages"),
                          "--translations", str(FIXTURES / "Translation-en"), "--stdlib", str(stdlib)]) == 0
    meta = json.loads((out / realtext.FILES["meta"]).read_text(encoding="utf-8"))
    fixture_hash = hashlib.sha256((FIXTURES / "Packages").read_bytes()).hexdigest()
    assert meta["inputs"]["debian_packages_sha256"] == fixture_hash and meta["items"]["debian"] == 28
    assert json.loads(capsys.readouterr().out)["rows"]["train"]["debian"] == meta["rows"]["train"]["debian"]
    monkeypatch.setattr(realtext, "APT_LISTS", str(tmp_path))  # a machine whose apt has no Translation-en
    with pytest.raises(SystemExit, match=r"apt-get update -o Acquire::Languages=en"):
        realtext.main(["--out", str(out), "--packages", str(FIXTURES / "Packages")])


# -----------------------------------------------------------------------------
# The three held-out tasks


def test_the_three_tasks_build_offline():
    from minigrace.eval import load_tasks

    rows = realtext_rows("heldout")
    tasks, not_run = load_tasks(["realtext"])
    assert not not_run
    assert [t.metadata.name for t in load_tasks(["RealTextSTS"])[0]] == ["RealTextSTS"]
    assert [t.metadata.name for t in tasks] == list(REALTEXT_TASKS)
    retrieval, sts, clustering = tasks
    for task in tasks:
        task.load_data()
    split = retrieval.dataset["default"]["test"]
    assert len(split["queries"]) == len(split["corpus"]) == len(rows)
    assert all(len(relevant) == 1 for relevant in split["relevant_docs"].values())
    scores = sts.dataset["test"]["score"]
    assert len(scores) == 3 * len(rows) and {s: scores.count(s) for s in (0, 1, 2)} == {s: len(rows) for s in (0, 1, 2)}
    labels = clustering.dataset["test"]["labels"]
    assert len(labels) == 160 and sorted(labels.count(label) for label in set(labels)) == [16] * 10
