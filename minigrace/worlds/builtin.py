"""The offline default: a synthetic contrastive corpus and a tiny chat LM pre-trained on it.

`python train.py` with no arguments needs a model and data that exist without any download, and an
RL problem with something real to learn. Both are built here, deterministically.

Corpus. 6 domains x 4 topics, 15 plain-English keywords per topic. Every text is a template filled
with 3-4 keywords of its *true* topic, then a trailing clause that mentions two keywords of a random
other *side* topic in passing: "how do i choose flour and yeast for icing (see also comet, orbit)".
A query and its positive share the true topic and two specific keywords; the hard negative comes
from a sibling topic of the same domain. Held-out triples use keyword pairs never used in training.

Tiny model. A byte-level BPE tokenizer (1.5k vocab, ChatML template) and a 4-layer Qwen2 causal LM
(hidden 64, 0.26M parameters), taught by SFT to answer with a short rationale: a topic's name, then
the text's keywords of that topic, e.g. `<think> astronomy comet orbit</think><|im_end|>`. The
rationale names the side topic with probability 0.67 and the true topic with probability 0.33, so

  - greedy decoding names the side topic for most texts: a wrong-headed rationale writer;
  - sampling at temperature 1 names the true topic ~30% of the time, so most groups of 8 samples
    contain both kinds;
  - a true-topic rationale pulls a text's embedding toward texts of its topic (and its query: they
    share two keywords), a side-topic one toward an unrelated topic: held-out query->positive
    nDCG@10 is much higher with true-topic rationales. A contrastive reward on embeddings alone sees
    the difference, and RL can flip the greedy choice.

The built model ships with the package (`minigrace/worlds/tiny/`, ~1 MB): trained once and committed, so
every machine loads the same bits. Training it on the user's CPU would not do that: torch and MKL pick
kernels by instruction set (AVX-512, AVX2, baseline), and 1,200 SFT steps turn last-bit differences into a
different model. `tiny/minigrace_build.json` records the settings it was built with and the sha256 of every
file; loading checks both, so a changed build setting stops with the command that rebuilds it, never a
silent local rebuild:

    python -m minigrace.worlds.builtin --rebuild    # rebuild the shipped model (then commit minigrace/worlds/tiny/)
    python -m minigrace.worlds.builtin              # measure the designed flaw above on the shipped model
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations

import torch

from ..embed import forward_rollouts
from ..metrics import retrieval_metrics
from ..prompts import SYSTEM_PROMPT, chat_prompt
from ..rollout import eos_token_ids, generate, left_pad, pack_rollouts, pad_rows
from . import build_once, default_cache_dir

# -----------------------------------------------------------------------------
# Corpus: topics, keywords, templates

# domain -> topic -> its 15 keywords, space-separated. Every keyword is one lowercase word, unique across
# topics, and never used by a template or as a topic name.
DOMAINS: dict[str, dict[str, str]] = {
    "food": {
        "baking": "flour oven dough yeast butter sugar pastry crust muffin loaf whisk icing biscuit batter croissant",
        "grilling": "charcoal brisket skewer smoke marinade burger ribs steak tongs embers sausage barbecue kebab rub grill",
        "coffee": "espresso latte beans roast grinder barista crema mocha arabica kettle filter cappuccino brew mug decaf",
        "soup": "broth noodle ladle stock lentil chowder ramen onion celery carrot barley dumpling bouillon gazpacho minestrone",
    },
    "sports": {
        "football": "goal striker referee penalty midfield goalkeeper pitch offside corner tackle league jersey stadium winger dribble",
        "tennis": "racket serve volley baseline deuce backhand forehand lob net court ace tiebreak umpire wimbledon smash",
        "swimming": "pool freestyle goggles lane butterfly breaststroke backstroke lap diving wetsuit chlorine kickboard relay flipturn swimcap",
        "cycling": "bicycle pedal helmet gears saddle chain peloton spokes tire sprint handlebar derailleur brakes crank velodrome",
    },
    "music": {
        "guitar": "strings chord fret plectrum amplifier riff capo acoustic tuning strum bridge pickup solo headstock distortion",
        "piano": "sustain octave scales sonata hammers grand upright etude chopin keyboard metronome sheet recital arpeggio nocturne",
        "drums": "snare cymbal kick drumstick hihat tom groove beat fill rimshot drummer tempo kit percussion bassdrum",
        "singing": "vocals choir soprano tenor harmony melody lyrics microphone breath falsetto karaoke chorus alto opera vibrato",
    },
    "science": {
        "astronomy": "telescope galaxy planet comet nebula orbit asteroid eclipse meteor constellation supernova observatory lunar cosmos quasar",
        "chemistry": "molecule acid beaker reaction catalyst electron solvent titration bond ion compound isotope flask polymer oxidation",
        "biology": "cell gene protein bacteria organism dna mitosis enzyme species evolution microscope tissue virus fungus chromosome",
        "geology": "rock mineral fossil volcano magma quartz granite sediment erosion earthquake crystal lava canyon tectonic basalt",
    },
    "travel": {
        "camping": "tent campfire backpack lantern trail hiking compass firewood canteen hammock tarp stove boots cabin sleepingbag",
        "beach": "sand surf sunscreen towel waves shells parasol coast tide snorkel pier lifeguard seaside sandals boardwalk",
        "city": "museum subway skyline hotel taxi downtown plaza cafe tram gallery nightlife market avenue landmark rooftop",
        "skiing": "slope snow chairlift poles chalet powder snowboard avalanche parka mittens gondola piste alpine glacier moguls",
    },
    "tech": {
        "programming": "python compiler function variable loop debugger syntax library array recursion pointer bug script lambda refactor",
        "networking": "router packet firewall ethernet wifi bandwidth latency modem protocol switch cable dns proxy ping subnet",
        "gaming": "console controller joystick level boss quest multiplayer arcade pixel respawn loot avatar speedrun dungeon headset",
        "phones": "smartphone battery charger screen camera app touchscreen bluetooth headphones ringtone selfie notification sim tablet android",
    },
}

# Queries take three true-topic keywords {a} {b} {c}, in this order.
QUERY_TEMPLATES = [
    "how do i choose {a} and {b} for {c}",
    "best way to combine {a} with {b} and {c}?",
    "question about {a}, {b} and {c}",
    "any tips on {a} plus {b} when using {c}",
    "what {a} goes with {b} and {c}",
    "need advice on {a}, {b}, {c}",
    "is {a} better with {b} or with {c}",
    "looking for {a} and {b} ideas with {c}",
]
# Documents (positives and negatives) take four true-topic keywords {a} {b} {c} {d}, in this order.
DOC_TEMPLATES = [
    "a short guide to {a} and {b}: start with {c}, then add {d}.",
    "{a} works best with {b}; keep some {c} and {d} nearby.",
    "notes on {a}: pair it with {b}, and use {c} or {d} as needed.",
    "people who love {a} and {b} often talk about {c} and {d}.",
    "here is how {a} and {b} fit together with {c} and {d}.",
    "start from {a}, mix in {b}, finish with {c} and a little {d}.",
    "everything about {a} and {b}, from {c} to {d}.",
    "the basics of {a}: {b} first, then {c}, then {d}.",
]
# The passing mention of two side-topic keywords {s} {t}: a trailing clause. Its marker words
# ("also", "unlike", ...) appear nowhere else.
SIDE_CLAUSES = [" (see also {s}, {t})", ", unlike {s} or {t} fans", " - nothing like {s} and {t}",
                ", though my friend prefers {s} and {t}", ", besides {s} and {t}"]

RATIONALE_KEYWORDS = 3  # keywords per rationale
SIDE_TOPIC_PROB = 0.67  # SFT: probability that a rationale names the side topic instead of the true one


@dataclass
class BuiltinCorpus:
    train: list[dict]  # {"query", "positive", "negative", "topic", "negative_topic"}
    heldout: list[dict]  # same keys, texts built from keyword pairs never used in train
    topics: list[str]
    topic_keywords: dict[str, list[str]]
    domains: dict[str, list[str]] = field(default_factory=dict)  # domain -> its topics
    text_topic: dict[str, str] = field(default_factory=dict)  # text -> its true topic
    side_topic: dict[str, str] = field(default_factory=dict)  # text -> the topic it mentions in passing

    def texts(self, split: str = "train") -> list[str]:
        """Every distinct text of a split (queries, positives, negatives), for unsupervised mode."""
        rows = {"train": self.train, "heldout": self.heldout}[split]
        return list(dict.fromkeys(t for r in rows for t in (r["query"], r["positive"], r["negative"])))


def _fill(template: str, keywords: list[str], side_keywords: list[str], rng: random.Random) -> str:
    """A template filled with true-topic keywords, then the side mention."""
    text = template.format(**dict(zip("abcd", keywords))).rstrip(".?")
    return text + rng.choice(SIDE_CLAUSES).format(s=side_keywords[0], t=side_keywords[1])


def builtin_corpus(seed: int = 0, n_train: int = 2000, n_heldout: int = 200) -> BuiltinCorpus:
    """The synthetic corpus: deterministic in `seed`, train and held-out texts disjoint."""
    rng = random.Random(seed)
    topic_keywords = {t: kws.split() for d in DOMAINS.values() for t, kws in d.items()}
    topics = list(topic_keywords)
    domain_of = {t: d for d, ts in DOMAINS.items() for t in ts}
    all_keywords = [k for kws in topic_keywords.values() for k in kws]
    assert len(all_keywords) == len(set(all_keywords)), "keywords must be unique across topics"

    # Each topic's keyword pairs, split into held-out and train pairs: held-out texts are new
    # keyword combinations, never seen in training.
    heldout_pairs, train_pairs = {}, {}
    for t in topics:
        pairs = list(combinations(topic_keywords[t], 2))
        rng.shuffle(pairs)
        n_held = math.ceil(1.5 * n_heldout / len(topics))
        heldout_pairs[t], train_pairs[t] = pairs[:n_held], pairs[n_held:]

    text_topic, side_topic = {}, {}

    def make_text(templates: list[str], topic: str, first_two: tuple[str, str], n_keywords: int) -> str:
        """A text of `topic`: `first_two`, then other keywords of the topic, then a side mention."""
        rest = rng.sample([k for k in topic_keywords[topic] if k not in first_two], n_keywords - 2)
        side = rng.choice([s for s in topics if s != topic])
        text = _fill(rng.choice(templates), [*first_two, *rest], rng.sample(topic_keywords[side], 2), rng)
        text_topic[text], side_topic[text] = topic, side
        return text

    def make_triple(pairs: dict[str, list]) -> dict:
        topic = rng.choice(topics)
        negative_topic = rng.choice([s for s in DOMAINS[domain_of[topic]] if s != topic])
        # Query and positive share a keyword pair, in the same order: the two "specific" keywords.
        shared = tuple(rng.sample(rng.choice(pairs[topic]), 2))
        query = make_text(QUERY_TEMPLATES, topic, shared, 3)
        positive = make_text(DOC_TEMPLATES, topic, shared, 4)
        negative_pair = tuple(rng.sample(rng.choice(pairs[negative_topic]), 2))
        negative = make_text(DOC_TEMPLATES, negative_topic, negative_pair, 4)
        return dict(query=query, positive=positive, negative=negative, topic=topic, negative_topic=negative_topic)

    train = [make_triple(train_pairs) for _ in range(n_train)]
    train_texts = {t for r in train for t in (r["query"], r["positive"], r["negative"])}
    heldout = []
    while len(heldout) < n_heldout:
        row = make_triple(heldout_pairs)
        if not any(t in train_texts for t in (row["query"], row["positive"], row["negative"])):
            heldout.append(row)
    domains = {d: list(ts) for d, ts in DOMAINS.items()}
    return BuiltinCorpus(train, heldout, topics, topic_keywords, domains, text_topic, side_topic)


def _word_topics(corpus: BuiltinCorpus) -> dict[str, str]:
    """word -> topic, for every keyword and every topic name."""
    return {w: t for t, kws in corpus.topic_keywords.items() for w in [t, *kws]}


def rationale_for(text: str, topic: str, corpus: BuiltinCorpus, rng: random.Random | None = None) -> str:
    """A rationale naming `topic` for `text`: the topic's name, then the text's keywords of that
    topic (at most three; in the text's order, or shuffled if `rng` is given).

    e.g. "<think> baking flour oven dough</think>" (true topic), "<think> astronomy comet orbit</think>"
    (side topic, from "..., unlike comet or orbit fans")."""
    keywords = corpus.topic_keywords[topic]
    named = list(dict.fromkeys(w for w in re.findall(r"[a-z]+", text) if w in keywords))
    if rng is not None:
        rng.shuffle(named)
    return "<think> " + " ".join([topic, *named[:RATIONALE_KEYWORDS]]) + "</think>"


def rationale_topic(rationale: str, corpus: BuiltinCorpus) -> str | None:
    """The topic a rationale names most (topic names and keywords; first named wins ties), or None."""
    word_topic = _word_topics(corpus)
    named = [word_topic[w] for w in re.findall(r"[a-z]+", rationale.lower()) if w in word_topic]
    if not named:
        return None
    return max(dict.fromkeys(named), key=named.count)  # dict.fromkeys keeps first-named order for ties


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE with ChatML special tokens

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_TOKENS = ["<think>", "</think>"]  # ordinary (decoded) tokens, one id each

# Qwen2's ChatML template, without the default system prompt Qwen2 injects.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(corpus: BuiltinCorpus, vocab_size: int):
    """Train a byte-level BPE on the corpus and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    keywords = " ".join(w for t, kws in corpus.topic_keywords.items() for w in [t, *kws])
    # The system prompt and the keywords are repeated so that BPE gives each of their words one id.
    lines = [SYSTEM_PROMPT, keywords, "system\nuser\nassistant"] * 200 + corpus.texts("train")
    lines = [re.sub("</?think>", " ", line) for line in lines]  # <think> tags get their own ids below
    bpe.train_from_iterator(lines, trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


# -----------------------------------------------------------------------------
# Model and SFT


@dataclass(frozen=True)
class TinySettings:
    """Everything the built model depends on: its hash names the cache folder."""
    corpus_seed: int = 0
    vocab_size: int = 1536  # enough merges for every keyword and prompt word to be one token
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 512
    side_topic_prob: float = SIDE_TOPIC_PROB
    sft_steps: int = 1200  # 32 x 1200 = ~6 passes over the 6,000 train texts
    batch_size: int = 32
    lr: float = 5e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps({**asdict(self), "system_prompt": SYSTEM_PROMPT, "version": CACHE_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


CACHE_VERSION = 2  # bump when the corpus or the build changes in a way TinySettings does not show


def build_model(tokenizer, settings: TinySettings):
    """A randomly initialized tiny Qwen2 causal LM (tied embeddings) sized for `tokenizer`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    eos_id, pad_id = tokenizer.convert_tokens_to_ids([IM_END, PAD_TOKEN])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(settings.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    return model


def sft(model, tokenizer, corpus: BuiltinCorpus, settings: TinySettings, progress: bool = True) -> list[float]:
    """Teach the chat format and the side/true rationale habit; loss on the assistant's tokens only.

    Every step draws, per text, which topic the rationale names (the side topic with probability
    `side_topic_prob`) and the order of the text's keywords in it."""
    from tqdm.auto import tqdm

    texts = corpus.texts("train")
    prompts = [chat_prompt(tokenizer, text, max_prompt_len=settings.max_positions).ids for text in texts]
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        progress_frac = (step - settings.warmup_steps) / max(1, settings.sft_steps - settings.warmup_steps)
        return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))

    model.train()
    order: list[int] = []
    losses = []
    bar = tqdm(range(settings.sft_steps), desc="sft", disable=not progress, leave=False)
    for step in bar:
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(texts)), len(texts))  # a fresh epoch
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        sequences, replies = [], []
        for i in batch:
            side = rng.random() < settings.side_topic_prob
            topic = (corpus.side_topic if side else corpus.text_topic)[texts[i]]
            reply = tokenizer(rationale_for(texts[i], topic, corpus, rng), add_special_tokens=False).input_ids
            replies.append(reply + [tokenizer.eos_token_id])
            sequences.append(prompts[i] + replies[-1])
        input_ids, attention_mask = pad_rows(sequences, tokenizer.pad_token_id, left=False)  # [B, T]
        labels = torch.full_like(input_ids, -100)  # [B, T], -100 outside the assistant's reply
        for row, (seq, reply) in enumerate(zip(sequences, replies)):
            labels[row, len(seq) - len(reply) : len(seq)] = torch.tensor(reply)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        # Logits only where there is a target (the reply): full [B, T, V] logits would cost ~1/3 of the step.
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        targets = labels[:, 1:]  # [B, T-1], token t+1 is predicted at position t
        has_target = targets != -100
        logits = model.lm_head(hidden[:, :-1][has_target])  # [n_targets, V]
        loss = torch.nn.functional.cross_entropy(logits, targets[has_target])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


# -----------------------------------------------------------------------------
# Building, shipping and loading


def idle_cores() -> int:
    """Cores not already busy (by the 1-minute load average), at least 1. Two torch threads on one
    busy core run several times slower than one thread, so a shared machine gets fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def build_tiny(out_dir: str, settings: TinySettings, progress: bool = True) -> dict:
    """Build the tokenizer and the SFT'd model into `out_dir`; returns the build record."""
    started = time.perf_counter()
    threads, build_threads = torch.get_num_threads(), idle_cores()
    torch.set_num_threads(build_threads)
    try:
        corpus = builtin_corpus(settings.corpus_seed)
        tokenizer = build_tokenizer(corpus, settings.vocab_size)
        model = build_model(tokenizer, settings)
        sft_started = time.perf_counter()
        losses = sft(model, tokenizer, corpus, settings, progress=progress)
        sft_seconds = time.perf_counter() - sft_started
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "settings": asdict(settings),
        "settings_digest": settings.digest(),
        "params": sum(p.numel() for p in model.parameters()),
        "built_with": {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "threads": build_threads},
        "sft_seconds": round(sft_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
        "sft_loss_first": round(sum(losses[:20]) / max(1, len(losses[:20])), 4),
        "sft_loss_last": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "sha256": file_hashes(out_dir),
    }
    with open(os.path.join(out_dir, BUILD_RECORD), "w") as f:
        json.dump(record, f, indent=2)
    return record


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
BUILD_RECORD = "minigrace_build.json"
REBUILD = "python -m minigrace.worlds.builtin --rebuild"


def file_hashes(folder: str) -> dict[str, str]:
    """sha256 of every file in `folder` but the build record, by name."""
    hashes = {}
    for name in sorted(os.listdir(folder)):
        if name != BUILD_RECORD and os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name), "rb") as f:
                hashes[name] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def check_built(folder: str, settings: TinySettings) -> None:
    """Refuse a built model whose files or settings are not the ones its record names (one line each)."""
    path = os.path.join(folder, BUILD_RECORD)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {BUILD_RECORD}: restore it (git checkout {folder}) or run {REBUILD}")
    with open(path) as f:
        record = json.load(f)
    if record["settings_digest"] != settings.digest():
        raise RuntimeError(f"the tiny model in {folder} was built with other settings than TinySettings() "
                           f"(digest {record['settings_digest']} != {settings.digest()}): run {REBUILD} and commit it")
    changed = sorted(n for n, h in file_hashes(folder).items() if record["sha256"].get(n) != h)
    missing = sorted(set(record["sha256"]) - set(os.listdir(folder)))
    if changed or missing:
        raise RuntimeError(f"the tiny model in {folder} differs from its record (changed: {changed}, missing: "
                           f"{missing}): restore it (git checkout {folder}) or run {REBUILD}")


def rebuild(target_dir: str = SHIPPED_DIR, settings: TinySettings | None = None, progress: bool = True) -> dict:
    """Build the tiny model and replace `target_dir`'s files with it (the shipped model by default)."""
    settings = settings or TinySettings()
    parent = os.path.dirname(os.path.abspath(target_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(target_dir) + ".tmp-", dir=parent)
    try:
        record = build_tiny(tmp_dir, settings, progress=progress)
        shutil.rmtree(target_dir, ignore_errors=True)
        os.rename(tmp_dir, target_dir)
        os.chmod(target_dir, 0o755)  # mkdtemp made it private
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a no-op once renamed
    return record


def tiny_path(cache_dir: str | None = None, settings: TinySettings | None = None) -> str:
    """The shipped model's folder for the default settings; a cache folder named by their hash for others."""
    settings = settings or TinySettings()
    if cache_dir is None and settings == TinySettings():
        return SHIPPED_DIR
    return os.path.join(cache_dir or default_cache_dir(), f"tiny-v{CACHE_VERSION}-{settings.digest()}")


def tiny_dir(cache_dir: str | None = None, settings: TinySettings | None = None) -> str:
    """The folder of the built-in tiny model: the shipped one, checked against its record; other settings
    (tests, experiments) are built on first use into the cache."""
    settings = settings or TinySettings()
    path = tiny_path(cache_dir, settings)
    if path == SHIPPED_DIR:
        check_built(path, settings)
        return path
    return build_once(path, lambda tmp_dir: build_tiny(tmp_dir, settings), "building a tiny model with custom settings")


def load_tiny(cache_dir: str | None = None, settings: TinySettings | None = None):
    """The built-in tiny model (fp32, CPU, eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_dir(cache_dir, settings)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# Held-out task data for the built-in mteb tasks (eval.builtin_tasks), graded from the corpus structure


def text_keywords(text: str, topic: str, corpus) -> set[str]:
    """The keywords of `topic` that `text` mentions."""
    return set(re.findall(r"[a-z]+", text)) & set(corpus.topic_keywords[topic])


def graded_similarity(a: str, b: str, corpus) -> int:
    """0-5 from the corpus structure: 0 other domain, 1 sibling topic (same domain), 3 same topic,
    +1 per keyword of that topic the two texts share (at most 5)."""
    ta, tb = corpus.text_topic[a], corpus.text_topic[b]
    if ta == tb:
        return min(5, 3 + len(text_keywords(a, ta, corpus) & text_keywords(b, tb, corpus)))
    domain_of = {t: d for d, ts in corpus.domains.items() for t in ts}
    return 1 if domain_of[ta] == domain_of[tb] else 0


def builtin_retrieval_data(corpus, n_queries: int = 60) -> tuple[list[str], list[str], list[int]]:
    """(queries, documents, index of each query's positive): held-out queries against their positives
    and hard negatives (sibling topic)."""
    rows = corpus.heldout[:n_queries]
    docs = list(dict.fromkeys([r["positive"] for r in rows] + [r["negative"] for r in rows]))
    index = {d: i for i, d in enumerate(docs)}
    return [r["query"] for r in rows], docs, [index[r["positive"]] for r in rows]


def builtin_sts_pairs(corpus, n_pairs: int = 100, seed: int = 0) -> list[tuple[str, str, int]]:
    """(text1, text2, score) pairs, a quarter of each kind: query + its positive, two texts of one
    topic, query + its sibling-topic negative, two texts of different domains. Scores by graded_similarity."""
    rng = random.Random(seed)
    rows = corpus.heldout
    texts = corpus.texts("heldout")
    by_topic: dict[str, list[str]] = {}
    for t in texts:
        by_topic.setdefault(corpus.text_topic[t], []).append(t)
    domain_of = {t: d for d, ts in corpus.domains.items() for t in ts}
    pairs, quarter = [], n_pairs // 4
    for r in rng.sample(rows, quarter):
        pairs.append((r["query"], r["positive"]))
    for _ in range(quarter):
        topic = rng.choice([t for t, ts in by_topic.items() if len(ts) > 1])
        pairs.append(tuple(rng.sample(by_topic[topic], 2)))
    for r in rng.sample(rows, quarter):
        pairs.append((r["query"], r["negative"]))
    while len(pairs) < n_pairs:
        a, b = rng.sample(texts, 2)
        if domain_of[corpus.text_topic[a]] != domain_of[corpus.text_topic[b]]:
            pairs.append((a, b))
    return [(a, b, graded_similarity(a, b, corpus)) for a, b in pairs]


def builtin_clustering_data(corpus, per_topic: int = 6) -> tuple[list[str], list[str]]:
    """(documents, topic labels): `per_topic` held-out documents of every topic."""
    docs, labels, count = [], [], {}
    for r in corpus.heldout:
        for text in (r["positive"], r["negative"]):
            topic = corpus.text_topic[text]
            if count.get(topic, 0) < per_topic and text not in docs:
                docs.append(text)
                labels.append(topic)
                count[topic] = count.get(topic, 0) + 1
    return docs, labels


# -----------------------------------------------------------------------------
# Diagnostics: the designed flaw, measured (`python -m minigrace.builtin`)


@torch.no_grad()
def write_rationales(model, tokenizer, texts: list[str], temperature: float = 0.0, max_new_tokens: int = 16,
                     seed: int = 0, batch_size: int = 64) -> list[list[int]]:
    """Rationale token ids per text (EOS included), greedy (temperature 0) or sampled: the trainer's generation."""
    prompts = [chat_prompt(tokenizer, t, max_prompt_len=512) for t in texts]
    generator = torch.Generator().manual_seed(seed)
    rationales = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        rollouts = generate(model, batch, torch.full((len(batch),), temperature), max_new_tokens=max_new_tokens,
                            eos_ids=eos_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id, generator=generator)
        rationales += rollouts.responses()
    return rationales


def embed_with_rationales(model, tokenizer, texts: list[str], rationales: list[list[int]]) -> torch.Tensor:
    """GRACE embeddings [N, H] of each text followed by the given rationale ids (the training rule)."""
    prompts = [chat_prompt(tokenizer, t, max_prompt_len=512) for t in texts]
    ids, attention, pool_start = left_pad(prompts, tokenizer.pad_token_id, model.device)  # [N, P]
    response, alive = pad_rows(rationales, tokenizer.pad_token_id, left=False)  # [N, R]
    rollouts = pack_rollouts(prompts, ids, attention, pool_start, response.to(model.device),
                             alive.bool().to(model.device), torch.zeros(len(texts), dtype=torch.bool))
    return forward_rollouts(model, rollouts, max_tokens_per_microbatch=16384, with_logprobs=False).embeddings


def retrieval_scores(rows: list[dict], embedding_of: dict[str, torch.Tensor]) -> dict[str, float]:
    """Query → positive retrieval among all positives and negatives of `rows` (recall@1, MRR@10, nDCG@10)."""
    documents = list(dict.fromkeys([r["positive"] for r in rows] + [r["negative"] for r in rows]))
    queries = torch.stack([embedding_of[r["query"]] for r in rows])  # [Q, H]
    relevant = torch.tensor([documents.index(r["positive"]) for r in rows])  # [Q]
    return retrieval_metrics(queries, torch.stack([embedding_of[d] for d in documents]), relevant)


def measure_flaw(model, tokenizer, corpus: BuiltinCorpus, n_sampled_texts: int = 200, group: int = 8) -> dict:
    """On held-out texts: which topic greedy and sampled (T=1) rationales name, and query->positive
    retrieval with every rationale forced to the true topic, to the side topic, or left greedy."""
    texts = corpus.texts("heldout")

    def named_topics(replies: list[list[int]]) -> list[str | None]:
        return [rationale_topic(tokenizer.decode(r, skip_special_tokens=True), corpus) for r in replies]

    def rate(named: list, texts: list[str], topic_of: dict[str, str]) -> list[bool]:
        return [n == topic_of[t] for n, t in zip(named, texts)]

    greedy = write_rationales(model, tokenizer, texts)
    greedy_named = named_topics(greedy)
    sampled_texts = [t for t in texts[:n_sampled_texts] for _ in range(group)]  # groups of `group` samples
    sampled_named = named_topics(write_rationales(model, tokenizer, sampled_texts, temperature=1.0))
    sampled_true = rate(sampled_named, sampled_texts, corpus.text_topic)
    sampled_side = rate(sampled_named, sampled_texts, corpus.side_topic)
    groups = range(0, len(sampled_texts), group)
    mean = lambda flags: sum(flags) / len(flags)  # noqa: E731
    result = {
        "greedy_side": mean(rate(greedy_named, texts, corpus.side_topic)),
        "greedy_true": mean(rate(greedy_named, texts, corpus.text_topic)),
        "sampled_true": mean(sampled_true),
        "sampled_side": mean(sampled_side),
        "groups_with_both": mean([any(sampled_true[g : g + group]) and any(sampled_side[g : g + group])
                                  for g in groups]),
    }

    def forced(topic_of: dict[str, str]) -> list[list[int]]:
        return [tokenizer(rationale_for(t, topic_of[t], corpus), add_special_tokens=False).input_ids
                + [tokenizer.eos_token_id] for t in texts]

    for kind, replies in [("true", forced(corpus.text_topic)), ("side", forced(corpus.side_topic)), ("greedy", greedy)]:
        embedding_of = dict(zip(texts, embed_with_rationales(model, tokenizer, texts, replies)))
        for name, value in retrieval_scores(corpus.heldout, embedding_of).items():
            result[f"{name}_{kind}"] = value
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m minigrace.worlds.builtin",
                                     description="Measure the shipped tiny model's designed flaw, or rebuild it.")
    parser.add_argument("--rebuild", action="store_true",
                        help=f"build the tiny model from TinySettings into {SHIPPED_DIR} (then commit that folder)")
    args = parser.parse_args(argv)
    if args.rebuild:
        record = rebuild()
        print(f"built {SHIPPED_DIR} in {record['build_seconds']} s ({record['built_with']}), "
              f"SFT loss {record['sft_loss_first']} -> {record['sft_loss_last']}, "
              f"model.safetensors sha256 {record['sha256']['model.safetensors']}")
        return
    started = time.perf_counter()
    model, tokenizer = load_tiny()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny model: {n_params:,} parameters, ready in {time.perf_counter() - started:.1f} s")
    for name, value in measure_flaw(model, tokenizer, builtin_corpus()).items():
        print(f"{name:>20s} {value:.3f}")


if __name__ == "__main__":
    main()
