"""Inf-Net code: `Code.model_lung_infection` holds the models, data, losses and stages."""
