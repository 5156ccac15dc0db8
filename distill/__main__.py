"""``python -m distill`` (and ``deepspeed -m distill``): the ``distill`` command."""

from distill.cli import main

main()
