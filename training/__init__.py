"""Training, export and evaluation of the edge models (calibration and fault detection).

CPU only, reproducible from a seed; installed with the ``train`` extra. Features come from
:mod:`edge.features`, the code the edge runtime runs, so training and field agree.
"""
