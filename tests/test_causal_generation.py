"""A causal LM's generation metrics on prompt -> response rows: left-padded prompts, only the generated response
scored, the run's reports, and the refusals where rows have no responses (raw text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from kdsearch.config.overrides import load_config
from kdsearch.core.errors import ConfigError
from kdsearch.data.encoding import tokenize_task
from kdsearch.data.metrics import GENERATION_METRICS
from kdsearch.data.tasks import task_spec
from kdsearch.run import models
from kdsearch.run.evaluation import evaluate_generation, generation_batches
from kdsearch.run.validate import validate

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

PROMPTS = ["the answer is red =>", "the sky is blue and the grass is green so the answer is green =>",
           "the answer is blue =>"]
RESPONSES = [" red", " green", " blue"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, object]:
    """The three rows tokenised as a causal task's (bos + prompt + response + eos, labels on the response)."""
    tok = models.train_tokenizer([p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)], family="causal")
    raw = DatasetDict({"validation": Dataset.from_dict({"prompt": PROMPTS, "response": RESPONSES})})
    data = tokenize_task(raw, task_spec("text"), tok, max_length=32, family="causal", segments=False,
                         cache_dir=tmp_path_factory.mktemp("cache"))
    return data["validation"], tok


@pytest.mark.parametrize("teacher", ["tiny-gpt2", "tiny-qwen"])
def test_a_left_padded_row_generates_what_it_generates_alone(rows: tuple, teacher: str) -> None:
    data, tok = rows
    config = models.teacher_config(models.resolve_teacher(teacher), vocab_size=len(tok))
    config.initializer_range = 1.0  # a model whose next token depends on positions, so wrong padding would show
    torch.manual_seed(0)
    model = models.task_model_class("causal").from_config(config).eval()

    def new_tokens(batch_size: int) -> list[list[int]]:
        out: list[list[int]] = []
        for inputs, _ in generation_batches(data, family="causal", batch_size=batch_size, pad_id=tok.pad_token_id):
            generated = model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id,
                                       eos_token_id=None)
            out += generated[:, inputs["input_ids"].shape[1]:].tolist()
        return out

    batches = list(generation_batches(data, family="causal", batch_size=2, pad_id=tok.pad_token_id))
    first = batches[0][0]
    assert first["attention_mask"][0, 0] == 0 and first["attention_mask"][1].all()  # the short prompt padded left
    assert new_tokens(batch_size=2) == new_tokens(batch_size=1)


class _Scripted(torch.nn.Module):
    """A stand-in LM whose `generate` appends `answer(prompt ids)` to each (left-padded) prompt, as a causal LM's
    output repeats its input."""

    def __init__(self, answer: dict[tuple[int, ...], list[int]], pad_id: int) -> None:
        super().__init__()
        self.answer, self.pad_id = answer, pad_id

    def generate(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 **_: object) -> torch.Tensor:
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            new = self.answer[tuple(i for i, m in zip(ids, mask, strict=True) if m)][:max_new_tokens]
            rows.append(ids + new + [self.pad_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_only_the_generated_response_is_scored(rows: tuple) -> None:
    data, tok = rows
    starts = [next(i for i, t in enumerate(labels) if t != -100) for labels in data["labels"]]
    pairs = [(ids[:start], labels[start:]) for ids, labels, start in zip(data["input_ids"], data["labels"], starts,
                                                                          strict=True)]

    def score(answer: dict) -> dict[str, float]:
        return evaluate_generation(_Scripted(answer, tok.pad_token_id), data, tok, family="causal",
                                   pad_id=tok.pad_token_id, device=torch.device("cpu"), batch_size=2)

    # the response, then the end token: a perfect score against the response alone (not prompt + response)
    assert score({tuple(p): r for p, r in pairs}) == pytest.approx({f"eval_{m}": 1.0 for m in GENERATION_METRICS})
    # nothing new (the end token at once): each prompt holds its answer word, but the prompt is not the output
    assert score({tuple(p): [tok.eos_token_id] for p, _ in pairs}) == {f"eval_{m}": 0.0 for m in GENERATION_METRICS}


# --- the wiring: refusals, a search's metric, a run's reports ------------------------------------------------
def _text_dir(root: Path, *, prompted: bool) -> Path:
    for split in ("train", "dev"):
        lines = [{"prompt": p, "response": r} if prompted else {"text": p + r}
                 for p, r in zip(PROMPTS, RESPONSES, strict=True)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.mark.parametrize("prompted", [True, False])
def test_text_rows_have_responses_only_as_prompt_response_pairs(prompted: bool, tmp_path: Path) -> None:
    from kdsearch.config.schema import TaskConfig
    from kdsearch.data.loading import check_task, load_raw_task

    task = TaskConfig(name="text", data_dir=str(_text_dir(tmp_path, prompted=prompted)))
    spec, raw = load_raw_task(task, cache_dir=tmp_path / "cache")  # from the rows read (a hub's are known here)
    assert check_task(task).responses == spec.responses == prompted  # from the files' headers, before any run
    assert (raw["validation"]["prompt"][0] == PROMPTS[0]) == prompted


@pytest.mark.parametrize(("overrides", "message"), [
    (["eval.num_beams=4"], "eval.num_beams=4: read only where outputs are generated (an encoder-decoder teacher on "
                           "a seq2seq task, or a causal LM on prompt -> response rows); teacher=tiny-bert is an "
                           "encoder: leave eval.* at its defaults"),
    (["teacher=tiny-gpt2", "task.name=text", "eval.generate_every=2"],
     "eval.generate_every=2: read only where outputs are generated"),
    (["teacher=tiny-gpt2", "task.name=text", "eval.num_beams=2"],
     "task.name=text holds raw text (a 'text' or 'sentence' column), no prompt -> response rows"),
])
def test_generation_keys_without_responses_are_refused_in_one_line(overrides: list[str], message: str,
                                                                   tmp_path: Path) -> None:
    cfg = load_config([*overrides, *([f"task.data_dir={_text_dir(tmp_path, prompted=False)}"]
                                     if "task.name=text" in overrides else [])])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("task", ["default", "text"])
def test_a_causal_task_with_responses_takes_the_generation_keys(task: str, tmp_path: Path) -> None:
    data = [f"task.data_dir={_text_dir(tmp_path, prompted=True)}"] if task == "text" else []
    spec = validate(load_config(["teacher=tiny-gpt2", f"task.name={task}", *data, "eval.num_beams=2",
                                 "eval.generate_every=0"]))
    assert spec.kind == "causal_lm" and spec.responses


@pytest.mark.parametrize("prompted", [True, False])
def test_a_search_ranks_a_causal_lm_by_a_generated_metric_only_on_responses(prompted: bool, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    import ray

    from kdsearch import tune

    data = _text_dir(tmp_path, prompted=prompted)
    argv = ["space=smoke", "teacher=tiny-gpt2", "task.name=text", f"task.data_dir={data}",
            "objectives=[eval_rouge_l:max]", "dry_run=true", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"cache_dir={tmp_path}/cache"]
    code = tune.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    if prompted:
        assert code == 0, err
    else:
        assert code == 2 and len(err) == 1 and err[0].startswith("error: objectives=eval_rouge_l:max: no trial "
                                                                 "reports eval_rouge_l, which scores generated")
    assert not ray.is_initialized()


def test_a_causal_run_reports_generation_metrics(tmp_path: Path) -> None:
    from kdsearch.run.loop import WorkerContext, reported_metrics, run_distillation
    from kdsearch.run.prepare import prepare

    cfg = load_config(["teacher=tiny-gpt2", "task.train_size=64", "task.eval_size=16", "finetune.epochs=1",
                       "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=16", "eval.num_beams=2",
                       f"cache_dir={tmp_path}"])
    validate(cfg)
    prepared = prepare(cfg)
    reports: list[dict] = []
    run_distillation(cfg, prepared, WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
    generated = {f"eval_{m}" for m in GENERATION_METRICS}
    assert generated <= set(reported_metrics(prepared.spec)) <= set(reports[-1])
    assert all(0 <= reports[-1][name] <= 1 for name in generated)
