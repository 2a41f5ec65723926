"""Training tasks (forecast, classify/regress, anomaly), evaluation against baselines, MLflow registry."""
