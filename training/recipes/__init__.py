"""One runnable script per training method: ``python -m training.recipes.<method> --snapshot ... --parent ...``."""
