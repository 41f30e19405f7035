"""The saved artifact: plain data (a JSON config and named tensors) to and from a decomposition, heads and a
router fit (:mod:`~mass.storage.saved_format`), and the one safetensors file written all or nothing and read back
after every check (:mod:`~mass.storage.serialization`). The model builds the artifact and hands it over; nothing
here imports the model. May import: ``mass_kernels``, :mod:`mass.files`, :mod:`mass.method`."""
