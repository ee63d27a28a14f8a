"""The pure helpers of bench/lorahub_bbh.py: the in-context prompt format and the table's averages."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from efftune.data.examples import MultipleChoice

_PATH = Path(__file__).resolve().parents[2] / "bench" / "lorahub_bbh.py"
_spec = importlib.util.spec_from_file_location("lorahub_bbh", _PATH)
bbh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bbh)

INSTR = "Do you return to the start?\n"


def mc(body: str, answer: int, instruction: str = INSTR) -> MultipleChoice:
    return MultipleChoice(f"{instruction}Q: {body}\nA: ", ("True", "False"), answer)


def test_icl_prompt_puts_instruction_once_and_shots_with_answers():
    shots = [mc("Take 1 step.", 1), mc("Turn around.", 0)]
    query = mc("Take 2 steps.", 0)
    assert bbh.shared_instruction([s.prompt for s in shots + [query]]) == INSTR
    text = bbh.icl_prompt(shots, query.prompt, INSTR)
    assert text == (INSTR + "Q: Take 1 step.\nA: False\n\n" + "Q: Turn around.\nA: True\n\n"
                    + "Q: Take 2 steps.\nA: ")
    # without an instruction each shot is its whole prompt + answer; choices and labels are kept
    ex = bbh.icl_examples(shots[:1], [query])[0]
    assert ex.prompt == shots[0].prompt + "False\n\n" + query.prompt
    assert (ex.choices, ex.answer, ex.correct) == (query.choices, query.answer, query.correct)
    # prompts that share no full line have no instruction
    assert bbh.shared_instruction(["Q: a b", "Q: a c"]) == ""


def test_average_row_skips_missing_values_and_table_has_average():
    rows = [{"task": "a", "zero_shot": 0.5, "icl": 0.6, "lorahub_avg": 0.4, "lorahub_best": 0.5, "lora": 0.3,
             "tokens": {"zero_shot": 100.0, "icl": 600.0, "lorahub": 100.0}},
            {"task": "b", "zero_shot": 0.7, "icl": 0.8, "lorahub_avg": None, "lorahub_best": None, "lora": 0.5,
             "tokens": {"zero_shot": 50.0, "icl": 300.0, "lorahub": 50.0}}]
    avg = bbh.average_row(rows)
    assert avg["zero_shot"] == pytest.approx(0.6) and avg["icl"] == pytest.approx(0.7)
    assert avg["lorahub_avg"] == pytest.approx(0.4)  # task b has no LoraHub run: left out, not a zero
    assert avg["tokens"] == {"zero_shot": 75.0, "icl": 450.0, "lorahub": 75.0}
    table = bbh.render_table(rows)
    assert "| **average (2 tasks)** | **60.0** | **70.0** | **40.0** | **50.0** | **40.0** |" in table
    assert "| b | 70.0 | 80.0 | – | – | 50.0 |" in table
    assert "ICL 5-shot 450.0" in table
