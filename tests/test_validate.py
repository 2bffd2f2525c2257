"""Bad input: one clear line naming the key, before any cluster work."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("overrides, message", [
    (["distill.layer_map=sideways"], "unknown layer map"),
    (["distill.layer_map=explicit", "distill.layers=[1,9]"], "out of range"),
    (["student.layers=6", "student.init=teacher"], "deeper than the teacher"),
    (["student.hidden_size=128"], "wider"),
    (["units.ratio=1.5"], "must be in (0, 1]"),
    (["ted.width=0"], "filter width must be > 0"),
    (["ted.filter=conv"], "unknown filter"),
    (["task.name=glue9"], "unknown task"),
    (["task.name=sst2", "task.data_dir=/nonexistent/sst2"], "task.data_dir"),
    (["teacher=./no/such/model"], "no model directory"),
])
def test_train_command_rejects_bad_input_in_one_line_before_ray(overrides: list[str], message: str,
                                                               capsys: pytest.CaptureFixture) -> None:
    import ray

    from kdsearch.train import main

    assert main(overrides) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not ray.is_initialized()  # rejected before any cluster work
