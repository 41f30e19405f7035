"""The ``nn`` side: task-conditioned layers that replace the encoder's own (:mod:`~mass.nn.layers`, installed by
:mod:`~mass.nn.adapters` for HF and open_clip structures), the per-call pass state (:mod:`~mass.nn.passes`), the
task banks and the multi-task set cache (:mod:`~mass.nn.banks`), the first pass and routing
(:mod:`~mass.nn.routing`), :class:`~mass.nn.model.MASSModel` (the public surface, which delegates to those), CLIP
loading (:mod:`~mass.nn.clip`) and the one :func:`~mass.nn.merge.merge` entry point. May import: ``mass_kernels``,
:mod:`mass.files`, :mod:`mass.method`, :mod:`mass.storage`."""
