"""Compression and recovery with Lightning: ``python train.py fit --config configs/smollm2_demo.yaml``.

The same command as the ``flatten-train`` console script (``flatten_lightning.lightning.fit``); the
callbacks named in the YAML (``callbacks.FlattenCallback`` ...) are the installed ``callbacks`` package.
"""

from flatten_lightning.lightning.fit import console_main, main

__all__ = ["main"]  # the in-process entry point (returns the LightningCLI); the script adds exit statuses

if __name__ == "__main__":
    console_main()
