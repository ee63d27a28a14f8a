"""The optimizers the training loop builds (`train.optimizer`): AdamW, or AdamW with 8-bit moments.

`adamw` is torch's AdamW (fused on CUDA). The two others keep both Adam moments of every tensor of
4,096 values or more in 8 bits with one fp32 scale per block of 256, 2 bytes a weight instead of 8, the
update itself computed in fp32 (torchao's update, compiled); they differ in what a byte holds:
- `adamw8bit`, torchao's AdamW8bit: a code into a 256-value dynamic-tree map (as bitsandbytes
  quantises), 7 decades of range; finding a value's code is a search of the map;
- `adamwfp8`, torchao's AdamWFp8: an fp8 (e4m3) number, about 5 decades of range below the block's
  largest; a value's code is one conversion instruction, so the update does less arithmetic a weight.
Either is what lets a full fine-tune of an 8B model fit one 141 GB GPU (`efftune.methods.full`).
torchao is an optional extra (`pip install "efftune[optim]"`); the core never imports it unless one of
these optimizers is asked for.

Checkpoints hold plain tensors: an 8-bit moment is written as its codes (uint8 or float8_e4m3fn, the
parameter's shape, under the moment's key) and its block scales (under `<key>::scale`), and rebuilt
from them on load, so a resumed run continues bit-identically. (Writing the values the codes stand for
and quantising them again would not be exact: the signed code map has +1 but not -1, so a block whose
largest value is negative comes back with another scale.)

Under FSDP (`train.distributed: fsdp`) each rank keeps the moments of its own rows of a parameter,
and the blocks are the whole parameter's: a moment is 8-bit when the whole parameter qualifies and
its rows split evenly across the ranks in whole blocks (`eight_bit`), so the codes and scales are
exactly those one process holds, and a sharded checkpoint (DCP) writes the codes sharded as the
parameter and the scales as the shards of one vector of the whole parameter's blocks. torchao itself
decides by each rank's shard, which would give a sharded run other blocks and other 8-bit moments
than one process.
"""
from __future__ import annotations

import importlib.util
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "adamwfp8")
# train.optimizer -> (torchao.optim's class, what its 8-bit moments' codes are: map indices or fp8 numbers)
QUANTIZED = {"adamw8bit": ("AdamW8bit", torch.uint8), "adamwfp8": ("AdamWFp8", torch.float8_e4m3fn)}
EXTRA = "optim"  # pip install "efftune[optim]"
SCALE = "::scale"  # checkpoint key suffix of an 8-bit moment's block scales
MOMENTS = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}  # state key -> signed codes


def check_optimizer(name: str) -> None:
    """`train.optimizer` is one we build, and its package is installed (said before a run starts)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name in QUANTIZED and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"train.optimizer {name} needs torchao, which is not installed: "
                          f"pip install \"efftune[{EXTRA}]\"")


def build_optimizer(name: str, groups: Sequence[dict], lr: float, device: torch.device,
                    fp32_moments: Iterable[torch.Tensor] = ()) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter `groups` (each with its own weight decay); betas (0.9, 0.999),
    eps 1e-8. `fp32_moments`: parameters whose moments stay fp32 under adamw8bit / adamwfp8
    (`embedding_weights`)."""
    check_optimizer(name)
    if name in QUANTIZED:
        return _quantized_class(name)(list(groups), lr=lr, betas=(0.9, 0.999), eps=1e-8, fp32_moments=fp32_moments)
    return torch.optim.AdamW(list(groups), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    """The input and output embedding matrices: their Adam moments stay fp32 under 8-bit moments. A row of a
    token that is rare in the batch gets a gradient many orders of magnitude below its block's largest,
    so its second moment rounds to 0 in 8 bits while its first does not, and the update m / (sqrt(v) + eps)
    blows up: measured here, a 3-step run moved such embedding entries by 0.79 at lr 1e-3 (fp32 AdamW:
    at most 0.002). bitsandbytes gives the same advice (32-bit state for embeddings)."""
    found = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get)() if hasattr(model, get) else None
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and all(weight is not w for w in found):
            found.append(weight)
    return found


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor, else `t`."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def is_quantized(value) -> bool:
    """Is this optimizer state an 8-bit moment (codes + block scales)?"""
    return torch.is_tensor(value) and type(value) is not torch.Tensor and hasattr(value, "codes") \
        and hasattr(value, "scale")


def eight_bit(p: torch.Tensor, block_size: int) -> bool:
    """Does adamw8bit keep `p`'s moments in 8 bits? As torchao decides for a whole tensor (4,096 values
    or more, in whole blocks), by the whole parameter; and where FSDP shards it (rows split across the
    ranks, `Shard(0)`), only when every rank holds as many rows and they make whole blocks, so each
    rank's blocks are the whole parameter's (the same codes and scales as in one process)."""
    from torch.distributed.tensor import DTensor, Shard
    if p.numel() < 4096 or p.numel() % block_size:
        return False
    if not isinstance(p, DTensor):
        return True
    ranks = p.device_mesh.size()
    return tuple(p.placements) == (Shard(0),) and p.shape[0] % ranks == 0 \
        and (p.numel() // ranks) % block_size == 0


def state_tensors(field: str, value: torch.Tensor, param: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One optimizer state entry as plain tensors for a checkpoint, by field name: the tensor itself,
    or an 8-bit moment's codes (under `field`, the parameter's shape) and block scales (`field::scale`).
    A moment of a sharded `param` (FSDP: a DTensor, whose moments adamw8bit keeps as this rank's part)
    as DTensors: the codes or values sharded as the parameter, the scales as this rank's run of the
    vector of the whole parameter's blocks (`eight_bit` made each rank's blocks a run of them)."""
    from torch.distributed.tensor import DTensor, Shard
    parts = {field: value.codes, f"{field}{SCALE}": value.scale} if is_quantized(value) else {field: value}
    parts = {k: t.detach().contiguous() for k, t in parts.items()}
    if not isinstance(param, DTensor) or isinstance(value, DTensor) or field not in MOMENTS:
        return parts
    mesh = param.device_mesh
    out = {field: DTensor.from_local(parts[field], mesh, param.placements, run_check=False, shape=param.shape,
                                     stride=param.stride())}
    if is_quantized(value):
        out[f"{field}{SCALE}"] = DTensor.from_local(parts[f"{field}{SCALE}"], mesh, (Shard(0),), run_check=False,
                                                    shape=(param.numel() // value.block_size,), stride=(1,))
    return out


_CLASSES: dict[str, type] = {}
_UPDATE: list = []  # torchao's one-parameter AdamW update, compiled (one wrapper: its guards pick the graph)


def _quantized_class(name: str) -> type:
    """torchao's AdamW8bit or AdamWFp8 (`QUANTIZED[name][0]`) as the loop drives it (made once per name:
    torchao is imported only here)."""
    if name in _CLASSES:
        return _CLASSES[name]
    import torchao.optim
    from torchao.optim.adam import single_param_adam
    class_name = QUANTIZED[name][0]
    base = getattr(torchao.optim, class_name)

    class EfftuneQuantizedAdamW(base):
        """torchao's AdamW8bit / AdamWFp8 (its 8-bit moments and its update's arithmetic) with four changes:
        - the moments of `fp32_moments` (the embeddings) stay fp32 (`embedding_weights` says why);
        - each group's lr stays a Python float (the loop sets it every step and a checkpoint writes it
          as JSON); it is handed to torchao's compiled update as a tensor, which torchao requires so
          that a new value does not recompile;
        - a parameter sharded by FSDP (a DTensor) has moments for this rank's rows only, as plain
          tensors, and torchao's update runs on its local rows: Adam is elementwise, and torchao's own
          DTensor-wrapped moments in torch 2.13 decide 8 bits by a rank's rows (`eight_bit` says why
          that differs from one process), fail to compile for float64 weights, and its compiled update
          takes a parameter's plain moments for another's 8-bit ones of the same shape (a crash);
        - `load_state_dict` rebuilds 8-bit moments from a checkpoint's codes and scales (`state_tensors`).
        (A one-kernel Triton update of ours, tried in sessions 22–23, ran no faster than torchao's
        compiled update on large weights: bench/RESULTS.md session 23.)"""

        # checkpoint.load_checkpoint: this optimizer takes `::scale` entries, and codes of this dtype
        # only (the other 8-bit optimizer's, read as these, would stand for other values)
        code_dtype = QUANTIZED[name][1]

        def __init__(self, params, *args, fp32_moments: Iterable[torch.Tensor] = (), **kwargs):
            self.fp32_ids = {id(p) for p in fp32_moments}
            super().__init__(params, *args, **kwargs)

        def _new_buffer(self, p: torch.Tensor, signed: bool):
            local = _local(p)
            if id(p) in self.fp32_ids:
                return torch.zeros_like(local, dtype=torch.float32)
            if not eight_bit(p, self.block_size):
                return torch.zeros_like(local)  # as torchao keeps a small tensor's moments
            return self._subclass_zeros(local, signed, self.block_size)  # codes and scales zero

        def add_param_group(self, param_group: dict) -> None:
            torch.optim.Optimizer.add_param_group(self, param_group)  # torchao's would make lr a tensor
            self.param_groups[-1]["lr"] = float(self.param_groups[-1]["lr"])

        @torch.no_grad()
        def step(self, closure=None):
            """torchao's step (`_AdamBase.step`), on each parameter's local rows."""
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            # one compiled update per parameter shape; torchao lifts the recompile limit the same way.
            # The compiled function is wrapped once: a new wrapper for each parameter made a step over
            # 290 small tensors take 93 ms of host time instead of 27 (CPU), host time an 8B step's
            # GPU work waits on
            update = _UPDATE[0]
            with torch._dynamo.utils.disable_cache_limit():
                for group in self.param_groups:
                    lr = torch.tensor(float(group["lr"]), dtype=torch.float32)
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        state = self.state[p]
                        if not state:
                            state["step"] = torch.tensor(0.0)
                            state["exp_avg"] = self._new_buffer(p, True)
                            state["exp_avg_sq"] = self._new_buffer(p, False)
                            if group["amsgrad"]:
                                state["max_exp_avg_sq"] = self._new_buffer(p, False)
                        state["step"] += 1
                        update(
                            _local(p).detach(), _local(p.grad), state["step"], state["exp_avg"],
                            state["exp_avg_sq"], state.get("max_exp_avg_sq"), lr, group["betas"][0],
                            group["betas"][1], group["weight_decay"], group["eps"], self.is_adamw,
                            self.bf16_stochastic_round and p.dtype is torch.bfloat16)
            return loss

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p, {})
                    for key, signed in MOMENTS.items():
                        # a moment saved as codes and scales is rebuilt from them (exact); one saved
                        # plain stays plain (small tensors, embeddings, an adamw run resumed changed)
                        value, scale = state.get(key), state.pop(key + SCALE, None)
                        if value is not None:
                            state[key] = _local(value) if scale is None else self._rebuilt(p, value, scale, signed)

        def _rebuilt(self, p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, signed: bool):
            """The 8-bit moment of `p` a checkpoint's codes and scales hold (this rank's rows under FSDP).
            (load_state_dict made the codes floats of the parameter's dtype, exactly: map indices
            0..255, or fp8 numbers, which every wider float holds.)"""
            from .distributed import full, like
            buffer = self._new_buffer(p, signed)
            if is_quantized(buffer):  # the same blocks as the run that wrote it: the same codes
                buffer.codes.copy_(_local(codes).to(buffer.codes.dtype))
                buffer.scale.copy_(_local(scale))
                return buffer
            # rows split across these ranks otherwise than in whole blocks (a resume on another number
            # of ranks): the values the codes stand for, in fp32 (every rank calls this, in one order)
            all_codes = full(codes)
            whole = self._subclass_zeros(all_codes, signed, self.block_size)
            whole.codes.copy_(all_codes.to(whole.codes.dtype))
            whole.scale.copy_(full(scale))
            return _local(like(whole.dequantize().to(buffer.dtype), p))  # the plain moment's dtype here

    EfftuneQuantizedAdamW.__name__ = EfftuneQuantizedAdamW.__qualname__ = f"Efftune{class_name}"
    _CLASSES[name] = EfftuneQuantizedAdamW
    if not _UPDATE:
        _UPDATE.append(torch.compile(single_param_adam, fullgraph=True, dynamic=False))
    return EfftuneQuantizedAdamW
