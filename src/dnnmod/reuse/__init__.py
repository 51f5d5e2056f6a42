"""Reusing module sets: patching weak models (E3), composing new tasks (E4), sub-task reuse
(E5) and module replacement (E6). Each experiment reads module sets in the shared format, so
a new approach's modules enter every experiment with no code change."""
