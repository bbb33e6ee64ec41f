"""Helpers of ``benchmarks/run.py``: shapes, optimizer registry, worker and report.

``run.py`` imports only the torch-free parts (:mod:`afxbench.shapes`,
:mod:`afxbench.registry`, :mod:`afxbench.report`); everything that imports torch runs in the
subprocesses started by :mod:`afxbench.worker` and :mod:`afxbench.probe`.
"""
