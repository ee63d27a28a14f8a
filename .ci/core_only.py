"""CI check for a core-only install (`pip install -e .`, no extras): the default model loads.

.ci/run points `EFFTUNE_DEFAULT_GGUF` at the cached GGUF file and `EFFTUNE_CACHE` at an empty
directory, so this dequantises the GGUF file (what a fresh machine's first `efftune` does) without
downloading it again. It fails if anything the default load needs is missing from the core
dependencies (in issue 21 it was accelerate, pulled in only by the test extra's peft).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch


def main() -> int:
    extras = [name for name in ("peft", "nevergrad", "pytest", "hypothesis") if importlib.util.find_spec(name)]
    if extras:  # then this is no core-only install, and the check would prove nothing
        print(f"core-only check: extras are installed ({', '.join(extras)})", file=sys.stderr)
        return 1
    cache = Path(os.environ["EFFTUNE_CACHE"])
    if any(cache.iterdir()):
        print(f"core-only check: the model cache {cache} is not empty", file=sys.stderr)
        return 1
    from efftune.models import load_model

    model, tokenizer = load_model()
    ids = tokenizer("Utterance: play some jazz. Intent:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if logits.shape != (1, ids.shape[1], model.config.vocab_size) or not torch.isfinite(logits).all():
        print(f"core-only check: bad logits {tuple(logits.shape)}", file=sys.stderr)
        return 1
    if not (cache / "models" / "SmolLM2-135M-Instruct" / "config.json").exists():
        print("core-only check: the model was not dequantised into the empty cache", file=sys.stderr)
        return 1
    print(f"core-only check: default model loaded from {os.environ['EFFTUNE_DEFAULT_GGUF']}: "
          f"logits {tuple(logits.shape)}, next token {tokenizer.decode(logits[0, -1].argmax())!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
