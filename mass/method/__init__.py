"""The method as pure functions over tensors and state dicts: per-task truncated SVDs of the weight deltas
(:mod:`~mass.method.decompose`, with the solvers in :mod:`~mass.method.svd_solvers`), the static merges (TSV-M,
task arithmetic, TIES: :mod:`~mass.method.merging`), the router's configuration and task selection
(:mod:`~mass.method.router`) and the few-example router's fit (:mod:`~mass.method.support`). No ``nn.Module`` is
wrapped here. May import: ``mass_kernels``, :mod:`mass.files`."""
