"""End-to-end `tokenize_corpus` throughput vs raw `encode_batch` of the same tokenizer and text.

Target (product owner): end-to-end ≥ 90% of raw. MB/s = UTF-8 bytes of the documents as read,
before cleaning, / wall seconds (1 MB = 10^6 bytes); the same numerator for every row. Variants:

- raw, tokenizers threads: `TextTokenizer.encode_batch` over the documents already in memory, in
  the pipeline's batches (per source, `batch_docs` each), TOKENIZERS_PARALLELISM=true;
- raw, W processes x 1 thread: the same batches encoded by a spawned pool whose workers already
  hold the text and run tokenizers single-threaded, as pipeline workers do; only batch indices go
  out and (tokens, CPU seconds) come back, so it is the pipeline's parallel design doing no other
  work, and it yields each batch's 1-thread encode CPU time;
- end-to-end `tokenize_corpus(DataConfig(sources=..., workers=W), tok, out)` for W = 1 (in-process,
  tokenizers threads) and W = cores (spawned workers), default cleaning and exact dedup; then
  W = cores with MinHash near-dedup, and with on_error="skip".

Runs take turns (round-robin, order rotated each round) so drifts of the shared VM hit every
variant alike; "other CPU" is the share of all CPUs used meanwhile by processes outside this
benchmark. Then a stage breakdown (manual timers, no profiler overhead) replays each step of the
pipeline with lmforge's own functions on the same documents and compares the sum with the W = 1
run; for W > 1 it adds pickling, pool start-up, and a schedule of the measured per-batch encode
times on the workers. It reaches into private parts of lmforge.data.tokenize (`_Workers`, `_Doc`,
`_batches`) on purpose: they are what a run uses.

    python benchmarks/data_throughput.py                 # ~12 MB real mix, ~3 min on 2 cores
    python benchmarks/data_throughput.py --max-mb 20     # ~20 MB, ~5 min
    python benchmarks/data_throughput.py --max-mb 3 --repeats 1 --cprofile   # quick look
    python benchmarks/data_throughput.py --tokenizer out/tokenizer.json
    PYTHONPATH=/dir/with/tiktoken python benchmarks/data_throughput.py --tiktoken
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gzip
import hashlib
import heapq
import itertools
import json
import logging
import os
import pickle
import pstats
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from cpu_meter import CpuMeter

from lmforge.data import tokenize as tokenize_mod
from lmforge.data.clean import clean
from lmforge.data.config import DataConfig
from lmforge.data.dedup import DedupConfig, Deduplicator, signature
from lmforge.data.shards import open_shard, write_shard
from lmforge.data.sources import SourceConfig, read_documents, resolve_files
from lmforge.data.tokenize import read_manifest, split_of, tokenize_corpus
from lmforge.data.tokenize_workers import ProcessedDoc, Workers, input_batches
from lmforge.data.tokenizer import TextTokenizer, TokenizerConfig, sample_sources, train_tokenizer

T = TypeVar("T")
CORES = os.cpu_count() or 1
CORPUS: tuple[tuple[str, str, str, float], ...] = (
    # (source name, group, path under --corpus-root, share of --max-mb)
    ("gutenberg", "english", "gutenberg_gitenberg", 0.05),  # 3 books, one .txt = one document
    ("wiki_demo", "english", "llamafactory_pretrain_demo/wiki_demo.txt", 0.05),  # one 1 MB doc
    ("c4_demo", "english", "llamafactory_pretrain_demo/c4_demo.jsonl", 0.04),
    ("wikitext2", "english", "wikitext2_pytorch_examples", 0.06),  # test/valid.txt, 1.2 MB each
    ("fortunes_en", "english", "fortunes_en/fortunes_en.jsonl.gz", 0.15),  # ~210 B documents
    ("shakespeare", "english", "tinyshakespeare/input.txt", 0.05),
    ("poetry_zh", "chinese", "chinese_poetry/chinese_poetry.jsonl.gz", 0.20),  # ~390 B docs
    ("fortunes_zh", "chinese", "fortunes_zh/fortunes_zh.jsonl.gz", 0.05),
    ("manpages_zh", "chinese", "manpages_zh_cn/manpages_zh_cn.jsonl.gz", 0.10),
    ("code", "code", "python311_stdlib_code/python311_stdlib.jsonl.gz", 0.25),
)
BUILTIN: tuple[tuple[str, str, str, float], ...] = (
    ("english", "english", "builtin:english", 0.40),  # pydoc topics hold only ~0.47 MB
    ("chinese", "chinese", "builtin:chinese", 0.35),
    ("code", "code", "builtin:code", 0.25),
)


# ---------------------------------------------------------------------------------------------
# data and tokenizer


@dataclass
class Corpus:
    sources: tuple[SourceConfig, ...]
    groups: dict[str, str]  # source name -> english | chinese | code
    docs: dict[str, list[str]]  # source name -> documents as read (before cleaning)
    origin: str

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for d in self.docs.values() for t in d)

    def batches(self, size: int) -> list[list[str]]:
        """The pipeline's batches: per source, in order, at most `size` documents and (past
        the first document) about 1 MB each, cut by the pipeline's own function."""
        cap = tokenize_mod._BATCH_BYTES
        return [list(map(str, b)) for d in self.docs.values() for b in input_batches(d, size, cap)]


def load_corpus(root: Path, max_mb: float) -> Corpus:
    """Read the real corpora under `root` (or the built-ins if it is missing) into memory."""
    table, origin = (CORPUS, str(root)) if root.is_dir() else (BUILTIN, "built-in corpora")
    if table is BUILTIN:
        print(f"{root}: not found; falling back to the built-in corpora", flush=True)
    sources, groups = [], {}
    for name, group, rel, share in table:
        path = rel if rel.startswith("builtin:") else str(root / rel)
        if not rel.startswith("builtin:") and not Path(path).exists():
            print(f"  skipping {name}: {path} not found", flush=True)
            continue
        sources.append(SourceConfig(name=name, path=path, max_bytes=int(share * max_mb * 1e6)))
        groups[name] = group
    docs = {s.name: list(read_documents(s)) for s in sources}
    return Corpus(tuple(sources), groups, docs, origin)


def get_tokenizer(args: argparse.Namespace, corpus: Corpus) -> tuple[TextTokenizer, str]:
    if args.tokenizer:
        return TextTokenizer.load(args.tokenizer), f"loaded {args.tokenizer}"
    streams: dict[str, Iterator[str]] = {}
    for group in dict.fromkeys(corpus.groups.values()):
        names = [n for n, g in corpus.groups.items() if g == group]
        streams[group] = itertools.chain(*(corpus.docs[n] for n in names))
    max_bytes = int(args.train_mb * 1e6)
    sample = sample_sources(streams, dict.fromkeys(streams, 1.0), max_bytes)
    t0 = time.perf_counter()
    tok = train_tokenizer(sample, TokenizerConfig(vocab_size=args.vocab_size))
    took = time.perf_counter() - t0
    return tok, f"trained on {args.train_mb:g} MB (equal shares {list(streams)}) in {took:.1f} s"


# ---------------------------------------------------------------------------------------------
# CPU used by other processes (the VM is shared)


def wait_quiet(budget: list[float]) -> None:
    """Sleep (within the --quiet-wait budget) while other processes load the CPUs > 15%."""
    import psutil

    while budget[0] > 0:
        load = psutil.cpu_percent(interval=1.0)
        budget[0] -= 1.0
        if load < 15:
            return
        print(f"  (CPUs {load:.0f}% busy; waiting, {budget[0]:.0f} s of --quiet-wait left)")
        time.sleep(min(4.0, max(budget[0], 0.0)))
        budget[0] -= 4.0


# ---------------------------------------------------------------------------------------------
# variants: each call returns (wall seconds, tokens produced)


def raw_encode(tok: TextTokenizer, batches: list[list[str]]) -> tuple[float, int]:
    """encode_batch per batch, with tokenizers' own threads (main sets TOKENIZERS_PARALLELISM)."""
    t0 = time.perf_counter()
    tokens = sum(len(ids) for b in batches for ids in tok.encode_batch(b))
    return time.perf_counter() - t0, tokens


_raw: dict[str, Any] = {}


def _raw_init(tokenizer_json: str, batches: list[list[str]]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _raw.update(tok=TextTokenizer(Tokenizer.from_str(tokenizer_json)), batches=batches)


def _raw_batch(i: int) -> tuple[int, float]:
    """(tokens, CPU seconds) of encoding batch `i` in this worker, on one thread."""
    if i < 0:  # warm-up task: makes the pool start (and initialize) every worker
        time.sleep(0.3)
        return 0, 0.0
    tok, batches = _raw["tok"], _raw["batches"]
    t0 = time.process_time()
    tokens = sum(len(ids) for ids in tok.encode_batch(batches[i]))
    return tokens, time.process_time() - t0


class RawPool:
    """W spawned processes that hold the text already; a timed run only sends batch indices."""

    def __init__(self, tok: TextTokenizer, batches: list[list[str]], workers: int) -> None:
        self.n = len(batches)
        self.cpu: list[list[float]] = []  # per run: CPU seconds of each batch
        self.pool = ProcessPoolExecutor(
            workers,
            mp_context=get_context("spawn"),
            initializer=_raw_init,
            initargs=(tok.backend.to_str(), batches),
        )
        list(self.pool.map(_raw_batch, [-1] * 2 * workers))

    def run(self) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = list(self.pool.map(_raw_batch, range(self.n)))
        took = time.perf_counter() - t0
        self.cpu.append([c for _, c in out])
        return took, sum(n for n, _ in out)

    def batch_cpu(self) -> list[float]:
        """1-thread encode CPU seconds of each batch (median over runs)."""
        return [statistics.median(runs) for runs in zip(*self.cpu, strict=True)]

    def close(self) -> None:
        self.pool.shutdown()


def makespan(times: list[float], workers: int) -> float:
    """Wall time of running `times` in order, each on the worker that frees up first."""
    free = [0.0] * workers
    for t in times:
        heapq.heapreplace(free, free[0] + t)
    return max(free)


def end_to_end(cfg: DataConfig, tok: TextTokenizer, out: Path) -> tuple[float, int]:
    """One timed tokenize_corpus into `out` (emptied first, untimed; the output is kept)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = tokenize_corpus(cfg, tok, out)
    took = time.perf_counter() - t0
    return took, sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))


RAW = "raw, tokenizers threads"
E2E1 = "e2e W=1 (in-process, tokenizers threads)"


@dataclass
class Variant:
    name: str
    run: Callable[[], tuple[float, int]]
    repeats: int
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    other: list[float] = field(default_factory=list)
    steal: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(variants: list[Variant], quiet_wait: float) -> None:
    """Round-robin over the variants (order rotated each round) until each has its repeats."""
    meter, budget = CpuMeter(), [quiet_wait]
    rounds = max(v.repeats for v in variants)
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            if len(v.times) >= v.repeats:
                continue
            wait_quiet(budget)
            meter.start()
            took, v.tokens = v.run()
            other, steal, cpu = meter.stop()
            v.times.append(took)
            v.other.append(other)
            v.steal.append(steal)
            v.cpu.append(cpu)
            print(f"  round {r + 1}/{rounds}  {v.name:44s} {took:6.2f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# stage breakdown: the pipeline's steps replayed one at a time on the same documents


class Stopwatch:
    """Seconds per named step; `with sw("step"): ...` adds to that step."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0


def _raw_items(source: SourceConfig, n: int) -> list[tuple[bytes, bool]]:
    """The first `n` raw items of a file source: (bytes, is_jsonl), decompressed and split."""
    items: list[tuple[bytes, bool]] = []
    for path in resolve_files(source.path):
        if path.name.endswith(".txt"):
            items.append((path.read_bytes(), False))
        else:
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rb") as f:
                items += [(line, True) for line in itertools.islice(f, n - len(items))]
        if len(items) >= n:
            break
    return items


READ = "read: all (read_documents)"
READ_PARTS = ("read: file read + gunzip + line split", "read: UTF-8 decode + json.loads")
GLUE = "read: reader bookkeeping (checks, generators)"
ENC2 = "encode_batch, tokenizers threads (= raw)"


PICKLE_OUT = "pickle texts out + unpickle in worker"
PICKLE_BACK = "pickle results back + unpickle in parent"
SPAWN = "spawn + import + init of the worker pool"
WORKER_STEPS = (
    "clean (NFC, control chars)",
    "signature (blake2b, exact)",
    "split hash + UTF-8 length",
    "ids -> numpy uint32",
)
MAIN_STEPS = (
    READ,
    "dedup check (main process)",
    "write_shard",
    "sha256 of shards",
    "restart points (pickle dedup state)",
)


def stage_profile(
    corpus: Corpus,
    tok: TextTokenizer,
    cfg: DataConfig,
    encode_s: float,
    shards: Path,
    work: Path,
    workers: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per pipeline step over the whole corpus, in-process, one step at a time.

    `encode_s` = raw encode seconds (tokenizers threads), measured before; `shards` is the
    output of an end-to-end run, whose token ids feed the numpy and writing steps.
    Returns the steps of a W=1 run, and what W > 1 adds.
    """
    sw, extra = Stopwatch(), Stopwatch()
    with sw(READ):
        for src in corpus.sources:
            list(read_documents(src))
    if not any(src.path.startswith("builtin:") for src in corpus.sources):
        with sw(READ_PARTS[0]):
            items = [_raw_items(src, len(corpus.docs[src.name])) for src in corpus.sources]
        with sw(READ_PARTS[1]):
            for raw, is_jsonl in itertools.chain(*items):
                text = raw.decode("utf-8")
                if is_jsonl:
                    json.loads(text)
        sw.s[GLUE] = sw.s[READ] - sw.s[READ_PARTS[0]] - sw.s[READ_PARTS[1]]
    docs = [t for d in corpus.docs.values() for t in d]
    with sw("clean (NFC, control chars)"):
        cleaned = [clean(t, cfg.clean) for t in docs]
    kept = [text for text, reason in cleaned if reason is None]
    with sw("signature (blake2b, exact)"):
        sigs = [signature(text, cfg.dedup) for text in kept]
    with sw("split hash + UTF-8 length"):
        for text in kept:
            split_of(text, cfg.heldout_fraction), len(text.encode("utf-8"))
    sw.s[ENC2] = encode_s

    names = read_manifest(shards)["shards"]
    opened = [open_shard(shards / n) for n in names]
    lists = [[s.document(i).tolist() for i in range(s.num_docs)] for s in opened]
    with sw("ids -> numpy uint32"):
        arrays = [[np.asarray(ids, dtype=np.uint32) for ids in d] for d in lists]
    dedup = Deduplicator(cfg.dedup)
    with sw("dedup check (main process)"):
        for i, sig in enumerate(sigs):
            dedup.check(str(i), sig)
    out = work / "profile"
    out.mkdir(exist_ok=True)
    with sw("write_shard"):
        for name, shard, a in zip(names, opened, arrays, strict=True):
            write_shard(out / name, a, shard.doc_bytes.tolist(), tok.vocab_size, tok.sha256)
    with sw("sha256 of shards"):
        for name in names:
            h = hashlib.sha256()
            with open(out / name, "rb") as f:
                while chunk := f.read(1 << 20):  # as lmforge.data.tokenize._sha256 reads
                    h.update(chunk)
    with sw("restart points (pickle dedup state)"):
        for _ in corpus.sources[1:]:
            pickle.dumps(dedup)
    shutil.rmtree(out)

    batches = corpus.batches(cfg.batch_docs)
    with extra(PICKLE_OUT):
        for b in batches:
            pickle.loads(pickle.dumps(b))
    # What workers send back: a ProcessedDoc per document (here with the ids the run produced).
    ids = itertools.chain(*arrays)
    results = [ProcessedDoc(1, "train", None, g, a) for a, g in zip(ids, sigs, strict=False)]
    with extra(PICKLE_BACK):
        for r in _chunks(results, cfg.batch_docs):
            pickle.loads(pickle.dumps(r))
    pool = Workers(cfg.clean, cfg.dedup, cfg.heldout_fraction, workers, tok)
    with extra(SPAWN), pool as w:
        list(w.map([(0, ["warm up"])] * workers))
    return sw.s, extra.s


def _chunks(docs: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(docs), size):
        yield docs[i : i + size]


def cprofile_top(cfg: DataConfig, tok: TextTokenizer, work: Path, n: int = 25) -> None:
    prof = cProfile.Profile()
    prof.enable()
    tokenize_corpus(replace(cfg, workers=1), tok, work / "cprofile")
    prof.disable()
    shutil.rmtree(work / "cprofile")
    print("\ncProfile of tokenize_corpus(workers=1), top by own time (profiler inflates Python):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(n)


# ---------------------------------------------------------------------------------------------
# optional: the same BPE run by tiktoken


def _byte_of_char() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table that ByteLevel uses for token strings."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def tiktoken_compare(
    tok: TextTokenizer, batches: list[list[str]], repeats: int
) -> tuple[str, list[tuple[str, float, int]]]:
    """Encode the same batches with tiktoken built from our vocabulary and split pattern.

    Our BPE was trained with ids in merge order, so tiktoken's ranks are the ids themselves.
    Returns a note (version, agreement with tokenizers) and (name, median s, tokens) rows.
    """
    try:
        import tiktoken
    except ImportError:
        return "tiktoken: not installed (put it on PYTHONPATH to compare)", []
    from lmforge.data.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

    inv = _byte_of_char()
    vocab = tok.backend.get_vocab(with_added_tokens=False)
    ranks = {bytes(inv[c] for c in piece): i for piece, i in vocab.items()}
    specials = {t: tok.backend.token_to_id(t) for t in SPECIAL_TOKENS}
    enc = tiktoken.Encoding(
        "lmforge", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    sample = [t for b in batches[:: max(1, len(batches) // 40)] for t in b[:8]]
    same = sum(enc.encode_ordinary(t) == tok.encode(t) for t in sample)
    note = f"tiktoken {tiktoken.__version__}: identical ids on {same}/{len(sample)} sampled docs"
    rows = []
    for threads in (CORES, 1):
        times, tokens = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokens = sum(
                len(x) for b in batches for x in enc.encode_ordinary_batch(b, num_threads=threads)
            )
            times.append(time.perf_counter() - t0)
        rows.append((f"tiktoken, {threads} thread(s)", statistics.median(times), tokens))
    return note, rows


# ---------------------------------------------------------------------------------------------
# report


def report(variants: list[Variant], corpus: Corpus) -> None:
    nbytes = corpus.num_bytes
    raw = next(v for v in variants if v.name == RAW)
    raw_cpu = statistics.median(raw.cpu)
    head = ["variant", "s (median)", "s (min)", "MB/s", "tokens/s", "vs raw", "CPU s", "vs raw CPU"]
    print("\n| " + " | ".join([*head, "other CPU (steal)"]) + " |")
    print("|" + "---|" * (len(head) + 1))
    for v in variants:
        cpu = statistics.median(v.cpu)
        print(
            f"| {v.name} | {v.median:.2f} | {min(v.times):.2f} | {nbytes / v.median / 1e6:.2f} | "
            f"{v.tokens / v.median:,.0f} | {raw.median / v.median:.2f} | {cpu:.1f} | "
            f"{raw_cpu / cpu:.2f} | {100 * statistics.mean(v.other):.0f}% "
            f"({100 * statistics.mean(v.steal):.0f}%) |"
        )
    print(
        f"\nMB = 10^6 UTF-8 bytes of the documents as read ({nbytes / 1e6:.2f} MB, "
        f"{sum(map(len, corpus.docs.values())):,} docs); vs raw = raw (tokenizers threads) "
        "seconds / this row's seconds (target for e2e: ≥ 0.90); CPU s = CPU time of this "
        "benchmark's processes (workers included), steadier than wall time on a shared VM; "
        "other CPU = share of all CPUs used by other processes meanwhile (steal: taken by the "
        "hypervisor); medians of the repeats."
    )


def report_stages(
    stages: dict[str, float],
    extra: dict[str, float],
    e2e1: float,
    e2e_w: float,
    corpus: Corpus,
    workers: int,
    batch_cpu: list[float],
    batch_docs: int,
) -> None:
    """The step table (W=1 view), then what W > 1 adds and a best case for it."""
    parts = {*READ_PARTS, GLUE}
    total = sum(t for k, t in stages.items() if k not in parts)
    print("\n### Where the time goes (in-process, one step at a time, whole corpus)\n")
    print("| step | s | MB/s | share of e2e W=1 |")
    print("|---|---|---|---|")
    for k, t in stages.items():
        name = f"&nbsp;&nbsp;{k}" if k in parts else k
        mbs = f"{corpus.num_bytes / t / 1e6:.1f}" if t > 0 else "-"
        print(f"| {name} | {t:.2f} | {mbs} | {100 * t / e2e1:.0f}% |")
    print(
        f"| **sum of the steps (not indented)** | **{total:.2f}** | | "
        f"**{100 * total / e2e1:.0f}%** |"
    )
    print(f"| measured e2e W=1 (median) | {e2e1:.2f} | | 100% |")
    print(
        f"| difference (pipeline glue, noise) | {e2e1 - total:.2f} | | "
        f"{100 * (e2e1 - total) / e2e1:.0f}% |"
    )

    print(f"\n### What W={workers} adds (spawned workers, 1 thread each)\n")
    print("| step | s |\n|---|---|")
    for k, t in extra.items():
        print(f"| {k} | {t:.2f} |")
    encode1 = sum(batch_cpu)
    flowing = makespan(batch_cpu, workers)  # batches stream across sources, as the pipeline does
    half = (extra[PICKLE_OUT] + extra[PICKLE_BACK]) / 2  # dumps on one side, loads on the other
    parent = sum(stages[k] for k in MAIN_STEPS) + half
    worker = sum(stages[k] for k in WORKER_STEPS) + encode1 + half
    cores = min(workers, CORES)
    best = max(parent, (parent + worker) / cores, flowing) + extra[SPAWN]
    print(
        f"\n1-thread encode: {encode1:.2f} CPU s over {len(batch_cpu)} batches (largest "
        f"{max(batch_cpu):.2f} s). On {workers} workers: {flowing:.2f} s as scheduled."
        f"\nMain process {parent:.2f} s serial; workers {worker:.2f} CPU s in all; pool start "
        f"{extra[SPAWN]:.2f} s → best case {best:.2f} s on {cores} cores (measured {e2e_w:.2f} s)."
        f"\nEncode share of all CPU work: {encode1:.2f} / {parent + worker:.2f} = "
        f"{encode1 / (parent + worker):.2f}: the most e2e / raw can reach while CPU-bound."
    )


def report_tiktoken(
    tok: TextTokenizer,
    batches: list[list[str]],
    raw: Variant,
    cpu1: float,
    nbytes: int,
    repeats: int,
) -> None:
    print("\n### tiktoken on the same vocabulary, split pattern and batches\n")
    note, rows = tiktoken_compare(tok, batches, repeats)
    rows = [
        (f"tokenizers, {raw.name[5:]}", raw.median, raw.tokens),
        ("tokenizers, 1 thread (CPU s summed over batches)", cpu1, raw.tokens),
        *rows,
    ]
    print(f"{note}\n\n| backend | s (median) | MB/s | tokens |\n|---|---|---|---|")
    for name, sec, tokens in rows:
        print(f"| {name} | {sec:.2f} | {nbytes / sec / 1e6:.2f} | {tokens:,} |")


def describe(corpus: Corpus, tok: TextTokenizer, how: str, num_batches: int) -> None:
    import tokenizers

    docs = sum(map(len, corpus.docs.values()))
    print(
        f"{corpus.origin}: {corpus.num_bytes / 1e6:.2f} MB in {docs:,} docs, {num_batches} "
        f"batches; {CORES} CPUs; tokenizers {tokenizers.__version__}"
    )
    for s in corpus.sources:
        d = corpus.docs[s.name]
        b = sum(len(t.encode("utf-8")) for t in d)
        print(
            f"  {s.name:12s} {corpus.groups[s.name]:8s} {b / 1e6:6.2f} MB {len(d):7,} docs "
            f"(mean {b / len(d):,.0f} B)"
        )
    print(f"tokenizer: vocab {tok.vocab_size:,}, {how}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument(
        "--corpus-root",
        type=Path,
        default=repo.parent / "shared/data/corpus",
        help="folder of the real corpora; missing = built-in corpora",
    )
    ap.add_argument(
        "--max-mb",
        type=float,
        default=10.0,
        help="text to read, about (a .txt file is one document, read whole); 20 takes ~5 min",
    )
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of training")
    ap.add_argument("--vocab-size", type=int, default=32_000, help="vocab of the trained tokenizer")
    ap.add_argument("--train-mb", type=float, default=4.0, help="tokenizer training sample (MB)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs (median) of raw and e2e W=1, W=cores"
    )
    ap.add_argument(
        "--extra-repeats",
        type=int,
        default=1,
        help="timed runs of the reference variants (raw W processes, near-dedup, skip)",
    )
    ap.add_argument("--workers", type=int, default=CORES, help="W of the parallel e2e runs")
    ap.add_argument("--no-near", action="store_true", help="leave out the near-dedup variant")
    ap.add_argument("--no-skip", action="store_true", help="leave out the on_error=skip variant")
    ap.add_argument("--no-profile", action="store_true", help="leave out the stage breakdown")
    ap.add_argument("--cprofile", action="store_true", help="also cProfile one W=1 e2e run")
    ap.add_argument("--tiktoken", action="store_true", help="also time tiktoken on our vocab")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="seconds in all to wait, before runs, for other processes to go idle",
    )
    return ap.parse_args()


def build_variants(
    args: argparse.Namespace,
    tok: TextTokenizer,
    cfg: DataConfig,
    batches: list[list[str]],
    pool: RawPool,
    work: Path,
) -> list[Variant]:
    """The variants in table order; e2e runs keep their output in `work/<name>`."""
    w, n, x = args.workers, args.repeats, args.extra_repeats

    def e2e(c: DataConfig, name: str) -> Callable[[], tuple[float, int]]:
        return lambda: end_to_end(c, tok, work / name)

    variants = [
        Variant(RAW, lambda: raw_encode(tok, batches), n),
        Variant(f"raw, {w} processes x 1 thread", pool.run, x),
        Variant(E2E1, e2e(cfg, "w1"), n),
        Variant(f"e2e W={w}", e2e(replace(cfg, workers=w), "wn"), n),
    ]
    if not args.no_near:
        near = replace(cfg, workers=w, dedup=DedupConfig(near=True))
        variants.append(Variant(f"e2e W={w}, near-dedup (MinHash)", e2e(near, "near"), x))
    if not args.no_skip:
        skip = replace(cfg, workers=w, on_error="skip")
        variants.append(Variant(f"e2e W={w}, on_error=skip", e2e(skip, "skip"), x))
    return variants


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    t_start = time.perf_counter()
    corpus = load_corpus(args.corpus_root, args.max_mb)
    tok, how = get_tokenizer(args, corpus)
    cfg = DataConfig(sources=corpus.sources, workers=1)
    batches = corpus.batches(cfg.batch_docs)
    describe(corpus, tok, how, len(batches))

    work = Path(tempfile.mkdtemp(prefix="lmforge-data-bench-"))
    pool = RawPool(tok, batches, args.workers)
    try:
        variants = build_variants(args, tok, cfg, batches, pool, work)
        print(f"\n== {len(variants)} variants, taking turns", flush=True)
        measure(variants, args.quiet_wait)
        pool.close()
        report(variants, corpus)
        by = {v.name: v for v in variants}
        batch_cpu = pool.batch_cpu()
        if not args.no_profile:
            print("\n== stage breakdown", flush=True)
            w = args.workers
            stages, extra = stage_profile(corpus, tok, cfg, by[RAW].median, work / "w1", work, w)
            e2e1, e2e_w = by[E2E1].median, by[f"e2e W={w}"].median
            report_stages(stages, extra, e2e1, e2e_w, corpus, w, batch_cpu, cfg.batch_docs)
        if args.cprofile:
            cprofile_top(cfg, tok, work)
        if args.tiktoken:
            cpu1 = sum(batch_cpu)
            report_tiktoken(tok, batches, by[RAW], cpu1, corpus.num_bytes, args.repeats)
    finally:
        pool.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\ncommand: {command}")


if __name__ == "__main__":
    main()
