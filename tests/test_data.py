"""Task data: every file format and the GLUE release layouts, subsampling, one-line config errors, the default
task, metrics against hand-computed values, and a slice of the real SST-2 files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_utils import ROWS, load, sst2_dir, write

from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data.loading import check_task, load_raw_task
from kdsearch.data.metrics import compute_metrics, metric_names
from kdsearch.data.tasks import DEFAULT_TASK_VOCAB, TASKS, default_label, default_rows, read_by, task_spec

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # ../shared beside the checkout
pytestmark = pytest.mark.usefixtures("offline")


# --- loading ------------------------------------------------------------------------------------------
def test_hub_loader_reads_a_dataset_repo_laid_out_like_the_hubs_glue(tmp_path: Path) -> None:
    # The hub's GLUE repo: one parquet folder per task config, declared in the README's YAML header. A local
    # copy goes through the very same load_dataset(hub, config) call as `task.hub=nyu-mll/glue` online.
    repo = tmp_path / "glue"
    rows = [{"sentence": s, "label": y, "idx": i} for i, (s, y) in enumerate(ROWS)]
    for split in ("train", "validation"):
        write(repo / "sst2" / f"{split}-00000-of-00001.parquet", rows, "parquet")
    hidden = [{**row, "label": -1} for row in rows]  # the hub's GLUE test splits hide their labels
    write(repo / "sst2" / "test-00000-of-00001.parquet", hidden, "parquet")
    splits = "".join(f"  - split: {s}\n    path: sst2/{s}-*\n" for s in ("train", "validation", "test"))
    (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: sst2\n  data_files:\n{splits}---\n")
    spec, raw = load(tmp_path, name="sst2", hub=str(repo))
    assert spec.name == "sst2" and set(raw) == {"train", "validation"}
    assert raw["train"].column_names == ["sentence", "label"] and raw["train"]["label"] == [y for _, y in ROWS]
    with pytest.raises(ConfigError, match="task.hub=.*cannot load cola"):
        load(tmp_path, name="cola", hub=str(repo))
    with pytest.raises(ConfigError, match="test: every label is -1, i.e. unlabelled"):
        load(tmp_path, name="sst2", hub=str(repo), splits=("test",))


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_every_file_format_loads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    spec, raw = load(tmp_path, name="sst2", data_dir=str(sst2_dir(tmp_path / "d", fmt)))
    assert spec.name == "sst2" and set(raw) == {"train", "validation"}
    assert raw["train"].column_names == ["sentence", "label"]
    assert [(r["sentence"], r["label"]) for r in raw["train"]] == ROWS
    assert len(raw["validation"]) == 3


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_a_byte_order_mark_and_blank_lines_do_not_change_the_rows(tmp_path: Path, fmt: str) -> None:
    d = sst2_dir(tmp_path / "d", fmt)
    train = d / f"train.{fmt}"
    header, *rows = train.read_text(encoding="utf-8").splitlines(keepends=True)
    train.write_text("\ufeff" + header + "\n" + "".join(rows), encoding="utf-8")  # as Excel saves, a blank line
    spec, raw = load(tmp_path, name="sst2", data_dir=str(d))
    assert raw["train"].column_names == ["sentence", "label"]
    assert [(r["sentence"], r["label"]) for r in raw["train"]] == ROWS


def test_validation_file_name_pair_task_and_mnli_dev_matched(tmp_path: Path) -> None:
    rows = [{"sentence1": "a b", "sentence2": "c d", "label": 1, "idx": 0}] * 4
    write(tmp_path / "m" / "train.jsonl", rows, "jsonl")
    write(tmp_path / "m" / "validation.jsonl", rows, "jsonl")
    spec, raw = load(tmp_path, name="mrpc", data_dir=str(tmp_path / "m"))
    assert raw["validation"].column_names == ["sentence1", "sentence2", "label"]  # extra columns dropped
    nli = [{"premise": "p", "hypothesis": "h", "label": 2}] * 3
    write(tmp_path / "n" / "train.tsv", nli, "tsv")
    write(tmp_path / "n" / "dev_matched.tsv", nli, "tsv")
    assert load(tmp_path, name="mnli", data_dir=str(tmp_path / "n"))[1]["validation"]["label"] == [2, 2, 2]


def test_regression_labels_are_floats(tmp_path: Path) -> None:
    rows = [{"sentence1": "a", "sentence2": "b", "label": 3.8},
            {"sentence1": "c", "sentence2": "d", "label": 1}]
    write(tmp_path / "s" / "train.tsv", rows, "tsv")
    write(tmp_path / "s" / "dev.tsv", rows, "tsv")
    spec, raw = load(tmp_path, name="stsb", data_dir=str(tmp_path / "s"))
    assert spec.kind == "regression" and raw["train"]["label"] == pytest.approx([3.8, 1.0])


# The original GLUE release's TSVs (gluebenchmark.com zips), first lines as shipped; "\t" separated.
RELEASE = {
    "cola": ("", ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tThey drank the pub."]),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
             ["1\t702876\t702977\tAmrozi accused his brother.\tReferring to him, Amrozi accused his brother.",
              "0\t2108705\t2108831\tYucaipa owned Dominick 's.\tYucaipa bought Dominick 's in 1995."]),
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
             ["0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane "
              "is taking off.\t5.000", "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays."
              "\tA man plays a flute.\t3.800"]),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label",
             ["0\t31193\t31193n\tgovernment\tConceptually cream skimming.\tProduct and geography.\tneutral"
              "\tneutral", "1\t101457\t101457e\ttelephone\tyou know during the season\tYou lose the things"
              "\tentailment\tentailment", "2\t134793\t134793e\tfiction\tOne of our number\tA member"
              "\tcontradiction\tcontradiction"]),
    "qnli": ("index\tquestion\tsentence\tlabel",
             ["0\tWhen did it end?\tIt ended in 1990.\tentailment", "1\tWho?\tNobody knows.\tnot_entailment"]),
}
HUB_VIEW = {"cola": [("Our friends won't buy this analysis.", 1), ("They drank the pub.", 0)],
            "mrpc": [("Amrozi accused his brother.", "Referring to him, Amrozi accused his brother.", 1),
                     ("Yucaipa owned Dominick 's.", "Yucaipa bought Dominick 's in 1995.", 0)],
            "stsb": [("A plane is taking off.", "An air plane is taking off.", 5.0),
                     ("A man plays.", "A man plays a flute.", 3.8)],
            "mnli": [("Conceptually cream skimming.", "Product and geography.", 1),
                     ("you know during the season", "You lose the things", 0), ("One of our number", "A member", 2)],
            "qnli": [("When did it end?", "It ended in 1990.", 0), ("Who?", "Nobody knows.", 1)]}


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_the_original_glue_release_layout_loads_as_the_hubs(tmp_path: Path, name: str) -> None:
    header, rows = RELEASE[name]
    d = tmp_path / name
    d.mkdir()
    for stem in ("train", "dev_matched" if name == "mnli" else "dev"):
        (d / f"{stem}.tsv").write_text("".join(f"{line}\n" for line in ([header] if header else []) + rows))
    spec, raw = load(tmp_path, name=name, data_dir=str(d))
    assert raw["train"].column_names == [*spec.text_fields, "label"]
    got = [tuple(round(v, 4) if isinstance(v, float) else v for v in r.values()) for r in raw["validation"]]
    assert got == HUB_VIEW[name]


def test_release_labels_outside_the_task_classes_are_one_line_errors(tmp_path: Path) -> None:
    d = tmp_path / "rte"
    d.mkdir()
    for stem in ("train", "dev"):
        (d / f"{stem}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n")
    with pytest.raises(ConfigError, match=r"labels \['neutral'\] are not rte classes"):
        load(tmp_path, name="rte", data_dir=str(d))


def test_text_task_reads_text_prompt_response_and_instruction_layouts(tmp_path: Path) -> None:
    layouts = {"t": [{"text": "hello world"}, {"text": "  "}, {"text": "bye"}],
               "p": [{"prompt": "Q: 2+2?", "response": " 4"}] * 2,
               "i": [{"instruction": "Add", "input": "2 2", "output": "4"}] * 2,
               "s": [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}]}  # GLUE SST-2
    for name, rows in layouts.items():
        kind = "tsv" if name == "s" else "jsonl"
        write(tmp_path / name / f"train.{kind}", rows, kind)
        write(tmp_path / name / f"dev.{kind}", rows, kind)
    raw = {name: load(tmp_path, name="text", data_dir=str(tmp_path / name))[1]["train"] for name in layouts}
    assert raw["t"]["prompt"] == ["", ""] and raw["t"]["response"] == ["hello world", "bye"]  # blank dropped
    assert raw["p"][0] == {"prompt": "Q: 2+2?", "response": " 4"}
    assert raw["i"][0] == {"prompt": "Add\n2 2\n", "response": "4"}
    assert raw["s"]["response"] == ["a fine film", "dull"] and raw["s"]["prompt"] == ["", ""]  # labels dropped


def test_subsample_is_seeded_and_draws_from_the_data(tmp_path: Path) -> None:
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(40)]
    write(tmp_path / "d" / "train.tsv", rows, "tsv")
    write(tmp_path / "d" / "dev.tsv", rows, "tsv")
    task = dict(name="sst2", data_dir=str(tmp_path / "d"), train_size=7, eval_size=3)
    first, again = load(tmp_path, **task)[1], load(tmp_path, **task)[1]
    assert (len(first["train"]), len(first["validation"])) == (7, 3)
    assert first["train"]["sentence"] == again["train"]["sentence"]
    assert set(first["train"]["sentence"]) < {r["sentence"] for r in rows}
    assert first["train"]._fingerprint == again["train"]._fingerprint  # content-addressed
    assert load(tmp_path, **{**task, "train_size": 1000})[1]["train"].num_rows == 40


# --- errors -------------------------------------------------------------------------------------------
def _broken(tmp_path: Path, case: str) -> dict:
    d = tmp_path / "d"
    if case == "no_dir":
        return dict(name="sst2", data_dir=str(tmp_path / "missing"))
    sst2_dir(d)
    if case == "unknown_task":
        return dict(name="sst3", data_dir=str(d))
    if case == "no_data":  # a GLUE name alone reads the hub's glue; a corpus has no hub default
        return dict(name="text")
    if case == "no_dev":
        (d / "dev.tsv").unlink()
    if case == "empty":
        (d / "train.tsv").write_text("")
    if case == "header_only":
        (d / "dev.tsv").write_text("sentence\tlabel\n")
    if case == "no_label":
        write(d / "train.tsv", [{"sentence": "x", "labels": 1}], "tsv")
    if case == "no_text":
        write(d / "train.tsv", [{"text": "x", "label": 1}], "tsv")
    if case == "two_train_files":
        write(d / "train.csv", [{"sentence": "x", "label": 1}], "csv")
    if case == "jsonl_not_objects":
        (d / "train.tsv").unlink()
        (d / "train.jsonl").write_text('["x", 1]\n["y", 0]\n')
    if case == "empty_parquet":
        (d / "train.tsv").unlink()
        pq.write_table(pa.table({"sentence": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
                       d / "train.parquet")
    return dict(name="sst2", data_dir=str(d))


ERRORS = {"no_dir": ("task.data_dir", "no such directory"), "unknown_task": ("task.name=sst3", "sst2, stsb"),
          "no_data": ("task.data_dir", "needs data"), "no_dev": ("task.data_dir", "no validation file"),
          "empty": ("task.data_dir", "train.tsv is empty"), "header_only": ("task.data_dir", "no rows"),
          "no_label": ("task.data_dir", "found columns: sentence, labels"),
          "no_text": ("task.data_dir", "no 'sentence' column"),
          "two_train_files": ("task.data_dir", "keep one"),
          "empty_parquet": ("task.data_dir", "no rows"),
          "jsonl_not_objects": ("task.data_dir", "train.jsonl is not a JSON object")}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_task_settings_raise_one_line_config_errors(tmp_path: Path, case: str) -> None:
    task = _broken(tmp_path, case)
    for call in (lambda: check_task(TaskConfig(**task)), lambda: load(tmp_path, **task)):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and all(part in message for part in ERRORS[case]), message


def test_check_task_reads_only_the_header_while_loading_reports_bad_rows(tmp_path: Path) -> None:
    d = sst2_dir(tmp_path / "d")
    (d / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t7\n")  # 7: not a class of sst2
    assert check_task(TaskConfig(name="sst2", data_dir=str(d))).name == "sst2"
    with pytest.raises(ConfigError, match=r"task.data_dir=.*labels span 1..7.*classes 0..1"):
        load(tmp_path, name="sst2", data_dir=str(d))


def test_default_task_rejects_a_data_dir() -> None:
    with pytest.raises(ConfigError, match="task.data_dir=x.*generated in code"):
        check_task(TaskConfig(data_dir="x"))


def test_unknown_task_name_lists_every_choice() -> None:
    with pytest.raises(ConfigError, match="task.name=foo: unknown task; choose one of: cola, default"):
        task_spec("foo")
    with pytest.raises(ConfigError, match=r"task.name=sst: unknown task; did you mean sst2\?; choose one of: "):
        task_spec("sst")
    glue = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert set(TASKS) == glue | {"default", "text", "table", "seq2seq", "seq2seq_default", "qa_default",
                                 "qa_default_v2", "squad", "squad_v2"}
    from kdsearch.config.schema import GLUE_TASKS

    assert set(GLUE_TASKS) == glue


# --- the embedded default task ------------------------------------------------------------------------
def test_default_task_is_deterministic_balanced_small_and_follows_its_rules() -> None:
    rows = default_rows(400, 100)
    assert rows == default_rows(400, 100)
    train, val, test = rows["train"], rows["validation"], rows["test"]
    assert (len(train["label"]), len(val["label"]), len(test["label"])) == (400, 100, 100)
    assert sum(train["label"]) == 200 and sum(test["label"]) == 50
    assert not set(train["sentence"]) & set(val["sentence"])
    assert not (set(train["sentence"]) | set(val["sentence"])) & set(test["sentence"])  # held out
    words = {w for s in train["sentence"] for w in s.split()}
    assert words <= set(DEFAULT_TASK_VOCAB) and len(DEFAULT_TASK_VOCAB) <= 60
    assert all(6 <= len(s.split()) <= 20 for s in train["sentence"])
    assert all(default_label(s) == y for s, y in zip(train["sentence"], train["label"], strict=True))
    cases = {"good": 1, "not good": 0, "never very bad": 1, "very bad good": 0, "good but bad": 0,
             "bad but not the bad": 1, "not not good": 1, "good bad": None}
    assert {s: default_label(s) for s in cases} == cases


def test_default_task_loads_with_its_full_size_and_label_words() -> None:
    spec, raw = load_raw_task(TaskConfig())
    assert list(raw) == ["train", "validation"]  # training never reads the test split
    assert (raw["train"].num_rows, raw["validation"].num_rows) == (4000, 500)
    assert spec.kind == "classification" and spec.label_words == ("negative", "positive")
    _, held_out = load_raw_task(TaskConfig(train_size=10, eval_size=10), splits=("test",))
    assert list(held_out) == ["test"] and held_out["test"].num_rows == 500  # read whole, not subsampled


def test_a_test_split_is_read_from_its_own_file_and_must_hold_labels(tmp_path: Path) -> None:
    root = sst2_dir(tmp_path / "sst2")
    with pytest.raises(ConfigError, match=r"no test file; expected one of test.tsv"):
        load(tmp_path, name="sst2", data_dir=str(root), splits=("test",))
    write(root / "test.tsv", [{"sentence": s, "label": y} for s, y in ROWS[1:]], "tsv")
    _, raw = load(tmp_path, name="sst2", data_dir=str(root), splits=("test",))
    assert raw["test"]["label"] == [y for _, y in ROWS[1:]]
    write(root / "test.tsv", [{"sentence": s, "label": -1} for s, _ in ROWS], "tsv")  # as GLUE's hub ships it
    with pytest.raises(ConfigError, match="every label is -1, i.e. unlabelled"):
        load(tmp_path, name="sst2", data_dir=str(root), splits=("test",))
    stsb = tmp_path / "stsb"  # a regression task's hidden scores are -1.0 too
    pairs = [{"sentence1": "a b", "sentence2": "c d", "label": 2.5}] * 3
    write(stsb / "train.tsv", pairs, "tsv")
    write(stsb / "dev.tsv", pairs, "tsv")
    write(stsb / "test.tsv", [{**p, "label": -1.0} for p in pairs], "tsv")
    with pytest.raises(ConfigError, match="every label is -1, i.e. unlabelled"):
        load(tmp_path, name="stsb", data_dir=str(stsb), splits=("test",))


# --- metrics ------------------------------------------------------------------------------------------
def test_classification_metrics_match_hand_computed_values() -> None:
    pred, gold = np.array([1, 1, 0, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1, 0, 1])
    # tp=3 fp=1 fn=1 tn=2: f1 = 6/8; mcc = (3*2 - 1*1) / sqrt(4*4*3*3) = 5/12
    mrpc = compute_metrics(task_spec("mrpc"), pred, gold)
    assert mrpc == pytest.approx({"accuracy": 5 / 7, "f1": 0.75, "score": 0.75})
    cola = compute_metrics(task_spec("cola"), pred, gold)
    assert cola == pytest.approx({"accuracy": 5 / 7, "matthews": 5 / 12, "score": 5 / 12})
    logits = np.eye(3)[[0, 2, 1, 1]] + 0.1  # argmax -> 0, 2, 1, 1
    assert compute_metrics(task_spec("mnli"), logits, np.array([0, 2, 2, 1]))["score"] == 0.75
    assert compute_metrics(task_spec("cola"), np.ones(4, int), np.array([0, 1, 0, 1]))["matthews"] == 0.0
    # a table's macro F1: per class (0: 1, 1: P=R=1/2, 2: P=R=1/2), unweighted mean 2/3
    from dataclasses import replace

    table = replace(task_spec("table"), num_labels=3, primary_metric="macro_f1")
    out = compute_metrics(table, np.array([0, 1, 2, 2, 1]), np.array([0, 1, 1, 2, 2]))
    assert out == pytest.approx({"accuracy": 0.6, "macro_f1": 2 / 3, "score": 2 / 3})


@pytest.mark.parametrize("family", ["encoder", "causal"])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_metric_names_are_known_before_any_data(name: str, family: str) -> None:
    spec = read_by(task_spec(name), family)  # type: ignore[arg-type]
    pred, gold = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    assert tuple(compute_metrics(spec, pred, gold)) == metric_names(spec)
    assert spec.primary_metric in metric_names(spec)


def test_non_finite_predictions_score_nan_and_constant_sides_correlate_zero() -> None:
    stsb, sst2 = task_spec("stsb"), task_spec("sst2")
    overflowed = compute_metrics(stsb, np.array([0.0, 1, 2, 3, np.nan, np.inf]), np.arange(6.0))
    assert all(np.isnan(v) for v in overflowed.values())  # not the rank correlation of the finite rows
    logits = np.array([[0.1, 0.9], [np.nan, 0.0]])
    assert np.isnan(compute_metrics(sst2, logits, np.array([1, 0]))["score"])
    constant = compute_metrics(stsb, np.full(7, 0.1), np.full(7, 0.3))
    assert constant == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}


def test_regression_metrics_with_ties_match_hand_computed_values() -> None:
    x, y = np.array([1.0, 2.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0, 2.0])
    # ties share their mean rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 4, 2.5, 2.5)
    out = compute_metrics(task_spec("stsb"), x.reshape(-1, 1), y)
    # pearson: dx=(-1.25,-.25,-.25,1.75), dy=(-1,1,0,0): cov=1.0, |dx|^2=4.75, |dy|^2=2
    assert out["pearson"] == pytest.approx(1.0 / np.sqrt(4.75 * 2))
    # spearman: ranks centred (-1.5,0,0,1.5) and (-1.5,1.5,0,0): 2.25 / sqrt(4.5 * 4.5) = 0.5
    assert out["spearman"] == pytest.approx(0.5) and out["score"] == out["spearman"]
    assert compute_metrics(task_spec("stsb"), np.ones(4), y)["pearson"] == 0.0


def test_token_accuracy_ignores_masked_positions() -> None:
    labels = np.array([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    preds = np.array([[9, 9, 5, 0], [9, 7, 8, 9]])
    assert compute_metrics(task_spec("text"), preds, labels) == {"token_accuracy": 0.75, "score": 0.75}
    flat = compute_metrics(task_spec("text"), np.array([5, 0, 7, 8]), np.array([5, 6, 7, 8]))
    assert flat["score"] == 0.75


# --- real data ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not SST2.is_dir(), reason="no local SST-2 copy")
def test_a_slice_of_the_real_sst2_files_loads(tmp_path: Path) -> None:
    for name in ("train.tsv", "dev.tsv"):
        with (SST2 / name).open(encoding="utf-8") as src:
            head = [src.readline() for _ in range(201)]  # header + 200 rows
        (tmp_path / name).write_text("".join(head), encoding="utf-8")
    shutil.copy(tmp_path / "dev.tsv", tmp_path / "dev.copy")  # unrelated files are ignored
    spec, raw = load(tmp_path, name="sst2", data_dir=str(tmp_path))
    assert (raw["train"].num_rows, raw["validation"].num_rows) == (200, 200)
    assert set(raw["train"]["label"]) == {0, 1} and all(raw["train"]["sentence"])


def test_a_glue_name_alone_reads_the_hubs_glue_and_says_so_in_its_config() -> None:
    from kdsearch.config.overrides import load_config
    from kdsearch.config.schema import GLUE_TASKS
    from kdsearch.data.tasks import TASKS

    assert all(TASKS[name].kind in ("classification", "regression") for name in GLUE_TASKS)
    assert load_config(["task=sst2"]).task.hub == "glue"  # logged as such, so the run says where its data came from
    assert load_config(["task=sst2", "task.data_dir=/data/sst2"]).task.hub is None
    assert load_config(["task=sst2", "task.hub=my/glue-copy"]).task.hub == "my/glue-copy"
    assert load_config(["task=default"]).task.hub is None
