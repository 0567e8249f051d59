"""Pipeline parallelism (``parallel.pp``): the stage split, the process groups, torch's schedules and the
pipelined optimizer step. docs/pipeline.md describes the design."""
