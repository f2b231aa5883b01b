"""Outside a terminal, progress is a line every N steps or S seconds, not a redrawn tqdm bar per update."""

import io
import sys

from tqdm.auto import tqdm

from vlm import progress as progress_module
from vlm.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_in_a_terminal_and_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert isinstance(progress_bar(total=3, desc="train"), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(total=3, desc="train"), LineProgress)


def test_lines_every_n_steps_with_the_fields_and_the_last_position(monkeypatch):
    clock = iter(range(0, 10_000))  # one second per call: never 30 s between two updates
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock) / 100)
    out = io.StringIO()
    bar = LineProgress(total=120, desc="train", every=50, unit="step", stream=out)
    for step in range(1, 124):  # past total, as a resumed run's counter may be: no crash, no extra lines
        bar.set_postfix(loss=f"{1 / step:.4f}", lr="1.00e-03")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "train 1/120 (1%)", "train 50/120 (42%)", "train 100/120 (83%)", "train 123/120 (102%)"
    ]
    assert lines[1].split(" | ")[1] == "loss=0.0200 lr=1.00e-03"  # the fields of the step printed
    assert "step/s" in lines[1] and "eta" in lines[1]


def test_slow_steps_still_print_every_so_many_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="train", every=100, seconds=30, stream=out)
    for _ in range(10):
        now[0] += 12.0
        bar.update(1)
    printed = [line.split(" | ")[0] for line in out.getvalue().splitlines()]
    assert printed == ["train 1/1000 (0%)", "train 4/1000 (0%)", "train 7/1000 (1%)", "train 10/1000 (1%)"]


def test_iterating_prints_and_a_disabled_one_prints_nothing(capsys):
    assert list(LineProgress(range(5), desc="predict", every=2, unit="batch")) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" | ")[0] for line in err] == ["predict 1/5 (20%)", "predict 2/5 (40%)",
                                                      "predict 4/5 (80%)", "predict 5/5 (100%)"]
    bar = LineProgress(total=5, disable=True)
    bar.update(5)
    bar.write("eval loss 1.0")
    bar.close()
    assert capsys.readouterr() == ("", "")
