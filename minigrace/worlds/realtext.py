"""Realtext: real training triples and held-out tasks from texts that others wrote and that install offline.

Two sources, both on every Debian machine with Python, neither written by this project (and no dictionary
or lexical database, which stay for independent evaluation):

    debian   package descriptions from Debian's archive (`apt-cache dumpavail` + the Translation-en
             lists): query = a package's short description, positive = its long description.
             One item per *source package* (its main binary package); section = the Debian section.
    python   Python's own documentation: stdlib docstrings, read with `ast` from the stdlib folder
             (query = the summary line, positive = the body; section = the top-level module), and the
             language reference topics of `pydoc_data.topics` (query = the heading, positive = the
             first paragraphs; section = "reference").

Texts are cleaned to prose (no code, lists or tables) and cut at a sentence end to at most 400 characters.
Every item belongs to one *split unit*: a Debian source package, a top-level stdlib module (all its
docstrings), a reference topic. A unit is held out when a seeded hash of its name says so, and every train
item that shares a sentence or a query with a held-out item is dropped, so no held-out text is trained on.

Files (shipped in corpora/, rebuilt by `python -m minigrace.worlds.realtext`, see --help):

    realtext_train.jsonl    {source, section, item, query, positive, negative, negative_item}   training
    realtext_texts.jsonl    {source, section, item, text}     other train-split texts (unsupervised)
    realtext_heldout.jsonl  {source, section, item, query, positive, negative, negative_item, cluster}   tasks
    realtext_meta.json      inputs (Debian suites and dates, input hashes, Python version), seed, sizes

A row's negative is the positive of another item of the same section and split (a hard negative). The
three held-out mteb tasks are graded from the data's structure, not by human raters:

    retrieval    every held-out query → its positive among all held-out positives (its section's other
                 items are in the corpus: the hard negatives)
    STS          three pairs per held-out item, always (query of A, positive of B), on a 0-2 scale:
                 2 B is A (same item), 1 B is another item of A's section, 0 B is an item of another
                 section of the same source (debian or python)
    clustering   the positives of 10 held-out sections (seeded choice among those with 16 held-out items),
                 16 per section, labelled by "source/section"
"""
from __future__ import annotations

import argparse
import ast
import bisect
import dataclasses
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora")
FILES = {"train": "realtext_train.jsonl", "texts": "realtext_texts.jsonl", "heldout": "realtext_heldout.jsonl",
         "meta": "realtext_meta.json"}
TRAIN_PATH, TEXTS_PATH, HELDOUT_PATH, META_PATH = (os.path.join(CORPUS_DIR, FILES[k]) for k in FILES)
REALTEXT_TASKS = ("RealTextRetrieval", "RealTextSTS", "RealTextClustering")
APT_LISTS = "/var/lib/apt/lists"
APT_HELPER = "/usr/lib/apt/apt-helper"  # `apt-helper cat-file` decompresses apt's .lz4/.xz/.gz lists
MAX_CHARS = 400  # a text is cut at the last sentence end before this
RAW_CHARS = 2000  # texts as extracted, before boilerplate sentences are removed and the cut to MAX_CHARS
BOILERPLATE_UNITS = 3  # a sentence found in this many split units is boilerplate, not an item's own text
MIN_BODY_CHARS = 80  # shorter positives carry too little to retrieve
LICENSES = {
    "debian": "Debian package metadata from the Debian archive (main): each package's own DFSG-free license; "
              "descriptions are short factual summaries written by the package maintainers",
    "python": "Python Software Foundation License Version 2 (CPython's docstrings and pydoc_data.topics)",
}

# Debian sections whose descriptions are boilerplate ("This package contains the shared library") or empty.
SKIP_SECTIONS = {"libs", "libdevel", "oldlibs", "debug", "doc", "localization", "metapackages", "tasks",
                 "introspection"}
SKIP_BINARY_SUFFIXES = ("-dev", "-doc", "-dbg", "-dbgsym", "-data", "-common", "-examples", "-tests")
BOILERPLATE = re.compile(r"transitional (dummy )?package|dummy package|debugging symbols", re.IGNORECASE)
# stdlib folders that are tests, private copies of public modules, or the reference topics (read apart).
SKIP_MODULES = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "encodings", "lib2to3", "__pycache__"}


@dataclass(frozen=True)
class Item:
    """One documented thing: a package, a function's docstring, a reference topic."""

    source: str  # "debian" or "python"
    section: str  # Debian section, top-level stdlib module, or "reference"
    item: str  # unique id: a Debian source package, "doc:module.qualname", "topic:key:heading"
    unit: str  # the split unit (all its items fall in one split): source package, "doc:module", "topic:key"
    query: str  # short description / summary line / heading
    text: str  # the positive: prose, cut at a sentence end


def _rank(seed: int, *keys: str) -> str:
    """A seeded, order-independent sort key (sha256): the same on every machine and Python version."""
    return hashlib.sha256("\x1f".join([str(seed), *keys]).encode("utf-8")).hexdigest()


# -----------------------------------------------------------------------------
# Text: prose only, cut at a sentence end

SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")  # before a capital
CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|[-*+o] |\d+[.)] |[|+=#$%]|[A-Za-z_][\w.]*\s*(\(.*\)|=.*)\s*$)")


def squash(text: str) -> str:
    """Whitespace runs → one space."""
    return " ".join(text.split())


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(squash(text)) if s.strip()]


def cut_at_sentence(paragraphs: list[str], max_chars: int = MAX_CHARS) -> str:
    """Whole sentences of the paragraphs, in order, while the total stays within max_chars ("" if the
    first sentence alone is longer). Text that does not end a sentence (a list intro "...:") stops it."""
    kept, length = [], 0
    for paragraph in paragraphs:
        for sentence in sentences(paragraph):
            if not sentence.rstrip("\"')]").endswith((".", "!", "?")):
                return " ".join(kept)
            if length + len(sentence) + bool(kept) > max_chars:
                return " ".join(kept)
            kept.append(sentence)
            length += len(sentence) + (len(kept) > 1)
    return " ".join(kept)


def is_prose(lines: list[str]) -> bool:
    """A paragraph of running text: no code/list/table line, mostly letters."""
    text = " ".join(lines)
    if not text or any(CODE_LINE.match(line) for line in lines):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.85


def good_query(query: str) -> bool:
    return 15 <= len(query) <= 160 and len(query.split()) >= 3 and not query.endswith(":")


# -----------------------------------------------------------------------------
# Debian: Packages stanzas (section, source) + Translation-en stanzas (long descriptions)


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """RFC 822-style stanzas (Debian control format): blank-line separated, continuation lines kept
    with their leading space."""
    stanzas = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        fields, key = {}, None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t" and key is not None:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def debian_long_description(description: str) -> tuple[str, list[str]]:
    """A Description field → (short description, prose paragraphs of the long description).

    Policy 5.6.13: " ." is a blank line, lines starting with two spaces are verbatim (lists, code)."""
    short, *lines = description.split("\n")
    paragraphs, current = [], []
    for line in lines + [" ."]:
        if line.strip() == ".":
            if current:
                paragraphs.append(current)
            current = []
        else:
            current.append(line)
    prose = [squash(" ".join(p)) for p in paragraphs if not any(line.startswith("  ") for line in p)
             and is_prose([line.strip() for line in p])]
    return squash(short), prose


def debian_items(packages_text: str, translations_text: str) -> list[Item]:
    """One item per source package: its main binary package (named like the source, else the shortest
    eligible name) with a clean short description and a long one of at least MIN_BODY_CHARS."""
    long_by_md5 = {}
    for stanza in parse_stanzas(translations_text):
        if "Description-md5" in stanza and "Description-en" in stanza:
            long_by_md5.setdefault(stanza["Description-md5"], stanza["Description-en"])
    by_source: dict[str, list[dict]] = {}
    for stanza in parse_stanzas(packages_text):
        name, section = stanza.get("Package", ""), stanza.get("Section", "").split("/")[-1]
        if not name or section in SKIP_SECTIONS or name.endswith(SKIP_BINARY_SUFFIXES):
            continue
        source = stanza.get("Source", name).split()[0]
        by_source.setdefault(source, []).append(stanza)
    items = []
    for source in sorted(by_source):
        main = min(by_source[source], key=lambda s: (s["Package"] != source, len(s["Package"]), s["Package"]))
        description = main.get("Description", "")
        if "\n" not in description:  # the long text lives in Translation-en, keyed by md5
            description = long_by_md5.get(main.get("Description-md5", ""), description)
        short, paragraphs = debian_long_description(description)
        text = cut_at_sentence(paragraphs, RAW_CHARS)
        if good_query(short) and len(text) >= MIN_BODY_CHARS and not BOILERPLATE.search(short + " " + text):
            section = main.get("Section", "").split("/")[-1]
            items.append(Item("debian", section, source, source, short, text))
    return items


# -----------------------------------------------------------------------------
# Python: stdlib docstrings (ast, no imports) and the language reference topics


def docstring_parts(doc: str) -> tuple[str, list[str]]:
    """A cleaned docstring → (summary: its first paragraph, prose paragraphs of the rest up to the first
    non-prose one: code, lists and "Args:"-style sections end the body)."""
    blocks = [b.split("\n") for b in re.split(r"\n\s*\n", doc.strip())]
    summary = squash(" ".join(blocks[0]))
    body = []
    for lines in blocks[1:]:
        indents = {len(line) - len(line.lstrip()) for line in lines}
        if not is_prose(lines) or lines[0].rstrip().endswith(":") or len(indents) > 1:
            break
        body.append(squash(" ".join(lines)))
    return summary, body


def stdlib_items(stdlib_dir: str) -> list[Item]:
    """Public functions, classes, methods and modules with a summary line and a prose body."""
    items = []
    for folder, subfolders, files in os.walk(stdlib_dir):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIP_MODULES and not d.startswith("config-"))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            module = os.path.relpath(path, stdlib_dir)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            top = module.split(".")[0]
            if top.startswith("_") or top in SKIP_MODULES:
                continue
            try:
                with open(path, encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            items += _module_items(tree, module, top)
    return items


def _module_items(tree: ast.Module, module: str, top: str) -> list[Item]:
    items, todo = [], [(tree, module)]  # (node, qualified name)
    while todo:
        node, qualname = todo.pop(0)
        doc = ast.get_docstring(node)
        if doc:
            summary, body = docstring_parts(doc)
            text = cut_at_sentence(body, RAW_CHARS)
            if good_query(summary) and len(text) >= MIN_BODY_CHARS:
                items.append(Item("python", top, f"doc:{qualname}", f"doc:{top}", summary, text))
        for child in getattr(node, "body", []):
            public = not getattr(child, "name", "_").startswith("_")
            if public and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                todo.append((child, f"{qualname}.{child.name}"))
    return items


def topic_items(topics: dict[str, str]) -> list[Item]:
    """pydoc_data.topics: a heading underlined with '*' (or '=' for a subsection), then text. Each heading
    with prose under it is an item; the split unit is the topic."""
    items = []
    for key in sorted(topics):
        lines = topics[key].split("\n")
        for i in range(len(lines) - 1):
            heading, rule = lines[i].strip(), lines[i + 1].strip()
            if not heading or not rule or set(rule) not in ({"*"}, {"="}) or len(rule) != len(lines[i].rstrip()):
                continue
            end = next((j for j in range(i + 2, len(lines) - 1)
                        if lines[j + 1].strip() and set(lines[j + 1].strip()) <= {"*", "=", "-"}
                        and len(lines[j + 1].strip()) == len(lines[j].rstrip()) > 0), len(lines))
            body = "\n".join(lines[i + 2:end])
            paragraphs = [squash(b) for b in re.split(r"\n\s*\n", body)
                          if b.strip() and not b.startswith((" ", "\n ")) and is_prose(b.strip().split("\n"))]
            text = cut_at_sentence(paragraphs, RAW_CHARS)
            query = squash(heading.replace('"', ""))
            if len(query) >= 4 and len(text) >= MIN_BODY_CHARS:
                items.append(Item("python", "reference", f"topic:{key}:{query}", f"topic:{key}", query, text))
    return items


# -----------------------------------------------------------------------------
# Split by unit, guard against leaks, pair each item with a hard negative


def norm(text: str) -> str:
    return squash(text).lower()


def drop_boilerplate(items: list[Item]) -> list[Item]:
    """Remove sentences that BOILERPLATE_UNITS or more split units share ("This package contains the Python 3
    version of the library.", "Node.js is an event-based server-side javascript engine."), cut each text
    to MAX_CHARS at a sentence end, and keep the items whose text is still MIN_BODY_CHARS long."""
    units_of: dict[str, set[str]] = {}
    for item in items:
        for sentence in sentences(item.text):
            units_of.setdefault(norm(sentence), set()).add(item.unit)
    kept = []
    for item in items:
        own = [s for s in sentences(item.text) if len(units_of[norm(s)]) < BOILERPLATE_UNITS]
        text = cut_at_sentence([" ".join(own)])
        if len(text) >= MIN_BODY_CHARS:
            kept.append(dataclasses.replace(item, text=text))
    return kept


def dedupe(items: list[Item]) -> list[Item]:
    """Items sorted by (source, item id), each query and each text kept once (the first wins)."""
    seen, kept = set(), []
    for item in sorted(items, key=lambda i: (i.source, i.item)):
        keys = {("q", norm(item.query)), ("t", norm(item.text))}
        if not keys & seen:
            kept.append(item)
        seen |= keys
    return kept


def split_items(items: list[Item], seed: int, heldout_fraction: dict[str, float]
                ) -> tuple[list[Item], list[Item], int]:
    """(train pool, held-out pool, train items dropped for sharing a sentence or query with held-out).

    A unit is held out when its seeded hash, read as a number in [0, 1), is below its source's
    heldout_fraction: adding or removing other units never moves it."""
    def held(item: Item) -> bool:
        return int(_rank(seed, "split", item.unit)[:13], 16) / 16 ** 13 < heldout_fraction[item.source]

    heldout = [i for i in items if held(i)]
    held_keys = {norm(s) for i in heldout for s in sentences(i.text)} | {norm(i.query) for i in heldout}
    train, dropped = [], 0
    for item in items:
        if held(item):
            continue
        if {norm(s) for s in sentences(item.text)} & held_keys or norm(item.query) in held_keys:
            dropped += 1
        else:
            train.append(item)
    return train, heldout, dropped


def by_section(items: list[Item]) -> dict[tuple[str, str], list[Item]]:
    """(source, section) → its items, sections and items in sorted order."""
    groups: dict[tuple[str, str], list[Item]] = {}
    for item in sorted(items, key=lambda i: (i.source, i.section, i.item)):
        groups.setdefault((item.source, item.section), []).append(item)
    return groups


def balanced_take(items: list[Item], n: int, seed: int, salt: str) -> list[Item]:
    """Up to n items, spread over sections: round r takes each section's r-th item (seeded order), so a
    huge section (Debian's "python", "perl") cannot crowd out the small ones."""
    ranked = [sorted(group, key=lambda i: _rank(seed, salt, i.item)) for group in by_section(items).values()]
    taken, r = [], 0
    while len(taken) < n and any(r < len(group) for group in ranked):
        taken += [group[r] for group in ranked if r < len(group)][: n - len(taken)]
        r += 1
    return taken


def distinct(a: Item, b: Item) -> bool:
    """Whether b can stand against a: another item, another query, no sentence in common."""
    return (a.item != b.item and norm(a.query) != norm(b.query)
            and not {norm(s) for s in sentences(a.text)} & {norm(s) for s in sentences(b.text)})


def hard_negatives(items: list[Item], pool: list[Item], seed: int) -> dict[str, Item]:
    """item id → a distinct item of the same section from `pool`. Each section's pool is put in a seeded
    order; an item's negative is the first distinct one after the item's own place in that order."""
    orders = {}  # (source, section) → (sorted keys, items in that order)
    for key, group in by_section(pool).items():
        ranked = sorted((_rank(seed, "negative", i.item), i) for i in group)
        orders[key] = ([k for k, _ in ranked], [i for _, i in ranked])
    negatives = {}
    for item in items:
        keys, order = orders.get((item.source, item.section), ([], []))
        start = bisect.bisect_right(keys, _rank(seed, "negative", item.item))
        for k in range(len(order)):
            other = order[(start + k) % len(order)]
            if distinct(item, other):
                negatives[item.item] = other
                break
    return negatives


def triple_rows(items: list[Item], pool: list[Item], seed: int) -> list[dict]:
    """{source, section, item, query, positive, negative, negative_item} for each item with a hard negative."""
    negatives = hard_negatives(items, pool, seed)
    return [{"source": i.source, "section": i.section, "item": i.item, "query": i.query, "positive": i.text,
             "negative": negatives[i.item].text, "negative_item": negatives[i.item].item}
            for i in items if i.item in negatives]


# -----------------------------------------------------------------------------
# Build: items → train triples, unsupervised texts, held-out rows, metadata


@dataclass(frozen=True)
class Plan:
    """How much of each kind the build writes (the shipped files use the defaults)."""

    heldout_debian: float = 0.1  # fraction of split units held out, per source (Python has few, uneven units)
    heldout_python: float = 0.25
    train_debian: int = 2400  # supervised triples per source
    train_python: int = 1200
    texts_debian: int = 1200  # unsupervised texts (train-split items not used in the triples)
    texts_python: int = 400
    heldout_per_section: int = 6  # held-out items per section in the tasks
    heldout_min_per_section: int = 4  # smaller held-out sections are left out of the tasks
    cluster_sections: int = 10  # the clustering task: this many held-out sections ...
    cluster_per_section: int = 16  # ... with this many items each


def heldout_selection(heldout: list[Item], plan: Plan, seed: int) -> tuple[list[Item], set[tuple[str, str]]]:
    """(held-out items of the tasks, the (source, section)s of the clustering task).

    Each held-out section gives its first heldout_per_section items in a seeded order, skipping any that
    shares a sentence or a query with one already taken; sections with fewer than heldout_min_per_section
    are left out. cluster_sections sections (seeded choice among those that have enough) give
    cluster_per_section items instead: fewer, larger clusters than one per section."""
    most = max(plan.heldout_per_section, plan.cluster_per_section)
    picks = {}  # (source, section) → its items, in the seeded order
    for key, group in by_section(heldout).items():
        picked = []
        for item in sorted(group, key=lambda i: _rank(seed, "heldout", i.item)):
            if len(picked) < most and all(distinct(item, p) for p in picked):
                picked.append(item)
        if len(picked) >= plan.heldout_min_per_section:
            picks[key] = picked
    big = [key for key, picked in picks.items() if len(picked) >= plan.cluster_per_section]
    clustered = set(sorted(big, key=lambda key: _rank(seed, "cluster", *key))[:plan.cluster_sections])
    chosen = []
    for key, picked in picks.items():
        chosen += picked[:plan.cluster_per_section if key in clustered else plan.heldout_per_section]
    return chosen, clustered


def build(out_dir: str, debian: list[Item], python: list[Item], *, seed: int = 0, plan: Plan = Plan(),
          inputs: dict | None = None) -> dict:
    """Write the four files to out_dir; returns the metadata written to realtext_meta.json."""
    items = dedupe(drop_boilerplate(debian + python))
    train, heldout, dropped = split_items(items, seed, {"debian": plan.heldout_debian, "python": plan.heldout_python})
    rows = {"train": [], "texts": [], "heldout": []}
    for source, n_train, n_texts in (("debian", plan.train_debian, plan.texts_debian),
                                     ("python", plan.train_python, plan.texts_python)):
        pool = [i for i in train if i.source == source]
        triples = triple_rows(balanced_take(pool, n_train, seed, "train"), pool, seed)
        used = {r["item"] for r in triples}
        rest = [i for i in pool if i.item not in used]
        rows["train"] += triples
        rows["texts"] += [{"source": i.source, "section": i.section, "item": i.item, "text": i.text}
                          for i in balanced_take(rest, n_texts, seed, "texts")]
    selection, clustered = heldout_selection(heldout, plan, seed)
    rows["heldout"] = round_robin([{**row, "cluster": (row["source"], row["section"]) in clustered}
                                   for row in triple_rows(selection, selection, seed)])
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for split, split_rows in rows.items():
        files[FILES[split]] = write_jsonl(os.path.join(out_dir, FILES[split]), split_rows)
    meta = {
        "builder": "python -m minigrace.worlds.realtext (minigrace/worlds/realtext.py)",
        "seed": seed, "max_chars": MAX_CHARS, "plan": asdict(plan),
        "inputs": inputs or {}, "licenses": LICENSES,
        "items": {"debian": len(debian), "python": len(python), "after_boilerplate_and_dedupe": len(items),
                  "train_pool": len(train), "heldout_pool": len(heldout), "train_dropped_for_overlap": dropped},
        "rows": {split: _count(split_rows) for split, split_rows in rows.items()},
        "files": files,
    }
    write_atomic(os.path.join(out_dir, FILES["meta"]), json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


def round_robin(rows: list[dict]) -> list[dict]:
    """Rows in rounds: every section's first row, then every section's second, ... so that any prefix
    (the trainer evaluates the first --eval-size held-out rows) spans all sections."""
    place: dict[tuple[str, str], int] = {}
    keyed = []
    for index, row in enumerate(rows):
        key = (row["source"], row["section"])
        place[key] = place.get(key, -1) + 1
        keyed.append((place[key], index, row))
    return [row for _, _, row in sorted(keyed, key=lambda t: t[:2])]


def _count(rows: list[dict]) -> dict:
    counts = {"total": len(rows)}
    for row in rows:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    counts["sections"] = len({(r["source"], r["section"]) for r in rows})
    return counts


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_jsonl(path: str, rows: list[dict]) -> dict:
    """Write rows (one JSON object a line); returns {rows, bytes, sha256} for the metadata."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomic(path, text)
    data = text.encode("utf-8")
    return {"rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -----------------------------------------------------------------------------
# Inputs on this machine: apt's lists, the stdlib folder, pydoc_data


def read_apt_list(path: str) -> str:
    """An apt list file as text: plain, or decompressed by `apt-helper cat-file` (.lz4, .xz, .gz, ...)."""
    if not path.endswith((".lz4", ".xz", ".gz", ".bz2", ".zst", ".lzma")):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    return subprocess.run([APT_HELPER, "cat-file", path], check=True, capture_output=True).stdout.decode("utf-8")


def apt_inputs(packages: str | None, translations: list[str] | None) -> tuple[str, str, dict]:
    """(Packages text, Translation-en text, what they are): files given, else `apt-cache dumpavail` and
    apt's Translation-en lists, with the suites' Release fields recorded."""
    if packages:
        with open(packages, encoding="utf-8") as fh:
            packages_text = fh.read()
    else:
        dumpavail = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True)
        packages_text = dumpavail.stdout.decode("utf-8")
    translations = translations or sorted(glob.glob(os.path.join(APT_LISTS, "*_i18n_Translation-en*")))
    if not translations:
        raise SystemExit(f"no Translation-en lists in {APT_LISTS}: Debian keeps long package descriptions there. "
                         "Run `apt-get update -o Acquire::Languages=en` first, or pass --translations FILE.")
    translations_text = "\n\n".join(read_apt_list(path) for path in translations)
    releases = []
    for path in sorted(glob.glob(os.path.join(APT_LISTS, "*_InRelease"))) if not packages else []:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
        fields = dict(re.findall(r"^(Origin|Suite|Codename|Version|Date): (.*)$", head, re.MULTILINE))
        releases.append(fields)
    return packages_text, translations_text, {
        "debian_packages": packages or "apt-cache dumpavail", "debian_releases": releases,
        "debian_translations": [os.path.basename(path) for path in translations],
        "debian_packages_sha256": hashlib.sha256(packages_text.encode("utf-8")).hexdigest(),
        "debian_translations_sha256": hashlib.sha256(translations_text.encode("utf-8")).hexdigest(),
    }


def python_inputs(stdlib_dir: str | None) -> tuple[list[Item], dict]:
    """Docstring and reference-topic items of this Python, and what they came from."""
    from pydoc_data.topics import topics

    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    items = stdlib_items(stdlib_dir) + topic_items(topics)
    return items, {"python": sys.version.split()[0], "python_implementation": sys.implementation.name,
                   "pydoc_topics": len(topics)}


# -----------------------------------------------------------------------------
# The held-out tasks (graded from the structure; see the module docstring)


def realtext_rows(split: str, corpus_dir: str = CORPUS_DIR) -> list[dict]:
    """The rows of 'train', 'texts' or 'heldout', in file order."""
    path = os.path.join(corpus_dir, FILES[split])
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def realtext_retrieval_data(rows: list[dict] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(queries, documents, index of each query's positive): every held-out query against all positives."""
    rows = realtext_rows("heldout") if rows is None else rows
    return [r["query"] for r in rows], [r["positive"] for r in rows], list(range(len(rows)))


def realtext_sts_pairs(rows: list[dict] | None = None) -> list[tuple[str, str, int]]:
    """(query of A, positive of B, score 0-2): B = A (2), the next item of A's section (1), the item at
    A's place in the next section of A's source (0)."""
    rows = realtext_rows("heldout") if rows is None else rows
    sections: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        sections.setdefault((r["source"], r["section"]), []).append(r)
    pairs = []
    for (source, section), group in sections.items():
        others = [key for key in sections if key[0] == source]
        other = sections[others[(others.index((source, section)) + 1) % len(others)]]
        for position, r in enumerate(group):
            if len(others) < 2 or len(group) < 2:
                continue
            sibling, stranger = group[(position + 1) % len(group)], other[position % len(other)]
            pairs += [(r["query"], r["positive"], 2), (r["query"], sibling["positive"], 1),
                      (r["query"], stranger["positive"], 0)]
    return pairs


def realtext_clustering_data(rows: list[dict] | None = None) -> tuple[list[str], list[str]]:
    """(held-out positives of the rows marked "cluster", their "source/section" labels)."""
    rows = [r for r in (realtext_rows("heldout") if rows is None else rows) if r["cluster"]]
    return [r["positive"] for r in rows], [f"{r['source']}/{r['section']}" for r in rows]


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m minigrace.worlds.realtext",
        description="Build the realtext train / held-out files from Debian package descriptions and Python's "
                    "own documentation, reproducibly (seeded; inputs, versions and hashes in realtext_meta.json).",
        epilog="Debian's long descriptions are in the Translation-en lists, which apt fetches only when asked:\n"
               "    apt-get update -o Acquire::Languages=en && python -m minigrace.worlds.realtext\n"
               "The shipped files were built so, on Debian 12 (bookworm) with CPython 3.11; other releases give\n"
               "other (equally valid) files.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=CORPUS_DIR, help="output folder (default: the package's corpora/)")
    p.add_argument("--seed", type=int, default=0, help="split / sampling seed (default: 0)")
    p.add_argument("--heldout-debian", type=float, default=Plan.heldout_debian,
                   help=f"fraction of Debian source packages held out (default: {Plan.heldout_debian})")
    p.add_argument("--heldout-python", type=float, default=Plan.heldout_python,
                   help=f"fraction of stdlib modules and reference topics held out (default: {Plan.heldout_python})")
    p.add_argument("--packages", default="", help="a Packages file (default: the output of `apt-cache dumpavail`)")
    p.add_argument("--translations", nargs="*", default=None,
                   help=f"Translation-en files (default: {APT_LISTS}/*_i18n_Translation-en*)")
    p.add_argument("--stdlib", default="",
                   help="the Python stdlib folder to read docstrings from (default: this Python's)")
    args = p.parse_args(argv)
    for flag, value in (("--heldout-debian", args.heldout_debian), ("--heldout-python", args.heldout_python)):
        if not 0 < value < 1:
            p.error(f"{flag} must be in (0, 1), got {value}")
    packages_text, translations_text, inputs = apt_inputs(args.packages or None, args.translations)
    python, python_meta = python_inputs(args.stdlib or None)
    plan = Plan(heldout_debian=args.heldout_debian, heldout_python=args.heldout_python)
    meta = build(args.out, debian_items(packages_text, translations_text), python, seed=args.seed, plan=plan,
                 inputs={**inputs, **python_meta})
    print(json.dumps({"items": meta["items"], "rows": meta["rows"],
                      "bytes": {name: f["bytes"] for name, f in meta["files"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
