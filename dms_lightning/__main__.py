"""``python -m dms_lightning {fit,validate,test,predict} --config ...`` or ``python -m dms_lightning pipeline``.

Errors of the configuration, files or data are printed as one message; ``--debug`` (or
``DMS_LIGHTNING_DEBUG=1``) shows the full traceback.
"""

import sys


def entry() -> int:
    """The console entry point: ``pipeline`` or a LightningCLI subcommand; returns the exit code."""
    from dms_lightning.cli import console_main

    if len(sys.argv) > 1 and sys.argv[1] == "pipeline":
        from dms_lightning.pipeline import main as pipeline_main

        del sys.argv[1]
        return console_main(pipeline_main)
    from dms_lightning.cli import main

    return console_main(main)


if __name__ == "__main__":
    sys.exit(entry())
