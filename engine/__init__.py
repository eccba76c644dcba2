"""The shared engine of every ALBEF task: one module per job, no task knowledge.

- ``engine.config``: the YAML config against a task's schema, ``--override``, the common CLI flags.
- ``engine.checks``: the start-up constraint checks (rules keyed by config key, relations between keys, task
  hooks), shared by the entry scripts and ``scripts/validate_data.py``.
- ``engine.distributed``: collectives that are no-ops in one process; evaluation sharding that sees each
  example once (``shard_dataset`` / ``shard_range``, ``gather_rows``, ``gather_objects``). The lowest layer:
  ``models/`` and ``dataset/`` may import it, it imports neither.
- ``engine.logs``: logging set-up, metric means, ``log.txt`` JSON lines.
- ``engine.checkpoint_io``: checkpoint files (atomic, rotated, resumable). The weights inside are mapped onto a
  model by ``models.checkpoint``.
- ``engine.train_loop``: ``train_one_epoch``, the one training loop.
- ``engine.signals``: SIGINT / SIGTERM stop a run at a step boundary with a checkpoint.
- ``engine.run_state``: output-folder safety and config changes on resume.
- ``engine.trainer``: ``setup_run``, ``fit`` (train, evaluate, checkpoint, resume) and ``run_main``.
- ``engine.epochs``: what ``fit`` keeps and writes around each epoch (``TrainingRun``: resume, checkpoints, stops;
  ``EpochEnd``: evaluation, ``checkpoint_best.pth``, the ``log.txt`` line).
- ``engine.task_run``: ``fit_and_test`` (val each epoch, the best checkpoint on test) and ``write_results``, the
  end of every fine-tuning script.

The task pattern (pre-training and retrieval follow it; VQA, SNLI-VE, NLVR2 and grounding add one of each):

- ``models/model_<task>.py``: a subclass of ``models.albef.ALBEFBase`` that adds only what the task adds (heads,
  decoder, extra fusion blocks); ``forward`` returns a dict of named losses (keys starting with ``loss`` are
  summed by the loop, others only averaged), inference methods return named outputs.
- ``dataset/<task>_dataset.py``: the official annotation format, validated (``dataset.validate``) before any
  training starts; unreadable images are dropped and counted by the shared collate.
- ``<Task>.py``: a schema ``DEFAULTS = {**COMMON_DEFAULTS, ...}`` (every accepted key with its default),
  ``CONFIG_CHECKS`` / ``TRAINING_CHECKS`` (functions ``config -> list of problems``, passed to ``setup_run`` and
  run by the validator too), ``make_step_fn(...) -> step(model, batch, alpha, global_step) -> dict of losses``,
  an evaluator
  ``evaluate(model, epoch) -> dict`` of metrics (accuracies, retrieval recalls, or the path of a result
  file: anything JSON-serialisable), and ``main(argv=None)``, run as ``sys.exit(run_main(main))``. Training
  goes through ``engine.trainer.fit(..., evaluate=..., score="val_<metric>")``: the named score picks
  ``checkpoint_best.pth``. Evaluation split across ranks uses ``engine.distributed`` sharding, never a padded
  ``DistributedSampler``.
- ``configs/<Task>.yaml`` with the official keys and values, and ``configs/toy/<Task>.yaml`` on the toy world.
- ``tests/test_<task>.py``: losses against hand computations, the released checkpoint's key manifest, the
  script's ``main([...])`` on the toy world for a step or two.
"""
