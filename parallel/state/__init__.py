"""Checkpoint state. ``checkpoint`` owns checkpoint I/O (save, load, resume, prune); ``registry``
holds the run state components register; ``storage`` is the DCP writer/reader of flat slices;
``ownership`` says which slice of which parameter this rank owns; ``init_from`` starts a run from
weights; ``integrity`` makes DeepSpeed's own loader refuse pickled code. File-level reads (index,
manifest, weights) are in model/hf/, importable without a process group."""
