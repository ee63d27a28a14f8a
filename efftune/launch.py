"""`efftune train --nproc N ...` (and `efftune hub build --nproc N ...`): the same command in N processes
on this machine, started by torchrun.

efftune runs torchrun's own entry (`torch.distributed.run`) in this process, with the arguments
torchrun would take: `--standalone` (a rendezvous on this machine) or, across machines, the
rendezvous flags below passed through unchanged. Running it in this process, rather than as a
`torchrun` child, lets a rendezvous that fails say so in one line: torchrun raises its own
exception types (`RendezvousConnectionError`, `RendezvousTimeoutError`) within the rendezvous
timeouts, and efftune names the endpoint and the timeout instead of printing torchrun's traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import EfftuneError

# torchrun's flags that `efftune train` (and `hub build`) pass through unchanged (the same names and meanings)
PASSED = {
    "--nnodes": "number of machines, or MIN:MAX (torchrun's --nnodes; needs --rdzv-endpoint)",
    "--node-rank": "this machine's rank among them (torchrun's --node-rank)",
    "--rdzv-endpoint": "HOST:PORT where the machines meet (torchrun's; the first machine hosts it)",
    "--rdzv-backend": "rendezvous backend (torchrun's; default c10d)",
    "--rdzv-id": "a job id the machines share (torchrun's)",
    "--rdzv-conf": "KEY=VALUE,... for the rendezvous (torchrun's), e.g. read_timeout=60 (seconds to reach the "
                   "endpoint), join_timeout=600 (seconds to wait for every machine), is_host=false",
    "--max-restarts": "restart every rank this many times when one fails (torchrun's); the run resumes from "
                      "its last checkpoint",
}
READ_TIMEOUT, JOIN_TIMEOUT = 60, 600  # torch's defaults, in seconds, for --rdzv-conf's read_timeout and join_timeout


def add_flags(p: argparse.ArgumentParser) -> None:
    """`--nproc` and the torchrun flags `efftune train` and `hub build` pass through."""
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (data parallel; train.distributed picks ddp or "
                        "fsdp, hub build ddp only): efftune starts them through torchrun, one per GPU, or on CPU "
                        "over gloo")
    for flag, text in PASSED.items():
        g.add_argument(flag, metavar="VALUE", help=f"with --nproc: {text}")


def passed_flags(args: argparse.Namespace) -> dict[str, str]:
    """{flag: value} of the passed-through flags given on the command line."""
    values = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in PASSED}
    return {flag: value for flag, value in values.items() if value is not None}


def rank_argv(argv: list[str]) -> list[str]:
    """`argv` without `--nproc` and the passed-through flags: the command each rank runs."""
    launcher = {"--nproc", *PASSED}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in launcher:
            skip = True
        elif a.split("=", 1)[0] not in launcher:
            out.append(a)
    return out


def torchrun_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """torchrun's arguments for `efftune train --nproc N [passed-through flags] ...` (`argv`; `hub build` alike)."""
    given = passed_flags(args)
    if "--nnodes" in given and "--rdzv-endpoint" not in given:
        raise EfftuneError(f"--nnodes {given['--nnodes']}: the machines need a place to meet: pass "
                           "--rdzv-endpoint HOST:PORT (the same on every machine)")
    rendezvous = ["--rdzv-backend", "c10d"] if "--rdzv-endpoint" in given else ["--standalone"]
    passed = [x for flag, value in given.items() for x in (flag, str(value))]
    return [f"--nproc-per-node={args.nproc}", *rendezvous, *passed, "-m", "efftune", *rank_argv(argv)]


def torchrun_args(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """torchrun's parsed arguments (`torch.distributed.run`'s parser) for `torchrun_argv(args, argv)`.
    Its parser is told not to take abbreviations: argparse looks at every argument, the rank's
    command after `-m efftune` too, and a rank's flag that begins some of torchrun's (`--r` of
    `--rdzv-*`, `--log` of `--log-dir` and `--logs-specs`) stopped torchrun as ambiguous."""
    from torch.distributed.run import get_args_parser
    parser = get_args_parser()
    parser.allow_abbrev = False
    return parser.parse_args(torchrun_argv(args, argv))


def _conf(args: argparse.Namespace) -> dict[str, str]:
    items = [kv.split("=", 1) for kv in (getattr(args, "rdzv_conf", None) or "").split(",") if "=" in kv]
    return {k.strip(): v.strip() for k, v in items}


def _rendezvous_failed(exc: Exception, args: argparse.Namespace) -> EfftuneError:
    """A failed rendezvous as one line naming the endpoint and the timeout that ran out."""
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousTimeoutError
    endpoint, conf = args.rdzv_endpoint or "this machine", _conf(args)
    if isinstance(exc, RendezvousConnectionError):
        seconds = conf.get("read_timeout", READ_TIMEOUT)
        return EfftuneError(f"cannot reach the rendezvous at {endpoint} (--rdzv-endpoint) within read_timeout "
                            f"{seconds} s: start the first machine's command, check the host and that the port "
                            "is open to this machine (--rdzv-conf read_timeout=SECONDS to wait longer)")
    if isinstance(exc, RendezvousTimeoutError):
        seconds = conf.get("join_timeout", JOIN_TIMEOUT)
        return EfftuneError(f"the rendezvous at {endpoint} timed out after join_timeout {seconds} s: not all "
                            f"--nnodes {args.nnodes or 1} machines joined; start the same command on each "
                            "(--rdzv-conf join_timeout=SECONDS to wait longer)")
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return EfftuneError(f"the rendezvous at {endpoint} failed: {type(exc).__name__}: {first}")


def environment(nproc: int, on_gpu: bool) -> dict[str, str]:
    """Variables torchrun and the ranks inherit (each set unless the environment sets it already).

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a new store for the ranks at each restart. By default the
    ranks keep using the store of torchrun's rendezvous, which outlives a restart with the previous
    attempt's keys in it: restarted ranks then read their peers' old addresses and fail to connect
    (gloo: 'connection refused') or hang (pytorch/pytorch#135712, #167288). With it, rank 0 of each
    attempt hosts a store of its own, as before torch 2.5.
    OMP_NUM_THREADS: CPU processes share the cores rather than oversubscribe them."""
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if not on_gpu:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


def launch(args: argparse.Namespace, argv: list[str], on_gpu: bool) -> int:
    """Run torchrun (in this process) as `torchrun_argv` says; its exit status. A failed rendezvous
    is an EfftuneError of one line; a rank that failed has printed its own 'efftune: error' line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import run

    from .train.distributed import launched
    if launched():
        raise EfftuneError("--nproc: this process already runs under torchrun; leave --nproc out (torchrun's "
                           "--nproc-per-node says how many)")
    torchrun = torchrun_args(args, argv)
    for key, value in environment(args.nproc, on_gpu).items():  # torchrun runs in this process
        os.environ.setdefault(key, value)
    try:
        run(torchrun)
    except RendezvousError as exc:
        raise _rendezvous_failed(exc, args) from None
    except ChildFailedError as exc:  # the ranks' own one-line errors are above
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"efftune: error: the {args.nproc} processes stopped (exit status {', '.join(map(str, codes))}); "
              "each rank's 'efftune: error' line above says why", file=sys.stderr)
        return 1
    except SignalException as exc:  # Ctrl-C or SIGTERM: torchrun passed it to the ranks, which said what they kept
        return 128 + int(exc.sigval)
    return 0
