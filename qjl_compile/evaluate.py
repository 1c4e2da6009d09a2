"""Accuracy of a KV cache: teacher-forced perplexity over the compressed cache, KL and top-1
agreement against the exact cache, and a passkey (needle) retrieval test.

One implementation, shared by `qjl_compile.demo` and `benchmarks/accuracy.py`.

What is scored (perplexity)
---------------------------
Each window of W tokens is split at P (default W // 2):

1. prefill: tokens [0, P) in one forward pass. Prefill attention is exact in every cache here
   (QJLCache, HF QuantizedCache and DynamicCache all return the exact K/V of the first update);
   the cache then stores them (compressed, for a compressed cache).
2. teacher-forced decode: tokens [P, W-1) are fed in chunks of C tokens ("chunked prefill"). A
   chunk attends over the stored past (compressed part + exact residual window) and, exactly and
   causally, over its own tokens. Its logits predict tokens [P+1, W): those W-P-1 tokens are
   scored. Token P (predicted by the exact prefill) is not scored.

Because step 1 is the same exact computation for every cache, it is run once per window with a
`DynamicCache`, and each cache under test is filled from its K/V through its own ``update()``
(exactly what its prefill would have called). ``share_prefill=False`` runs it per cache instead;
the tests check both give the same logits.

KL is KL(p_exact || p_cache) per scored position (natural log), averaged; top-1 agreement is
the fraction of scored positions whose argmax equals the exact cache's.

Needle
------
A sentence "The pass key is NNNNN. Remember it. NNNNN is the pass key." is hidden at a depth of
the filler text; the chat-template prompt is the filler + a question; the assistant turn is
primed with "The pass key is". The context part (chat prefix + filler) is the exact prefill; the
question and the assistant header are fed as a chunk over the compressed cache; the answer is
decoded greedily (max 8 tokens) over the compressed cache. Found = the number appears in the
answer.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .compat import cache_kwargs

CacheFactory = Callable[[object, int], object]  # (model, max_cache_len) -> Cache (or None = DynamicCache)


# ----------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------
def exact_cache(model, max_len: int):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _new_cache(factory: CacheFactory | None, model, max_len: int):
    cache = (factory or exact_cache)(model, max_len)
    return cache if cache is not None else exact_cache(model, max_len)


def _fill_from(cache, exact, n_layers: int) -> None:
    """Store the exact prefill K/V of `exact` (a DynamicCache) into `cache` via its update()."""
    for i in range(n_layers):
        layer = exact.layers[i]
        cache.update(layer.keys, layer.values, i)


@torch.inference_mode()
def _prefill(model, ids: torch.Tensor, factory: CacheFactory | None, max_len: int, shared=None):
    """(cache, last logits) after the exact prefill of ids (1, P). `shared` = (DynamicCache, logits)."""
    cache = _new_cache(factory, model, max_len)
    if shared is not None:
        exact, logits = shared
        if cache is not exact:
            _fill_from(cache, exact, model.config.num_hidden_layers)
        return cache, logits
    out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].float()


@torch.inference_mode()
def shared_prefill(model, ids: torch.Tensor):
    """(DynamicCache, last-position logits) of an exact prefill, to fill other caches from."""
    cache = exact_cache(model, ids.shape[1])
    out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].float()


# ----------------------------------------------------------------------------------------------
# Perplexity / KL / top-1
# ----------------------------------------------------------------------------------------------
@dataclass
class WindowScore:
    nll: torch.Tensor                     # (n,) per scored token
    top1: torch.Tensor                    # (n,) argmax token ids
    logprobs: torch.Tensor | None = None  # (n, V) float32, kept for the reference run
    kl: torch.Tensor | None = None        # (n,) KL(ref || this), when a reference was given


@torch.inference_mode()
def score_window(model, ids: torch.Tensor, factory: CacheFactory | None = None, prefill: int | None = None,
                 chunk: int = 64, reference: WindowScore | None = None, keep_logprobs: bool = False,
                 shared=None, progress: tqdm | None = None) -> WindowScore:
    """Teacher-forced scoring of one window ids (1, W) over a cache (module docstring).

    factory(model, W) makes the cache (None: exact DynamicCache). `shared`: result of
    `shared_prefill(model, ids[:, :P])` to fill the cache from instead of running the prefill.
    """
    W = ids.shape[1]
    P = W // 2 if prefill is None else prefill
    if not 1 <= P < W - 1:
        raise ValueError(f"prefill P={P} must be in [1, W-1) for a window of W={W} tokens")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    cache, _ = _prefill(model, ids[:, :P], factory, W, shared)
    nll, top1, lps, kls = [], [], [], []
    off = 0
    for s in range(P, W - 1, chunk):
        e = min(s + chunk, W - 1)
        out = model(ids[:, s:e], **cache_kwargs(cache), use_cache=True)
        lp = torch.log_softmax(out.logits[0].float(), dim=-1)            # (e-s, V)
        tgt = ids[0, s + 1:e + 1]
        nll.append(-lp.gather(-1, tgt[:, None])[:, 0])
        top1.append(lp.argmax(-1))
        if reference is not None:
            rlp = reference.logprobs[off:off + (e - s)]
            kls.append((rlp.exp() * (rlp - lp)).sum(-1).clamp_min(0.0))
        if keep_logprobs:
            lps.append(lp)
        off += e - s
        if progress is not None:
            progress.update(e - s)
    del cache
    return WindowScore(nll=torch.cat(nll), top1=torch.cat(top1),
                       logprobs=torch.cat(lps) if keep_logprobs else None,
                       kl=torch.cat(kls) if reference is not None else None)


@dataclass
class PPLResult:
    window: int
    prefill: int
    chunk: int
    windows: int
    tokens: int                 # scored tokens in all windows
    nll: float
    ppl: float
    kl: float | None = None     # mean KL(ref || this) over scored tokens
    top1: float | None = None   # fraction of scored tokens with the reference's argmax
    per_window_ppl: list = field(default_factory=list)

    def as_dict(self):
        return {k: getattr(self, k) for k in ("window", "prefill", "chunk", "windows", "tokens", "nll", "ppl", "kl",
                                               "top1", "per_window_ppl")}


def make_windows(ids: torch.Tensor, window: int, n: int, stride: int | None = None) -> list[torch.Tensor]:
    """n windows (1, window) from a 1-D token tensor, evenly spread (non-overlapping when it fits)."""
    ids = ids.reshape(-1)
    if ids.numel() < window:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    last = ids.numel() - window
    step = stride or (last // (n - 1) if n > 1 else 0)   # spread over the text; disjoint when it fits
    starts = [min(i * step, last) for i in range(n)]
    return [ids[s:s + window][None] for s in starts]


def summarize(scores: list[WindowScore], window: int, prefill: int, chunk: int,
              reference: list[WindowScore] | None = None) -> PPLResult:
    nll = torch.cat([s.nll for s in scores])
    res = PPLResult(window=window, prefill=prefill, chunk=chunk, windows=len(scores), tokens=nll.numel(),
                    nll=nll.mean().item(), ppl=math.exp(nll.mean().item()),
                    per_window_ppl=[math.exp(s.nll.mean().item()) for s in scores])
    if reference is not None:
        res.kl = torch.cat([s.kl for s in scores]).mean().item()
        res.top1 = torch.cat([(s.top1 == r.top1).float() for s, r in zip(scores, reference)]).mean().item()
    return res


def evaluate_perplexity(model, windows: list[torch.Tensor], factories: dict[str, CacheFactory | None],
                        prefill: int | None = None, chunk: int = 64, reference: str | None = None,
                        share_prefill: bool = True, desc: str = "perplexity",
                        on_error: Callable[[str, Exception], None] | None = None) -> dict[str, PPLResult]:
    """Perplexity/KL/top-1 of every cache in `factories` on the same windows.

    reference: the key of the exact cache (scored first, its log-probs kept for KL/top-1);
    default: the first key. A factory that raises is reported to ``on_error(name, exc)`` and
    left out of the result (without on_error the exception propagates).
    """
    names = list(factories)
    ref = reference if reference is not None else names[0]
    order = [ref] + [n for n in names if n != ref]
    W = windows[0].shape[1]
    P = W // 2 if prefill is None else prefill
    per: dict[str, list[WindowScore]] = {n: [] for n in order}
    failed: set[str] = set()
    total = len(windows) * len(order) * (W - 1 - P)
    with tqdm(total=total, desc=desc, unit="tok", leave=False) as bar:
        for win in windows:
            shared = shared_prefill(model, win[:, :P]) if share_prefill else None
            ref_score = None
            for name in order:
                if name in failed:
                    bar.update(W - 1 - P)
                    continue
                bar.set_postfix_str(name)
                try:
                    sc = score_window(model, win, factories[name], P, chunk, reference=ref_score,
                                      keep_logprobs=(name == ref), shared=shared, progress=bar)
                except Exception as exc:  # noqa: BLE001 (reported, e.g. a codec not implemented yet)
                    if on_error is None or name == ref:
                        raise
                    on_error(name, exc)
                    failed.add(name)
                    continue
                if name == ref:
                    ref_score = sc
                    sc.kl = torch.zeros_like(sc.nll)
                per[name].append(sc)
            # free the reference log-probs of this window once every cache was scored against them
            if ref_score is not None:
                ref_score.logprobs = None
    ref_list = per[ref]
    return {n: summarize(per[n], W, P, chunk, ref_list) for n in order if n not in failed}


# ----------------------------------------------------------------------------------------------
# Needle / passkey
# ----------------------------------------------------------------------------------------------
NEEDLE_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? Answer with the 5-digit number only."
PRIME = "The pass key is"


@dataclass
class NeedlePrompt:
    context: torch.Tensor    # (1, Lc) chat prefix + filler with the needle: the exact prefill
    question: torch.Tensor   # (1, Lq) question + assistant header + primer: fed over the cache
    key: str
    depth: float


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def needle_prompt(tok, filler: str, context_tokens: int, depth: float, key: str, offset: int = 0) -> NeedlePrompt:
    """Build a passkey prompt of about `context_tokens` filler tokens, needle at `depth` (0..1)."""
    fill_ids = _encode(tok, filler[offset:offset + context_tokens * 8])[:context_tokens]
    cut = int(len(fill_ids) * depth)
    before = tok.decode(fill_ids[:cut])
    after = tok.decode(fill_ids[cut:])
    # move the cut to the previous line break so the needle does not split a sentence
    nl = before.rfind("\n")
    if nl > len(before) // 2:
        before, after = before[:nl], before[nl:] + after
    user = NEEDLE_INTRO + before + NEEDLE.format(key=key) + after
    marker = "\x00QUESTION\x00"
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": user + marker + QUESTION}], tokenize=False,
                                       add_generation_prompt=True) + PRIME
    else:
        text = user + marker + QUESTION + "\n" + PRIME
    ctx_text, q_text = text.split(marker)
    ctx = _encode(tok, ctx_text)
    q = _encode(tok, q_text)
    return NeedlePrompt(torch.tensor([ctx]), torch.tensor([q]), key, depth)


@torch.inference_mode()
def greedy_answer(model, prompt: NeedlePrompt, factory: CacheFactory | None, max_new_tokens: int = 8,
                  shared=None) -> list[int]:
    """Greedy tokens after the needle prompt: exact prefill of the context, the question as a
    chunk over the (compressed) cache, then one token at a time over it."""
    Lc, Lq = prompt.context.shape[1], prompt.question.shape[1]
    cache, _ = _prefill(model, prompt.context, factory, Lc + Lq + max_new_tokens, shared)
    out = model(prompt.question, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    toks = []
    for i in range(max_new_tokens):
        nxt = out.logits[0, -1].argmax()
        toks.append(int(nxt))
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        if int(nxt) in eos or i == max_new_tokens - 1:
            break
        out = model(nxt.view(1, 1), **cache_kwargs(cache), use_cache=True)
    return toks


@dataclass
class NeedleResult:
    found: int
    trials: int
    context_tokens: int
    depths: list
    answers: list = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.found / self.trials if self.trials else float("nan")

    def as_dict(self):
        return {"score": self.score, "found": self.found, "trials": self.trials,
                "context_tokens": self.context_tokens, "depths": self.depths, "answers": self.answers}


def evaluate_needle(model, tok, factories: dict[str, CacheFactory | None], filler: str, context_tokens: int,
                    depths=(0.1, 0.5, 0.9), trials: int = 1, seed: int = 0, max_new_tokens: int = 8,
                    share_prefill: bool = True, desc: str = "needle",
                    on_error: Callable[[str, Exception], None] | None = None) -> dict[str, NeedleResult]:
    """Passkey retrieval for every cache on the same prompts (module docstring)."""
    rng = random.Random(seed)
    prompts = []
    for t in range(trials):
        for d in depths:
            key = str(rng.randint(10000, 99999))
            off = rng.randint(0, max(0, len(filler) - context_tokens * 8))
            prompts.append(needle_prompt(tok, filler, context_tokens, d, key, off))
    res = {n: NeedleResult(0, 0, context_tokens, list(depths)) for n in factories}
    failed: set[str] = set()
    with tqdm(total=len(prompts) * len(factories), desc=desc, unit="prompt", leave=False) as bar:
        for pr in prompts:
            shared = shared_prefill(model, pr.context) if share_prefill else None
            for name, f in factories.items():
                bar.set_postfix_str(name)
                if name not in failed:
                    try:
                        ans = tok.decode(greedy_answer(model, pr, f, max_new_tokens, shared))
                    except Exception as exc:  # noqa: BLE001
                        if on_error is None:
                            raise
                        on_error(name, exc)
                        failed.add(name)
                    else:
                        r = res[name]
                        r.trials += 1
                        r.found += int(pr.key in ans)
                        r.answers.append({"depth": pr.depth, "key": pr.key, "answer": ans.strip()})
                bar.update(1)
    return {n: r for n, r in res.items() if n not in failed}


# ----------------------------------------------------------------------------------------------
# Text kinds, tune / held-out splits, copy (repeated-span) retrieval
# ----------------------------------------------------------------------------------------------
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


def stdlib_source_text(max_chars: int = 1_500_000) -> tuple[str, list[str]]:
    """Python source every machine has: the standard library's own .py files.

    Files under ``sysconfig.get_paths()["stdlib"]``, sorted by relative path (test suites and
    installed packages skipped), each preceded by a ``# file: <path>`` line, concatenated until
    ``max_chars``. Returns (text, the files used). The same Python version gives the same text.
    """
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not (set(p.relative_to(root).parts[:-1]) & _SKIP_DIRS))
    parts, used, total = [], [], 0
    for p in files:
        try:
            src = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        rel = p.relative_to(root).as_posix()
        chunk = f"# file: {rel}\n{src.strip()}\n\n"
        parts.append(chunk)
        used.append(rel)
        total += len(chunk)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars], used


def split_ids(ids: torch.Tensor, split: str) -> torch.Tensor:
    """The token range of a split: "tune" = the first half of the text, "heldout" = the second.

    Settings are chosen on "tune" windows and reported on "heldout" windows, which never
    overlap them (disjoint halves)."""
    ids = ids.reshape(-1)
    half = ids.numel() // 2
    if split == "tune":
        return ids[:half]
    if split == "heldout":
        return ids[half:]
    raise ValueError(f"split {split!r}: choose 'tune' or 'heldout'")


@dataclass
class CopyPrompt:
    context: torch.Tensor    # (1, C) tokens: the exact prefill (stored compressed)
    span: torch.Tensor       # (1, S) a passage of the context, fed again over the cache
    start: int               # where the span sits in the context


def copy_prompts(ids: torch.Tensor, context: int, span: int, depths=(0.1, 0.4, 0.7), trials: int = 2,
                 seed: int = 0) -> list[CopyPrompt]:
    """Repeated-span prompts from a token range: a context of `context` tokens, and a span of
    `span` tokens taken from it at each depth (fraction of the context), to be repeated."""
    ids = ids.reshape(-1)
    if ids.numel() < context:
        raise ValueError(f"copy: {ids.numel()} tokens, fewer than a context of {context}")
    rng = random.Random(seed)
    out = []
    for _ in range(trials):
        off = rng.randint(0, ids.numel() - context)
        ctx = ids[off:off + context]
        for d in depths:
            s0 = int(d * (context - span))
            out.append(CopyPrompt(ctx[None], ctx[s0:s0 + span][None], s0))
    return out


@dataclass
class CopyResult:
    correct: int
    tokens: int
    prompts: int
    per_prompt: list = field(default_factory=list)

    @property
    def acc(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")

    def as_dict(self):
        return {"acc": self.acc, "correct": self.correct, "tokens": self.tokens, "prompts": self.prompts,
                "per_prompt": self.per_prompt}


@torch.inference_mode()
def copy_accuracy(model, prompt: CopyPrompt, factory: CacheFactory | None, shared=None) -> tuple[int, int]:
    """(correct, scored) next-token predictions on the second occurrence of the span.

    The context is the exact prefill (then stored compressed); the span is fed as one chunk over
    the cache, and its tokens 2..S are scored by argmax == the true token (token 1 follows the
    context and cannot be predicted from the repeat). The first occurrence sits in the compressed
    region whenever start + S <= C - R."""
    C, S = prompt.context.shape[1], prompt.span.shape[1]
    cache, _ = _prefill(model, prompt.context, factory, C + S, shared)
    out = model(prompt.span, **cache_kwargs(cache), use_cache=True)
    pred = out.logits[0, :-1].argmax(-1)
    return int((pred == prompt.span[0, 1:]).sum()), S - 1


def evaluate_copy(model, factories: dict[str, CacheFactory | None], prompts: list[CopyPrompt],
                  desc: str = "copy", on_error: Callable[[str, Exception], None] | None = None
                  ) -> dict[str, CopyResult]:
    """Repeated-span next-token accuracy of every cache on the same prompts."""
    res = {n: CopyResult(0, 0, 0) for n in factories}
    failed: set[str] = set()
    with tqdm(total=len(prompts) * len(factories), desc=desc, unit="prompt", leave=False) as bar:
        for pr in prompts:
            shared = shared_prefill(model, pr.context)
            for name, f in factories.items():
                if name not in failed:
                    try:
                        c, t = copy_accuracy(model, pr, f, shared)
                    except Exception as exc:  # noqa: BLE001
                        if on_error is None:
                            raise
                        on_error(name, exc)
                        failed.add(name)
                    else:
                        r = res[name]
                        r.correct += c
                        r.tokens += t
                        r.prompts += 1
                        r.per_prompt.append(c / t)
                bar.update(1)
    return {n: r for n, r in res.items() if n not in failed}
