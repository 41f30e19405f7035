"""The offline demo (``mass demo``, the main job): eight synthetic image tasks in CLIP's regime, a tiny two-tower
CLIP pretrained contrastively offline (committed under ``assets/``), eight vision towers fine-tuned from it, and
the table of MASS against the static merges with each router (:mod:`.run`; the pipeline in :mod:`.training`)."""
