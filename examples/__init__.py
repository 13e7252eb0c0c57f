"""Example processors written with the SDK (extproc.processor); run one with
``extproc-processor examples.auth:AuthProcessor --listen :9000``."""
