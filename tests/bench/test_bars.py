"""The bars bench/throughput.py and bench/moe_lora.py report are the issues' (no GPU needed: a bar is
arithmetic on the per-case lines, fed here with measured GPU numbers from bench/RESULTS.md)."""
from bench.throughput import qlora_bar, summarize


def line(case: str, tokens_s: float, peak_gib: float | None) -> dict:
    return dict(shape="llama3-8b", batch=1, case=case, tokens_s=tokens_s, peak_gib=peak_gib)


def test_qlora_bar_compares_checkpointed_nf4_with_each_peer_and_uncheckpointed_with_bf16():
    results = [line("peft-qlora-kbit-ckpt", 5456.7, 16.72), line("peft-qlora-ckpt", 6073.5, 12.78),
               line("efftune-compile-nf4-ckpt-cg", 11517.8, 7.78),
               line("efftune-compile-cg", 16118.0, 27.75), line("efftune-compile-nf4-cg", 15021.0, 18.09)]
    bar = summarize(results)["results"]["llama3-8b batch 1"]["qlora_bar"]
    ckpt = bar["efftune-compile-nf4-ckpt-cg"]
    # 11517.8 / 5456.7 = 2.111 at 7.78 / 16.72 = 0.465: met; against the bare peer 1.896x: not
    assert ckpt["peft-qlora-kbit-ckpt"] == dict(speed=2.111, peak=0.465, passes=True)
    assert ckpt["peft-qlora-ckpt"] == dict(speed=1.896, peak=0.609, passes=False)
    assert bar["efftune-compile-nf4-cg"] == dict(speed_vs_bf16=0.932, passes=True)


def test_qlora_bar_fails_on_memory_alone_and_is_absent_without_its_cases():
    ok = {"peft-qlora-kbit-ckpt": line("peft-qlora-kbit-ckpt", 5000.0, 16.0),
          "efftune-nf4-ckpt": line("efftune-nf4-ckpt", 12000.0, 12.5)}  # 2.4x, but 0.781x the peak
    assert qlora_bar(ok)["efftune-nf4-ckpt"]["peft-qlora-kbit-ckpt"]["passes"] is False
    ok["efftune-nf4-ckpt"]["peak_gib"] = None  # a CPU run has no peak: no verdict
    assert qlora_bar(ok)["efftune-nf4-ckpt"]["peft-qlora-kbit-ckpt"]["passes"] is None
    assert qlora_bar({"efftune-nf4": line("efftune-nf4", 1.0, 1.0)}) == {
        "efftune-nf4": dict(speed_vs_bf16=None, passes=None)}
    assert qlora_bar({"efftune": line("efftune", 1.0, 1.0)}) is None


def test_moe_nf4_bar_compares_with_the_uncheckpointed_bf16_run():
    from bench.moe_lora import nf4_bar
    results = [dict(case="efftune-compile", tokens_s=52133.5, peak_gib=20.44),  # session 23, call E
               dict(case="efftune-compile-nf4", tokens_s=43798.4, peak_gib=10.43),
               dict(case="efftune-compile-nf4-ckpt", tokens_s=35181.3, peak_gib=8.0),
               dict(case="efftune-nf4", error="OOM")]
    bar = nf4_bar(results)
    assert bar["efftune-compile-nf4"] == dict(speed_vs_bf16=0.84, peak_vs_bf16=0.51, passes=False)
    assert bar["efftune-compile-nf4-ckpt"] == dict(speed_vs_bf16=0.675, peak_vs_bf16=0.391, passes=False)
    assert "efftune-nf4" not in bar
    assert nf4_bar([dict(case="efftune-compile-nf4", tokens_s=1.0, peak_gib=0.3),
                    dict(case="efftune-compile", tokens_s=1.2, peak_gib=1.0)])["efftune-compile-nf4"]["passes"] is True


def test_dora_bar_needs_both_the_peft_and_the_lora_halves():
    from bench.throughput import dora_bar
    ok = {"peft-dora": dict(tokens_s=1000.0, peak_gib=40.0), "efftune": dict(tokens_s=3000.0, peak_gib=15.0),
          "efftune-dora": dict(tokens_s=2800.0, peak_gib=18.0)}  # 2.8x at 0.45x peft; 0.933x LoRA
    assert dora_bar(ok)["efftune-dora"]["passes"] is True
    ok["efftune-dora"]["tokens_s"] = 2600.0  # still 2.6x peft, but 0.867x LoRA
    assert dora_bar(ok)["efftune-dora"]["passes"] is False
    del ok["efftune"]
    assert dora_bar(ok)["efftune-dora"]["passes"] is None
