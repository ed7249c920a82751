"""Continuous training: the lifecycle as one pipeline (Kubeflow Pipelines, its local runner, Airflow)."""
