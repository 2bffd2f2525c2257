"""The distillation methods as pure math: losses and distances, layer maps, attention relations, the width
bridges (TED filters, Flex-KD units, projectors). Import only `core`: no config, data, run, Ray, Optuna or MLflow."""
