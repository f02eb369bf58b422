"""The paper's experiments (Section 4), one runnable module each:

- ``python -m refimpl.experiments.figure1``: four quantities over one training run (Fig. 1);
- ``python -m refimpl.experiments.figure2``: final ||nu||_0 over a sweep of tau, with
  reconstructions of one fixed image (Fig. 2);
- ``python -m refimpl.experiments.figure3``: originals and reconstructions at a low and a
  high tau (Fig. 3);
- ``python -m refimpl.experiments.table1``: baseline VAE error as tau for a gated VAE with
  twice the dimensions, ||nu||_0 after B, 1.5B and 2B batches (Table 1).

Each writes a CSV and a PNG into ``--out`` (default ``experiments/<name>``), keeps its
training runs under ``--out/runs`` (resumable), has small defaults for a 2-core CPU and
``--full`` for the paper's settings.
"""
