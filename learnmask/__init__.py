"""learnmask: learnable and dynamic masks for fine-tuning.

Subpackages: :mod:`learnmask.functional` (hard-concrete and straight-through math),
:mod:`learnmask.gates` (gate kinds and their registry), :mod:`learnmask.control`
(controllers and target schedules), :mod:`learnmask.inject` (head gates on a model as it is,
by hooks), :mod:`learnmask.recipe` (configs, training recipe, grid runner, tables).
Nothing heavy is imported here, so ``import learnmask`` is cheap.
"""

__version__ = "0.1.0"
