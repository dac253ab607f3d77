"""MLflow: tracked runs, the pyfunc model, the registry and the promotion gate."""
