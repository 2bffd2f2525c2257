"""The embedded extractive QA tasks `qa_default` and `qa_default_v2`, generated in code so that a run needs no
download. Rows in the hub's SQuAD layout: id, title, context, question, answers {text, answer_start}.

Pure Python: imports nothing but the standard library.
"""

from __future__ import annotations

import random

# A diary of small facts: three of four kinds ("anna lives in new york ." / "ben likes green tea ." / "carla plays
# the piano ." / "dev reads old maps .") among nine filler sentences, shuffled. A question asks for one kind
# ("where does anna live ?"), so the answer is the words after the verb of that kind, wherever its sentence fell:
# the model must find it, not learn a position. Some answers are two or three words (F1 gives partial credit).
# About 65 context tokens: with the question, more than one 64-token window, so task.doc_stride decides whether
# a window holds the answer. Trivial baselines score low: a random fact's answer is right a third of the time,
# the empty answer scores 0 on qa_default. qa_default_v2 asks every third question about the one kind the context
# lacks (SQuAD 2.0's unanswerable questions: the empty answer is right there, and only there).
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
    "reads": ("reads", "what does {} read ?", ("poems", "comics", "old maps", "the news", "novels", "recipes",
                                               "short stories", "letters", "plays", "the bible")),
}
FILLERS = ("it rained all day .", "the bus was late again .", "we had soup for lunch .", "the park was quiet .",
           "a dog barked twice .", "the shop closed early .", "my phone was slow .", "the sky turned grey .",
           "we walked home together .", "the tea went cold .", "nobody called me .", "the train was full .",
           "the room felt warm .", "birds sang at dawn .", "the road was wet .", "i lost my keys .")
QA_TRAIN_SIZE = 3000
QA_EVAL_SIZE = 300
FACTS_PER_CONTEXT = 3
FILLERS_PER_CONTEXT = 9


def _context(rng: random.Random) -> tuple[str, dict[str, tuple[str, str]], str]:
    """(context, {relation: (name, answer)} for its facts, the relation it lacks)."""
    kinds = sorted(RELATIONS)
    lacking = rng.choice(kinds)
    names = rng.sample(NAMES, FACTS_PER_CONTEXT)
    facts = {rel: (name, rng.choice(RELATIONS[rel][2])) for rel, name in zip([k for k in kinds if k != lacking],
                                                                            names, strict=True)}
    sentences = [f"{name} {RELATIONS[rel][0]} {answer} ." for rel, (name, answer) in facts.items()]
    sentences += rng.sample(FILLERS, FILLERS_PER_CONTEXT)
    rng.shuffle(sentences)
    return " ".join(sentences), facts, lacking


def _example(rng: random.Random, unanswerable: bool) -> tuple[str, str, list[str], list[int]]:
    """(context, question, answer texts, answer starts); no answers for an unanswerable question."""
    context, facts, lacking = _context(rng)
    if unanswerable:  # the kind of fact the context does not state, about a person it does not mention
        name = rng.choice([n for n in NAMES if n not in {p for p, _ in facts.values()}])
        return context, RELATIONS[lacking][1].format(name), [], []
    relation = rng.choice(sorted(facts))
    name, answer = facts[relation]
    sentence = f"{name} {RELATIONS[relation][0]} {answer} ."
    start = context.index(sentence) + len(sentence) - len(answer) - 2
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
            cols["title"].append("diary")
            cols["context"].append(context)
            cols["question"].append(question)
            cols["answers"].append({"text": texts, "answer_start": starts})
        out[split] = cols
    return out
