"""kdsearch: search layer-wise distillation strategies (layer maps, TED filters, Flex-KD units, relations, loss
weights) with Ray Tune + Optuna; one shared distillation step run by Ray Train; every trial in MLflow.

Commands: `python -m kdsearch.{train,tune,leaderboard,evaluate,report,analyze}`; README.md has the layout.
"""
