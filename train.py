"""Train a model: ``python train.py --model NAME [--model.* ...] [--data.* ...] [--trainer.* ...]``.

``--model NAME`` loads ``configs/NAME.yaml``; ``--print_config`` shows the resolved config.
After fitting, the test stage runs on the best checkpoint.
"""
from __future__ import annotations

from lightning_modules.cli import build_cli, checkpoint_for_test, close_run


def main(args: list[str] | None = None):
    cli = build_cli(args, stage="fit")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    if cli.config.run.test_after_fit and _has_test_step(cli.model):
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint_for_test(cli.trainer))
    close_run(cli)
    return cli


def _has_test_step(model) -> bool:
    from lightning.pytorch import LightningModule

    return type(model).test_step is not LightningModule.test_step


if __name__ == "__main__":
    main()
