"""Train and evaluate one configuration: `python train.py method=smop dataset=rte model=t5-base` (see smop/train.py).

With no overrides it runs the embedded default offline (SMoP 4x5 on the bundled RTE sample, tiny T5).
Exit status: 0 completed; 1 failed; 130 / 143 stopped by SIGINT / SIGTERM (resumable with ckpt_path=last).
"""

from smop.train import cli

if __name__ == "__main__":
    cli()
