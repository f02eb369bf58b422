"""The commands of ``refimpl`` that drive a run folder and have no module of their own.

Every command, here or beside the code it drives (plot, factors, milestones, study, sweep,
trace, compare), is a module with ``add_arguments(parser)`` and ``run(args) -> int``; its
docstring's first line is its one-line help and the whole docstring its description.
:mod:`refimpl.cli` is the table of (name, module).
"""
