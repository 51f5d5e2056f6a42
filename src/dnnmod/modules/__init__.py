"""The module machinery every approach shares.

- :mod:`.structure`: a model's prunable channel groups and hidden Linear units, by tracing;
- :mod:`.moduleset`: the one module-set format approaches return, and its files;
- :mod:`.masking`: running the base model as M masked modules at once;
- :mod:`.inference`: the one batched inference path (images and modules, memory-bounded);
- :mod:`.activations`: per-class activation statistics, read by the approaches;
- :mod:`.heads`: how a module turns the base model's logits into its score;
- :mod:`.combination`: the registered rules turning module scores into a prediction;
- :mod:`.extract`: physical extraction into smaller standalone networks;
- :mod:`.compose`: modules (of one or several base models) composed into one classifier;
- :mod:`.metrics`: the metrics every approach is judged by, for every mask granularity.
"""
