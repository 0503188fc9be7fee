"""The offline default: a synthetic contrastive corpus and a tiny chat LM pre-trained on it.

`python train.py` with no arguments needs a model and data that exist without any download, and an
RL problem with something real to learn. Both are built here, deterministically:

Corpus. 6 domains x 4 topics, each topic with 15 plain-English keywords. Every text is a template
filled with keywords of its *true* topic, plus one clause that mentions, in passing, a keyword of a
random other *side* topic ("..., unlike the comet crowd"). A query and its positive share the
true topic and two specific keywords; the hard negative comes from a sibling topic of the same
domain. Held-out triples use keyword pairs never used in training, so their texts are new.

Tiny model. A byte-level BPE tokenizer with a ChatML template and a 4-layer Qwen2 causal LM, trained
(SFT) to answer every text with a short rationale `<think> kw kw kw</think><|im_end|>`. The rationale
names the side topic with probability 0.6 (the side keyword, then two keywords of its topic) and
the true topic with probability 0.4 (the first three true-topic keywords of the text). So:

  - greedy decoding names the side topic: the pre-trained model is a wrong-headed rationale writer;
  - sampling at temperature 1 names the true topic ~40% of the time, so a group of 8 samples
    usually contains both kinds;
  - true-topic rationales pull a document's embedding toward its query's (they share keywords and
    topic) while side-topic rationales pull it toward an unrelated topic. A contrastive reward on
    embeddings alone can see the difference, and RL can flip the greedy choice.

The model is built once (~1 minute on 2 cores) and cached on disk; `load_tiny` returns it.
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

from minigrace.prompts import SYSTEM_PROMPT, chat_prompt

# -----------------------------------------------------------------------------
# Corpus: topics, keywords, templates

# domain -> topic -> 15 keywords. Every keyword is a single lowercase word, unique across topics,
# and never used by a template.
DOMAINS: dict[str, dict[str, list[str]]] = {
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
# The passing mention of two side-topic keywords {s} {t}: a prefix or a suffix of the text. Its
# marker words ("besides", "unlike", ...) appear nowhere else.
SIDE_PREFIXES = ["besides {s} and {t}, ", "forget {s} or {t} for now: ", "unlike {s} and {t} folks, "]
SIDE_SUFFIXES = [" (see also {s}, {t})", ", unlike {s} or {t} fans", " - nothing like {s} and {t}", ", though my friend prefers {s} and {t}"]

RATIONALE_KEYWORDS = 3  # keywords per rationale
SIDE_TOPIC_PROB = 0.65  # SFT: probability that a rationale names the side topic instead of the true one


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
    """A template filled with true-topic keywords, with the side mention as a prefix or a suffix."""
    text = template.format(**dict(zip("abcd", keywords)))
    s, t = side_keywords
    if rng.random() < 0.3:
        return rng.choice(SIDE_PREFIXES).format(s=s, t=t) + text
    return text.rstrip(".?") + rng.choice(SIDE_SUFFIXES).format(s=s, t=t)


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
    vocab_size: int = 1536
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 512
    side_topic_prob: float = SIDE_TOPIC_PROB
    sft_steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps({**asdict(self), "system_prompt": SYSTEM_PROMPT, "version": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


CACHE_VERSION = 1
BUILD_SECONDS_ESTIMATE = 90


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
    `side_topic_prob`) and which three of its keywords it lists."""
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
    for step in tqdm(range(settings.sft_steps), desc="sft", disable=not progress, leave=False):
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(texts)), len(texts))  # a fresh epoch
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        sequences, n_prompt = [], []
        for i in batch:
            side = rng.random() < settings.side_topic_prob
            topic = (corpus.side_topic if side else corpus.text_topic)[texts[i]]
            reply = tokenizer(rationale_for(texts[i], topic, corpus, rng), add_special_tokens=False)["input_ids"]
            sequences.append(prompts[i] + reply + [tokenizer.eos_token_id])
            n_prompt.append(len(prompts[i]))
        width = max(map(len, sequences))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)  # [B, T], right-padded
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        labels = torch.full((len(batch), width), -100)  # [B, T], -100 outside the assistant's reply
        for row, (seq, n) in enumerate(zip(sequences, n_prompt)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
            labels[row, n : len(seq)] = torch.tensor(seq[n:])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


# -----------------------------------------------------------------------------
# Cache: build once into a temporary sibling folder, publish with one atomic rename


def default_cache_dir() -> str:
    return os.environ.get("MINIGRACE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minigrace")


def _publish(tmp_dir: str, final_dir: str) -> None:
    """Rename a finished build into place; if another builder got there first, keep theirs."""
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if not os.path.isdir(final_dir):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)


def build_tiny(out_dir: str, settings: TinySettings, progress: bool = True) -> dict:
    """Build the tokenizer and the SFT'd model into `out_dir`; returns the build record."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    try:
        corpus = builtin_corpus(settings.corpus_seed)
        tokenizer = build_tokenizer(corpus, settings.vocab_size)
        model = build_model(tokenizer, settings)
        losses = sft(model, tokenizer, corpus, settings, progress=progress)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "settings": asdict(settings),
        "params": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - started, 1),
        "sft_loss_first": round(sum(losses[:20]) / max(1, len(losses[:20])), 4),
        "sft_loss_last": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
    }
    with open(os.path.join(out_dir, "minigrace_build.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def tiny_path(cache_dir: str | None = None, settings: TinySettings | None = None) -> str:
    settings = settings or TinySettings()
    return os.path.join(cache_dir or default_cache_dir(), f"tiny-v{CACHE_VERSION}-{settings.digest()}")


def load_tiny(cache_dir: str | None = None, settings: TinySettings | None = None):
    """The built-in tiny model (fp32, CPU, eval mode) and its tokenizer, built on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = settings or TinySettings()
    path = tiny_path(cache_dir, settings)
    if not os.path.isdir(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"building the built-in tiny model (once, ~{BUILD_SECONDS_ESTIMATE} s) → {path}", flush=True)
        tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
        try:
            build_tiny(tmp_dir, settings)
            _publish(tmp_dir, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # a no-op once published
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# Diagnostics: the designed flaw, measured (`python -m minigrace.builtin`)


@torch.no_grad()
def generate_replies(model, tokenizer, texts: list[str], sample: bool = False, max_new_tokens: int = 16,
                     batch_size: int = 64) -> list[list[int]]:
    """Reply token ids per text, cut after the first EOS: greedy, or sampled at temperature 1."""
    replies = []
    for start in range(0, len(texts), batch_size):
        prompts = [chat_prompt(tokenizer, t, max_prompt_len=512).ids for t in texts[start : start + batch_size]]
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)  # [B, T], left-padded
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             **sampling)  # [B, T + new]
        for row in out[:, width:].tolist():
            replies.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return replies


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], replies: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    """GRACE embeddings [N, H]: L2-normalized mean of the last hidden states over the user text,
    the assistant header and the reply (everything after the system prompt)."""
    embeddings = []
    for start in range(0, len(texts), batch_size):
        prompts = [chat_prompt(tokenizer, t, max_prompt_len=512) for t in texts[start : start + batch_size]]
        sequences = [p.ids + r for p, r in zip(prompts, replies[start : start + batch_size])]
        width = max(map(len, sequences))
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)  # [B, T], right-padded
        pool_mask = torch.zeros((len(sequences), width))  # [B, T], 1 from pool_start to the reply's end
        for row, (p, seq) in enumerate(zip(prompts, sequences)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            pool_mask[row, p.pool_start : len(seq)] = 1
        attention_mask = (torch.arange(width) < torch.tensor([[len(s)] for s in sequences])).long()  # [B, T]
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
        pooled = (hidden * pool_mask[..., None]).sum(1) / pool_mask.sum(1, keepdim=True)  # [B, H]
        embeddings.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(embeddings)


def retrieval_scores(rows: list[dict], embedding_of: dict[str, torch.Tensor]) -> dict[str, float]:
    """Query -> positive retrieval over all positives and negatives of `rows`: nDCG@10 and recall@1."""
    documents = list(dict.fromkeys([r["positive"] for r in rows] + [r["negative"] for r in rows]))
    scores = torch.stack([embedding_of[r["query"]] for r in rows]) @ torch.stack(
        [embedding_of[d] for d in documents]).T  # [Q, D]
    positive_scores = scores[torch.arange(len(rows)), [documents.index(r["positive"]) for r in rows]]
    ranks = (scores > positive_scores[:, None]).sum(1) + 1  # [Q], 1 = retrieved first
    ndcg = torch.where(ranks <= 10, 1 / torch.log2(ranks.float() + 1), torch.zeros(())).mean()
    return {"ndcg@10": ndcg.item(), "recall@1": (ranks == 1).float().mean().item()}


def measure_flaw(model, tokenizer, corpus: BuiltinCorpus, n_sampled_texts: int = 200, group: int = 8) -> dict:
    """On held-out texts: which topic greedy and sampled rationales name, and retrieval quality when
    every rationale is forced to the true topic vs the side topic (and with greedy rationales)."""
    texts = corpus.texts("heldout")
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    greedy = generate_replies(model, tokenizer, texts)
    greedy_named = [rationale_topic(decode(r), corpus) for r in greedy]
    torch.manual_seed(0)
    sampled_texts = [t for t in texts[:n_sampled_texts] for _ in range(group)]
    sampled_named = [rationale_topic(decode(r), corpus) for r in generate_replies(model, tokenizer, sampled_texts, sample=True)]
    sampled_true = [n == corpus.text_topic[t] for n, t in zip(sampled_named, sampled_texts)]
    sampled_side = [n == corpus.side_topic[t] for n, t in zip(sampled_named, sampled_texts)]
    groups = range(0, len(sampled_texts), group)
    result = {
        "greedy_side": sum(n == corpus.side_topic[t] for n, t in zip(greedy_named, texts)) / len(texts),
        "greedy_true": sum(n == corpus.text_topic[t] for n, t in zip(greedy_named, texts)) / len(texts),
        "sampled_true": sum(sampled_true) / len(sampled_texts),
        "sampled_side": sum(sampled_side) / len(sampled_texts),
        "groups_with_both": sum(any(sampled_true[g : g + group]) and any(sampled_side[g : g + group]) for g in groups) / len(groups),
    }
    eos = [tokenizer.eos_token_id]
    forced = {
        "true": [tokenizer(rationale_for(t, corpus.text_topic[t], corpus), add_special_tokens=False)["input_ids"] + eos for t in texts],
        "side": [tokenizer(rationale_for(t, corpus.side_topic[t], corpus), add_special_tokens=False)["input_ids"] + eos for t in texts],
        "greedy": greedy,
    }
    for kind, replies in forced.items():
        embedding_of = dict(zip(texts, embed(model, tokenizer, texts, replies)))
        for name, value in retrieval_scores(corpus.heldout, embedding_of).items():
            result[f"{name}_{kind}"] = value
    return result


if __name__ == "__main__":
    started = time.perf_counter()
    model, tokenizer = load_tiny()
    print(f"loaded in {time.perf_counter() - started:.1f} s: {sum(p.numel() for p in model.parameters()):,} params")
    for name, value in measure_flaw(model, tokenizer, builtin_corpus()).items():
        print(f"{name:>20s} {value:.3f}")
