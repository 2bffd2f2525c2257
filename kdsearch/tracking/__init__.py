"""MLflow tracking: one parent run per search, one child run per trial, written from the search driver only.

The only package that imports mlflow; must not import ray. `store` opens the store (every write goes through
`retry_locked`), `runs` reads runs as plain records and logs one-shot runs, `tracker` is the driver's writer.
"""

from kdsearch.tracking.runs import (
    CONFIRMED_TAG,
    NONFINITE_TAG,
    SAMPLED_TAG,
    SEARCHED_TAG,
    TRIAL_INDEX_TAG,
    UNFINISHED_TAG,
    RunRecord,
    find_search,
    flatten_params,
    format_param,
    list_trials,
    log_analysis_run,
    log_run_artifacts,
    search_names,
    set_run_tags,
)
from kdsearch.tracking.store import (
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    check_tracking_uri,
    default_uri,
    is_locked_error,
    open_client,
    retry_locked,
)
from kdsearch.tracking.tracker import ERROR_TAG_CHARS, SearchTracker

__all__ = [
    "CONFIRMED_TAG",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_URI",
    "ERROR_TAG_CHARS",
    "NONFINITE_TAG",
    "SAMPLED_TAG",
    "SEARCHED_TAG",
    "TRIAL_INDEX_TAG",
    "UNFINISHED_TAG",
    "RunRecord",
    "SearchTracker",
    "check_tracking_uri",
    "default_uri",
    "find_search",
    "flatten_params",
    "format_param",
    "is_locked_error",
    "list_trials",
    "log_analysis_run",
    "log_run_artifacts",
    "open_client",
    "retry_locked",
    "search_names",
    "set_run_tags",
]
