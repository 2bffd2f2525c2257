"""A causal LM's generation metrics on prompt -> response rows: left-padded prompts, only the generated response
scored."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, DatasetDict

from kdsearch.data.encoding import tokenize_task
from kdsearch.data.metrics import GENERATION_METRICS
from kdsearch.data.tasks import task_spec
from kdsearch.run import models
from kdsearch.run.evaluation import evaluate_generation, generation_batches

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
