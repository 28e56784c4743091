"""Prints the model zoo's parameter counts against the published ones.

  python -m experiments.models [--size=paper] [--models=llama_7b,gpt2]

Models are built shape-only: nothing is allocated, so Llama-70B takes seconds.
"""

from collections.abc import Sequence

from absl import app
from absl import flags

from experiments import models

_SIZE = flags.DEFINE_enum("size", "paper", list(models.SIZES), "Which configuration to count.")
_MODELS = flags.DEFINE_list("models", list(models.NAMES), "Models to list.")
flags.register_validator(
    "models", lambda names: set(names) <= set(models.NAMES),
    message=f"--models takes names from {', '.join(models.NAMES)}.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(models.param_table(_MODELS.value, _SIZE.value))


if __name__ == "__main__":
  app.run(main)
