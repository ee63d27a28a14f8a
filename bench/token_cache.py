"""Does a second run over a large conversation file start in seconds? (issue 27: "tokenisation is
cached, so a second run over 1M conversations starts in seconds").

Writes N synthetic multi-turn conversations (a shared system prompt, 1-3 user/assistant turns of a
few sentences) to a JSONL file, then times what `efftune train` does with them before its first
step, twice, each in a fresh process as a new run would: reading and checking the file
(`efftune.data.sources.load_data`), and tokenising with the default model's chat template
(`efftune.data.token_cache.encode_all`), the second time from the cache. Prints one JSON line per
run and a last line with both. CPU is enough: this is tokenizer and disk work.

    PYTHONPATH=. python bench/token_cache.py --conversations 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the river runs north through a valley of pine and granite where the old town keeps its bridge "
         "and every spring the water rises over the fields before the farmers plant barley wheat and rye").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."


def write_conversations(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": "You are a patient geography tutor."}]
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": sentence(rng) + " " + sentence(rng)})
                messages.append({"role": "assistant", "content": " ".join(sentence(rng) for _ in range(3))})
            f.write(json.dumps({"messages": messages}) + "\n")


def one_run(data: str, model: str) -> dict:
    """In this process: what a run does with the data before training, timed."""
    from efftune.data.sources import load_data
    from efftune.data.token_cache import encode_all
    from efftune.data.tokenize import Formatter
    from efftune.models import load_model
    _, tokenizer = load_model(model, dtype="fp32", device="cpu")
    t0 = time.perf_counter()
    examples = load_data(data)
    t1 = time.perf_counter()
    seqs = encode_all(Formatter(tokenizer, max_length=512), examples, log=lambda m: print(m, file=sys.stderr))
    t2 = time.perf_counter()
    return dict(conversations=len(examples), tokens=sum(map(len, seqs)), read_s=round(t1 - t0, 2),
                tokenise_s=round(t2 - t1, 2), total_s=round(t2 - t0, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=100_000)
    ap.add_argument("--model", default="default")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(one_run(args.worker, args.model)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        # new text every call (seeded by the clock), so the first run finds no cache entry of an earlier call
        write_conversations(data, args.conversations, seed=time.time_ns())
        env = {**os.environ, "TQDM_DISABLE": "1"}  # efftune's own cache: the default model is there
        runs = []
        for label in ("first", "second"):
            out = subprocess.run([sys.executable, __file__, "--worker", str(data), "--model", args.model],
                                 env=env, capture_output=True, text=True, check=True)
            row = {"run": label, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            runs.append(row)
        print(json.dumps({"conversations": args.conversations, "first_total_s": runs[0]["total_s"],
                          "second_total_s": runs[1]["total_s"], "second_read_s": runs[1]["read_s"],
                          "second_tokenise_s": runs[1]["tokenise_s"]}))


if __name__ == "__main__":
    main()
