"""``python -m dms_lightning {fit,validate,test,predict} --config ...`` or ``python -m dms_lightning pipeline``."""

import sys

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "pipeline":
        from dms_lightning.pipeline import main as pipeline_main

        pipeline_main(sys.argv[2:])
    else:
        from dms_lightning.cli import main

        main()
