"""The embedded extractive QA tasks `qa_default` and `qa_default_v2`, generated in code so that a run needs no
download. Rows in the hub's SQuAD layout: id, title, context, question, answers {text, answer_start}.

Pure Python: imports nothing but the standard library.
"""

from __future__ import annotations

import random

# Facts about people: "anna lives in new york ." / "ben likes pears ." / "carla plays chess .". A context states one
# fact about each of 14 people, so a question ("where does anna live ?") is answered by finding its person in the
# context: an attention hop from the question's name to the same name in the context, then the words after its
# verb. Some answers are two words (F1 gives partial credit). About 75 context tokens: with the question, more
# than one 64-token window, so task.doc_stride decides whether a window holds the answer. Trivial baselines score
# low: the first span of the right relation's kind is right about once in three, the empty answer scores 0 on
# qa_default (and the share of unanswerable questions, a third, on qa_default_v2: whose person is absent).
NAMES = ("anna", "ben", "carla", "dev", "emma", "finn", "gina", "hugo", "ines", "jack", "kira", "leo", "maya",
         "noah", "olga", "paul", "rosa", "sam", "tara", "umar")
RELATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # relation: (statement verb, question, answers)
    "lives": ("lives in", "where does {} live ?", ("paris", "london", "new york", "tokyo", "rome", "los angeles",
                                                   "berlin", "cairo", "san diego", "oslo")),
    "likes": ("likes", "what does {} like ?", ("pears", "apples", "green tea", "rice", "cheese", "hot soup",
                                               "olives", "plums", "dark bread", "figs")),
    "plays": ("plays", "what does {} play ?", ("chess", "tennis", "the piano", "golf", "football", "the violin",
                                               "cards", "the drums", "rugby", "go")),
}
QA_TRAIN_SIZE = 3000
QA_EVAL_SIZE = 300
PEOPLE_PER_CONTEXT = 14


def _context(rng: random.Random) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Shuffled fact sentences and {(name, relation): answer} for the facts they state."""
    people = rng.sample(NAMES, PEOPLE_PER_CONTEXT)
    facts: dict[tuple[str, str], str] = {}
    for name in people:
        relation = rng.choice(sorted(RELATIONS))
        facts[(name, relation)] = rng.choice(RELATIONS[relation][2])
    sentences = [f"{name} {RELATIONS[rel][0]} {answer} ." for (name, rel), answer in facts.items()]
    rng.shuffle(sentences)
    return sentences, facts


def _example(rng: random.Random, unanswerable: bool) -> tuple[str, str, list[str], list[int]]:
    """(context, question, answer texts, answer starts); no answers for an unanswerable question."""
    sentences, facts = _context(rng)
    context = " ".join(sentences)
    people = sorted({name for name, _ in facts})
    if unanswerable:  # a person the context does not mention
        name = rng.choice([n for n in NAMES if n not in people])
        return context, RELATIONS[rng.choice(sorted(RELATIONS))][1].format(name), [], []
    name, relation = rng.choice(sorted(facts))
    answer = facts[(name, relation)]
    sentence = f"{name} {RELATIONS[relation][0]} {answer} ."
    start = context.index(sentence) + len(sentence) - len(answer) - 2
    assert context[start:start + len(answer)] == answer
    return context, RELATIONS[relation][1].format(name), [answer], [start]


def qa_default_rows(n_train: int = QA_TRAIN_SIZE, n_eval: int = QA_EVAL_SIZE, *, seed: int = 0,
                    unanswerable: bool = False) -> dict[str, dict[str, list]]:
    """{split: SQuAD columns}: train, validation and test drawn in that order from one seeded stream; with
    `unanswerable` (qa_default_v2) every third question has no answer in its context."""
    rng = random.Random(seed + (1 if unanswerable else 0))
    out: dict[str, dict[str, list]] = {}
    for split, size in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        cols: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
        for i in range(size):
            context, question, texts, starts = _example(rng, unanswerable and i % 3 == 2)
            cols["id"].append(f"{split}-{i}")
            cols["title"].append("people")
            cols["context"].append(context)
            cols["question"].append(question)
            cols["answers"].append({"text": texts, "answer_start": starts})
        out[split] = cols
    return out
