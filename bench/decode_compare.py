"""Hand-written batched decoding (raylm's engine) against ``transformers`` ``generate``, same model and prompts.

The engine decodes by hand (``raylm.inference.engine``) where ``generate``
would do; this measures whether that still pays. Both decode the same batches
of translation prompts (greedy, stop at end-of-text or a newline, at most
``--max-new-tokens``) and of completion prompts (sampled: temperature 0.8,
top-p 0.95), at batch sizes 1, 8 and 32, in one process with the same torch
threads; runs are interleaved and each figure is the median of ``--repeats``.
``generate`` gets the same stopping rules (``eos_token_id``,
``stop_strings=["\\n"]``) and the same left-padded inputs.

Checks that greedy outputs are identical token for token (they must be: same
model, same arithmetic); sampled outputs differ by construction (different
random streams), so their figure counts generated tokens.

Figures: generated tokens per second for each, and ``engine_vs_generate``
(engine tokens/s over generate tokens/s; above 1: hand-written decoding wins).
Prints one JSON object (load average at start included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: a demo-shaped untrained gpt2-tiny)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    load_at_start = [round(value, 2) for value in os.getloadavg()]

    import torch

    from raylm.data.formatting import translate_prompt
    from raylm.inference.engine import Engine
    from raylm.inference.task_model import GenerationRequest, SamplingParams
    from serve_load import build_demo_shaped_model, demo_inputs

    torch.set_num_threads(args.threads)
    folder = args.model or str(build_demo_shaped_model(Path(tempfile.mkdtemp(prefix="raylm-decode-")) / "model"))
    engine = Engine.from_directory(folder, max_new_tokens=args.max_new_tokens)
    model, tokenizer = engine.model, engine.tokenizer
    inputs = demo_inputs()
    sources = [body["text"] for body in inputs["translate"]]
    prompts = [body["prompt"] for body in inputs["completions"]]

    def left_padded(texts):
        rows = [[engine.eos_id, *tokenizer(text, add_special_tokens=False)["input_ids"]] for text in texts]
        return engine._left_pad(rows)

    def run_engine(texts, sampled):
        params = (SamplingParams(max_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=0) if sampled
                  else SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, stop=("\n",)))
        results = engine.generate([GenerationRequest(text, params) for text in texts])
        return [result.completion_tokens for result in results], [result.text for result in results]

    def run_generate(texts, sampled):
        ids, mask = left_padded(texts)
        options = (dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0) if sampled
                   else dict(do_sample=False, stop_strings=["\n"], tokenizer=tokenizer))
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=engine.pad_id, eos_token_id=engine.eos_id, **options)
        new = out[:, ids.shape[1]:].tolist()
        counts, texts_out = [], []
        for row in new:
            tokens = []
            for token in row:
                tokens.append(token)
                if token in (engine.eos_id,):
                    break
            text = tokenizer.decode([t for t in tokens if t not in (engine.eos_id, engine.pad_id)],
                                    skip_special_tokens=True)
            counts.append(len(tokens))
            texts_out.append(text.split("\n", 1)[0] if not sampled else text)
        return counts, texts_out

    report = {"benchmark": "decode_compare", "load_average_at_start": load_at_start, "threads": args.threads,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "model": args.model or "untrained demo-shaped gpt2-tiny"}
    contenders = {"engine": run_engine, "generate": run_generate}
    for mode, texts_all in (("greedy_translate", [translate_prompt(s) for s in sources]), ("sampled", prompts)):
        sampled = mode == "sampled"
        for batch_size in [int(value) for value in args.batch_sizes.split(",")]:
            texts = (texts_all * (1 + batch_size // len(texts_all)))[:batch_size]
            times = {name: [] for name in contenders}
            tokens = {}
            outputs = {}
            for name, run in contenders.items():  # warm-up
                run(texts, sampled)
            for repeat in range(args.repeats):
                order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
                for name in order:
                    started = time.perf_counter()
                    counts, outs = contenders[name](texts, sampled)
                    times[name].append(time.perf_counter() - started)
                    tokens[name] = sum(counts)
                    outputs[name] = outs
            entry = {}
            for name in contenders:
                median = statistics.median(times[name])
                entry[f"{name}_tokens_per_s"] = round(tokens[name] / median, 1)
                entry[f"{name}_median_s"] = round(median, 4)
            entry["engine_vs_generate"] = round(entry["engine_tokens_per_s"] / entry["generate_tokens_per_s"], 2)
            if not sampled:
                entry["identical_outputs"] = [o.strip() for o in outputs["engine"]] == \
                                             [o.strip() for o in outputs["generate"]]
            report[f"{mode}_b{batch_size}"] = entry
            print(f"{mode} b{batch_size}: {entry}", file=sys.stderr)
    report["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
