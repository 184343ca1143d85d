"""End-to-end `tokenize_corpus` throughput vs raw `encode_batch` of the same tokenizer and text.

Target (product owner): end-to-end ≥ 90% of raw. MB/s = UTF-8 bytes of the documents as read,
before cleaning, / wall seconds (1 MB = 10^6 bytes); the same numerator for every row. Variants:

- raw, tokenizers threads: `TextTokenizer.encode_batch` over the documents already in memory, in
  the pipeline's batches (per source, `batch_docs` each), TOKENIZERS_PARALLELISM=true;
- raw, 1 thread: the same with TOKENIZERS_PARALLELISM=false (what one pipeline worker does);
- raw, W processes x 1 thread: the batches encoded by a spawned pool that already holds the text
  (only batch indices and token counts cross processes): the pipeline's parallel design, no work;
- end-to-end `tokenize_corpus(DataConfig(sources=..., workers=W), tok, out)` for W = 1 (in-process,
  tokenizers threads) and W = cores (spawned workers, 1 thread each), default cleaning and exact
  dedup; then W = cores with MinHash near-dedup, and with on_error="skip".

Repeats take turns (round-robin, order rotated each round) so drifts of the noisy VM hit every
variant alike; "other CPU" is the share of all CPUs used by processes outside this benchmark.
A stage breakdown (manual timers, no profiler overhead) replays each step of the pipeline with
lmforge's own functions on the same documents, and checks that the sum matches the W = 1 run.
It reaches into private helpers of lmforge.data.tokenize (`_process`, `_init_worker`,
`_Workers`) on purpose: they are exactly what a worker runs.

    python benchmarks/data_throughput.py                        # ~20 MB real mix, ~3 min on 2 cores
    python benchmarks/data_throughput.py --max-mb 4 --repeats 1 # quick look
    python benchmarks/data_throughput.py --tokenizer out/tokenizer.json --cprofile
    PYTHONPATH=/path/with/tiktoken python benchmarks/data_throughput.py --tiktoken
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gzip
import hashlib
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

import numpy as np

from lmforge.data import tokenize as tokenize_mod
from lmforge.data.clean import clean
from lmforge.data.dedup import DedupConfig, Deduplicator, signature
from lmforge.data.shards import write_shard
from lmforge.data.sources import SourceConfig, read_documents, resolve_files
from lmforge.data.tokenize import DataConfig, split_of, tokenize_corpus
from lmforge.data.tokenizer import TextTokenizer, TokenizerConfig, sample_sources, train_tokenizer

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
        """The pipeline's batches: per source, in order, `size` documents each."""
        return [b for d in self.docs.values() for b in _chunks(d, size)]


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


@contextlib.contextmanager
def tokenizers_parallelism(on: bool) -> Iterator[None]:
    """tokenizers reads TOKENIZERS_PARALLELISM at each call, so this switches its thread pool."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


# ---------------------------------------------------------------------------------------------
# CPU used by other processes (the VM is shared)


class CpuMeter:
    """Share of all CPUs used, between start() and stop(), by processes other than ours."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.me = psutil, psutil.Process()

    def _mine(self) -> float:
        t = self.me.cpu_times()  # children_*: our finished (reaped) child processes
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.me.children(recursive=True):
            with contextlib.suppress(self.psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq

    def start(self) -> None:
        self.t0, self.mine0, self.busy0 = time.monotonic(), self._mine(), self._busy()

    def stop(self) -> float:
        wall = (time.monotonic() - self.t0) * CORES
        other = self._busy() - self.busy0 - (self._mine() - self.mine0)
        return max(other, 0.0) / wall


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


def raw_encode(tok: TextTokenizer, batches: list[list[str]], threads: bool) -> tuple[float, int]:
    with tokenizers_parallelism(threads):
        t0 = time.perf_counter()
        tokens = sum(len(ids) for b in batches for ids in tok.encode_batch(b))
        return time.perf_counter() - t0, tokens


_raw: dict[str, object] = {}


def _raw_init(tokenizer_json: str, batches: list[list[str]]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _raw.update(tok=TextTokenizer(Tokenizer.from_str(tokenizer_json)), batches=batches)


def _raw_batch(i: int) -> int:
    if i < 0:  # warm-up task: makes the pool start (and initialize) every worker
        time.sleep(0.3)
        return 0
    tok, batches = _raw["tok"], _raw["batches"]
    return sum(len(ids) for ids in tok.encode_batch(batches[i]))  # type: ignore[attr-defined,index]


class RawPool:
    """W spawned processes that hold the text already; a timed run only sends batch indices."""

    def __init__(self, tok: TextTokenizer, batches: list[list[str]], workers: int) -> None:
        self.n = len(batches)
        self.pool = ProcessPoolExecutor(
            workers,
            mp_context=get_context("spawn"),
            initializer=_raw_init,
            initargs=(tok.backend.to_str(), batches),
        )
        list(self.pool.map(_raw_batch, [-1] * 2 * workers))

    def run(self) -> tuple[float, int]:
        t0 = time.perf_counter()
        tokens = sum(self.pool.map(_raw_batch, range(self.n)))
        return time.perf_counter() - t0, tokens

    def close(self) -> None:
        self.pool.shutdown()


def end_to_end(cfg: DataConfig, tok: TextTokenizer, work: Path) -> tuple[float, int]:
    out = work / "shards"
    t0 = time.perf_counter()
    manifest = tokenize_corpus(cfg, tok, out)
    took = time.perf_counter() - t0
    shutil.rmtree(out)
    return took, sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))


@dataclass
class Variant:
    name: str
    kind: str  # raw | e2e
    run: Callable[[], tuple[float, int]]
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    other: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(variants: list[Variant], repeats: int, quiet_wait: float) -> None:
    meter, budget = CpuMeter(), [quiet_wait]
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            wait_quiet(budget)
            meter.start()
            took, v.tokens = v.run()
            v.other.append(meter.stop())
            v.times.append(took)
            print(f"  round {r + 1}/{repeats}  {v.name:44s} {took:6.2f} s", flush=True)


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
ENC1 = "(1-thread encode, for W>1)"


def stage_profile(
    corpus: Corpus, tok: TextTokenizer, cfg: DataConfig, raw2: float, raw1: float, work: Path
) -> dict[str, float]:
    """Seconds per pipeline step over the whole corpus, in-process, one step at a time."""
    sw = Stopwatch()
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
    sw.s["encode_batch, tokenizers threads (= raw)"] = raw2
    per_source = [
        [ids for b in _chunks(d, cfg.batch_docs) for ids in tok.encode_batch(b)]
        for d in corpus.docs.values()
    ]
    with sw("ids -> numpy uint32"):
        arrays = [[np.asarray(ids, dtype=np.uint32) for ids in d] for d in per_source]
    dedup = Deduplicator(cfg.dedup)
    with sw("dedup check (main process)"):
        for i, sig in enumerate(sigs):
            dedup.check(str(i), sig)
    shard_dir = work / "profile"
    shard_dir.mkdir(exist_ok=True)
    with sw("write_shard"):
        for i, a in enumerate(arrays):
            sizes = [len(x) for x in a]
            write_shard(shard_dir / f"{i}.bin", a, sizes, tok.vocab_size, tok.sha256)
    with sw("sha256 of shards"):
        for path in shard_dir.iterdir():
            with open(path, "rb") as f:
                hashlib.file_digest(f, "sha256")
    with sw("restart points (pickle dedup state)"):
        for _ in corpus.sources[1:]:
            pickle.dumps(dedup)
    shutil.rmtree(shard_dir)
    sw.s[ENC1] = raw1
    return sw.s


def _chunks(docs: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(docs), size):
        yield docs[i : i + size]


PROCESS = "worker _process, 1 thread (clean+sign+split+encode+numpy)"
PICKLE_OUT = "pickle texts out + unpickle in worker"
PICKLE_BACK = "pickle results back + unpickle in parent"
SPAWN = "spawn + import + init of the worker pool"


def ipc_and_worker_cost(corpus: Corpus, tok: TextTokenizer, cfg: DataConfig) -> dict[str, float]:
    """What W > 1 adds: pickling batches out and results back, worker start, per-batch work."""
    sw = Stopwatch()
    tokenize_mod._init_worker(cfg.clean, cfg.dedup, cfg.heldout_fraction, None, tok)
    batches = corpus.batches(cfg.batch_docs)
    with tokenizers_parallelism(False), sw(PROCESS):
        results = [tokenize_mod._process(b) for b in batches]
    with sw(PICKLE_OUT):
        for b in batches:
            pickle.loads(pickle.dumps(b))
    with sw(PICKLE_BACK):
        for r in results:
            pickle.loads(pickle.dumps(r))
    with sw(SPAWN), tokenize_mod._Workers(cfg, tok) as w:
        list(w.map([["warm up"]] * cfg.workers))
    return sw.s


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


def tiktoken_compare(tok: TextTokenizer, batches: list[list[str]], repeats: int) -> list[str]:
    """Encode the same batches with tiktoken built from our vocabulary; rows for the report."""
    try:
        import tiktoken
    except ImportError:
        return ["tiktoken: not installed (put it on PYTHONPATH to compare)"]
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
    rows = [f"tiktoken {tiktoken.__version__}: identical ids on {same}/{len(sample)} sampled docs"]
    for threads in (CORES, 1):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokens = sum(
                len(x) for b in batches for x in enc.encode_ordinary_batch(b, num_threads=threads)
            )
            times.append(time.perf_counter() - t0)
        rows.append(f"tiktoken, {threads} thread(s)|{statistics.median(times):.2f}|{tokens}")
    return rows


# ---------------------------------------------------------------------------------------------
# report


def report(variants: list[Variant], corpus: Corpus, args: argparse.Namespace) -> None:
    nbytes = corpus.num_bytes
    raw = next(v for v in variants if v.name.startswith("raw, tokenizers threads"))
    head = ["variant", "s (median)", "s (min)", "MB/s", "tokens/s", "e2e / raw", "other CPU"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for v in variants:
        ratio = raw.median / v.median
        print(
            f"| {v.name} | {v.median:.2f} | {min(v.times):.2f} | {nbytes / v.median / 1e6:.2f} | "
            f"{v.tokens / v.median:,.0f} | {ratio:.2f} | {100 * statistics.mean(v.other):.0f}% |"
        )
    print(
        f"\nMB = 10^6 UTF-8 bytes of the documents as read ({nbytes / 1e6:.2f} MB, "
        f"{sum(map(len, corpus.docs.values())):,} docs); e2e / raw = raw wall / this wall "
        f"(target ≥ 0.90); {len(raw.times)} repeats, median."
    )


def report_stages(
    stages: dict[str, float], ipc: dict[str, float], e2e1: float, e2e_w: float, nbytes: int
) -> None:
    """The step table (W=1 view), then the W>1 extras and a CPU-bound estimate for W=cores."""
    parts = {*READ_PARTS, GLUE, ENC1}
    total = sum(t for k, t in stages.items() if k not in parts)
    print("\n### Where the time goes (in-process, one step at a time, whole corpus)\n")
    print("| step | s | MB/s | share of e2e W=1 |")
    print("|---|---|---|---|")
    for k, t in stages.items():
        name = f"&nbsp;&nbsp;{k}" if k in parts - {ENC1} else k
        mbs = f"{nbytes / t / 1e6:.1f}" if t > 0 else "-"
        print(f"| {name} | {t:.2f} | {mbs} | {100 * t / e2e1:.0f}% |")
    print(
        f"| **sum of steps (without the indented parts and the 1-thread row)** | **{total:.2f}**"
        f" | | **{100 * total / e2e1:.0f}%** |"
    )
    print(f"| measured e2e W=1 (median) | {e2e1:.2f} | | 100% |")
    print(
        f"| difference (pipeline glue) | {e2e1 - total:.2f} | | "
        f"{100 * (e2e1 - total) / e2e1:.0f}% |"
    )
    print("\n### Extra for W > 1 (spawned workers, 1 thread each)\n")
    print("| step | s |\n|---|---|")
    for k, t in ipc.items():
        print(f"| {k} | {t:.2f} |")
    main_steps = (
        READ,
        "dedup check (main process)",
        "write_shard",
        "sha256 of shards",
        "restart points (pickle dedup state)",
    )
    ipc_half = (
        ipc[PICKLE_OUT] + ipc[PICKLE_BACK]
    ) / 2  # roughly: dumps on one side, loads on other
    parent = sum(stages[k] for k in main_steps) + ipc_half
    worker = ipc[PROCESS] + ipc_half
    bound = max(parent, (parent + worker) / CORES) + ipc[SPAWN]
    print(
        f"\nW={CORES}: main process {parent:.2f} s serial + workers {worker:.2f} s of CPU "
        f"(1-thread encode alone {stages[ENC1]:.2f} s) on {CORES} cores + pool start → "
        f"≥ {bound:.2f} s if perfectly overlapped (measured {e2e_w:.2f} s).\n"
        f"CPU-bound ceiling of e2e / raw at W={CORES} ≈ encode CPU / all CPU = "
        f"{stages[ENC1]:.2f} / {parent + worker:.2f} = {stages[ENC1] / (parent + worker):.2f} "
        "(if raw's threads scale like processes)"
    )


def main() -> None:
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
    ap.add_argument("--max-mb", type=float, default=20.0, help="total text to read (10^6 bytes)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of training")
    ap.add_argument("--vocab-size", type=int, default=32_000, help="vocab of the trained tokenizer")
    ap.add_argument("--train-mb", type=float, default=4.0, help="tokenizer training sample (MB)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    ap.add_argument("--workers", type=int, default=CORES, help="W of the parallel e2e runs")
    ap.add_argument("--no-near", action="store_true", help="skip the near-dedup e2e variant")
    ap.add_argument("--no-skip", action="store_true", help="skip the on_error=skip variant")
    ap.add_argument("--no-profile", action="store_true", help="skip the stage breakdown")
    ap.add_argument("--cprofile", action="store_true", help="also cProfile one W=1 e2e run")
    ap.add_argument("--tiktoken", action="store_true", help="also time tiktoken on our vocab")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="seconds in all to wait, before runs, for other processes to go idle",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    command = shlex.join([Path(sys.executable).name, *sys.argv])

    t_start = time.perf_counter()
    corpus = load_corpus(args.corpus_root, args.max_mb)
    tok, how = get_tokenizer(args, corpus)
    cfg = DataConfig(sources=corpus.sources, workers=1)
    batches = corpus.batches(cfg.batch_docs)
    import tokenizers

    print(
        f"{corpus.origin}: {corpus.num_bytes / 1e6:.2f} MB in "
        f"{sum(map(len, corpus.docs.values())):,} docs, {len(batches)} batches of ≤ "
        f"{cfg.batch_docs}; {CORES} CPUs; tokenizers {tokenizers.__version__}"
    )
    for s in corpus.sources:
        d = corpus.docs[s.name]
        b = sum(len(t.encode("utf-8")) for t in d)
        print(
            f"  {s.name:12s} {corpus.groups[s.name]:8s} {b / 1e6:6.2f} MB {len(d):7,} docs "
            f"(mean {b / len(d):,.0f} B)"
        )
    print(f"tokenizer: vocab {tok.vocab_size:,}, {how}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="lmforge-data-bench-"))
    W = args.workers
    pool = RawPool(tok, batches, W)
    try:
        variants = [
            Variant("raw, tokenizers threads", "raw", lambda: raw_encode(tok, batches, True)),
            Variant("raw, 1 thread", "raw", lambda: raw_encode(tok, batches, False)),
            Variant(f"raw, {W} processes x 1 thread", "raw", pool.run),
            Variant(
                "e2e W=1 (in-process, tokenizers threads)",
                "e2e",
                lambda: end_to_end(cfg, tok, work),
            ),
            Variant(f"e2e W={W}", "e2e", lambda: end_to_end(replace(cfg, workers=W), tok, work)),
        ]
        if not args.no_near:
            near = replace(cfg, workers=W, dedup=DedupConfig(near=True))
            variants.append(
                Variant(
                    f"e2e W={W}, near-dedup (MinHash)", "e2e", lambda: end_to_end(near, tok, work)
                )
            )
        if not args.no_skip:
            skip = replace(cfg, workers=W, on_error="skip")
            variants.append(
                Variant(f"e2e W={W}, on_error=skip", "e2e", lambda: end_to_end(skip, tok, work))
            )
        print(f"\n== {len(variants)} variants x {args.repeats} repeats, taking turns", flush=True)
        measure(variants, args.repeats, args.quiet_wait)
    finally:
        pool.close()
    report(variants, corpus, args)

    if not args.no_profile:
        print("\n== stage breakdown", flush=True)
        by = {v.name: v.median for v in variants}
        stages = stage_profile(
            corpus, tok, cfg, by["raw, tokenizers threads"], by["raw, 1 thread"], work
        )
        ipc = ipc_and_worker_cost(corpus, tok, replace(cfg, workers=W))
        report_stages(
            stages,
            ipc,
            by["e2e W=1 (in-process, tokenizers threads)"],
            by[f"e2e W={W}"],
            corpus.num_bytes,
        )
    if args.cprofile:
        cprofile_top(cfg, tok, work)
    if args.tiktoken:
        print("\n### tiktoken on the same vocabulary and batches\n")
        rows = tiktoken_compare(tok, batches, args.repeats)
        print(rows[0])
        raw = by_name(variants, "raw, tokenizers threads")
        print(
            f"| backend | s (median) | MB/s | tokens |\n|---|---|---|---|\n"
            f"| tokenizers, threads | {raw.median:.2f} | "
            f"{corpus.num_bytes / raw.median / 1e6:.2f} | {raw.tokens} |"
        )
        for row in rows[1:]:
            name, sec, tokens = row.split("|")
            print(f"| {name} | {sec} | {corpus.num_bytes / float(sec) / 1e6:.2f} | {tokens} |")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\ncommand: {command}")


def by_name(variants: list[Variant], name: str) -> Variant:
    return next(v for v in variants if v.name == name)


if __name__ == "__main__":
    main()
