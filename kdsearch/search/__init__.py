"""The search over runs: spaces and settings, the Ray Tune + Optuna driver, callbacks, ranking and importance,
the leaderboard, the exported best student, the papers' study grids and warm starts."""
