"""Expert parallelism: ``sharding`` (DeepSpeed's EP groups, this rank's experts, parameter tags),
``dispatcher`` (dropless all-to-all dispatch/combine, chunked to overlap compute), ``placement``
(which EP rank holds which experts: even, by capacity or by measured load)."""
