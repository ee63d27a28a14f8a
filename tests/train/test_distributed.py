"""Several ranks (gloo on CPU) against one process: `efftune.train.distributed` and the loop under
torchrun. Each multi-process test starts 2 tiny float64 ranks (a few seconds of imports each)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from efftune.errors import ConfigError
from efftune.launch import environment
from efftune.train.distributed import World, check_batch, sum_over_shares
from efftune.train.loop import TrainConfig, train
from tests.conftest import one_and_two_ranks
from tests.train import dist_worker

CONFIG = dict(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0, max_length=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(out: Path, config: dict, n: int = 2, resume: bool = False, evaluate: bool = False,
          method: str = "lora") -> None:
    mp.spawn(dist_worker.spawned, args=(n, free_port(), str(out), config, resume, evaluate, method), nprocs=n,
             join=True)


def one_process(out: Path, config: dict, resume: bool = False, method: str = "lora", evaluate: bool = False):
    """Train in this process (no process group) and save the method's result into out/result;
    `evaluate`: with the ranks' evaluations (`dist_worker.evaluation`), on the whole set here."""
    model, save = dist_worker.method_model(method)
    result = train(model, dist_worker.sequences(), TrainConfig(**config), out / "run", pad_id=1, resume=resume,
                   evaluate=dist_worker.evaluation(sharded=False) if evaluate else None)
    save(model, out / "result")
    return result, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def saved_tensors(result_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of a saved result (adapter or model directory), by file and key."""
    return {f"{f.name}:{k}": t for f in sorted(result_dir.glob("*.safetensors")) for k, t in load_file(str(f)).items()}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def assert_same_weights(a: dict, b: dict, tol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol, msg=n)


def test_global_batch_must_split_evenly():
    assert check_batch(8, 0, World(0, 2)) == 4
    assert check_batch(8, 2, World(1, 2)) == 2
    with pytest.raises(ConfigError, match="split across 3 ranks"):
        check_batch(8, 0, World(0, 3))
    with pytest.raises(ConfigError, match="not divisible by 2 ranks x train.micro_batch_size 4"):
        check_batch(12, 4, World(0, 2))
    with pytest.raises(ConfigError, match="train.distributed must be one of"):
        TrainConfig(distributed="zero3")


def test_shares_of_held_out_examples_cover_each_once():
    """`sum_over_shares` cuts every list to a rank's share (no process group here: each rank's numbers
    come back unsummed): over the 3 ranks of a world, each example is scored once, so the ranks' numbers
    add up to the whole set's."""
    def score(letters, numbers):
        return [len(letters), sum(numbers)]
    letters, numbers = list("abcdefg"), [2.0 ** i for i in range(5)]
    parts = [sum_over_shares(score, letters, numbers, here=World(r, 3)) for r in range(3)]
    assert [p[0] for p in parts] == [3, 2, 2]
    assert [sum(p[i] for p in parts) for i in (0, 1)] == score(letters, numbers)
    assert sum_over_shares(score, letters, numbers) == score(letters, numbers)  # one process: the whole set


def test_ddp_two_ranks_equal_one_process(tmp_path):
    config = {**CONFIG, "micro_batch_size": 1}  # 2 examples a rank: accumulation under no_sync too
    ranks(tmp_path / "ddp", config, evaluate=True)
    ref, weights = one_process(tmp_path / "one", config, evaluate=True)
    got = [load_file(str(tmp_path / "ddp" / f"rank-{r}.safetensors")) for r in (0, 1)]
    assert_same_weights(got[0], got[1], tol=0)  # replicas stay identical
    assert_same_weights(weights, got[0])
    assert losses(tmp_path / "ddp" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)
    info = json.loads((tmp_path / "ddp" / "rank-0.json").read_text())
    assert info["tokens"] == ref.tokens  # both ranks' tokens
    # the evaluation, sharded over the ranks (7 + 5 examples, 4 + 3 and 3 + 2), is the whole set's: the
    # accuracy from summed hits, the perplexity from summed answer-token NLLs and counts
    assert [e["step"] for e in info["evals"]] == [0, 3] and all(0 <= e["accuracy"] <= 1 for e in info["evals"])
    assert [{k: e[k] for k in ("step", "accuracy", "perplexity")} for e in info["evals"]] == \
        [{k: e[k] for k in ("step", "accuracy", "perplexity")} for e in ref.evals]
    assert (tmp_path / "ddp" / "run" / "checkpoints" / "step-000003").is_dir()


def rewind(run_dir: Path, to: Path, step: int) -> None:
    """A copy of `run_dir` as the run left it when it stopped after checkpoint `step`."""
    import shutil
    shutil.copytree(run_dir, to)
    for c in (to / "checkpoints").glob("step-*"):
        if int(c.name[5:]) > step:
            shutil.rmtree(c)
    (to / "checkpoints" / "latest").write_text(f"step-{step:06d}")


def test_checkpoint_of_two_ranks_resumes_on_one_and_on_two(tmp_path):
    config = {**CONFIG, "steps": 4, "save_every": 2}
    ranks(tmp_path / "two", config)  # uninterrupted, checkpoints at steps 2 and 4
    _, uninterrupted = one_process(tmp_path / "ref", config)
    two = load_file(str(tmp_path / "two" / "rank-0.safetensors"))
    assert_same_weights(uninterrupted, two)

    rewind(tmp_path / "two" / "run", tmp_path / "on1" / "run", 2)
    result, on_one = one_process(tmp_path / "on1", config, resume=True)
    assert result.start_step == 2
    assert_same_weights(uninterrupted, on_one)

    # on 2 ranks under fsdp (train.distributed may change on a resume): each rank takes its shards
    rewind(tmp_path / "two" / "run", tmp_path / "on2" / "run", 2)
    ranks(tmp_path / "on2", {**config, "distributed": "fsdp"}, resume=True)
    assert_same_weights(uninterrupted, load_file(str(tmp_path / "on2" / "rank-0.safetensors")))
    assert losses(tmp_path / "on2" / "run") == pytest.approx(losses(tmp_path / "ref" / "run"), rel=1e-9)


ROWS = [{"input": f"Q: Is {w} blue?", "choices": ["yes", "no"], "answer": int(w != "sky")}
        for w in ["sky", "grass", "fox", "dog"] * 4]


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def test_nproc_refuses_more_processes_than_devices(capsys, model_dir, data_file, tmp_path):

    from efftune.cli import main
    for n, extra, message in ((0, [], "--nproc must be at least 1"), ((os.cpu_count() or 1) + 1, [], "CPU core(s)"),
                              (1, ["--distributed", "fsdp", "--method", "relora"], "cannot run method relora")):
        code = main(["train", "--nproc", str(n), "--model", str(model_dir), "--data", str(data_file), "--device", "cpu",
                     "--output", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_torchrun_flags_pass_through(capsys, model_dir, data_file, tmp_path):
    """`efftune train --nproc N` with torchrun's multi-machine flags: torchrun gets them unchanged (c10d
    instead of --standalone), the ranks' command does not; refused without --nproc or an endpoint."""
    from efftune.cli import main, parser
    from efftune.launch import rank_argv, torchrun_args, torchrun_argv
    argv = ["train", "--nproc", "2", "--nnodes", "2", "--node-rank=1", "--rdzv-endpoint", "h:29400",
            "--rdzv-conf", "join_timeout=5", "--max-restarts", "1", "--steps", "3"]
    assert torchrun_argv(parser().parse_args(argv), argv) == [
        "--nproc-per-node=2", "--rdzv-backend", "c10d", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
        "h:29400", "--rdzv-conf", "join_timeout=5", "--max-restarts", "1", "-m", "efftune", "train", "--steps", "3"]
    assert rank_argv(argv) == ["train", "--steps", "3"]
    one = ["train", "--nproc", "2", "--steps", "3"]
    assert torchrun_argv(parser().parse_args(one), one)[:2] == ["--nproc-per-node=2", "--standalone"]
    # the rank's flags that begin some of torchrun's (--r: --rdzv-*, --log: --log-dir) reach the rank whole
    for command in (["train", "--log", "tensorboard"], ["hub", "build", "--tasks", "t", "--output", "o"]):
        argv = [*command, "--nproc", "2", "--r", "2"]
        parsed = torchrun_args(parser().parse_args(argv), argv)
        assert (parsed.module, parsed.training_script, parsed.training_script_args, parsed.nproc_per_node) == \
            (True, "efftune", [*command, "--r", "2"], "2")
    # restarted ranks join on a store of their own (test_a_rank_killed_mid_run_restarts_from_the_checkpoint)
    assert environment(2, on_gpu=True) == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    common = ["--model", str(model_dir), "--data", str(data_file), "--device", "cpu", "--output", str(tmp_path / "o")]
    for extra, message in ((["--nnodes", "2"], "--nnodes is for several processes: add --nproc N"),
                           (["--nproc", "1", "--nnodes", "2"], "--nnodes 2: the machines need a place to meet")):
        assert main(["train", *common, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("host", [False, True])
def test_an_unreachable_rendezvous_is_one_line_within_its_timeout(capsys, model_dir, data_file, tmp_path, host):
    """A rendezvous endpoint nobody answers: torchrun gives up within the timeout the run set, and
    efftune says so in one line naming the endpoint and the timeout (not torchrun's traceback), exit 2.
    On 127.0.0.1 torchrun hosts the rendezvous itself unless told otherwise (is_host=false): then it
    waits join_timeout for the second machine; told not to host, it cannot connect within read_timeout."""
    import time

    from efftune.cli import main
    endpoint = f"127.0.0.1:{free_port()}"  # closed: nothing listens there
    conf = "join_timeout=2" if host else "read_timeout=2,is_host=false"
    t0 = time.monotonic()
    code = main(["train", "--model", str(model_dir), "--data", str(data_file), "--device", "cpu", "--output",
                 str(tmp_path / "o"), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-conf", conf])
    assert time.monotonic() - t0 < 60  # no hang (torch retries a connection once: about twice read_timeout)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("efftune: error: ") and endpoint in last, last
    assert ("timed out after join_timeout 2 s" if host else "cannot reach the rendezvous") in last, last
    assert host or "read_timeout 2 s" in last
    assert not (tmp_path / "o").exists()


def test_nproc_two_equals_one_process_from_the_cli(capsys, model_dir, data_file, tmp_path):
    """`efftune train --nproc 2` starts torchrun, which starts 2 ranks; the adapter, the metrics and the
    summary are rank 0's, written once, and equal the one-process run's (fp32: up to rounding)."""

    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--eval-size", "4", "--steps", "2",
            "--batch-size", "4", "--lr", "1e-2", "--device", "cpu"]
    one, two, _ = one_and_two_ranks(args, tmp_path, capsys)
    assert two["steps"] == 2 and two["final_loss"] == pytest.approx(one["final_loss"], abs=2e-4)
    assert two["accuracy_after"] == one["accuracy_after"]
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert_same_weights(a, b, tol=1e-5)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2 + 2  # 2 steps, 2 evaluations


def test_fsdp_two_ranks_equal_one_process(tmp_path):
    """FSDP2 (each block sharded, the base too) over 2 ranks: the losses, the adapter and a checkpoint
    that resumes in one process, as one process computes them."""
    config = {**CONFIG, "distributed": "fsdp", "micro_batch_size": 1, "steps": 4, "save_every": 2}
    ranks(tmp_path / "fsdp", config, evaluate=True)
    ref, weights = one_process(tmp_path / "one", config)
    got = [load_file(str(tmp_path / "fsdp" / f"rank-{r}.safetensors")) for r in (0, 1)]
    assert_same_weights(got[0], got[1], tol=0)  # the adapter whole on every rank after training
    assert_same_weights(weights, got[0])
    assert losses(tmp_path / "fsdp" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)
    info = json.loads((tmp_path / "fsdp" / "rank-0.json").read_text())
    assert [e["step"] for e in info["evals"]] == [0, 4]
    assert info["sharded_parameters"] > 0  # the base stays sharded after training
    # its checkpoints hold the adapter and the optimizer state as DCP shards, one file a rank
    checkpoint = tmp_path / "fsdp" / "run" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "trainable.safetensors").exists() and not (checkpoint / "optimizer.safetensors").exists()
    assert not list(checkpoint.parent.glob("*.shards"))  # the staging directories are gone
    # one process without a process group resumes it (DCP puts the shards together)
    rewind(tmp_path / "fsdp" / "run", tmp_path / "on1" / "run", 2)
    _, on_one = one_process(tmp_path / "on1", config, resume=True)
    assert_same_weights(weights, on_one)
    assert losses(tmp_path / "on1" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)
    # and 2 ranks again, each reading its part
    rewind(tmp_path / "fsdp" / "run", tmp_path / "on2" / "run", 2)
    ranks(tmp_path / "on2", config, resume=True)
    assert_same_weights(weights, load_file(str(tmp_path / "on2" / "rank-1.safetensors")))
    assert losses(tmp_path / "on2" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)
    # and one rank under fsdp: a world of one has nothing to shard across, so it trains unwrapped
    # (FSDP2 there only copies the weights in and out of its gather buffers), resuming the shards
    rewind(tmp_path / "fsdp" / "run", tmp_path / "alone" / "run", 2)
    ranks(tmp_path / "alone", config, n=1, resume=True)
    assert json.loads((tmp_path / "alone" / "rank-0.json").read_text())["sharded_parameters"] == 0
    assert_same_weights(weights, load_file(str(tmp_path / "alone" / "rank-0.safetensors")))
    assert losses(tmp_path / "alone" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)


def fsdp_equals_one_process(tmp_path: Path, config: dict, method: str) -> dict:
    """Train `method` on 2 fsdp ranks (tmp_path/fsdp) and in one process (tmp_path/one): the same losses
    and the same saved result. Returns the one-process result's tensors."""
    ranks(tmp_path / "fsdp", config, method=method)
    one_process(tmp_path / "one", config, method=method)
    assert losses(tmp_path / "fsdp" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)
    got, want = saved_tensors(tmp_path / "fsdp" / "result"), saved_tensors(tmp_path / "one" / "result")
    assert want and got.keys() == want.keys()
    assert_same_weights(want, got)
    return want


@pytest.mark.parametrize("method", ["expert-lora", "mixlora", "esft", "full"])
def test_moe_methods_and_full_fine_tuning_under_fsdp_equal_one_process(tmp_path, method):
    """Expert LoRA (on fused expert weights), MixLoRA and ESFT under FSDP2, each block sharded with its
    experts, and full fine-tuning (every weight trains, sharded; the saved model is gathered to rank 0):
    the losses and the saved result of 2 ranks are one process's."""
    # the routers' balance losses are taken per micro-batch (they are not linear in the tokens): one
    # process runs each rank's 2 examples as a micro-batch of its own
    config = {**CONFIG, "distributed": "fsdp", "steps": 2, "micro_batch_size": 2}
    fsdp_equals_one_process(tmp_path, config, method)


@pytest.mark.parametrize("method", ["qlora", "expert-qlora"])
def test_a_quantised_base_is_sharded_under_fsdp_and_trains_as_one_process(tmp_path, method):
    """FSDP-QLoRA: LoRA on an NF4 base (every block linear; on the MoE, the fused experts too) over 2
    ranks. Each rank holds about half of every packed tensor (codes, block scales) and the gathered
    tensors are the one-process model's, bit for bit; the losses and the saved adapter are one
    process's; (LoRA) a checkpoint of the run resumes on 2 ranks and ends where the run ended."""
    config = {**CONFIG, "distributed": "fsdp", "steps": 2, "micro_batch_size": 2}
    if method == "qlora":
        config.update(steps=4, save_every=2)
    want = fsdp_equals_one_process(tmp_path, config, method)
    # the packed base: sharded, half a tensor a rank (FSDP2 pads dim 0 to split evenly)
    sizes = [json.loads((tmp_path / "fsdp" / f"rank-{r}-packed.json").read_text()) for r in (0, 1)]
    reference = dist_worker.method_model(method)[0]
    packed = {n: p for n, p in reference.named_parameters() if not p.is_floating_point()}
    assert any(n.endswith(".codes") for n in packed) and sizes[0].keys() == packed.keys()
    if method == "expert-qlora":
        assert any(n.endswith("experts.base_layer.gate_up_proj_codes") for n in packed)
    for n, p in packed.items():
        rows = p.shape[0]
        assert [s[n][1] for s in sizes] == [p.numel()] * 2
        assert [s[n][0] for s in sizes] == [-(-rows // 2) * p[0].numel(), (rows - -(-rows // 2)) * p[0].numel()], n
    assert_same_weights(load_file(str(tmp_path / "fsdp" / "packed.safetensors")), packed, tol=0)
    if method == "qlora":
        rewind(tmp_path / "fsdp" / "run", tmp_path / "on2" / "run", 2)
        ranks(tmp_path / "on2", config, resume=True, method=method)
        assert losses(tmp_path / "on2" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)
        assert_same_weights(want, saved_tensors(tmp_path / "on2" / "result"))


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamwfp8"])
def test_8bit_moments_under_fsdp_equal_one_process_and_their_checkpoint_resumes_exactly(tmp_path, optimizer):
    """8-bit AdamW moments (torchao) under FSDP2: each rank keeps its rows' codes and scales, in the whole
    parameter's blocks, so 2 ranks train as one process does; a checkpoint holds them as DCP shards of
    plain tensors (uint8 or fp8 codes sharded as the parameter, fp32 block scales), and a resume on 2 ranks or
    in one process continues bit for bit, as a one-process checkpoint does on 2 ranks."""
    pytest.importorskip("torchao")
    from efftune.train.optimizers import QUANTIZED
    from efftune.train.sharded_state import shard_index
    config = {**CONFIG, "distributed": "fsdp", "optimizer": optimizer, "steps": 4, "save_every": 2,
              "micro_batch_size": 2}
    ranks(tmp_path / "fsdp", config, method="full-wide")
    one_process(tmp_path / "one", config, method="full-wide")
    two, one = saved_tensors(tmp_path / "fsdp" / "result"), saved_tensors(tmp_path / "one" / "result")
    assert one and two.keys() == one.keys()
    assert_same_weights(one, two)  # (the same bytes here: the same gradients give the same codes)
    assert losses(tmp_path / "fsdp" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)
    index, dtypes = shard_index(tmp_path / "fsdp" / "run" / "checkpoints" / "step-000002" / "sharded")
    gate = "optim.model.layers.0.mlp.gate_proj.weight.exp_avg"
    assert index[gate] == (128, 64) and index[gate + "::scale"] == (128 * 64 // 256,)  # codes and block scales
    assert dtypes[gate] == QUANTIZED[optimizer][1]
    assert "optim.model.embed_tokens.weight.exp_avg::scale" not in index  # the embeddings' moments stay fp32

    rewind(tmp_path / "fsdp" / "run", tmp_path / "on2" / "run", 2)
    ranks(tmp_path / "on2", config, method="full-wide", resume=True)
    resumed = saved_tensors(tmp_path / "on2" / "result")
    assert all(torch.equal(resumed[k], two[k]) for k in two)
    rewind(tmp_path / "fsdp" / "run", tmp_path / "on1" / "run", 2)
    one_process(tmp_path / "on1", config, resume=True, method="full-wide")
    resumed = saved_tensors(tmp_path / "on1" / "result")
    assert all(torch.equal(resumed[k], one[k]) for k in one)
    # and the one-process checkpoint (codes and scales whole, in safetensors) on 2 fsdp ranks, each taking its rows
    rewind(tmp_path / "one" / "run", tmp_path / "from1" / "run", 2)
    ranks(tmp_path / "from1", config, method="full-wide", resume=True)
    resumed = saved_tensors(tmp_path / "from1" / "result")
    assert all(torch.equal(resumed[k], one[k]) for k in one)


def test_two_machines_meet_at_a_rendezvous(tmp_path):
    """Two `torchrun --nnodes 2` processes (one rank each), as two machines would start them, meet at
    a c10d rendezvous on 127.0.0.1 and train as one process does."""
    import subprocess
    import sys
    port, config = free_port(), {**CONFIG, "micro_batch_size": 2}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "efftune-test",
                               "-m", "tests.train.dist_worker", str(tmp_path / "two"), json.dumps(config)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    _, weights = one_process(tmp_path / "one", config)
    for r in (0, 1):
        assert_same_weights(weights, load_file(str(tmp_path / "two" / f"rank-{r}.safetensors")))
    assert losses(tmp_path / "two" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)


def test_a_rank_killed_mid_run_restarts_from_the_checkpoint(tmp_path):
    """torchrun --max-restarts 1: rank 1 dies after step 3 (a checkpoint at step 2); torchrun stops rank 0,
    starts both again, they resume from step 2 and end as the uninterrupted run. The restarted ranks
    join on a store of their own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as `efftune train --nproc` sets
    it): on the store torchrun shares by default they read the first attempt's addresses and failed
    to connect or hung, most runs on this machine (pytorch/pytorch#135712)."""
    import subprocess
    import sys
    config = {**CONFIG, "steps": 4, "save_every": 2}
    env = {**os.environ, **environment(2, on_gpu=False), "PYTHONPATH": str(Path(__file__).parents[2]),
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "EFFTUNE_FAULT": "after_optimizer_step@3",
           "EFFTUNE_FAULT_RANK": "1", "LOGLEVEL": "INFO"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--max-restarts", "1", "--monitor-interval", "0.5",
                           "-m", "tests.train.dist_worker", str(tmp_path / "two"), json.dumps(config)],
                          env=env, capture_output=True, text=True, timeout=240)  # ~20 s; a hang fails
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failed (exitcode: 86) local_rank: 1" in done.stderr  # rank 1 did die at the fault point
    assert "restart_count=1" in done.stderr
    _, weights = one_process(tmp_path / "one", config)
    assert_same_weights(weights, load_file(str(tmp_path / "two" / "rank-0.safetensors")))
    assert losses(tmp_path / "two" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_rank_0_reads_the_base_and_two_ranks_equal_one_process(tmp_path, data_file, mode):
    """Under torchrun rank 0 loads the base and rank 1 builds it on the meta device; DDP's initial
    sync or FSDP's broadcast of rank 0's state dict fills rank 1's copy (tied embeddings stay tied,
    rotary inv_freq arrives), so the job equals one process: losses, evaluations, saved adapter.
    Rank 1's model directory holds a corrupt weight file: had it read the weights, it would fail."""
    import shutil

    from efftune.config import load_config
    from efftune.finetune import run
    from tests.conftest import make_tokenizer, tiny_llama
    base = tmp_path / "base"
    tiny_llama(tie=True).save_pretrained(base)  # tied input and output embeddings
    make_tokenizer().save_pretrained(base)
    unreadable = tmp_path / "base-without-weights"
    shutil.copytree(base, unreadable)
    (unreadable / "model.safetensors").write_bytes(b"not a safetensors file")

    def overrides(model: Path, out: Path) -> dict:
        return {"model": str(model), "data": {"path": str(data_file), "cache": False}, "eval_size": 4, "output": str(out),
                "dtype": "float64", "device": "cpu",
                "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 1, "lr": 1e-2, "warmup_steps": 1,
                          "eval_every": 0, "save_every": 0, "distributed": mode}}
    port = free_port()
    mp.spawn(dist_worker.spawned_job, nprocs=2, join=True,
             args=(2, port, [overrides(base, tmp_path / "two"), overrides(unreadable, tmp_path / "two")]))
    one = run(load_config(None, overrides(base, tmp_path / "one")), log=lambda m: None)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-9)
    assert (two["accuracy_before"], two["accuracy_after"]) == (one["accuracy_before"], one["accuracy_after"])
    assert_same_weights(load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors")),
                        load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors")))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_k_adapters_at_once_on_two_ranks_equal_one_process(tmp_path, mode):
    """Adapters a and b trained together (each row through its own adapter) over 2 ranks: each adapter's
    losses and weights are the one-process run's; under fsdp (sharded optimizer state cut per adapter)
    each resumes from its checkpoint on 2 ranks too."""
    config = {**CONFIG, "micro_batch_size": 1, "steps": 4, "save_every": 2, "distributed": mode}
    ranks(tmp_path / "two", {**config, "together": True})
    model = dist_worker.two_adapters()
    train(model, dist_worker.two_sequences(), TrainConfig(**config), tmp_path / "one" / "run", pad_id=1)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    got = [load_file(str(tmp_path / "two" / f"rank-{r}.safetensors")) for r in (0, 1)]
    assert_same_weights(got[0], got[1], tol=0)
    assert_same_weights(weights, got[0])
    for name in ("a", "b"):
        assert losses(tmp_path / "two" / "run" / name) == pytest.approx(losses(tmp_path / "one" / "run" / name),
                                                                       rel=1e-9)
    if mode == "ddp":
        return
    rewind(tmp_path / "two" / "run" / "a", tmp_path / "on2" / "run" / "a", 2)
    rewind(tmp_path / "two" / "run" / "b", tmp_path / "on2" / "run" / "b", 2)
    ranks(tmp_path / "on2", {**config, "together": True}, resume=True)
    assert json.loads((tmp_path / "on2" / "rank-0.json").read_text())["start_step"] == 2
    assert_same_weights(weights, load_file(str(tmp_path / "on2" / "rank-1.safetensors")))


def test_ddp_gradients_are_views_into_its_buckets():
    """No copy of each gradient into DDP's bucket and back: after a backward the adapter's gradients
    share the bucket's storage (a world of one gloo rank, in this process)."""
    import torch.distributed as dist

    from efftune.train.distributed import data_parallel
    model, _ = dist_worker.method_model("lora")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = data_parallel(model, unused_parameters=False)
        ids = torch.tensor([[2, 3, 4, 5, 6]])
        logp = wrapped(ids, torch.zeros(4, dtype=torch.long), torch.arange(4), ids[0, 1:])  # each next token
        logp.sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert len(grads) > 1 and all(g is not None for g in grads)
        assert len({g.untyped_storage().data_ptr() for g in grads}) < len(grads)  # several in one bucket
    finally:
        dist.destroy_process_group()


def test_compiled_blocks_compile_without_dynamos_ddp_graph_splits(tmp_path, monkeypatch):
    """train.compile: while train() runs, dynamo's DDPOptimizer is off (a block is one graph, not one
    per DDP bucket), and torch's setting is back as it was afterwards."""
    from efftune.train import loop
    monkeypatch.setattr(loop, "compile_blocks", lambda model, **_: None)  # the setting, not a CPU compile
    seen = []
    model, _ = dist_worker.method_model("lora")
    before = torch._dynamo.config.optimize_ddp
    train(model, dist_worker.sequences(), TrainConfig(**{**CONFIG, "steps": 1, "compile": True}), tmp_path, pad_id=1,
          on_metrics=lambda _, row: seen.append(torch._dynamo.config.optimize_ddp))
    assert seen and not any(seen)
    assert torch._dynamo.config.optimize_ddp == before
