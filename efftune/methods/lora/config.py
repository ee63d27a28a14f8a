"""LoRA's hyperparameters (the run config's `lora` section)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

from ...errors import ConfigError

INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    """LoRA hyperparameters. `target_modules`: "all-linear", a list of module-name suffixes, or
    a regex (full match on the module path). `init`: A Kaiming-uniform ("kaiming", as nn.Linear)
    or Gaussian with std 1/r ("gaussian"); B starts at zero either way. `use_dora`: DoRA
    (`lora.dora`): LoRA plus a trained magnitude per output feature."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    init: str = "kaiming"
    embeddings: str | list[str] = field(default_factory=list)  # nn.Embedding modules to adapt too
    use_dora: bool = False
    SECTION: ClassVar[str] = "lora"  # the run config's section, named in errors (a subclass has its own)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{self.SECTION}.r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"{self.SECTION}.alpha must be a positive finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.SECTION}.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"{self.SECTION}.init must be one of {INITS}, got {self.init!r}")
        if self.use_dora and self.embeddings:
            raise ConfigError(f"{self.SECTION}.embeddings: DoRA adapts linear layers only; DoRA on embeddings "
                              f"is not supported (drop {self.SECTION}.embeddings or {self.SECTION}.use_dora)")
        for key in ("target_modules", "embeddings"):  # a string is a regex: refuse one that cannot match
            pattern = getattr(self, key)
            if isinstance(pattern, str) and pattern != "all-linear":
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{self.SECTION}.{key}: {pattern!r} is not a valid regex ({exc})") from None

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r, alpha = r or self.r, self.alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r
