"""Benchmarks run by ``mass bench``: the end-to-end latency, memory and storage report (:mod:`.e2e`), the merge
timers and the SVD solvers' accuracy study (:mod:`.svd_merge`), and the ViT configs they share (:mod:`.models`)."""
