"""One distillation run: models, preparation (teacher fine-tune, stage 1, caches), the shared step, the loop,
evaluation, validation, and Ray Train's wrapper (`trainer`). No Ray Tune, Optuna or MLflow."""
