"""Training base models (standard or modular) and the model files they produce."""
