"""Progress on stderr: downloads, evaluations, and a training bar whose estimate ignores evaluations."""
from __future__ import annotations

import io
import zipfile

import pytest
from tqdm import tqdm

import efftune.eval.multiple_choice as mc_module
import efftune.eval.perplexity as ppl_module
from efftune.cache import pip_download
from efftune.data import Completion, Formatter, MultipleChoice
from efftune.errors import EfftuneError
from efftune.eval.multiple_choice import multiple_choice_accuracy
from efftune.eval.perplexity import perplexity
from efftune.progress import SideTime, progress_bar
from tests.conftest import tiny_llama


def test_side_time_keeps_evaluations_out_of_the_rate_and_estimate():
    now = [0.0]
    bar = tqdm(total=10, file=io.StringIO(), mininterval=0, miniters=1)
    bar._time = lambda: now[0]  # a clock the test moves by hand
    bar.start_t = bar.last_print_t = 0.0
    side = SideTime(bar)
    for _ in range(2):  # two steps of 1 s
        now[0] += 1
        bar.update(1)
    with side:  # a 100 s evaluation
        now[0] += 100
    now[0] += 1
    bar.update(1)
    info = bar.format_dict
    assert info["elapsed"] == 3.0 and info["n"] == 3
    assert info["rate"] == pytest.approx(1.0)  # the smoothed rate saw three 1 s steps, no 101 s one
    assert side.seconds == 100.0 and side.postfix() == {"eval": "100s"}
    assert SideTime(bar).postfix() == {}
    bar.close()


def test_disabled_bars_and_side_time_do_nothing(capsys):
    now = [10.0]
    bar = progress_bar(5, "x", enable=False)
    bar._time = lambda: now[0]  # a clock the test moves by hand
    with SideTime(bar) as side:
        now[0] += 7.5
        bar.update(5)
    bar.close()
    # the side time is still counted (the run's postfix), but a disabled bar (which keeps no clock
    # of its own) is left alone
    assert side.seconds == 7.5 and side.postfix() == {"eval": "8s"}
    assert not hasattr(bar, "start_t") and capsys.readouterr().err == ""


def _choice_examples(n: int) -> list[MultipleChoice]:
    return [MultipleChoice(f"Q: Is {w} blue?\nA:", (" yes", " no"), i % 2, (i % 2,))
            for i, w in enumerate(["sky", "grass", "fox", "dog", "the sea"] * (n // 5))]


def _spy(monkeypatch, module) -> list[tqdm]:
    """Keep every bar `module` makes (they close without a trace on screen, by design)."""
    bars = []

    def spying(*args, **kwargs):
        bars.append(progress_bar(*args, **kwargs))
        return bars[-1]
    monkeypatch.setattr(module, "progress_bar", spying)
    monkeypatch.setattr(module, "QUIET_SECONDS", 0)  # show at once, however fast
    return bars


def test_evaluations_show_a_bar_over_their_examples(capsys, monkeypatch, tokenizer):
    model, formatter = tiny_llama(), Formatter(tokenizer, max_length=64)
    examples = _choice_examples(20)
    plain = multiple_choice_accuracy(model, formatter, examples)  # under a second: no bar at all
    assert capsys.readouterr().err == ""
    bars = _spy(monkeypatch, mc_module)
    assert multiple_choice_accuracy(model, formatter, examples, rows_per_batch=1) == plain
    assert "eval" in capsys.readouterr().err
    (bar,) = bars
    assert bar.total == bar.n == len(examples) and not bar.leave  # every example counted once
    assert multiple_choice_accuracy(model, formatter, examples, progress=False) == plain
    assert capsys.readouterr().err == ""  # although bars now show at once
    bars = _spy(monkeypatch, ppl_module)
    texts = [Completion(f"Q: Is the {w} blue?\nA:", " yes") for w in ["sky", "sea", "fox"]]
    perplexity(model, formatter, texts, row_tokens=16)
    (bar,) = bars
    assert "eval perplexity" in capsys.readouterr().err and bar.total == bar.n >= 1 and not bar.leave


def _wheel(path, payload: bytes) -> None:
    """A minimal valid wheel (pip reads its metadata before it accepts the file)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("demo/data.bin", payload)
        zf.writestr("demo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
        zf.writestr("demo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                "Tag: py3-none-any\n")
        zf.writestr("demo-1.0.dist-info/RECORD", "")


def test_pip_download_shows_the_bytes_and_names_a_failure(tmp_path, capsys):
    source = tmp_path / "src" / "demo-1.0-py3-none-any.whl"
    source.parent.mkdir()
    _wheel(source, bytes(range(256)) * 1024)
    dest = tmp_path / "dest"
    dest.mkdir()
    got = pip_download(str(source), dest)  # a local file: no index is asked
    assert got == dest / source.name and got.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == [source.name]  # pip's temporary files are gone
    err = capsys.readouterr().err
    assert f"downloading {source}" in err and "B" in err
    with pytest.raises(EfftuneError, match=r"could not download .*nothing-here-1\.0-py3-none-any\.whl.*pip said"):
        pip_download(str(tmp_path / "nothing-here-1.0-py3-none-any.whl"), dest)
    assert sorted(p.name for p in dest.iterdir()) == [source.name]
