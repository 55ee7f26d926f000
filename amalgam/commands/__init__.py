"""CLI command groups, one module each; every module exposes ``register(subparsers)``.

Commands import heavy modules (torch, ray) inside their handlers so ``amalgam --help``
stays fast. Listed here in the order ``amalgam --help`` shows them.
"""

COMMAND_MODULES = ["run", "sweep", "retrain", "data", "zoo", "deploy", "submit", "store", "registry"]
