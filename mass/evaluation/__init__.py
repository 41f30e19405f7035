"""Evaluation: image data and preprocessing (:mod:`~mass.evaluation.data`), zero-shot heads from class names
and prompt templates (:mod:`~mass.evaluation.heads`), the paper's benchmark presets
(:mod:`~mass.evaluation.presets`) and the protocol that evaluates every method into one per-task table
(:mod:`~mass.evaluation.protocol`). May import every wing below it: ``mass_kernels``, :mod:`mass.files`,
:mod:`mass.method`, :mod:`mass.storage`, :mod:`mass.nn`."""
