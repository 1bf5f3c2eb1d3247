"""Model management, apart from the decode runtime: the built-in default model, hub downloads, the
hub cache's listing and the fit report. Uses the engine; the engine never imports it."""

from .default_model import (
    DEFAULT_BUDGET_RULE,
    DEFAULT_MODEL,
    DEFAULT_MODEL_BUDGET,
    BuildProgress,
    cache_root,
    default_budget,
    resolve_model,
)
from .fit import FitReport, fit_report
from .hub import CachedModel, cached_models, downloaded_models
from .hub_download import DownloadCancelled, DownloadError, download

__all__ = [
    "DEFAULT_BUDGET_RULE", "DEFAULT_MODEL", "DEFAULT_MODEL_BUDGET", "BuildProgress", "CachedModel", "DownloadCancelled",
    "DownloadError", "FitReport", "cache_root", "cached_models", "default_budget", "download", "downloaded_models",
    "fit_report", "resolve_model",
]
