"""bench/throughput.py's summary line: the bars it reports are the issues' (no GPU needed: the summary
is arithmetic on the per-case lines, fed here with session 25's call A numbers)."""
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
