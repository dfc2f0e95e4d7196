"""What both frameworks share, importing neither jax nor torch.

- `config`: the recipe (one frozen `Config`, the presets) and the training commands' flags;
- `models`: the model table (each network's name, widths and parameter budget);
- `data`: MNIST as verified numpy arrays, from tfds, a PyPI mirror or IDX files, cached;
- `workdir`: a run's config.json, metrics.jsonl and curves.png, checked before it writes;
- `report`: the log lines (progress bar, the seed's "Test set:" line, the summary);
- `errors`: the one-line errors and their exit codes;
- `atomic`: writes through a temporary file and a rename;
- `rendezvous`: waiting for a multi-process run's coordinator.

`flax_impl` builds on it and so does `torch_ref`, which imports nothing else from `flax_impl`.
"""
