"""``valve-model results``: regenerate one section of docs/results.md per command.

::

    valve-model results {table3,table6,table4,figures} [--runs runs/results] [--doc docs/results.md]
                        [--datasets kolektorsdd,magnetic-tile] [--seeds 0,1,2] [--jobs 2]
                        [--epochs N] [--data-root ../shared/datasets] [--dry-run]

The protocol is :data:`PROTOCOL` (one entry per dataset). Every table trains on the fixed seed-0
split (train:test 2:3, the ``*-train`` / ``*-test`` formats); the seeds are *training* seeds
(initialisation, shuffling, augmentation), not split seeds.

Runs live in ``RUNS/<dataset>/<attention>-s<seed>-e<epochs>-i<size>/`` (the ``valve-model train``
run directory, plus ``train.log``), and each evaluation in ``RUN/eval-<saliency>/`` (the
``valve-model evaluate`` report, log in ``RUN/eval-<saliency>.log``). Everything is cached:

- a training is skipped when its config.json matches the protocol (format, data path, preset,
  attention, input size, batch, lr, val_fraction, seed, balance, augment, epochs), its log.jsonl
  reached the protocol's epochs and model.safetensors exists; a run interrupted after at least one
  epoch is continued with ``--resume``; a run directory trained with other settings is an error
  (it is never overwritten);
- an evaluation is skipped when its metrics.json (and the figure written last) is newer than the
  weights and was made with the same saliency method and test format.

Trainings and evaluations are subprocesses (``python -m models.cli train|evaluate ...``), at
most ``--jobs`` at once, one torch thread each. A failure makes the command end with a non-zero exit
naming the log (the other runs still finish); the section of docs/results.md is then left as it was. The numbers also go to
``RUNS/<table>.json``. Each command rewrites only its own section, between
``<!-- BEGIN name -->`` and ``<!-- END name -->``.

``--epochs`` overrides the protocol's epochs for smoke runs; the run directories then differ
(their names hold the epochs) and the output and the section say loudly that these are not results.

The package, in the order a table is made:

    protocol.py   what is trained and evaluated: PROTOCOL, Run, ResultsOptions (the command's options), needs()
    runs.py       cached runs and their steps: cache states, the train/evaluate subprocesses (Executor)
    stats.py      mean +- std over seeds, percent formatting, the ordering sentence of the ablation
    tables.py     each table's numbers and Markdown (table3, table6, table4, figures)
    doc.py        the Markdown file: its header, the marked sections, the preamble every section starts with
    command.py    ``valve-model results`` itself: the parser, then plan, run and write
"""
