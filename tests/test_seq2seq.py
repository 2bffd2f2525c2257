"""Encoder-decoder students (T5, BART): models and teacher init, the seq2seq tasks and their tokenisation, the
step's terms against the layer-selection code's formulas, a short run through the loop, and the refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from data_utils import seq2seq_batch as batch_of
from data_utils import write

from kdsearch.config.overrides import load_config
from kdsearch.config.schema import Config, DistillConfig, TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.core.kinds import IGNORE_INDEX
from kdsearch.data.encoding import collate, tokenize_task, train_texts
from kdsearch.data.loading import load_raw_task
from kdsearch.data.metrics import generation_metrics
from kdsearch.data.tasks import number_words, seq2seq_default_rows
from kdsearch.methods.bridges import Bridge
from kdsearch.methods.bridges.projector import ProjectorBridge
from kdsearch.methods.inputs import model_inputs
from kdsearch.methods.layer_maps import run_pairs
from kdsearch.run import models
from kdsearch.run.evaluation import evaluate
from kdsearch.run.loop import step_losses
from kdsearch.run.step import Distiller, teacher_forward
from kdsearch.run.validate import validate

pytestmark = pytest.mark.usefixtures("offline", "one_thread")
SEQ2SEQ = ("tiny-t5", "tiny-bart")



def tiny(name: str, vocab: int = 50, **overrides: object) -> torch.nn.Module:
    config = models.teacher_config(models.resolve_teacher(name), vocab_size=vocab)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return models.task_model_class("seq2seq").from_config(config)


# --- models ------------------------------------------------------------------------------------------------
def _block(key: str) -> tuple[str, int, str] | None:
    match = models._LAYER_KEY.match(key)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_teacher_init_copies_the_mapped_blocks_of_both_stacks(name: str) -> None:
    teacher = tiny(name)
    assert models.family_of(teacher.config) == "seq2seq" and models.decoder_depth(teacher.config) == 4
    student = models.build_student(teacher, layers=2, decoder_layers=1, hidden_size=None, init="teacher", seed=1)
    assert models.depth_width(student.config) == (2, 64) and models.decoder_depth(student.config) == 1
    encoder, decoder = [1, 3], [3]  # forward map: 2 of 4 -> hidden states 2, 4; 1 of 4 -> 4 (0-indexed blocks)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    stacks = set()
    for key, value in s_state.items():
        parsed = _block(key)
        if parsed is None:  # shared embeddings, final layer norms, the LM head (and BART's logit bias)
            torch.testing.assert_close(value, t_state[key], rtol=0, atol=0)
            continue
        prefix, index, rest = parsed
        stacks.add(prefix)
        block = (decoder if "decoder" in prefix.split(".") else encoder)[index]
        if "relative_attention_bias" in rest:  # T5's position bias lives in block 0 of each stack
            block = 0
        torch.testing.assert_close(value, t_state[f"{prefix}.{block}.{rest}"], rtol=0, atol=0)
    assert len(stacks) == 2
    assert any("lm_head" in key for key in s_state)


def test_t5_students_copy_the_papers_table_in_both_stacks() -> None:
    teacher = tiny("tiny-t5", d_model=16, d_kv=4, d_ff=32, num_heads=4, num_layers=12, num_decoder_layers=12)
    student = models.build_student(teacher, layers=3, hidden_size=None, init="teacher", seed=0)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for stack in ("encoder", "decoder"):
        for j, block in enumerate((0, 6, 11)):  # t5mt/make_student.py LAYERS_TO_COPY[12][3]
            key = f"{stack}.block.{j}.layer.0.SelfAttention.q.weight"
            torch.testing.assert_close(s_state[key], t_state[f"{stack}.block.{block}.layer.0.SelfAttention.q.weight"])


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_random_init_copies_nothing_and_a_narrow_student_runs(name: str) -> None:
    teacher = tiny(name)
    student = models.build_student(teacher, layers=2, hidden_size=32, init="random", seed=0)
    out = student(**model_inputs(batch_of()), output_hidden_states=True)
    assert out.logits.shape == (2, 5, 50)
    assert [h.shape[-1] for h in (*out.encoder_hidden_states, *out.decoder_hidden_states)] == [32] * 6
    same = models.build_student(teacher, layers=2, hidden_size=None, init="random", seed=0)
    key = next(k for k in same.state_dict() if _block(k) and k.endswith("q.weight") or k.endswith("q_proj.weight"))
    assert not torch.equal(same.state_dict()[key], teacher.state_dict()[key])


# --- data ------------------------------------------------------------------------------------------------
def test_the_embedded_task_writes_numbers_in_words_over_disjoint_splits() -> None:
    assert [number_words(n) for n in (0, 13, 31, 700, 3017, 9999)] == [
        "zero", "thirteen", "thirty one", "seven hundred", "three thousand seventeen",
        "nine thousand nine hundred ninety nine"]
    rows = seq2seq_default_rows(200, 50)
    assert rows == seq2seq_default_rows(200, 50)
    splits = [set(rows[s]["source"]) for s in ("train", "validation", "test")]
    assert [len(s) for s in splits] == [200, 50, 50] and not (splits[0] & splits[1] or splits[1] & splits[2])
    source, target = rows["train"]["source"][0], rows["train"]["target"][0]
    assert number_words(int(source.replace(" ", ""))) == target


@pytest.fixture(scope="module")
def raw_task():
    datasets.disable_progress_bars()
    return load_raw_task(TaskConfig(name="seq2seq_default", train_size=64, eval_size=16))


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_tokenisation_gives_labels_and_shifted_decoder_inputs(raw_task, name: str, tmp_path: Path) -> None:
    spec, raw = raw_task
    tok = models.train_tokenizer(train_texts(raw, spec), family="seq2seq")
    config = models.teacher_config(models.resolve_teacher(name), vocab_size=len(tok))
    start = config.decoder_start_token_id
    data = tokenize_task(raw, spec, tok, max_length=16, cache_dir=tmp_path, family="seq2seq", segments=False,
                         decoder_start=start)
    row = data["train"][0]
    assert row["labels"] == tok(raw["train"][0]["target"])["input_ids"] and row["labels"][-1] == tok.eos_token_id
    assert row["decoder_input_ids"] == [start, *row["labels"][:-1]]
    assert row["decoder_attention_mask"] == [1] * len(row["labels"])
    assert tok.decode(row["labels"], skip_special_tokens=True) == raw["train"][0]["target"]
    batch = collate([data["train"][i] for i in range(8)], pad_id=tok.pad_token_id)
    lengths = torch.tensor([len(data["train"][i]["labels"]) for i in range(8)])
    real = torch.arange(batch["labels"].shape[1])[None] < lengths[:, None]
    assert torch.equal(batch["decoder_attention_mask"].bool(), real)
    assert (batch["labels"][~real] == IGNORE_INDEX).all()
    assert (batch["decoder_input_ids"][~real] == tok.pad_token_id).all()
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}


def test_a_seq2seq_folder_reads_its_named_columns(tmp_path: Path) -> None:
    rows = [{"id": i, "en": f"word {i}", "de": f"wort {i}"} for i in range(6)]
    write(tmp_path / "d" / "train.tsv", rows, "tsv")
    write(tmp_path / "d" / "dev.jsonl", rows[:2], "jsonl")
    spec, raw = load_raw_task(TaskConfig(name="seq2seq", data_dir=str(tmp_path / "d"), source_column="en",
                                         target_column="de"), cache_dir=tmp_path / "cache")
    assert spec.kind == "seq2seq" and raw["train"].column_names == ["source", "target"]
    assert raw["validation"][1] == {"source": "word 1", "target": "wort 1"}


def test_a_missing_or_empty_target_column_is_one_line(tmp_path: Path) -> None:
    rows = [{"source": "a b", "target": "b a"}, {"source": "c", "target": ""}]
    write(tmp_path / "d" / "train.csv", rows, "csv")
    write(tmp_path / "d" / "dev.csv", rows[:1], "csv")
    with pytest.raises(ConfigError, match=r"line 3 of train.csv has an empty 'target' cell"):
        load_raw_task(TaskConfig(name="seq2seq", data_dir=str(tmp_path / "d")))
    with pytest.raises(ConfigError, match=r"no 'label' column \(task.target_column\)"):
        load_raw_task(TaskConfig(name="seq2seq", data_dir=str(tmp_path / "d"), target_column="label"))
    with pytest.raises(ConfigError, match="read only by task.name=seq2seq"):
        TaskConfig(name="default", target_column="y")


# --- the step ----------------------------------------------------------------------------------------------
def _released_hidden(mask: torch.Tensor, student: tuple, teacher: tuple, matches: list[int],
                     normalize: bool) -> torch.Tensor:
    """t5mt/distillation.py `calc_hidden_loss` (default branch), transcribed: the embedding pair plus the
    supervised layers, stacked, each layer's tensor standardised with --normalize_hidden, masked MSE over all."""
    matches = [0, *[i + 1 for i in matches]]
    mask = mask.to(student[0])
    valid_count = mask.sum() * student[0].size(-1)
    s = torch.stack([student[i] for i in range(len(matches))])
    t = torch.stack([teacher[j] for j in matches])
    if normalize:
        s, t = F.layer_norm(s, s.shape[1:]), F.layer_norm(t, t.shape[1:])
    mse = F.mse_loss(s, t, reduction="none")
    return (mse * mask.unsqueeze(0).unsqueeze(-1)).sum() / valid_count


def _released_kl(mask: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """t5mt/distillation.py `calc_ce_loss`: KLDivLoss(batchmean) over the selected tokens, times T^2."""
    sel = mask[:, :, None].expand_as(s_logits)
    vocab = s_logits.size(-1)
    s = torch.masked_select(s_logits, sel).view(-1, vocab)
    t = torch.masked_select(t_logits, sel).view(-1, vocab)
    return F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                    reduction="batchmean") * temperature**2


@pytest.mark.parametrize(("name", "distance"), [("tiny-t5", "layer_select_t5"), ("tiny-bart", "mse")])
def test_the_steps_terms_are_the_layer_selection_codes(name: str, distance: str) -> None:
    teacher = models.freeze(tiny(name))
    start = teacher.config.decoder_start_token_id
    student = models.build_student(teacher, layers=2, hidden_size=None, init="random", seed=3).eval()  # no dropout
    batch = batch_of(start=start)
    cfg = DistillConfig(distance=distance, hidden_reduce="sum", w_task=1.0, w_logit=1.0, w_hidden=3.0,
                        temperature=2.0)
    distiller = Distiller(student, Bridge(), kind="seq2seq", losses=step_losses(cfg), decoder_bridge=Bridge())
    pairs = run_pairs(Config(teacher=name, distill=cfg), 4)
    dec_pairs = run_pairs(Config(teacher=name, distill=cfg), 4, stack="decoder")
    assert pairs == dec_pairs == [(0, 0), (1, 2), (2, 4)]
    outputs = teacher_forward(teacher, batch, hidden=True)
    terms = distiller(batch, outputs, pairs, dec_pairs)

    out = student(**model_inputs(batch), output_hidden_states=True)
    reference = teacher(**model_inputs(batch), output_hidden_states=True)
    normalize = distance == "layer_select_t5"
    matches = [1, 3]  # get_layers_to_supervise(2, 4) with --supervise_forward: the forward map
    hidden = (_released_hidden(batch["attention_mask"], out.encoder_hidden_states,
                               reference.encoder_hidden_states, matches, normalize)
              + _released_hidden(batch["decoder_attention_mask"], out.decoder_hidden_states,
                                 reference.decoder_hidden_states, matches, normalize))
    target = batch["labels"] != IGNORE_INDEX
    kl = _released_kl(target, out.logits, reference.logits, 2.0)
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(out.logits.view(-1, out.logits.shape[-1]),
                                                               batch["labels"].view(-1))
    # to 1e-6 (absolute, and of the value): both sum the same fp32 terms, in another order
    torch.testing.assert_close(terms["hidden"], hidden, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["logit"], kl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["task"], ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["loss"], ce + kl + 3 * hidden, rtol=1e-6, atol=1e-6)
    assert hidden > 0 and kl > 0


def test_a_projector_bridges_each_stack_and_trains() -> None:
    teacher = models.freeze(tiny("tiny-t5"))
    student = models.build_student(teacher, layers=2, decoder_layers=1, hidden_size=32, init="random", seed=0)
    cfg = load_config(["teacher=tiny-t5", "student.decoder_layers=1", "student.hidden_size=32",
                       "distill.bridge=projector"])
    pairs, dec_pairs = run_pairs(cfg, 4), run_pairs(cfg, 4, stack="decoder")
    assert dec_pairs == [(0, 0), (1, 4)]
    encoder, decoder = ProjectorBridge([0, 1, 2], 32, 64), ProjectorBridge([0, 1], 32, 64)
    distiller = Distiller(student, encoder, kind="seq2seq", losses=step_losses(cfg.distill), decoder_bridge=decoder)
    batch = batch_of()
    terms = distiller(batch, teacher_forward(teacher, batch, hidden=True), pairs, dec_pairs)
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (*encoder.parameters(), *decoder.parameters()))


def test_a_random_map_draws_the_decoder_apart_from_the_encoder() -> None:
    configs = [load_config(["student.layers=6", "distill.layer_map=random", f"train.seed={s}"]) for s in range(6)]
    draws = {(tuple(run_pairs(c, 12)), tuple(run_pairs(c, 12, stack="decoder"))) for c in configs}
    assert any(enc != dec for enc, dec in draws)


def test_generation_metrics() -> None:
    scores = generation_metrics(["three hundred", "ten "], ["three hundred", "ten  one"])
    assert scores["exact_match"] == 0.5 and 0 < scores["chrf"] < 1
    assert generation_metrics(["a b"], ["a b"]) == {"exact_match": 1.0, "chrf": 1.0, "bleu": 1.0, "rouge_l": 1.0}


# --- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["teacher=tiny-t5"], r"task.name=default is a classification task but teacher=tiny-t5 is an encoder-decoder"),
    (["task.name=seq2seq_default"], r"needs an encoder-decoder teacher .* teacher=tiny-bert is an encoder"),
    (["teacher=tiny-gpt2", "task.name=seq2seq_default"], r"teacher=tiny-gpt2 is a causal LM"),
    (["student.decoder_layers=1"], r"student.decoder_layers=1: read only with an encoder-decoder teacher"),
    (["teacher=tiny-t5", "task.name=seq2seq_default", "distill.bridge=ted", "distill.layer_map=inorder_random"],
     r"distill.bridge=ted needs a fixed layer map"),
    (["teacher=tiny-t5", "task.name=seq2seq_default", "distill.bridge=units", "student.hidden_size=32",
      "student.init=random", "units.ratio=1.0"], r"units.ratio=1.0 keeps 64 teacher units"),
    (["teacher=tiny-t5", "task.name=seq2seq_default", "student.decoder_layers=5"],
     r"student.decoder_layers=5 is deeper than the teacher's decoder \(4 layers\)"),
    (["teacher=tiny-t5", "task.name=seq2seq_default", "train.teacher_cache=true"], r"encoder tasks only"),
])
def test_what_seq2seq_cannot_run_is_one_config_error_before_ray(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        validate(load_config(overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bridge", ["projector", "ted", "units"])
def test_a_seq2seq_config_validates(bridge: str) -> None:
    spec = validate(load_config(["teacher=tiny-bart", "task.name=seq2seq_default", "student.decoder_layers=1",
                                 f"distill.bridge={bridge}", "student.hidden_size=32", "student.init=random"]))
    assert spec.kind == "seq2seq" and spec.primary_metric == "token_accuracy"


# --- a run --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-t5"])
def test_a_short_run_improves_token_accuracy_and_exports_a_generating_student(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from kdsearch.run.loop import WorkerContext, export_student, reported_metrics, run_distillation
    from kdsearch.run.prepare import load_teacher, make_student, prepare

    cfg = load_config([f"teacher={name}", "task.name=seq2seq_default", "task.train_size=512", "task.eval_size=32",
                       "finetune.epochs=4", "train.epochs=4", "train.batch_size=16", "train.dropout=0.0",
                       "student.init=random", "distill.distance=layer_select_t5", "distill.temperature=2.0",
                       f"cache_dir={tmp_path / 'cache'}"])
    validate(cfg)
    prepared = prepare(cfg)
    assert prepared.family == "seq2seq" and prepared.n_teacher_decoder == 4 and prepared.teacher_outputs is None
    before = evaluate(make_student(cfg, load_teacher(prepared, torch.device("cpu"))), prepared.data["validation"],
                      spec=prepared.spec, pad_id=prepared.pad_id, device=torch.device("cpu"))
    reports: list[dict] = []
    store = tmp_path / "ckpt"

    def report(metrics: dict, checkpoint: Path | None) -> None:
        reports.append(metrics)
        if checkpoint is not None:
            store.mkdir(exist_ok=True)
            for f in checkpoint.iterdir():
                (store / f.name).write_bytes(f.read_bytes())

    run_distillation(cfg, prepared, WorkerContext(report=report, log=lambda _: None))
    assert [m["epoch"] for m in reports] == [1, 2, 3, 4]
    assert set(reported_metrics(prepared.spec)) <= set(reports[-1])
    assert {"eval_exact_match", "eval_chrf"} <= set(reports[-1])
    assert all(0 <= m["eval_exact_match"] <= 1 and 0 <= m["eval_chrf"] <= 1 for m in reports)
    # a random-init student from next to nothing to about the teacher's 0.59 (0.52 when written)
    first = max(before["eval_token_accuracy"], reports[0]["eval_token_accuracy"])
    assert reports[-1]["eval_token_accuracy"] > first + 0.1
    assert reports[-1]["train_hidden"] > 0 and reports[-1]["train_logit"] > 0

    out = export_student(cfg, prepared, store, tmp_path / "student")
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert models.depth_width(model.config) == (2, 64)
    generated = model.generate(**tok(["1 2 3", "4 0 5"], return_tensors="pt", padding=True), max_new_tokens=8)
    assert generated.shape[0] == 2 and all(isinstance(t, str) for t in tok.batch_decode(generated))


def test_a_config_keeps_the_decoder_depth() -> None:
    cfg = load_config(["teacher=tiny-t5", "task.name=seq2seq_default", "student.decoder_layers=1"])
    assert cfg.student.decoder_layers == 1
    assert dataclasses.replace(cfg.student, decoder_layers=None).decoder_layers is None


@pytest.mark.slow
def test_a_smoke_search_of_the_seq2seq_space_exports_a_student_that_generates(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from kdsearch.tracking import find_search, list_trials

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "kdsearch.tune", "space=seq2seq", "smoke=true", "name=s2s",
                           f"tracking.uri={uri}", f"results_dir={tmp_path}/results", f"cache_dir={tmp_path}/cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    parent = find_search(uri=uri, experiment="kdsearch", search="s2s")
    trials = list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
    assert trials and all({"eval_token_accuracy", "eval_exact_match", "eval_chrf"} <= set(t.metrics) for t in trials)
    best = tmp_path / "results" / "s2s" / "best_student"
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(best), AutoTokenizer.from_pretrained(best)
    assert (model.config.num_layers, model.config.num_decoder_layers) == (2, 2)
    generated = model.generate(**tok(["1 2 3"], return_tensors="pt"), max_new_tokens=8)
    assert generated.shape[0] == 1 and generated[0, 0] == model.config.decoder_start_token_id
    # kdsearch.evaluate scores it beside its teacher: token accuracy and what it writes
    scores = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "kdsearch.evaluate", f"model={best}", "split=validation",
                           "with_teacher=true", "eval.num_beams=2", f"out={scores}", f"tracking.uri={uri}",
                           f"cache_dir={tmp_path}/cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads(scores.read_text())
    written = record["scores"]
    assert {"student", "teacher"} == set(written) and record["eval.num_beams"] == 2  # beam search, as asked
    for who in written.values():
        assert {"eval_token_accuracy", "eval_exact_match", "eval_chrf", "eval_bleu", "eval_rouge_l"} <= set(who)
